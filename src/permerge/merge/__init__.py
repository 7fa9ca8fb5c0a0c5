"""Merging aligned models: weighted interpolation of state dicts (MergeMany in ``many.py``, partial
merging in ``partial.py``, PLeaS in ``pleas.py``, the ``permerge merge`` entry point in ``combine.py``).

This subpackage is also callable: ``permerge.merge(models, weights)`` is :func:`merge`, so the short
public spelling and ``import permerge.merge.partial`` both work (a function re-exported under the
subpackage's name used to hide the subpackage).
"""

from __future__ import annotations

import copy
import math
import sys
import types
from collections.abc import Mapping, Sequence
from typing import Any

import torch
from torch import nn

from permerge.check import check_compatible
from permerge.errors import PermergeError

__all__ = ["MergeWeightsError", "check_merge_weights", "check_same_architecture", "interpolate", "merge", "state_dict_of"]


def state_dict_of(model: nn.Module | Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    return dict(model.state_dict()) if isinstance(model, nn.Module) else dict(model)


def check_same_architecture(sds: Sequence[Mapping[str, torch.Tensor]], names: Sequence[str] | None = None) -> None:
    """Raise :class:`~permerge.errors.StateDictMismatchError` naming keys or shapes that differ
    (:func:`permerge.check.check_compatible` on keys and shapes only)."""
    check_compatible(sds, list(names or [f"model {i}" for i in range(len(sds))]), finite=False)


class MergeWeightsError(PermergeError, ValueError):
    """Merge weights that are not a convex combination (names the fix)."""


def check_merge_weights(weights: Sequence[float] | None, n: int) -> list[float]:
    """``weights`` as floats (uniform when ``None``), raising unless there are ``n`` of them, each finite
    and in [0, 1], summing to 1 (within 1e-6): NaN weights would write an all-NaN model."""
    if n < 1:
        raise MergeWeightsError("merge needs at least one model")
    if weights is None:
        return [1.0 / n] * n
    try:
        ws = [float(w) for w in weights]
    except (TypeError, ValueError) as e:
        raise MergeWeightsError(f"merge weights must be numbers, got {list(weights)!r}") from e
    if len(ws) != n:
        raise MergeWeightsError(f"got {len(ws)} weights for {n} models")
    if not all(math.isfinite(w) and 0.0 <= w <= 1.0 for w in ws) or abs(math.fsum(ws) - 1.0) > 1e-6:
        raise MergeWeightsError(f"weights must be finite, in [0, 1] and sum to 1, got {ws}")
    return ws


def merge(
    models: Sequence[nn.Module | Mapping[str, torch.Tensor]], weights: Sequence[float] | None = None
) -> nn.Module | dict[str, torch.Tensor]:
    """Weighted average of (already aligned) models: ``Σ wᵢ θᵢ`` with ``Σ wᵢ = 1``.

    Floating-point tensors are averaged in float32 and cast back to the first model's dtype; integer
    and boolean tensors (e.g. BatchNorm's ``num_batches_tracked``) are copied from the first model.
    Returns a new module (a copy of the first) if modules were given, else a state dict. Inputs
    are untouched.
    """
    ws = check_merge_weights(weights, len(models))
    sds = [state_dict_of(m) for m in models]
    check_compatible(sds, [f"model {i}" for i in range(len(sds))], finite=True)
    out = {}
    for k, ref in sds[0].items():
        if ref.is_floating_point():
            acc = sum(w * sd[k].float() for w, sd in zip(ws, sds))
            out[k] = acc.to(ref.dtype)  # type: ignore[union-attr]
        else:
            out[k] = ref.clone()
    if isinstance(models[0], nn.Module):
        merged = copy.deepcopy(models[0])
        merged.load_state_dict(out)
        return merged
    return out


def interpolate(
    a: nn.Module | Mapping[str, torch.Tensor], b: nn.Module | Mapping[str, torch.Tensor], alpha: float
) -> nn.Module | dict[str, torch.Tensor]:
    """``(1 - alpha)·A + alpha·B`` for ``alpha`` in [0, 1] (the straight line of Git Re-Basin's barrier plots)."""
    alpha = float(alpha)
    if not (math.isfinite(alpha) and 0.0 <= alpha <= 1.0):
        raise MergeWeightsError(f"alpha must be finite and in [0, 1], got {alpha}")
    return merge([a, b], [1.0 - alpha, alpha])


class _CallableModule(types.ModuleType):
    def __call__(self, *args: Any, **kwargs: Any) -> nn.Module | dict[str, torch.Tensor]:
        return merge(*args, **kwargs)


sys.modules[__name__].__class__ = _CallableModule
