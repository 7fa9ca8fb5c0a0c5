"""The one alignment pipeline: sources → validate → spec → match → check → apply → sink.

Every entry point runs these stages in this order: :func:`~permerge.align` (modules in memory;
sink: an aligned module), :func:`~permerge.align_hf` (Hugging Face directories read lazily; sink:
an HF directory), :func:`~permerge.merge.combine.merge_models` and every CLI subcommand
(checkpoint files loaded into ``--model``; sink: a result directory).

============  =========================================================================================
sources       ``nn.Module``/state dicts, ``.safetensors``/``.pt`` files, HF directories
              (:func:`~permerge.io.read.open_checkpoint`, lazily with ``mmap=False``)
validate      options (:func:`resolve_device`, :func:`resolve_dtype`, :func:`positive`, method names),
              the output directory, claimed (:class:`~permerge.io.outputs.OutputDir`), then the
              inputs (:func:`~permerge.check.check_compatible`: config fields, keys, shapes, dtypes,
              finite values): all before tracing, each failure one line naming the fix
spec          traced from A (:func:`~permerge.trace`) or given and fitted to the tensors
match         a registered matcher (:mod:`permerge.match`), or streamed weight matching
check         B permuted must compute B's function: :class:`ModuleCheck` (in memory: eval, train,
              two batch sizes) or :class:`~permerge.check.StreamedCheck` (the traced program with
              B's tensors read lazily). Its error goes into the report, never null; a failure raises
              and nothing is written.
apply / sink  B permuted as a module, as result files or as an HF directory written tensor by tensor
============  =========================================================================================
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass, field, fields
from typing import Any, Protocol

import torch
from torch import nn

from permerge.check import PreservationReport, check_function_preserved
from permerge.errors import PermergeError
from permerge.io.write import jsonable
from permerge.permutation import Permutation
from permerge.progress import phase
from permerge.spec import PermutationSpec

__all__ = [
    "DTYPES",
    "FunctionCheck",
    "ModuleCheck",
    "Stages",
    "alignment_report",
    "positive",
    "resolve_device",
    "resolve_dtype",
    "run_alignment",
]

DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


# -- validation (before any work) -------------------------------------------------------------------


def resolve_device(device: torch.device | str | None) -> torch.device | None:
    """``device`` parsed and checked to exist on this machine (``None``: the CPU default)."""
    if device is None:
        return None
    try:
        dev = torch.device(device)
    except (RuntimeError, TypeError):
        raise PermergeError(f"device {device!r} is not a device name; write e.g. cpu, cuda or cuda:1") from None
    if dev.type == "cuda":
        if not torch.cuda.is_available():
            raise PermergeError(f"device {device!r}: CUDA is not available on this machine; drop --device or use cpu")
        if dev.index is not None and dev.index >= torch.cuda.device_count():
            raise PermergeError(f"device {device!r}: this machine has {torch.cuda.device_count()} CUDA device(s)")
    elif dev.type == "mps" and not torch.backends.mps.is_available():
        raise PermergeError(f"device {device!r}: MPS is not available on this machine; drop --device or use cpu")
    elif dev.type not in ("cpu", "cuda", "mps"):
        raise PermergeError(f"device {device!r}: permerge runs on cpu, cuda or mps")
    return dev


def resolve_dtype(dtype: torch.dtype | str | None) -> torch.dtype | None:
    """An output dtype by name (``"bfloat16"``) or value; ``None`` keeps the checkpoint's dtypes."""
    if dtype is None or isinstance(dtype, torch.dtype) and dtype in DTYPES.values():
        return dtype
    if isinstance(dtype, str) and dtype in DTYPES:
        return DTYPES[dtype]
    raise PermergeError(f"unknown output dtype {dtype!r}; choose one of {', '.join(DTYPES)}")


def positive(name: str, value: float | None, *, integer: bool = False) -> None:
    """Raise unless ``value`` (an option called ``name``) is ``None`` or a finite number > 0."""
    if value is None:
        return
    ok = isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value) and value > 0
    if not ok or (integer and int(value) != value):
        raise PermergeError(f"{name} must be a positive {'integer' if integer else 'number'}, got {value!r}")


# -- timing ---------------------------------------------------------------------------------------


@dataclass
class Stages:
    """Wall time per pipeline stage (a stage entered twice adds up), each shown as a
    :func:`~permerge.progress.phase` on a terminal unless ``quiet`` or ``show=False`` (a stage with
    its own bar)."""

    seconds: dict[str, float] = field(default_factory=dict)
    quiet: bool = True

    @contextmanager
    def __call__(self, name: str, *, show: bool = True) -> Iterator[None]:
        t0 = time.perf_counter()
        try:
            with phase(name, quiet=self.quiet or not show):
                yield
        finally:
            self.seconds[name] = self.seconds.get(name, 0.0) + time.perf_counter() - t0


# -- the function check ----------------------------------------------------------------------------


class FunctionCheck(Protocol):
    """What the pipeline asks of a function check: an optional early run, then a verdict."""

    def reference(self) -> None:
        """Anything that can run before matching (the unpermuted forward)."""

    def verify(self, perm: Mapping[str, torch.Tensor]) -> PreservationReport:
        """Raise :class:`~permerge.errors.FunctionNotPreservedError` unless ``perm`` keeps the function."""


@dataclass(frozen=True)
class ModuleCheck:
    """:func:`~permerge.check.check_function_preserved` on a module held in memory."""

    model: nn.Module
    spec: PermutationSpec
    example_inputs: Any
    example_kwargs: Mapping[str, Any] | None = None
    tol: float = 1e-4
    seed: int = 0

    def reference(self) -> None:
        """Nothing to do early: the in-memory check is cheap."""

    def verify(self, perm: Mapping[str, torch.Tensor]) -> PreservationReport:
        return check_function_preserved(
            self.model, self.spec, self.example_inputs, perm, example_kwargs=self.example_kwargs, tol=self.tol, seed=self.seed
        )


# -- match → check → report ------------------------------------------------------------------------


def run_alignment(
    spec: PermutationSpec,
    match: Callable[[], Any],
    check: FunctionCheck | None,
    stages: Stages,
    *,
    method: str,
    **extra: Any,
) -> tuple[Permutation, dict[str, Any]]:
    """Run the check's early part, the matcher (``match()`` returns a result with ``.permutation``),
    then the check; return the permutation and the report (:func:`alignment_report`).

    The order is the guarantee: nothing downstream (apply, sink) sees a permutation that has not
    passed the check, unless the caller passed ``check=None`` (recorded as not checked).
    """
    if check is not None:
        with stages("check"):
            check.reference()
    with stages("match", show=False):  # matchers draw their own bars
        result = match()
    moved = getattr(result, "transform", result.permutation)  # dense maps and scales too (match/symmetry.py)
    preservation = None
    if check is not None:
        with stages("check"):
            preservation = check.verify(moved)
    return moved, alignment_report(spec, result, preservation, stages, method=method, **extra)


def alignment_report(
    spec: PermutationSpec, result: Any, preservation: PreservationReport | None, stages: Stages, *, method: str, **extra: Any
) -> dict[str, Any]:
    """The report of one alignment: groups, what moved, the function check's numbers, timings and
    the matcher's own details (JSON-ready: tensors as lists or shapes)."""
    details = {f.name: getattr(result, f.name) for f in fields(result) if f.name not in ("permutation", "transform")}
    perm = result.permutation
    return {
        "method": method,
        **extra,
        "groups": len(spec.groups),
        "group_sizes": {g.name: g.size for g in spec.groups},
        "frozen": [{"size": f.size, "reason": f.reason, "kind": f.kind.value, "boundary": f.boundary} for f in spec.frozen],
        "changed_groups": sum(not torch.equal(p, torch.arange(len(p))) for p in perm.values()),
        "function_preservation_error": None if preservation is None else preservation.relative_error,
        "function_check": "not run (check=False)" if preservation is None else {
            "relative_error": preservation.relative_error, "max_abs_error": preservation.max_abs_error,
            "tol": preservation.tol, "runs": list(preservation.runs), "skipped": list(preservation.skipped),
        },
        "timing_s": stages.seconds,
        **jsonable(details),
    }  # fmt: skip
