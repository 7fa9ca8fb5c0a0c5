"""align(): the pipeline (:mod:`permerge.pipeline`) for two modules in memory.

validate (matcher, classes, keys, shapes, finite weights) → spec (traced from A) → match → check
(B permuted keeps B's function) → apply (an aligned copy of B).
"""

from __future__ import annotations

import copy
import logging
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

from torch import nn

from permerge.apply import apply_permutation
from permerge.check import check_compatible
from permerge.errors import PermergeError
from permerge.graph import trace
from permerge.match import MatchRequest, get_matcher
from permerge.permutation import Permutation
from permerge.pipeline import ModuleCheck, Stages, positive, run_alignment
from permerge.spec import PermutationSpec

LOG = logging.getLogger(__name__)

__all__ = ["AlignResult", "align", "check_method", "check_models"]

_NEEDS_DATA = {"activation": "activation matching", "ste": "STE matching"}


@dataclass(frozen=True)
class AlignResult:
    """B aligned to A (same class, same keys), the permutation applied, and a report."""

    model: nn.Module
    permutation: Permutation
    spec: PermutationSpec
    report: dict[str, Any] = field(default_factory=dict)


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

    Example:
        >>> import torch, permerge
        >>> from permerge.models import MLP
        >>> a, b = MLP(hidden=(16,)), MLP(hidden=(16,))
        >>> res = permerge.align(a, b, torch.randn(2, 784))
        >>> sorted(res.model.state_dict()) == sorted(b.state_dict())
        True
    """
    stages = Stages()
    with stages("validate"):
        positive("tol", tol)
        check_models(model_a, model_b, data=data, method=method)
    with stages("trace"):
        if spec is None:
            spec = trace(model_a, example_inputs, example_kwargs=example_kwargs)
        else:
            spec.validate(model_a.state_dict())
    request = MatchRequest(spec, model_a, model_b, example_inputs, dict(example_kwargs or {}), data, seed, quiet, options)
    fc = ModuleCheck(model_b, spec, example_inputs, example_kwargs, tol, seed) if check else None
    perm, report = run_alignment(spec, lambda: get_matcher(method)(request), fc, stages, method=method)
    with stages("apply"):
        aligned = copy.deepcopy(model_b)
        aligned.load_state_dict(apply_permutation(spec, perm, model_b.state_dict()))
    LOG.info("aligned %d groups with %s matching in %.2f s", len(spec.groups), method, sum(stages.seconds.values()))
    return AlignResult(aligned, perm, spec, report)
