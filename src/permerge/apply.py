"""Apply a permutation to a state dict: pure, index vectors only, same keys out as in."""

from __future__ import annotations

from collections.abc import Mapping

import torch

from permerge.errors import SpecError
from permerge.permutation import check_permutation
from permerge.spec import Axis, PermutationSpec

__all__ = ["apply_permutation", "axis_index", "permute_tensor"]


def axis_index(ax: Axis, p: torch.Tensor, length: int) -> torch.Tensor:
    """Gather index along ``ax.dim`` (length ``length``) that moves unit ``p[i]`` to position ``i``."""
    pos = ax.positions(len(p))
    idx = torch.arange(length)
    idx[pos.flatten()] = pos[:, p.long(), :].flatten()
    return idx


def permute_tensor(
    t: torch.Tensor, axes: tuple[tuple[str, Axis], ...], perm: Mapping[str, torch.Tensor]
) -> torch.Tensor:
    """Permute ``t`` along every ``(group, axis)`` whose group is in ``perm``.

    Groups sharing one dimension (heads × head_dim, slices of a concatenation) act on disjoint
    or factorised positions, so they commute and their gathers compose in any order.
    """
    per_dim: dict[int, torch.Tensor] = {}
    for name, ax in axes:
        p = perm.get(name)
        if p is None:
            continue
        dim = ax.dim % t.dim()
        idx = axis_index(ax, p, t.shape[dim])
        per_dim[dim] = idx if dim not in per_dim else per_dim[dim][idx]
    for dim, idx in per_dim.items():
        t = t.index_select(dim, idx.to(t.device))
    return t


def apply_permutation(
    spec: PermutationSpec, perm: Mapping[str, torch.Tensor], state_dict: Mapping[str, torch.Tensor]
) -> dict[str, torch.Tensor]:
    """Return a new state dict with every group's units reordered by ``perm``.

    Tensors no group touches are passed through (not copied); the input is never modified.
    Groups missing from ``perm`` are left as they are.

    Example:
        >>> import torch
        >>> from permerge.spec import Axis, Group, PermutationSpec
        >>> spec = PermutationSpec((Group("h", 2, (Axis("w", 0),)),))
        >>> apply_permutation(spec, {"h": torch.tensor([1, 0])}, {"w": torch.tensor([1., 2.])})["w"]
        tensor([2., 1.])
    """
    check_permutation(spec, perm)
    missing = sorted(k for k in spec.keys if k not in state_dict)
    if missing:
        raise SpecError(f"state dict lacks tensors the spec permutes: {missing[:10]}")
    return {
        k: permute_tensor(v, spec.axes_of(k), perm) if spec.axes_of(k) else v
        for k, v in state_dict.items()
    }
