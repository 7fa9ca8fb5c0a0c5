"""Merge 2+ checkpoints of one architecture: align them, then average.

Writes OUT/model.safetensors (the merged model, same keys as the inputs), OUT/permutation_<i>.
safetensors (how each input was permuted), OUT/spec.json and OUT/provenance.json. Methods:
weight (weight-match every model to the first, then average with --weights), many (MergeMany),
average (no alignment: the naive baseline).
"""

from __future__ import annotations

import argparse
import sys

from permerge.cli._checkpoints import load_into
from permerge.cli._models import add_model_arguments, load_model
from permerge.errors import PermergeError
from permerge.io.outputs import write_result
from permerge.io.write import prepare_output_dir
from permerge.merge.combine import METHODS, merge_models

HELP = "merge 2+ checkpoints (weight matching, MergeMany, or plain averaging)"
EPILOG = """examples:
  permerge merge --model resnet20 a.safetensors b.safetensors -o merged/
  permerge merge --model resnet20 a.pt b.pt c.pt --method many -o merged/
  permerge merge --model mlp a.pt b.pt --weights 0.7,0.3 -o merged/
"""


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("checkpoints", nargs="+", help="two or more checkpoints (.safetensors, .pt, or directories)")
    p.add_argument("--model", required=True, help="architecture: built-in example, package.module:factory, or HF dir")
    add_model_arguments(p, positional=False)
    p.add_argument("-o", "--out", required=True, help="output directory (new or empty, unless --force)")
    p.add_argument("--method", choices=METHODS, default="weight")
    p.add_argument("--weights", help="comma-separated interpolation weights summing to 1 (default: uniform)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--force", action="store_true", help="write into a non-empty OUT (replacing our files only)")


def run(args: argparse.Namespace) -> int:
    if len(args.checkpoints) < 2:
        raise PermergeError("merge needs at least two checkpoints")
    inputs = {f"model_{i}": c for i, c in enumerate(args.checkpoints)}
    prepare_output_dir(args.out, force=args.force, inputs=inputs.values(), create=False)  # fail fast
    try:
        weights = [float(w) for w in args.weights.split(",")] if args.weights else None
    except ValueError as e:
        raise PermergeError(f"--weights must be comma-separated numbers, got {args.weights!r}") from e
    ref = load_model(args.model, args)
    models = [load_into(ref.model, c, f"checkpoint {i}") for i, c in enumerate(args.checkpoints)]
    try:
        res = merge_models(models, ref.inputs, method=args.method, weights=weights, example_kwargs=ref.kwargs,
                           seed=args.seed, quiet=args.quiet)  # fmt: skip
    except ValueError as e:
        raise PermergeError(str(e)) from e
    write_result(
        args.out, force=args.force, inputs=inputs, state_dicts={"model": res.model.state_dict()},
        permutations={f"permutation_{i}": p for i, p in enumerate(res.permutations)}, spec=res.spec,
        command=sys.argv, config={k: v for k, v in vars(args).items() if k != "run"}, report=res.report,
    )  # fmt: skip
    sys.stdout.write(f"merged {len(models)} models ({args.method}); wrote {args.out}\n")
    return 0
