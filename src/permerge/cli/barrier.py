"""Measure the loss and accuracy barrier between two checkpoints, naive and aligned (and repaired).

Evaluates (1-α)·A + α·B on --data for every α: naive (B as given), aligned (B weight-matched to
A; skipped with --align none), aligned + BatchNorm reset at every α (models with BatchNorm; off
with --bn-reset-batches 0) and, with --repair, aligned + REPAIR. BN reset and REPAIR measure
statistics on --stats-data (default: --data). Writes OUT/curves.json (every value plus barriers
and midpoint gaps), OUT/curves.csv, OUT/barrier.png (or .svg) and OUT/provenance.json, all or
nothing; inputs are never modified; OUT must be new or empty unless --force.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Iterable, Iterator
from typing import Any

from permerge.cli._checkpoints import load_into, resolve_callable
from permerge.cli._models import add_model_arguments, load_model
from permerge.demo import compare_curves, curves_csv
from permerge.errors import PermergeError
from permerge.io.outputs import write_files
from permerge.io.write import prepare_output_dir, text_writer
from permerge.plot import plot_curves

HELP = "loss/accuracy barrier between two checkpoints (naive, aligned, BN reset, REPAIR)"
EPILOG = """examples:
  permerge barrier --model vgg a.safetensors b.safetensors --data mypkg.data:test_loader -o barrier/ --repair
  permerge barrier --model mypkg.nets:mlp --input-shape 2,784 a.pt b.pt --data mypkg.data:test_loader \\
      --stats-data mypkg.data:train_loader --alphas 21 --align none -o naive/
"""


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("a", help="checkpoint of model A: .safetensors, .pt/.pth, or a directory")
    p.add_argument("b", help="checkpoint of model B")
    p.add_argument("--model", required=True, help="architecture: built-in example, package.module:factory, or HF dir")
    add_model_arguments(p, positional=False)
    p.add_argument("--data", required=True, help="package.module:function returning a DataLoader of (inputs, targets)")
    p.add_argument("--stats-data", help="package.module:function for BN reset / REPAIR statistics (default: --data)")
    p.add_argument("-o", "--out", required=True, help="output directory (new or empty, unless --force)")
    p.add_argument("--alphas", type=int, default=11, help="points on the α grid from 0 to 1 (default 11)")
    p.add_argument("--align", choices=("weight", "none"), default="weight", help="align B to A first (default weight)")
    p.add_argument("--bn-reset-batches", type=int, default=10, help="batches for BatchNorm reset (0: no BN-reset curve)")
    p.add_argument("--repair", action="store_true", help="add the REPAIR curve")
    p.add_argument("--repair-batches", type=int, default=10, help="batches REPAIR measures statistics on (default 10)")
    p.add_argument("--plot-format", choices=("png", "svg"), default="png")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--force", action="store_true", help="write into a non-empty OUT (replacing our files only)")


def _loader(ref: str, flag: str) -> Iterable[Any]:
    data = resolve_callable(ref)
    if not callable(data):
        raise PermergeError(f"{flag} {ref!r} is not a function")
    data = data()
    if isinstance(data, Iterator):  # a generator would be used up by the first α
        data = list(data)
    if not isinstance(data, Iterable):
        raise PermergeError(f"{flag} {ref!r} returned {type(data).__name__}, not an iterable of (inputs, targets) batches")
    return data


def run(args: argparse.Namespace) -> int:
    if args.alphas < 2:
        raise PermergeError(f"--alphas must be at least 2 (the endpoints), got {args.alphas}")
    inputs = {"a": args.a, "b": args.b}
    prepare_output_dir(args.out, force=args.force, inputs=inputs.values(), create=False)  # fail fast
    ref = load_model(args.model, args)
    a, b = load_into(ref.model, args.a, "A"), load_into(ref.model, args.b, "B")
    data = _loader(args.data, "--data")
    stats = _loader(args.stats_data, "--stats-data") if args.stats_data else data
    curves = compare_curves(
        a, b, data, ref.inputs, align_method=None if args.align == "none" else args.align, stats_data=stats,
        bn_batches=args.bn_reset_batches, repair=args.repair, repair_batches=args.repair_batches,
        alphas=args.alphas, seed=args.seed,
        labels={"bn": "naive+BN reset", "repair": "naive+REPAIR"} if args.align == "none" else None,
    )  # fmt: skip
    summary = {k: {"loss_barrier": c.loss_barrier, "accuracy_barrier": c.accuracy_barrier,
                   "loss_midpoint_gap": c.midpoint_gap("loss")} for k, c in curves.items()}  # fmt: skip
    plot = f"barrier.{args.plot_format}"
    files = {
        "curves.json": text_writer(json.dumps({k: c.to_dict() for k, c in curves.items()}, indent=1) + "\n"),
        "curves.csv": text_writer(curves_csv(curves)),
        plot: lambda p: plot_curves(curves, p, title=f"{args.a} → {args.b}", format=args.plot_format),
    }
    config = {k: v for k, v in vars(args).items() if k != "run"}
    write_files(args.out, files, force=args.force, inputs=inputs, command=sys.argv, config=config,
                report={"barriers": summary})  # fmt: skip
    width = max(len(k) for k in curves)
    lines = [f"{'curve':<{width}}  loss barrier  acc barrier", *(
        f"{k:<{width}}  {s['loss_barrier'] + 0.0:>12.4f}  {100 * s['accuracy_barrier'] + 0.0:>8.2f} pt" for k, s in summary.items())]
    sys.stdout.write("\n".join(lines) + f"\nwrote curves.json, curves.csv, {plot}, provenance.json to {args.out}\n")
    return 0

