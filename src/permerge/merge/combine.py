"""merge_models(): the pipeline (:mod:`permerge.pipeline`) behind ``permerge merge`` — validate, align
N models (or two, partially within a width budget, optionally refitted by PLeaS), check that every
permutation applied keeps its model's function, merge.

Methods live in :data:`METHODS` (name → function), so a new one is one function and one entry.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from torch import nn

from permerge.align import align
from permerge.check import check_compatible, check_permutations
from permerge.errors import PermergeError
from permerge.graph import trace
from permerge.match import activation_matching, weight_matching
from permerge.merge import check_merge_weights, merge
from permerge.merge.many import c2m3_merge, merge_many
from permerge.merge.partial import Budget, partial_merge
from permerge.merge.pleas import pleas
from permerge.merge.zipit import zipit
from permerge.permutation import Permutation, identity
from permerge.pipeline import positive
from permerge.spec import PermutationSpec

__all__ = ["METHODS", "MergeRequest", "MergeResult", "check_merge_request", "merge_models"]


@dataclass(frozen=True)
class MergeResult:
    model: nn.Module
    permutations: tuple[Permutation, ...]  # per input: maps it into the merged basis (empty: average)
    spec: PermutationSpec
    report: dict[str, Any] = field(default_factory=dict)
    architecture: Mapping[str, Any] | None = None  # widths per group etc. (partial, pleas): the model is wider


@dataclass(frozen=True)
class MergeRequest:
    """Everything a merge method may use; each takes what it needs."""

    models: Sequence[nn.Module]
    example_inputs: Any
    weights: Sequence[float] | None
    spec: PermutationSpec | None
    example_kwargs: Mapping[str, Any] | None
    seed: int
    budget: Budget
    data: Iterable[Any] | None
    keep_heads: bool
    options: Mapping[str, Any]
    quiet: bool


@dataclass(frozen=True)
class _Merged:
    model: nn.Module
    permutations: tuple[Permutation, ...]
    spec: PermutationSpec
    report: dict[str, Any]
    architecture: Mapping[str, Any] | None = None


def _spec(req: MergeRequest) -> PermutationSpec:
    if req.spec is not None:
        req.spec.validate(req.models[0].state_dict())
        return req.spec
    return trace(req.models[0], req.example_inputs, example_kwargs=req.example_kwargs)


def _weight(req: MergeRequest) -> _Merged:
    spec = _spec(req)
    # check=False: merge_models checks every model's permutation, this one's included, after merging
    aligned = [align(req.models[0], m, req.example_inputs, spec=spec, example_kwargs=req.example_kwargs, seed=req.seed,
                     check=False, quiet=req.quiet) for m in req.models[1:]]  # fmt: skip
    merged = merge([req.models[0], *(a.model for a in aligned)], req.weights)
    perms = (identity(spec), *(a.permutation for a in aligned))
    return _Merged(merged, perms, spec, {"alignments": [a.report for a in aligned]})  # type: ignore[arg-type]


def _many(req: MergeRequest) -> _Merged:
    spec = _spec(req)
    # check=False here and in _c2m3: merge_models checks every model's permutation after merging
    res = merge_many(req.models, spec=spec, seed=req.seed, check=False, **req.options)
    return _Merged(res.merged, res.permutations, spec, res.report())  # type: ignore[arg-type]


def _c2m3(req: MergeRequest) -> _Merged:
    spec = _spec(req)
    res = c2m3_merge(req.models, spec=spec, seed=req.seed, check=False, quiet=req.quiet, **req.options)
    return _Merged(res.merged, res.permutations, spec, res.report())  # type: ignore[arg-type]


def _average(req: MergeRequest) -> _Merged:
    spec = _spec(req)
    return _Merged(merge(list(req.models), req.weights), (), spec, {})  # type: ignore[arg-type]


def _partial(req: MergeRequest) -> _Merged:
    a, b = req.models
    report: dict[str, Any] = {"budget": req.budget, "keep_heads": req.keep_heads}
    spec = _spec(req)
    if req.data is not None:
        am = activation_matching(a, b, spec, req.data, example_kwargs=req.example_kwargs, return_costs=True, quiet=req.quiet)
        perm, costs, report["matching"] = am.permutation, am.costs, "activation"
    else:
        perm = weight_matching(spec, a.state_dict(), b.state_dict(), seed=req.seed).permutation
        costs, report["matching"] = None, "weight (pairs kept apart by weight similarity)"
    part = partial_merge(spec, a, b, perm, costs, req.budget, keep_heads=req.keep_heads,
                         example_inputs=req.example_inputs, example_kwargs=req.example_kwargs)  # fmt: skip
    report.update(widths=dict(part.widths), notes=list(part.notes))
    return _Merged(part.model, (identity(part.spec), part.permutation), part.spec, report, part.architecture())


def _pleas(req: MergeRequest) -> _Merged:
    a, b = req.models
    res = pleas(a, b, req.data, budget=req.budget, keep_heads=req.keep_heads, spec=req.spec,  # type: ignore[arg-type]
                example_kwargs=req.example_kwargs, seed=req.seed, quiet=req.quiet, **req.options)  # fmt: skip
    part = res.partial
    report = {
        "budget": req.budget, "keep_heads": req.keep_heads, "widths": dict(part.widths), "notes": list(part.notes),
        "complete": res.complete, "skipped": dict(res.skipped), "timing_s": dict(res.timing),
        "layers": [{"weight": f.weight, "before": f.before, "after": f.after} for f in res.layers],
    }  # fmt: skip
    return _Merged(res.model, (identity(part.spec), part.permutation), part.spec, report, res.architecture())


def _zipit(req: MergeRequest) -> _Merged:
    res = zipit(req.models, req.data, budget=req.budget, keep_heads=req.keep_heads or None, spec=req.spec,  # type: ignore[arg-type]
                example_kwargs=req.example_kwargs, quiet=req.quiet, **req.options)  # fmt: skip
    report = {
        "budget": req.budget, "alpha": res.alpha, "beta": res.beta, "keep_heads": res.keep_heads, "zipped": list(res.zipped),
        "widths": dict(res.widths), "notes": list(res.notes), "timing_s": dict(res.timing),
        "merges": {g: {"within": s.within, "across": s.across, "correlation": s.correlation} for g, s in res.stats.items()},
    }  # fmt: skip
    return _Merged(res.model, res.permutations, res.spec, report, res.architecture())


METHODS: dict[str, Callable[[MergeRequest], _Merged]] = {
    "weight": _weight,
    "many": _many,
    "c2m3": _c2m3,
    "average": _average,
    "partial": _partial,
    "pleas": _pleas,
    "zipit": _zipit,
}
"""Merge method name → function. ``weight``: weight-match every model to the first, then average
with ``weights``; ``many``: MergeMany (align each to the mean of the others until the objective
stops rising; options ``max_rounds``, ``tol``), uniform; ``c2m3``: C2M3 (cycle-consistent
Frank–Wolfe matching of all models at once, refined by MergeMany rounds; options ``max_iter``,
``fw_tol``, ``refine``, ``max_rounds``, ``tol``), uniform; ``average``: no alignment (the naive baseline); ``partial`` (2 models): align B to A (activation
matching on ``data``, else weight matching) and merge partially within ``budget``; ``pleas`` (2
models, needs ``data``): PLeaS; ``zipit`` (2+ models, needs ``data``): ZipIt! (features merged within
and across models, budget in [1, N], options ``alpha``, ``beta``, ``depth``, ``batches``). The last
three return a wider model and its ``architecture``."""

_TWO_MODELS = frozenset({"partial", "pleas"})
_UNIFORM = frozenset({"many", "c2m3", "partial", "pleas", "zipit"})


def check_merge_request(method: str, n_models: int, *, weights: Sequence[float] | None, budget: Budget,
                        data: Iterable[Any] | None = None, has_data: bool | None = None) -> None:  # fmt: skip
    """Everything about a merge checkable before loading or tracing a model: the method, the number
    of models, the weights (finite, in [0, 1], summing to 1), the budget, the data requirement."""
    if method not in METHODS:
        raise PermergeError(f"unknown merge method {method!r}; choose one of {', '.join(METHODS)}")
    if n_models < 2:
        raise PermergeError(f"merging needs at least 2 models, got {n_models}")
    if method in _TWO_MODELS and n_models != 2:
        raise PermergeError(f"--method {method} merges exactly two models, got {n_models}")
    if weights is not None and method in _UNIFORM:
        raise PermergeError(f"--method {method} averages matched units equally; drop --weights (or use --method weight)")
    check_merge_weights(weights, n_models)
    if method in _TWO_MODELS or method == "zipit":
        top = n_models if method == "zipit" else 2
        ratios = budget.values() if isinstance(budget, Mapping) else [budget]
        for r in ratios:
            if isinstance(r, bool) or not isinstance(r, (int, float)) or not (math.isfinite(r) and 1.0 <= r <= top):
                raise PermergeError(f"budget ratios must be numbers in [1, {top}], got {r!r}")
    if method in ("pleas", "zipit") and not (has_data if has_data is not None else data is not None):
        name = "PLeaS" if method == "pleas" else "ZipIt!"
        raise PermergeError(f"{name} needs unlabeled data: pass data=... (--data package.module:function)")


def merge_models(
    models: Sequence[nn.Module],
    example_inputs: Any,
    *,
    method: str = "weight",
    weights: Sequence[float] | None = None,
    spec: PermutationSpec | None = None,
    example_kwargs: Mapping[str, Any] | None = None,
    seed: int = 0,
    budget: Budget = 1.0,
    data: Iterable[Any] | None = None,
    keep_heads: bool = False,
    options: Mapping[str, Any] | None = None,
    quiet: bool = False,
    tol: float = 1e-4,
) -> MergeResult:
    """Merge 2+ models of one architecture with one of :data:`METHODS`.

    Before any tracing: the request (:func:`check_merge_request`) and the models
    (:func:`~permerge.check.check_compatible`: one class, keys, shapes, finite weights). After
    merging: every permutation applied must keep its model's function
    (:func:`~permerge.check.check_function_preserved`, eval and train mode, two batch sizes), or
    :class:`~permerge.errors.FunctionNotPreservedError` is raised; the largest error is
    ``report["function_preservation_error"]`` (0.0 when nothing was permuted). ``keep_heads``
    (partial, pleas, zipit) keeps every model's outputs (concatenated, in model order); ``options``
    are the method's own keyword arguments (pleas: ``batches``, ``max_seconds``, …; zipit: ``alpha``,
    ``beta``, ``depth``, ``batches``).
    """
    start = time.perf_counter()
    check_merge_request(method, len(models), weights=weights, budget=budget, data=data)
    positive("tol", tol)
    check_compatible(models, [f"model {i}" for i in range(len(models))])
    req = MergeRequest(models, example_inputs, weights, spec, example_kwargs, seed, budget, data, keep_heads,
                       options or {}, quiet)  # fmt: skip
    res = METHODS[method](req)
    checks = check_permutations(models, res.spec, res.permutations, example_inputs, example_kwargs=example_kwargs,
                                tol=tol, seed=seed)
    errors = [r.relative_error for r in checks if r is not None]
    report: dict[str, Any] = {
        "method": method,
        "models": len(models),
        "groups": len(res.spec.groups),
        **res.report,
        "function_preservation_error": max(errors, default=0.0),
        "function_checks": [None if r is None else {"relative_error": r.relative_error, "runs": list(r.runs),
                                                    "skipped": list(r.skipped)} for r in checks],  # fmt: skip
    }
    if res.architecture is not None:
        report["parameters"] = sum(p.numel() for p in res.model.parameters())
    report["seconds"] = time.perf_counter() - start
    return MergeResult(res.model, res.permutations, res.spec, report, res.architecture)
