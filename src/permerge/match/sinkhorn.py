"""Sinkhorn re-basin (Peña et al., CVPR 2023): learn soft permutations on the loss along the path.

Each group gets a score matrix ``S_g``; its soft permutation is ``P_g = sinkhorn(S_g, τ)``, a doubly
stochastic matrix that acts on B's weights through the spec's layouts (heads, flatten blocks,
concatenation slices: :mod:`permerge.match.soft`). The scores are trained with Adam on the task loss
of ``(1-α)·θ_A + α·P(θ_B)`` at a uniformly random ``α`` per step (the paper's random-point loss;
``alpha=0.5`` trains the midpoint), gradients reaching ``S`` by implicit differentiation of the
Sinkhorn fixed point. The temperature ``τ`` falls geometrically from ``tau[0]`` to ``tau[1]``, so
the soft matrices harden towards the permutation that will be used. A permutation is read off
``S`` by one linear assignment per group at a few checkpoints; the best of them and of the
weight-matching start, by midpoint loss on fixed selection batches, is returned
(:mod:`permerge.match.learned`).

Departures from the paper, for reasons measured in docs/benchmarks.md: the scores start at weight
matching's cost matrices (each group's ``⟨A's unit i, B's unit j⟩`` with the other groups at weight
matching's optimum, divided by its standard deviation) rather than at the identity plus noise, so
the rounded start *is* weight matching's permutation and the soft one is its entropic relaxation;
and the temperature is annealed rather than fixed.
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Callable, Iterable, Mapping
from typing import Any

import torch
from torch import nn

from permerge.apply import apply_permutation
from permerge.match import lap
from permerge.match.learned import Batch, LearnedMatchingResult, PathLoss, Selection, batches_of, cycle, pair
from permerge.match.soft import as_matrix, gradient, sinkhorn, soft_apply
from permerge.match.weight import weight_matching
from permerge.permutation import Permutation
from permerge.progress import progress
from permerge.spec import PermutationSpec

LOG = logging.getLogger(__name__)

__all__ = ["sinkhorn_matching"]


def sinkhorn_matching(
    spec: PermutationSpec,
    model_a: nn.Module,
    model_b: nn.Module,
    data: Iterable[Any],
    loss_fn: Callable[[Any, Any], torch.Tensor] = nn.functional.cross_entropy,
    *,
    steps: int = 200,
    lr: float = 0.1,
    batches: int | None = None,
    select_batches: int = 4,
    alpha: float | None = None,
    tau: tuple[float, float] = (0.5, 0.05),
    checkpoints: int = 5,
    sinkhorn_iters: int = 20,
    init: Mapping[str, torch.Tensor] | str | None = None,
    seed: int = 0,
    backend: str = "auto",
    batch_fn: Callable[[Any], Batch] = pair,
    quiet: bool = False,
) -> LearnedMatchingResult:
    """Learn B's permutation as annealed Sinkhorn soft permutations trained on the path's loss.

    Args:
        spec: the groups to permute (every layout the tracer produces).
        model_a, model_b: same architecture; neither is modified.
        data: ``(inputs, targets)`` batches (training data).
        loss_fn: ``loss_fn(logits, targets)``, scored on A's architecture with interpolated weights.
        steps: Adam steps on the scores, cycling through the batches in a seeded order.
        lr: Adam's learning rate on the scores (in units of ``τ·log`` odds).
        batches: how many batches of ``data`` to train on (default: all).
        select_batches: the first this many of those batches score the candidate permutations.
        alpha: the point of the path trained on, or None (default) for a uniformly random one per step.
        tau: start and end temperature, annealed geometrically (scores are in units of the
            weight-matching costs' standard deviation).
        checkpoints: how many times (evenly spaced, the last at the end) a hard permutation is read
            off the scores and scored.
        sinkhorn_iters: Sinkhorn iterations per step at most (stopping early once every row sums to
            1 within 1e-3); 20, as in the paper.
        init: weight matching's start for the first permutation (see
            :func:`~permerge.match.weight.weight_matching`; ``"anneal"`` for its annealed start).
        seed: seeds weight matching, the batch order and the random ``α``.
        backend: LAP backend for the rounding, see :func:`permerge.match.lap.solve`.
        batch_fn: turns a batch into ``(inputs, targets)``.
        quiet: hide the progress bar (shown only when stderr is a terminal).
    """
    start = time.perf_counter()
    if steps < 0 or not lr > 0 or checkpoints < 1:
        raise ValueError(f"steps must be >= 0, lr > 0 and checkpoints >= 1, got {steps}, {lr} and {checkpoints}")
    if not (tau[0] > 0 and tau[1] > 0):
        raise ValueError(f"temperatures must be positive, got tau={tau}")
    backend = lap.resolve_backend(backend)
    train = batches_of(data, batches, batch_fn)
    sd_b = {k: v.detach() for k, v in model_b.state_dict().items()}
    params = {k for k, _ in model_b.named_parameters()}
    param_spec = spec.restricted_to(k for k in spec.keys if k in params and sd_b[k].is_floating_point())
    path = PathLoss(model_a, loss_fn)
    selection = Selection(spec, sd_b, path, train[:select_batches])
    start_perm = weight_matching(spec, path.sd_a, sd_b, seed=seed, init=init, backend=backend, quiet=True).permutation
    selection.consider(start_perm)
    fixed = apply_permutation(spec, start_perm, sd_b)  # buffers: train-mode BN ignores them, the rest is soft
    scores = _start(param_spec, path.sd_a, sd_b, start_perm)
    opt = torch.optim.Adam(scores.values(), lr=lr)
    gen = torch.Generator().manual_seed(seed)
    order = cycle(train, seed)
    marks = {round(steps * (i + 1) / checkpoints) for i in range(checkpoints)}
    losses: list[float] = []
    for step in progress(range(1, steps + 1), desc="Sinkhorn", quiet=quiet):
        t = tau[0] * (tau[1] / tau[0]) ** ((step - 1) / max(steps - 1, 1))
        soft = {g: sinkhorn(s, t, iters=sinkhorn_iters, tol=1e-3) for g, s in scores.items()}
        a = alpha if alpha is not None else float(torch.rand((), generator=gen))
        loss = path({**fixed, **soft_apply(param_spec, soft, sd_b)}, next(order), a)
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(float(loss.detach()))
        if not math.isfinite(losses[-1]):
            raise FloatingPointError(f"Sinkhorn matching: loss became {losses[-1]} at step {step}; lower lr")
        if step in marks:
            selection.consider({**start_perm, **{g: lap.solve(s.detach(), backend=backend) for g, s in scores.items()}})
        LOG.debug("Sinkhorn step %d (tau %.3g): loss %.4f", step, t, losses[-1])
    return selection.result("Sinkhorn", losses, start)


def _start(spec: PermutationSpec, sd_a: dict[str, torch.Tensor], sd_b: dict[str, torch.Tensor],
           init: Permutation) -> dict[str, torch.Tensor]:  # fmt: skip
    """Each group's weight-matching cost at ``init`` (the gradient of ``⟨A, P·B⟩``), in units of its std."""
    thetas = [{k: sd[k].float() for k in spec.keys} for sd in (sd_a, sd_b)]
    free = [g.name for g in spec.groups if g.size > 1]
    _, (costs,) = gradient(spec, thetas, [{}, {g: as_matrix(init[g]) for g in free}])
    return {g: (c / c.std().clamp_min(1e-30)).requires_grad_(True) for g, c in costs.items()}
