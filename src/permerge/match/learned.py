"""What the learned matchers (STE, Sinkhorn re-basin) share: the loss on the line between A and B,
the data they cycle through, and the choice among the hard permutations they visit.

Both train a stand-in for B's permutation on the task loss of ``(1-α)·θ_A + α·θ_B'`` (``α = ½``,
or uniform at random per step) and end with a hard permutation. Gradient steps on a batch loss can
end on a permutation worse than where they started, so every candidate (the weight-matching start
included) is scored on the same fixed *selection* batches at ``α = ½`` and the best is returned: a
learned matcher never returns a permutation whose midpoint loss on those batches is higher than
weight matching's.

The loss runs the network in train mode: BatchNorm then normalises with batch statistics, which
is what a merged model gets after a BN reset (its interpolated running statistics are meaningless).
Running statistics the forward pass updates are written into fresh copies; the models given are
never modified (their BatchNorm counters included).
"""

from __future__ import annotations

import copy
import itertools
import logging
import time
from collections.abc import Callable, Iterable, Iterator, Mapping
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn
from torch.func import functional_call

from permerge.apply import apply_permutation
from permerge.batches import as_call, call_kwargs, inputs_of, targets_of
from permerge.errors import PermergeError
from permerge.evaluate import logits
from permerge.permutation import Permutation
from permerge.spec import PermutationSpec

LOG = logging.getLogger(__name__)

__all__ = ["LearnedMatchingResult", "PathLoss", "Selection", "batches_of", "cycle", "pair"]

Batch = tuple[Any, Any]


def pair(batch: Any) -> Batch:
    """``(inputs, targets)`` of a batch (:mod:`permerge.batches`); an error if it has no targets."""
    targets = targets_of(batch)
    if targets is None:
        raise PermergeError("learned matching needs (inputs, targets) batches to compute a loss")
    return inputs_of(batch), targets


def batches_of(data: Iterable[Any], batches: int | None, batch_fn: Callable[[Any], Batch]) -> list[Batch]:
    """The first ``batches`` batches of ``data`` (all if None), as ``(inputs, targets)``; at least one."""
    if batches is not None and batches < 1:
        raise ValueError(f"batches must be >= 1, got {batches}")
    out = [batch_fn(b) for b in itertools.islice(data, batches)]
    if not out:
        raise PermergeError("learned matching got no data: pass data=... with at least one (inputs, targets) batch")
    return out


def cycle(batches: list[Batch], seed: int) -> Iterator[Batch]:
    """The batches in a fresh seeded order every pass."""
    gen = torch.Generator().manual_seed(seed)
    while True:
        for i in torch.randperm(len(batches), generator=gen).tolist():
            yield batches[i]


@dataclass(frozen=True)
class LearnedMatchingResult:
    """What a learned matcher (:func:`~permerge.match.ste.ste_matching`,
    :func:`~permerge.match.sinkhorn.sinkhorn_matching`) found.

    Attributes:
        permutation: the best permutation visited (lowest midpoint loss on the selection batches).
        steps: optimisation steps run.
        losses: the training loss at every step.
        start_loss / best_loss: selection loss of weight matching's permutation (the start) / of
            the returned one.
        visited: distinct permutations scored.
        seconds: wall time.
    """

    permutation: Permutation
    steps: int
    losses: tuple[float, ...]
    start_loss: float
    best_loss: float
    visited: int
    seconds: float


class PathLoss:
    """``loss_fn`` of A's architecture at ``(1-α)·θ_A + α·θ_B'`` for a given ``θ_B'`` (a full state dict)."""

    def __init__(self, model_a: nn.Module, loss_fn: Callable[[Any, Any], torch.Tensor]) -> None:
        self.net = copy.deepcopy(model_a).train()
        self.sd_a = {k: v.detach() for k, v in model_a.state_dict().items()}
        self.loss_fn = loss_fn
        self.kwargs = call_kwargs(model_a)

    def __call__(self, theta_b: Mapping[str, torch.Tensor], batch: Batch, alpha: float) -> torch.Tensor:
        point = {
            k: (1 - alpha) * a + alpha * theta_b[k] if a.is_floating_point() else a.clone()  # fresh: BN writes into it
            for k, a in self.sd_a.items()
        }
        inputs, targets = batch
        args, kwargs = as_call(inputs, self.kwargs)
        return self.loss_fn(logits(functional_call(self.net, point, args, kwargs)), targets)


class Selection:
    """Keeps the hard permutation with the lowest midpoint loss on fixed selection batches."""

    def __init__(self, spec: PermutationSpec, sd_b: Mapping[str, torch.Tensor], path: PathLoss,
                 batches: list[Batch]) -> None:  # fmt: skip
        self.spec, self.sd_b, self.path, self.batches = spec, sd_b, path, batches
        self.best: Permutation | None = None
        self.best_loss = float("inf")
        self.start_loss = float("nan")
        self.seen: dict[tuple[bytes, ...], float] = {}

    def consider(self, perm: Permutation) -> float:
        """Score ``perm`` (once per distinct permutation) and keep it if it beats the best so far."""
        key = tuple(perm[g].numpy().tobytes() for g in self.spec.names)
        if key not in self.seen:
            theta_b = apply_permutation(self.spec, perm, self.sd_b)
            with torch.no_grad():
                loss = sum(float(self.path(theta_b, b, 0.5)) for b in self.batches) / len(self.batches)
            self.seen[key] = loss
            if len(self.seen) == 1:  # the first candidate is the start
                self.start_loss = loss
            if loss < self.best_loss:
                self.best, self.best_loss = {g: p.clone() for g, p in perm.items()}, loss
        return self.seen[key]

    def result(self, name: str, losses: list[float], start: float) -> LearnedMatchingResult:
        """The best permutation and the run's numbers (``start``: the run's ``perf_counter`` at entry)."""
        assert self.best is not None, "the weight-matching start is always scored"
        LOG.info("%s: %d steps, %d permutations scored, selection loss %.4f (weight matching's %.4f)", name,
                 len(losses), len(self.seen), self.best_loss, self.start_loss)  # fmt: skip
        return LearnedMatchingResult(self.best, len(losses), tuple(losses), self.start_loss, self.best_loss,
                                     len(self.seen), time.perf_counter() - start)  # fmt: skip
