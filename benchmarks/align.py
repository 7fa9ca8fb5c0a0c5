"""Alignment quality and speed: permerge (weight / activation matching) vs. rebasin's PCD.

Run from the repository root (needs the ``bench`` extra and Fashion-MNIST,
``pip install -e .[bench]`` and ``apt-get install dataset-fashion-mnist``)::

    python benchmarks/align.py [--threads 2] [--quick] [--models mlp,vgg,resnet20,resnet50]

Prints ONE markdown table, measured in one run, and writes it (with the command line) to
``benchmarks/results/align.md``. Progress goes to stderr.

Models: an MLP 784-512-512-512-10, a VGG-style CNN with BatchNorm (``models.VGG()``) and a BN
ResNet-20 x1, each trained from two seeds on Fashion-MNIST with the recipes of
``BENCHMARKING.md`` and cached in ``benchmarks/_cache`` (the first run trains, later runs load);
and a ResNet-50 (plain torch, random init, 224x224 input) for timing only.

Per model:

* **barriers** (loss / accuracy, see ``common.barrier``) of the straight line from A to B, for B
  as trained ("naive"), aligned by permerge weight matching, by permerge activation matching
  (``--am-batches`` training batches of 256), and by rebasin's ``PermutationCoordinateDescent``
  (weight matching too: it permutes a copy of B in place). BN models get their BatchNorm
  statistics re-estimated at every α, endpoints included. The endpoints are the same models for
  every method up to a permutation, so they are evaluated once; each aligned B is checked to
  compute the same function as B (``fn err``).
* **end-to-end time** -- permerge: ``align(A, B, x, method="weight", check=False)``, i.e.
  trace + match + apply (+ the deep copy of B); rebasin: construct PCD (its torchview trace) +
  ``rebasin()``. Both warmed (one untimed call first), then the median of ``--repeats`` calls
  with the min-max spread. ``first call`` is the untimed warm-up call, which on the first model
  also carries the process's one-time costs (the first ``torch.export``, rebasin's imports).
* **groups**: permerge's groups (and how many the matcher moved away from the identity); rebasin's
  permutations (``len(pcd.pinit.model_graph.permutation_to_info)`` after its
  ``enforce_identity``, which is what ``rebasin()`` iterates over).
* **peak ΔRSS**: the largest RSS increase during the warm-up alignment (sampled every 5 ms, after
  handing freed memory back to the OS so the tool measured second cannot reuse the first one's
  heap), per tool; the process's ``getrusage`` peak is in the footer.
"""

from __future__ import annotations

import os

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")  # before torch is imported; see BENCHMARKING.md

import argparse
import copy
import datetime
import logging
import platform
import shlex
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from functools import partial
from importlib.metadata import version
from pathlib import Path
from typing import Any

import torch
from torch import nn

HERE = Path(__file__).resolve().parent
sys.path[:0] = [str(HERE), str(HERE.parent / "src")]  # this checkout's permerge and common.py

from common import (  # noqa: E402
    ResNet50,
    RssSampler,
    Timer,
    Timing,
    barrier,
    cached_model,
    evaluate,
    has_batchnorm,
    load_fashion_mnist,
    median_time,
    num_params,
    num_threads,
    peak_rss_mb,
    reset_bn_stats,
    train,
)

import permerge  # noqa: E402
from permerge.models import MLP, VGG, ResNet20  # noqa: E402

LOG = logging.getLogger("benchmarks.align")


# -- the models -------------------------------------------------------------------------------


@dataclass(frozen=True)
class Trained:
    """A model trained on Fashion-MNIST from two seeds (cached)."""

    name: str
    label: str
    factory: Callable[[], nn.Module]
    recipe: str
    epochs: int
    widths: tuple[int, ...]
    batch_size: int = 128

    @property
    def key(self) -> dict[str, Any]:
        return {"recipe": self.recipe, "epochs": self.epochs, "widths": self.widths, "bs": self.batch_size}


def trained_models(quick: bool) -> list[Trained]:
    """The three trained models; ``quick`` trains for less (and is cached under other keys)."""
    return [
        Trained("mlp", "MLP 784-512-512-512-10", partial(MLP, hidden=(512, 512, 512)), "adam",
                2 if quick else 10, (512, 512, 512)),
        Trained("vgg", "VGG 32-32-64-64 + BN", partial(VGG, (32, 32, 64, 64), norm="bn"), "sgd",
                1 if quick else 3, (32, 32, 64, 64)),
        Trained("resnet20", "ResNet-20 ×1 + BN", partial(ResNet20, 1, norm="bn"), "sgd",
                1, (16, 32, 64)),
    ]  # fmt: skip


def load_pair(m: Trained, data: tuple[torch.Tensor, torch.Tensor], train_threads: int) -> tuple[nn.Module, nn.Module]:
    x, y = data

    def fit(model: nn.Module, seed: int) -> nn.Module:
        return train(model, x, y, recipe=m.recipe, seed=seed, epochs=m.epochs, batch_size=m.batch_size,
                     threads=train_threads)

    return tuple(cached_model(m.name, m.factory, seed, fit, key=m.key) for seed in (0, 1))  # type: ignore[return-value]


# -- measuring --------------------------------------------------------------------------------


@dataclass
class Tool:
    """One tool's timings and counts on one model."""

    timing: Any = None  # common.Timing of the warmed calls
    first: float | None = None  # the untimed warm-up call on this model
    rss_mb: float | None = None  # peak RSS increase during the warm-up call
    groups: int | None = None
    moved: int | None = None
    breakdown: dict[str, float] = field(default_factory=dict)  # permerge: median trace/match/apply
    alt: str = ""  # permerge: the same alignment with the other LAP backend


@dataclass
class Row:
    label: str
    params: int
    permerge: Tool
    rebasin: Tool
    barriers: dict[str, Any] = field(default_factory=dict)  # method -> BarrierResult
    am_seconds: float | None = None
    notes: list[str] = field(default_factory=list)


def rebasin_pcd(model_a: nn.Module, model_b: nn.Module, x: torch.Tensor) -> Any:
    """rebasin's PCD aligning ``model_b`` (permuted in place) to ``model_a``; returns the PCD object."""
    from rebasin import PermutationCoordinateDescent

    torch.manual_seed(0)  # PCD visits its permutations in torch.randperm order
    pcd = PermutationCoordinateDescent(model_a, model_b, x)
    pcd.rebasin()
    return pcd


def time_permerge(a: nn.Module, b: nn.Module, x: torch.Tensor, repeats: int) -> tuple[Tool, Any]:
    """Warm-up call (timed as ``first``, RSS sampled), then ``repeats`` timed calls of align()."""
    tool = Tool()
    with RssSampler() as rss, Timer() as t:
        res = permerge.align(a, b, x, method="weight", check=False, quiet=True)
    tool.first, tool.rss_mb = t.seconds, rss.peak_mb
    reports = []

    def call() -> Any:
        r = permerge.align(a, b, x, method="weight", check=False, quiet=True)
        reports.append(r.report["timing_s"])
        return r

    tool.timing = median_time(call, repeats)
    tool.breakdown = {k: sorted(r[k] for r in reports)[len(reports) // 2] for k in reports[0]}
    tool.groups, tool.moved = res.report["groups"], res.report["changed_groups"]
    # The default LAP backend is "auto" (lap if installed); scipy's is the other choice.
    with Timer() as t:
        alt = permerge.align(a, b, x, method="weight", check=False, quiet=True, backend="scipy")
    with Timer() as t1:
        permerge.align(a, b, x, method="weight", check=False, quiet=True, workers=1)
    with Timer() as tt:
        permerge.trace(a, x, cache=False)
    tool.alt = (f"permerge with backend='scipy' (1 call): {t.seconds:.2f} s [cpu {t.cpu:.2f}], match "
                f"{alt.report['timing_s']['match']:.2f} s, {alt.report['sweeps']} sweeps "
                f"(default backend {res.report['backend']}: {res.report['sweeps']} sweeps); "
                f"with workers=1 (LAPs sequential; default {permerge.match.weight.resolve_workers(None)}): "
                f"{t1.seconds:.2f} s; trace without the spec cache: {tt.seconds:.2f} s (timed calls reuse the "
                "spec cached by the warm-up call, as any second alignment of this architecture does)")
    return tool, res


def time_rebasin(a: nn.Module, b: nn.Module, x: torch.Tensor, repeats: int) -> tuple[Tool, nn.Module]:
    """Same protocol for rebasin (construct + rebasin() on a fresh copy of B, copied untimed)."""
    tool = Tool()
    b_copy = copy.deepcopy(b)
    with RssSampler() as rss, Timer() as t:
        pcd = rebasin_pcd(a, b_copy, x)
    tool.first, tool.rss_mb = t.seconds, rss.peak_mb
    tool.groups = len(pcd.pinit.model_graph.permutation_to_info)
    tool.moved = sum(
        not torch.equal(p.perm_indices, torch.arange(len(p.perm_indices)))
        for p, _ in pcd.pinit.model_graph.permutation_to_info
    )
    times, cpu = [], []
    for _ in range(repeats):
        fresh = copy.deepcopy(b)
        with Timer() as t:
            rebasin_pcd(a, fresh, x)
        times.append(t.seconds)
        cpu.append(t.cpu)
    tool.timing = Timing(tuple(times), None, tuple(cpu))
    return tool, b_copy


@torch.no_grad()
def fn_error(b: nn.Module, b_aligned: nn.Module, x: torch.Tensor, bn_data: torch.Tensor | None) -> float:
    """max |f_B(x) - f_B'(x)| / max |f_B(x)|; with ``bn_data`` both after a BN re-estimation."""
    if bn_data is not None:
        b, b_aligned = reset_bn_stats(b, bn_data, 2), reset_bn_stats(b_aligned, bn_data, 2)
    ref, out = b.eval()(x), b_aligned.eval()(x)
    return ((ref - out).abs().max() / ref.abs().max()).item()


def measure_trained(m: Trained, args: argparse.Namespace, train_data: Any, test_data: Any) -> Row:
    xtr, _ = train_data
    xte, yte = test_data
    a, b = load_pair(m, train_data, args.work_threads)
    is_conv = m.name != "mlp"
    if is_conv and args.conv_test_size < len(xte):
        xte, yte = xte[: args.conv_test_size], yte[: args.conv_test_size]
    gen = torch.Generator().manual_seed(0)
    bn_x = xtr[torch.randperm(len(xtr), generator=gen)[: 500 * args.bn_batches]]
    ex = xtr[:16]
    row = Row(m.label, num_params(a), Tool(), Tool())

    print(f"[{m.name}] timing permerge", file=sys.stderr)
    with num_threads(args.threads):
        row.permerge, wm = time_permerge(a, b, ex, args.repeats)
        print(f"[{m.name}] timing rebasin", file=sys.stderr)
        row.rebasin, rb = time_rebasin(a, b, ex, args.repeats)
        print(f"[{m.name}] activation matching", file=sys.stderr)
        am_data = [xtr[torch.randperm(len(xtr), generator=gen)[:256]] for _ in range(args.am_batches)]
        with Timer() as t:
            am = permerge.align(a, b, ex, method="activation", data=am_data, check=False, quiet=True)
        row.am_seconds = t.seconds
        wm_checked = permerge.align(a, b, ex, method="weight", quiet=True)  # check=True: raises if broken

    bn = has_batchnorm(a)
    err_x = xte[:500]
    errs = {
        "permerge WM": wm_checked.report["function_preservation_error"],
        "permerge AM": fn_error(b, am.model, err_x, None),
        "rebasin": fn_error(b, rb, err_x, None),
    }
    if bn:
        errs["rebasin after BN reset"] = fn_error(b, rb, err_x, bn_x)
    row.notes.append("fn err " + ", ".join(f"{k} {v:.1e}" for k, v in errs.items()))
    row.notes.append(row.permerge.alt)

    print(f"[{m.name}] barriers on {len(xte)} test images", file=sys.stderr)
    with num_threads(args.work_threads):
        ends = []
        for model in (a, b):
            ev = reset_bn_stats(model, bn_x, args.bn_batches) if bn else model
            ends.append(evaluate(ev, xte, yte))
        kw = dict(bn_data=bn_x, bn_batches=args.bn_batches, endpoints=tuple(ends), quiet=False)
        for method, model_b in (("naive", b), ("permerge WM", wm.model), ("permerge AM", am.model), ("rebasin PCD", rb)):
            row.barriers[method] = barrier(a, model_b, xte, yte, args.alphas, bn_reset=True, **kw)
            print(f"  {method}: {row.barriers[method].loss_barrier:.3f}", file=sys.stderr)
    row.notes.append(f"test acc A {ends[0][1]:.1%}, B {ends[1][1]:.1%} ({len(xte)} images)")
    return row


def measure_resnet50(args: argparse.Namespace) -> Row:
    torch.manual_seed(0)
    a = ResNet50().eval()
    torch.manual_seed(1)
    b = ResNet50().eval()
    ex = torch.randn(1, 3, args.resnet50_size, args.resnet50_size, generator=torch.Generator().manual_seed(0))
    row = Row(f"ResNet-50 (random init, {args.resnet50_size}²)", num_params(a), Tool(), Tool())
    with num_threads(args.threads):
        print("[resnet50] timing permerge", file=sys.stderr)
        row.permerge, res = time_permerge(a, b, ex, args.repeats)
        print("[resnet50] timing rebasin", file=sys.stderr)
        row.rebasin, _ = time_rebasin(a, b, ex, args.repeats)
    row.notes.append(row.permerge.alt)
    spec = res.spec
    hidden_frozen = [f for f in spec.frozen if not f.boundary]
    # Residual streams: groups holding the output channels of several blocks' conv3 (a stage's
    # whole stream: every conv3, the downsample, every next conv1's input).
    streams = [g for g in spec.groups if sum(ax.key.endswith("conv3.weight") and ax.dim == 0 for ax in g.members) > 1]
    full = res.report["changed_groups"] == len(spec.groups) and not hidden_frozen
    row.notes.append(
        f"permerge: {len(spec.groups)} groups, {res.report['changed_groups']} moved by weight matching, "
        f"{len(hidden_frozen)} hidden spaces frozen, {len(streams)} residual-stream groups "
        f"(sizes {[g.size for g in streams]}) -> {'fully weight-matched' if full else 'NOT fully matched'}"
    )
    return row


def warm_up_process() -> str:
    """First calls of both tools in this process (on a tiny MLP): the one-time costs."""
    torch.manual_seed(0)
    a, b = nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 2)), nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 2))
    x = torch.randn(3, 4)
    times = []
    for _ in range(2):
        with Timer() as tp:
            permerge.align(a, b, x, check=False, quiet=True)
        with Timer() as tr:
            rebasin_pcd(a, copy.deepcopy(b), x)
        times.append((tp.seconds, tr.seconds))
    (p1, r1), (p2, r2) = times
    return (
        f"process one-time cost (tiny MLP, 1st call vs 2nd): permerge.align {p1:.2f} s vs {p2:.3f} s; "
        f"rebasin PCD {r1:.2f} s vs {r2:.3f} s"
    )


# -- the table --------------------------------------------------------------------------------


def _barrier_cell(r: Any, extra: str = "") -> str:
    return "—" if r is None else f"{r.loss_barrier:.3f} / {100 * r.acc_barrier:.1f}%{extra}"


def _time_cell(t: Any) -> str:
    lo, hi = t.spread
    return f"{t.median:.2f} ({lo:.2f}–{hi:.2f}) [cpu {t.cpu_median:.2f}]"


def table(rows: list[Row]) -> str:
    header = [
        "model", "#params",
        "naive avg", "permerge WM", "permerge AM (time)", "rebasin PCD",
        "permerge e2e s (trace/match/apply)", "rebasin e2e s", "rebasin / permerge",
        "first call s: permerge / rebasin", "groups: permerge (moved) / rebasin perms (moved)",
        "peak ΔRSS MB: permerge / rebasin",
    ]  # fmt: skip
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for r in rows:
        p, q = r.permerge, r.rebasin
        bd = p.breakdown
        am = r.barriers.get("permerge AM")
        lines.append("| " + " | ".join([
            r.label, f"{r.params / 1e6:.2f}M",
            _barrier_cell(r.barriers.get("naive")),
            _barrier_cell(r.barriers.get("permerge WM")),
            _barrier_cell(am, f" ({r.am_seconds:.2f} s)" if am is not None else ""),
            _barrier_cell(r.barriers.get("rebasin PCD")),
            f"{_time_cell(p.timing)} ({bd['trace']:.2f}/{bd['match']:.2f}/{bd['apply']:.2f})",
            _time_cell(q.timing),
            f"{q.timing.median / p.timing.median:.1f}× (cpu {q.timing.cpu_median / p.timing.cpu_median:.1f}×)",
            f"{p.first:.2f} / {q.first:.2f}",
            f"{p.groups} ({p.moved}) / {q.groups} ({q.moved})",
            f"{p.rss_mb:.0f} / {q.rss_mb:.0f}",
        ]) + " |")  # fmt: skip
    return "\n".join(lines)


def verdicts(rows: list[Row], resnet50_s: float | None, r50_full: bool | None) -> list[str]:
    out = []
    with_b = [r for r in rows if r.barriers]
    if with_b:
        wm_ok = [r.barriers["permerge WM"].loss_barrier <= r.barriers["rebasin PCD"].loss_barrier for r in with_b]
        best_ok = [
            min(r.barriers["permerge WM"].loss_barrier, r.barriers["permerge AM"].loss_barrier)
            <= r.barriers["rebasin PCD"].loss_barrier
            for r in with_b
        ]
        out.append(
            f"- loss barrier ≤ rebasin's: permerge WM on {sum(wm_ok)}/{len(with_b)} models, "
            f"best of permerge WM/AM on {sum(best_ok)}/{len(with_b)}"
        )
    fast = [r.rebasin.timing.median / r.permerge.timing.median for r in rows]
    fast_cpu = [r.rebasin.timing.cpu_median / r.permerge.timing.cpu_median for r in rows]
    out.append(f"- ≥ 5× faster than rebasin end to end: wall {sum(f >= 5 for f in fast)}/{len(rows)} models "
               f"(ratios {', '.join(f'{f:.1f}×' for f in fast)}), CPU time {sum(f >= 5 for f in fast_cpu)}/{len(rows)} "
               f"({', '.join(f'{f:.1f}×' for f in fast_cpu)})")  # fmt: skip
    if resnet50_s is not None:
        cpu = rows[-1].permerge.timing.cpu_median
        out.append(f"- ResNet-50 fully weight-matched in < 10 s: {'yes' if r50_full and resnet50_s < 10 else 'no'} "
                   f"({resnet50_s:.2f} s wall median, {cpu:.2f} s CPU; "
                   f"{'all' if r50_full else 'not all'} groups matched)")  # fmt: skip
    return out


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--threads", type=int, default=2, help="torch threads for the timed alignments")
    parser.add_argument("--work-threads", type=int, default=1,
                        help="torch threads for training and evaluation (BENCHMARKING.md's training times are at 1)")
    parser.add_argument("--models", help="comma-separated subset of mlp,vgg,resnet20,resnet50")
    parser.add_argument("--quick", action="store_true",
                        help="smoke run: MLP trained 2 epochs + ResNet-50, 1 timing repeat, 1000 test images")
    parser.add_argument("--repeats", type=int, default=3, help="timed calls per tool (median reported)")
    parser.add_argument("--alphas", type=int, default=11, help="α grid points for the barriers")
    parser.add_argument("--conv-test-size", type=int, default=10000,
                        help="test images for the conv models' barriers (the MLP always uses all 10000)")
    parser.add_argument("--bn-batches", type=int, default=10, help="batches of 500 train images per BN reset")
    parser.add_argument("--am-batches", type=int, default=8, help="train batches of 256 for activation matching")
    parser.add_argument("--resnet50-size", type=int, default=224, help="input side for tracing ResNet-50")
    parser.add_argument("--out", type=Path, default=HERE / "results" / "align.md")
    args = parser.parse_args(argv)
    if args.quick:
        args.repeats, args.conv_test_size = 1, min(args.conv_test_size, 1000)
    names = args.models.split(",") if args.models else (["mlp", "resnet50"] if args.quick else
                                                        ["mlp", "vgg", "resnet20", "resnet50"])  # fmt: skip
    known = {"mlp", "vgg", "resnet20", "resnet50"}
    if set(names) - known:
        parser.error(f"unknown models {sorted(set(names) - known)}; choose from {sorted(known)}")
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    torch.set_num_threads(args.threads)
    wall = time.perf_counter()

    with num_threads(args.threads):
        first = warm_up_process()
    train_data, test_data = load_fashion_mnist("train"), load_fashion_mnist("test")
    rows, r50 = [], None
    for m in trained_models(args.quick):
        if m.name in names:
            rows.append(measure_trained(m, args, train_data, test_data))
    if "resnet50" in names:
        r50 = measure_resnet50(args)
        rows.append(r50)

    r50_full = None if r50 is None else any("-> fully weight-matched" in n for n in r50.notes)
    env = (
        f"torch {torch.__version__} · permerge {version('permerge')} · rebasin {version('rebasin')} · "
        f"threads {args.threads} (training/eval {args.work_threads}) · OMP_WAIT_POLICY={os.environ['OMP_WAIT_POLICY']} · "
        f"{platform.processor() or platform.machine()}, {os.cpu_count()} CPUs · {datetime.date.today().isoformat()}"
    )
    out = [env, "", "Barrier cells: test loss barrier / accuracy barrier (11-point α grid"
           if args.alphas == 11 else f"Barrier cells: loss / accuracy barrier ({args.alphas}-point α grid",
           ]  # fmt: skip
    out[-1] += (f"; BN statistics re-estimated at every α on {500 * args.bn_batches} train images; conv models on "
                f"{min(args.conv_test_size, 10000)} test images, MLP on 10000). Times: median (min–max) of "
                f"{args.repeats}, warmed.")  # fmt: skip
    out += ["", table(rows), ""]
    out += verdicts(rows, r50.permerge.timing.median if r50 else None, r50_full)
    out.append(f"- {first}")
    out += [f"- {r.label}: {n}" for r in rows for n in r.notes]
    out.append(f"- process peak RSS (getrusage): {peak_rss_mb():.0f} MB; benchmark wall time "
               f"{time.perf_counter() - wall:.0f} s")  # fmt: skip
    text = "\n".join(out)
    print(text)
    command = "python " + " ".join(shlex.quote(a) for a in [os.path.relpath(__file__, Path.cwd()), *(argv or sys.argv[1:])])
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(f"# permerge vs rebasin: alignment quality and speed\n\nCommand: `{command}`\n\n{text}\n")
    print(f"wrote {args.out}", file=sys.stderr)


if __name__ == "__main__":
    main()
