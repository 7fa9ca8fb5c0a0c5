"""Straight-through estimator matching (Git Re-Basin §3.3): learn the permutation with a loss.

Weight matching ignores data; STE uses it. A free copy θ̃ of B's weights is trained so that the
midpoint ½(θ_A + π(θ_B)) has low loss, where π is the permutation of B nearest to θ̃ (found by
weight matching of θ̃ against θ_B). The forward pass uses the projected π(θ_B); the backward pass
treats it as θ̃ (the straight-through trick), so gradients reach θ̃.
"""

from __future__ import annotations

import copy
import itertools
import logging
import sys
import time
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn
from torch.func import functional_call
from tqdm.auto import tqdm

from permerge.apply import apply_permutation
from permerge.errors import PermergeError
from permerge.evaluate import logits
from permerge.match.weight import weight_matching
from permerge.permutation import Permutation
from permerge.spec import PermutationSpec

LOG = logging.getLogger(__name__)

__all__ = ["SteMatchingResult", "ste_matching"]


@dataclass(frozen=True)
class SteMatchingResult:
    permutation: Permutation
    steps: int
    losses: tuple[float, ...]  # midpoint loss at every step
    seconds: float


def _pair(batch: Any) -> tuple[Any, Any]:
    if isinstance(batch, (tuple, list)) and len(batch) >= 2:
        return batch[0], batch[1]
    raise PermergeError("STE matching needs (inputs, targets) batches to compute a loss")


def ste_matching(
    spec: PermutationSpec,
    model_a: nn.Module,
    model_b: nn.Module,
    data: Iterable[Any],
    loss_fn: Callable[[Any, Any], torch.Tensor] = nn.functional.cross_entropy,
    *,
    steps: int = 100,
    lr: float = 1e-3,
    seed: int = 0,
    batch_fn: Callable[[Any], tuple[Any, Any]] = _pair,
    quiet: bool = False,
) -> SteMatchingResult:
    """Learn B's permutation by training the midpoint's loss, starting from weight matching.

    ``data`` yields ``(inputs, targets)`` batches (cycled for ``steps`` steps); ``loss_fn(out,
    targets)`` scores ``model_a``'s architecture run with the midpoint weights. Neither model is
    modified. Returns the permutation nearest to the trained weights.
    """
    start = time.perf_counter()
    torch.manual_seed(seed)
    sd_a = {k: v.detach() for k, v in model_a.state_dict().items()}
    sd_b = {k: v.detach() for k, v in model_b.state_dict().items()}
    perm = weight_matching(spec, sd_a, sd_b, seed=seed, quiet=True).permutation
    params = {k for k, _ in model_b.named_parameters()}  # buffers (BN statistics) are not trained
    trainable = [k for k in spec.keys if k in params]
    param_spec = spec.restricted_to(trainable)
    projected = apply_permutation(spec, perm, sd_b)
    tilde = {k: projected[k].clone().float().requires_grad_(True) for k in trainable}
    opt = torch.optim.Adam(tilde.values(), lr=lr)
    net = copy.deepcopy(model_a).train()
    losses: list[float] = []
    batches = itertools.cycle(data)
    for step in tqdm(range(steps), desc="STE", disable=quiet or not sys.stderr.isatty()):
        x, y = batch_fn(next(batches))
        detached = {k: v.detach() for k, v in tilde.items()}
        perm = _project(param_spec, detached, sd_b, trainable, perm)
        projected = apply_permutation(spec, perm, sd_b)
        # integer buffers are copies: BatchNorm in train mode increments num_batches_tracked in place
        mid = {k: 0.5 * (sd_a[k] + projected[k]) if sd_a[k].is_floating_point() else sd_a[k].clone() for k in sd_a}
        for k in trainable:  # value of π(θ_B), gradient of θ̃
            mid[k] = 0.5 * (sd_a[k] + projected[k] + (tilde[k] - tilde[k].detach()))
        loss = loss_fn(logits(functional_call(net, mid, (x,))), y)
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(float(loss.detach()))
        if step % 10 == 0:
            LOG.info("STE step %d: midpoint loss %.4f", step, losses[-1])
    detached = {k: v.detach() for k, v in tilde.items()}
    perm = _project(param_spec, detached, sd_b, trainable, perm)
    return SteMatchingResult(perm, steps, tuple(losses), time.perf_counter() - start)


def _project(spec: PermutationSpec, tilde: Mapping[str, torch.Tensor], sd_b: Mapping[str, torch.Tensor],
             keys: list[str], perm: Permutation) -> Permutation:  # fmt: skip
    """The permutation of B nearest to θ̃ (weight matching of θ̃ against θ_B)."""
    found = weight_matching(spec, tilde, {k: sd_b[k] for k in keys}, init={g.name: perm[g.name] for g in spec.groups}, quiet=True)
    return {**perm, **found.permutation}
