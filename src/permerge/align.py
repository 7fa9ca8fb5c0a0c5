"""align(): trace → match → apply → check, the one orchestration function the CLI calls."""

from __future__ import annotations

import copy
import logging
import time
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field, fields
from typing import Any

import torch
from torch import nn

from permerge.apply import apply_permutation
from permerge.check import check_function_preserved
from permerge.errors import PermergeError, StateDictMismatchError
from permerge.graph import trace
from permerge.match import MatchRequest, get_matcher
from permerge.merge import check_same_architecture
from permerge.permutation import Permutation
from permerge.spec import PermutationSpec

LOG = logging.getLogger(__name__)

__all__ = ["AlignResult", "align"]


@dataclass(frozen=True)
class AlignResult:
    """B aligned to A (same class, same keys), the permutation applied, and a report."""

    model: nn.Module
    permutation: Permutation
    spec: PermutationSpec
    report: dict[str, Any] = field(default_factory=dict)


def _check_models(model_a: nn.Module, model_b: nn.Module) -> None:
    if type(model_a) is not type(model_b):
        raise StateDictMismatchError(
            f"models have different classes: {type(model_a).__name__} vs {type(model_b).__name__}"
        )
    sd_a, sd_b = model_a.state_dict(), model_b.state_dict()
    check_same_architecture([sd_a, sd_b], ["model A", "model B"])
    for name, sd in (("model A", sd_a), ("model B", sd_b)):
        bad = sorted(k for k, v in sd.items() if v.is_floating_point() and not torch.isfinite(v).all())
        if bad:
            raise StateDictMismatchError(f"{name} has NaN or infinite values in {bad[:10]}")


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
    **options: Any,
) -> AlignResult:
    """Align ``model_b``'s hidden units to ``model_a``'s; returns an aligned *copy* of B.

    ``method`` is a registered matcher: ``"weight"`` (Git Re-Basin weight matching, no data),
    ``"activation"`` (needs ``data``) or ``"ste"`` (needs ``(inputs, targets)`` ``data``);
    ``options`` go to the matcher. ``spec`` defaults to ``trace(model_a, example_inputs)``. With
    ``check`` (default) the permutation is verified not to change B's function on the example
    input, raising :class:`~permerge.FunctionNotPreservedError` naming the group otherwise.

    Example:
        >>> import torch, permerge
        >>> from permerge.models import MLP
        >>> a, b = MLP(hidden=(16,)), MLP(hidden=(16,))
        >>> res = permerge.align(a, b, torch.randn(2, 784))
        >>> sorted(res.model.state_dict()) == sorted(b.state_dict())
        True
    """
    times: dict[str, float] = {}
    t0 = time.perf_counter()
    _check_models(model_a, model_b)
    if spec is None:
        spec = trace(model_a, example_inputs, example_kwargs=example_kwargs)
    else:
        spec.validate(model_a.state_dict())
    times["trace"] = time.perf_counter() - t0
    t0 = time.perf_counter()
    request = MatchRequest(spec, model_a, model_b, example_inputs, dict(example_kwargs or {}), data, seed, quiet, options)
    result = get_matcher(method)(request)
    times["match"] = time.perf_counter() - t0
    t0 = time.perf_counter()
    aligned_sd = apply_permutation(spec, result.permutation, model_b.state_dict())
    aligned = copy.deepcopy(model_b)
    aligned.load_state_dict(aligned_sd)
    times["apply"] = time.perf_counter() - t0
    preservation = None
    if check:
        t0 = time.perf_counter()
        preservation = check_function_preserved(
            model_b, spec, example_inputs, result.permutation, example_kwargs=example_kwargs, tol=tol
        ).relative_error
        times["check"] = time.perf_counter() - t0
    details = {f.name: getattr(result, f.name) for f in fields(result) if f.name != "permutation"}
    report = {
        "method": method,
        "groups": len(spec.groups),
        "group_sizes": {g.name: g.size for g in spec.groups},
        "frozen": [{"size": f.size, "reason": f.reason, "boundary": f.boundary} for f in spec.frozen],
        "changed_groups": sum(not torch.equal(p, torch.arange(len(p))) for p in result.permutation.values()),
        "function_preservation_error": preservation,
        "timing_s": times,
        **_jsonable(details),
    }
    LOG.info("aligned %d groups with %s matching in %.2f s", len(spec.groups), method, sum(times.values()))
    return AlignResult(aligned, result.permutation, spec, report)


def _jsonable(x: Any) -> Any:
    if isinstance(x, Mapping):
        return {str(k): _jsonable(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [_jsonable(v) for v in x]
    if isinstance(x, torch.Tensor):
        return x.tolist() if x.numel() <= 64 else f"tensor{tuple(x.shape)}"
    if isinstance(x, PermergeError):
        return str(x)
    return x
