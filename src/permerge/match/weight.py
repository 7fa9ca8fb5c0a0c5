"""Weight matching (Git Re-Basin, Algorithm 1): align B's units to A's using the weights alone.

For each group ``g`` the objective ``Σ ⟨A, P·B⟩`` is linear in ``P_g`` once every other group's
permutation is held fixed, so it is one linear assignment problem per group. Coordinate descent
visits the groups in a seeded random order until a sweep changes nothing.

Two departures from the paper, both measured on the test zoo:

* **Start.** Coordinate descent from the identity stalls in a local optimum for groups that share
  a dimension (attention heads × head_dim, GroupNorm groups × channels): a planted permutation
  was recovered in only 80–93% of 40 seeds for the zoo's attention models, and not for a planted
  ResNet-50. Unless ``init`` is given, the start is the better (by objective) of the identity and
  a *signature* match, which pairs units by statistics of their weights that no other group's
  permutation changes (sum, norm, min, max of each member's slice). It recovered all 500 planted
  permutations tried (25 seeds × 20 zoo models) and never starts below the identity, so
  ``total_after >= total_before``; on unrelated models it ends at a similar or higher objective.
* **Incremental costs.** Each group's cost matrix is a sum of per-tensor terms; the terms are
  cached and, when a neighbouring group moves only some of its units, updated by a low-rank
  correction instead of recomputed. A group whose terms did not change since its last LAP is
  skipped (same cost, same answer). A ResNet-50 (23.5M parameters, 37 groups) on the shared 2-core
  dev box: unrelated weights ≈ 10 s (30 sweeps, ~0.3 s each; recomputing every cost took
  1.3–1.8 s a sweep), a planted permutation 2.3 s (recovered exactly in one sweep).
"""

from __future__ import annotations

import logging
import os
import time
from collections.abc import Iterable, Iterator, Mapping, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from types import MappingProxyType
from typing import Protocol

import torch

from permerge.apply import axis_index, permute_tensor
from permerge.check import check_compatible
from permerge.match import lap
from permerge.match.anneal import annealed_start
from permerge.match.restarts import best_of, restart_start
from permerge.permutation import Permutation, check_permutation, identity
from permerge.progress import DELAY_S, progress
from permerge.spec import Axis, Group, PermutationSpec

LOG = logging.getLogger(__name__)

__all__ = ["WeightMatchingResult", "check_matchable", "weight_matching"]

_CACHE_BYTES = 1 << 30
"""Memory for cached per-tensor cost terms; terms beyond it are recomputed at every visit."""


@dataclass(frozen=True)
class WeightMatchingResult:
    """What :func:`weight_matching` found.

    Attributes:
        permutation: group → int64 index vector; ``permutation[g][i]`` is the unit of B that lands
            at position ``i`` (pass it to :func:`permerge.apply_permutation` with B's state dict).
        sweeps: passes over the groups that were run (the last one changed nothing when
            ``converged``).
        converged: whether a sweep changed no group before ``max_sweeps`` ran out.
        objective_before / objective_after: group → ``Σ ⟨A[k], P·B[k]⟩`` over the tensors ``k``
            the group moves, for B as given (``P`` = identity) / for the returned permutation.
        total_before / total_after: the same sum over every tensor the spec touches, each once.
        backend: the LAP backend used.
        seconds: wall time of the whole call.
        restarts: ``total_after`` of every attempt (see ``restarts``), in attempt order; the
            returned permutation is the best one's (its spread is the local optima's).
    """

    permutation: Permutation
    sweeps: int
    converged: bool
    objective_before: Mapping[str, float]
    objective_after: Mapping[str, float]
    total_before: float
    total_after: float
    backend: str
    seconds: float
    restarts: tuple[float, ...] = ()


def weight_matching(
    spec: PermutationSpec,
    sd_a: Mapping[str, torch.Tensor],
    sd_b: Mapping[str, torch.Tensor],
    *,
    seed: int = 0,
    max_sweeps: int = 100,
    init: Mapping[str, torch.Tensor] | str | None = None,
    restarts: int = 1,
    backend: str = "auto",
    tol: float = 1e-12,
    quiet: bool = False,
    device: torch.device | str | None = None,
    workers: int | None = None,
) -> WeightMatchingResult:
    """Find the permutation of B's units that maximises ``Σ ⟨A, P·B⟩`` by coordinate descent.

    Args:
        spec: the groups to permute (from :func:`permerge.trace` or hand-written).
        sd_a, sd_b: state dicts with the same keys and shapes; neither is modified.
        seed: seeds the order in which groups are visited each sweep.
        max_sweeps: stop after this many sweeps even if the last one still changed something.
        init: starting permutation (groups it omits start at the identity); ``"anneal"`` for the
            annealed Sinkhorn-relaxed start (:mod:`permerge.match.anneal`: slower, finds better
            optima on deep nets); by default the better of the identity and a signature match (see
            the module docstring).
        restarts: run the descent this many times and keep the highest objective: attempt 0 is
            the run above, attempt ``i`` visits in seed ``seed + i``'s order, from ``init`` if given
            (the annealed start is computed once), else from the identity or a random permutation
            (:mod:`permerge.match.restarts`); never worse than one run.
        backend: LAP backend, see :func:`permerge.match.lap.solve`.
        tol: a group's new permutation is kept only if it beats the current one by more than
            ``tol`` relative to the current objective.
        quiet: hide the progress bar (shown only when stderr is a terminal).
        device: where the cost matmuls run (default CPU); the LAPs always run on the CPU.
        workers: threads solving the LAPs of independent groups concurrently, or running restarts
            concurrently (default: one per two CPU cores, at most 4); the result does not depend on it.

    Returns:
        A :class:`WeightMatchingResult`; ``apply_permutation(spec, res.permutation, sd_b)`` is B
        aligned to A.

    Example:
        >>> import torch, permerge
        >>> from permerge.match import weight_matching
        >>> mlp = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.ReLU(), torch.nn.Linear(8, 2))
        >>> spec = permerge.trace(mlp, torch.randn(3, 4))
        >>> sd_a = mlp.state_dict()
        >>> perm = permerge.random_permutation(spec, seed=1)
        >>> res = weight_matching(spec, sd_a, permerge.apply_permutation(spec, perm, sd_a))
        >>> torch.equal(res.permutation["0.weight:0"], permerge.inverse(perm)["0.weight:0"])
        True
    """
    start = time.perf_counter()
    check_matchable(spec, [sd_a, sd_b], ["A", "B"])
    if isinstance(init, str) and init != "anneal":
        raise ValueError(f"init must be a permutation, None or 'anneal', got {init!r}")
    backend = lap.resolve_backend(backend)
    workers = resolve_workers(workers)
    dev = torch.device("cpu" if device is None else device)
    a = {k: sd_a[k].to(dev) for k in spec.keys}
    b = {k: sd_b[k].to(dev) for k in spec.keys}
    before, total_before = _objectives(spec, a, b)
    inner = 1 if restarts > 1 and workers > 1 else workers  # parallel attempts, or parallel LAPs
    if init == "anneal":  # one annealing; restarts then vary the descent's visit order from it
        init = annealed_start(spec, a, b, backend=backend)

    def attempt(i: int) -> tuple[_Costs, int, bool, float]:
        costs = _Costs(spec, a, *_start(spec, a, b, restart_start(spec, i, seed, init), backend, total_before))
        todo = [g.name for g in spec.groups if g.size > 1]
        sweeps, converged = coordinate_descent(
            costs, todo, _objectives(spec, a, costs.b)[1], seed=seed + i, max_sweeps=max_sweeps, backend=backend,
            tol=tol, workers=inner, desc="weight matching", quiet=quiet,
        )  # fmt: skip
        return costs, sweeps, converged, _objectives(spec, a, costs.b)[1]

    (costs, sweeps, converged, total_after), spread = best_of(attempt, restarts, lambda r: r[3], workers)
    after = _objectives(spec, a, costs.b)[0]
    seconds = time.perf_counter() - start
    LOG.info(
        "weight matching: objective %.6g -> %.6g in %d sweeps (%.2f s, %s; %d attempts %.6g..%.6g)", total_before,
        total_after, sweeps, seconds, "converged" if converged else "max_sweeps reached", restarts, min(spread),
        max(spread),
    )  # fmt: skip
    return WeightMatchingResult(
        dict(costs.perm), sweeps, converged, MappingProxyType(before), MappingProxyType(after),
        total_before, total_after, backend, seconds, spread,
    )


# -- the descent (shared with the streamed matcher) -------------------------------------------


def resolve_workers(workers: int | None) -> int:
    """``workers`` checked, or by default one LAP thread per two CPU cores (at most 4): the other
    cores stay with torch's matmuls. On the 2-core dev box that is 1: there two LAP threads beside
    torch's two were no faster (MLP 0.65 vs 0.57 s, ResNet-50 7.75 vs 7.34 s; benchmarks/align.py)."""
    if workers is None:
        return max(1, min(4, (os.cpu_count() or 1) // 2))
    if workers < 1:
        raise ValueError(f"workers must be >= 1, got {workers}")
    return workers


class Visits(Protocol):
    """What coordinate descent needs of a matcher's state (``_Costs`` here, the streamed visitor)."""

    spec: PermutationSpec
    perm: dict[str, torch.Tensor]
    dirty: dict[str, bool]  # whether a group's cost may have changed since its last LAP

    def matrix(self, g: str) -> torch.Tensor: ...

    def move(self, g: str, new_p: torch.Tensor) -> None: ...


def coordinate_descent(
    state: Visits, todo: list[str], objective: float, *, seed: int, max_sweeps: int, backend: str,
    tol: float, workers: int, desc: str, quiet: bool,
) -> tuple[int, bool]:  # fmt: skip
    """Algorithm 1's sweeps over ``todo`` in a seeded random order; returns (sweeps, converged).

    With ``workers > 1`` the LAPs of consecutive, independent groups of the visit order (no tensor
    in common, e.g. the first and last hidden layer of an MLP, or every layer's MLP group once the
    residual stream is fixed) are solved in a thread pool while the next costs are computed. A
    group's cost depends only on groups sharing a tensor with it, so the result is the sequential
    one; both LAP backends release the GIL.
    """
    gen = torch.Generator().manual_seed(seed)
    sweeps, converged = 0, False
    closed_form = getattr(state, "dense", frozenset())  # groups beyond permutations: state.solve(g) (match/symmetry.py)
    pool = ThreadPoolExecutor(workers, thread_name_prefix="permerge-lap") if workers > 1 else None
    try:
        start = time.perf_counter()
        for sweeps in range(1, max_sweeps + 1):
            changed = 0
            order = [todo[k] for k in torch.randperm(len(todo), generator=gen).tolist()]
            # a bar per sweep, over its groups (not over max_sweeps: matching usually converges in a
            # few sweeps), shown once matching has run for a second
            with progress(total=len(order), desc=f"{desc}, sweep {sweeps}", unit="group", quiet=quiet, leave=False,
                          delay=max(0.0, DELAY_S - (time.perf_counter() - start))) as bar:  # fmt: skip
                for run in _independent_runs(order, state, workers):
                    solving: list[tuple[str, torch.Tensor | None, Future[torch.Tensor] | None]] = []
                    for g in run:  # costs in this thread while the earlier ones' LAPs run
                        cost = None if g in closed_form else state.matrix(g)
                        fut = pool.submit(lap.solve, cost, backend=backend) if pool and cost is not None else None
                        solving.append((g, cost, fut))
                    for g, cost, fut in solving:
                        if cost is None:
                            old, new, step = state.solve(g)  # type: ignore[attr-defined]
                        else:
                            step = fut.result() if fut else lap.solve(cost, backend=backend)
                            old, new = _gain(cost, state.perm[g], step)
                        # Stopping rule: keep the LAP's answer only if it beats the current permutation
                        # by more than `tol` (relative); ties and float noise keep the old one, so a
                        # sweep that accepts nothing has converged.
                        if new > old + tol * abs(old):
                            state.move(g, step)
                            changed, objective = changed + 1, objective + new - old
                    bar.set_postfix(changed=changed, refresh=False)
                    bar.update(order.index(run[-1]) + 1 - bar.n)  # groups skipped as unchanged count as done
                bar.update(len(order) - bar.n)
            LOG.info("sweep %d: objective %.6g, %d/%d groups changed", sweeps, objective, changed, len(todo))
            if not changed:
                converged = True
                break
    finally:
        if pool is not None:
            pool.shutdown(wait=True)
    return sweeps, converged


def _independent_runs(order: list[str], state: Visits, size: int) -> Iterator[list[str]]:
    """Runs of at most ``size`` stale groups of ``order`` that share no tensor, in order.

    Lazy: each run is formed after the previous one's moves, so staleness is current. A group whose
    cost cannot have changed since its last visit is skipped (same cost, same answer).
    """
    i = 0
    while i < len(order):
        run: list[str] = []
        used: set[str] = set()
        while i < len(order) and len(run) < size and not (state.spec[order[i]].keys & used):
            g = order[i]
            i += 1
            if state.dirty[g]:
                run.append(g)
                used |= state.spec[g].keys
        if run:
            yield run


# -- the start --------------------------------------------------------------------------------


def _start(
    spec: PermutationSpec,
    a: Mapping[str, torch.Tensor],
    b: Mapping[str, torch.Tensor],
    init: Mapping[str, torch.Tensor] | None,
    backend: str,
    total_identity: float,
) -> tuple[Permutation, dict[str, torch.Tensor]]:
    """``init`` if given, else the better of the identity and the signature match; and B permuted by it."""
    perm = identity(spec)
    if init is not None:
        check_permutation(spec, init)
        perm.update({k: v.long().cpu() for k, v in init.items()})
    else:
        perm = signature_match(spec, a, b, backend)
    b_perm = {k: _copy_of(permute_tensor(b[k], spec.axes_of(k), perm), b[k]) for k in spec.keys}
    if init is None:
        _, total = _objectives(spec, a, b_perm)
        LOG.debug("start: identity %.6g, signature match %.6g", total_identity, total)
        if total <= total_identity:
            perm, b_perm = identity(spec), {k: b[k].clone() for k in spec.keys}  # _Costs writes into it
    return perm, b_perm


def signature_match(
    spec: PermutationSpec, a: Mapping[str, torch.Tensor], b: Mapping[str, torch.Tensor], backend: str = "auto"
) -> Permutation:
    """Pair each group's units by :func:`_signature` (nearest in squared distance), one LAP per group.

    ``a`` and ``b`` may be lazy mappings: each tensor is read once per group that has a member on it.
    """
    perm = identity(spec)
    for g in spec.groups:
        if g.size > 1:
            fa, fb = _signature(g, a), _signature(g, b)
            perm[g.name] = lap.solve(-torch.cdist(fa.double(), fb.double()).square(), backend=backend)
    return perm


def _signature(g: Group, sd: Mapping[str, torch.Tensor]) -> torch.Tensor:
    """``(n, 4·members)`` statistics of each unit's weights, unchanged by other groups' permutations.

    Two units that are the same weights up to other groups' permutations get the same statistics,
    so a planted permutation is matched exactly whenever the statistics tell the units apart.
    """
    feats = []
    for ax in g.members:
        rows = _f32(_unit_rows(sd[ax.key], ax, g.size))
        # (amax/amin/sum/norm are vectorised; aminmax and std_mean are ~10x slower on CPU)
        f = torch.stack([rows.sum(1), torch.linalg.vector_norm(rows, dim=1), rows.amin(1), rows.amax(1)], dim=1)
        feats.append(f / f[:, 1].square().mean().sqrt().clamp_min(1e-30))  # each side by its own scale
    return torch.cat(feats, dim=1)


# -- costs ------------------------------------------------------------------------------------


@dataclass(eq=False)
class _Term:
    """Members of one group whose cost contribution depends on the same other groups."""

    group: str
    deps: frozenset[str]  # the groups, other than via this axis, that permute these tensors
    members: list[tuple[Axis, torch.Tensor]]  # (axis, A's unit rows)
    cached: bool
    value: torch.Tensor | None = field(default=None, repr=False)  # in B's unit order; None = stale


class _Costs:
    """The current permutation, B permuted by it, and each group's cost kept up to date.

    Internal and mutable by design: it exists to avoid recomputing what did not change.
    """

    def __init__(
        self, spec: PermutationSpec, a: Mapping[str, torch.Tensor], perm: Permutation, b: dict[str, torch.Tensor]
    ) -> None:
        self.spec, self.a, self.perm, self.b = spec, a, dict(perm), b  # b: B permuted by perm, a copy we own
        self.terms: dict[str, list[_Term]] = {}
        self.watch: dict[str, list[tuple[_Term, Axis]]] = {}  # key → terms reading that tensor
        self.dirty = {g.name: True for g in spec.groups}
        budget = _CACHE_BYTES
        for g in spec.groups:
            if g.size == 1:
                continue
            for deps, axes in term_layout(spec, g):
                # a self-coupled term depends on g's own permutation: recompute it every visit
                cached = g.name not in deps and budget >= 4 * g.size**2
                term = _Term(g.name, deps, [], cached)
                budget -= 4 * g.size**2 if cached else 0
                self.terms.setdefault(g.name, []).append(term)
                for ax in axes:
                    term.members.append((ax, _unit_rows(a[ax.key], ax, g.size)))
                    self.watch.setdefault(ax.key, []).append((term, ax))

    def matrix(self, g: str) -> torch.Tensor:
        """``C[i, j] = Σ ⟨A's unit i, B's unit j⟩`` (other groups applied), as a CPU float32 matrix."""
        n = self.spec[g].size
        total = torch.zeros(n, n)
        for term in self.terms[g]:
            value = term.value
            if value is None or not term.cached:
                pairs = ((a, _unit_rows(self.b[ax.key], ax, n)) for ax, a in term.members)
                value = _cost_matrix(n, pairs, self.perm[g])
                term.value = value if term.cached else None
            total += value.cpu()
        self.dirty[g] = False
        return total

    def move(self, g: str, new_p: torch.Tensor) -> None:
        """Switch group ``g`` to ``new_p``: re-gather the slices of B it moves and correct the terms
        of the groups that read them (low rank when few units moved, else marked stale)."""
        delta = torch.argsort(self.perm[g])[new_p]  # current position of each new unit
        for key in dict.fromkeys(ax.key for ax in self.spec[g].members):
            mine = tuple(ax for ax in self.spec[g].members if ax.key == key)
            b = self.b[key]
            if len(mine) > 1:  # g twice in one tensor: re-gather it whole, recompute its readers
                self.b[key] = permute_tensor(b, tuple((g, ax) for ax in mine), {g: delta})
                for term, _ in self.watch[key]:
                    self.dirty[term.group], term.value = True, None
                continue
            dim = mine[0].dim % b.dim()
            idx = axis_index(mine[0], delta, b.shape[dim])
            moved = torch.nonzero(idx != torch.arange(len(idx))).flatten()
            at, src = moved.to(b.device), idx[moved].to(b.device)  # slice `at` becomes slice `src`
            for term, ax in self.watch[key]:
                if term.group == g and g not in term.deps:
                    continue  # in B's unit order, which g's own permutation does not touch
                self.dirty[term.group] = True
                if term.value is None or not term.cached:
                    continue
                if ax.dim % b.dim() == dim or 2 * len(moved) > b.shape[dim]:
                    term.value = None  # shares g's dimension, or most units moved: recompute
                    continue
                n, p = len(self.perm[term.group]), self.perm[term.group].to(b.device)
                d_s = _f32(b.index_select(dim, src)) - _f32(b.index_select(dim, at))
                # rows of b are in p's order; put them in B's unit order so the update adds in place
                d_s = _unit_rows(d_s, ax, n).index_select(0, torch.argsort(p))
                term.value.addmm_(_f32(_unit_rows(self.a[key].index_select(dim, at), ax, n)), d_s.T)
            b.index_copy_(dim, at, b.index_select(dim, src))  # b is ours (a copy), so in place
        self.perm[g] = new_p


def term_layout(spec: PermutationSpec, g: Group) -> list[tuple[frozenset[str], list[Axis]]]:
    """``g``'s members grouped into cost terms by the other groups that permute them, in member order.

    Both matchers (in memory and streamed) sum a group's cost term by term in this order, so a term
    computed afresh is bit-identical in both.
    """
    by_deps: dict[frozenset[str], list[Axis]] = {}
    for ax in g.members:
        deps = frozenset(h for h, other in spec.axes_of(ax.key) if (h, other) != (g.name, ax))
        by_deps.setdefault(deps, []).append(ax)
    return list(by_deps.items())


def _gain(cost: torch.Tensor, cur: torch.Tensor, new_p: torch.Tensor) -> tuple[float, float]:
    """The objective of the current and of the LAP's permutation under ``cost`` (float64 sums)."""
    rows = torch.arange(len(new_p))
    return cost[rows, cur].double().sum().item(), cost[rows, new_p].double().sum().item()


def _cost_matrix(n: int, pairs: Iterable[tuple[torch.Tensor, torch.Tensor]], p: torch.Tensor) -> torch.Tensor:
    """``Σ A_g @ B_g.T`` over ``(A's unit rows, B's unit rows)`` pairs, with B's columns in B's own
    unit order (on the pairs' device).

    B's rows come from B permuted along *all* its axes, this group's included, so they are in the
    order ``p``; the columns are scattered back to B's own unit order at the end. ``pairs`` may be a
    generator that reads each tensor only when it is needed.
    """
    cost: torch.Tensor | None = None
    for a, b in pairs:
        if cost is None:
            cost = torch.zeros(n, n, dtype=torch.float32, device=a.device)
        cost.addmm_(_f32(a), _f32(b).T)
    assert cost is not None, "a cost term has at least one member"
    out = torch.empty_like(cost)
    out[:, p.to(cost.device)] = cost
    return out


def _unit_rows(t: torch.Tensor, ax: Axis, n: int) -> torch.Tensor:
    """View ``t`` as an ``(n, -1)`` matrix whose row ``i`` holds every entry of unit ``i``."""
    dim = ax.dim % t.dim()
    if (ax.block, ax.offset, ax.repeat) == (1, 0, 1) and t.shape[dim] == n:
        return t.movedim(dim, 0).reshape(n, -1)
    pos = ax.positions(n).flatten().to(t.device)
    x = t.index_select(dim, pos).movedim(dim, 0)  # (repeat * n * block, rest...)
    return x.reshape(ax.repeat, n, ax.block, -1).transpose(0, 1).reshape(n, -1)


def _copy_of(t: torch.Tensor, source: torch.Tensor) -> torch.Tensor:
    """``t``, cloned if it shares memory with ``source`` (the caller's tensor, never written)."""
    return t.clone() if t.untyped_storage().data_ptr() == source.untyped_storage().data_ptr() else t


def _f32(t: torch.Tensor) -> torch.Tensor:
    """Upcast one tensor at a time: CPU half-precision matmuls are far slower than float32."""
    return t if t.dtype == torch.float32 else t.float()


def _objectives(
    spec: PermutationSpec, a: Mapping[str, torch.Tensor], b: Mapping[str, torch.Tensor]
) -> tuple[dict[str, float], float]:
    """Per group and total ``Σ ⟨A[k], B[k]⟩`` over the tensors each group moves."""
    dots = {k: torch.dot(_f32(a[k]).flatten(), _f32(b[k]).flatten()).item() for k in spec.keys}
    per_group = {g.name: sum(dots[k] for k in dict.fromkeys(ax.key for ax in g.members)) for g in spec.groups}
    return per_group, sum(dots.values())


def check_matchable(spec: PermutationSpec, state_dicts: Sequence[Mapping[str, torch.Tensor]], names: Sequence[str]) -> None:
    """Raise before any work unless ``state_dicts`` can be matched under ``spec``
    (:func:`permerge.check.check_compatible`; values: the spec's tensors must be finite)."""
    check_compatible(state_dicts, names, spec=spec, finite=False)
    check_compatible([{k: sd[k] for k in spec.keys} for sd in state_dicts], names)
