"""Measure the barriers between two checkpoints, naive and aligned (and repaired), on train and test data.

Evaluates (1-α)·A + α·B for every α on --test-data (and --train-data when given): naive (B as
given), aligned (B weight-matched to A; skipped with --align none), aligned + BatchNorm reset at
every α (models with BatchNorm; off with --bn-reset-batches 0) and, with --repair, aligned +
REPAIR. Metrics come from --metrics, each with its direction stated: "classification"
(cross-entropy loss, accuracy) or "causal-lm" (next-token loss, perplexity, token accuracy; the
default for Hugging Face causal LMs, whose batches are (token ids, labels) with -100 at padding).
Every barrier is reported by both definitions: "line" (Entezari et al. 2022: the excess over the
straight line between the endpoints' values) and "mean" (Git Re-Basin, Ainsworth et al. 2023:
the excess over the endpoints' mean). BN reset and REPAIR measure statistics on --stats-data
(default: --train-data, else --test-data). Writes OUT/curves.json (every value, both barriers per
dataset and metric), OUT/curves.csv, OUT/barrier.png (or .svg), OUT/spec.json (when aligned),
OUT/provenance.json and OUT/report.html (self-contained: open it in a browser); inputs are never
modified; OUT must be new or empty unless --force.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from functools import partial
from typing import Any

from permerge.align import align
from permerge.batches import call_kwargs
from permerge.cli._checkpoints import add_metrics_argument, batches_from, load_into, metrics_from
from permerge.cli._common import Outcome, config_of, result_outcome
from permerge.cli._models import add_model_arguments, load_model
from permerge.demo import compare_curves, curves_csv
from permerge.errors import PermergeError
from permerge.evaluate import BARRIERS, Curve, metrics_for
from permerge.io.outputs import OutputDir
from permerge.io.write import text_writer
from permerge.plot import plot_curves
from permerge.progress import phase
from permerge.report import write_report

HELP = "barriers (both definitions) between two checkpoints on train/test data: naive, aligned, BN reset, REPAIR"
EPILOG = """examples:
  permerge barrier --model vgg a.safetensors b.safetensors --train-data mypkg.data:train --test-data mypkg.data:test -o barrier/ --repair
  permerge barrier --model llama-a/ llama-a/ llama-b/ --test-data mypkg.text:batches --metrics causal-lm -o lm-barrier/
  permerge barrier --model mypkg.nets:mlp --input-shape 2,784 a.pt b.pt --test-data mypkg.data:test --alphas 21 --align none -o naive/
"""


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("a", help="checkpoint of model A: .safetensors, .pt/.pth, or a directory")
    p.add_argument("b", help="checkpoint of model B")
    p.add_argument("--model", required=True, help="architecture: built-in example, package.module:factory, or HF dir")
    add_model_arguments(p, positional=False)
    p.add_argument("--test-data", "--data", dest="test_data", required=True,
                   help="package.module:function returning batches of (inputs, targets): the test data")  # fmt: skip
    p.add_argument("--train-data", help="package.module:function for the training data (evaluated too: train-vs-test)")
    p.add_argument("--stats-data", help="package.module:function for BN reset / REPAIR statistics (default: train, else test)")
    add_metrics_argument(p)
    p.add_argument("-o", "--out", required=True, help="output directory (new or empty, unless --force)")
    p.add_argument("--alphas", type=int, default=11, help="points on the α grid from 0 to 1 (default 11)")
    p.add_argument("--align", choices=("weight", "none"), default="weight", help="align B to A first (default weight)")
    p.add_argument("--bn-reset-batches", type=int, default=10, help="batches for BatchNorm reset (0: no BN-reset curve)")
    p.add_argument("--repair", action="store_true", help="add the REPAIR curve")
    p.add_argument("--repair-batches", type=int, default=10, help="batches REPAIR measures statistics on (default 10)")
    p.add_argument("--plot-format", choices=("png", "svg"), default="png")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--force", action="store_true", help="replace a non-empty OUT, all of it")


def _table(curves: dict[str, Curve], dataset: str) -> str:
    first = next(iter(curves.values()))
    metrics = [m for m in first.values[dataset] if m in first.higher_is_better]
    cols = [f"{m} {d}" for m in metrics for d in BARRIERS]
    width = max(len("curve"), *(len(k) for k in curves))
    lines = [f"{'curve':<{width}}  " + "  ".join(f"{c:>14}" for c in cols)]
    for label, c in curves.items():
        lines.append(f"{label:<{width}}  " + "  ".join(f"{c.barrier(m, dataset, d) + 0.0:>14.4f}" for m in metrics for d in BARRIERS))
    return "\n".join(lines)


def run(args: argparse.Namespace) -> Outcome:
    if args.alphas < 2:
        raise PermergeError(f"--alphas must be at least 2 (the endpoints), got {args.alphas}")
    inputs = {"a": args.a, "b": args.b}
    metrics = metrics_from(args.metrics)
    with OutputDir(args.out, force=args.force, inputs=inputs, quiet=args.quiet) as out:
        times: dict[str, float] = {}
        t0 = time.perf_counter()
        with phase("loading models and data", quiet=args.quiet):
            ref = load_model(args.model, args)
            a, b = load_into(ref.model, args.a, "A"), load_into(ref.model, args.b, "B")
            metrics = metrics or metrics_for(a)
            data = {"test": batches_from(args.test_data, "--test-data")}
            if args.train_data:
                data = {"train": batches_from(args.train_data, "--train-data"), **data}
            stats = batches_from(args.stats_data, "--stats-data") if args.stats_data else data.get("train", data["test"])
        times["load models and data"] = time.perf_counter() - t0
        aligned = None
        if args.align != "none":
            t0 = time.perf_counter()
            aligned = align(a, b, ref.inputs, args.align, example_kwargs={**call_kwargs(a), **ref.kwargs}, seed=args.seed,
                            quiet=args.quiet)  # fmt: skip
            times["align"] = time.perf_counter() - t0
        t0 = time.perf_counter()
        with phase("interpolation curves", quiet=args.quiet):
            curves = compare_curves(
                a, b, data, ref.inputs, align_method=None, aligned=aligned.model if aligned else None, stats_data=stats,
                bn_batches=args.bn_reset_batches, repair=args.repair, repair_batches=args.repair_batches,
                alphas=args.alphas, metrics=metrics, seed=args.seed,
                labels={"bn": "naive+BN reset", "repair": "naive+REPAIR"} if aligned is None else None,
            )  # fmt: skip
        times["curves"] = time.perf_counter() - t0
        plot = f"barrier.{args.plot_format}"
        files = {
            "curves.json": text_writer(json.dumps({k: c.to_dict() for k, c in curves.items()}, indent=1) + "\n"),
            "curves.csv": text_writer(curves_csv(curves)),
            plot: lambda p: plot_curves(curves, p, title=f"{args.a} → {args.b}", format=args.plot_format),
        }
        report: dict[str, Any] = {"barriers": {k: c.summary() for k, c in curves.items()}, "timing_s": times}
        if aligned is not None:
            files["spec.json"] = text_writer(aligned.spec.to_json())
            report["align"] = aligned.report
        out.commit(files, command=sys.argv, config=config_of(args), report=report,
                   view=partial(write_report, title=f"permerge barrier: {args.a} → {args.b}"))  # fmt: skip
    tables = "\n\n".join(f"barriers on {ds}:\n{_table(curves, ds)}" for ds in data)
    definitions = "; ".join(f"{k}: {d.formula} ({d.source})" for k, d in BARRIERS.items())
    names = ", ".join(sorted(p.name for p in out.out.iterdir()))
    return result_outcome("barrier", out.out, f"{tables}\n\n{definitions}\nwrote {names} to {args.out}", report)
