"""Loss and accuracy barriers on Fashion-MNIST: naive / aligned / aligned + BN reset / aligned + REPAIR.

Run from the repository root (needs Fashion-MNIST: ``apt-get install dataset-fashion-mnist``)::

    nohup python benchmarks/barriers.py [--threads 2] [--train-size 20000] [--epochs 1] > barriers.log 2>&1 &

Prints ONE markdown table, measured in one run, and writes it (with the command line) to
``benchmarks/results/barriers.md``; progress and a row per finished model go to stderr.

Models, each trained from seeds 0 and 1 and cached in ``benchmarks/_cache`` (later runs load):

* VGG-style CNN (``models.VGG``) with BatchNorm and the same VGG without any normalisation,
  widths 32-32-64-64 (x1, the default) and 64-64-128-128 (x2);
* ResNet-20 with BatchNorm and with LayerNorm (``norm="ln"``: ``GroupNorm(1, C)``), x1 (16-32-64)
  and x2 (32-64-128);
* a deep MLP 784-Wx8-10 at widths W = 128, 256, 512 and 1024 (cheap to train on a CPU, so the
  width series where "barriers shrink with width" is measured on converged-ish models).

Training is sized for a 2-core CPU: the CNNs see ``--train-size`` images (the first ones of the
training set) for ``--epochs`` passes -- far less than a converged model (BENCHMARKING.md uses 3
epochs of 60k for the VGG) -- and the MLP sees the whole training set for ``--mlp-epochs``
passes. Normalised CNNs use the ``sgd`` recipe of ``common.py`` (one-cycle, peak lr 0.05); the
VGG without normalisation and the MLP use ``adam`` (lr 1e-3), since SGD at lr 0.05 is unstable
without normalisation.

Per model, on the first ``--test-size`` test images, with an ``--alphas``-point grid:

* **naive**: ``(1-α)·A + α·B`` as trained (BN running statistics interpolated, not re-estimated);
* **aligned**: B weight-matched to A (``permerge.align``, ``init="anneal"``: the annealed
  Sinkhorn-relaxed start, then the best objective of ``--wm-restarts`` seeded descents from it),
  same interpolation;
* **+BN reset**: aligned, BatchNorm statistics re-estimated at every α, endpoints included (BN
  models only), on ``--stats-batches`` batches of 100 training images;
* **+REPAIR**: aligned + ``permerge.repair`` at every α, on the same training batches;
* **aligned (AM) / AM + REPAIR**: B aligned by activation matching instead (correlations of the
  hidden units on the ``--stats-batches`` training batches; the alignment the REPAIR paper uses),
  then the same interpolation, without and with REPAIR (whose BN reset it includes). Weight
  matching's objective can favour a permutation whose units compute different features (on the
  8x1024 MLP, seed 0, its optimum scores 1854 vs activation matching's 1172, yet its barrier is higher);
  REPAIR assumes matched units compute the same feature, and rescaling blends of unrelated ones
  can raise the loss, so both alignments are reported;
* **REPAIR vs aligned**: relative change of the loss barrier, ``REPAIR / aligned - 1`` (for BN
  nets relative to the BN-reset barrier too, the fair baseline there).

A second table measures the matchers themselves, each loss barrier taken *with* BN reset on BN
nets (the fair barrier there) and as is elsewhere:

* **WM, 5 seeds**: weight matching with its default start (better of identity and signature
  match) for seeds 0..4 ("before"), and with ``init="anneal", restarts=--wm-restarts`` ("after"):
  median and worst loss barrier on the ``--spread-alphas`` grid, and the range of the objective;
* **STE** (``ste_matching``: Git Re-Basin's straight-through estimator, midpoint loss) and
  **Sinkhorn** (``sinkhorn_matching``: Sinkhorn re-basin, random-point loss), both started from
  the annealed weight matching and trained on ``--learn-batches`` batches of 100 training images,
  against the aligned (WM) barrier of the first table, on the same ``--alphas`` grid.

Barriers follow Git Re-Basin: the worst excess of the loss (deficit of the accuracy) over the
straight line between the endpoints' values; they are computed by ``permerge.evaluate``.
"""

from __future__ import annotations

import os

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")  # before torch is imported; see BENCHMARKING.md

import argparse
import copy
import datetime
import logging
import platform
import statistics
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Any

import torch
from torch import nn

HERE = Path(__file__).resolve().parent
sys.path[:0] = [str(HERE), str(HERE.parent / "src")]  # this checkout's permerge and common.py

from common import cached_model, load_fashion_mnist, num_params, save_results, train  # noqa: E402

import permerge  # noqa: E402
from permerge.demo import compare_curves, has_batchnorm  # noqa: E402
from permerge.evaluate import interpolation_curve  # noqa: E402
from permerge.match import weight_matching  # noqa: E402
from permerge.models import MLP, VGG, ResNet20  # noqa: E402
from permerge.repair import repair_transform  # noqa: E402

LOG = logging.getLogger("benchmarks.barriers")


@dataclass(frozen=True)
class Spec:
    name: str
    label: str
    factory: Callable[[], nn.Module]
    recipe: str
    cnn: bool = True

    @property
    def family(self) -> str:
        """The row's architecture without its width (rows of one family differ in width only)."""
        return self.name.rsplit("-x", 1)[0] if "-x" in self.name else "mlp8"


SPECS = [
    Spec("mlp8x128", "MLP 784-128x8-10", partial(MLP, hidden=(128,) * 8), "adam", cnn=False),
    Spec("mlp8x256", "MLP 784-256x8-10", partial(MLP, hidden=(256,) * 8), "adam", cnn=False),
    Spec("mlp8x512", "MLP 784-512x8-10", partial(MLP, hidden=(512,) * 8), "adam", cnn=False),
    Spec("vgg-bn-x1", "VGG 32-32-64-64 + BN", partial(VGG, (32, 32, 64, 64), norm="bn"), "sgd"),
    Spec("vgg-none-x1", "VGG 32-32-64-64, no norm", partial(VGG, (32, 32, 64, 64), norm="none"), "adam"),
    Spec("resnet20-bn-x1", "ResNet-20 x1 + BN", partial(ResNet20, 1, norm="bn"), "sgd"),
    Spec("resnet20-ln-x1", "ResNet-20 x1 + LN", partial(ResNet20, 1, norm="ln"), "sgd"),
    Spec("vgg-bn-x2", "VGG 64-64-128-128 + BN", partial(VGG, (64, 64, 128, 128), norm="bn"), "sgd"),
    Spec("vgg-none-x2", "VGG 64-64-128-128, no norm", partial(VGG, (64, 64, 128, 128), norm="none"), "adam"),
    Spec("resnet20-bn-x2", "ResNet-20 x2 + BN", partial(ResNet20, 2, norm="bn"), "sgd"),
    Spec("resnet20-ln-x2", "ResNet-20 x2 + LN", partial(ResNet20, 2, norm="ln"), "sgd"),
    Spec("mlp8x1024", "MLP 784-1024x8-10", partial(MLP, hidden=(1024,) * 8), "adam", cnn=False),
]
ORDER = [s.name for s in SPECS]  # cheap ones first, so an interrupted run has the x1 rows
DISPLAY = ["mlp8x128", "mlp8x256", "mlp8x512", "mlp8x1024", "vgg-bn-x1", "vgg-bn-x2", "vgg-none-x1", "vgg-none-x2",
           "resnet20-bn-x1", "resnet20-bn-x2", "resnet20-ln-x1", "resnet20-ln-x2"]  # fmt: skip


def load_pair(spec: Spec, x: torch.Tensor, y: torch.Tensor, args: argparse.Namespace) -> tuple[nn.Module, nn.Module]:
    n, epochs = (len(x), args.mlp_epochs) if not spec.cnn else (args.train_size, args.epochs)

    def fit(model: nn.Module, seed: int) -> nn.Module:
        return train(model, x[:n], y[:n], recipe=spec.recipe, seed=seed, epochs=epochs, threads=args.threads, quiet=True)

    key = {"recipe": spec.recipe, "epochs": epochs, "n": n, "bs": 128}
    return tuple(cached_model(f"barriers-{spec.name}", spec.factory, s, fit, key=key) for s in (0, 1))  # type: ignore[return-value]


def _pct(v: float) -> str:
    return f"{100 * v + 0.0:.1f}"


def _rel(new: float, old: float) -> str:
    return "n/a" if old <= 1e-9 else f"{100 * (new / old - 1) + 0.0:+.0f}%"


def row(spec: Spec, a: nn.Module, curves: dict[str, Any], seconds: float) -> str:
    def cell(k: str) -> str:
        if k not in curves:
            return "—"
        return f"{curves[k].loss_barrier + 0.0:.3f} / {_pct(curves[k].accuracy_barrier)}"

    acc = curves["naive"].values["data"]["accuracy"]
    rep, ali = curves["aligned+REPAIR"].loss_barrier, curves["aligned"].loss_barrier
    vs_bn = _rel(rep, curves["aligned+BN reset"].loss_barrier) if "aligned+BN reset" in curves else "—"
    am, am_rep = curves["aligned (AM)"].loss_barrier, curves["AM+REPAIR"].loss_barrier
    return (f"| {spec.label} | {num_params(a) / 1e3:.0f}k | {_pct(acc[0])} / {_pct(acc[-1])} | {cell('naive')} | "
            f"{cell('aligned')} | {cell('aligned+BN reset')} | {cell('aligned+REPAIR')} | {_rel(rep, ali)} | {vs_bn} | "
            f"{cell('aligned (AM)')} | {cell('AM+REPAIR')} | {_rel(am_rep, am)} | "
            f"{seconds:.0f} |")  # fmt: skip


HEADER = (
    "| model | params | test acc A / B (%) | naive: loss / acc barrier | aligned (WM) | aligned + BN reset | "
    "aligned + REPAIR | REPAIR vs aligned (loss barrier) | REPAIR vs BN reset | "
    "aligned (AM) | AM + REPAIR | REPAIR vs aligned (AM) | eval s |\n"
    "|---|---|---|---|---|---|---|---|---|---|---|---|---|"
)


def verdicts(barriers: dict[str, dict[str, float]], by_name: dict[str, Spec]) -> str:
    """The issue's targets, each checked on every row it applies to."""
    lines = ["Targets:"]
    bn = [n for n in DISPLAY if n in barriers and "aligned+BN reset" in barriers[n]]
    if bn:
        # REPAIR's BN reset accumulates in float64, reset_bn_stats in float32: equal up to ~1e-5 relative
        ok = [n for n in bn if barriers[n]["aligned+REPAIR"] <= barriers[n]["aligned+BN reset"] * (1 + 1e-4)]
        lines.append(f"- REPAIR ≤ BN reset (loss barrier, to 1e-4 relative) on BN nets: {len(ok)}/{len(bn)}")
    names = [n for n in DISPLAY if n in barriers]
    mlps = [n for n in names if not by_name[n].cnn]
    for base, rep, label in (("aligned", "aligned+REPAIR", "weight matching"), ("aligned (AM)", "AM+REPAIR", "activation matching")):
        worse = [by_name[n].label for n in names if barriers[n][rep] > barriers[n][base] + 1e-6]
        lines.append(f"- REPAIR never increases a loss barrier, after {label}: {len(names) - len(worse)}/{len(names)}"
                     + (f" (increases: {', '.join(worse)})" if worse else ""))  # fmt: skip
        cuts = [f"{by_name[n].label.split()[1]} {_rel(barriers[n][rep], barriers[n][base])}" for n in mlps]
        met = sum(barriers[n][rep] <= 0.3 * barriers[n][base] for n in mlps)
        if mlps:
            lines.append(f"  - deep MLP cut by ≥ 70%: {met}/{len(mlps)} ({', '.join(cuts)})")
    return "\n".join(lines)


def width_trend(barriers: dict[str, dict[str, float]], by_name: dict[str, Spec]) -> str:
    """One line per family measured at 2+ widths: each method's loss barrier from narrow to wide."""
    families: dict[str, list[str]] = {}
    for name in DISPLAY:
        if name in barriers:
            families.setdefault(by_name[name].family, []).append(name)
    lines = ["Width trend (loss barrier, narrow → wide; ↓ = shrinks at every step):"]
    for names in families.values():
        if len(names) < 2:
            continue
        parts = []
        for method in ("naive", "aligned", "aligned+BN reset", "aligned+REPAIR", "aligned (AM)", "AM+REPAIR"):
            vals = [barriers[n][method] for n in names if method in barriers[n]]
            if len(vals) == len(names):
                trend = "↓" if all(b < a for a, b in zip(vals, vals[1:])) else "not monotone"
                parts.append(f"{method} {' → '.join(f'{v:.3f}' for v in vals)} ({trend})")
        labels = ", ".join(by_name[n].label for n in names)
        lines.append(f"- {labels}: " + "; ".join(parts))
    return "\n".join(lines)


QUALITY_HEADER = (
    "| model | WM, 5 seeds, before: median / worst loss barrier (objective range) | after (annealed start + restarts): median / "
    "worst (objective range) | worst / best, before → after | aligned (WM) | STE | Sinkhorn | STE / Sinkhorn s |\n"
    "|---|---|---|---|---|---|---|---|"
)


def matchers(spec: Spec, a: nn.Module, b: nn.Module, x: torch.Tensor, y: torch.Tensor, test: list[Any],
             stats: list[Any], wm_barrier: float, args: argparse.Namespace) -> dict[str, Any]:  # fmt: skip
    """Weight matching's spread over 5 seeds (default start vs annealed), STE and Sinkhorn; barriers
    with BN reset on BN nets."""
    bn = {"bn_reset": stats, "bn_batches": args.stats_batches} if has_batchnorm(a) else {}
    trace = permerge.trace(a, x[:2])
    out: dict[str, Any] = {"wm": wm_barrier}
    for label, init, restarts in (("before", None, 1), ("after", "anneal", args.wm_restarts)):
        barriers_, objectives = [], []
        for seed in range(5):
            res = weight_matching(trace, a.state_dict(), b.state_dict(), seed=seed, init=init, restarts=restarts,
                                  quiet=True)  # fmt: skip
            aligned = copy.deepcopy(b)
            aligned.load_state_dict(permerge.apply_permutation(trace, res.permutation, b.state_dict()))
            barriers_.append(interpolation_curve(a, aligned, test, alphas=args.spread_alphas, **bn).loss_barrier)
            objectives.append(res.total_after)
        out[label] = (barriers_, objectives)
    learn = [(x[i : i + 100], y[i : i + 100]) for i in range(0, 100 * args.learn_batches, 100)]
    for name in ("ste", "sinkhorn"):
        t0 = time.perf_counter()
        res = permerge.align(a, b, x[:2], name, data=learn, init="anneal", steps=args.learn_steps, quiet=True)
        out[f"{name} s"] = time.perf_counter() - t0
        out[name] = interpolation_curve(a, res.model, test, alphas=args.alphas, **bn).loss_barrier
    return out


def quality_row(spec: Spec, q: dict[str, Any]) -> str:
    def spread(label: str) -> str:
        bs, objs = q[label]
        return f"{statistics.median(bs):.3f} / {max(bs):.3f} ({min(objs):.1f}–{max(objs):.1f})"

    ratio = " → ".join(f"{max(q[k][0]) / max(min(q[k][0]), 1e-9):.2f}" for k in ("before", "after"))
    return (f"| {spec.label} | {spread('before')} | {spread('after')} | {ratio} | {q['wm']:.3f} | {q['ste']:.3f} | "
            f"{q['sinkhorn']:.3f} | {q['ste s']:.0f} / {q['sinkhorn s']:.0f} |")  # fmt: skip


def quality_verdicts(quality: dict[str, dict[str, Any]], by_name: dict[str, Spec]) -> str:
    names = [n for n in DISPLAY if n in quality]
    lines = ["Targets (matchers):"]
    for label in ("before", "after"):
        ok = [n for n in names if max(quality[n][label][0]) <= 1.1 * min(quality[n][label][0])]
        lines.append(f"- weight matching {label} the fix, worst of 5 seeds within 10% of the best: {len(ok)}/{len(names)}"
                     + (f" (not: {', '.join(by_name[n].label for n in names if n not in ok)})" if len(ok) < len(names) else ""))  # fmt: skip
    for m in ("ste", "sinkhorn"):
        le = [n for n in names if quality[n][m] <= quality[n]["wm"] + 1e-6]
        lt = [n for n in names if quality[n][m] < quality[n]["wm"] - 1e-6]
        lines.append(f"- {m.upper() if m == 'ste' else 'Sinkhorn'} ≤ weight matching's loss barrier: {len(le)}/{len(names)}, "
                     f"lower on {len(lt)}/{len(names)}")  # fmt: skip
    return "\n".join(lines)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--train-size", type=int, default=20000, help="training images for the CNNs")
    p.add_argument("--epochs", type=int, default=1, help="passes over --train-size images for the CNNs")
    p.add_argument("--mlp-epochs", type=int, default=5, help="passes over all 60k images for the MLP")
    p.add_argument("--test-size", type=int, default=1000)
    p.add_argument("--stats-batches", type=int, default=10, help="batches of 100 training images for BN reset / REPAIR")
    p.add_argument("--alphas", type=int, default=5, help="α grid points (odd, so 0.5 is on it)")
    p.add_argument("--wm-restarts", type=int, default=4, help="weight matching's restarts (from the annealed start)")
    p.add_argument("--spread-alphas", type=int, default=3, help="α grid of the 5-seed weight-matching barriers")
    p.add_argument("--learn-batches", type=int, default=50, help="batches of 100 training images for STE / Sinkhorn")
    p.add_argument("--learn-steps", type=int, default=200, help="STE / Sinkhorn optimisation steps")
    p.add_argument("--models", default=",".join(ORDER), help="comma-separated subset of " + ",".join(ORDER))
    args = p.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s", stream=sys.stderr)
    logging.getLogger("permerge").setLevel(logging.WARNING)
    torch.set_num_threads(args.threads)
    by_name = {s.name: s for s in SPECS}
    wanted = [by_name[n] for n in args.models.split(",")]
    x, y = load_fashion_mnist("train")
    xt, yt = load_fashion_mnist("test")
    test = [(xt[i : i + 500], yt[i : i + 500]) for i in range(0, args.test_size, 500)]
    stats = [(x[i : i + 100], y[i : i + 100]) for i in range(len(x) - 100 * args.stats_batches, len(x), 100)]
    rows: dict[str, str] = {}
    barriers: dict[str, dict[str, float]] = {}
    quality: dict[str, dict[str, Any]] = {}
    start = time.perf_counter()
    for spec in wanted:
        t0 = time.perf_counter()
        a, b = load_pair(spec, x, y, args)
        t1 = time.perf_counter()
        wm = permerge.align(a, b, x[:2], init="anneal", restarts=args.wm_restarts, quiet=True)
        curves = compare_curves(a, b, test, x[:2], aligned=wm.model, stats_data=stats,
                                bn_batches=args.stats_batches, repair_batches=args.stats_batches, alphas=args.alphas)  # fmt: skip
        am = permerge.align(a, b, x[:2], method="activation", data=stats, quiet=True).model
        curves["aligned (AM)"] = interpolation_curve(a, am, test, alphas=args.alphas)
        fix = repair_transform(a, am, stats, batches=args.stats_batches)
        curves["AM+REPAIR"] = interpolation_curve(a, am, test, alphas=args.alphas, transform=fix)
        rows[spec.name] = row(spec, a, curves, time.perf_counter() - t1)
        barriers[spec.name] = {k: c.loss_barrier for k, c in curves.items()}
        LOG.info("%s (train/load %.0f s, BN %s):\n%s", spec.name, t1 - t0, has_batchnorm(a), rows[spec.name])
        fair = "aligned+BN reset" if "aligned+BN reset" in curves else "aligned"
        quality[spec.name] = matchers(spec, a, b, x, y, test, stats, curves[fair].loss_barrier, args)
        LOG.info("%s matchers:\n%s", spec.name, quality_row(spec, quality[spec.name]))
    table = HEADER + "\n" + "\n".join(rows[n] for n in DISPLAY if n in rows)
    table += "\n\n" + verdicts(barriers, by_name) + "\n\n" + width_trend(barriers, by_name)
    table += "\n\n" + QUALITY_HEADER + "\n" + "\n".join(quality_row(by_name[n], quality[n]) for n in DISPLAY if n in quality)
    table += "\n\n" + quality_verdicts(quality, by_name)
    print(table)
    note = (
        f"Measured {datetime.date.today()} on {platform.machine()} ({os.cpu_count()} CPU cores, shared), torch "
        f"{torch.__version__}, {args.threads} threads; {time.perf_counter() - start:.0f} s in all. CNNs trained on the "
        f"first {args.train_size} Fashion-MNIST training images for {args.epochs} epoch(s), the MLP on all 60k for "
        f"{args.mlp_epochs}; weight matching: init='anneal', restarts={args.wm_restarts}; activation matching on the BN-reset/REPAIR batches; barriers on the first {args.test_size} test images, {args.alphas}-point α grid; BN reset "
        f"and REPAIR on {args.stats_batches} batches of 100 training images (from the end of the training set).\n"
        "Cells are loss barrier / accuracy barrier (percentage points). 'REPAIR vs ...' is the relative change of "
        "the loss barrier (negative = REPAIR lowers it)."
    )
    out = save_results("barriers", "Barriers: naive / aligned / BN reset / REPAIR; matchers", table, note)
    LOG.info("wrote %s", out)


if __name__ == "__main__":
    main()
