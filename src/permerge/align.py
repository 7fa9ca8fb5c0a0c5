"""align(): the pipeline (:mod:`permerge.pipeline`) for two modules in memory.

validate (matcher, classes, keys, shapes, finite weights) → spec (traced from A) → match → check
(B permuted keeps B's function) → apply (an aligned copy of B).

With ``symmetries`` beyond permutations the same stages run on B with the norm gains its dense
groups need folded (:mod:`permerge.reparam`); the result is moved back into A's gauge and checked
against B end to end.
"""

from __future__ import annotations

import copy
import dataclasses
import logging
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from permerge.apply import apply_permutation, apply_transform
from permerge.check import check_compatible, check_same_function
from permerge.errors import PermergeError
from permerge.graph import trace, trace_graph
from permerge.match import MatchRequest, get_matcher
from permerge.match.refine import refine_transform
from permerge.match.symmetry import DENSE, transform_activation_matching, transform_weight_matching
from permerge.permutation import Permutation
from permerge.pipeline import ModuleCheck, Stages, positive, run_alignment
from permerge.reparam import fold_gains, gauge, unfold_gains
from permerge.spec import PERMUTATION, PermutationSpec
from permerge.transform import Transform, resolve_symmetries

LOG = logging.getLogger(__name__)

__all__ = ["AlignResult", "align", "check_method", "check_models"]

TRANSFORM_METHODS = ("weight", "activation")
"""The matchers that align beyond permutations (``symmetries``)."""

_NEEDS_DATA = {"activation": "activation matching", "ste": "STE matching", "sinkhorn": "Sinkhorn matching"}


@dataclass(frozen=True)
class AlignResult:
    """B aligned to A (same class, same keys), the permutation applied, and a report.

    With ``symmetries`` beyond permutations, ``transform`` is the whole transform (dense maps and
    scales included; it applies to B with its norm gains folded, see :mod:`permerge.reparam`) and
    ``permutation`` holds the groups aligned by plain permutations.
    """

    model: nn.Module
    permutation: Permutation
    spec: PermutationSpec
    report: dict[str, Any] = field(default_factory=dict)
    transform: Transform | None = None


def check_method(method: str, *, has_data: bool) -> None:
    """Raise unless ``method`` is a registered matcher that has the data it needs."""
    get_matcher(method)
    if method in _NEEDS_DATA and not has_data:
        raise PermergeError(f"{_NEEDS_DATA[method]} needs data: pass data=... (--data package.module:function)")


def check_models(model_a: nn.Module, model_b: nn.Module, *, data: Iterable[Any] | None = None, method: str = "weight") -> None:
    """Everything :func:`align` checks before tracing: the matcher (:func:`check_method`), two
    modules of one class with one key set, shapes, and finite weights."""
    check_method(method, has_data=data is not None)
    if not isinstance(model_a, nn.Module) or not isinstance(model_b, nn.Module):
        raise PermergeError(f"align takes two nn.Modules, got {type(model_a).__name__} and {type(model_b).__name__}")
    check_compatible([model_a, model_b], ["model A", "model B"])


def align(
    model_a: nn.Module,
    model_b: nn.Module,
    example_inputs: Any,
    method: str = "weight",
    *,
    spec: PermutationSpec | None = None,
    example_kwargs: Mapping[str, Any] | None = None,
    data: Iterable[Any] | None = None,
    seed: int = 0,
    check: bool = True,
    tol: float = 1e-4,
    quiet: bool = False,
    symmetries: str | Iterable[str] = "permutation",
    refine: Mapping[str, Any] | None = None,
    **options: Any,
) -> AlignResult:
    """Align ``model_b``'s hidden units to ``model_a``'s; returns an aligned *copy* of B.

    ``method`` is a registered matcher: ``"weight"`` (Git Re-Basin weight matching, no data),
    ``"activation"`` (needs ``data``) or ``"ste"`` (needs ``(inputs, targets)`` ``data``);
    ``options`` go to the matcher. ``spec`` defaults to ``trace(model_a, example_inputs)``. With
    ``check`` (default) the permutation is verified not to change B's function (eval and train mode,
    two batch sizes: :func:`~permerge.check.check_function_preserved`), raising
    :class:`~permerge.FunctionNotPreservedError` naming the group otherwise; the error is in
    ``report["function_preservation_error"]``. Neither model is modified.

    ``symmetries`` (``"permutation"``, ``"all"`` or a set of classes, see
    :data:`permerge.spec.SYMMETRIES`) lets groups whose class allows it be aligned by orthogonal or
    invertible maps or scaled permutations (methods ``"weight"`` and ``"activation"``): the norm
    gains on those groups are folded into their consumers, the transform is matched and checked on
    B so folded, and the result is moved back into A's gauge (B's gains replaced by A's, same
    function), so it loads, merges and interpolates like any aligned B; B and the result are then
    compared end to end (``report["end_to_end_error"]``). ``refine`` (e.g. ``{"steps": 200, "lr": 1e-2,
    "loss_fn": ...}``, the options of :func:`~permerge.match.refine.refine_transform`, and its own ``"data"`` if not
    ``data``) then improves the dense maps by gradient steps on the loss of the line between A and B
    (``(inputs, targets)`` batches); the matched maps are kept where refinement does not lower the
    midpoint loss on its selection batches.

    Example:
        >>> import torch, permerge
        >>> from permerge.models import MLP
        >>> a, b = MLP(hidden=(16,)), MLP(hidden=(16,))
        >>> res = permerge.align(a, b, torch.randn(2, 784))
        >>> sorted(res.model.state_dict()) == sorted(b.state_dict())
        True
    """
    stages = Stages(quiet=quiet)
    with stages("validate"):
        positive("tol", tol)
        check_models(model_a, model_b, data=data, method=method)
        if symmetries != "permutation" and method not in TRANSFORM_METHODS:
            raise PermergeError(f"method {method!r} aligns permutations only; use 'weight' or 'activation' with symmetries={symmetries!r}")
        resolve_symmetries(PermutationSpec(()), symmetries)  # the names, before any work
        if refine is not None and (symmetries == "permutation" or (data is None and "data" not in refine)):
            raise PermergeError("refine improves dense maps on the path loss: it needs symmetries beyond 'permutation' "
                                "and (inputs, targets) data")  # fmt: skip
    with stages("trace"):
        if spec is None:
            spec = trace(model_a, example_inputs, example_kwargs=example_kwargs)
        else:
            spec.validate(model_a.state_dict())
    classes = resolve_symmetries(spec, symmetries)
    if any(c != PERMUTATION for g, c in classes.items() if spec[g].size > 1):
        return _align_transform(model_a, model_b, example_inputs, method, spec, classes, dict(example_kwargs or {}),
                                data, seed, check, tol, quiet, options, stages, refine)  # fmt: skip
    request = MatchRequest(spec, model_a, model_b, example_inputs, dict(example_kwargs or {}), data, seed, quiet, options)
    fc = ModuleCheck(model_b, spec, example_inputs, example_kwargs, tol, seed) if check else None
    perm, report = run_alignment(spec, lambda: get_matcher(method)(request), fc, stages, method=method)
    with stages("apply"):
        aligned = copy.deepcopy(model_b)
        aligned.load_state_dict(apply_permutation(spec, perm, model_b.state_dict()))
    LOG.info("aligned %d groups with %s matching in %.2f s", len(spec.groups), method, sum(stages.seconds.values()))
    return AlignResult(aligned, perm, spec, report)


def _align_transform(
    model_a: nn.Module, model_b: nn.Module, example_inputs: Any, method: str, spec: PermutationSpec,
    classes: Mapping[str, str], kwargs: dict[str, Any], data: Iterable[Any] | None, seed: int, check: bool,
    tol: float, quiet: bool, options: Mapping[str, Any], stages: Stages, refine: Mapping[str, Any] | None = None,
) -> AlignResult:  # fmt: skip
    """``align`` beyond permutations: fold the gains the dense groups need, match, check, apply, unfold
    into A's gauge, check B against the result end to end."""
    with stages("trace"):
        g = gauge(trace_graph(model_a, example_inputs, example_kwargs=kwargs), [n for n, c in classes.items() if c in DENSE], spec)
    sd_a = model_a.state_dict()
    folded_b = copy.deepcopy(model_b)
    folded_b.load_state_dict(fold_gains(g, model_b.state_dict()))
    wanted = set(classes.values())

    folded_a = copy.deepcopy(model_a)
    folded_a.load_state_dict(fold_gains(g, sd_a))

    def match() -> Any:
        if method == "weight":
            res = transform_weight_matching(g.spec, folded_a.state_dict(), folded_b.state_dict(), symmetries=wanted,
                                            keep_ones=g.keep_ones, seed=seed, quiet=quiet, **options)  # fmt: skip
        else:
            res = transform_activation_matching(folded_a, folded_b, g.spec, data, symmetries=wanted, keep_ones=g.keep_ones,
                                                example_kwargs=kwargs, quiet=quiet, **options)  # fmt: skip
        if refine is None:
            return res
        opts = dict(refine)
        batches = opts.pop("data", data)
        transform, info = refine_transform(g.spec, folded_a, folded_b.state_dict(), res.transform, res.classes, batches,
                                           keep_ones=g.keep_ones, seed=seed, quiet=quiet, **opts)  # fmt: skip
        return dataclasses.replace(res, transform=transform, refined=info)

    fc = ModuleCheck(folded_b, g.spec, example_inputs, kwargs, tol, seed) if check else None
    extra = {"class_counts": {c: sum(v == c for v in classes.values()) for c in sorted(wanted)},
             "folded_gains": [x.gain for x in g.gains], "keep_ones": sorted(g.keep_ones)}  # fmt: skip
    transform, report = run_alignment(g.spec, match, fc, stages, method=method, **extra)
    with stages("apply"):
        aligned = copy.deepcopy(model_b)
        aligned.load_state_dict(unfold_gains(g, apply_transform(g.spec, transform, folded_b.state_dict()), sd_a))
    if check:
        with stages("check"):
            report["end_to_end_error"] = check_same_function(model_b, aligned, example_inputs, example_kwargs=kwargs,
                                                             tol=tol, seed=seed).relative_error  # fmt: skip
    LOG.info("aligned %d groups (%s) with %s matching in %.2f s", len(spec.groups), extra["class_counts"], method,
             sum(stages.seconds.values()))  # fmt: skip
    perm = {n: t for n, t in transform.items() if isinstance(t, torch.Tensor)}
    return AlignResult(aligned, perm, spec, report, transform)
