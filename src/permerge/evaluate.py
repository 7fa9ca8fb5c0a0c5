"""Interpolation curves and barriers: numbers only (plots live in ``plot.py``).

The loss barrier (Git Re-Basin, Def. 2.2) of models A and B is the largest excess of the loss on
the straight line ``(1-α)A + αB`` over the straight line between the endpoints' losses:
``max_α L((1-α)A + αB) − ((1-α)L(A) + αL(B))``. The accuracy barrier is the same with the sign
flipped (the worst accuracy *drop* below the endpoints' line).
"""

from __future__ import annotations

import csv
import io
import json
import logging
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from permerge.merge import interpolate
from permerge.repair import reset_bn_stats

LOG = logging.getLogger(__name__)

__all__ = ["Curve", "accuracy", "barrier", "evaluate", "interpolation_curve"]

Metric = Callable[[torch.Tensor, torch.Tensor], float]
HIGHER_IS_BETTER = {"accuracy"}


def accuracy(outputs: torch.Tensor, targets: torch.Tensor) -> float:
    """Top-1 accuracy of logits ``outputs`` against class ``targets``."""
    return (outputs.argmax(-1) == targets).float().mean().item()


def barrier(values: Sequence[float], alphas: Sequence[float], higher_is_better: bool = False) -> float:
    """Worst excess over the endpoints' line (for a loss) or deficit below it (for accuracy).

    Example:
        >>> barrier([1.0, 3.0, 2.0], [0.0, 0.5, 1.0])
        1.5
    """
    a0, a1 = values[0], values[-1]
    sign = -1.0 if higher_is_better else 1.0
    return max(sign * (v - ((1 - t) * a0 + t * a1)) for v, t in zip(values, alphas))


@dataclass(frozen=True)
class Curve:
    """Metrics along ``(1-α)A + αB``: ``values[dataset][metric]`` is one value per α."""

    alphas: tuple[float, ...]
    values: Mapping[str, Mapping[str, tuple[float, ...]]]

    def barrier(self, metric: str = "loss", dataset: str | None = None) -> float:
        dataset = dataset or next(iter(self.values))
        return barrier(self.values[dataset][metric], self.alphas, metric in HIGHER_IS_BETTER)

    @property
    def loss_barrier(self) -> float:
        return self.barrier("loss")

    @property
    def accuracy_barrier(self) -> float:
        return self.barrier("accuracy")

    def midpoint_gap(self, metric: str = "loss", dataset: str | None = None) -> float:
        """Metric at α = ½ minus the mean of the endpoints (needs 0.5 on the grid)."""
        dataset = dataset or next(iter(self.values))
        v = self.values[dataset][metric]
        i = min(range(len(self.alphas)), key=lambda j: abs(self.alphas[j] - 0.5))
        return v[i] - 0.5 * (v[0] + v[-1])

    def to_dict(self) -> dict[str, Any]:
        summary = {
            ds: {m: {"barrier": self.barrier(m, ds), "midpoint_gap": self.midpoint_gap(m, ds)} for m in ms}
            for ds, ms in self.values.items()
        }
        return {"alphas": list(self.alphas), "values": {d: {m: list(v) for m, v in ms.items()} for d, ms in self.values.items()}, "summary": summary}

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=1)

    def to_csv(self) -> str:
        out = io.StringIO()
        w = csv.writer(out)
        w.writerow(["dataset", "metric", *[f"{a:g}" for a in self.alphas]])
        for ds, ms in self.values.items():
            for m, v in ms.items():
                w.writerow([ds, m, *[f"{x:.6g}" for x in v]])
        return out.getvalue()


def evaluate(
    model: nn.Module, data: Iterable[Any], loss_fn: Callable[..., torch.Tensor], metrics: Mapping[str, Metric]
) -> dict[str, float]:
    """Sample-weighted mean loss and metrics over ``(inputs, targets)`` batches, in eval mode."""
    was = model.training
    model.eval()
    sums: dict[str, float] = {"loss": 0.0, **{m: 0.0 for m in metrics}}
    count = 0
    with torch.no_grad():
        for x, y in data:
            out = model(x)
            n = len(y)
            sums["loss"] += float(loss_fn(out, y)) * n
            for name, fn in metrics.items():
                sums[name] += fn(out, y) * n
            count += n
    model.train(was)
    if count == 0:
        raise ValueError("evaluation data is empty")
    return {k: v / count for k, v in sums.items()}


def interpolation_curve(
    model_a: nn.Module,
    model_b: nn.Module,
    data: Iterable[Any] | Mapping[str, Iterable[Any]],
    loss_fn: Callable[..., torch.Tensor] = nn.functional.cross_entropy,
    *,
    alphas: int | Sequence[float] = 11,
    metrics: Mapping[str, Metric] | None = None,
    bn_reset: Iterable[Any] | None = None,
    bn_batches: int = 10,
    transform: Callable[[nn.Module, float], nn.Module] | None = None,
) -> Curve:
    """Loss and metrics of ``(1-α)A + αB`` for each α, on one or several datasets.

    ``data`` yields ``(inputs, targets)``; pass a dict to evaluate several (e.g. train and test).
    ``bn_reset``: data (batches of inputs or ``(inputs, targets)``) to re-estimate BatchNorm
    statistics at every α, endpoints included, so the curve is fair. ``transform(model, α)`` may
    replace each interpolated model (REPAIR uses it).
    """
    grid = tuple(torch.linspace(0, 1, alphas).tolist()) if isinstance(alphas, int) else tuple(float(a) for a in alphas)
    datasets = dict(data) if isinstance(data, Mapping) else {"data": data}
    metrics = {"accuracy": accuracy} if metrics is None else dict(metrics)
    values: dict[str, dict[str, list[float]]] = {d: {"loss": [], **{m: [] for m in metrics}} for d in datasets}
    for alpha in grid:
        model = interpolate(model_a, model_b, alpha)
        if bn_reset is not None:
            model = reset_bn_stats(model, bn_reset, batches=bn_batches)
        if transform is not None:
            model = transform(model, alpha)
        for ds, batches in datasets.items():
            for k, v in evaluate(model, batches, loss_fn, metrics).items():
                values[ds][k].append(v)
        LOG.info("α=%.2f: %s", alpha, {d: round(v["loss"][-1], 4) for d, v in values.items()})
    return Curve(grid, {d: {m: tuple(v) for m, v in ms.items()} for d, ms in values.items()})
