"""align_hf(): weight-match two Hugging Face model directories and write B aligned as a third one.

trace (architecture from A's ``config.json``, built on the meta device) → weight matching (streamed
over both checkpoints by default, or in memory) → plan + write (tensor by tensor, all or nothing).
No weights are loaded for tracing and, streamed, at most a few tensors of each model are in RAM.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any

import torch

from permerge.errors import PermergeError
from permerge.graph import trace
from permerge.io.hf import checkpoint_spec, hf_architecture, write_hf_model
from permerge.io.read import StrPath, load_state_dict
from permerge.io.stream import open_unmapped
from permerge.io.write import prepare_output_dir
from permerge.match.stream import stream_weight_matching
from permerge.match.weight import weight_matching
from permerge.permutation import Permutation
from permerge.spec import PermutationSpec

LOG = logging.getLogger(__name__)

__all__ = ["HFAlignResult", "align_hf"]

_DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


@dataclass(frozen=True)
class HFAlignResult:
    """Where the aligned B was written, the permutation, the spec (in checkpoint keys), a report."""

    out: Path
    permutation: Permutation
    spec: PermutationSpec
    report: dict[str, Any] = field(default_factory=dict)


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
    command: list[str] | str = "",
    config: dict[str, Any] | None = None,
) -> HFAlignResult:
    """Align B's hidden units to A's by weight matching and write B, permuted, as an HF directory.

    Args:
        a_dir, b_dir: Hugging Face model directories (``config.json`` + safetensors, possibly sharded)
            of the same architecture; A is the reference. Neither is modified.
        out: the output directory (new, or empty unless ``force``).
        stream: match over lazily read checkpoints (bounded RAM); ``False`` loads both into RAM.
        spec: the groups to permute, in checkpoint keys; default: traced from A's config.
        seed, max_sweeps, backend: as for :func:`~permerge.match.weight_matching`.
        device: where the cost matmuls run (``"cuda"`` when there is a GPU).
        workers: threads for the LAPs of independent groups (default: one per two cores, at most
            4; same result).
        out_dtype: cast floating tensors to this dtype (``"bfloat16"``…); default: keep B's dtypes.
        max_shard_size: largest output shard, e.g. ``"5GB"``.

    Returns:
        An :class:`HFAlignResult`; ``out`` loads with ``AutoModel*.from_pretrained`` and computes B's
        function.

    Example:
        >>> res = align_hf("llama-a", "llama-b", "llama-b-aligned", workers=8)  # doctest: +SKIP
    """
    times: dict[str, float] = {}
    inputs = {"a": a_dir, "b": b_dir}
    prepare_output_dir(out, force=force, inputs=inputs.values(), create=False)  # fail fast
    if isinstance(out_dtype, str):
        if out_dtype not in _DTYPES:
            raise PermergeError(f"unknown out_dtype {out_dtype!r}; choose one of {', '.join(_DTYPES)}")
        out_dtype = _DTYPES[out_dtype]
    t0 = time.perf_counter()
    with open_unmapped(a_dir) as src_a, open_unmapped(b_dir) as src_b:
        if spec is None:
            arch = hf_architecture(a_dir)
            traced = trace(arch.model, arch.inputs, example_kwargs=arch.kwargs)
            spec = checkpoint_spec(traced, arch.model, src_b.keys())
        else:
            spec.validate({k: src_b.shape(k) for k in spec.keys if k in src_b})
        times["trace"] = time.perf_counter() - t0
        t0 = time.perf_counter()
        if stream:
            res = stream_weight_matching(
                spec, src_a, src_b, seed=seed, max_sweeps=max_sweeps, backend=backend, quiet=quiet,
                device=device, workers=workers,
            )  # fmt: skip
        else:
            sd_a, sd_b = load_state_dict(a_dir), load_state_dict(b_dir)
            res = weight_matching(
                spec,
                sd_a,
                sd_b,
                seed=seed,
                max_sweeps=max_sweeps,
                backend=backend,
                workers=workers,
                quiet=quiet,
                device=device,
            )
            del sd_a, sd_b
        times["match"] = time.perf_counter() - t0
        details = {f.name: getattr(res, f.name) for f in fields(res) if f.name != "permutation"}
        report = {
            "method": "weight",
            "streamed": stream,
            "groups": len(spec.groups),
            "group_sizes": {g.name: g.size for g in spec.groups},
            "changed_groups": sum(not torch.equal(p, torch.arange(len(p))) for p in res.permutation.values()),
            "function_preservation_error": None,  # not run: it would need B's weights in RAM; the spec is traced
            "timing_s": times,
            **details,
        }
        t0 = time.perf_counter()
        path = write_hf_model(
            out, src_b, b_dir, spec, res.permutation, out_dtype=out_dtype, max_shard_size=max_shard_size,
            force=force, inputs=inputs, command=command, config=config or {}, report=report,
        )  # fmt: skip
        times["write"] = time.perf_counter() - t0
    LOG.info("aligned %d groups (%s) in %.1f s; wrote %s", len(spec.groups), "streamed" if stream else "in memory",
             sum(times.values()), path)  # fmt: skip
    return HFAlignResult(path, res.permutation, spec, report)
