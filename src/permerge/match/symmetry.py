"""Matching beyond permutations: one solver per symmetry class, from weights and from activations.

For a group ``g`` with every other group's map held fixed, the best map of ``g`` has a closed form
in a few ``n × n`` moments of A's and B's unit rows ``X``, ``Y`` (rows of weights, or activations
over samples; producer rows transform by ``M``, consumer rows and a query·key group's key side by
``M⁻ᵀ``):

* **permutation**: a linear assignment on ``Σ X·Yᵀ`` (Git Re-Basin; :mod:`permerge.match.weight`);
* **orthogonal**: Procrustes, ``M = U·Vᵀ`` from the SVD of ``C = Σ X·Yᵀ`` (maximises ``⟨M, C⟩``,
  i.e. minimises ``‖X − M·Y‖``); a LayerNorm's stream keeps the all-ones direction, so there the
  SVD is of ``C`` restricted to its complement;
* **invertible**: least squares ``min Σ_prod ‖X − M·Y‖² + Σ_cons ‖Mᵀ·X − Y‖² + λ‖M − I‖²`` (the
  consumer residual ``X − M⁻ᵀY`` multiplied by ``Mᵀ`` makes it linear in ``M``), a Sylvester
  equation ``M·P + R·M = S`` solved exactly through two eigendecompositions; the step is kept only
  if it lowers the true distance (else the Procrustes step is tried), and a map whose condition
  number exceeds ``max_condition`` is refused with :class:`~permerge.errors.IllConditionedError`;
* **scaled permutation**: each unit balanced (producer and consumer norms made equal, the
  minimum-norm point of its scale orbit) in both models, a linear assignment on the balanced rows,
  and the scale that carries B's balance onto A's.

Weight matching runs these in the one coordinate descent of :mod:`permerge.match.weight`, starting
from permutation weight matching (so the generalised distance is never worse than the permutation
one); activation matching solves each group once from cross-moments of A's and B's activations at
the group's traced sites, after the permutation groups (heads) are matched.
"""

from __future__ import annotations

import itertools
import logging
import time
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from types import MappingProxyType
from typing import Any

import torch
from torch import nn

from permerge.apply import apply_transform, axis_index, map_axis, permute_tensor
from permerge.errors import IllConditionedError, SpecError
from permerge.graph import Traced, trace_graph
from permerge.graph.layers import CONV, LINEAR
from permerge.match import lap
from permerge.match.activation import activation_matching, batch_inputs, record
from permerge.match.weight import (
    _Costs,
    check_matchable,
    coordinate_descent,
    resolve_workers,
    weight_matching,
)
from permerge.permutation import Permutation
from permerge.spec import (
    CONSUMER,
    INVERTIBLE,
    ORTHOGONAL,
    PERMUTATION,
    SCALED_PERMUTATION,
    Axis,
    PermutationSpec,
)
from permerge.transform import (
    LinearMap,
    ScaledPermutation,
    Transform,
    index_vectors,
    map_blocks,
    ones_basis,
    resolve_symmetries,
)

LOG = logging.getLogger(__name__)

__all__ = ["TransformMatchingResult", "transform_activation_matching", "transform_weight_matching"]

DENSE = (ORTHOGONAL, INVERTIBLE)


@dataclass(frozen=True)
class TransformMatchingResult:
    """What a generalised matcher found.

    Attributes:
        transform: group → index vector, :class:`~permerge.transform.ScaledPermutation` or
            :class:`~permerge.transform.LinearMap`; ``apply_transform(spec, transform, sd_b)`` is B aligned.
        classes: the class each group was matched in.
        distance_before / distance_after: ``Σ ‖A − B‖²`` over the spec's tensors, for B as given and
            aligned (weight matching; NaN for activation matching).
        permutation_distance: the same after the permutation-only start (weight matching).
        sweeps, converged: of the coordinate descent (weight matching).
        seconds: wall time.
        refined: steps and selection losses of a learned refinement (:mod:`permerge.match.refine`), if one ran.
    """

    transform: Transform
    classes: Mapping[str, str]
    distance_before: float
    distance_after: float
    permutation_distance: float
    sweeps: int
    converged: bool
    seconds: float
    refined: Mapping[str, Any] | None = None  # learned refinement's numbers (match/refine.py), if run

    @property
    def permutation(self) -> Permutation:
        """The index vectors of the groups matched as plain permutations."""
        return {g: t for g, t in self.transform.items() if isinstance(t, torch.Tensor)}


# -- solvers over moments -----------------------------------------------------------------------


@dataclass
class Moments:
    """Per block, ``Σ X·Yᵀ``, ``Σ X·Xᵀ``, ``Σ Y·Yᵀ`` of the covariant (producer) rows and of the
    contravariant (consumer) rows, float64, each ``(k, n, n)``."""

    xy: torch.Tensor
    xx: torch.Tensor
    yy: torch.Tensor
    cxy: torch.Tensor
    cxx: torch.Tensor
    cyy: torch.Tensor

    @classmethod
    def zeros(cls, k: int, n: int) -> Moments:
        return cls(*(torch.zeros(k, n, n, dtype=torch.float64) for _ in range(6)))

    def add(self, x: torch.Tensor, y: torch.Tensor, contravariant: bool, weight: float = 1.0) -> None:
        """Add rows ``x``, ``y`` of shape ``(k, n, m)`` (A's and B's), scaled by ``weight``."""
        x, y = x.double(), y.double()  # float64: the stopping rule compares objectives to ~1e-10
        xy, xx, yy = (torch.bmm(u, v.transpose(1, 2)).cpu() * weight for u, v in ((x, y), (x, x), (y, y)))
        if contravariant:
            self.cxy += xy
            self.cxx += xx
            self.cyy += yy
        else:
            self.xy += xy
            self.xx += xx
            self.yy += yy

    def distance(self, m: torch.Tensor | None = None) -> float:
        """``Σ ‖X − M·Y‖² + ‖X − M⁻ᵀ·Y‖²`` (``M`` = identity if None)."""
        if m is None:
            m = torch.eye(self.xy.shape[-1], dtype=torch.float64).expand_as(self.xy)
        mi = torch.linalg.inv(m).transpose(1, 2)
        total = 0.0
        for q, xx, xy, yy in ((m, self.xx, self.xy, self.yy), (mi, self.cxx, self.cxy, self.cyy)):
            total += (_tr(xx) - 2 * (q * xy).sum() + (q @ yy * q).sum()).item()
        return total


def _tr(t: torch.Tensor) -> torch.Tensor:
    return torch.diagonal(t, dim1=-2, dim2=-1).sum()


def procrustes(c: torch.Tensor, keep_ones: bool = False) -> torch.Tensor:
    """The orthogonal ``M`` (per block) maximising ``⟨M, c⟩``; with ``keep_ones``, among those with
    ``M·1 = 1``."""
    if keep_ones:
        u = ones_basis(c.shape[-1])
        inner = u.T @ c @ u
        out = torch.zeros_like(c)
        out[:, 0, 0] = 1.0
        out[:, 1:, 1:] = procrustes(inner[:, 1:, 1:])
        return u @ out @ u.T
    u, _, vh = torch.linalg.svd(c)
    return u @ vh


def least_squares_map(mom: Moments, regularization: float) -> torch.Tensor:
    """The invertible ``M`` (per block) minimising the linearised least squares of the module docstring,
    plus ``λ‖M − Q‖²`` towards the Procrustes solution ``Q`` (``λ`` = ``regularization`` × the mean
    eigenvalue): directions the data leave undetermined get the orthogonal answer, not a blow-up."""
    p, r, s = mom.yy, mom.cxx, mom.xy + mom.cxy
    n = p.shape[-1]
    scale = (_tr(p) + _tr(r)).item() / max(1, n * p.shape[0])
    lam = regularization * max(scale, 1e-30)
    a, u = torch.linalg.eigh(p)
    b, v = torch.linalg.eigh(r)
    rhs = v.transpose(1, 2) @ (s + lam * procrustes(s)) @ u
    return v @ (rhs / (b.unsqueeze(-1) + a.unsqueeze(-2) + lam)) @ u.transpose(1, 2)


def condition(m: torch.Tensor) -> float:
    """The largest condition number (σ_max / σ_min) over the blocks of ``m``."""
    s = torch.linalg.svdvals(m)
    return (s[..., 0] / s[..., -1].clamp_min(1e-300)).max().item()


@dataclass(frozen=True)
class SolverOptions:
    regularization: float = 1e-6
    max_condition: float = 1e4
    tol: float = 1e-13


def solve_dense(name: str, cls: str, mom: Moments, keep_ones: bool, opts: SolverOptions,
                current: Callable[[torch.Tensor], torch.Tensor]) -> tuple[float, float, torch.Tensor]:  # fmt: skip
    """``(old, new, step)`` for a dense group: ``old``/``new`` its objective (higher is better) at the
    identity step and at ``step``; ``current(step)`` is the group's whole map after the step (to
    check its conditioning). ``new == old`` when the step gains less than ``opts.tol`` relative to
    the rows' squared norm (float noise)."""
    eye = torch.eye(mom.xy.shape[-1], dtype=torch.float64).expand_as(mom.xy)
    if cls == ORTHOGONAL:
        c = mom.xy + mom.cxy
        step = procrustes(c, keep_ones)
        old, new = _tr(c).item(), (step * c).sum().item()
    else:
        if keep_ones:
            raise SpecError(f"group {name!r} is invertible but a LayerNorm normalises it; only orthogonal maps that keep "
                            "the all-ones direction fit there")  # fmt: skip
        old = -mom.distance()
        candidates = [least_squares_map(mom, opts.regularization), procrustes(mom.xy + mom.cxy)]
        scored = [(-mom.distance(m), i, m) for i, m in enumerate(candidates) if torch.isfinite(m).all()]
        new, _, step = max(scored, key=lambda t: (t[0], -t[1]))
        cond = condition(current(step))
        if cond > opts.max_condition:
            raise IllConditionedError(
                f"group {name!r}: the least-squares map has condition number {cond:.3g} > max_condition "
                f"{opts.max_condition:.3g}; raise regularization (now {opts.regularization:g}) or align the group with "
                "orthogonal maps (symmetries={'orthogonal'})"
            )
    if not new > old + opts.tol * (_tr(mom.xx + mom.cxx) + _tr(mom.yy + mom.cyy)).item():
        return old, old, eye
    return old, new, step


# -- unit rows per block ----------------------------------------------------------------------


def block_rows(t: torch.Tensor, ax: Axis, n: int, k: int) -> torch.Tensor:
    """``(k, n, m)``: block ``c`` of ``ax``'s repeats, row ``i`` holding every entry of unit ``i`` there."""
    dim = ax.dim % t.dim()
    x = t.index_select(dim, ax.positions(n).flatten().to(t.device)).movedim(dim, 0)
    x = x.reshape(k, ax.repeat // k, n, ax.block, -1)
    return x.permute(0, 2, 1, 3, 4).reshape(k, n, -1)


def source_blocks(spec: PermutationSpec, g: str, k: int, gathers: Mapping[str, torch.Tensor],
                  shapes: Mapping[str, torch.Size]) -> list[int]:  # fmt: skip
    """For each block of ``g``'s positions after ``gathers`` (the reordering groups' index vectors),
    the block of B's own units it came from (heads move whole within-head blocks)."""
    n, blocks = spec[g].size, None
    for ax in spec[g].members:
        length = shapes[ax.key][ax.dim]
        idx = torch.arange(length)
        for h, other in spec.axes_of(ax.key):
            if h in gathers and other.dim % len(shapes[ax.key]) == ax.dim % len(shapes[ax.key]):
                idx = idx[axis_index(other, gathers[h], length)]
        pos = ax.positions(n).reshape(k, -1)
        start = {int(p.min()): c for c, p in enumerate(pos)}
        found = []
        for c in range(k):  # a block may arrive reordered within (GQA: query heads within a KV group)
            src = idx[pos[c]]
            c0 = start.get(int(src.min()))
            if c0 is None or not torch.equal(src.sort().values, pos[c0].sort().values):
                raise SpecError(f"group {g!r}: the permutations of {ax.key!r} dim {ax.dim} do not move its per-head "
                                "blocks whole; per-head maps need the heads permuted as whole blocks")  # fmt: skip
            found.append(c0)
        if blocks is not None and found != blocks:
            raise SpecError(f"group {g!r}: its members' heads are permuted inconsistently")
        blocks = found
    return blocks or [0]


def permutation_matrix(p: torch.Tensor, k: int) -> torch.Tensor:
    """``(k, n, n)`` copies of the matrix that does what index vector ``p`` does (``P[i, p[i]] = 1``)."""
    m = torch.zeros(len(p), len(p), dtype=torch.float64)
    m[torch.arange(len(p)), p.long()] = 1.0
    return m.expand(k, -1, -1).clone()


# -- weight matching --------------------------------------------------------------------------


class _TransformCosts(_Costs):
    """The descent's state with dense and scaled groups beside the permutation ones.

    ``b`` holds B transformed by the current transform in every group; permutation groups keep their
    cached cost terms (:class:`~permerge.match.weight._Costs`); a dense or scaled group is solved from
    its members' rows at each visit and moved by applying its step to ``b``.
    """

    def __init__(self, spec: PermutationSpec, a: Mapping[str, torch.Tensor], perm: Permutation,
                 b: dict[str, torch.Tensor], classes: Mapping[str, str], keep_ones: frozenset[str],
                 opts: SolverOptions) -> None:  # fmt: skip
        super().__init__(spec, a, perm, b)
        self.classes, self.keep_ones, self.opts = classes, keep_ones, opts
        self.dense = {g for g, c in classes.items() if c != PERMUTATION and spec[g].size > 1}
        self.shapes = {k: v.shape for k, v in b.items()}
        for g in self.dense:
            self.terms.pop(g, None)
        self.watch = {key: [(t, ax) for t, ax in terms if t.group not in self.dense] for key, terms in self.watch.items()}
        self.maps = {g: permutation_matrix(self.perm[g], map_blocks(spec[g])) for g in self.dense if classes[g] in DENSE}
        self.scaled = {g: ScaledPermutation(self.perm[g], torch.ones(spec[g].size, dtype=torch.float64))
                       for g in self.dense if classes[g] == SCALED_PERMUTATION}  # fmt: skip
        for g in self.maps:
            self.perm[g] = torch.arange(spec[g].size)
        self.partners = {h.name: _partners(spec, h, self.maps) for h in spec.groups if h.name not in self.dense}
        self.partners = {h: p for h, p in self.partners.items() if p}
        for h in self.partners:
            self.terms.pop(h, None)
        self.watch = {key: [(t, ax) for t, ax in terms if t.group not in self.partners] for key, terms in self.watch.items()}

    def matrix(self, g: str) -> torch.Tensor:
        """A heads group whose within-head maps are dense is costed by what those maps leave invariant
        (per head, ``Σ Xᵀ·Y`` over its covariant × contravariant rows: ``W_Vᵀ·W_Oᵀ``, ``W_Qᵀ·W_K``), so
        heads pair by what they compute whatever their current within-head maps."""
        if g not in self.partners:
            return super().matrix(g)
        cost = head_cost(self.spec, g, self.partners[g], self.a, self.b)
        self.dirty[g] = False
        out = torch.empty_like(cost)
        out[:, self.perm[g]] = cost
        return out.float()

    def restore(self, transform: Mapping[str, Any]) -> None:
        """Take ``transform`` as the current one (``b`` must already be B transformed by it)."""
        for g, t in transform.items():
            if isinstance(t, LinearMap) and g in self.maps:
                self.maps[g] = t.matrix.clone()
            elif isinstance(t, ScaledPermutation) and g in self.scaled:
                self.scaled[g], self.perm[g] = t, t.perm
            elif isinstance(t, torch.Tensor) and g not in self.dense:
                self.perm[g] = t

    def gathers(self) -> dict[str, torch.Tensor]:
        return {g: p for g, p in self.perm.items() if g not in self.maps}

    def transform(self) -> Transform:
        out: Transform = {g: p for g, p in self.perm.items() if g not in self.dense}
        out.update({g: LinearMap(m) for g, m in self.maps.items()})
        out.update(self.scaled)
        return out

    def solve(self, g: str) -> tuple[float, float, Any]:
        group, cls = self.spec[g], self.classes[g]
        self.dirty[g] = False
        if cls == SCALED_PERMUTATION:
            return self._solve_scaled(g)
        k = map_blocks(group)
        mom = Moments.zeros(k, group.size)
        for ax in group.members:
            x, y = (block_rows(t[ax.key], ax, group.size, k) for t in (self.a, self.b))
            mom.add(x, y, ax.contravariant)
        blocks = source_blocks(self.spec, g, k, self.gathers(), self.shapes) if k > 1 else [0]
        whole = lambda step: step @ self.maps[g][blocks]  # noqa: E731
        return solve_dense(g, cls, mom, g in self.keep_ones, self.opts, whole)

    def move(self, g: str, step: Any) -> None:
        if g not in self.dense:
            super().move(g, step)
            for key in self.spec[g].keys:  # super() marks only the groups whose cached terms read the key
                self.dirty.update({h: True for h, _ in self.spec.axes_of(key) if h in self.dense or h in self.partners})
            return
        group = self.spec[g]
        if g in self.maps:
            k = map_blocks(group)
            blocks = source_blocks(self.spec, g, k, self.gathers(), self.shapes) if k > 1 else [0]
            self.maps[g][blocks] = step @ self.maps[g][blocks]
            inv_t = torch.linalg.inv(step).transpose(1, 2)
            for ax in group.members:
                self.b[ax.key] = map_axis(self.b[ax.key], ax, group.size, inv_t if ax.contravariant else step)
        else:
            q, s = step  # position i takes the current unit q[i], times s[i]
            cur = self.scaled[g]
            perm = cur.perm[q]
            scale = cur.scale.clone()
            scale[perm] = s * cur.scale[perm]
            self.scaled[g] = ScaledPermutation(perm, scale)
            for ax in group.members:
                t = permute_tensor(self.b[ax.key], ((g, ax),), {g: q})
                self.b[ax.key] = map_axis(t, ax, group.size, 1.0 / s if ax.contravariant else s)
            self.perm[g] = perm
        for key in group.keys:
            for h, _ in self.spec.axes_of(key):
                self.dirty[h] = h != g
            for term, _ in self.watch.get(key, ()):
                term.value = None

    def _solve_scaled(self, g: str) -> tuple[float, float, Any]:
        """Balanced rows, one assignment, scales carrying B's balance onto A's (position space)."""
        group = self.spec[g]
        n = group.size
        rows = {side: [(block_rows(t[ax.key], ax, n, 1)[0].double(), ax.contravariant) for ax in group.members]
                for side, t in (("a", self.a), ("b", self.b))}  # fmt: skip
        bal = {side: _balance(r) for side, r in rows.items()}
        cost = torch.zeros(n, n, dtype=torch.float64)
        for (xa, cons), (xb, _) in zip(rows["a"], rows["b"]):
            fa, fb = (1 / bal["a"], 1 / bal["b"]) if cons else (bal["a"], bal["b"])
            cost += (xa * fa[:, None]) @ (xb * fb[:, None]).T
        q = lap.solve(cost.float())
        s = bal["b"][q] / bal["a"]

        def distance(qq: torch.Tensor, ss: torch.Tensor) -> float:
            total = 0.0
            for (xa, cons), (xb, _) in zip(rows["a"], rows["b"]):
                total += (xa - xb[qq] * (1 / ss if cons else ss)[:, None]).square().sum().item()
            return total

        old, new = -distance(torch.arange(n), torch.ones(n, dtype=torch.float64)), -distance(q, s)
        norm = sum(x.square().sum().item() for side in rows.values() for x, _ in side)
        if not new > old + self.opts.tol * norm:
            return old, old, None
        return old, new, (q, s)


def _partners(spec: PermutationSpec, heads: Any, maps: Iterable[str]) -> list[str]:
    """Dense groups with one map per unit of ``heads`` on a dimension ``heads`` permutes (its within-head maps)."""
    dims = {(ax.key, ax.dim) for ax in heads.members}
    return [g for g in maps if map_blocks(spec[g]) == heads.size and spec[g].size > 1
            and any((ax.key, ax.dim) in dims for ax in spec[g].members)]  # fmt: skip


def head_cost(spec: PermutationSpec, g: str, partners: list[str], a: Mapping[str, torch.Tensor],
              b: Mapping[str, torch.Tensor]) -> torch.Tensor:  # fmt: skip
    """``C[i, j]`` for heads group ``g``: A's head ``i`` against the head at B's position ``j``, by the
    partners' invariants (:func:`_invariants`) plus plain rows on the members no partner covers."""
    n = spec[g].size
    covered = {(ax.key, ax.dim) for p in partners for ax in spec[p].members}
    cost = torch.zeros(n, n, dtype=torch.float64)
    for ax in spec[g].members:
        if (ax.key, ax.dim) not in covered:
            x, y = (block_rows(t[ax.key], ax, n, 1)[0].float() for t in (a, b))
            cost += (x @ y.T).double().cpu()
    for p in partners:
        fa, fb = (_invariants(spec[p], t, n) for t in (a, b))
        cost += (fa @ fb.T).double().cpu()
    return cost


def _invariants(group: Any, sd: Mapping[str, torch.Tensor], heads: int) -> torch.Tensor:
    """``(heads, -1)``: per head, ``Xᵀ·Y`` for every covariant member ``X`` and contravariant member
    ``Y`` of ``group`` (unchanged by any invertible map of the head's units), flattened."""
    rows = [(block_rows(sd[ax.key], ax, group.size, heads).float(), ax.contravariant) for ax in group.members]
    parts = [torch.bmm(x.transpose(1, 2), y).reshape(heads, -1) for x, cx in rows if not cx for y, cy in rows if cy]
    return torch.cat(parts, dim=1)


def _balance(rows: list[tuple[torch.Tensor, bool]]) -> torch.Tensor:
    """Per unit, the scale that makes its producer and consumer norms equal (1 where either is 0)."""
    prod = sum(((r.square().sum(1)) for r, cons in rows if not cons), torch.zeros(rows[0][0].shape[0], dtype=torch.float64))
    cons = sum(((r.square().sum(1)) for r, c in rows if c), torch.zeros_like(prod))
    ok = (prod > 0) & (cons > 0)
    return torch.where(ok, (cons / prod.clamp_min(1e-300)).pow(0.25), torch.ones_like(prod))


def transform_weight_matching(
    spec: PermutationSpec,
    sd_a: Mapping[str, torch.Tensor],
    sd_b: Mapping[str, torch.Tensor],
    *,
    symmetries: str | Iterable[str] = "all",
    keep_ones: Iterable[str] = (),
    seed: int = 0,
    max_sweeps: int = 100,
    regularization: float = 1e-6,
    max_condition: float = 1e4,
    tol: float = 1e-13,
    quiet: bool = False,
    device: torch.device | str | None = None,
    workers: int | None = None,
) -> TransformMatchingResult:
    """Weight matching in each group's symmetry class (see the module docstring).

    Starts from permutation weight matching of every group, then runs the coordinate descent with a
    closed-form solve for each dense or scaled group; the result's distance to A is therefore never
    larger than permutation matching's. ``keep_ones`` names groups a LayerNorm normalises (their
    orthogonal maps keep the all-ones vector; see :class:`permerge.reparam.Gauge`). Norm gains on
    dense groups must already be folded (:func:`permerge.reparam.fold_gains`).
    """
    start = time.perf_counter()
    check_matchable(spec, [sd_a, sd_b], ["A", "B"])
    classes = resolve_symmetries(spec, symmetries)
    opts = SolverOptions(regularization, max_condition, tol)
    base = weight_matching(spec, sd_a, sd_b, seed=seed, max_sweeps=max_sweeps, quiet=quiet, device=device, workers=workers)
    dev = torch.device("cpu" if device is None else device)
    a = {k: sd_a[k].to(dev) for k in spec.keys}
    b = {k: permute_tensor(sd_b[k].to(dev), spec.axes_of(k), base.permutation) for k in spec.keys}
    before, after_perm = _distance(a, {k: sd_b[k].to(dev) for k in spec.keys}), _distance(a, b)
    transform: Transform = dict(base.permutation)
    sweeps, converged = 0, True
    for _ in range(2):  # the second round restarts from B transformed exactly (b accumulates rounding)
        state = _TransformCosts(spec, a, base.permutation, b, classes, frozenset(keep_ones), opts)
        if not state.dense:
            break
        state.restore(transform)
        todo = [g.name for g in spec.groups if g.size > 1]
        done, converged = coordinate_descent(
            state, todo, 0.0, seed=seed, max_sweeps=max_sweeps, backend=base.backend, tol=1e-12,
            workers=resolve_workers(workers), desc="transform matching", quiet=quiet,
        )  # fmt: skip
        sweeps += done
        transform = state.transform()
        b = {k: v.to(dev) for k, v in apply_transform(spec, transform, {k: sd_b[k] for k in spec.keys}).items()}
        if done == 1:
            break
    after = _distance(a, b)
    LOG.info("transform matching: distance %.6g -> %.6g (permutations alone %.6g), %d sweeps", before, after, after_perm, sweeps)
    return TransformMatchingResult(transform, MappingProxyType(classes), before, after, after_perm, sweeps, converged,
                                   time.perf_counter() - start)  # fmt: skip


def _distance(a: Mapping[str, torch.Tensor], b: Mapping[str, torch.Tensor]) -> float:
    return sum((a[k].double() - b[k].double()).square().sum().item() for k in a)


# -- activation matching ----------------------------------------------------------------------


def transform_activation_matching(
    model_a: nn.Module,
    model_b: nn.Module,
    spec: PermutationSpec,
    data: Iterable[Any],
    *,
    symmetries: str | Iterable[str] = "all",
    keep_ones: Iterable[str] = (),
    input_fn: Callable[[Any], tuple[Any, ...]] = batch_inputs,
    example_kwargs: Mapping[str, Any] | None = None,
    max_batches: int | None = None,
    regularization: float = 1e-3,
    max_condition: float = 1e4,
    quiet: bool = False,
) -> TransformMatchingResult:
    """Activation matching in each group's symmetry class.

    Permutation groups (and the reordering of scaled ones) are matched by correlation
    (:func:`~permerge.match.activation.activation_matching`); with those applied to B, so its heads
    line up with A's, each dense group's map is solved from the cross-moments of A's and B's units
    at the inputs and outputs of the affine layers they pass through (centred per batch, each site
    weighted equally), in a few refining rounds, and each scaled group's scales are the ratio of A's and B's RMS
    activations. Heads whose within-head maps are dense are first re-paired by what they write
    (see ``_ActivationRun.rematch_heads``). ``regularization`` pulls invertible maps towards the
    orthogonal answer (0.1 × the mean eigenvalue by default: on trained ViTs a near-free least-squares
    map reached condition numbers > 10⁴, and shrinking it lowered the barrier). The models' norm gains
    on dense groups must already be folded (the site values are then covariant). ``data`` is read a
    few times (it is materialised first).
    """
    start = time.perf_counter()
    classes, keep_ones = resolve_symmetries(spec, symmetries), frozenset(keep_ones)
    batches = list(itertools.islice(data, max_batches))
    kwargs = dict(example_kwargs or {})
    base = activation_matching(model_a, model_b, spec, batches, input_fn=input_fn, example_kwargs=kwargs, quiet=quiet)
    transform: Transform = {}
    for g in spec.groups:
        cls, n = classes[g.name], g.size
        if cls in DENSE and n > 1:
            transform[g.name] = LinearMap(torch.eye(n, dtype=torch.float64).repeat(map_blocks(g), 1, 1))
        elif cls == SCALED_PERMUTATION and n > 1:
            transform[g.name] = ScaledPermutation(base.permutation[g.name], torch.ones(n, dtype=torch.float64))
        else:
            transform[g.name] = base.permutation[g.name]
    run = _ActivationRun(trace_graph(model_a, input_fn(batches[0]), example_kwargs=kwargs), spec, classes, keep_ones,
                         model_a.state_dict(), model_b.state_dict(), batches, input_fn, kwargs,
                         SolverOptions(regularization, max_condition, 0.0))  # fmt: skip
    dense = [g for g in transform if isinstance(transform[g], LinearMap)]
    flat = [g for g in dense if map_blocks(spec[g]) == 1]
    scaled = [g for g in transform if isinstance(transform[g], ScaledPermutation)]
    transform = run.refine(transform, flat + scaled)
    transform = run.rematch_heads(transform, [g for g in dense if g not in flat])
    transform = run.refine(transform, [g for g in dense if g not in flat])
    LOG.info("transform activation matching: %d groups (%d beyond permutations) on %d batches", len(spec.groups),
             len(dense) + len(scaled), len(batches))  # fmt: skip
    nan = float("nan")
    return TransformMatchingResult(transform, MappingProxyType(classes), nan, nan, nan, 0, True, time.perf_counter() - start)


@dataclass(frozen=True)
class _ActivationRun:
    """What every stage of :func:`transform_activation_matching` measures with."""

    traced: Traced
    spec: PermutationSpec
    classes: Mapping[str, str]
    keep_ones: frozenset[str]
    sd_a: Mapping[str, torch.Tensor]
    sd_b: Mapping[str, torch.Tensor]
    batches: list[Any]
    input_fn: Callable[[Any], tuple[Any, ...]]
    kwargs: Mapping[str, Any]
    opts: SolverOptions

    def refine(self, transform: Transform, groups: list[str], rounds: int = 4) -> Transform:
        """Solve ``groups`` from activations of A and of B transformed so far; later rounds solve the
        remaining step (each shrinks the regularisation's pull towards the orthogonal answer by its
        factor again; exact for a planted transform)."""
        out = dict(transform)
        for r in range(rounds if groups else 0):
            b = apply_transform(self.spec, out, self.sd_b)
            moments, rms = _activation_moments(self.traced, self.spec, groups, self.sd_a, b, self.batches,
                                               self.input_fn, self.kwargs)  # fmt: skip
            gathers, shapes = index_vectors(out), {k: v.shape for k, v in b.items()}
            for g in groups:
                cur = out[g]
                if isinstance(cur, ScaledPermutation):
                    if r == 0:
                        scale = cur.scale.clone()
                        ratio = rms[g][0] / rms[g][1].clamp_min(1e-30)
                        scale[cur.perm] *= torch.where(torch.isfinite(ratio) & (ratio > 0), ratio, 1.0)
                        out[g] = ScaledPermutation(cur.perm, scale)
                    continue
                k = map_blocks(self.spec[g])
                blocks = source_blocks(self.spec, g, k, gathers, shapes) if k > 1 else [0]
                whole = lambda step, m=cur.matrix, bl=blocks: step @ m[bl]  # noqa: E731
                _, _, step = solve_dense(g, self.classes[g], moments[g], g in self.keep_ones, self.opts, whole)
                m = cur.matrix.clone()
                m[blocks] = step @ m[blocks]
                out[g] = LinearMap(m)
        return out

    def rematch_heads(self, transform: Transform, per_head: list[str]) -> Transform:
        """Re-pair the heads of every heads group whose within-head maps are dense, by what each head
        writes: per token, ``W_O[:, head]·z_head`` (its value·output partner's consumer columns times
        their input), which no within-head map changes, correlated between A and B (streams already
        aligned). A head's own units are mixed by its unknown map, so their correlations cannot pair
        heads; without a value·output partner, heads pair by weight invariants (:func:`head_cost`)."""
        out = dict(transform)
        for h in self.spec.groups:
            partners = _partners(self.spec, h, per_head) if isinstance(out.get(h.name), torch.Tensor) else []
            if not partners:
                continue
            b = apply_transform(self.spec, out, self.sd_b)
            readers = [(self.spec[p].size, *r) for p in partners for r in self._readers(p)]
            cost = self._contributions(h.size, readers, b) if readers else None
            if cost is None:
                cost = head_cost(self.spec, h.name, partners, self.sd_a, b)
            q = lap.solve(cost.float())
            out[h.name] = out[h.name][q]
        return out

    def _readers(self, g: str) -> list[tuple[Axis, str]]:
        """``g``'s consumer members on a linear layer's input columns, each with that layer's input node."""
        found = []
        for layer in self.traced.layers:
            for ax in self.spec[g].members:
                if ax.role == CONSUMER and ax.key == layer.weight and ax.dim == 1 - layer.weight_dim and layer.input:
                    found.append((ax, layer.input))
        return found

    def _contributions(self, heads: int, readers: list[tuple[int, Axis, str]], b: Mapping[str, torch.Tensor]) -> torch.Tensor:
        """Correlation of A's and B's per-head contributions through ``readers`` (``(heads, heads)``)."""
        cross = torch.zeros(heads, heads, dtype=torch.float64)
        norm_a, norm_b = torch.zeros(heads, dtype=torch.float64), torch.zeros(heads, dtype=torch.float64)
        for batch in self.batches:
            inputs = self.input_fn(batch)
            vals = [record(self.traced, sd, inputs, self.kwargs, {node for _, _, node in readers}) for sd in (self.sd_a, b)]
            for n, ax, node in readers:
                k, per = heads, []
                for sd, v in zip((self.sd_a, b), vals):
                    value = v[node]
                    z = block_rows(value, Axis(node, value.dim() - 1, ax.block, ax.offset, ax.repeat, ax.stride), n, k)
                    w = block_rows(sd[ax.key], ax, n, k)
                    reps = ax.repeat // k
                    per.append(torch.einsum("hurt,huro->hto", z.reshape(k, n, reps, -1).double(),
                                            w.reshape(k, n, reps, -1).double()).reshape(k, -1))  # fmt: skip
                cross += per[0] @ per[1].T
                norm_a += per[0].square().sum(1)
                norm_b += per[1].square().sum(1)
        return cross / torch.outer(norm_a, norm_b).sqrt().clamp_min(1e-30)



def _activation_moments(traced: Traced, spec: PermutationSpec, groups: list[str], sd_a: Mapping[str, torch.Tensor],
                        sd_b: Mapping[str, torch.Tensor], batches: list[Any], input_fn: Callable[[Any], tuple[Any, ...]],
                        kwargs: Mapping[str, Any]) -> tuple[dict[str, Moments], dict[str, tuple[torch.Tensor, torch.Tensor]]]:  # fmt: skip
    """Per dense group, the cross-moments of A's and B's units over its usable sites; per scaled
    group, A's and B's RMS activation per unit."""
    sites = {g: _usable_sites(traced, spec, g) for g in groups}
    moments = {g: Moments.zeros(map_blocks(spec[g]), spec[g].size) for g in groups}
    sums = {g: [torch.zeros(spec[g].size, dtype=torch.float64) for _ in range(2)] for g in groups}
    wanted = {site.key for ss in sites.values() for site, _ in ss}
    for batch in batches:
        inputs = input_fn(batch)
        vals_a = record(traced, sd_a, inputs, kwargs, wanted)
        vals_b = record(traced, sd_b, inputs, kwargs, wanted)
        for g in groups:
            k = map_blocks(spec[g])
            for site, contravariant in sites[g]:
                x, y = (block_rows(v[site.key], site, spec[g].size, k) for v in (vals_a, vals_b))
                sums[g][0] += x.double().square().sum((0, 2)).cpu()
                sums[g][1] += y.double().square().sum((0, 2)).cpu()
                # centred over the batch's samples: a constant offset (a folded LayerNorm's β/γ, the
                # stream's mean) would otherwise dominate; a ≈ M·b implies a − ā ≈ M·(b − b̄)
                x, y = x - x.mean(-1, keepdim=True), y - y.mean(-1, keepdim=True)
                scale = 2.0 / max((x.square().sum() + y.square().sum()).item(), 1e-30) / len(sites[g])
                moments[g].add(x, y, contravariant, scale)
    rms = {g: (s[0].sqrt(), s[1].sqrt()) for g, s in sums.items()}
    return moments, rms


def _usable_sites(traced: Traced, spec: PermutationSpec, g: str) -> list[tuple[Axis, bool]]:
    """Where ``g``'s units appear as activations a dense map acts on linearly, read off the affine
    layers: a layer's output when ``g`` is on its weight's output rows, its input when ``g`` is on its
    input columns (a pre-norm stream's normalised value, a head's attention output). Each comes as an
    :class:`Axis` on the node's value and whether it transforms contravariantly (the key side of a
    query·key group, whose rows are consumer members)."""
    found: dict[tuple[str, int, int], tuple[Axis, bool]] = {}
    for layer in traced.layers:
        if layer.op not in (LINEAR, CONV) or layer.weight is None or layer.output_index is not None:
            continue
        for ax in spec[g].members:
            if ax.key != layer.weight:
                continue
            if ax.dim == layer.weight_dim:
                node, dim, contra = layer.node, layer.channel_dim, ax.contravariant
            elif ax.dim == (1 if layer.op == CONV else 1 - layer.weight_dim) and layer.input is not None:
                node, dim, contra = layer.input, (1 if layer.op == CONV else -1), False
            else:
                continue
            site = Axis(node, dim, ax.block, ax.offset, ax.repeat, ax.stride)
            found.setdefault((node, dim, ax.offset), (site, contra))
    if not found:
        raise SpecError(f"group {g!r} has no affine layer reading or writing its units, so no activation shows them; "
                        "match it from weights (method='weight') or with permutations")  # fmt: skip
    return list(found.values())
