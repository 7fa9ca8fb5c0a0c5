"""Function-preservation check: a permuted model must compute what the original computes.

Used by ``align`` before it returns and by the tests. On failure it finds which groups break the
function (by applying each group's permutation alone) and names them in the error.
"""

from __future__ import annotations

import copy
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from permerge.apply import apply_permutation
from permerge.errors import FunctionNotPreservedError
from permerge.graph.capture import as_args
from permerge.permutation import random_permutation
from permerge.spec import PermutationSpec

__all__ = ["PreservationReport", "check_function_preserved", "output_error", "validate_spec"]


@dataclass(frozen=True)
class PreservationReport:
    max_abs_error: float
    relative_error: float  # max |Δ| / max |output|
    tol: float


def _leaves(out: Any) -> list[torch.Tensor]:
    if isinstance(out, torch.Tensor):
        return [out]
    if isinstance(out, Mapping):
        return [t for v in out.values() for t in _leaves(v)]
    if isinstance(out, (tuple, list)):
        return [t for v in out for t in _leaves(v)]
    if hasattr(out, "to_tuple"):
        return _leaves(out.to_tuple())
    return []


def _forward(model: nn.Module, args: tuple[Any, ...], kwargs: Mapping[str, Any]) -> list[torch.Tensor]:
    flags = [(m, m.training) for m in model.modules()]
    try:
        model.eval()
        with torch.no_grad():
            return [t.detach().float() for t in _leaves(model(*args, **kwargs)) if t.is_floating_point()]
    finally:
        for m, t in flags:
            m.training = t


def output_error(a: list[torch.Tensor], b: list[torch.Tensor]) -> tuple[float, float]:
    """(max absolute difference, that difference relative to the largest output magnitude)."""
    err = max((float((x - y).abs().max()) for x, y in zip(a, b) if x.numel()), default=0.0)
    scale = max((float(x.abs().max()) for x in a if x.numel()), default=0.0)
    if any(not torch.isfinite(y).all() for y in b):
        return float("inf"), float("inf")
    return err, err / max(scale, 1e-12)


def _tf32_off() -> Any:
    prev = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False
    return prev


def check_function_preserved(
    model: nn.Module,
    spec: PermutationSpec,
    example_inputs: Any,
    perm: Mapping[str, torch.Tensor] | None = None,
    *,
    example_kwargs: Mapping[str, Any] | None = None,
    tol: float = 1e-4,
    seed: int = 0,
) -> PreservationReport:
    """Run ``model`` and its permuted copy on the example input; raise if outputs differ.

    ``perm`` defaults to a random permutation of every group. The tolerance is relative to the
    largest output magnitude (float32 reorders sums, so exact equality is not expected). The
    model itself is never modified: the permuted weights go into a deep copy. TF32 is switched off
    for the duration (with it on, permuted GPU models differ by ~1e-2).

    Raises:
        FunctionNotPreservedError: naming each group whose permutation alone changes the output.
    """
    args, kwargs = as_args(example_inputs), dict(example_kwargs or {})
    perm = dict(perm) if perm is not None else random_permutation(spec, seed)
    prev = _tf32_off()
    try:
        ref = _forward(model, args, kwargs)
        sd = model.state_dict()
        copy_ = copy.deepcopy(model)

        def error_with(p: Mapping[str, torch.Tensor]) -> tuple[float, float]:
            copy_.load_state_dict(apply_permutation(spec, p, sd))
            return output_error(ref, _forward(copy_, args, kwargs))

        err, rel = error_with(perm)
        if rel <= tol:
            return PreservationReport(err, rel, tol)
        bad = []
        for name in perm:
            e, r = error_with({name: perm[name]})
            if r > tol:
                bad.append(f"group {name!r} (size {spec[name].size}) changed the output by {r:.2e} > tol {tol:.0e}")
        names = [b.split("'")[1] for b in bad]
        raise FunctionNotPreservedError(
            f"permutation changed the model output (relative error {rel:.2e} > tol {tol:.0e}). "
            + ("; ".join(bad) if bad else "no single group is to blame: groups interact")
            + (f". Pass freeze={names} to leave them unpermuted." if names else ".")
        )
    finally:
        torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = prev


def validate_spec(
    spec: PermutationSpec,
    model: nn.Module,
    example_inputs: Any,
    *,
    example_kwargs: Mapping[str, Any] | None = None,
    tol: float = 1e-4,
    seed: int = 0,
) -> PreservationReport:
    """Check a user-supplied (hand-written, JSON or ``axes_to_perm``) spec against ``model``.

    Shapes first (:class:`SpecError` naming each mismatch), then function preservation under a
    random permutation (:class:`FunctionNotPreservedError` naming the offending groups).
    """
    spec.validate(model.state_dict())
    return check_function_preserved(model, spec, example_inputs, example_kwargs=example_kwargs, tol=tol, seed=seed)
