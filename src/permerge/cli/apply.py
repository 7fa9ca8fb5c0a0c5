"""Apply a saved permutation (from `permerge align`) to another checkpoint with B's layout.

ALIGNMENT is an `align` output directory (permutation.safetensors + spec.json) or a permutation
file with spec.json beside it (e.g. a merge's permutation_1.safetensors). CHECKPOINT is

* a checkpoint of B's architecture — a fine-tuned sibling of B, B in another dtype: a Hugging Face
  directory (checked and written tensor by tensor, like `align`), or a file with --model. OUT is
  what `align` would have written for it: the permuted model (same keys and dtypes, same function),
  the permutation, spec.json, provenance.json, report.html, and for Hugging Face models their
  config, tokenizer and a model card;
* a PEFT LoRA adapter directory (adapter_config.json) trained on B, with --base B (a Hugging Face
  directory, or a file with --model). OUT is the adapter permuted to fit the permuted B: lora_A
  takes the permutation of its base layer's inputs, lora_B (and its bias, DoRA's magnitude) that of
  its outputs. Load it on the aligned B (align's output) with peft.

Before writing, the permuted result must compute the input's function (for an adapter: base +
adapter, and the permuted adapter on the permuted base must give the permuted adapted weights).
Applying the permutation `align` wrote to B itself reproduces align's output bit for bit.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from permerge.cli._checkpoints import hf_home, load_checkpoint
from permerge.cli._common import Outcome, config_of, result_outcome
from permerge.cli._models import add_model_arguments, load_model
from permerge.errors import PermergeError, PermergeIOError
from permerge.hf import is_hf_dir
from permerge.io.outputs import OutputDir
from permerge.io.read import file_bytes
from permerge.io.write import parse_size
from permerge.lora import is_adapter_dir
from permerge.pipeline import resolve_dtype
from permerge.progress import phase
from permerge.report import write_report
from permerge.transfer import SavedAlignment, apply_adapter, apply_hf, apply_saved, load_alignment

HELP = "apply a saved permutation to a sibling checkpoint of B or a LoRA adapter trained on B"
EPILOG = """examples:
  permerge apply b-aligned/ b-finetuned/ -o b-finetuned-aligned/
  permerge apply b-aligned/ lora-on-b/ --base llama-b/ -o lora-aligned/
  permerge apply --model resnet20 aligned/ b-epoch20.safetensors -o b-epoch20-aligned/
  permerge apply merged/permutation_1.safetensors c-sibling/ -o c-sibling-merged-basis/
"""
_HF_ONLY = ("out_dtype", "max_shard_size")


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("alignment", help="an `align` output directory, or a permutation .safetensors with spec.json beside it")
    p.add_argument("checkpoint", help="checkpoint with B's layout (HF directory or file), or a PEFT LoRA adapter directory")
    p.add_argument("-o", "--out", required=True, help="output directory (new or empty, unless --force)")
    p.add_argument("--model", help="architecture: built-in example, package.module:factory, or HF dir "
                   "(omit it for Hugging Face directories)")  # fmt: skip
    add_model_arguments(p, positional=False)
    p.add_argument("--base", help="LoRA adapters: the checkpoint the adapter was trained on (B, unpermuted)")
    p.add_argument("--spec", help="the spec the permutation was made with (default: spec.json beside it)")
    p.add_argument("--seed", type=int, default=0, help="seed of the function check's inputs")
    p.add_argument("--force", action="store_true", help="replace a non-empty OUT, all of it")
    hf = p.add_argument_group("Hugging Face directories (no --model)")
    hf.add_argument("--out-dtype", help="cast floating tensors to float32, float16 or bfloat16 (default: keep the checkpoint's)")
    hf.add_argument("--max-shard-size", help="largest output shard (default 5GB)")


def run(args: argparse.Namespace) -> Outcome:
    saved = load_alignment(args.alignment, spec=args.spec)
    if not Path(args.checkpoint).exists():
        raise PermergeIOError(f"checkpoint not found: {args.checkpoint}")
    if is_adapter_dir(args.checkpoint):
        return _run_adapter(args, saved)
    if args.base is not None:
        raise PermergeError(f"--base is for LoRA adapters; {args.checkpoint} has no adapter_config.json")
    if args.model is None:
        return _run_hf(args, saved)
    given = [f"--{k.replace('_', '-')}" for k in _HF_ONLY if getattr(args, k) is not None]
    if given:
        raise PermergeError(f"{', '.join(given)} {'applies' if len(given) == 1 else 'apply'} to Hugging Face directories (without --model) only")
    inputs = {**saved.files, "checkpoint": args.checkpoint}
    hf_dir = hf_home(args.checkpoint, args.model)
    with OutputDir(args.out, force=args.force, inputs=inputs, expected_bytes=file_bytes(args.checkpoint), quiet=args.quiet) as out:
        with phase("loading", quiet=args.quiet):
            ref = load_model(args.model, args)
            ckpt = load_checkpoint(ref.model, args.checkpoint, "checkpoint")
        res = apply_saved(saved, ckpt.model, ref.inputs, key_map=ckpt.keys, example_kwargs=ref.kwargs, seed=args.seed,
                          quiet=args.quiet)  # fmt: skip
        files, left_out = ckpt.result_files(res.model.state_dict(), {"permutation": res.permutation}, res.spec, hf_dir)
        report = {**res.report, **({"left_out": left_out} if hf_dir is not None else {})}
        out.commit(files, command=sys.argv, config=config_of(args), report=report, view=write_report)
    return result_outcome("apply", out.out, _text(report, args.out), report)


def _run_hf(args: argparse.Namespace, saved: SavedAlignment) -> Outcome:
    if not is_hf_dir(args.checkpoint):
        raise PermergeError(f"{args.checkpoint} is not a Hugging Face model directory (no config.json): pass --model to "
                            "name its architecture")  # fmt: skip
    resolve_dtype(args.out_dtype)
    if args.max_shard_size is not None:
        parse_size(args.max_shard_size)
    res = apply_hf(saved, args.checkpoint, args.out, out_dtype=args.out_dtype, max_shard_size=args.max_shard_size or "5GB",
                   force=args.force, quiet=args.quiet, seed=args.seed, command=sys.argv, config=config_of(args),
                   view=write_report)  # fmt: skip
    return result_outcome("apply", res.out, _text(res.report, args.out), res.report)


def _run_adapter(args: argparse.Namespace, saved: SavedAlignment) -> Outcome:
    if args.base is None:
        raise PermergeError(f"{args.checkpoint} is a LoRA adapter: pass --base, the checkpoint it was trained on (B, unpermuted)")
    if not Path(args.base).exists():
        raise PermergeIOError(f"--base not found: {args.base}")
    given = [f"--{k.replace('_', '-')}" for k in _HF_ONLY if getattr(args, k) is not None]
    if given:
        raise PermergeError(f"{', '.join(given)} {'applies' if len(given) == 1 else 'apply'} to model checkpoints, not adapters")
    if args.model is None and not is_hf_dir(args.base):
        raise PermergeError(f"--base {args.base} is not a Hugging Face directory: pass --model to name its architecture")
    ref = None if args.model is None else load_model(args.model, args)
    res = apply_adapter(saved, args.checkpoint, args.base, args.out, model=ref, force=args.force, quiet=args.quiet,
                        seed=args.seed, command=sys.argv, config=config_of(args), view=write_report)  # fmt: skip
    return result_outcome("apply", res.out, _text(res.report, args.out), res.report)


def _text(report: Mapping[str, Any], out: str) -> str:
    adapter = " (LoRA adapter: base + adapter checked)" if "adapter_check" in report else ""
    return (f"applied the saved permutation ({report['changed_groups']}/{report['groups']} groups moved){adapter}; "
            f"function check: relative error {report['function_preservation_error']:.1e}; wrote {out}")  # fmt: skip
