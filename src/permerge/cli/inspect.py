"""Show the permutation groups permerge finds in a model, what it froze and why.

Traces the model on an example input (no weights are needed for Hugging Face directories: the
model is built on the meta device) and prints every group, every frozen space with its reason,
and the fraction of hidden channel axes that can be permuted.
"""

from __future__ import annotations

import argparse
from collections import Counter
from collections.abc import Iterable
from pathlib import Path

from permerge.cli._common import Outcome
from permerge.cli._models import add_model_arguments, load_model
from permerge.errors import PermergeIOError
from permerge.graph import trace
from permerge.hf import checkpoint_spec, is_hf_dir, saved_keys
from permerge.io.read import HF_WEIGHT_FILES, open_checkpoint
from permerge.io.write import atomic_path
from permerge.models import ModelRef

HELP = "list the permutation groups of a model"
EPILOG = """examples:
  permerge inspect resnet20
  permerge inspect mypkg.nets:make_vgg --model-kwargs '{"width": 2}' --input-shape 1,3,32,32
  permerge inspect ./llama-config-dir --json > groups.json
"""


def add_arguments(p: argparse.ArgumentParser) -> None:
    add_model_arguments(p)
    p.add_argument("--save-spec", metavar="FILE", help="write the spec (editable JSON) to FILE")
    p.add_argument("--strict", action="store_true", help="fail on ops without a rule instead of freezing")


def _checkpoint_keys(ref: ModelRef, path: str) -> Iterable[str]:
    """The keys a checkpoint of ``ref`` holds: its files' own for an HF directory with weights, else as
    ``save_pretrained`` names them (renamed, tied aliases left out) or, for other models, the state dict's."""
    if any(Path(path, name).is_file() for name in HF_WEIGHT_FILES):
        with open_checkpoint(path) as src:
            return src.keys()
    return saved_keys(ref.model) if is_hf_dir(path) else ref.model.state_dict().keys()


def run(args: argparse.Namespace) -> Outcome:
    if args.save_spec and not Path(args.save_spec).resolve().parent.is_dir():
        raise PermergeIOError(f"cannot write --save-spec {args.save_spec}: its directory does not exist")
    ref = load_model(args.model, args, meta=True)
    module_spec = trace(ref.model, ref.inputs, example_kwargs=ref.kwargs, strict=args.strict)
    shapes = {k: tuple(v.shape) for k, v in ref.model.state_dict().items()}
    fraction = module_spec.permutable_fraction(shapes)
    # in the checkpoint's keys, so `align --spec` takes it (HF files rename keys and drop tied aliases)
    spec = checkpoint_spec(module_spec, ref.model, _checkpoint_keys(ref, args.model))
    if args.save_spec:
        with atomic_path(args.save_spec) as tmp:
            tmp.write_text(spec.to_json())
    data = {"command": "inspect", "model": ref.description, "permutable_fraction": fraction, **spec.to_dict()}
    classes = Counter(g.symmetry for g in spec.groups)
    out = [f"{ref.description}: {len(spec.groups)} groups, permutable fraction {fraction:.3f}",
           "symmetry classes: " + ", ".join(f"{n} {c}" for c, n in sorted(classes.items())) +
           " (align --symmetries all uses the richer ones)", ""]  # fmt: skip
    rows = spec.summary()
    width = max([len(r["name"]) for r in rows] + [5])  # type: ignore[arg-type]
    out.append(f"{'group':<{width}}  {'size':>6}  {'tensors':>7}  symmetry")
    out += [f"{r['name']:<{width}}  {r['size']:>6}  {r['tensors']:>7}  {r['symmetry']}" for r in rows]
    if spec.frozen:
        out += ["", "frozen (not permuted):"]
        reasons = Counter((f.reason, f.boundary) for f in spec.frozen)
        for (reason, boundary), n in sorted(reasons.items(), key=lambda kv: (kv[0][1], kv[0][0])):
            tag = "boundary" if boundary else "hidden"
            out.append(f"  [{tag}] {reason}" + (f"  (×{n})" if n > 1 else ""))
    return Outcome("\n".join(out), data)
