"""Streamed weight matching: the coordinate descent of :mod:`permerge.match.weight` over lazy sources.

Nothing is held for the whole run but the permutation: each group visit reads the tensors it needs
from A and B one at a time (upcast to float32 per tensor), permutes that B tensor by the current
permutation, adds its term to the group's cost in place and drops it. Peak memory is one group's
cost matrix plus the largest tensor of each model a few times over (its float32 copy and unit-row
view), never two whole models; see ``benchmarks/results/big_models.md``.

The semantics are those of :func:`~permerge.match.weight.weight_matching`: the same start (the
better of the identity and the signature match), the same seeded visit order, the same skipping of
groups whose cost cannot have changed, the same stopping rule, and the same arithmetic for every
cost term (shared helpers), so both give the same permutation. The in-memory matcher updates cached
terms by low-rank corrections where this one recomputes them; the two costs then differ by float
rounding only (a tie within that would be the only way to part).

Both run the same :func:`~permerge.match.weight.coordinate_descent`, so ``workers`` (LAPs of
independent groups in a thread pool) works the same way here.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Iterator, Mapping
from types import MappingProxyType

import torch

from permerge.apply import permute_tensor
from permerge.check import all_finite, check_compatible
from permerge.errors import StateDictMismatchError
from permerge.io.read import TensorSource
from permerge.match import lap
from permerge.match.weight import (
    WeightMatchingResult,
    _cost_matrix,
    _objectives,
    _unit_rows,
    coordinate_descent,
    resolve_workers,
    signature_match,
    term_layout,
)
from permerge.permutation import Permutation, check_permutation, identity
from permerge.spec import PermutationSpec

LOG = logging.getLogger(__name__)

__all__ = ["stream_weight_matching"]


def stream_weight_matching(
    spec: PermutationSpec,
    a: TensorSource,
    b: TensorSource,
    *,
    seed: int = 0,
    max_sweeps: int = 100,
    init: Mapping[str, torch.Tensor] | None = None,
    backend: str = "auto",
    tol: float = 1e-12,
    quiet: bool = False,
    device: torch.device | str | None = None,
    workers: int | None = None,
) -> WeightMatchingResult:
    """:func:`~permerge.match.weight.weight_matching` reading A and B lazily, one tensor at a time.

    Args:
        spec: the groups to permute; its keys must be in both sources (same shapes).
        a, b: lazy tensor sources (``open_checkpoint(path, mmap=False)`` keeps RSS bounded);
            neither is modified.
        seed, max_sweeps, init, backend, tol, quiet: as for ``weight_matching``.
        device: where the cost matmuls run (e.g. ``"cuda"``); tensors are moved there one at a time,
            costs come back through pinned host memory. LAPs run on the CPU.
        workers: threads solving LAPs of independent groups concurrently (default: one per two
            CPU cores, at most 4; 1: sequential). The result does not depend on it.

    Returns:
        A :class:`~permerge.match.weight.WeightMatchingResult`.

    Example:
        >>> from permerge.io.read import open_checkpoint
        >>> with open_checkpoint("a_dir", mmap=False) as a, open_checkpoint("b_dir", mmap=False) as b:  # doctest: +SKIP
        ...     res = stream_weight_matching(spec, a, b, workers=8)
    """
    start = time.perf_counter()
    check_compatible([a, b], [f"A ({a.name})", f"B ({b.name})"], spec=spec)  # headers only; values as read
    backend = lap.resolve_backend(backend)
    workers = resolve_workers(workers)
    dev = torch.device("cpu" if device is None else device)
    la = _Lazy(spec, a, dev, check=True)  # the first pass reads every tensor: check it is finite
    before, total_before = _objectives(spec, la, _Lazy(spec, b, dev, check=True))
    la.check = False
    if init is not None:
        check_permutation(spec, init)
        perm = identity(spec) | {k: v.long().cpu() for k, v in init.items()}
        objective = _objectives(spec, la, _Lazy(spec, b, dev, perm))[1]
    else:
        perm = signature_match(spec, la, _Lazy(spec, b, dev), backend)
        objective = _objectives(spec, la, _Lazy(spec, b, dev, perm))[1]
        LOG.debug("start: identity %.6g, signature match %.6g", total_before, objective)
        if objective <= total_before:
            perm, objective = identity(spec), total_before
    visit = _Visitor(spec, la, _Lazy(spec, b, dev, perm), perm, dev)
    todo = [g.name for g in spec.groups if g.size > 1]
    sweeps, converged = coordinate_descent(
        visit, todo, objective, seed=seed, max_sweeps=max_sweeps, backend=backend, tol=tol,
        workers=workers, desc="weight matching (streamed)", quiet=quiet,
    )  # fmt: skip
    after, total_after = _objectives(spec, la, _Lazy(spec, b, dev, perm))
    seconds = time.perf_counter() - start
    LOG.info(
        "streamed weight matching: objective %.6g -> %.6g in %d sweeps (%.2f s, %s)",
        total_before, total_after, sweeps, seconds, "converged" if converged else "max_sweeps reached",
    )  # fmt: skip
    return WeightMatchingResult(
        dict(perm), sweeps, converged, MappingProxyType(before), MappingProxyType(after),
        total_before, total_after, backend, seconds,
    )  # fmt: skip


class _Lazy(Mapping[str, torch.Tensor]):
    """``key → source[key]`` on ``dev``, permuted by ``perm`` (read live) if given; nothing cached
    but the last tensor, so consecutive members on one tensor read it once."""

    def __init__(
        self, spec: PermutationSpec, source: TensorSource, dev: torch.device,
        perm: Mapping[str, torch.Tensor] | None = None, *, check: bool = False,
    ) -> None:  # fmt: skip
        self.spec, self.source, self.dev, self.perm, self.check = spec, source, dev, perm, check
        self._last: tuple[str, torch.Tensor] | None = None

    def __getitem__(self, key: str) -> torch.Tensor:
        if self._last is not None and self._last[0] == key:
            return self._last[1]
        self._last = None  # drop the previous tensor before reading the next
        t = self.source.get(key).to(self.dev)
        if self.check and not all_finite(t):
            raise StateDictMismatchError(
                f"non-finite (NaN or inf) weights in {self.source.name}[{key!r}]; fix or drop that checkpoint before matching"
            )
        if self.perm is not None:
            t = permute_tensor(t, self.spec.axes_of(key), self.perm)
        self._last = (key, t)
        return t

    def forget(self) -> None:
        self._last = None

    def __iter__(self) -> Iterator[str]:
        return iter(self.spec.keys)

    def __len__(self) -> int:
        return len(self.spec.keys)


class _Visitor:
    """Group visits over lazy sources: costs, moves, and which groups a move makes stale.

    The bookkeeping mirrors ``weight._Costs``: moving ``g`` marks stale every other group with a
    member on one of ``g``'s tensors, and ``g`` itself when it has two axes on one tensor.
    """

    def __init__(
        self, spec: PermutationSpec, a: _Lazy, b_cur: _Lazy, perm: Permutation, dev: torch.device
    ) -> None:
        self.spec, self.a, self.b, self.perm, self.dev = spec, a, b_cur, perm, dev
        self.layout = {g.name: term_layout(spec, g) for g in spec.groups if g.size > 1}
        readers: dict[str, set[str]] = {}
        for g in spec.groups:
            for ax in g.members:
                readers.setdefault(ax.key, set()).add(g.name)
        self.affects: dict[str, frozenset[str]] = {}
        for g in spec.groups:
            others = {h for k in g.keys for h in readers[k]} - {g.name}
            coupled = len(g.members) > len(g.keys)  # two axes on one tensor
            self.affects[g.name] = frozenset(others | ({g.name} if coupled else set()))
        self.dirty = {g.name: True for g in spec.groups}

    def matrix(self, g: str) -> torch.Tensor:
        """Group ``g``'s cost, term by term as ``weight._Costs.matrix`` sums it; a CPU float32 matrix."""
        n = self.spec[g].size
        total = torch.zeros(n, n, device=self.dev)
        p = self.perm[g]
        for _, axes in self.layout[g]:
            pairs = ((_unit_rows(self.a[ax.key], ax, n), _unit_rows(self.b[ax.key], ax, n)) for ax in axes)
            total += _cost_matrix(n, pairs, p)
        self.a.forget()
        self.b.forget()
        self.dirty[g] = False
        return _to_host(total)

    def move(self, g: str, new_p: torch.Tensor) -> None:
        self.perm[g] = new_p
        for h in self.affects[g]:
            self.dirty[h] = True


def _to_host(t: torch.Tensor) -> torch.Tensor:
    """``t`` on the CPU; from a GPU through pinned memory (pageable copies were ~40× slower)."""
    if t.device.type == "cpu":
        return t
    host = torch.empty(t.shape, dtype=t.dtype, pin_memory=True)
    host.copy_(t)
    return host
