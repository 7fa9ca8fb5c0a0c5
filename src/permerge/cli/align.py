"""Align model B's hidden units to model A's and write the aligned B.

Writes OUT/model.safetensors (B permuted: same keys, same function as B), OUT/permutation.safetensors
(one int64 index vector per group), OUT/spec.json and OUT/provenance.json (command, versions,
input hashes, the alignment report). Inputs are never modified; OUT must be new or empty unless
--force.

Without --model, A and B are Hugging Face model directories: the architecture comes from A's
config.json (built on the meta device), matching streams over both checkpoints one tensor at a time
(--no-stream loads both into RAM), and OUT is a Hugging Face directory (sharded safetensors + index,
config.json) that from_pretrained and mergekit load, plus permutation.safetensors, spec.json and
provenance.json.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from permerge.align import align
from permerge.align_hf import align_hf
from permerge.cli._checkpoints import data_from, load_into
from permerge.cli._models import add_model_arguments, load_model
from permerge.errors import PermergeError
from permerge.io.hf import is_hf_dir
from permerge.io.outputs import write_result
from permerge.io.write import prepare_output_dir
from permerge.report import write_report
from permerge.spec import PermutationSpec

HELP = "align checkpoint B to checkpoint A (Git Re-Basin)"
EPILOG = """examples:
  permerge align --model resnet20 a.safetensors b.safetensors -o aligned/
  permerge align llama-a/ llama-b/ -o llama-b-aligned/ --workers 8 --max-shard-size 5GB
  permerge align llama-a/ llama-b/ -o out/ --device cuda --out-dtype bfloat16
  permerge align --model mypkg.nets:vgg --input-shape 1,3,32,32 a.pt b.pt -o out --method activation --data mypkg.data:loader
"""


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("a", help="checkpoint of model A (the reference): .safetensors, .pt/.pth, or a directory")
    p.add_argument("b", help="checkpoint of model B (the one permuted)")
    p.add_argument("--model", help="architecture: built-in example, package.module:factory, or HF dir "
                   "(omit it when A and B are Hugging Face directories)")
    add_model_arguments(p, positional=False)
    p.add_argument("-o", "--out", required=True, help="output directory (new or empty, unless --force)")
    p.add_argument("--method", default="weight", help="weight (default), activation or ste")
    p.add_argument("--data", help="package.module:function returning batches (activation/ste)")
    p.add_argument("--spec", help="use this spec JSON instead of tracing (e.g. an edited `inspect --save-spec`)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--force", action="store_true", help="write into a non-empty OUT (replacing our files only)")
    hf = p.add_argument_group("Hugging Face directories (no --model)")
    hf.add_argument("--stream", action=argparse.BooleanOptionalAction, default=True,
                    help="read the checkpoints one tensor at a time (default); --no-stream loads both into RAM")
    hf.add_argument("--device", help="run the cost matmuls here, e.g. cuda (LAPs stay on the CPU)")
    hf.add_argument(
        "--workers", type=int, default=None,
        help="threads solving independent groups' LAPs (default: one per two cores, at most 4; same result)",
    )  # fmt: skip
    hf.add_argument("--out-dtype", choices=("float32", "float16", "bfloat16"), help="cast floating tensors (default: keep B's)")
    hf.add_argument("--max-shard-size", default="5GB", help="largest output shard (default 5GB)")
    hf.add_argument("--max-sweeps", type=int, default=100, help="stop coordinate descent after this many sweeps")


def run(args: argparse.Namespace) -> int:
    if args.model is None:
        return _run_hf(args)
    inputs = {"a": args.a, "b": args.b}
    prepare_output_dir(args.out, force=args.force, inputs=inputs.values(), create=False)  # fail fast
    ref = load_model(args.model, args)
    a, b = load_into(ref.model, args.a, "A"), load_into(ref.model, args.b, "B")
    spec = PermutationSpec.from_json(Path(args.spec).read_text()) if args.spec else None
    res = align(a, b, ref.inputs, args.method, spec=spec, example_kwargs=ref.kwargs, data=data_from(args.data),
                seed=args.seed, quiet=args.quiet)  # fmt: skip
    write_result(
        args.out, force=args.force, inputs=inputs, state_dicts={"model": res.model.state_dict()},
        permutations={"permutation": res.permutation}, spec=res.spec, command=sys.argv,
        config={k: v for k, v in vars(args).items() if k != "run"}, report=res.report,
    )  # fmt: skip
    write_report(args.out)
    sys.stdout.write(
        f"aligned {res.report['changed_groups']}/{res.report['groups']} groups ({args.method}); wrote {args.out}\n"
    )
    return 0


def _run_hf(args: argparse.Namespace) -> int:
    if not is_hf_dir(args.a):
        raise PermergeError(f"{args.a} has no config.json: pass --model to name the architecture")
    if args.method != "weight":
        raise PermergeError(f"Hugging Face directories are aligned by weight matching only, not --method {args.method}")
    spec = PermutationSpec.from_json(Path(args.spec).read_text()) if args.spec else None
    res = align_hf(
        args.a, args.b, args.out, stream=args.stream, spec=spec, seed=args.seed, max_sweeps=args.max_sweeps,
        device=args.device, workers=args.workers, out_dtype=args.out_dtype, max_shard_size=args.max_shard_size,
        force=args.force, quiet=args.quiet, command=sys.argv, config={k: v for k, v in vars(args).items() if k != "run"},
    )  # fmt: skip
    write_report(res.out)
    sys.stdout.write(
        f"aligned {res.report['changed_groups']}/{res.report['groups']} groups (weight, "
        f"{'streamed' if args.stream else 'in memory'}); wrote {res.out}\n"
    )
    return 0
