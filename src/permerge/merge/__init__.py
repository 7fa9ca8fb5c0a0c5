"""Merging aligned models: weighted interpolation of state dicts (and MergeMany in ``many.py``)."""

from __future__ import annotations

import copy
from collections.abc import Mapping, Sequence

import torch
from torch import nn

from permerge.errors import StateDictMismatchError

__all__ = ["check_same_architecture", "interpolate", "merge", "state_dict_of"]

def state_dict_of(model: nn.Module | Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    return dict(model.state_dict()) if isinstance(model, nn.Module) else dict(model)


def check_same_architecture(sds: Sequence[Mapping[str, torch.Tensor]], names: Sequence[str] | None = None) -> None:
    """Raise :class:`StateDictMismatchError` naming keys, shapes or dtypes that differ."""
    names = list(names or [f"model {i}" for i in range(len(sds))])
    ref = sds[0]
    for name, sd in zip(names[1:], sds[1:]):
        only_a, only_b = sorted(set(ref) - set(sd)), sorted(set(sd) - set(ref))
        if only_a or only_b:
            raise StateDictMismatchError(
                f"{names[0]} and {name} have different keys: only in {names[0]} {only_a[:10]}, "
                f"only in {name} {only_b[:10]}; they must share one architecture"
            )
        shapes = sorted(k for k in ref if tuple(ref[k].shape) != tuple(sd[k].shape))
        if shapes:
            k = shapes[0]
            raise StateDictMismatchError(
                f"{names[0]} and {name} differ in shape at {len(shapes)} tensors, e.g. {k!r}: "
                f"{tuple(ref[k].shape)} vs {tuple(sd[k].shape)}"
            )


def merge(
    models: Sequence[nn.Module | Mapping[str, torch.Tensor]], weights: Sequence[float] | None = None
) -> nn.Module | dict[str, torch.Tensor]:
    """Weighted average of (already aligned) models: ``Σ wᵢ θᵢ`` with ``Σ wᵢ = 1``.

    Floating-point tensors are averaged in float32 and cast back to their dtype; integer tensors
    (e.g. BatchNorm's ``num_batches_tracked``) are taken from the first model. Returns a new
    module (a copy of the first) if modules were given, else a state dict. Inputs are untouched.
    """
    if len(models) < 1:
        raise ValueError("merge needs at least one model")
    weights = [1.0 / len(models)] * len(models) if weights is None else [float(w) for w in weights]
    if len(weights) != len(models):
        raise ValueError(f"got {len(weights)} weights for {len(models)} models")
    if any(w < 0 for w in weights) or abs(sum(weights) - 1.0) > 1e-6:
        raise ValueError(f"weights must be non-negative and sum to 1, got {weights}")
    sds = [state_dict_of(m) for m in models]
    check_same_architecture(sds)
    out = {}
    for k, ref in sds[0].items():
        if ref.is_floating_point():
            acc = sum(w * sd[k].float() for w, sd in zip(weights, sds))
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
    """``(1 - alpha)·A + alpha·B`` (the straight line of Git Re-Basin's barrier plots)."""
    return merge([a, b], [1.0 - alpha, alpha])
