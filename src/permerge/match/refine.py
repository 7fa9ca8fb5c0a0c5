"""Learned refinement of dense maps: gradient steps on the loss of the line between A and B.

Orthogonal and invertible maps form continuous groups, so the matched maps can be improved by
descent on the task loss of ``(1-α)·θ_A + α·T(θ_B)`` itself, as STE does for permutations (Git
Re-Basin §3.3) but without a straight-through estimator: each dense group's map is ``M₀·exp(S)``
with ``M₀`` the matcher's answer and ``S`` learned (skew-symmetric for orthogonal groups, so the map
stays orthogonal; with the all-ones direction projected out under LayerNorm, so it keeps that
direction; any matrix for invertible groups). Permutations and scales stay as matched. Every
checkpoint is scored on fixed selection batches at ``α = ½`` and the best map (the matcher's own
included) is returned, so refinement never returns a worse midpoint loss on those batches, which are
held out from the training steps (the maps have enough freedom to fit the batches they train on).
The network runs in eval mode: dense groups never touch BatchNorm, and dropout would only add noise.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Iterable, Mapping
from typing import Any

import torch
from torch import nn

from permerge.apply import apply_transform
from permerge.errors import PermergeError
from permerge.match.learned import PathLoss, batches_of, cycle, pair
from permerge.progress import progress
from permerge.spec import ORTHOGONAL, PermutationSpec
from permerge.transform import LinearMap, Transform

LOG = logging.getLogger(__name__)

__all__ = ["refine_transform"]


def refine_transform(
    spec: PermutationSpec,
    model_a: nn.Module,
    sd_b: Mapping[str, torch.Tensor],
    transform: Transform,
    classes: Mapping[str, str],
    data: Iterable[Any],
    loss_fn: Callable[[Any, Any], torch.Tensor] = nn.functional.cross_entropy,
    *,
    steps: int = 200,
    lr: float = 1e-2,
    batches: int | None = None,
    select_batches: int = 4,
    every: int = 20,
    alpha: float | None = 0.5,
    keep_ones: Iterable[str] = (),
    seed: int = 0,
    quiet: bool = False,
) -> tuple[Transform, dict[str, Any]]:
    """Refine ``transform``'s dense maps (see the module docstring); returns the best transform and
    ``{"steps", "start_loss", "best_loss", "seconds"}`` (selection losses at ``α = ½``).

    The first ``select_batches`` of the ``batches`` taken from ``data`` score checkpoints; the rest
    train. ``classes`` is the class each group was matched in. ``model_a`` and ``sd_b`` are A and B as the transform sees them (norm gains folded where the
    dense groups need it, :mod:`permerge.reparam`); neither is modified. ``alpha`` is the point of
    the path trained on, or None for a uniformly random one per step.
    """
    if steps < 0 or lr <= 0 or every < 1:
        raise ValueError(f"refinement needs steps >= 0, lr > 0, every >= 1; got {steps}, {lr}, {every}")
    t0 = time.perf_counter()
    given = batches_of(data, batches, pair)
    if len(given) <= select_batches:
        raise PermergeError(f"refinement needs more than select_batches={select_batches} batches (held out to score "
                            f"checkpoints); got {len(given)}")  # fmt: skip
    selection, train = given[:select_batches], given[select_batches:]
    path = PathLoss(model_a, loss_fn)
    path.net.eval()  # dense groups never touch BatchNorm (its statistics allow permutations only): no dropout noise
    ones = set(keep_ones)
    dense = {n: t for n, t in transform.items() if isinstance(t, LinearMap)}
    logs = {n: torch.zeros_like(t.matrix, requires_grad=True) for n, t in dense.items()}

    def current() -> Transform:
        out = dict(transform)
        for name, s in logs.items():
            out[name] = LinearMap(dense[name].matrix @ torch.linalg.matrix_exp(_generator(classes[name], s, name in ones)))
        return out

    def score(t: Transform) -> float:
        theta_b = apply_transform(spec, t, sd_b)
        with torch.no_grad():
            return sum(float(path(theta_b, b, 0.5)) for b in selection) / len(selection)

    best, best_loss = dict(transform), score(transform)
    start_loss = best_loss
    opt = torch.optim.Adam(list(logs.values()), lr=lr)
    gen = torch.Generator().manual_seed(seed)
    order = cycle(train, seed)
    for step in progress(range(steps), desc="refining maps", quiet=quiet):
        batch = next(order)
        a = alpha if alpha is not None else float(torch.rand((), generator=gen))
        loss = path(apply_transform(spec, current(), sd_b), batch, a)
        opt.zero_grad()
        loss.backward()
        opt.step()
        if (step + 1) % every == 0 or step + 1 == steps:
            with torch.no_grad():
                t = {n: LinearMap(m.matrix.detach()) if isinstance(m, LinearMap) else m for n, m in current().items()}
            loss_now = score(t)
            if loss_now < best_loss:
                best, best_loss = t, loss_now
    LOG.info("refined %d dense maps in %d steps: selection loss %.4f -> %.4f", len(dense), steps, start_loss, best_loss)
    return best, {"steps": steps, "start_loss": start_loss, "best_loss": best_loss, "seconds": time.perf_counter() - t0}


def _generator(symmetry: str, s: torch.Tensor, keep_ones: bool) -> torch.Tensor:
    """The Lie-algebra element a learned ``s`` stands for: skew-symmetric for orthogonal groups
    (annihilating the all-ones vector when it must be kept), ``s`` itself for invertible ones."""
    if symmetry != ORTHOGONAL:
        return s
    skew = s - s.transpose(-1, -2)
    if not keep_ones:
        return skew
    n = s.shape[-1]
    proj = torch.eye(n, dtype=s.dtype) - torch.full((n, n), 1.0 / n, dtype=s.dtype)
    return proj @ skew @ proj

