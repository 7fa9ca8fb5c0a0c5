"""Channel spaces: union-find over feature axes, with spaces refinable into sums and products.

Every feature axis of every value in the traced graph (and every dimension of every parameter)
gets a space id. Ops that require two axes to be permuted identically *union* their spaces. A
concatenation makes a space the ordered **sum** of its parts; a reshape into heads makes it the
**product** ``heads ⊗ head_dim`` (row-major, outer first). A factor of 1 splits nothing and is
dropped. Two splits of one space are reconciled by their common refinement: sum vs sum and
product vs product by merging cut points, sum vs product when every summand is a whole number of
the product's inner blocks (q, k, v concatenated, then viewed as ``3 ⊗ heads ⊗ head_dim``: the
outer factor indexes the summands and cannot move, the inner factors are shared by all of them).
Splits with no common refinement freeze the space. A frozen space is never permuted; freezing a
refined space freezes all its parts. Representatives are the smallest id, and ids are handed out
in graph order, so the same model always yields the same groups.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any, NamedTuple

import torch

from permerge.spec import FrozenKind, meet

SUM, PROD = "sum", "prod"


class Cap(NamedTuple):
    """One op's bound on the symmetry class of a space it touches (see :mod:`permerge.graph.classes`).

    ``cls`` is the largest class of maps of the units the op is equivariant under; ``if_folded``, when
    set, replaces it if the norm gain applied at ``where`` folds into the layers reading it.
    ``where`` is ``(capture index, node name)``.
    """

    cls: str
    if_folded: str | None
    where: tuple[int, str]


Bound = tuple[str, "str | None"]
"""What an op allows on a space: ``(class, class once its norm gain is folded, or None)``."""


def meet_bounds(a: Bound, b: Bound) -> Bound:
    """Both bounds at once: the meet of the classes, and of the folded classes where either has one."""
    folded = None if a[1] is None and b[1] is None else meet(a[1] or a[0], b[1] or b[0])
    return meet(a[0], b[0]), folded


class Why(NamedTuple):
    """Why a space is frozen: the kind (data, see :class:`~permerge.spec.FrozenKind`) and a text."""

    kind: FrozenKind
    text: str


@dataclass
class Spaces:
    """Mutable union-find, owned by one propagation run (never shared between calls)."""

    parent: list[int] = field(default_factory=list)
    size: list[int] = field(default_factory=list)
    frozen: dict[int, Why] = field(default_factory=dict)
    struct: dict[int, tuple[str, tuple[int, ...]]] = field(default_factory=dict)
    units: set[int] = field(default_factory=set)  # roots holding some layer's units (see mark_units)
    caps: dict[int, list[Cap]] = field(default_factory=dict)  # root → the ops' bounds on its class

    def new(self, size: int, frozen: Why | None = None) -> int:
        s = len(self.parent)
        self.parent.append(s)
        self.size.append(int(size))
        if frozen is not None:
            self.frozen[s] = frozen
        return s

    def like(self, val: Any, reason: Why | None | Sequence[Why | None]) -> Any:
        """New spaces shaped like a traced value (a tensor → one per axis; lists/tuples → a list).

        ``reason`` freezes them (``None``: free); a list gives one reason per axis of a tensor.
        """
        if isinstance(val, torch.Tensor):
            reasons = reason if isinstance(reason, list) else [reason] * val.dim()
            return tuple(self.new(int(n), r) for n, r in zip(val.shape, reasons))
        if isinstance(val, (tuple, list)):
            return [self.like(v, reason) for v in val]
        return None

    def compose(self, kind: str, children: tuple[int, ...]) -> int:
        """A space that *is* the sum/product of existing ``children`` (new unless only one is not trivial)."""
        children = tuple(c for c in children if self.size[self.find(c)] != (1 if kind == PROD else 0))
        if len(children) == 1:
            return self.find(children[0])
        sizes = [self.size[self.find(c)] for c in children]
        total = sum(sizes) if kind == SUM else _prod(sizes)
        s = self.new(total)
        self.struct[s] = (kind, tuple(children))
        return s

    def find(self, s: int) -> int:
        root = s
        while self.parent[root] != root:
            root = self.parent[root]
        while self.parent[s] != root:  # path compression
            self.parent[s], s = root, self.parent[s]
        return root

    def structure(self, s: int) -> tuple[str, tuple[int, ...]] | None:
        return self.struct.get(self.find(s))

    def freeze(self, s: int, reason: Why) -> None:
        """Freeze ``s`` (all parts of it, if refined); the first reason given is kept."""
        r = self.find(s)
        st = self.struct.get(r)
        if st is None:
            self.frozen.setdefault(r, reason)
        else:
            for c in st[1]:
                self.freeze(c, reason)

    def cap(self, s: int, cap: Cap) -> None:
        """Bound the symmetry class of ``s`` (of all its parts, if refined); frozen spaces need none."""
        r = self.find(s)
        st = self.struct.get(r)
        if st is not None:
            for c in st[1]:
                self.cap(c, cap)
        elif r not in self.frozen:
            self.caps.setdefault(r, []).append(cap)

    def leaves(self, s: int) -> list[int]:
        """The atomic spaces ``s`` is made of (itself, if it is not split), outer first."""
        r = self.find(s)
        st = self.struct.get(r)
        return [r] if st is None else [leaf for c in st[1] for leaf in self.leaves(c)]

    def mark_units(self, *spaces: int) -> None:
        """Record that ``spaces`` hold a layer's units (a linear's or conv's features, a norm's
        channels): when frozen, they are hidden symmetries lost. Frozen spaces that never meet
        a unit (a position-embedding grid, a relative-position table's rows) are positions."""
        self.units.update(self.find(s) for s in spaces)

    def reason(self, s: int) -> Why | None:
        """Why ``s`` is frozen (its first frozen part's reason, if refined), or None."""
        r = self.find(s)
        st = self.struct.get(r)
        if st is None:
            return self.frozen.get(r)
        return next((w for w in (self.reason(c) for c in st[1]) if w is not None), None)

    def is_frozen(self, s: int) -> bool:
        """True when no part of ``s`` may move."""
        r = self.find(s)
        st = self.struct.get(r)
        return r in self.frozen if st is None else all(self.is_frozen(c) for c in st[1])

    def refine(self, s: int, kind: str, sizes: tuple[int, ...]) -> tuple[int, ...]:
        """Split ``s`` into parts of the given sizes; returns the parts (existing ones if equal)."""
        r = self.find(s)
        sizes = tuple(int(x) for x in sizes)
        if len(sizes) == 1:
            return (r,)
        if kind == PROD and 1 in sizes:  # a factor of 1 splits nothing
            inner = iter(self.refine(r, PROD, tuple(z for z in sizes if z != 1)) if self.size[r] != 1 else ())
            return tuple(self.new(1) if z == 1 else next(inner) for z in sizes)
        st = self.struct.get(r)
        if st is not None:
            have = self._sizes(st[1])
            if st[0] == kind and have == sizes:
                return st[1]
            if st[0] == kind:
                common = _common_refinement(kind, have, sizes)
                if common is not None:
                    return self._regroup(kind, st[1], common, sizes)
            elif kind == PROD:  # summands of r viewed as a product
                met = self._meet(st[1], tuple(self.new(z) for z in sizes))
                if met is not None:
                    return met
            else:  # a product r viewed as summands
                summands = tuple(self.new(z) for z in sizes)
                if self._meet(summands, st[1]) is not None:
                    return summands
            # Splits that share no common refinement: keep it correct by freezing both.
            reason = Why(FrozenKind.CONFLICT, f"conflicting layouts ({st[0]} {have} vs {kind} {sizes})")
            self.freeze(r, reason)
            return tuple(self.new(z, reason) for z in sizes)
        children = tuple(self.new(z) for z in sizes)
        self.struct[r] = (kind, children)
        for cap in self.caps.pop(r, ()):
            for c in children:
                self.cap(c, cap)
        reason = self.frozen.pop(r, None)
        if reason is not None:
            for c in children:
                self.freeze(c, reason)
        return children

    def _meet(self, summands: tuple[int, ...], factors: tuple[int, ...]) -> tuple[int, ...] | None:
        """Tie summands ``m_t`` of a space to its factors ``f_1 ⊗ … ⊗ f_j``, or None if impossible.

        With ``s = f_{i+1}·…·f_j`` dividing every ``m_t`` (the smallest such ``i``), each summand
        is ``(m_t / s) ⊗ s``: the outer factors ``f_1 ⊗ … ⊗ f_i`` become the sum of the summands'
        block counts (so no block moves across summands) and the inner factors are shared by all
        summands. Returns ``factors``.
        """
        m = self._sizes(summands)
        f = self._sizes(factors)
        for i in range(1, len(f)):
            s = _prod(list(f[i:]))
            if all(x % s == 0 for x in m):
                break
        else:
            return None
        outer = self.compose(PROD, factors[:i])
        inner = self.compose(PROD, factors[i:])
        for t, block in zip(summands, self.refine(outer, SUM, tuple(x // s for x in m))):
            a, b = self.refine(t, PROD, (self.size[self.find(t)] // s, s))
            self.union(a, block)
            self.union(b, inner)
        return factors

    def union(self, a: int, b: int) -> int:
        """Tie two equal-size spaces: any permutation of one must be applied to the other."""
        ra, rb = self.find(a), self.find(b)
        if ra == rb:
            return ra
        if self.size[ra] != self.size[rb]:
            raise ValueError(f"cannot tie spaces of sizes {self.size[ra]} and {self.size[rb]}")
        root, other = min(ra, rb), max(ra, rb)
        self.parent[other] = root
        if other in self.units:
            self.units.discard(other)
            self.units.add(root)
        moved = self.caps.pop(other, [])
        sr, so = self.struct.pop(root, None), self.struct.pop(other, None)
        fr, fo = self.frozen.pop(root, None), self.frozen.pop(other, None)
        if sr is not None:
            self.struct[root] = sr
            if so is not None:  # the other's split must hold too: reconcile, then tie part by part
                for x, y in zip(self.refine(root, so[0], self._sizes(so[1])), so[1]):
                    self.union(x, y)
        elif so is not None:
            self.struct[root] = so
        for cap in moved:
            self.cap(root, cap)
        if self.struct.get(root) is not None and root in self.caps:  # root's own bounds hold for its parts
            for cap in self.caps.pop(root):
                self.cap(root, cap)
        reason = fr if fr is not None else fo
        if reason is not None:
            self.freeze(root, reason)
        return root

    def _sizes(self, children: tuple[int, ...]) -> tuple[int, ...]:
        return tuple(self.size[self.find(c)] for c in children)

    def _regroup(
        self, kind: str, children: tuple[int, ...], pieces: list[int], sizes: tuple[int, ...]
    ) -> tuple[int, ...]:
        """Split each existing part into ``pieces``, then compose the requested parts from them.

        E.g. ``(batch 2) ⊗ (d 32)`` viewed as ``(batch·heads 8) ⊗ (head_dim 8)`` becomes
        ``2 ⊗ 4 ⊗ 8``: ``d = heads ⊗ head_dim`` and ``batch·heads = batch ⊗ heads``.
        """
        leaves: list[int] = []
        k = 0
        for c in children:
            n, own = self.size[self.find(c)], []
            while _combine(kind, own) != n:
                own.append(pieces[k])
                k += 1
            leaves.extend(self.refine(c, kind, tuple(own)) if len(own) > 1 else (c,))
        out, k = [], 0
        for n in sizes:
            take = []
            while _combine(kind, [self.size[self.find(x)] for x in take]) != n:
                take.append(leaves[k])
                k += 1
            out.append(take[0] if len(take) == 1 else self.compose(kind, tuple(take)))
        return tuple(out)


def tensor_dims(v: Any) -> list[tuple[int, ...]]:
    """The per-axis spaces of every tensor in a traced value's spaces (tuple, or nested lists)."""
    if isinstance(v, tuple):
        return [v]
    if isinstance(v, list):
        return [d for x in v for d in tensor_dims(x)]
    return []


def _combine(kind: str, xs: list[int]) -> int:
    return sum(xs) if kind == SUM else _prod(xs) if xs else 0


def _common_refinement(kind: str, a: tuple[int, ...], b: tuple[int, ...]) -> list[int] | None:
    """Piece sizes that refine both splits (cut points in sum- or product-space), or None."""
    cuts = sorted(set(_cumulative(kind, a)) | set(_cumulative(kind, b)))
    if kind == PROD and any(y % x for x, y in zip(cuts, cuts[1:])):
        return None
    base = 0 if kind == SUM else 1
    return [(y - x) if kind == SUM else y // x for x, y in zip([base, *cuts], cuts)]


def _cumulative(kind: str, xs: tuple[int, ...]) -> list[int]:
    out, acc = [], 0 if kind == SUM else 1
    for x in xs:
        acc = acc + x if kind == SUM else acc * x
        out.append(acc)
    return out


def _prod(xs: list[int]) -> int:
    out = 1
    for x in xs:
        out *= x
    return out
