"""Permutations as index vectors: ``Permutation = dict[group name, LongTensor]``.

Convention (Git Re-Basin's): ``perm[g][i]`` is the unit of the *input* model that lands at position
``i``, so applying it is ``w.index_select(dim, perm[g])``. Never dense matrices.
"""

from __future__ import annotations

from collections.abc import Mapping

import torch

from permerge.errors import SpecError
from permerge.spec import PermutationSpec

__all__ = ["Permutation", "compose", "identity", "inverse", "is_identity", "random_permutation"]

Permutation = dict[str, torch.Tensor]


def identity(spec: PermutationSpec) -> Permutation:
    """The permutation that changes nothing."""
    return {g.name: torch.arange(g.size) for g in spec.groups}


def random_permutation(spec: PermutationSpec, seed: int = 0) -> Permutation:
    """A uniformly random permutation of every group, reproducible from ``seed``.

    Example:
        >>> from permerge.spec import Axis, Group, PermutationSpec
        >>> spec = PermutationSpec((Group("h", 3, (Axis("w", 0),)),))
        >>> sorted(random_permutation(spec, seed=1)["h"].tolist())
        [0, 1, 2]
    """
    gen = torch.Generator().manual_seed(seed)
    return {g.name: torch.randperm(g.size, generator=gen) for g in spec.groups}


def inverse(perm: Mapping[str, torch.Tensor]) -> Permutation:
    """``inverse(p)[g][p[g][i]] == i``."""
    return {k: torch.argsort(v) for k, v in perm.items()}


def compose(outer: Mapping[str, torch.Tensor], inner: Mapping[str, torch.Tensor]) -> Permutation:
    """Applying ``compose(outer, inner)`` equals applying ``inner`` first, then ``outer``."""
    return {k: inner[k][outer[k]] for k in outer}


def is_identity(perm: Mapping[str, torch.Tensor]) -> bool:
    return all(torch.equal(v, torch.arange(len(v))) for v in perm.values())


def check_permutation(spec: PermutationSpec, perm: Mapping[str, torch.Tensor]) -> None:
    """Raise :class:`SpecError` unless ``perm`` holds a valid index vector for each named group."""
    for name, p in perm.items():
        g = spec[name]
        if p.dim() != 1 or len(p) != g.size:
            raise SpecError(f"permutation of group {name!r} has shape {tuple(p.shape)}, expected ({g.size},)")
        if p.dtype not in (torch.int64, torch.int32) or not torch.equal(
            torch.sort(p).values, torch.arange(g.size, dtype=p.dtype)
        ):
            raise SpecError(f"permutation of group {name!r} is not a permutation of 0..{g.size - 1}")
