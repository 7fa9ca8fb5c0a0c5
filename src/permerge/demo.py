"""The demo behind ``permerge demo``: Git Re-Basin's headline result in under a minute on a laptop CPU.

On scikit-learn's bundled digits (1,797 8×8 images; nothing is downloaded) it trains two copies
of a small MLP — and of a small CNN without normalisation — from different seeds, aligns the
second to the first by weight matching, and measures the test loss and accuracy barriers of the
straight line between them three ways: naive averaging, after weight matching, and after weight
matching + REPAIR, on train and test data. It writes one figure per model, every curve as JSON
and CSV, and a self-contained HTML report.
"""

from __future__ import annotations

import csv
import functools
import io
import json
import logging
import sys
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
import torch.nn.functional as F
from torch import nn

from permerge.align import align
from permerge.batches import call_kwargs
from permerge.errors import PermergeError
from permerge.evaluate import Curve, Metric, interpolation_curve, metric_set
from permerge.models import MLP, VGG
from permerge.progress import progress
from permerge.repair import repair_transform

if TYPE_CHECKING:
    from tqdm import tqdm

    from permerge.io.outputs import OutputDir

LOG = logging.getLogger(__name__)

__all__ = ["DEMO_MODELS", "DemoModel", "DemoResult", "DemoRow", "compare_curves", "curves_csv", "digits", "format_table", "run_demo"]

LABELS = ("naive", "weight-matched", "weight-matched + REPAIR")


@dataclass(frozen=True)
class DemoModel:
    """A demo architecture and how long to train it (``quick_epochs`` for tests)."""

    description: str
    factory: Callable[[], nn.Module]
    epochs: int
    quick_epochs: int
    lr: float = 1e-3


DEMO_MODELS: dict[str, DemoModel] = {
    "mlp": DemoModel("MLP 64-128-128-128-128-10", lambda: MLP(64, (128,) * 4, 10), epochs=15, quick_epochs=2),
    "cnn": DemoModel(
        "CNN conv 16-16-32-32, no norm",
        lambda: VGG((16, 16, 32, 32), num_classes=10, in_channels=1, norm="none", image_size=8),
        epochs=10,
        quick_epochs=1,
    ),
}


@dataclass(frozen=True)
class DemoRow:
    """One model's results: endpoint test accuracies and (loss, accuracy) barrier per label."""

    model: str
    description: str
    accuracy_a: float
    accuracy_b: float
    barriers: Mapping[str, tuple[float, float]]


@dataclass(frozen=True)
class DemoResult:
    rows: tuple[DemoRow, ...]
    curves: Mapping[str, Mapping[str, Curve]]  # model → label → curve
    out: Path
    seconds: float


def digits(seed: int = 0, test_fraction: float = 0.2) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """scikit-learn's bundled digits as standardised ``(N, 1, 8, 8)`` images: train x, y, test x, y."""
    try:
        from sklearn.datasets import load_digits
    except ImportError as e:
        raise PermergeError("the demo needs scikit-learn (its bundled digits data): pip install 'permerge[demo]'") from e
    d = load_digits()
    x = torch.tensor(d.data, dtype=torch.float32).view(-1, 1, 8, 8) / 16.0
    y = torch.tensor(d.target, dtype=torch.long)
    order = torch.randperm(len(x), generator=torch.Generator().manual_seed(seed))
    n_test = int(len(x) * test_fraction)
    tr, te = order[n_test:], order[:n_test]
    mean, std = x[tr].mean(), x[tr].std()
    x = (x - mean) / std
    return x[tr], y[tr], x[te], y[te]


def has_batchnorm(model: nn.Module) -> bool:
    return any(isinstance(m, nn.modules.batchnorm._BatchNorm) for m in model.modules())


def compare_curves(
    model_a: nn.Module,
    model_b: nn.Module,
    data: Iterable[Any] | Mapping[str, Iterable[Any]],
    example_inputs: Any,
    *,
    align_method: str | None = "weight",
    aligned: nn.Module | None = None,
    stats_data: Iterable[Any] | None = None,
    bn_batches: int = 10,
    repair: bool = True,
    repair_batches: int = 10,
    alphas: int | Sequence[float] = 11,
    loss_fn: Callable[..., torch.Tensor] | None = None,
    metrics: str | Mapping[str, Metric] | None = None,
    example_kwargs: Mapping[str, Any] | None = None,
    seed: int = 0,
    labels: Mapping[str, str] | None = None,
) -> dict[str, Curve]:
    """The curves of a barrier study: naive, aligned, aligned + BN reset, aligned + REPAIR.

    ``"naive"`` interpolates A and B as given; ``"aligned"`` after aligning B to A with
    ``align_method``, or uses ``aligned`` (B already aligned) when given (skipped when both are
    None: the later curves then start from the naive pair);
    ``"aligned+BN reset"`` re-estimates BatchNorm statistics at every α on ``bn_batches`` batches
    of ``stats_data`` (only for models with BatchNorm and ``bn_batches > 0``); ``"aligned+REPAIR"``
    applies :func:`~permerge.repair.repair` at every α on ``repair_batches`` batches of
    ``stats_data`` (default: ``data`` when it is one dataset). ``loss_fn`` and ``metrics`` as in
    :func:`~permerge.evaluate.metric_set` (``metrics="causal-lm"`` for language models);
    ``example_kwargs`` go to the alignment's trace and REPAIR's forward calls (Hugging Face models
    get ``use_cache=False`` by themselves). ``labels`` renames the keys. Models are not modified.
    """
    names = {"naive": "naive", "aligned": "aligned", "bn": "aligned+BN reset", "repair": "aligned+REPAIR"}
    names.update(labels or {})
    chosen = metric_set(metrics, loss_fn)  # errors before any work
    bn = bn_batches > 0 and has_batchnorm(model_a)
    stats = stats_data
    if stats is None and (bn or repair):
        if isinstance(data, Mapping) and len(data) != 1:
            raise PermergeError(f"BN reset and REPAIR need stats_data: data has several datasets {list(data)}; say which to measure on")
        stats = next(iter(data.values())) if isinstance(data, Mapping) else data
    curve = functools.partial(interpolation_curve, model_a, data=data, metrics=chosen, alphas=alphas)
    curves = {names["naive"]: curve(model_b)}
    base = model_b
    kwargs = {**call_kwargs(model_a), **(example_kwargs or {})}
    if aligned is not None or align_method is not None:
        base = aligned if aligned is not None else align(model_a, model_b, example_inputs, align_method, seed=seed,
                                                         example_kwargs=kwargs, quiet=True).model  # fmt: skip
        curves[names["aligned"]] = curve(base)
    if bn:
        curves[names["bn"]] = curve(base, bn_reset=stats, bn_batches=bn_batches)
    if repair:
        fix = repair_transform(model_a, base, stats, batches=repair_batches, example_kwargs=kwargs)
        curves[names["repair"]] = curve(base, transform=fix)
    return curves


def _train(model: nn.Module, x: torch.Tensor, y: torch.Tensor, *, epochs: int, lr: float, seed: int,
           bar: tqdm) -> nn.Module:  # fmt: skip
    opt = torch.optim.Adam(model.parameters(), lr)
    gen = torch.Generator().manual_seed(seed)
    model.train()
    for _ in range(epochs):
        order = torch.randperm(len(x), generator=gen)
        for i in range(0, len(x) - 31, 32):
            idx = order[i : i + 32]
            loss = F.cross_entropy(model(x[idx]), y[idx])
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
        bar.update()
        bar.set_postfix(loss=f"{loss.item():.3f}")
    return model.eval()


def _batches(x: torch.Tensor, y: torch.Tensor, size: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
    return [(x[i : i + size], y[i : i + size]) for i in range(0, len(x), size)]


def format_table(rows: Sequence[DemoRow]) -> str:
    """A markdown table: per model, the loss and accuracy barrier for each label."""
    head = "| model | acc A / B | " + " | ".join(f"{label}: loss / acc barrier" for label in LABELS) + " |"
    lines = [head, "|" + "---|" * (2 + len(LABELS))]
    for r in rows:
        cells = [f"{r.barriers[label][0] + 0.0:.3f} / {100 * r.barriers[label][1] + 0.0:.1f} pt" for label in LABELS]
        lines.append(f"| {r.description} | {100 * r.accuracy_a:.1f}% / {100 * r.accuracy_b:.1f}% | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def run_demo(
    out: str | Path = "permerge-demo",
    *,
    models: Sequence[str] = ("mlp", "cnn"),
    quick: bool = False,
    seed: int = 0,
    alphas: int = 11,
    force: bool = False,
    quiet: bool = False,
    command: Sequence[str] | None = None,
    config: Mapping[str, Any] | None = None,
) -> DemoResult:
    """Train two seeds of each demo model on digits, align, measure barriers, write results to ``out``.

    Writes ``out/<model>.png`` (loss and accuracy vs α, train and test, for the three curves),
    ``out/curves.json``, ``out/curves.csv``, ``out/barriers.md`` (the table, test barriers, "line"
    definition), ``out/provenance.json`` and ``out/report.html``, all or nothing; ``out`` must be
    new or empty unless ``force`` and is claimed before training (:class:`~permerge.io.outputs.OutputDir`).
    Seeds ``seed`` and ``seed + 1``. ``command`` and ``config`` are recorded in ``provenance.json``
    (default: ``sys.argv`` and this call's options).
    """
    from permerge.io.outputs import OutputDir

    unknown = [m for m in models if m not in DEMO_MODELS]
    if unknown:
        raise PermergeError(f"unknown demo model(s) {unknown}; choose from {', '.join(DEMO_MODELS)}")
    _plot_check()
    config = dict(config) if config is not None else {"models": list(models), "quick": quick, "seed": seed, "alphas": alphas}
    threads = torch.get_num_threads()
    with OutputDir(out, force=force, inputs={}, quiet=quiet) as od:  # claimed before training
        torch.set_num_threads(1)  # these models are tiny: extra threads cost more than they bring (2x measured)
        try:
            return _run(od, models, quick, seed, alphas, quiet, list(command or sys.argv), config)
        finally:
            torch.set_num_threads(threads)


def _run(od: OutputDir, models: Sequence[str], quick: bool, seed: int, alphas: int, quiet: bool, command: list[str],
         config: Mapping[str, Any]) -> DemoResult:  # fmt: skip
    from permerge.io.write import text_writer
    from permerge.plot import plot_curves
    from permerge.report import write_report

    start = time.perf_counter()
    x, y, xt, yt = digits(seed)
    train_batches, test = _batches(x, y, 256), _batches(xt, yt, 512)
    rows, curves = [], {}
    total = sum(2 * (DEMO_MODELS[m].quick_epochs if quick else DEMO_MODELS[m].epochs) for m in models)
    with progress(total=total, desc="training", unit="epoch", quiet=quiet) as bar:
        trained = {}
        for name in models:
            spec = DEMO_MODELS[name]
            epochs = spec.quick_epochs if quick else spec.epochs
            pair = []
            for s in (seed, seed + 1):
                bar.set_description(f"training {name} (seed {s})")
                torch.manual_seed(s)
                pair.append(_train(spec.factory(), x, y, epochs=epochs, lr=spec.lr, seed=s, bar=bar))
            trained[name] = pair
    train_seconds = time.perf_counter() - start
    aligned = {}
    for name in models:
        a, b = trained[name]
        aligned[name] = align(a, b, x[:2], "weight", seed=seed, quiet=True)
        model_curves = compare_curves(a, b, {"train": train_batches, "test": test}, None, aligned=aligned[name].model,
                                      stats_data=train_batches, alphas=alphas, labels={"aligned": LABELS[1], "repair": LABELS[2]})  # fmt: skip
        curves[name] = model_curves
        first = model_curves[LABELS[0]].series("accuracy", "test")
        rows.append(DemoRow(name, DEMO_MODELS[name].description, first[0], first[-1],
                            {k: (c.barrier("loss", "test"), c.barrier("accuracy", "test")) for k, c in model_curves.items()}))  # fmt: skip
        LOG.info("%s: %s", name, rows[-1].barriers)
    table = format_table(rows)
    files: dict[str, Callable[[Path], object]] = {
        f"{name}.png": (lambda p, c=c, t=DEMO_MODELS[name].description: plot_curves(c, p, title=f"{t}: digits", format="png"))
        for name, c in curves.items()
    }
    files["curves.json"] = text_writer(_curves_json(curves))
    flat = {f"{m}/{label}": c for m, cs in curves.items() for label, c in cs.items()}
    files["curves.csv"] = text_writer(curves_csv(flat))
    files["barriers.md"] = text_writer(table + "\n")
    seconds = time.perf_counter() - start
    report = {"table": table, "barriers": {r.model: r.barriers for r in rows}, "align": {m: r.report for m, r in aligned.items()},
              "timing_s": {"data + training": train_seconds, "evaluating curves": sum(c.seconds or 0.0 for cs in curves.values() for c in cs.values()),
                           "total": seconds}}  # fmt: skip
    path = od.commit(files, command=command, config=config, report=report,
                     view=functools.partial(write_report, title="permerge demo: two seeds on digits, naive vs weight-matched vs REPAIR"))  # fmt: skip
    return DemoResult(tuple(rows), curves, path, seconds)


def _plot_check() -> None:
    from permerge.plot import _matplotlib

    _matplotlib()  # raise the install hint before minutes of training


def _curves_json(curves: Mapping[str, Mapping[str, Curve]]) -> str:
    return json.dumps({m: {label: c.to_dict() for label, c in cs.items()} for m, cs in curves.items()}, indent=1) + "\n"


def curves_csv(curves: Mapping[str, Curve]) -> str:
    """Several curves as one CSV: a ``curve`` column (the label), then :meth:`Curve.to_csv`'s columns."""
    out = io.StringIO()
    w = csv.writer(out)
    for i, (label, c) in enumerate(curves.items()):
        rows = list(csv.reader(io.StringIO(c.to_csv())))
        if i == 0:
            w.writerow(["curve", *rows[0]])
        w.writerows([label, *row] for row in rows[1:])
    return out.getvalue()
