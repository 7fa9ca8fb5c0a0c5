"""Apply a saved permutation to other checkpoints of B's layout: the pipeline (:mod:`permerge.pipeline`)
with a saved permutation in place of matching.

An alignment (``permerge align`` writes ``permutation.safetensors`` and ``spec.json``, in the
checkpoint's keys) maps B's hidden units onto A's. The same permutation fits every checkpoint with B's
layout — a fine-tuned sibling of B, B in another dtype — and every LoRA adapter trained on B
(:mod:`permerge.lora`). Each path runs validate → spec (the saved one, fitted to the checkpoint) →
"match" (the saved permutation) → function check → sink, like :func:`~permerge.align`:

* :func:`apply_saved`: a module in memory (the CLI loads checkpoints into ``--model``);
* :func:`apply_hf`: a Hugging Face directory, streamed (checked and written tensor by tensor);
* :func:`apply_adapter`: a PEFT LoRA adapter, checked as base + adapter (the adapted function is
  kept, and the permuted adapter on the permuted base gives the permuted adapted weights).

Example:
    >>> saved = load_alignment("b-aligned/")  # doctest: +SKIP
    >>> apply_hf(saved, "b-finetuned/", "b-finetuned-aligned/")  # doctest: +SKIP
"""

from __future__ import annotations

import copy
from collections.abc import Callable, Mapping
from contextlib import ExitStack
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Any

import torch
from torch import nn

from permerge.align import AlignResult
from permerge.align_hf import HFAlignResult, check_hf_dirs, prepare_check
from permerge.apply import apply_permutation
from permerge.check import StreamedCheck, check_compatible
from permerge.errors import FunctionNotPreservedError, PermergeIOError, SpecError
from permerge.hf import checkpoint_keys, model_card, module_spec
from permerge.io.outputs import OutputDir, Planned, hf_extras, hf_files
from permerge.io.read import StrPath, TensorSource, open_checkpoint
from permerge.io.write import load_permutation, output_bytes, parse_size, safetensors_writer
from permerge.lora import AdaptedSource, LoraAdapter, adapted_error, permute_adapter, read_adapter
from permerge.models import ModelRef
from permerge.permutation import Permutation, check_permutation
from permerge.pipeline import ModuleCheck, Stages, positive, resolve_dtype, run_alignment
from permerge.spec import PermutationSpec

__all__ = ["SavedAlignment", "apply_adapter", "apply_hf", "apply_saved", "load_alignment"]

PERMUTATION_NAME, SPEC_NAME = "permutation.safetensors", "spec.json"


@dataclass(frozen=True)
class SavedAlignment:
    """A saved permutation and the spec it permutes (in checkpoint keys), and where they came from."""

    spec: PermutationSpec
    permutation: Permutation
    files: Mapping[str, Path]  # "permutation", and "spec" when read from a file: recorded as inputs


@dataclass(frozen=True)
class _Saved:
    """What the pipeline's match stage returns when the permutation is given."""

    permutation: Permutation
    source: str


def load_alignment(path: StrPath, *, spec: StrPath | None = None) -> SavedAlignment:
    """Read a saved permutation: a result directory with ``permutation.safetensors`` and
    ``spec.json`` (``permerge align``'s output), or a permutation file (``permutation_1.safetensors``
    of a merge) with ``spec.json`` beside it; ``spec`` names another spec file. Cheap and checked
    (every group of the spec has a permutation of its size) before any other work."""
    path = Path(path)
    if path.is_dir():
        perm_file = path / PERMUTATION_NAME
        if not perm_file.is_file():
            found = sorted(p.name for p in path.glob("permutation*.safetensors"))
            hint = f"; it has {', '.join(found)}: name one of them" if found else ""
            raise PermergeIOError(f"{path} has no {PERMUTATION_NAME}{hint}")
    elif path.is_file():
        perm_file = path
    else:
        raise PermergeIOError(f"saved permutation not found: {path}")
    spec_file = Path(spec) if spec is not None else perm_file.parent / SPEC_NAME
    try:
        text = spec_file.read_text(encoding="utf-8")
    except OSError as e:
        fix = "" if spec is not None else " (pass the spec the permutation was made with: --spec FILE)"
        raise PermergeIOError(f"cannot read the spec {spec_file}: {e.strerror or e}{fix}") from e
    try:
        parsed = PermutationSpec.from_json(text)
    except SpecError as e:
        raise SpecError(f"{spec_file}: {e}") from e
    perm = load_permutation(perm_file)
    try:
        check_permutation(parsed, perm)
    except SpecError as e:
        raise SpecError(f"{perm_file} does not fit {spec_file}: {e}") from e
    missing = sorted(g.name for g in parsed.groups if g.name not in perm)
    if missing:
        raise SpecError(f"{perm_file} has no permutation for {len(missing)} groups of {spec_file}, e.g. {missing[0]!r}")
    return SavedAlignment(parsed, perm, {"permutation": perm_file, "spec": spec_file})


def _match(saved: SavedAlignment) -> Callable[[], _Saved]:
    return lambda: _Saved(saved.permutation, str(saved.files["permutation"]))


def apply_saved(
    saved: SavedAlignment,
    model: nn.Module,
    example_inputs: Any,
    *,
    key_map: Mapping[str, str] | None = None,
    example_kwargs: Mapping[str, Any] | None = None,
    tol: float = 1e-4,
    seed: int = 0,
    quiet: bool = False,
) -> AlignResult:
    """``model`` (holding a checkpoint of B's layout) permuted by ``saved``: a checked copy.

    ``key_map`` maps the model's state-dict keys to the checkpoint's where they differ (tied
    aliases, Hugging Face renames; :func:`~permerge.hf.checkpoint_keys`), since saved specs use
    checkpoint keys. Raises :class:`~permerge.errors.SpecError` if the spec does not fit the model's
    shapes and :class:`~permerge.FunctionNotPreservedError` if the permuted copy computes another
    function (eval and train mode, two batch sizes). ``model`` is not modified.
    """
    stages = Stages(quiet=quiet)
    with stages("validate"):
        positive("tol", tol)
        spec = module_spec(saved.spec, key_map) if key_map else saved.spec
        spec.validate(model.state_dict())
    check = ModuleCheck(model, spec, example_inputs, example_kwargs, tol, seed)
    perm, report = run_alignment(spec, _match(saved), check, stages, method="saved")
    with stages("apply"):
        aligned = copy.deepcopy(model)
        aligned.load_state_dict(apply_permutation(spec, perm, model.state_dict()))
    return AlignResult(aligned, perm, spec, report)


def apply_hf(
    saved: SavedAlignment,
    checkpoint: StrPath,
    out: StrPath,
    *,
    out_dtype: torch.dtype | str | None = None,
    max_shard_size: int | str = "5GB",
    force: bool = False,
    quiet: bool = False,
    tol: float = 1e-4,
    seed: int = 0,
    command: list[str] | str = "",
    config: Mapping[str, Any] | None = None,
    view: Callable[[Path], object] | None = None,
) -> HFAlignResult:
    """Write the Hugging Face checkpoint ``checkpoint`` permuted by ``saved`` as an HF directory at ``out``.

    As :func:`~permerge.align_hf` without A and without matching: the architecture comes from the
    checkpoint's own ``config.json`` (meta device), its keys, shapes and dtypes are checked against it
    and against the saved spec before any work, the streamed function check runs before writing, and
    the output is written tensor by tensor, all or nothing (same files as ``align``'s output,
    tokenizer and model card included).
    """
    stages = Stages(quiet=quiet)
    with stages("validate"):
        dtype = resolve_dtype(out_dtype)
        parse_size(max_shard_size)
        positive("tol", tol)
        check_hf_dirs(checkpoint)
    with ExitStack() as stack:
        with stages("validate"):
            src = stack.enter_context(open_checkpoint(checkpoint, mmap=False))
            sink = stack.enter_context(OutputDir(out, force=force, inputs={**saved.files, "checkpoint": checkpoint},
                                                 expected_bytes=output_bytes(src, dtype), quiet=quiet))  # fmt: skip
        with stages("trace"):
            spec, check = prepare_check(checkpoint, src, saved.spec, name=f"checkpoint ({checkpoint})", seed=seed, tol=tol)
        perm, report = run_alignment(spec, _match(saved), check, stages, method="saved", streamed=True)
        with stages("write", show=False):
            files, left_out = hf_files(src, checkpoint, spec, perm, out_dtype=dtype, max_shard_size=max_shard_size)
            report["left_out"] = left_out
            path = sink.commit(files, command=[command] if isinstance(command, str) else list(command),
                               config=config or {}, report=report, view=view)  # fmt: skip
    return HFAlignResult(path, perm, spec, report)


def apply_adapter(
    saved: SavedAlignment,
    adapter: StrPath,
    base: StrPath,
    out: StrPath,
    *,
    model: ModelRef | None = None,
    force: bool = False,
    quiet: bool = False,
    tol: float = 1e-4,
    seed: int = 0,
    command: list[str] | str = "",
    config: Mapping[str, Any] | None = None,
    view: Callable[[Path], object] | None = None,
) -> HFAlignResult:
    """Write the PEFT LoRA ``adapter`` (trained on ``base``, a checkpoint of B's layout) permuted to fit
    ``base`` permuted by ``saved``, as an adapter directory at ``out``.

    ``base`` is a Hugging Face directory (its ``config.json`` gives the architecture; the check
    streams) or, with ``model`` (architecture and example input), any checkpoint file. Before writing,
    two checks: base + adapter permuted computes the function of base + adapter (the function check
    on the adapted weights: ``W + s·B@A``, DoRA, LoRA biases, carried tensors), and the permuted
    adapter on the permuted base gives exactly the permuted adapted weights
    (:func:`~permerge.lora.adapted_error`). ``report["function_preservation_error"]`` is the larger
    error. ``adapter_config.json`` and the adapter's other allow-listed files are copied; the model
    card is rewritten.
    """
    stages = Stages(quiet=quiet)
    with stages("validate"):
        positive("tol", tol)
        lora = read_adapter(adapter)
        if model is None:
            check_hf_dirs(base)
    with ExitStack() as stack:
        with stages("validate"):
            src = stack.enter_context(open_checkpoint(base, mmap=False))
            sink = stack.enter_context(OutputDir(out, force=force, quiet=quiet, inputs={**saved.files, "adapter": adapter,
                                                                                       "base": base}))  # fmt: skip
            key_map = None if model is None else checkpoint_keys(model.model, src.keys(), name=f"base ({base})")
        with stages("trace"):
            if model is None:
                spec, base_check = prepare_check(base, src, saved.spec, name=f"base ({base})", seed=seed, tol=tol)
                key_map = base_check.key_map
                check: Any = StreamedCheck(base_check.program, spec, AdaptedSource(src, lora, key_map), key_map,
                                           (base_check.args, base_check.kwargs), tol=tol, name=f"base ({base}) + adapter")  # fmt: skip
            else:
                spec, check = _module_check(saved, lora, src, model, key_map, tol=tol, seed=seed, name=f"base ({base})")
        perm, report = run_alignment(spec, _match(saved), check, stages, method="saved", adapter=str(adapter))
        with stages("apply"):
            shapes = {k: tuple(src.shape(k)) for k in src.keys()}  # noqa: SIM118
            permuted = permute_adapter(spec, perm, lora, shapes, key_map)
            error = adapted_error(AdaptedSource(src, lora, key_map), spec, perm, permuted)
        if not error <= tol:
            raise FunctionNotPreservedError(
                f"the permuted adapter {adapter} does not give the permuted adapted weights (relative error {error:.2e} "
                f"> tol {tol:.0e}); nothing was written"
            )
        report["adapter_check"] = {"relative_error": error, "tensors": len(permuted)}
        report["function_preservation_error"] = max(report["function_preservation_error"], error)
        with stages("write", show=False):
            files = _adapter_files(lora, permuted)
            path = sink.commit(files, command=[command] if isinstance(command, str) else list(command),
                               config=config or {}, report=report, view=view)  # fmt: skip
    return HFAlignResult(path, perm, spec, report)


def _module_check(
    saved: SavedAlignment, lora: LoraAdapter, src: TensorSource, model: ModelRef, key_map: Mapping[str, str], *, tol: float,
    seed: int, name: str,
) -> tuple[PermutationSpec, ModuleCheck]:  # fmt: skip
    """The in-memory function check of base + adapter: ``model`` with the adapted weights."""
    expected = model.model.state_dict()
    check_compatible([src], [name], architecture={ck: expected[mk] for mk, ck in key_map.items()})
    saved.spec.validate({k: src.shape(k) for k in src.keys()})  # noqa: SIM118
    adapted = AdaptedSource(src, lora, key_map)
    module = copy.deepcopy(model.model)
    module.load_state_dict({mk: adapted.get(ck) for mk, ck in key_map.items()})
    # the check permutes module keys; group names (what the permutation is keyed by) are the same
    return saved.spec, ModuleCheck(module.eval(), module_spec(saved.spec, key_map), model.inputs, model.kwargs, tol, seed)


def _adapter_files(lora: LoraAdapter, permuted: Mapping[str, torch.Tensor]) -> dict[str, Planned]:
    files, _ = hf_extras(lora.path, read=[lora.weights_file], config="adapter_config.json",
                         card=partial(model_card, library="peft"))  # fmt: skip
    files["adapter_model.safetensors"] = safetensors_writer(permuted)
    return files
