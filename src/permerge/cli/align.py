"""Align model B's hidden units to model A's and write the aligned B.

Writes OUT/model.safetensors (B permuted: B's keys and dtypes, B's function), OUT/permutation.
safetensors (one int64 index vector per group), OUT/spec.json (in the checkpoint's keys),
OUT/provenance.json (command, versions, input hashes, the report with the function check's error)
and OUT/report.html. When B is a Hugging Face model (B or --model a directory with config.json),
OUT is a Hugging Face directory: B's config.json, tokenizer, generation config and chat template,
and a model card (README.md). --emit-mergekit adds OUT/mergekit.yaml, a mergekit recipe merging A
with the aligned B (run: mergekit-yaml OUT/mergekit.yaml merged/). The permutation can be applied
to B's fine-tuned siblings and LoRA adapters with `permerge apply OUT ...`.

--symmetries all (or a comma-separated list of classes) aligns, with --model and --method weight or
activation, each group in the richest symmetry class the tracer proved (`permerge inspect` lists
them): orthogonal residual streams, invertible per-head query·key and value·output maps, positive
scales of ReLU units. The output keeps B's architecture and A's norm gains; OUT/transform.safetensors
holds the dense maps (`<group>.matrix`, one per head block) and scales (`<group>.perm`, `<group>.scale`)
beside permutation.safetensors, which then holds the groups aligned by permutations only.

Without --model, A and B are Hugging Face model directories: their config.json files must agree on
every architecture-defining field, the architecture comes from A's (built on the meta device),
matching streams over both checkpoints one tensor at a time (--no-stream loads both into RAM), and
OUT is a Hugging Face directory (sharded safetensors + index, config.json, tokenizer and other
non-weight files from an allow-list; other weight formats are left out and listed in provenance)
that from_pretrained and mergekit load.

Everything is checked before tracing (paths, options, devices, configs, keys, shapes, dtypes); B
permuted is checked to compute B's function before anything is written. Inputs are never modified;
OUT is written all or nothing and must be new or empty unless --force (which replaces it whole).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from permerge.align import TRANSFORM_METHODS, align, check_method
from permerge.align_hf import align_hf, check_hf_dirs
from permerge.cli._checkpoints import data_from, hf_home, load_checkpoint
from permerge.cli._common import Outcome, config_of, result_outcome
from permerge.cli._models import add_model_arguments, load_model
from permerge.errors import PermergeError, PermergeIOError, SpecError
from permerge.hf import MERGEKIT_METHODS, is_hf_dir, mergekit_config, module_spec
from permerge.io.outputs import OutputDir
from permerge.io.read import file_bytes, open_checkpoint
from permerge.io.write import parse_size, safetensors_writer, text_writer
from permerge.pipeline import DTYPES, positive, resolve_device, resolve_dtype
from permerge.progress import phase
from permerge.report import write_report
from permerge.spec import PermutationSpec
from permerge.transform import LinearMap, ScaledPermutation, Transform, resolve_symmetries

HELP = "align checkpoint B to checkpoint A (Git Re-Basin)"
EPILOG = """examples:
  permerge align --model resnet20 a.safetensors b.safetensors -o aligned/
  permerge align llama-a/ llama-b/ -o llama-b-aligned/ --workers 8 --max-shard-size 5GB
  permerge align llama-a/ llama-b/ -o out/ --device cuda --out-dtype bfloat16
  permerge align --model mypkg.nets:vgg --input-shape 1,3,32,32 a.pt b.pt -o out --method activation --data mypkg.data:loader
  permerge align llama-a/ llama-b/ -o b-aligned/ --emit-mergekit && mergekit-yaml b-aligned/mergekit.yaml merged/
  permerge align --model mlp a.pt b.pt -o out --method sinkhorn --data mypkg.data:train_batches --steps 300 --lr 0.05
  permerge align --model mlp a.pt b.pt -o out --restarts 8
"""
_HF_ONLY = ("stream", "out_dtype", "max_shard_size")


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("a", help="checkpoint of model A (the reference): .safetensors, .pt/.pth, or a directory")
    p.add_argument("b", help="checkpoint of model B (the one permuted)")
    p.add_argument("--model", help="architecture: built-in example, package.module:factory, or HF dir "
                   "(omit it when A and B are Hugging Face directories)")  # fmt: skip
    add_model_arguments(p, positional=False)
    p.add_argument("-o", "--out", required=True, help="output directory (new or empty, unless --force)")
    p.add_argument("--method", default="weight", help="weight (default), activation, ste or sinkhorn (a registered matcher)")
    p.add_argument("--data", help="package.module:function returning batches (activation; (inputs, targets) for ste/sinkhorn)")
    p.add_argument("--spec", help="use this spec JSON instead of tracing (e.g. an edited `inspect --save-spec`)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--symmetries", default="permutation", type=_symmetries, metavar="CLASSES",
                   help="permutation (default), all, or a comma-separated list of classes (orthogonal, invertible, "
                        "scaled_permutation): align each group in the richest class both asked for and traced (--model)")
    p.add_argument("--force", action="store_true", help="replace a non-empty OUT, all of it")
    p.add_argument("--device", help="run the weight-matching cost matmuls here, e.g. cuda (LAPs stay on the CPU)")
    p.add_argument("--workers", type=int, help="threads solving independent groups' LAPs (default: one per two cores, at most 4)")
    p.add_argument("--max-sweeps", type=int, help="stop weight matching's coordinate descent after this many sweeps (default 100)")
    p.add_argument("--emit-mergekit", nargs="?", const="linear", choices=MERGEKIT_METHODS, metavar="METHOD",
                   help="also write OUT/mergekit.yaml: a mergekit recipe merging A with the aligned B "
                        f"({' or '.join(MERGEKIT_METHODS)}, default linear; needs Hugging Face models)")  # fmt: skip
    p.add_argument("--restarts", type=int, help="weight: best objective of this many seeded descents (default 1)")
    learned = p.add_argument_group("learned matching (ste, sinkhorn)")
    learned.add_argument("--steps", type=int, help="optimisation steps (default: the method's)")
    learned.add_argument("--lr", type=float, help="learning rate (default: the method's)")
    learned.add_argument("--batches", type=int, help="batches of --data to train on (default: all)")
    hf = p.add_argument_group("Hugging Face directories (no --model)")
    hf.add_argument("--stream", action=argparse.BooleanOptionalAction, default=None,
                    help="read the checkpoints one tensor at a time (default); --no-stream loads both into RAM")  # fmt: skip
    hf.add_argument("--out-dtype", help="cast floating tensors to float32, float16 or bfloat16 (default: keep B's)")
    hf.add_argument("--max-shard-size", help="largest output shard (default 5GB)")


def _spec(path: str | None) -> PermutationSpec | None:
    if path is None:
        return None
    try:
        text = Path(path).read_text(encoding="utf-8")
    except OSError as e:
        raise PermergeIOError(f"cannot read --spec {path}: {e.strerror or e}") from e
    try:
        return PermutationSpec.from_json(text)
    except SpecError as e:
        raise SpecError(f"--spec {path}: {e}") from e


_MATCHER_OPTIONS = {
    "weight": ("device", "workers", "max_sweeps", "restarts"),
    "ste": ("steps", "lr", "batches"),
    "sinkhorn": ("steps", "lr", "batches"),
}
"""The matcher options each --method takes (keyword arguments of its matcher)."""


def _matcher_options(args: argparse.Namespace) -> dict[str, object]:
    """The matcher options given, refused (one line) for a method that does not take them."""
    names = sorted({k for ks in _MATCHER_OPTIONS.values() for k in ks})
    options = {k: resolve_device(v) if k == "device" else v for k in names if (v := getattr(args, k)) is not None}
    wrong = [k for k in options if k not in _MATCHER_OPTIONS.get(args.method, ())]
    if wrong:
        flags = ", ".join(f"--{k.replace('_', '-')}" for k in wrong)
        raise PermergeError(f"{flags} cannot be used with --method {args.method}")
    return options


def _classes(text: str) -> str | frozenset[str]:
    return text if "," not in text else frozenset(t.strip() for t in text.split(","))


def _symmetries(text: str) -> str:
    """``--symmetries``: a class name, ``all``, or a comma-separated list, checked by its names."""
    try:
        resolve_symmetries(PermutationSpec(()), _classes(text))
    except SpecError as e:
        raise argparse.ArgumentTypeError(str(e)) from e
    return text


def _transform_files(transform: Transform | None) -> dict[str, object]:
    """``transform.safetensors`` with the dense maps and scales of a transform (none for permutations)."""
    tensors = {}
    for name, t in (transform or {}).items():
        if isinstance(t, LinearMap):
            tensors[f"{name}.matrix"] = t.matrix
        elif isinstance(t, ScaledPermutation):
            tensors[f"{name}.perm"], tensors[f"{name}.scale"] = t.perm, t.scale
    return {"transform.safetensors": safetensors_writer(tensors)} if tensors else {}


def _validate(args: argparse.Namespace) -> None:
    """Every check that needs no model: runs in well under a second, before anything is loaded."""
    if args.symmetries != "permutation" and args.model is None:
        raise PermergeError("--symmetries beyond permutation needs --model (Hugging Face directories are aligned by "
                            "streamed permutations)")  # fmt: skip
    if args.symmetries != "permutation" and args.method not in TRANSFORM_METHODS:
        raise PermergeError(f"--method {args.method} aligns permutations only; use weight or activation with --symmetries")
    positive("--workers", args.workers, integer=True)
    positive("--max-sweeps", args.max_sweeps, integer=True)
    positive("--restarts", args.restarts, integer=True)
    positive("--steps", args.steps, integer=True)
    positive("--lr", args.lr)
    positive("--batches", args.batches, integer=True)
    resolve_device(args.device)
    for name, path in (("A", args.a), ("B", args.b)):
        if not Path(path).exists():
            raise PermergeIOError(f"checkpoint {name} not found: {path}")


def run(args: argparse.Namespace) -> Outcome:
    _validate(args)
    if args.model is None:
        return _run_hf(args)
    given = [f"--{k.replace('_', '-')}" for k in _HF_ONLY if getattr(args, k) is not None]
    if given:
        raise PermergeError(f"{', '.join(given)} {'applies' if len(given) == 1 else 'apply'} to Hugging Face directories (without --model) only")
    inputs = {"a": args.a, "b": args.b}
    options = _matcher_options(args)
    check_method(args.method, has_data=args.data is not None)
    spec = _spec(args.spec)
    hf_dir = hf_home(args.b, args.model)
    if args.emit_mergekit and (hf_dir is None or not is_hf_dir(args.a)):
        raise PermergeError("--emit-mergekit needs Hugging Face models: A a directory with config.json, and B one (or --model "
                            "one), so that mergekit can read A and the output")  # fmt: skip
    with OutputDir(args.out, force=args.force, inputs=inputs, expected_bytes=file_bytes(args.b), quiet=args.quiet) as out:
        with phase("loading", quiet=args.quiet):
            ref = load_model(args.model, args)
            a, b = load_checkpoint(ref.model, args.a, "A"), load_checkpoint(ref.model, args.b, "B")
        res = align(a.model, b.model, ref.inputs, args.method, spec=None if spec is None else module_spec(spec, b.keys),
                    example_kwargs=ref.kwargs, data=data_from(args.data), seed=args.seed, quiet=args.quiet,
                    symmetries=_classes(args.symmetries), **options)  # fmt: skip
        files, left_out = b.result_files(res.model.state_dict(), {"permutation": res.permutation}, res.spec, hf_dir)
        files.update(_transform_files(res.transform))
        report = {**res.report, **({"left_out": left_out} if hf_dir is not None else {})}
        if args.emit_mergekit:
            files["mergekit.yaml"] = text_writer(mergekit_config(args.a, out.out, method=args.emit_mergekit,
                                                                 dtype=_dtype_name(args.b, None)))  # fmt: skip
        out.commit(files, command=sys.argv, config=config_of(args), report=report, view=write_report)
    text = (f"aligned {res.report['changed_groups']}/{res.report['groups']} groups ({args.method}); function check: "
            f"relative error {res.report['function_preservation_error']:.1e}; wrote {args.out}")  # fmt: skip
    return result_outcome("align", out.out, text, report)


def _run_hf(args: argparse.Namespace) -> Outcome:
    check_hf_dirs(args.a, args.b)
    if args.method != "weight":
        raise PermergeError(f"Hugging Face directories are aligned by weight matching only, not --method {args.method}")
    if args.data is not None:
        raise PermergeError("--data is for --method activation/ste/sinkhorn, which need --model")
    given = [f"--{k}" for k in ("restarts", "steps", "lr", "batches") if getattr(args, k) is not None]
    if given:
        raise PermergeError(f"{', '.join(given)} {'applies' if len(given) == 1 else 'apply'} to --model checkpoints only, "
                            "not to Hugging Face directories")  # fmt: skip
    dtype = resolve_dtype(args.out_dtype)
    if args.max_shard_size is not None:
        parse_size(args.max_shard_size)
    stream = args.stream is not False
    extra = {}
    if args.emit_mergekit:
        extra["mergekit.yaml"] = text_writer(mergekit_config(args.a, Path(args.out).resolve(), method=args.emit_mergekit,
                                                             dtype=_dtype_name(args.b, dtype)))  # fmt: skip
    res = align_hf(
        args.a, args.b, args.out, stream=stream, spec=_spec(args.spec), seed=args.seed,
        max_sweeps=args.max_sweeps or 100, device=args.device, workers=args.workers, out_dtype=args.out_dtype,
        max_shard_size=args.max_shard_size or "5GB", force=args.force, quiet=args.quiet, command=sys.argv,
        config=config_of(args), view=write_report, extra_files=extra,
    )  # fmt: skip
    text = (f"aligned {res.report['changed_groups']}/{res.report['groups']} groups (weight, "
            f"{'streamed' if stream else 'in memory'}); function check: relative error "
            f"{res.report['function_preservation_error']:.1e}; wrote {res.out}")  # fmt: skip
    return result_outcome("align", res.out, text, res.report)


def _dtype_name(checkpoint: str, out_dtype: object) -> str:
    """The floating dtype of the output: ``out_dtype``, else the checkpoint's first floating tensor's."""
    if out_dtype is not None:
        return next(k for k, v in DTYPES.items() if v == out_dtype)
    with open_checkpoint(checkpoint) as src:
        return next((str(src.dtype(k)).removeprefix("torch.") for k in src.keys() if src.dtype(k).is_floating_point),
                    "float32")  # fmt: skip
