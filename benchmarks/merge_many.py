"""N-model merging on Fashion-MNIST: naive averaging vs MergeMany vs C2M3, with and without BN reset / REPAIR.

Run from the repository root (needs Fashion-MNIST: ``apt-get install dataset-fashion-mnist``)::

    nohup python benchmarks/merge_many.py [--threads 1] [--runs mlp:3,mlp:5,mlp-half:3,mlp-half:5,vgg:3] > merge_many.log 2>&1 &

Prints ONE markdown table, measured in one run, and writes it (with the command line) to
``benchmarks/results/merge_many.md``; progress goes to stderr.

Members (``merge_many_models.py``, trained once and cached in ``benchmarks/_cache``): MLPs
784-512x3-10 trained normally (``mlp``), the same 1024 wide (``mlp-wide``), and 512 wide as in Git
Re-Basin's MergeMany experiment, each on its own random half of the training set for 100 epochs
(``mlp-half``); VGG 32-32-64-64 + BN (``vgg``). A run ``setting:N`` merges members 0..N-1; "best
member" is the one with the lowest test loss.

Per run, every merge is evaluated on the full 10k test set (``permerge.evaluate.evaluate``):

* **members**: the best member (lowest test loss) and the members' mean; the **ensemble** (mean
  predicted probabilities, N× the compute) as the reference a merge approximates;
* **naive**: the plain average of the members as trained;
* **MergeMany**: ``permerge.merge_many`` (each model weight-matched to the mean of the others
  until a round raises the objective by at most ``tol·|F|``);
* **C2M3**: ``permerge.c2m3_merge`` (Frank–Wolfe over all pairwise objectives through a
  universe; projected, then refined by MergeMany rounds) and **C2M3, no refine** (the paper's
  projection alone);

each as merged, after a **BN reset** (BN nets: statistics re-estimated on ``--stats-batches``
batches of 100 training images) and after **REPAIR** toward the members' mean statistics
(``permerge.repair.repair_merge``, on the same batches). ``F`` is the objective both matchers
maximise, ``Σ_{i<j} ⟨π_i θ_i, π_j θ_j⟩``; ``rounds`` are MergeMany rounds (C2M3: Frank–Wolfe
iterations + refining rounds).
"""

from __future__ import annotations

import os

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")  # before torch is imported; see BENCHMARKING.md

import argparse
import datetime
import logging
import math
import platform
import sys
import time
import warnings
from collections.abc import Callable
from dataclasses import replace
from pathlib import Path
from typing import Any

import torch
from torch import nn

HERE = Path(__file__).resolve().parent
sys.path[:0] = [str(HERE), str(HERE.parent / "src")]

from common import load_fashion_mnist, save_results  # noqa: E402
from merge_many_models import SETTINGS  # noqa: E402

import permerge  # noqa: E402
from permerge.demo import has_batchnorm  # noqa: E402
from permerge.evaluate import accuracy, evaluate  # noqa: E402
from permerge.merge.many import MergeManyResult, NotConvergedWarning  # noqa: E402
from permerge.repair import repair_merge, reset_bn_stats  # noqa: E402

LOG = logging.getLogger("benchmarks.merge_many")
LOSS = nn.functional.cross_entropy


def score(model: nn.Module, test: list[tuple[torch.Tensor, torch.Tensor]]) -> tuple[float, float]:
    r = evaluate(model, test, LOSS, {"accuracy": accuracy})
    return r["loss"], r["accuracy"]


class Ensemble(nn.Module):
    """The members' mean predicted probabilities (as log-probabilities): the N×-compute reference."""

    def __init__(self, members: list[nn.Module]) -> None:
        super().__init__()
        self.members = nn.ModuleList(members)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        logp = torch.stack([m(x).log_softmax(-1) for m in self.members])
        return logp.logsumexp(0) - math.log(len(self.members))


def fixes(merged: nn.Module, aligned: list[nn.Module], stats: list[Any], batches: int) -> dict[str, nn.Module]:
    """The merge as is, after a BN reset (BN nets) and after REPAIR toward the members' mean."""
    out = {"merged": merged}
    if has_batchnorm(merged):
        out["BN reset"] = reset_bn_stats(merged, stats, batches=batches)
    out["REPAIR"] = repair_merge(aligned, merged, stats, batches=batches)
    return out


HEADER = (
    "| models | merge | rounds | converged | F | test loss / acc (%): as merged | + BN reset | + REPAIR | "
    "best variant vs best member (loss / acc) | merge s |\n|---|---|---|---|---|---|---|---|---|---|"
)


def run(setting: str, n: int, x: torch.Tensor, y: torch.Tensor, test: list[Any], stats: list[Any],
        args: argparse.Namespace) -> tuple[list[str], dict[str, Any]]:  # fmt: skip
    """One ``setting:N`` run: its table rows and the numbers the verdicts need."""
    s = SETTINGS[setting]
    members = [s.member(seed, x, y, args.threads) for seed in range(n)]
    scores = [score(m, test) for m in members]
    best = min(range(n), key=lambda i: scores[i][0])
    spec = permerge.trace(members[0], x[:2])
    label = f"{n} × {s.label}"
    mean_loss, mean_acc = sum(v[0] for v in scores) / n, sum(v[1] for v in scores) / n
    rows = [f"| {label} | members: best (seed {best}) / mean | — | — | — | {scores[best][0]:.4f} / "
            f"{100 * scores[best][1]:.2f} | — | — | mean: {mean_loss:.4f} / {100 * mean_acc:.2f} | — |"]  # fmt: skip
    ens_loss, ens_acc = score(Ensemble(members), test)
    rows.append(f"| {label} | ensemble of the {n} ({n}× compute; reference) | — | — | — | {ens_loss:.4f} / "
                f"{100 * ens_acc:.2f} | — | — | {100 * (ens_loss / scores[best][0] - 1):+.1f}% / "
                f"{100 * (ens_acc - scores[best][1]):+.2f} pt | — |")  # fmt: skip
    out: dict[str, Any] = {"label": label, "best": scores[best], "top_acc": max(a for _, a in scores), "merges": {},
                           "check": 0.0}  # fmt: skip
    raw: list[MergeManyResult] = []  # C2M3's projection, refined below (= c2m3_merge(refine=True), tested)

    def c2m3_projection() -> MergeManyResult:
        raw.append(permerge.c2m3_merge(members, x[:2], spec=spec, refine=False, quiet=True))
        return raw[0]

    def c2m3_refined() -> MergeManyResult:
        res = permerge.merge_many(members, x[:2], spec=spec, init=raw[0].permutations, max_rounds=args.max_rounds)
        return replace(res, rounds=raw[0].rounds + res.rounds, objectives=raw[0].objectives + res.objectives,
                       objective_before=raw[0].objective_before, method="c2m3", seconds=raw[0].seconds + res.seconds)  # fmt: skip

    mergers: dict[str, Callable[[], MergeManyResult | None]] = {
        "naive": lambda: None,
        "MergeMany": lambda: permerge.merge_many(members, x[:2], spec=spec, max_rounds=args.max_rounds),
        "C2M3, no refine": c2m3_projection,
        "C2M3": c2m3_refined,
    }
    for name, merger in mergers.items():
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always", NotConvergedWarning)
            res = merger()
        seconds = 0.0 if res is None else res.seconds
        if res is None:
            merged, aligned, info = permerge.merge(members), members, "— | — | —"
        else:
            merged, aligned = res.merged, list(res.aligned)
            conv = "yes" if res.converged else f"**no** ({len(caught)} warning{'s' * (len(caught) != 1)})"
            info = f"{res.rounds} | {conv} | {res.objective_after:.1f}"
            out["check"] = max(out["check"], res.function_preservation_error)
        variants = {k: score(m, test) for k, m in fixes(merged, aligned, stats, args.stats_batches).items()}
        out["merges"][name] = variants
        cell = {k: f"{v[0]:.4f} / {100 * v[1]:.2f}" for k, v in variants.items()}
        top_loss, top_acc = min(v[0] for v in variants.values()), max(v[1] for v in variants.values())
        rows.append(f"| {label} | {name} | {info} | {cell['merged']} | {cell.get('BN reset', '—')} | {cell['REPAIR']} | "
                    f"{100 * (top_loss / scores[best][0] - 1):+.1f}% / {100 * (top_acc - scores[best][1]):+.2f} pt | "
                    f"{seconds:.1f} |")  # fmt: skip
        LOG.info("%s, %s: %s (%.1f s)", label, name, cell, seconds)
    return rows, out


def verdicts(results: list[dict[str, Any]]) -> str:
    """The issue's targets: the best merge vs the best member (MLPs), and C2M3 vs MergeMany."""
    lines = ["Targets:"]
    for r in results:
        if "MLP" not in r["label"]:
            continue
        variants = [((m, f), v) for m, fs in r["merges"].items() for f, v in fs.items()]
        (name, fix), (loss, acc) = min(variants, key=lambda t: t[1][0])  # the lowest test loss
        ok = loss < r["best"][0] and acc >= r["best"][1]
        lines.append(f"- {r['label']}: best merge ({name}, {fix}) {loss:.4f} / {100 * acc:.2f}% vs best member "
                     f"{r['best'][0]:.4f} / {100 * r['best'][1]:.2f}%: {'met' if ok else '**not met**'} "
                     f"(most accurate member: {100 * r['top_acc']:.2f}%)")  # fmt: skip
    pairs = [(r["label"], f, r["merges"]["C2M3"][f], r["merges"]["MergeMany"][f]) for r in results
             for f in r["merges"]["C2M3"]]  # fmt: skip
    worse = [f"{lab} ({f})" for lab, f, c, m in pairs if c[0] > m[0] or c[1] < m[1]]
    lines.append(f"- C2M3 ≥ MergeMany (test loss ≤ and accuracy ≥): {len(pairs) - len(worse)}/{len(pairs)}"
                 + (f"; not on {', '.join(worse)}" if worse else ""))  # fmt: skip
    lines.append(f"- every member's permutation keeps its function (the check align runs): largest relative "
                 f"error {max(r['check'] for r in results):.1e}")  # fmt: skip
    return "\n".join(lines)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--runs", default="mlp:3,mlp:5,mlp-wide:3,mlp-wide:5,mlp-half:3,mlp-half:5,vgg:3",
                   help="setting:N, comma-separated")
    p.add_argument("--stats-batches", type=int, default=20, help="batches of 100 training images for BN reset / REPAIR")
    p.add_argument("--max-rounds", type=int, default=100)
    args = p.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s", stream=sys.stderr)
    logging.getLogger("permerge").setLevel(logging.WARNING)
    torch.set_num_threads(args.threads)
    start = time.perf_counter()
    x, y = load_fashion_mnist("train")
    xt, yt = load_fashion_mnist("test")
    test = [(xt[i : i + 1000], yt[i : i + 1000]) for i in range(0, len(xt), 1000)]
    stats = [(x[i : i + 100], y[i : i + 100]) for i in range(len(x) - 100 * args.stats_batches, len(x), 100)]
    rows, results = [], []
    for item in args.runs.split(","):
        setting, n = item.split(":")
        r, res = run(setting, int(n), x, y, test, stats, args)
        rows += r
        results.append(res)
    table = HEADER + "\n" + "\n".join(rows) + "\n\n" + verdicts(results)
    print(table)
    note = (
        f"Measured {datetime.date.today()} on {platform.machine()} ({os.cpu_count()} CPU cores, shared), torch "
        f"{torch.__version__}, {args.threads} thread(s); {time.perf_counter() - start:.0f} s in all (merge times are "
        "wall times on a shared machine: noisy). Test loss / accuracy on all 10k test images; BN reset and REPAIR on "
        f"{args.stats_batches} batches of 100 training images (the last ones of the training set). 'F' is "
        "Σ_{i<j} ⟨π_i θ_i, π_j θ_j⟩ of the aligned members (higher = better matched)."
    )
    out = save_results("merge_many", "N-model merging: naive / MergeMany / C2M3, with BN reset and REPAIR", table, note)
    LOG.info("wrote %s", out)


if __name__ == "__main__":
    main()
