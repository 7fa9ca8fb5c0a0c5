"""An annealed, Sinkhorn-relaxed start for weight matching (softassign, Gold & Rangarajan 1996).

Coordinate descent moves one group at a time to its best assignment given the others, so it
settles in the first local optimum its start and visit order lead to; on deep nets these differ
widely (measured in docs/benchmarks.md, where float32 costs and the tolerance turned out not to
matter: a float64 descent reaches the same optima). Here every group is relaxed to a doubly
stochastic matrix, all start uniform, and all are updated together to the entropic optimum of
their current cost, ``P_g ← sinkhorn(C_g(P) / (τ·std C_g))``, while the temperature ``τ`` falls
geometrically: at high ``τ`` the objective is smooth and information spreads from the frozen
input and output layers through the net, at low ``τ`` the matrices harden. The result is rounded
by one assignment per group; weight matching's descent then polishes it. Deterministic (no seed),
and it costs ``steps`` evaluations of all cost matrices plus Sinkhorn iterations on dense
``n × n`` matrices: meant for models whose groups have at most a few thousand units.
"""

from __future__ import annotations

from collections.abc import Mapping

import torch

from permerge.match import lap
from permerge.match.soft import gradient, sinkhorn
from permerge.permutation import Permutation, identity
from permerge.spec import PermutationSpec

__all__ = ["annealed_start"]


def annealed_start(
    spec: PermutationSpec,
    a: Mapping[str, torch.Tensor],
    b: Mapping[str, torch.Tensor],
    *,
    steps: int = 40,
    tau: tuple[float, float] = (1.0, 0.01),
    backend: str = "auto",
) -> Permutation:
    """The rounded end of the annealing (see the module docstring); ``a`` and ``b`` hold the spec's tensors."""
    if steps < 1 or not (tau[0] > 0 and tau[1] > 0):
        raise ValueError(f"annealing needs steps >= 1 and positive temperatures, got {steps} and {tau}")
    thetas = [{k: t.float() for k, t in sd.items()} for sd in (a, b)]
    mats = {g.name: torch.full((g.size, g.size), 1.0 / g.size) for g in spec.groups if g.size > 1}
    for step in range(steps):
        t = tau[0] * (tau[1] / tau[0]) ** (step / max(steps - 1, 1))
        _, (costs,) = gradient(spec, thetas, [{}, mats])
        mats = {g: sinkhorn(c / c.std().clamp_min(1e-30), t, iters=20, tol=1e-3).detach() for g, c in costs.items()}
    return {**identity(spec), **{g: lap.solve(m, backend=backend) for g, m in mats.items()}}
