"""Merge 2+ checkpoints of one architecture: align them, then average.

Writes OUT/model.safetensors (the merged model, same keys as the inputs), OUT/permutation_<i>.
safetensors (how each input was permuted), OUT/spec.json and OUT/provenance.json. Methods:
weight (weight-match every model to the first, then average with --weights), many (MergeMany),
average (no alignment: the naive baseline); for two models also partial (keep the least-matched
units of both, within --budget) and pleas (partial merging refitted by layer-wise least squares on
--data). These write a wider model (same keys, larger shapes) and OUT/architecture.json (the width
of every group); load it with permerge.merge.partial.widen_module(model, state_dict).
"""

from __future__ import annotations

import argparse
import json
import sys

from permerge.cli._checkpoints import data_from, load_into
from permerge.cli._models import add_model_arguments, load_model
from permerge.errors import PermergeError
from permerge.io.outputs import write_files, write_result
from permerge.io.write import permutation_writer, prepare_output_dir, safetensors_writer, text_writer
from permerge.merge.combine import METHODS, MergeResult, merge_models
from permerge.report import write_report

HELP = "merge 2+ checkpoints (weight matching, MergeMany, plain averaging, partial merging, PLeaS)"
EPILOG = """examples:
  permerge merge --model resnet20 a.safetensors b.safetensors -o merged/
  permerge merge --model resnet20 a.pt b.pt c.pt --method many -o merged/
  permerge merge --model mlp a.pt b.pt --weights 0.7,0.3 -o merged/
  permerge merge --model resnet20 a.pt b.pt --method pleas --budget 1.5 --data mypkg.data:unlabeled -o merged/
  permerge merge --model resnet20 a.pt b.pt --method partial --budget '{"blocks.0.conv1.weight:0": 2}' -o merged/
"""


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("checkpoints", nargs="+", help="two or more checkpoints (.safetensors, .pt, or directories)")
    p.add_argument("--model", required=True, help="architecture: built-in example, package.module:factory, or HF dir")
    add_model_arguments(p, positional=False)
    p.add_argument("-o", "--out", required=True, help="output directory (new or empty, unless --force)")
    p.add_argument("--method", choices=METHODS, default="weight")
    p.add_argument("--weights", help="comma-separated interpolation weights summing to 1 (default: uniform)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--budget", default="1.0",
                   help="partial/pleas: merged width ratio in [1, 2], or a JSON object {group: ratio} (others: 1.0)")  # fmt: skip
    p.add_argument("--data", help="package.module:function returning unlabeled batches (pleas; partial: activation matching)")
    p.add_argument("--keep-heads", action="store_true", help="partial/pleas: keep both models' outputs (A's, then B's)")
    p.add_argument("--batches", type=int, default=16, help="pleas: batches of --data used")
    p.add_argument("--max-seconds", type=float, help="pleas: time budget of the least-squares step")
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
    budgeted = args.method in ("partial", "pleas")
    data = data_from(args.data) if budgeted and args.data else None
    options = {"batches": args.batches, "max_seconds": args.max_seconds} if args.method == "pleas" else None
    try:
        res = merge_models(models, ref.inputs, method=args.method, weights=weights, example_kwargs=ref.kwargs,
                           seed=args.seed, budget=_budget(args.budget), data=data, keep_heads=args.keep_heads,
                           pleas_options=options, quiet=args.quiet)  # fmt: skip
    except ValueError as e:
        raise PermergeError(str(e)) from e
    config = {k: v for k, v in vars(args).items() if k != "run"}
    if res.architecture is not None:
        _write_widened(args, inputs, res, config)
        sys.stdout.write(f"merged 2 models ({args.method}, budget {args.budget}, "
                         f"{res.report['parameters']} parameters); wrote {args.out}\n")  # fmt: skip
        return 0
    write_result(
        args.out, force=args.force, inputs=inputs, state_dicts={"model": res.model.state_dict()},
        permutations={f"permutation_{i}": p for i, p in enumerate(res.permutations)}, spec=res.spec,
        command=sys.argv, config=config, report=res.report,
    )  # fmt: skip
    write_report(args.out)
    sys.stdout.write(f"merged {len(models)} models ({args.method}); wrote {args.out}\n")
    return 0


def _budget(text: str) -> float | dict[str, float]:
    try:
        return float(text)
    except ValueError:
        pass
    try:
        value = json.loads(text)
    except json.JSONDecodeError:
        raise PermergeError(f"--budget must be a number in [1, 2] or a JSON object {{group: ratio}}, got {text!r}") from None
    if not isinstance(value, dict):
        raise PermergeError(f"--budget must be a number or a JSON object, got {text!r}")
    return value


def _write_widened(args: argparse.Namespace, inputs: dict[str, str], res: MergeResult, config: dict) -> None:
    """The wider model has other shapes than the inputs: write it with its architecture description,
    all or nothing (safetensors written directly: the widened tensors are fresh, never shared)."""

    files = {
        "model.safetensors": safetensors_writer(res.model.state_dict()),
        "spec.json": text_writer(res.spec.to_json()),
        "architecture.json": text_writer(json.dumps(res.architecture, indent=1) + "\n"),
    }
    for i, perm in enumerate(res.permutations):
        files[f"permutation_{i}.safetensors"] = permutation_writer(perm)
    write_files(args.out, files, force=args.force, inputs=inputs, command=sys.argv, config=config, report=res.report)
    write_report(args.out)
