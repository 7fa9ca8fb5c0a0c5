"""Transforms beyond permutations: per group, an index vector, a scaled permutation or dense maps.

A :data:`Transform` maps group names to one of

* an int64 index vector (a permutation, exactly as in :mod:`permerge.permutation`);
* a :class:`ScaledPermutation`: B's unit ``j`` is multiplied by ``scale[j] > 0``, then the units are
  reordered by ``perm`` (positively homogeneous units, e.g. ReLU, admit this);
* a :class:`LinearMap`: B's unit vector ``h`` becomes ``matrix[c] @ h`` (orthogonal maps of a
  residual stream, invertible per-head query·key and value·output maps).

Convention (Git Re-Basin's, extended): a transform acts on B; what acts on a unit *before* any
reordering is indexed by B's own units. On a tensor, every dense map and scale is applied first
(in B's unit order), then every index gather; groups acting on the same dimension touch disjoint
or factorised positions, so this is one well-defined map. A *producer* axis (rows that carry the
units) gets ``M``, a *consumer* axis (columns that read them) gets ``M⁻ᵀ`` (``1/s`` for scales),
so the function is unchanged.

A group whose members repeat (within-head dimensions: ``repeat`` = number of heads) gets
:func:`map_blocks` maps: one per block of repeats (``k`` = gcd of the members' repeats; repeat
``r`` of a member with ``R`` repeats uses map ``r // (R // k)``), i.e. one map per head, shared
by a key/value head's query heads under grouped-query attention.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from functools import cached_property

import torch

from permerge.errors import SpecError
from permerge.permutation import check_permutation
from permerge.spec import (
    INVERTIBLE,
    ORTHOGONAL,
    PERMUTATION,
    SCALED_PERMUTATION,
    SYMMETRIES,
    Group,
    PermutationSpec,
    within,
)

__all__ = [
    "LinearMap", "ScaledPermutation", "Transform", "check_transform", "index_vectors", "map_blocks",
    "random_transform", "resolve_symmetries",
]  # fmt: skip

ORTHOGONALITY_TOL = 1e-6
"""Largest ``|MᵀM − I|`` entry accepted for a dense map of an orthogonal group."""


@dataclass(frozen=True)
class ScaledPermutation:
    """B's unit ``j`` times ``scale[j]`` (positive), then reordered by ``perm`` (``perm[i]`` lands at ``i``)."""

    perm: torch.Tensor
    scale: torch.Tensor


@dataclass(frozen=True)
class LinearMap:
    """Dense maps of a group's units, ``matrix`` of shape ``(k, n, n)`` (float64): block ``c`` of B's
    repeats (a head) maps its unit vector ``h`` to ``matrix[c] @ h``."""

    matrix: torch.Tensor

    @cached_property
    def inverse_transpose(self) -> torch.Tensor:
        """``M⁻ᵀ`` per block: what consumer axes get."""
        return torch.linalg.inv(self.matrix).transpose(-1, -2)


Transform = dict[str, "torch.Tensor | ScaledPermutation | LinearMap"]


def map_blocks(group: Group) -> int:
    """How many independent maps a dense transform of ``group`` has: gcd of its members' repeats."""
    return math.gcd(*(ax.repeat for ax in group.members))


_PREFERENCE = (INVERTIBLE, ORTHOGONAL, SCALED_PERMUTATION, PERMUTATION)


def resolve_symmetries(spec: PermutationSpec, symmetries: str | Iterable[str] = "all") -> dict[str, str]:
    """The class each group is aligned in: the richest class both requested and allowed by the group.

    ``symmetries`` is ``"permutation"``, ``"all"``, one class name or a set of them (permutations are
    always included). Where a group allows both, orthogonal maps are preferred to scaled permutations.

    Example:
        >>> from permerge.spec import Axis, Group, PermutationSpec
        >>> spec = PermutationSpec((Group("s", 2, (Axis("w", 0),), "orthogonal"),))
        >>> resolve_symmetries(spec, "all"), resolve_symmetries(spec, "permutation")
        ({'s': 'orthogonal'}, {'s': 'permutation'})
    """
    wanted = set(SYMMETRIES) if symmetries == "all" else {symmetries} if isinstance(symmetries, str) else set(symmetries)
    unknown = sorted(wanted - set(SYMMETRIES))
    if unknown:
        raise SpecError(f"unknown symmetry class(es) {unknown}; choose from 'all' or {', '.join(SYMMETRIES)}")
    wanted.add(PERMUTATION)
    return {g.name: next(c for c in _PREFERENCE if c in wanted and c in within(g.symmetry)) for g in spec.groups}


def index_vectors(transform: Mapping[str, object]) -> dict[str, torch.Tensor]:
    """The reordering part of ``transform``: index vectors of permutations and scaled permutations."""
    out = {}
    for name, t in transform.items():
        if isinstance(t, torch.Tensor):
            out[name] = t
        elif isinstance(t, ScaledPermutation):
            out[name] = t.perm
    return out


def check_transform(spec: PermutationSpec, transform: Mapping[str, object]) -> None:
    """Raise :class:`SpecError` unless every entry fits its group: shapes, and a kind of map the
    group's symmetry class contains (an orthogonal group takes orthogonal matrices only)."""
    check_permutation(spec, index_vectors(transform))
    for name, t in transform.items():
        g = spec[name]
        if isinstance(t, torch.Tensor):
            continue
        if isinstance(t, ScaledPermutation):
            if g.symmetry not in (SCALED_PERMUTATION, INVERTIBLE):
                raise SpecError(f"group {name!r} allows {g.symmetry} maps, not scaled permutations")
            s = t.scale
            if s.shape != (g.size,) or not torch.isfinite(s).all() or not (s > 0).all():
                raise SpecError(f"scaled permutation of group {name!r} needs {g.size} finite positive scales")
        elif isinstance(t, LinearMap):
            if g.symmetry not in (ORTHOGONAL, INVERTIBLE):
                raise SpecError(f"group {name!r} allows {g.symmetry} maps, not dense ones")
            m, k = t.matrix, map_blocks(g)
            if m.dim() != 3 or m.shape[1:] != (g.size, g.size) or k % m.shape[0] or not torch.isfinite(m).all():
                raise SpecError(
                    f"dense map of group {name!r} has shape {tuple(m.shape)}; expected (k, {g.size}, {g.size}) "
                    f"finite, with k dividing {k} (one map per block of repeats)"
                )
            if any(ax.role is None for ax in g.members):
                raise SpecError(f"group {name!r} has axes without a producer/consumer role; dense maps need a traced spec")
            if g.symmetry == ORTHOGONAL:
                eye = torch.eye(g.size, dtype=m.dtype)
                err = (m.transpose(-1, -2) @ m - eye).abs().max().item()
                if err > ORTHOGONALITY_TOL:
                    raise SpecError(f"group {name!r} is orthogonal but its map is not (|MᵀM − I| = {err:.1e})")
        else:
            raise SpecError(f"transform of group {name!r} is a {type(t).__name__}; expected an index vector, "
                            "ScaledPermutation or LinearMap")  # fmt: skip


def keeping_ones(q: torch.Tensor) -> torch.Tensor:
    """``q`` (``(k, n-1, n-1)``) as maps of ``n`` units that fix the all-ones vector: ``U·(1 ⊕ q)·Uᵀ``
    with ``U`` an orthonormal basis whose first column is ``1/√n``. LayerNorm subtracts the mean of
    its input, so a map of its input commutes with it only if it keeps the all-ones direction."""
    k, m = q.shape[0], q.shape[1] + 1
    u = ones_basis(m, q.dtype)
    inner = torch.zeros(k, m, m, dtype=q.dtype)
    inner[:, 0, 0] = 1.0
    inner[:, 1:, 1:] = q
    return u @ inner @ u.T


def ones_basis(n: int, dtype: torch.dtype = torch.float64) -> torch.Tensor:
    """An orthonormal ``(n, n)`` basis whose first column is ``1/√n`` (a Householder reflection of e₁)."""
    v = torch.full((n,), 1.0 / math.sqrt(n), dtype=dtype)
    v[0] -= 1.0
    norm = v.norm()
    if norm < 1e-12:  # n == 1
        return torch.ones(1, 1, dtype=dtype)
    v = v / norm
    return torch.eye(n, dtype=dtype) - 2.0 * torch.outer(v, v)


def random_transform(
    spec: PermutationSpec, seed: int = 0, symmetries: str | Iterable[str] = "all", *, keep_ones: Iterable[str] = ()
) -> Transform:
    """A random transform of every group in its class (see :func:`resolve_symmetries`), reproducible.

    Orthogonal maps are Haar-distributed (those of ``keep_ones`` groups fix the all-ones vector);
    invertible ones are ``U·diag(s)·V`` with Haar ``U``, ``V`` and ``s`` in [½, 2] (condition ≤ 4);
    scales are log-uniform in [½, 2].
    """
    gen = torch.Generator().manual_seed(seed)
    classes, keep = resolve_symmetries(spec, symmetries), set(keep_ones)
    out: Transform = {}
    for g in spec.groups:
        cls, n = classes[g.name], g.size
        if cls == PERMUTATION:
            out[g.name] = torch.randperm(n, generator=gen)
        elif cls == SCALED_PERMUTATION:
            out[g.name] = ScaledPermutation(torch.randperm(n, generator=gen), _log_uniform(n, gen))
        else:
            k = map_blocks(g)
            fixed = g.name in keep and n > 1
            q = _haar(k, n - fixed, gen)
            if cls == INVERTIBLE:
                q = q * _log_uniform(n - fixed, gen).unsqueeze(-2).expand(k, -1, -1) @ _haar(k, n - fixed, gen)
            out[g.name] = LinearMap(keeping_ones(q) if fixed else q)
    return out


def _haar(k: int, n: int, gen: torch.Generator) -> torch.Tensor:
    z = torch.randn(k, n, n, generator=gen, dtype=torch.float64)
    q, r = torch.linalg.qr(z)
    return q * torch.sign(torch.diagonal(r, dim1=-2, dim2=-1)).unsqueeze(-2)


def _log_uniform(n: int, gen: torch.Generator) -> torch.Tensor:
    return torch.exp((torch.rand(n, generator=gen, dtype=torch.float64) * 2 - 1) * math.log(2.0))
