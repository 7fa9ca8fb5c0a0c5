"""Evaluation: metrics with explicit directions, interpolation curves and barriers (numbers only; plots in ``plot.py``).

A batch is ``(inputs, targets)``: ``inputs`` is a tensor (one positional argument), a tuple of
positional arguments, or a mapping of keyword arguments (``{"input_ids": ..., "attention_mask": ...}``).
Model outputs may be tensors, tuples (the first element is the prediction) or Hugging Face
``ModelOutput``s and dicts (their ``logits``): :func:`logits` is the one place that reads them.

Barriers: two definitions are in use, and they differ when the endpoints' values differ. Both are
reported (:data:`BARRIERS`); for a higher-is-better metric (accuracy) the sign flips (the worst
*deficit*).

* ``"line"`` — Entezari et al. 2022 (ICLR), §2: ``max_α L(θ_α) − ((1−α)·L(θ_A) + α·L(θ_B))``, the
  excess over the straight line between the endpoints' values. It is 0 at the endpoints, so never
  negative.
* ``"mean"`` — Ainsworth et al. 2023, Git Re-Basin (ICLR), §2 (after Frankle et al. 2020):
  ``max_α L(θ_α) − ½(L(θ_A) + L(θ_B))``, the excess over the endpoints' mean. The max includes
  the endpoints, so it is at least ``½|L(θ_A) − L(θ_B)|``.

where ``θ_α = (1−α)·θ_A + α·θ_B``.
"""

from __future__ import annotations

import csv
import io
import json
import logging
import math
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from types import MappingProxyType
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils import _pytree as pytree

from permerge.batches import as_call, call_kwargs
from permerge.errors import PermergeError
from permerge.merge import interpolate
from permerge.repair import reset_bn_stats

LOG = logging.getLogger(__name__)

__all__ = [
    "ACCURACY",
    "BARRIERS",
    "CAUSAL_LM",
    "CLASSIFICATION",
    "METRIC_SETS",
    "PERPLEXITY",
    "TOKEN_ACCURACY",
    "TOKEN_LOSS",
    "BarrierDefinition",
    "Curve",
    "Metric",
    "accuracy",
    "barrier",
    "causal_lm_loss",
    "evaluate",
    "interpolation_curve",
    "logits",
    "metric_set",
    "metrics_for",
    "model_logits",
]

IGNORE_INDEX = -100  # the Hugging Face / PyTorch convention for labels that do not count (padding)


# -- model outputs --------------------------------------------------------------------------------


def logits(output: Any) -> torch.Tensor:
    """The prediction tensor in a model's output: the tensor itself, ``output["logits"]`` /
    ``output.logits`` (Hugging Face ``ModelOutput`` such as ``CausalLMOutputWithPast``, dicts), or
    the first element of a tuple or list.

    Example:
        >>> logits((torch.ones(2, 3), "aux")).shape
        torch.Size([2, 3])
    """
    if isinstance(output, torch.Tensor):
        return output
    if isinstance(output, Mapping) and "logits" in output:
        return output["logits"]
    if not isinstance(output, Mapping) and isinstance(getattr(output, "logits", None), torch.Tensor):
        return output.logits
    if isinstance(output, (tuple, list)) and output and isinstance(output[0], torch.Tensor):
        return output[0]
    keys = f" (keys {list(output)})" if isinstance(output, Mapping) else ""
    raise PermergeError(
        f"cannot find the predictions in the model's output, a {type(output).__name__}{keys}: "
        "return a tensor, a tuple whose first element is the logits, or an object or dict with 'logits'"
    )


def model_logits(model: nn.Module, inputs: Any) -> torch.Tensor:
    """Run ``model`` on a batch's ``inputs`` (moved to the model's device) and return its :func:`logits`."""
    device = next((p.device for p in model.parameters()), None)
    if device is not None:
        inputs = pytree.tree_map(lambda t: t.to(device) if isinstance(t, torch.Tensor) else t, inputs)
    args, kwargs = as_call(inputs, call_kwargs(model))
    return logits(model(*args, **kwargs))


# -- metrics ---------------------------------------------------------------------------------------

Total = tuple["torch.Tensor | float", "torch.Tensor | float"]


@dataclass(frozen=True)
class Metric:
    """A quantity averaged over evaluation data, with its direction stated, never guessed from its name.

    ``fn(logits, targets) -> (total, count)`` for one batch; the value over the data is
    ``finish(Σ total / Σ count)`` (``finish`` defaults to the identity). Summing totals and counts
    keeps token-level metrics exact over batches with different numbers of tokens, and ``finish``
    makes perplexity ``exp`` of the whole data's mean token loss, not a mean of batch perplexities.

    Example:
        >>> top1 = Metric.mean(accuracy, higher_is_better=True)
        >>> top1.higher_is_better
        True
    """

    fn: Callable[[torch.Tensor, torch.Tensor], Total]
    higher_is_better: bool
    finish: Callable[[float], float] | None = None
    description: str = ""

    @classmethod
    def mean(cls, fn: Callable[[torch.Tensor, torch.Tensor], Any], *, higher_is_better: bool,
             description: str = "") -> Metric:  # fmt: skip
        """A metric from a per-batch mean ``fn(logits, targets)`` (a loss, accuracy), weighted by batch size."""

        def total(out: torch.Tensor, y: torch.Tensor) -> Total:
            n = len(y)
            return float(fn(out, y)) * n, n

        return cls(total, higher_is_better, None, description)


def accuracy(outputs: torch.Tensor, targets: torch.Tensor) -> float:
    """Top-1 accuracy of logits ``outputs`` against class ``targets``."""
    return (outputs.argmax(-1) == targets).float().mean().item()


def _next_token(logits: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Position ``t``'s logits paired with token ``t+1``'s label, flattened (the causal-LM shift)."""
    if logits.dim() != 3 or labels.shape != logits.shape[:2]:
        raise PermergeError(
            f"causal-LM metrics need logits (batch, seq, vocab) and labels (batch, seq); got {tuple(logits.shape)} "
            f"and {tuple(labels.shape)}: the targets of a batch are its token ids (or labels with {IGNORE_INDEX} at padding)"
        )
    return logits[:, :-1].reshape(-1, logits.shape[-1]), labels[:, 1:].reshape(-1).to(logits.device)


def _token_loss(logits: torch.Tensor, labels: torch.Tensor) -> Total:
    out, tgt = _next_token(logits, labels)
    total = F.cross_entropy(out.float(), tgt, ignore_index=IGNORE_INDEX, reduction="sum")
    return total, (tgt != IGNORE_INDEX).sum()


def _token_hits(logits: torch.Tensor, labels: torch.Tensor) -> Total:
    out, tgt = _next_token(logits, labels)
    valid = tgt != IGNORE_INDEX
    return ((out.argmax(-1) == tgt) & valid).sum(), valid.sum()


def causal_lm_loss(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Mean next-token cross-entropy: position ``t`` predicts token ``t+1``; labels equal to -100
    (padding) do not count. ``labels`` are the input ids (shifted here, as Hugging Face does).

    Example:
        >>> ids = torch.tensor([[1, 2, 3]])
        >>> round(float(causal_lm_loss(torch.zeros(1, 3, 4), ids)), 4)  # uniform over 4 tokens: ln 4
        1.3863
    """
    total, count = _token_loss(logits, labels)
    return total / count


ACCURACY = Metric.mean(accuracy, higher_is_better=True, description="top-1 accuracy")
TOKEN_LOSS = Metric(_token_loss, False, None, "next-token cross-entropy per token (labels -100 ignored)")
PERPLEXITY = Metric(_token_loss, False, math.exp, "exp(next-token cross-entropy per token)")
TOKEN_ACCURACY = Metric(_token_hits, True, None, "next-token top-1 accuracy (labels -100 ignored)")

CLASSIFICATION: Mapping[str, Metric] = MappingProxyType({
    "loss": Metric.mean(F.cross_entropy, higher_is_better=False, description="cross-entropy"), "accuracy": ACCURACY,
})  # fmt: skip
CAUSAL_LM: Mapping[str, Metric] = MappingProxyType({
    "loss": TOKEN_LOSS, "perplexity": PERPLEXITY, "token_accuracy": TOKEN_ACCURACY,
})  # fmt: skip
METRIC_SETS: Mapping[str, Mapping[str, Metric]] = MappingProxyType({"classification": CLASSIFICATION, "causal-lm": CAUSAL_LM})


def metric_set(
    metrics: str | Mapping[str, Metric | Callable[..., Any]] | None = None,
    loss_fn: Callable[..., torch.Tensor] | None = None,
) -> dict[str, Metric]:
    """The metrics an evaluation computes, ``"loss"`` first.

    ``metrics`` is a name in :data:`METRIC_SETS` (``"classification"``, ``"causal-lm"``), a mapping
    name → :class:`Metric`, or None (accuracy). The loss is ``metrics["loss"]`` if given, else the
    mean of ``loss_fn`` (default cross-entropy), lower-is-better. A plain function is accepted only
    for :func:`accuracy` itself; any other needs a :class:`Metric` stating its direction.
    """
    if isinstance(metrics, str):
        if metrics not in METRIC_SETS:
            raise PermergeError(f"unknown metric set {metrics!r}; choose from {', '.join(METRIC_SETS)}")
        chosen: dict[str, Metric] = dict(METRIC_SETS[metrics])
    else:
        chosen = {}
        for name, m in ({"accuracy": ACCURACY} if metrics is None else metrics).items():
            if m is accuracy:
                m = ACCURACY
            if not isinstance(m, Metric):
                raise PermergeError(
                    f"metric {name!r} is a plain function, so its direction is unknown: pass "
                    f"Metric.mean(fn, higher_is_better=True or False) (or a Metric) instead"
                )
            chosen[name] = m
    if "loss" in chosen:
        if loss_fn is not None:
            raise PermergeError("the loss is given twice (loss_fn and metrics['loss']): pass one of them")
        return {"loss": chosen.pop("loss"), **chosen}
    loss = Metric.mean(loss_fn or F.cross_entropy, higher_is_better=False, description="loss")
    return {"loss": loss, **chosen}


def metrics_for(model: nn.Module) -> str:
    """The metric set that fits ``model``: ``"causal-lm"`` for a Hugging Face causal language model
    (its class is one transformers registers for causal LM), else ``"classification"``."""
    if type(model).__module__.startswith("transformers."):
        from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES

        names = {n for v in MODEL_FOR_CAUSAL_LM_MAPPING_NAMES.values() for n in ((v,) if isinstance(v, str) else v)}
        if type(model).__name__ in names:
            return "causal-lm"
    return "classification"


def evaluate(
    model: nn.Module,
    data: Iterable[Any],
    loss_fn: Callable[..., torch.Tensor] | None = None,
    metrics: str | Mapping[str, Metric | Callable[..., Any]] | None = None,
) -> dict[str, float]:
    """Loss and metrics of ``model`` over ``(inputs, targets)`` batches, in eval mode, without gradients.

    ``loss_fn`` and ``metrics`` as in :func:`metric_set`; each value is ``Σ total / Σ count`` over
    the batches (sample-weighted means for per-batch means; per-token for causal-LM metrics).
    """
    chosen = metric_set(metrics, loss_fn)
    was = model.training
    model.eval()
    totals = {name: [0.0, 0.0] for name in chosen}
    try:
        with torch.no_grad():
            for inputs, targets in data:
                out = model_logits(model, inputs)
                for name, m in chosen.items():
                    total, count = m.fn(out, targets)
                    totals[name][0] += float(total)
                    totals[name][1] += float(count)
    finally:
        model.train(was)
    values = {}
    for name, (total, count) in totals.items():
        if count == 0:
            raise PermergeError(f"evaluation data is empty (metric {name!r} counted nothing)")
        finish = chosen[name].finish
        values[name] = finish(total / count) if finish else total / count
    return values


# -- barriers --------------------------------------------------------------------------------------


@dataclass(frozen=True)
class BarrierDefinition:
    """One definition of the barrier on the line ``θ_α = (1−α)·θ_A + α·θ_B``: the value each α is
    compared with (``reference(values, alphas)``), the formula, and who defined it (``source``
    short, ``citation`` in full)."""

    formula: str
    source: str
    citation: str
    reference: Callable[[Sequence[float], Sequence[float]], list[float]] = field(repr=False)


def _endpoint_line(values: Sequence[float], alphas: Sequence[float]) -> list[float]:
    return [(1 - t) * values[0] + t * values[-1] for t in alphas]


def _endpoint_mean(values: Sequence[float], alphas: Sequence[float]) -> list[float]:
    return [0.5 * (values[0] + values[-1])] * len(alphas)


BARRIERS: Mapping[str, BarrierDefinition] = MappingProxyType({
    "line": BarrierDefinition("max_α L(θ_α) − ((1−α)·L(θ_A) + α·L(θ_B))", "Entezari et al. 2022",
                              "Entezari et al. 2022, The Role of Permutation Invariance in Linear Mode Connectivity "
                              "of Neural Networks (ICLR), §2", _endpoint_line),
    "mean": BarrierDefinition("max_α L(θ_α) − ½·(L(θ_A) + L(θ_B))", "Git Re-Basin (Ainsworth et al. 2023)",
                              "Ainsworth, Hayase & Srinivasa 2023, Git Re-Basin (ICLR), §2, after Frankle et al. 2020",
                              _endpoint_mean),
})  # fmt: skip


def barrier(values: Sequence[float], alphas: Sequence[float], higher_is_better: bool = False,
            definition: str = "line") -> float:  # fmt: skip
    """The worst excess of ``values`` over the endpoints' line (``"line"``) or mean (``"mean"``); the
    worst deficit below it when ``higher_is_better``. See :data:`BARRIERS`.

    Example:
        >>> barrier([1.0, 3.0, 2.0], [0.0, 0.5, 1.0])
        1.5
        >>> barrier([1.0, 3.0, 2.0], [0.0, 0.5, 1.0], definition="mean")
        1.5
        >>> barrier([1.0, 3.0, 4.0], [0.0, 0.5, 1.0], definition="mean")  # the endpoint B counts
        1.5
    """
    if definition not in BARRIERS:
        raise PermergeError(f"unknown barrier definition {definition!r}; choose from {', '.join(BARRIERS)}")
    if len(values) != len(alphas) or len(values) < 2:
        raise PermergeError(f"a barrier needs one value per α and at least the two endpoints; got {len(values)} values, {len(alphas)} α")
    sign = -1.0 if higher_is_better else 1.0
    ref = BARRIERS[definition].reference(values, alphas)
    return max(sign * (v - r) for v, r in zip(values, ref))


@dataclass(frozen=True)
class Curve:
    """Metrics along ``(1-α)A + αB``: ``values[dataset][metric]`` is one value per α.

    ``higher_is_better[metric]`` states each metric's direction; ``"loss"`` is lower-is-better
    unless stated otherwise (it is the loss), every other metric must be listed to get a barrier.
    ``seconds`` is the wall time that measured the curve (not compared).
    """

    alphas: tuple[float, ...]
    values: Mapping[str, Mapping[str, tuple[float, ...]]]
    higher_is_better: Mapping[str, bool] = field(default_factory=dict)
    seconds: float | None = field(default=None, compare=False)

    def __post_init__(self) -> None:
        object.__setattr__(self, "higher_is_better", {"loss": False, **self.higher_is_better})

    def direction(self, metric: str) -> bool:
        """Whether larger values of ``metric`` are better (as stated, never guessed from the name)."""
        if metric in self.higher_is_better:
            return bool(self.higher_is_better[metric])
        raise PermergeError(
            f"the curve does not state whether {metric!r} is higher- or lower-is-better: "
            f"build it with higher_is_better={{{metric!r}: True}} (or False)"
        )

    def dataset(self, dataset: str | None = None) -> str:
        """``dataset``, or the only one; several without a name is ambiguous and an error."""
        if dataset is None:
            if len(self.values) != 1:
                raise PermergeError(
                    f"the curve has datasets {list(self.values)}: name one, e.g. curve.barrier('loss', dataset={next(iter(self.values))!r})"
                )
            return next(iter(self.values))
        if dataset not in self.values:
            raise PermergeError(f"the curve has no dataset {dataset!r}; it has {list(self.values)}")
        return dataset

    def series(self, metric: str, dataset: str | None = None) -> tuple[float, ...]:
        ds = self.dataset(dataset)
        if metric not in self.values[ds]:
            raise PermergeError(f"the curve has no metric {metric!r} on {ds!r}; it has {list(self.values[ds])}")
        return tuple(self.values[ds][metric])

    def barrier(self, metric: str = "loss", dataset: str | None = None, definition: str = "line") -> float:
        """The barrier of ``metric`` on ``dataset`` by ``definition`` (``"line"`` or ``"mean"``, see :data:`BARRIERS`)."""
        return barrier(self.series(metric, dataset), self.alphas, self.direction(metric), definition)

    @property
    def loss_barrier(self) -> float:
        """The loss barrier (``"line"`` definition) on the curve's only dataset."""
        return self.barrier("loss")

    @property
    def accuracy_barrier(self) -> float:
        """The accuracy barrier (``"line"`` definition) on the curve's only dataset."""
        return self.barrier("accuracy")

    def midpoint_gap(self, metric: str = "loss", dataset: str | None = None) -> float:
        """Metric at the α nearest ½ minus the mean of the endpoints."""
        v = self.series(metric, dataset)
        i = min(range(len(self.alphas)), key=lambda j: abs(self.alphas[j] - 0.5))
        return v[i] - 0.5 * (v[0] + v[-1])

    def summary(self) -> dict[str, dict[str, dict[str, Any]]]:
        """``{dataset: {metric: {"barrier": {definition: value}, "midpoint_gap": value}}}`` for
        every metric with a known direction."""
        out: dict[str, dict[str, dict[str, Any]]] = {}
        for ds, ms in self.values.items():
            out[ds] = {}
            for m in ms:
                if m in self.higher_is_better:
                    out[ds][m] = {"barrier": {d: self.barrier(m, ds, d) for d in BARRIERS}, "midpoint_gap": self.midpoint_gap(m, ds)}
        return out

    def to_dict(self) -> dict[str, Any]:
        return {
            "alphas": list(self.alphas),
            "values": {d: {m: list(v) for m, v in ms.items()} for d, ms in self.values.items()},
            "higher_is_better": dict(self.higher_is_better),
            "summary": self.summary(),
            "barrier_definitions": {k: {"formula": d.formula, "citation": d.citation} for k, d in BARRIERS.items()},
            "seconds": self.seconds,
        }

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> Curve:
        """Read back :meth:`to_dict`'s form (summaries are recomputed, not read)."""
        try:
            values = {ds: {m: tuple(float(x) for x in v) for m, v in ms.items()} for ds, ms in d["values"].items()}
            return cls(tuple(float(a) for a in d["alphas"]), values, dict(d.get("higher_is_better", {})), d.get("seconds"))
        except (KeyError, TypeError, AttributeError, ValueError) as e:
            raise PermergeError(f"not a curve (needs 'alphas' and 'values' per dataset and metric): {e}") from e

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


def interpolation_curve(
    model_a: nn.Module,
    model_b: nn.Module,
    data: Iterable[Any] | Mapping[str, Iterable[Any]],
    loss_fn: Callable[..., torch.Tensor] | None = None,
    *,
    alphas: int | Sequence[float] = 11,
    metrics: str | Mapping[str, Metric | Callable[..., Any]] | None = None,
    bn_reset: Iterable[Any] | None = None,
    bn_batches: int = 10,
    transform: Callable[[nn.Module, float], nn.Module] | None = None,
) -> Curve:
    """Loss and metrics of ``(1-α)A + αB`` for each α, on one or several datasets.

    ``data`` yields ``(inputs, targets)``; pass a dict to evaluate several (e.g. ``{"train": ...,
    "test": ...}``; a single iterable is named ``"data"``). ``loss_fn`` and ``metrics`` as in
    :func:`metric_set`: e.g. ``metrics="causal-lm"`` for next-token loss, perplexity and token
    accuracy of a causal LM. ``bn_reset``: data (batches of inputs or ``(inputs, targets)``) to
    re-estimate BatchNorm statistics at every α, endpoints included, so the curve is fair.
    ``transform(model, α)`` may replace each interpolated model (REPAIR uses it).

    Example:
        >>> curve = interpolation_curve(a, b, {"train": train, "test": test}, metrics="causal-lm")  # doctest: +SKIP
        >>> curve.barrier("perplexity", "test", definition="mean")  # doctest: +SKIP
    """
    grid = tuple(torch.linspace(0, 1, alphas).tolist()) if isinstance(alphas, int) else tuple(float(a) for a in alphas)
    if len(grid) < 2 or grid[0] != 0.0 or grid[-1] != 1.0:
        raise PermergeError(f"alphas must run from 0 to 1 with at least the two endpoints (barriers need them); got {grid}")
    datasets = dict(data) if isinstance(data, Mapping) else {"data": data}
    chosen = metric_set(metrics, loss_fn)
    start = time.perf_counter()
    values: dict[str, dict[str, list[float]]] = {d: {m: [] for m in chosen} for d in datasets}
    for alpha in grid:
        model = interpolate(model_a, model_b, alpha)
        if bn_reset is not None:
            model = reset_bn_stats(model, bn_reset, batches=bn_batches, example_kwargs=call_kwargs(model))
        if transform is not None:
            model = transform(model, alpha)
        for ds, batches in datasets.items():
            for k, v in evaluate(model, batches, None, chosen).items():
                values[ds][k].append(v)
        LOG.info("α=%.2f: %s", alpha, {d: round(v["loss"][-1], 4) for d, v in values.items()})
    directions = {m: c.higher_is_better for m, c in chosen.items()}
    curves = {d: {m: tuple(v) for m, v in ms.items()} for d, ms in values.items()}
    return Curve(grid, curves, directions, time.perf_counter() - start)
