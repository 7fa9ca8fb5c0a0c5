"""Weight matching (Git Re-Basin, Algorithm 1): align B's units to A's using the weights alone.

For each group ``g`` the objective is ``Σ_members ⟨A, P·B⟩``, linear in ``P_g`` once every other
group's permutation is held fixed, so it is one linear assignment problem per group. Coordinate
descent visits the groups in a seeded random order until a sweep changes nothing.
"""

from __future__ import annotations

import logging
import sys
import time
from collections.abc import Mapping
from dataclasses import dataclass
from types import MappingProxyType

import torch
from tqdm.auto import tqdm

from permerge.apply import permute_tensor
from permerge.errors import StateDictMismatchError
from permerge.match import lap
from permerge.permutation import Permutation, check_permutation, identity
from permerge.spec import Axis, Group, PermutationSpec

LOG = logging.getLogger(__name__)

__all__ = ["WeightMatchingResult", "weight_matching"]


@dataclass(frozen=True)
class WeightMatchingResult:
    """What :func:`weight_matching` found.

    Attributes:
        permutation: group → int64 index vector; ``permutation[g][i]`` is the unit of B that lands
            at position ``i`` (pass it to :func:`permerge.apply_permutation` with B's state dict).
        sweeps: full passes over the groups that were run (the last one changed nothing unless
            ``converged`` is False).
        converged: whether a sweep changed no group before ``max_sweeps`` ran out.
        objective_before / objective_after: group → ``Σ ⟨A[k], P·B[k]⟩`` over the tensors ``k``
            the group moves, under the initial / final permutation.
        total_before / total_after: the same sum over every tensor the spec touches (each once).
        backend: the LAP backend used.
        seconds: wall time of the whole call.
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


def weight_matching(
    spec: PermutationSpec,
    sd_a: Mapping[str, torch.Tensor],
    sd_b: Mapping[str, torch.Tensor],
    *,
    seed: int = 0,
    max_sweeps: int = 100,
    init: Mapping[str, torch.Tensor] | None = None,
    backend: str = "auto",
    tol: float = 1e-12,
    quiet: bool = False,
    device: torch.device | str | None = None,
) -> WeightMatchingResult:
    """Find the permutation of B's units that maximises ``Σ ⟨A, P·B⟩`` by coordinate descent.

    Args:
        spec: the groups to permute (from :func:`permerge.trace` or hand-written).
        sd_a, sd_b: state dicts with the same keys and shapes; neither is modified.
        seed: seeds the order in which groups are visited each sweep.
        max_sweeps: stop after this many sweeps even if the last one still changed something.
        init: starting permutation (groups it omits start at the identity).
        backend: LAP backend, see :func:`permerge.match.lap.solve`.
        tol: a group's new permutation is kept only if it beats the current one by more than
            ``tol`` relative to the current objective.
        quiet: hide the progress bar (shown only when stderr is a terminal).
        device: where the cost matmuls run (default CPU); the LAPs always run on the CPU.

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
    _validate(spec, sd_a, sd_b)
    backend = lap.resolve_backend(backend)
    dev = torch.device("cpu" if device is None else device)
    perm = identity(spec)
    if init is not None:
        check_permutation(spec, init)
        perm.update({k: v.long().cpu() for k, v in init.items()})
    # A's unit-major rows never change: gather them once. B is kept fully permuted by the
    # current permutation (`b_cur`), and only the tensors of a group that changed are re-gathered.
    a_rows = {g.name: [_unit_rows(sd_a[ax.key].to(dev), ax, g.size) for ax in g.members] for g in spec.groups}
    b_cur = {k: permute_tensor(sd_b[k].to(dev), spec.axes_of(k), perm) for k in spec.keys}
    before, total_before = _objectives(spec, sd_a, b_cur, dev)
    todo = [g for g in spec.groups if g.size > 1]
    gen = torch.Generator().manual_seed(seed)
    sweeps, converged = 0, False
    for sweeps in tqdm(range(1, max_sweeps + 1), desc="weight matching", disable=quiet or not sys.stderr.isatty()):
        changed = 0
        for k in torch.randperm(len(todo), generator=gen).tolist():
            g = todo[k]
            cost = _cost_matrix(g, a_rows[g.name], b_cur, perm[g.name])
            new_p = lap.solve(cost, backend=backend)
            rows = torch.arange(g.size)
            old = cost[rows, perm[g.name]].double().sum().item()
            new = cost[rows, new_p].double().sum().item()
            # Stopping rule: keep the LAP's answer only if it beats the current one by more than
            # `tol` (relative); ties and float noise keep the old permutation, so a sweep with no
            # accepted change means converged.
            if new > old + tol * abs(old):
                delta = torch.argsort(perm[g.name])[new_p]  # current position of each new unit
                for key in dict.fromkeys(ax.key for ax in g.members):
                    axes = tuple((g.name, ax) for ax in g.members if ax.key == key)
                    b_cur[key] = permute_tensor(b_cur[key], axes, {g.name: delta})
                perm[g.name] = new_p
                changed += 1
        LOG.info("sweep %d: %d/%d groups changed", sweeps, changed, len(todo))
        if not changed:
            converged = True
            break
    after, total_after = _objectives(spec, sd_a, b_cur, dev)
    seconds = time.perf_counter() - start
    LOG.info(
        "weight matching: objective %.6g -> %.6g in %d sweeps (%.2f s, %s)",
        total_before, total_after, sweeps, seconds, "converged" if converged else "max_sweeps reached",
    )
    return WeightMatchingResult(
        perm, sweeps, converged, MappingProxyType(before), MappingProxyType(after),
        total_before, total_after, backend, seconds,
    )


def _cost_matrix(
    g: Group, a_rows: list[torch.Tensor], b_cur: Mapping[str, torch.Tensor], p: torch.Tensor
) -> torch.Tensor:
    """``C[i, j] = Σ_members ⟨A's unit i, B's unit j⟩`` with every other axis of B permuted.

    ``b_cur`` holds B permuted along *all* its axes, this group's included, so its unit-major rows
    come in the order ``p``; the columns are scattered back to B's own unit order at the end.
    """
    cost = torch.zeros(g.size, g.size, dtype=torch.float32, device=a_rows[0].device)
    for ax, a in zip(g.members, a_rows):
        b = _unit_rows(b_cur[ax.key], ax, g.size)
        cost.addmm_(_f32(a), _f32(b).T)
    out = torch.empty_like(cost)
    out[:, p.to(cost.device)] = cost
    return out.cpu()


def _unit_rows(t: torch.Tensor, ax: Axis, n: int) -> torch.Tensor:
    """View ``t`` as an ``(n, -1)`` matrix whose row ``i`` holds every entry of unit ``i``."""
    dim = ax.dim % t.dim()
    if (ax.block, ax.offset, ax.repeat) == (1, 0, 1) and t.shape[dim] == n:
        return t.movedim(dim, 0).reshape(n, -1)
    pos = ax.positions(n).flatten().to(t.device)
    x = t.index_select(dim, pos).movedim(dim, 0)  # (repeat * n * block, rest...)
    return x.reshape(ax.repeat, n, ax.block, -1).transpose(0, 1).reshape(n, -1)


def _f32(t: torch.Tensor) -> torch.Tensor:
    """Upcast one tensor at a time: CPU half-precision matmuls are far slower than float32."""
    return t if t.dtype == torch.float32 else t.float()


def _objectives(
    spec: PermutationSpec, sd_a: Mapping[str, torch.Tensor], b_cur: Mapping[str, torch.Tensor], dev: torch.device
) -> tuple[dict[str, float], float]:
    """Per group and total ``Σ ⟨A[k], P·B[k]⟩`` over the tensors each group moves."""
    dots = {k: torch.dot(_f32(sd_a[k].to(dev)).flatten(), _f32(b_cur[k]).flatten()).item() for k in spec.keys}
    per_group = {g.name: sum(dots[k] for k in dict.fromkeys(ax.key for ax in g.members)) for g in spec.groups}
    return per_group, sum(dots.values())


def _validate(spec: PermutationSpec, sd_a: Mapping[str, torch.Tensor], sd_b: Mapping[str, torch.Tensor]) -> None:
    """Raise :class:`StateDictMismatchError` (or ``SpecError``) before any work is done."""
    only_a, only_b = sorted(set(sd_a) - set(sd_b)), sorted(set(sd_b) - set(sd_a))
    if only_a or only_b:
        raise StateDictMismatchError(
            f"state dicts have different keys: only in A {only_a[:10]}, only in B {only_b[:10]}; "
            "weight matching needs two models of the same architecture"
        )
    shapes = sorted(
        f"{k}: {tuple(sd_a[k].shape)} vs {tuple(sd_b[k].shape)}" for k in sd_a if sd_a[k].shape != sd_b[k].shape
    )
    if shapes:
        raise StateDictMismatchError(
            f"state dicts have different shapes: {shapes[:10]}; weight matching needs two models "
            "of the same architecture and size"
        )
    spec.validate(sd_a)
    bad = sorted(
        f"{name}[{k!r}]"
        for name, sd in (("A", sd_a), ("B", sd_b))
        for k in spec.keys
        if sd[k].is_floating_point() and not torch.isfinite(sd[k]).all()
    )
    if bad:
        raise StateDictMismatchError(
            f"non-finite (NaN or inf) weights in {bad[:10]}; fix or drop those checkpoints before matching"
        )
