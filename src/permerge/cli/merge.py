"""Merge 2+ checkpoints of one architecture: align them, then average.

Writes OUT/model.safetensors (the merged model, same keys as the inputs), OUT/permutation_<i>.
safetensors (how each input was permuted), OUT/spec.json and OUT/provenance.json. Methods:
weight (weight-match every model to the first, then average with --weights), many (MergeMany),
average (no alignment: the naive baseline); for two models also partial (keep the least-matched
units of both, within --budget) and pleas (partial merging refitted by layer-wise least squares on
--data); for two or more, zipit (ZipIt!: features merged within and across models on --data, with
--alpha, --beta and a partial --zip-depth). These write a wider model (same keys, larger shapes) and
OUT/architecture.json (the width of every group); load it with
permerge.merge.partial.widen_module(model, state_dict).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from permerge.cli._checkpoints import data_from, load_checkpoint
from permerge.cli._models import add_model_arguments, load_model
from permerge.errors import PermergeError, PermergeIOError
from permerge.hf import checkpoint_spec
from permerge.io.outputs import OutputDir, result_files
from permerge.io.read import file_bytes
from permerge.io.write import text_writer
from permerge.merge.combine import METHODS, check_merge_request, merge_models
from permerge.merge.zipit import check_options
from permerge.report import write_report

HELP = "merge 2+ checkpoints (weight matching, MergeMany, plain averaging, partial merging, PLeaS, ZipIt!)"
EPILOG = """examples:
  permerge merge --model resnet20 a.safetensors b.safetensors -o merged/
  permerge merge --model resnet20 a.pt b.pt c.pt --method many -o merged/
  permerge merge --model mlp a.pt b.pt --weights 0.7,0.3 -o merged/
  permerge merge --model resnet20 a.pt b.pt --method pleas --budget 1.5 --data mypkg.data:unlabeled -o merged/
  permerge merge --model resnet20 a.pt b.pt --method partial --budget '{"blocks.0.conv1.weight:0": 2}' -o merged/
  permerge merge --model resnet20 a.pt b.pt c.pt --method zipit --zip-depth 0.5 --data mypkg.data:unlabeled -o merged/
"""


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("checkpoints", nargs="+", help="two or more checkpoints (.safetensors, .pt, or directories)")
    p.add_argument("--model", required=True, help="architecture: built-in example, package.module:factory, or HF dir")
    add_model_arguments(p, positional=False)
    p.add_argument("-o", "--out", required=True, help="output directory (new or empty, unless --force)")
    p.add_argument("--method", choices=list(METHODS), default="weight")
    p.add_argument("--weights", help="comma-separated interpolation weights summing to 1 (default: uniform)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--budget", default="1.0",
                   help="partial/pleas: merged width ratio in [1, 2] (zipit: [1, number of models]), or a JSON object "
                        "{group: ratio} (others: 1.0)")  # fmt: skip
    p.add_argument("--data", help="package.module:function returning unlabeled batches (pleas, zipit; partial: activation matching)")
    p.add_argument("--keep-heads", action="store_true",
                   help="partial/pleas/zipit: keep every model's outputs (in order; a partial zip always does)")  # fmt: skip
    p.add_argument("--batches", type=int, default=16, help="pleas/zipit: batches of --data used")
    p.add_argument("--alpha", type=float, default=0.5, help="zipit: repeated matching in [0, 1] (0: merge a feature once)")
    p.add_argument("--beta", type=float, default=0.5, help="zipit: share of same-model merges in [0, 1] (0: none)")
    p.add_argument("--zip-depth", help="zipit: zip up to this fraction of the layers (0..1) or these comma-separated "
                                       "groups; the rest stay per-model heads (default: zip everything)")  # fmt: skip
    p.add_argument("--max-seconds", type=float, help="pleas: time budget of the least-squares step")
    p.add_argument("--force", action="store_true", help="replace a non-empty OUT, all of it")


def _weights(text: str | None) -> list[float] | None:
    if text is None:
        return None
    try:
        return [float(w) for w in text.split(",")]
    except ValueError:
        raise PermergeError(f"--weights must be comma-separated numbers, got {text!r}") from None


def _options(args: argparse.Namespace) -> dict[str, object]:
    """Method-specific options from the flags (pleas: batches, time budget; zipit: alpha, beta, depth, batches)."""
    if args.method == "zipit":
        depth: float | list[str] | None = None
        if args.zip_depth is not None:
            try:
                depth = float(args.zip_depth)
            except ValueError:
                depth = [g.strip() for g in args.zip_depth.split(",") if g.strip()]
        check_options(args.alpha, args.beta, depth)
        return {"alpha": args.alpha, "beta": args.beta, "depth": depth, "batches": args.batches}
    return {"batches": args.batches, "max_seconds": args.max_seconds} if args.method == "pleas" else {}


def run(args: argparse.Namespace) -> int:
    if len(args.checkpoints) < 2:
        raise PermergeError("merge needs at least two checkpoints")
    weights, budget = _weights(args.weights), _budget(args.budget)
    check_merge_request(args.method, len(args.checkpoints), weights=weights, budget=budget, has_data=args.data is not None)
    options = _options(args)
    for i, c in enumerate(args.checkpoints):
        if not Path(c).exists():
            raise PermergeIOError(f"checkpoint {i} not found: {c}")
    inputs = {f"model_{i}": c for i, c in enumerate(args.checkpoints)}
    expected = 2 * max(file_bytes(c) for c in args.checkpoints)  # partial/pleas widen up to 2x
    with OutputDir(args.out, force=args.force, inputs=inputs, expected_bytes=expected) as out:
        ref = load_model(args.model, args)
        loaded = [load_checkpoint(ref.model, c, f"checkpoint {i}") for i, c in enumerate(args.checkpoints)]
        data = data_from(args.data) if args.method in ("partial", "pleas", "zipit") and args.data else None
        res = merge_models([m.model for m in loaded], ref.inputs, method=args.method, weights=weights,
                           example_kwargs=ref.kwargs, seed=args.seed, budget=budget, data=data,
                           keep_heads=args.keep_heads, options=options, quiet=args.quiet)  # fmt: skip
        keys = loaded[0]
        files = result_files({"model": keys.checkpoint_state(res.model.state_dict())},
                             {f"permutation_{i}": p for i, p in enumerate(res.permutations)},
                             checkpoint_spec(res.spec, keys.model, keys.keys.values()))  # fmt: skip
        if res.architecture is not None:  # wider than the inputs: record the widths to rebuild it
            files["architecture.json"] = text_writer(json.dumps(res.architecture, indent=1) + "\n")
        out.commit(files, command=sys.argv, config={k: v for k, v in vars(args).items() if k != "run"}, report=res.report,
                   view=write_report)  # fmt: skip
    what = args.method
    if res.architecture is not None:
        what += f", budget {args.budget}, {res.report['parameters']} parameters"
    sys.stdout.write(f"merged {len(loaded)} models ({what}); function check: relative error "
                     f"{res.report['function_preservation_error']:.1e}; wrote {args.out}\n")  # fmt: skip
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
