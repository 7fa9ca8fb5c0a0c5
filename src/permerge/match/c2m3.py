"""C2M3 (Crisostomi et al., NeurIPS 2024): cycle-consistent matching of N models through a universe.

Each model ``i`` gets one permutation ``π_i`` per group mapping its units into a shared *universe*;
the permutation between two models is then ``P_ij = π_i⁻¹ ∘ π_j``, so every cycle composes to the
identity by construction (``P_ij = P_ik ∘ P_kj``). The ``π_i`` maximise the sum of *all* pairwise
weight-matching objectives at once,

    f(π) = Σ_{i<j} ⟨π_i θ_i, π_j θ_j⟩ = ½ (‖Σ_i π_i θ_i‖² − Σ_i ‖π_i θ_i‖²),

optimised by Frank–Wolfe over doubly stochastic relaxations of the ``π_i``: the gradient of ``f``
with respect to each relaxed ``π_i^g`` is a cost matrix, its linear assignment is the FW vertex,
and the step to it is chosen by an exact line search (``f`` is a polynomial in the step size, of
degree twice the largest number of groups on one tensor, so a few samples determine it). The
relaxed optimum is projected onto permutations by one assignment per group. Model 0's basis is the
universe (``π_0 = id``): any common permutation of all ``π_i`` leaves ``f`` unchanged, so this
loses nothing and makes the merged model comparable to model 0.

Departures from the paper's code, both measured in docs/benchmarks.md: the stopping rule is
Frank–Wolfe's duality gap (``⟨∇f, V − π⟩ ≤ tol·|f|``, a certificate of stationarity) or a step of
zero, not a patience counter; the soft matrices act through every layout the tracer produces
(heads, flatten blocks, concatenation slices) via :mod:`permerge.match.soft`.
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import numpy as np
import torch

from permerge.match import lap
from permerge.match.soft import Relaxed, as_matrix, gradient, universe_objective
from permerge.match.weight import check_matchable
from permerge.permutation import Permutation, check_permutation, compose, identity, inverse
from permerge.progress import progress
from permerge.spec import PermutationSpec

LOG = logging.getLogger(__name__)

__all__ = ["C2M3Result", "c2m3_matching", "pairwise"]



@dataclass(frozen=True)
class C2M3Result:
    """What :func:`c2m3_matching` found.

    Attributes:
        permutations: per model, the permutation into the universe (model 0's basis; its own is the
            identity): ``apply_permutation(spec, permutations[i], sd_i)`` is model ``i`` there.
        iterations: Frank–Wolfe iterations run.
        converged: whether the stopping rule (duality gap or a zero step) fired before ``max_iter``.
        objectives: the relaxed objective ``f`` after each iteration.
        objective_before / objective_after: ``f`` of the models as given / of the returned
            permutations (hard, after projection).
        seconds: wall time.
    """

    permutations: tuple[Permutation, ...]
    iterations: int
    converged: bool
    objectives: tuple[float, ...]
    objective_before: float
    objective_after: float
    seconds: float


def c2m3_matching(
    spec: PermutationSpec,
    state_dicts: Sequence[Mapping[str, torch.Tensor]],
    *,
    max_iter: int = 100,
    tol: float = 1e-4,
    init: Sequence[Mapping[str, torch.Tensor]] | None = None,
    backend: str = "auto",
    dtype: torch.dtype = torch.float32,
    quiet: bool = False,
) -> C2M3Result:
    """Cycle-consistent permutations of N models into one universe (see the module docstring).

    Args:
        spec: the groups to permute.
        state_dicts: two or more state dicts of one architecture; none is modified.
        max_iter: stop after this many Frank–Wolfe iterations (``converged`` is then False).
        tol: stop when the duality gap is at most ``tol`` times ``|f|`` (on three 3x512 MLPs the
            objective is within 0.1% of its limit after ~30 of the 67 iterations tol=1e-6 takes).
        init: starting permutations into the universe, one per model (``init[0]`` must be the
            identity); default: every model as given (the identity, C2M3's default start).
        backend: LAP backend, see :func:`permerge.match.lap.solve`.
        dtype: precision of the relaxed matrices and of the objective's evaluation.
        quiet: hide the progress bar (shown only when stderr is a terminal).

    Returns:
        A :class:`C2M3Result`; :func:`pairwise` gives the permutation between any two models.
    """
    start = time.perf_counter()
    if len(state_dicts) < 2:
        raise ValueError(f"C2M3 needs at least 2 models, got {len(state_dicts)}")
    check_matchable(spec, state_dicts, [f"model {i}" for i in range(len(state_dicts))])
    if max_iter < 0 or not tol >= 0:
        raise ValueError(f"max_iter must be >= 0 and tol >= 0, got {max_iter} and {tol}")
    backend = lap.resolve_backend(backend)
    thetas = [{k: sd[k].detach().to(dtype) for k in spec.keys} for sd in state_dicts]
    free = [g for g in spec.groups if g.size > 1]
    relaxed = _start(spec, free, len(thetas), init, dtype)
    degree = 2 * max((sum(g in {f.name for f in free} for g, _ in spec.axes_of(k)) for k in spec.keys), default=1)
    with torch.no_grad():
        before = universe_objective(spec, thetas, relaxed).item()
    objectives: list[float] = []
    converged, it = False, 0
    for it in progress(range(1, max_iter + 1), desc="C2M3", quiet=quiet):
        value, grads = gradient(spec, thetas, relaxed)
        vertex = [{g: as_matrix(lap.solve(gr, backend=backend), dtype) for g, gr in grad.items()} for grad in grads]
        gap = sum(float((grad[g] * (v[g] - r[g])).sum()) for grad, v, r in zip(grads, vertex, relaxed[1:]) for g in grad)
        step, new = _line_search(spec, thetas, relaxed, vertex, degree, value)
        # Stopping rule: Frank–Wolfe's duality gap bounds the first-order gain of any feasible move;
        # once it is below tol·|f| (or the best step is 0: no ascent along the vertex) we are stationary.
        if gap <= tol * abs(value) or step == 0.0:
            objectives.append(value)
            converged = True
            break
        relaxed = [relaxed[0]] + [{g: r[g] + step * (v[g] - r[g]) for g in r} for r, v in zip(relaxed[1:], vertex)]
        objectives.append(new)
        LOG.info("C2M3 iteration %d: objective %.6g, step %.3g, gap %.3g", it, new, step, gap)
    perms = tuple(
        identity(spec) if i == 0 else {**identity(spec), **{g: lap.solve(m, backend=backend) for g, m in r.items()}}
        for i, r in enumerate(relaxed)
    )
    with torch.no_grad():
        after = universe_objective(spec, thetas, [{g.name: as_matrix(p[g.name], dtype) for g in free} for p in perms]).item()
    seconds = time.perf_counter() - start
    LOG.info("C2M3: %d models, objective %.6g -> %.6g in %d iterations (%.2f s, %s)", len(thetas), before, after,
             it, seconds, "converged" if converged else "max_iter reached")  # fmt: skip
    return C2M3Result(perms, it, converged, tuple(objectives), before, after, seconds)


def pairwise(permutations: Sequence[Mapping[str, torch.Tensor]], i: int, j: int) -> Permutation:
    """The permutation taking model ``j`` into model ``i``'s basis: ``π_i⁻¹ ∘ π_j``.

    Example:
        >>> p = [{"g": torch.tensor([0, 1, 2])}, {"g": torch.tensor([2, 0, 1])}]
        >>> pairwise(p, 0, 1)["g"].tolist()
        [2, 0, 1]
    """
    return compose(inverse(permutations[i]), permutations[j])


def _start(spec: PermutationSpec, free: list, n: int, init: Sequence[Mapping[str, torch.Tensor]] | None,
           dtype: torch.dtype) -> list[Relaxed]:  # fmt: skip
    if init is None:
        return [{}] + [{g.name: torch.eye(g.size, dtype=dtype) for g in free} for _ in range(n - 1)]
    if len(init) != n:
        raise ValueError(f"init holds {len(init)} permutations for {n} models")
    for p in init:
        check_permutation(spec, p)
    if any(not torch.equal(p[g.name], torch.arange(g.size)) for g in free if g.name in init[0] for p in init[:1]):
        raise ValueError("init[0] must be the identity: model 0's basis is the universe")
    return [{}] + [{g.name: as_matrix(p.get(g.name, torch.arange(g.size)), dtype) for g in free} for p in init[1:]]


def _line_search(spec: PermutationSpec, thetas: Sequence[Mapping[str, torch.Tensor]], relaxed: list[Relaxed],
                 vertex: list[Relaxed], degree: int, value: float) -> tuple[float, float]:  # fmt: skip
    """The step ``t ∈ [0, 1]`` maximising ``f`` on the segment to ``vertex``, and ``f`` there.

    ``f`` is a polynomial of degree ``degree`` in ``t``: interpolated exactly from ``degree + 1``
    Chebyshev samples, then maximised on a fine grid; 0 if nothing beats the current point.
    """
    ts = 0.5 * (1 - np.cos(np.pi * (2 * np.arange(degree + 1) + 1) / (2 * (degree + 1))))
    with torch.no_grad():
        fs = [
            universe_objective(spec, thetas, [relaxed[0]] + [{g: r[g] + t * (v[g] - r[g]) for g in r}
                                                             for r, v in zip(relaxed[1:], vertex)]).item()
            for t in ts
        ]  # fmt: skip
    poly = np.polynomial.Polynomial.fit(ts, fs, degree)
    grid = np.linspace(0.0, 1.0, 1001)
    vals = poly(grid)
    best = int(np.argmax(vals))
    if vals[best] <= value + 1e-12 * max(1.0, abs(value)) or not math.isfinite(vals[best]):
        return 0.0, value
    return float(grid[best]), float(vals[best])

