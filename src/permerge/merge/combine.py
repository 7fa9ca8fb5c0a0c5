"""merge_models(): the one entry point behind ``permerge merge`` — align N models, then average
(or, for two models, merge them partially within a width budget, optionally refitted by PLeaS)."""

from __future__ import annotations

import time
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from torch import nn

from permerge.align import align
from permerge.graph import trace
from permerge.match import activation_matching, weight_matching
from permerge.merge import merge
from permerge.merge.many import merge_many
from permerge.merge.partial import Budget, partial_merge
from permerge.merge.pleas import pleas
from permerge.permutation import Permutation, identity
from permerge.spec import PermutationSpec

__all__ = ["METHODS", "MergeResult", "merge_models"]

METHODS = ("weight", "many", "average", "partial", "pleas")


@dataclass(frozen=True)
class MergeResult:
    model: nn.Module
    permutations: tuple[Permutation, ...]  # per input: maps it into the merged basis (empty: average)
    spec: PermutationSpec
    report: dict[str, Any] = field(default_factory=dict)
    architecture: Mapping[str, Any] | None = None  # widths per group etc. (partial, pleas): the model is wider


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
    pleas_options: Mapping[str, Any] | None = None,
    quiet: bool = False,
) -> MergeResult:
    """Merge 2+ models of one architecture.

    ``"weight"``: weight-match every model to the first, then average with ``weights``;
    ``"many"``: MergeMany (align each to the mean of the others until stable), uniform average;
    ``"average"``: plain weighted average without alignment (the naive baseline);
    ``"partial"`` (2 models): align B to A (activation matching on ``data``, else weight matching)
    and merge partially within ``budget`` (:func:`~permerge.merge.partial.partial_merge`);
    ``"pleas"`` (2 models, needs ``data``): PLeaS (:func:`~permerge.merge.pleas.pleas`, extra
    arguments in ``pleas_options``). Both return a wider model of the same class and its
    ``architecture``; ``keep_heads`` keeps both models' outputs (concatenated, A's first).
    """
    if method not in METHODS:
        raise ValueError(f"unknown merge method {method!r}; choose one of {', '.join(METHODS)}")
    if len(models) < 2:
        raise ValueError(f"merging needs at least 2 models, got {len(models)}")
    start = time.perf_counter()
    if method in ("partial", "pleas"):
        return _budgeted(models, example_inputs, method, weights=weights, spec=spec, example_kwargs=example_kwargs,
                         seed=seed, budget=budget, data=data, keep_heads=keep_heads, options=pleas_options or {},
                         quiet=quiet)  # fmt: skip
    spec = spec or trace(models[0], example_inputs, example_kwargs=example_kwargs)
    report: dict[str, Any] = {"method": method, "models": len(models), "groups": len(spec.groups)}
    if method == "many":
        if weights is not None:
            raise ValueError("MergeMany averages uniformly; drop --weights or use --method weight")
        res = merge_many(models, spec=spec, seed=seed)
        report.update(rounds=res.rounds, converged=res.converged)
        merged, perms = res.merged, res.permutations
    elif method == "weight":
        aligned = [align(models[0], m, example_inputs, spec=spec, example_kwargs=example_kwargs, seed=seed, quiet=quiet)
                   for m in models[1:]]  # fmt: skip
        report["alignments"] = [a.report for a in aligned]
        merged = merge([models[0], *(a.model for a in aligned)], weights)
        perms = (identity(spec), *(a.permutation for a in aligned))
    else:
        merged = merge(list(models), weights)
        perms = ()  # nothing was permuted
    report["seconds"] = time.perf_counter() - start
    return MergeResult(merged, tuple(perms), spec, report)  # type: ignore[arg-type]


def _budgeted(models: Sequence[nn.Module], example_inputs: Any, method: str, *, weights: Sequence[float] | None,
              spec: PermutationSpec | None, example_kwargs: Mapping[str, Any] | None, seed: int, budget: Budget,
              data: Iterable[Any] | None, keep_heads: bool, options: Mapping[str, Any], quiet: bool) -> MergeResult:  # fmt: skip
    """Partial merging and PLeaS: two models, one (widened) result."""
    if len(models) != 2:
        raise ValueError(f"--method {method} merges exactly two models, got {len(models)}")
    if weights is not None:
        raise ValueError(f"--method {method} averages matched units equally; drop --weights")
    start = time.perf_counter()
    a, b = models
    report: dict[str, Any] = {"method": method, "models": 2, "budget": budget, "keep_heads": keep_heads}
    if method == "pleas":
        if data is None:
            raise ValueError("PLeaS needs unlabeled data: pass --data package.module:function")
        res = pleas(a, b, data, budget=budget, keep_heads=keep_heads, spec=spec, example_kwargs=example_kwargs,
                    seed=seed, quiet=quiet, **options)  # fmt: skip
        report.update(
            complete=res.complete, skipped=dict(res.skipped), timing_s=dict(res.timing),
            layers=[{"weight": f.weight, "before": f.before, "after": f.after} for f in res.layers],
        )  # fmt: skip
        model, part, arch = res.model, res.partial, res.architecture()
    else:
        if spec is None:
            spec = trace(a, example_inputs, example_kwargs=example_kwargs)
        else:
            spec.validate(a.state_dict())
        if data is not None:
            am = activation_matching(a, b, spec, data, example_kwargs=example_kwargs, return_costs=True, quiet=quiet)
            perm, costs, report["matching"] = am.permutation, am.costs, "activation"
        else:
            perm = weight_matching(spec, a.state_dict(), b.state_dict(), seed=seed).permutation
            costs, report["matching"] = None, "weight (pairs kept apart by weight similarity)"
        part = partial_merge(spec, a, b, perm, costs, budget, keep_heads=keep_heads,
                             example_inputs=example_inputs, example_kwargs=example_kwargs)  # fmt: skip
        model, arch = part.model, part.architecture()
    report.update(widths=dict(part.widths), parameters=sum(p.numel() for p in model.parameters()), notes=list(part.notes))
    report["seconds"] = time.perf_counter() - start
    return MergeResult(model, (identity(part.spec), part.permutation), part.spec, report, arch)
