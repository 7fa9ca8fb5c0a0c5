"""Restarts: run a seeded local search several times from different starts and keep the best objective.

Coordinate descent over groups finds a local optimum that depends on where it starts and on the
order it visits the groups (measured in docs/benchmarks.md: on a deep MLP pair, seeds alone
spread the objective by a few percent and the loss barrier by a factor of two or more). Restarts are
the cheap remedy: attempt 0 is exactly the single run (same seed, same start), so the best of
``k`` attempts never has a lower objective than it; attempts ``i ≥ 1`` use seed ``seed + i``. With
a given start (a permutation, e.g. the annealed one) every attempt starts there and only the visit
order varies; without one they alternate between the identity and a seeded random permutation.
Independent attempts run in a thread pool (torch's matmuls and both LAP backends release the GIL).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from concurrent.futures import ThreadPoolExecutor
from typing import TypeVar

import torch

from permerge.permutation import identity, random_permutation
from permerge.spec import PermutationSpec

__all__ = ["best_of", "restart_start"]

R = TypeVar("R")


def restart_start(
    spec: PermutationSpec, attempt: int, seed: int, init: Mapping[str, torch.Tensor] | None
) -> Mapping[str, torch.Tensor] | None:
    """The start of attempt ``attempt``: ``init`` if given (or for attempt 0), else the identity
    and seeded random permutations in turn."""
    if attempt == 0 or init is not None:
        return init
    return identity(spec) if attempt % 2 else random_permutation(spec, seed=seed * 1_000_003 + attempt)


def best_of(
    run: Callable[[int], R], attempts: int, objective: Callable[[R], float], workers: int = 1
) -> tuple[R, tuple[float, ...]]:
    """``run(i)`` for ``i < attempts`` (``workers`` at a time); the run with the highest objective
    (the earliest on ties) and every run's objective, in attempt order. Only the best run so far is
    kept alive, so memory holds at most ``workers + 1`` runs."""
    if attempts < 1:
        raise ValueError(f"restarts must be >= 1, got {attempts}")
    pool = ThreadPoolExecutor(min(workers, attempts), thread_name_prefix="permerge-restart") if workers > 1 else None
    try:
        runs = pool.map(run, range(attempts)) if pool else map(run, range(attempts))
        best: R | None = None
        values: list[float] = []
        for r in runs:
            values.append(objective(r))
            if best is None or values[-1] > max(values[:-1]):
                best = r
    finally:
        if pool is not None:
            pool.shutdown(wait=True)
    assert best is not None
    return best, tuple(values)
