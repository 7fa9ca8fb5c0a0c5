"""align_hf(): the pipeline (:mod:`permerge.pipeline`) for two Hugging Face model directories.

validate (options, output directory claimed, config.json field by field, keys, shapes, dtypes) →
spec (architecture from A's ``config.json`` built on the meta device and traced) → check, first half
(the traced program runs with B's tensors) → weight matching (streamed over both checkpoints by
default, or in memory) → check, second half (with B's tensors permuted) → sink (B permuted, written
tensor by tensor as an HF directory, all or nothing). No weights are loaded for tracing and,
streamed, at most a few tensors of each model are in RAM, in the check too.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Mapping
from contextlib import ExitStack
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from permerge.check import StreamedCheck, check_compatible
from permerge.errors import PermergeIOError
from permerge.graph import trace_graph
from permerge.hf import (
    architecture_fields,
    checkpoint_keys,
    checkpoint_spec,
    hf_architecture,
    is_hf_dir,
    runtime_buffers,
    sample_inputs,
)
from permerge.io.outputs import OutputDir, hf_files
from permerge.io.read import StrPath, TensorSource, load_state_dict, open_checkpoint
from permerge.io.write import output_bytes, parse_size
from permerge.match import lap
from permerge.match.stream import stream_weight_matching
from permerge.match.weight import weight_matching
from permerge.permutation import Permutation
from permerge.pipeline import Stages, positive, resolve_device, resolve_dtype, run_alignment
from permerge.spec import PermutationSpec

LOG = logging.getLogger(__name__)

__all__ = ["HFAlignResult", "align_hf", "check_hf_dirs", "prepare_check"]


@dataclass(frozen=True)
class HFAlignResult:
    """Where the result (the aligned B; also ``apply``'s outputs) was written, the permutation, the spec
    (in checkpoint keys), a report."""

    out: Path
    permutation: Permutation
    spec: PermutationSpec
    report: dict[str, Any] = field(default_factory=dict)


def check_hf_dirs(*dirs: StrPath) -> None:
    """Raise naming the first of ``dirs`` that is not a Hugging Face model directory."""
    for d in dirs:
        if not Path(d).is_dir():
            raise PermergeIOError(f"{d} is not a directory; Hugging Face checkpoints are directories with config.json")
        if not is_hf_dir(d):
            raise PermergeIOError(f"{d} has no config.json: pass --model to name the architecture, or point at a Hugging Face model directory")


def prepare_check(
    a_dir: StrPath, src_b: TensorSource, spec: PermutationSpec | None = None, *, name: str = "B", seed: int = 0,
    tol: float = 1e-4,
) -> tuple[PermutationSpec, StreamedCheck]:
    """A's architecture (from ``config.json``, on the meta device) fitted to B's checkpoint, traced; the
    spec in B's checkpoint keys (``spec`` if given, checked against B's shapes) and B's streamed
    function check. Raises, before tracing, if B's keys, shapes or dtype kinds do not fit the model."""
    arch = hf_architecture(a_dir)
    key_map = checkpoint_keys(arch.model, src_b.keys(), name=name)
    expected = arch.model.state_dict()
    check_compatible([src_b], [name], architecture={ck: expected[mk] for mk, ck in key_map.items()})
    traced = trace_graph(arch.model, arch.inputs, example_kwargs=arch.kwargs)
    if spec is None:
        spec = checkpoint_spec(traced.spec, arch.model, src_b.keys())
    else:
        spec.validate({k: src_b.shape(k) for k in src_b.keys()})  # noqa: SIM118
    program = traced.program.on("cpu", runtime_buffers(arch.model))
    return spec, StreamedCheck(program, spec, src_b, key_map, sample_inputs(arch, seed), tol=tol, name=name)


def align_hf(
    a_dir: StrPath,
    b_dir: StrPath,
    out: StrPath,
    *,
    stream: bool = True,
    spec: PermutationSpec | None = None,
    seed: int = 0,
    max_sweeps: int = 100,
    backend: str = "auto",
    device: torch.device | str | None = None,
    workers: int | None = None,
    out_dtype: torch.dtype | str | None = None,
    max_shard_size: int | str = "5GB",
    force: bool = False,
    quiet: bool = False,
    tol: float = 1e-4,
    command: list[str] | str = "",
    config: dict[str, Any] | None = None,
    view: Callable[[Path], object] | None = None,
    extra_files: Mapping[str, Callable[[Path], object]] | None = None,
) -> HFAlignResult:
    """Align B's hidden units to A's by weight matching and write B, permuted, as an HF directory.

    Args:
        a_dir, b_dir: Hugging Face model directories (``config.json`` + safetensors, possibly sharded)
            of one architecture (every architecture-defining ``config.json`` field equal); A is the
            reference. Neither is modified.
        out: the output directory (new, or empty unless ``force``, which replaces it whole).
        stream: match over lazily read checkpoints (bounded RAM); ``False`` loads both into RAM.
        spec: the groups to permute, in checkpoint keys; default: traced from A's config.
        seed, max_sweeps, backend: as for :func:`~permerge.match.weight_matching`.
        device: where the cost matmuls run (``"cuda"`` when there is a GPU).
        workers: threads for the LAPs of independent groups (default: one per two cores, at most
            4; same result).
        out_dtype: cast floating tensors to this dtype (``"bfloat16"``…); default: keep B's dtypes.
        max_shard_size: largest output shard, e.g. ``"5GB"``.
        tol: the function check's tolerance (relative to the largest output magnitude).
        command, config: recorded in ``provenance.json``.
        view: renders a file from the complete output (the CLI passes the HTML report writer).
        extra_files: more files for the output, ``name → writer(path)`` (the CLI's mergekit recipe).

    Returns:
        An :class:`HFAlignResult`; ``out`` loads with ``AutoModel*.from_pretrained`` and computes B's
        function (checked before writing: ``report["function_preservation_error"]``). Files of B's
        directory not copied (other weight formats, unknown files) are listed in ``report["left_out"]``.

    Example:
        >>> res = align_hf("llama-a", "llama-b", "llama-b-aligned", workers=8)  # doctest: +SKIP
    """
    stages = Stages(quiet=quiet)
    inputs = {"a": a_dir, "b": b_dir}
    with stages("validate"):
        dev = resolve_device(device)
        dtype = resolve_dtype(out_dtype)
        parse_size(max_shard_size)
        positive("max_sweeps", max_sweeps, integer=True)
        positive("workers", workers, integer=True)
        positive("tol", tol)
        lap.resolve_backend(backend)
        check_hf_dirs(a_dir, b_dir)
    with ExitStack() as stack:
        with stages("validate"):
            src_a = stack.enter_context(open_checkpoint(a_dir, mmap=False))
            src_b = stack.enter_context(open_checkpoint(b_dir, mmap=False))
            sink = stack.enter_context(OutputDir(out, force=force, inputs=inputs, expected_bytes=output_bytes(src_b, dtype),
                                                 quiet=quiet))  # fmt: skip
            names = [f"A ({a_dir})", f"B ({b_dir})"]
            check_compatible([src_a, src_b], names, configs=[architecture_fields(a_dir), architecture_fields(b_dir)])
        with stages("trace"):
            spec, check = prepare_check(a_dir, src_b, spec, name=names[1], seed=seed, tol=tol)

        def match() -> Any:
            if stream:
                return stream_weight_matching(spec, src_a, src_b, seed=seed, max_sweeps=max_sweeps, backend=backend,
                                              quiet=quiet, device=dev, workers=workers)  # fmt: skip
            return weight_matching(spec, load_state_dict(a_dir), load_state_dict(b_dir), seed=seed, max_sweeps=max_sweeps,
                                   backend=backend, workers=workers, quiet=quiet, device=dev)  # fmt: skip

        perm, report = run_alignment(spec, match, check, stages, method="weight", streamed=stream)
        with stages("write", show=False):  # the output directory draws its own bar
            files, left_out = hf_files(src_b, b_dir, spec, perm, out_dtype=dtype, max_shard_size=max_shard_size)
            files.update(extra_files or {})
            report["left_out"] = left_out
            path = sink.commit(files, command=[command] if isinstance(command, str) else list(command),
                               config=config or {}, report=report, view=view)  # fmt: skip
    LOG.info("aligned %d groups (%s) in %.1f s; wrote %s", len(spec.groups), "streamed" if stream else "in memory",
             sum(stages.seconds.values()), path)  # fmt: skip
    return HFAlignResult(path, perm, spec, report)
