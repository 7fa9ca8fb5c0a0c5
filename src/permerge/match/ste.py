"""Straight-through estimator matching (Git Re-Basin §3.3, Algorithm 2): learn the permutation
from the loss of the merged model.

Weight matching ignores data; STE uses it. A free copy ``θ̃`` of B's weights starts at ``θ_A`` (as
in the paper) and is trained so that the midpoint ``½(θ_A + π(θ_B))`` has low loss, where ``π`` is
the permutation of B nearest ``θ̃`` (weight matching of ``θ̃`` against ``θ_B``, warm-started from the
previous step's). The forward pass uses the projected ``π(θ_B)``; the backward pass treats it as
``θ̃`` (the straight-through trick), so gradients reach ``θ̃``. The first projection is plain weight
matching of A and B; as ``θ̃`` leaves ``θ_A``, the projection moves to permutations with a lower
merged loss. Every permutation visited is scored on fixed selection batches and the best is
returned (see :mod:`permerge.match.learned`), as the paper keeps its best permutation.

Pass ``alpha=None`` to train on a uniformly random point of the path per step instead of the
midpoint (Sinkhorn re-basin's variant).
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Iterable, Mapping
from typing import Any

import torch
from torch import nn

from permerge.apply import apply_permutation
from permerge.match.learned import Batch, LearnedMatchingResult, PathLoss, Selection, batches_of, cycle, pair
from permerge.match.weight import weight_matching
from permerge.progress import progress
from permerge.spec import PermutationSpec

LOG = logging.getLogger(__name__)

__all__ = ["SteMatchingResult", "ste_matching"]

SteMatchingResult = LearnedMatchingResult  # the name before Sinkhorn matching shared it


def ste_matching(
    spec: PermutationSpec,
    model_a: nn.Module,
    model_b: nn.Module,
    data: Iterable[Any],
    loss_fn: Callable[[Any, Any], torch.Tensor] = nn.functional.cross_entropy,
    *,
    steps: int = 200,
    lr: float = 1e-3,
    batches: int | None = None,
    select_batches: int = 4,
    alpha: float | None = 0.5,
    init: Mapping[str, torch.Tensor] | str | None = None,
    seed: int = 0,
    batch_fn: Callable[[Any], Batch] = pair,
    quiet: bool = False,
) -> LearnedMatchingResult:
    """Learn B's permutation by training the merged model's loss through a straight-through estimator.

    Args:
        spec: the groups to permute.
        model_a, model_b: same architecture; neither is modified.
        data: ``(inputs, targets)`` batches (training data).
        loss_fn: ``loss_fn(logits, targets)``, scored on A's architecture with the merged weights.
        steps: optimisation steps (Adam on ``θ̃``), cycling through the batches in a seeded order.
        lr: Adam's learning rate; ``θ̃`` moves about ``lr`` per weight per step, so it should be
            a small fraction of the weights' scale.
        batches: how many batches of ``data`` to train on (default: all).
        select_batches: the first this many of those batches score the candidate permutations.
        alpha: the point of the path trained on (``½``: the midpoint), or None for a uniformly
            random one per step.
        init: weight matching's start for the first permutation (see
            :func:`~permerge.match.weight.weight_matching`; ``"anneal"`` for its annealed start).
        seed: seeds weight matching's visit order and the batch order.
        batch_fn: turns a batch into ``(inputs, targets)``.
        quiet: hide the progress bar (shown only when stderr is a terminal).
    """
    start = time.perf_counter()
    if steps < 0 or not lr > 0:
        raise ValueError(f"steps must be >= 0 and lr > 0, got {steps} and {lr}")
    train = batches_of(data, batches, batch_fn)
    sd_b = {k: v.detach() for k, v in model_b.state_dict().items()}
    params = {k for k, _ in model_b.named_parameters()}  # buffers (BN statistics) are not trained
    trainable = [k for k in spec.keys if k in params and sd_b[k].is_floating_point()]
    param_spec = spec.restricted_to(trainable)
    path = PathLoss(model_a, loss_fn)
    selection = Selection(spec, sd_b, path, train[:select_batches])
    perm = weight_matching(spec, path.sd_a, sd_b, seed=seed, init=init, quiet=True).permutation
    selection.consider(perm)
    tilde = {k: path.sd_a[k].clone().float().requires_grad_(True) for k in trainable}  # θ̃ starts at θ_A
    opt = torch.optim.Adam(tilde.values(), lr=lr)
    gen = torch.Generator().manual_seed(seed)
    order = cycle(train, seed)
    losses: list[float] = []
    for step in progress(range(steps + 1), desc="STE", quiet=quiet):
        found = weight_matching(param_spec, {k: v.detach() for k, v in tilde.items()}, {k: sd_b[k] for k in trainable},
                                seed=seed + step, init={g: perm[g] for g in param_spec.names}, quiet=True)  # fmt: skip
        perm = {**perm, **found.permutation}
        selection.consider(perm)
        if step == steps:  # the last update's projection is scored too
            break
        projected = apply_permutation(spec, perm, sd_b)
        for k in trainable:  # the value of π(θ_B), the gradient of θ̃
            projected[k] = projected[k] + (tilde[k] - tilde[k].detach())
        a = alpha if alpha is not None else float(torch.rand((), generator=gen))
        loss = path(projected, next(order), a)
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(float(loss.detach()))
        LOG.debug("STE step %d: loss %.4f", step, losses[-1])
    return selection.result("STE", losses, start)
