"""Merge 2+ checkpoints of one architecture: align them, then average.

Writes OUT/model.safetensors (the merged model, same keys as the inputs), OUT/permutation_<i>.
safetensors (how each input was permuted), OUT/spec.json and OUT/provenance.json. Methods:
weight (weight-match every model to the first, then average with --weights), many (MergeMany),
c2m3 (cycle-consistent matching of all models at once; both stop on their objective or after
--max-rounds, with a warning), average (no alignment: the naive baseline); for two models also partial (keep the least-matched
units of both, within --budget) and pleas (partial merging refitted by layer-wise least squares on
--data); for two or more, zipit (ZipIt!: features merged within and across models on --data, with
--alpha, --beta and a partial --zip-depth). These write a wider model (same keys, larger shapes) and
OUT/architecture.json (the width of every group); load it with
permerge.merge.partial.widen_module(model, state_dict).
When the models are Hugging Face models (the first checkpoint or --model a directory with
config.json), OUT is a Hugging Face directory (config, tokenizer, generation config, chat template,
model card) that from_pretrained loads; widened merges are not (their config would not fit).
"""

from __future__ import annotations

import argparse
import copy
import json
import logging
import sys
from pathlib import Path
from typing import Any

from torch import nn

from permerge.apply import apply_permutation
from permerge.cli._checkpoints import (
    add_metrics_argument,
    batches_from,
    data_from,
    hf_home,
    load_checkpoint,
    metrics_from,
)
from permerge.cli._common import Outcome, config_of, result_outcome
from permerge.cli._models import add_model_arguments, load_model
from permerge.errors import PermergeError, PermergeIOError
from permerge.evaluate import Curve, interpolation_curve, metrics_for
from permerge.io.outputs import OutputDir
from permerge.io.read import file_bytes
from permerge.io.write import text_writer
from permerge.merge.combine import METHODS, MergeResult, check_merge_request, merge_models
from permerge.merge.zipit import check_options
from permerge.pipeline import positive
from permerge.progress import phase
from permerge.report import write_report

LOG = logging.getLogger(__name__)

HELP = "merge 2+ checkpoints (weight matching, MergeMany, C2M3, plain averaging, partial merging, PLeaS, ZipIt!)"
EPILOG = """examples:
  permerge merge --model resnet20 a.safetensors b.safetensors -o merged/
  permerge merge --model resnet20 a.pt b.pt c.pt --method many -o merged/
  permerge merge --model mlp a.pt b.pt c.pt d.pt --method c2m3 --max-rounds 50 -o merged/
  permerge merge --model mlp a.pt b.pt --weights 0.7,0.3 -o merged/
  permerge merge --model resnet20 a.pt b.pt --method pleas --budget 1.5 --data mypkg.data:unlabeled -o merged/
  permerge merge --model resnet20 a.pt b.pt --method partial --budget '{"blocks.0.conv1.weight:0": 2}' -o merged/
  permerge merge --model resnet20 a.pt b.pt c.pt --method zipit --zip-depth 0.5 --data mypkg.data:unlabeled -o merged/
  permerge merge --model llama-a/ llama-a/ llama-b/ --barrier-data mypkg.text:batches -o merged/
"""


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("checkpoints", nargs="+", help="two or more checkpoints (.safetensors, .pt, or directories)")
    p.add_argument("--model", required=True, help="architecture: built-in example, package.module:factory, or HF dir")
    add_model_arguments(p, positional=False)
    p.add_argument("-o", "--out", required=True, help="output directory (new or empty, unless --force)")
    p.add_argument("--method", choices=list(METHODS), default="weight")
    p.add_argument("--weights", help="comma-separated interpolation weights summing to 1 (default: uniform)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--max-rounds", type=int, default=100, help="many/c2m3: stop (and warn) after this many rounds")
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
    ev = p.add_argument_group("barrier of the merge (two models)")
    ev.add_argument("--barrier-data", help="package.module:function returning (inputs, targets) batches: measure the "
                    "barrier along the line between the two (aligned) models")  # fmt: skip
    add_metrics_argument(ev)
    ev.add_argument("--alphas", type=int, default=11, help="points on the α grid from 0 to 1 (default 11)")


def _weights(text: str | None) -> list[float] | None:
    if text is None:
        return None
    try:
        return [float(w) for w in text.split(",")]
    except ValueError:
        raise PermergeError(f"--weights must be comma-separated numbers, got {text!r}") from None


def _options(args: argparse.Namespace) -> dict[str, object]:
    """Method-specific options from the flags (pleas: batches, time budget; zipit: alpha, beta, depth, batches;
    many/c2m3: max_rounds), checked before loading."""
    if args.method == "zipit":
        depth: float | list[str] | None = None
        if args.zip_depth is not None:
            try:
                depth = float(args.zip_depth)
            except ValueError:
                depth = [g.strip() for g in args.zip_depth.split(",") if g.strip()]
        check_options(args.alpha, args.beta, depth)
        return {"alpha": args.alpha, "beta": args.beta, "depth": depth, "batches": args.batches}
    if args.method in ("many", "c2m3"):
        positive("--max-rounds", args.max_rounds, integer=True)
        return {"max_rounds": args.max_rounds}
    return {"batches": args.batches, "max_seconds": args.max_seconds} if args.method == "pleas" else {}


def run(args: argparse.Namespace) -> Outcome:
    if len(args.checkpoints) < 2:
        raise PermergeError("merge needs at least two checkpoints")
    weights, budget = _weights(args.weights), _budget(args.budget)
    check_merge_request(args.method, len(args.checkpoints), weights=weights, budget=budget, has_data=args.data is not None)
    options = _options(args)
    for i, c in enumerate(args.checkpoints):
        if not Path(c).exists():
            raise PermergeIOError(f"checkpoint {i} not found: {c}")
    metrics = _check_barrier(args)
    inputs = {f"model_{i}": c for i, c in enumerate(args.checkpoints)}
    expected = 2 * max(file_bytes(c) for c in args.checkpoints)  # partial/pleas widen up to 2x
    hf_dir = hf_home(args.checkpoints[0], args.model)
    with OutputDir(args.out, force=args.force, inputs=inputs, expected_bytes=expected, quiet=args.quiet) as out:
        with phase("loading", quiet=args.quiet):
            ref = load_model(args.model, args)
            loaded = [load_checkpoint(ref.model, c, f"checkpoint {i}") for i, c in enumerate(args.checkpoints)]
        data = data_from(args.data) if args.method in ("partial", "pleas", "zipit") and args.data else None
        with phase(f"merging ({args.method})", quiet=args.quiet):
            res = merge_models([m.model for m in loaded], ref.inputs, method=args.method, weights=weights,
                               example_kwargs=ref.kwargs, seed=args.seed, budget=budget, data=data,
                               keep_heads=args.keep_heads, options=options, quiet=args.quiet)  # fmt: skip
        if res.architecture is not None and hf_dir is not None:
            LOG.warning("the merged model is wider than %s/config.json describes: written as plain safetensors with "
                        "architecture.json, not as a Hugging Face directory", hf_dir)  # fmt: skip
            hf_dir = None
        perms = {f"permutation_{i}": p for i, p in enumerate(res.permutations)}
        files, left_out = loaded[0].result_files(res.model.state_dict(), perms, res.spec, hf_dir)
        report = {**res.report, **({"left_out": left_out} if hf_dir is not None else {})}
        if res.architecture is not None:  # wider than the inputs: record the widths to rebuild it
            files["architecture.json"] = text_writer(json.dumps(res.architecture, indent=1) + "\n")
        if args.barrier_data:
            with phase("barrier", quiet=args.quiet):
                label, curve = _barrier(args, [m.model for m in loaded], res, metrics)
            report["barriers"] = {label: curve.summary()}
            files["curves.json"] = text_writer(json.dumps({label: curve.to_dict()}, indent=1) + "\n")
        out.commit(files, command=sys.argv, config=config_of(args), report=report, view=write_report)
    what = args.method
    if res.architecture is not None:
        what += f", budget {args.budget}, {res.report['parameters']} parameters"
    text = (f"merged {len(loaded)} models ({what}); function check: relative error "
            f"{res.report['function_preservation_error']:.1e}; wrote {args.out}")  # fmt: skip
    return result_outcome("merge", out.out, text, report)


def _check_barrier(args: argparse.Namespace) -> Any:
    """--barrier-data's requirements (checked before any work); returns the metric set (None: auto)."""
    if args.barrier_data is None:
        return None
    if len(args.checkpoints) != 2 or args.method not in ("weight", "many", "average"):
        raise PermergeError("--barrier-data measures the line between two models: merge exactly two, by weight, many or average")
    if args.alphas < 2:
        raise PermergeError(f"--alphas must be at least 2 (the endpoints), got {args.alphas}")
    return metrics_from(args.metrics)


def _barrier(args: argparse.Namespace, models: list[nn.Module], res: MergeResult, metrics: Any) -> tuple[str, Curve]:
    """The curve between the two models as merged: each permuted into the merged basis (``average``:
    as given, the naive line)."""
    ends = []
    for model, perm in zip(models, res.permutations or ({}, {})):
        end = copy.deepcopy(model)
        if perm:
            end.load_state_dict(apply_permutation(res.spec, perm, model.state_dict()))
        ends.append(end)
    data = {"test": batches_from(args.barrier_data, "--barrier-data")}
    curve = interpolation_curve(*ends, data, metrics=metrics or metrics_for(ends[0]), alphas=args.alphas)
    return ("aligned" if res.permutations else "naive"), curve


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
