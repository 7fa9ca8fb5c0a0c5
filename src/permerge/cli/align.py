"""Align model B's hidden units to model A's and write the aligned B.

Writes OUT/model.safetensors (B permuted: same keys, same function as B), OUT/permutation.safetensors
(one int64 index vector per group), OUT/spec.json and OUT/provenance.json (command, versions,
input hashes, the alignment report). Inputs are never modified; OUT must be new or empty unless
--force.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from permerge.align import align
from permerge.cli._checkpoints import data_from, load_into
from permerge.cli._models import add_model_arguments, load_model
from permerge.io.outputs import write_result
from permerge.io.write import prepare_output_dir
from permerge.spec import PermutationSpec

HELP = "align checkpoint B to checkpoint A (Git Re-Basin)"
EPILOG = """examples:
  permerge align --model resnet20 a.safetensors b.safetensors -o aligned/
  permerge align --model mypkg.nets:vgg --input-shape 1,3,32,32 a.pt b.pt -o out --method activation --data mypkg.data:loader
"""


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("a", help="checkpoint of model A (the reference): .safetensors, .pt/.pth, or a directory")
    p.add_argument("b", help="checkpoint of model B (the one permuted)")
    p.add_argument("--model", required=True, help="architecture: built-in example, package.module:factory, or HF dir")
    add_model_arguments(p, positional=False)
    p.add_argument("-o", "--out", required=True, help="output directory (new or empty, unless --force)")
    p.add_argument("--method", default="weight", help="weight (default), activation or ste")
    p.add_argument("--data", help="package.module:function returning batches (activation/ste)")
    p.add_argument("--spec", help="use this spec JSON instead of tracing (e.g. an edited `inspect --save-spec`)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--force", action="store_true", help="write into a non-empty OUT (replacing our files only)")


def run(args: argparse.Namespace) -> int:
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
    sys.stdout.write(
        f"aligned {res.report['changed_groups']}/{res.report['groups']} groups ({args.method}); wrote {args.out}\n"
    )
    return 0
