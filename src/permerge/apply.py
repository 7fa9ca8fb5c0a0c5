"""Apply a permutation or a transform to a state dict: pure, same keys, shapes and dtypes out as in.

Permutations are index gathers. A transform (:mod:`permerge.transform`) may also carry dense maps
and positive scales: on each tensor those act first, in B's unit order and in float64, then every
gather, so a permutation-only transform gives exactly :func:`apply_permutation`'s result.
"""

from __future__ import annotations

from collections.abc import Mapping

import torch

from permerge.errors import SpecError
from permerge.permutation import check_permutation
from permerge.spec import Axis, PermutationSpec
from permerge.transform import LinearMap, ScaledPermutation, check_transform, index_vectors

__all__ = ["apply_permutation", "apply_transform", "axis_index", "map_axis", "permute_tensor"]


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


def map_axis(t: torch.Tensor, ax: Axis, n: int, maps: torch.Tensor) -> torch.Tensor:
    """``t`` with the ``n`` units at ``ax`` mapped by ``maps``: ``(k, n, n)`` matrices, block ``c`` of
    the axis' repeats by ``maps[c]``, or ``(n,)`` scales. Computed in float64, returned as a new
    tensor of ``t``'s dtype."""
    dim = ax.dim % t.dim()
    pos = ax.positions(n).flatten().to(t.device)
    x = t.index_select(dim, pos).movedim(dim, 0)
    rest = x.shape[1:]
    x = x.double()
    if maps.dim() == 1:
        y = x.reshape(ax.repeat, n, -1) * maps.to(x.device).view(1, n, 1)
    else:
        k = maps.shape[0]
        y = torch.einsum("cij,crjm->crim", maps.to(x.device), x.reshape(k, ax.repeat // k, n, -1))
    out = t.clone()
    out.index_copy_(dim, pos, y.reshape(-1, *rest).movedim(0, dim).to(t.dtype))
    return out


def apply_transform(
    spec: PermutationSpec, transform: Mapping[str, object], state_dict: Mapping[str, torch.Tensor]
) -> dict[str, torch.Tensor]:
    """Return a new state dict with every group transformed (see :mod:`permerge.transform`).

    Producer axes get each dense map ``M`` (scale ``s``), consumer axes ``M⁻ᵀ`` (``1/s``), so the
    function is unchanged whenever every group's map is in its symmetry class (checked here first)
    and its norms' gains are folded where the class needs it (:mod:`permerge.reparam`). Tensors no
    group touches are passed through; the input is never modified.

    Example:
        >>> import torch
        >>> from permerge.spec import Axis, Group, PermutationSpec
        >>> from permerge.transform import LinearMap
        >>> spec = PermutationSpec((Group("h", 2, (Axis("w", 0, role="producer"),), "orthogonal"),))
        >>> swap = LinearMap(torch.tensor([[[0., 1.], [1., 0.]]], dtype=torch.float64))
        >>> apply_transform(spec, {"h": swap}, {"w": torch.tensor([1., 2.])})["w"]
        tensor([2., 1.])
    """
    check_transform(spec, transform)
    missing = sorted(k for k in spec.keys if k not in state_dict)
    if missing:
        raise SpecError(f"state dict lacks tensors the spec permutes: {missing[:10]}")
    gathers = index_vectors(transform)
    out = {}
    for key, t in state_dict.items():
        axes = spec.axes_of(key)
        for name, ax in axes:
            m = transform.get(name)
            if isinstance(m, LinearMap):
                t = map_axis(t, ax, spec[name].size, m.inverse_transpose if ax.contravariant else m.matrix)
            elif isinstance(m, ScaledPermutation):
                t = map_axis(t, ax, spec[name].size, 1.0 / m.scale if ax.contravariant else m.scale)
        out[key] = permute_tensor(t, axes, gathers) if axes else t
    return out
