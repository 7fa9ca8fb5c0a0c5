"""PLeaS vs. ZipIt! vs. partial merging vs. weight-matching averaging, for two models with different label spaces.

Run from the repository root (needs Fashion-MNIST: ``apt-get install dataset-fashion-mnist``)::

    python benchmarks/pleas.py [--threads 1] [--train 10000] [--epochs 2] [--budgets 1,1.25,1.5,1.75,2]

Prints ONE markdown table, measured in one run, writes it (with the command line) to
``benchmarks/results/pleas.md`` and a plot to ``benchmarks/results/pleas.png``. Progress goes to
stderr.

Setup. Two ResNet-20 ×1 models (``permerge.models.ResNet20``, BatchNorm) from different seeds,
trained on disjoint halves of Fashion-MNIST's classes: A on classes 0–4, B on 5–9, each with its
own 5-way head (two label spaces, PLeaS's "different label spaces" setting; a shared 10-way head
trained on half the classes would only add a head that is wrong on the other half). ``--train``
images per task, ``--epochs`` epochs of the SGD recipe of ``BENCHMARKING.md``; cached in
``benchmarks/_cache``. Every merged model keeps both heads (``keep_heads=True``): its 10 logits are
A's 5 then B's 5, so

* **acc A** / **acc B**: task-aware accuracy, argmax over the task's own 5 logits on that task's
  test images (5000 each);
* **joint**: argmax over all 10 logits on all 10000 test images (the model must also tell which
  task an image belongs to, with two heads never trained against each other — hard even for the
  ensemble).

Methods (all merges use the same ``--unlabeled`` training images not used for training, half from
each task, labels unused):

* **ensemble**: both models, logits concatenated (the upper bound; twice the parameters).
* **WM average**: weight matching, then aligned averaging of the bodies (budget 1.0 by
  definition), both heads kept, BatchNorm statistics reset on the unlabeled data.
* **partial**: activation matching (once; its correlations choose which pairs stay apart), partial
  merge at the budget, BatchNorm reset.
* **PLeaS**: the same partial merge, then layer-wise least squares (``permerge.merge.pleas.pleas``).
* **ZipIt!** (``permerge.merge.zipit.zipit``): features merged within and across the two models at
  the same widths, BatchNorm reset. Its ``alpha`` / ``beta`` are chosen per budget from
  ``--zip-grid`` by joint accuracy on ``--val`` labeled training images per task that neither
  training nor the unlabeled set uses (never on the test images); the correlations are collected
  once and reused by every setting. **ZipIt!, no same-model merges** is its ``alpha=0, beta=0``
  setting (a greedy one-to-one matching across the models: partial merging's rule without the
  optimal assignment). **ZipIt!, zip depth d**: a partial zip at budget 1 (the groups past the
  fraction ``d`` of the layers keep both models' units: more parameters, separate heads).

``time`` is the merge's wall time (the activation matching's time is added to partial and PLeaS
at every budget, the statistics' time to every ZipIt! row; the ``alpha``/``beta`` selection is
not included and is reported under the table); ``params`` is the merged model's parameter count (a budget is a *width* ratio,
so parameters grow about quadratically with it: budget 2 has ~4× the parameters of one model,
twice the ensemble's, half of them zeros).
"""

from __future__ import annotations

import os

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")  # before torch is imported; see BENCHMARKING.md

import argparse
import datetime
import logging
import platform
import shlex
import sys
import time
from collections.abc import Callable
from functools import partial
from pathlib import Path

import torch
from torch import Tensor, nn

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import cached_model, load_fashion_mnist, train  # noqa: E402

from permerge.graph import trace_graph  # noqa: E402
from permerge.match import activation_matching, weight_matching  # noqa: E402
from permerge.merge.partial import partial_merge  # noqa: E402
from permerge.merge.pleas import pleas  # noqa: E402
from permerge.merge.zipit import ZipItResult, zipit  # noqa: E402
from permerge.models import ResNet20  # noqa: E402
from permerge.repair import reset_bn_stats  # noqa: E402

LOG = logging.getLogger("benchmarks.pleas")
ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benchmarks" / "results"


def task_split(x: Tensor, y: Tensor, task: int) -> tuple[Tensor, Tensor]:
    """Images of classes 5·task … 5·task+4, labels remapped to 0…4."""
    mask = (y >= 5 * task) & (y < 5 * task + 5)
    return x[mask], y[mask] - 5 * task


def trained(task: int, seed: int, args: argparse.Namespace, x: Tensor, y: Tensor) -> nn.Module:
    xt, yt = task_split(x, y, task)
    gen = torch.Generator().manual_seed(100 + task)
    idx = torch.randperm(len(xt), generator=gen)[: args.train]

    def fit(model: nn.Module, s: int) -> nn.Module:
        return train(model, xt[idx], yt[idx], recipe="sgd", seed=s, epochs=args.epochs, threads=args.threads)

    key = {"task": f"classes{5 * task}-{5 * task + 4}", "n": args.train, "epochs": args.epochs, "recipe": "sgd", "width": 1}
    return cached_model("resnet20-halfclasses", partial(ResNet20, width=1, num_classes=5), seed, fit, key=key)


def unlabeled(x: Tensor, y: Tensor, args: argparse.Namespace) -> list[Tensor]:
    """``--unlabeled`` training images outside both training subsets, half per task, in batches."""
    parts = []
    for task in (0, 1):
        xt, _ = task_split(x, y, task)
        gen = torch.Generator().manual_seed(100 + task)
        idx = torch.randperm(len(xt), generator=gen)[args.train : args.train + args.unlabeled // 2]
        parts.append(xt[idx])
    pool = torch.cat(parts)
    pool = pool[torch.randperm(len(pool), generator=torch.Generator().manual_seed(7))]
    return list(pool.split(args.batch))


def validation(x: Tensor, y: Tensor, args: argparse.Namespace) -> tuple[Tensor, Tensor]:
    """``--val`` labeled training images per task used by nothing else (labels 0..9), for choosing ZipIt!'s settings."""
    xs, ys = [], []
    for task in (0, 1):
        xt, yt = task_split(x, y, task)
        gen = torch.Generator().manual_seed(100 + task)
        first = args.train + args.unlabeled // 2
        idx = torch.randperm(len(xt), generator=gen)[first : first + args.val]
        xs.append(xt[idx])
        ys.append(yt[idx] + 5 * task)
    return torch.cat(xs), torch.cat(ys)


@torch.no_grad()
def logits_of(model: nn.Module, x: Tensor) -> Tensor:
    return torch.cat([model.eval()(xb) for xb in x.split(500)])


def accuracies(logits: Tensor, y: Tensor) -> tuple[float, float, float, float]:
    """(acc A, acc B, joint, joint by confidence) from 10 logits = A's 5 then B's 5."""
    a, b = y < 5, y >= 5
    acc_a = (logits[a, :5].argmax(1) == y[a]).float().mean().item()
    acc_b = (logits[b, 5:].argmax(1) == y[b] - 5).float().mean().item()
    joint = (logits.argmax(1) == y).float().mean().item()
    pa, pb = logits[:, :5].softmax(1), logits[:, 5:].softmax(1)
    pick_b = pb.max(1).values > pa.max(1).values
    conf = torch.where(pick_b, pb.argmax(1) + 5, pa.argmax(1))
    return acc_a, acc_b, joint, (conf == y).float().mean().item()


def params(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--train", type=int, default=10000, help="training images per task")
    p.add_argument("--epochs", type=int, default=2)
    p.add_argument("--test", type=int, default=1000, help="test images per task (the first ones of each task)")
    p.add_argument("--unlabeled", type=int, default=512, help="unlabeled images for matching/BN reset/least squares")
    p.add_argument("--batch", type=int, default=64)
    p.add_argument("--positions", type=int, default=32, help="output locations sampled per image per conv")
    p.add_argument("--ridge", type=float, default=1e-2)
    p.add_argument("--budgets", default="1,1.25,1.5,1.75,2")
    p.add_argument("--val", type=int, default=500, help="validation images per task (ZipIt!'s alpha/beta choice)")
    p.add_argument("--zip-grid", default="0:0,0:0.5,0:1,0.5:0.5,0.5:1,1:1",
                   help="ZipIt! alpha:beta settings tried per budget")
    p.add_argument("--zip-depths", default="0.5,0.75", help="partial zips (fractions of the layers) at budget 1")
    p.add_argument("--train-only", action="store_true", help="train (and cache) the two models, then stop")
    p.add_argument("--no-write", action="store_true", help="print only; do not write benchmarks/results")
    args = p.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s", stream=sys.stderr)
    logging.getLogger("permerge").setLevel(logging.WARNING)
    torch.set_num_threads(args.threads)

    x_train, y_train = load_fashion_mnist("train")
    x_test, y_test = load_fashion_mnist("test")
    keep = torch.cat([torch.nonzero((y_test >= 5 * t) & (y_test < 5 * t + 5)).flatten()[: args.test] for t in (0, 1)])
    x_test, y_test = x_test[keep], y_test[keep]
    t0 = time.perf_counter()
    model_a, model_b = trained(0, 0, args, x_train, y_train), trained(1, 1, args, x_train, y_train)
    LOG.info("models ready in %.0f s", time.perf_counter() - t0)
    if args.train_only:
        return
    data = unlabeled(x_train, y_train, args)
    budgets = [float(b) for b in args.budgets.split(",")]
    rows: list[dict] = []

    def row(budget: float | None, method: str, model: nn.Module | Tensor, n_params: int, seconds: float,
            setting: str = "") -> None:  # fmt: skip
        logits = model if isinstance(model, Tensor) else logits_of(model, x_test)
        acc_a, acc_b, joint, conf = accuracies(logits, y_test)
        rows.append(dict(budget=budget, method=method, setting=setting, params=n_params, acc_a=acc_a, acc_b=acc_b,
                         joint=joint, conf=conf, seconds=seconds))  # fmt: skip
        LOG.info("%-10s %s budget %s: A %.3f  B %.3f  joint %.3f / %.3f (%.1f s)", method, setting, budget, acc_a, acc_b,
                 joint, conf, seconds)  # fmt: skip

    logits_a, logits_b = logits_of(model_a, x_test), logits_of(model_b, x_test)
    a_mask, b_mask = y_test < 5, y_test >= 5
    acc_a = (logits_a[a_mask].argmax(1) == y_test[a_mask]).float().mean().item()
    acc_b = (logits_b[b_mask].argmax(1) == y_test[b_mask] - 5).float().mean().item()
    rows.append(dict(budget=None, method="model A", params=params(model_a), acc_a=acc_a, acc_b=None, joint=None, conf=None, seconds=0.0))
    rows.append(dict(budget=None, method="model B", params=params(model_b), acc_a=None, acc_b=acc_b, joint=None, conf=None, seconds=0.0))
    row(None, "ensemble", torch.cat([logits_a, logits_b], 1), params(model_a) + params(model_b), 0.0)

    traced = trace_graph(model_a, data[0])  # warm-up: the first torch.export of the process is slow
    t = time.perf_counter()
    traced = trace_graph(model_a, data[0])
    wm = weight_matching(traced.spec, model_a.state_dict(), model_b.state_dict(), seed=0)
    avg = partial_merge(traced.spec, model_a, model_b, wm.permutation, None, 1.0, keep_heads=True, example_inputs=data[0])
    avg_model = reset_bn_stats(avg.model, data, batches=len(data))
    row(1.0, "WM average", avg_model, params(avg_model), time.perf_counter() - t)

    t = time.perf_counter()
    am = activation_matching(model_a, model_b, traced.spec, data, return_costs=True, quiet=True)
    t_match = time.perf_counter() - t
    LOG.info("activation matching: %.1f s", t_match)
    for budget in budgets:
        t = time.perf_counter()
        part = partial_merge(traced.spec, model_a, model_b, am.permutation, am.costs, budget, keep_heads=True,
                             example_inputs=data[0])  # fmt: skip
        t_part = t_match + time.perf_counter() - t
        row(budget, "partial, no BN reset", part.model, params(part.model), t_part)
        t = time.perf_counter()
        part_model = reset_bn_stats(part.model, data, batches=len(data))
        row(budget, "partial", part_model, params(part_model), t_part + time.perf_counter() - t)
        t = time.perf_counter()
        res = pleas(model_a, model_b, data, budget=budget, keep_heads=True, perm=am.permutation, costs=am.costs,
                    batches=len(data), positions=args.positions, ridge=args.ridge, quiet=True)  # fmt: skip
        assert all(f.after <= f.before for f in res.layers), "least squares increased its objective"
        row(budget, "PLeaS", res.model, params(res.model), t_match + time.perf_counter() - t)

    selection = zip_rows(model_a, model_b, data, budgets, args, row, x_train, y_train)
    table = render(rows, budgets, selection)
    sys.stdout.write(table + "\n")
    if not args.no_write:
        RESULTS.mkdir(parents=True, exist_ok=True)
        command = "python " + shlex.join(["benchmarks/pleas.py", *sys.argv[1:]])
        env = f"{platform.processor() or platform.machine()}, torch {torch.__version__}, {args.threads} thread(s), {datetime.date.today()}"
        (RESULTS / "pleas.md").write_text(f"`{command}`  ({env})\n\n{table}\n")
        plot(rows, budgets, RESULTS / "pleas.png")


def zip_rows(model_a: nn.Module, model_b: nn.Module, data: list[Tensor], budgets: list[float], args: argparse.Namespace,
             row: Callable[..., None], x_train: Tensor, y_train: Tensor) -> str:  # fmt: skip
    """ZipIt! at every budget with alpha/beta chosen on validation images; returns a note on the choice."""
    x_val, y_val = validation(x_train, y_train, args)
    grid = [tuple(float(v) for v in pair.split(":")) for pair in args.zip_grid.split(",")]
    t = time.perf_counter()
    stats = zipit([model_a, model_b], data, budget=1.0, keep_heads=True, batches=len(data), quiet=True)  # statistics once
    t_stats = stats.timing["plan"] + stats.timing["statistics"]
    LOG.info("ZipIt! statistics: %.1f s", t_stats)
    chosen: dict[float, tuple[float, float]] = {}
    t_select = time.perf_counter()

    def zip_at(budget: float, alpha: float, beta: float, depth: float | None = None) -> ZipItResult:
        return zipit([model_a, model_b], data, alpha=alpha, beta=beta, budget=budget, depth=depth, keep_heads=True,
                     correlations=stats.correlations, batches=len(data), quiet=True)  # fmt: skip

    for budget in budgets:
        scored = []
        for alpha, beta in grid:
            z = zip_at(budget, alpha, beta)
            joint = (logits_of(z.model, x_val).argmax(1) == y_val).float().mean().item()
            scored.append((joint, -len(scored), alpha, beta, z))
            LOG.info("ZipIt! budget %g alpha %g beta %g: validation joint %.3f", budget, alpha, beta, joint)
        _, _, alpha, beta, z = max(scored, key=lambda c: c[:2])
        chosen[budget] = (alpha, beta)
        row(budget, "ZipIt!", z.model, params(z.model), t_stats + z.seconds, f"(α={alpha:g}, β={beta:g})")
        plain = next((c[4] for c in scored if c[2:4] == (0.0, 0.0)), None) or zip_at(budget, 0.0, 0.0)
        row(budget, "ZipIt!, no same-model merges", plain.model, params(plain.model), t_stats + plain.seconds)
    t_select = time.perf_counter() - t_select
    alpha, beta = chosen.get(1.0, next(iter(chosen.values())))
    for depth in [float(d) for d in args.zip_depths.split(",") if d]:
        z = zip_at(1.0, alpha, beta, depth)
        row(1.0, f"ZipIt!, zip depth {depth:g}", z.model, params(z.model), t_stats + z.seconds,
            f"(α={alpha:g}, β={beta:g})")
    LOG.info("ZipIt! rows in %.0f s", time.perf_counter() - t)
    return (f"ZipIt!'s α, β per budget chosen from {len(grid)} settings ({args.zip_grid}) by joint accuracy on "
            f"{2 * args.val} validation images (training images outside both training subsets and the unlabeled set), "
            f"{t_select:.0f} s for the whole selection.")  # fmt: skip


def mean(r: dict) -> float | None:
    return None if r["acc_a"] is None or r["acc_b"] is None else (r["acc_a"] + r["acc_b"]) / 2


def render(rows: list[dict], budgets: list[float], selection: str) -> str:
    by = {(r["method"], r["budget"]): r for r in rows}
    avg, ens = by[("WM average", 1.0)], by[("ensemble", None)]
    lines = [
        "| budget | method | params | acc A | acc B | mean | joint | joint (conf) | time (s) |",
        "|---:|---|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for r in sorted(rows, key=lambda r: -1.0 if r["budget"] is None else r["budget"]):  # stable: by budget
        b = "–" if r["budget"] is None else f"{r['budget']:.2f}"
        pct = lambda v: "–" if v is None else f"{100 * v:.1f}"  # noqa: E731
        name = f"{r['method']} {r.get('setting', '')}".strip()
        lines.append(
            f"| {b} | {name} | {r['params'] / 1e3:.0f}k | {pct(r['acc_a'])} | {pct(r['acc_b'])} "
            f"| {pct(mean(r))} | {pct(r['joint'])} | {pct(r['conf'])} | {r['seconds']:.1f} |"
        )

    def ordered(metric: Callable[[dict], float]) -> str:
        ok = [b for b in budgets
              if metric(by[("PLeaS", b)]) >= metric(by[("partial", b)]) >= metric(avg)]  # fmt: skip
        return ", ".join(f"{b:g}: {'yes' if b in ok else 'no'}" for b in budgets)

    def at_least(first: str, second: str, metric: Callable[[dict], float]) -> str:
        return ", ".join(f"{b:g}: {'yes' if metric(by[(first, b)]) >= metric(by[(second, b)]) else 'no'}" for b in budgets)

    def lead(metric: Callable[[dict], float]) -> str:
        return ", ".join(f"{b:g}: {100 * (metric(by[('PLeaS', b)]) - metric(by[('ZipIt!', b)])):+.1f}" for b in budgets)

    def closed(method: str, metric: Callable[[dict], float], budget: float) -> str:
        gap = metric(ens) - metric(avg)
        return f"{100 * (metric(by[(method, budget)]) - metric(avg)) / gap:.0f}%" if gap > 0 else "n/a (no gap)"

    first = budgets[0]
    joint, conf = (lambda r: r["joint"]), (lambda r: r["conf"])
    lines += [
        "",
        "acc A / acc B: task-aware (argmax over the task's own head); mean: their mean; joint: argmax over all 10 "
        "logits; joint (conf): the head with the more confident softmax decides. 'partial' and 'PLeaS' share one "
        "activation matching (its time is included in both), the ZipIt! rows share one collection of statistics "
        "(likewise); every merge but 'partial, no BN reset' has its BatchNorm statistics re-estimated on the "
        "unlabeled images. " + selection,
        "",
        f"PLeaS ≥ partial ≥ WM average, per budget — mean task accuracy: {ordered(mean)}; joint: {ordered(joint)}; "
        f"joint (conf): {ordered(conf)}.",
        f"ZipIt! ≥ partial at equal width, per budget — mean task accuracy: {at_least('ZipIt!', 'partial', mean)}; "
        f"joint: {at_least('ZipIt!', 'partial', joint)}; joint (conf): {at_least('ZipIt!', 'partial', conf)}.",
        f"PLeaS − ZipIt!, per budget (points) — mean task accuracy: {lead(mean)}; joint: {lead(joint)}; "
        f"joint (conf): {lead(conf)}.",
        f"At budget {first:g}, of the gap between WM averaging and the ensemble, PLeaS closes {closed('PLeaS', mean, first)} "
        f"in mean task accuracy ({closed('PLeaS', joint, first)} in joint, {closed('PLeaS', conf, first)} in joint (conf)), "
        f"ZipIt! {closed('ZipIt!', mean, first)} ({closed('ZipIt!', joint, first)}, {closed('ZipIt!', conf, first)}).",
    ]
    return "\n".join(lines)


def plot(rows: list[dict], budgets: list[float], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 3, figsize=(14, 4))
    by = {(r["method"], r["budget"]): r for r in rows}
    panels = (("mean task accuracy", mean), ("joint accuracy (argmax of 10 logits)", lambda r: r["joint"]),
              ("joint accuracy (more confident head)", lambda r: r["conf"]))  # fmt: skip
    for ax, (title, metric) in zip(axes, panels):
        for method, style in (("partial, no BN reset", "x:"), ("partial", "o-"), ("PLeaS", "s-"), ("ZipIt!", "^-")):
            ax.plot(budgets, [100 * metric(by[(method, b)]) for b in budgets], style, label=method)
        ax.axhline(100 * metric(by[("ensemble", None)]), color="k", ls="--", label="ensemble")
        ax.axhline(100 * metric(by[("WM average", 1.0)]), color="gray", ls="-.", label="WM average")
        ax.set_xlabel("budget (merged width / original width)")
        ax.set_ylabel("test accuracy (%)")
        ax.set_title(title)
        ax.grid(alpha=0.3)
    axes[0].legend()
    fig.suptitle("Two ResNet-20s (Fashion-MNIST classes 0–4 / 5–9, own 5-way heads) merged keeping both heads")
    fig.tight_layout()
    fig.savefig(path, dpi=120)


if __name__ == "__main__":
    main()
