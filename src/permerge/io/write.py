"""Write state dicts, permutations, provenance and planned sharded checkpoints: atomically, and
never over an input.

Every file is written to a temporary name beside its destination and renamed into place only once
complete, so an interrupted run leaves either the old file or the new one, never a partial one.
Whole result directories are assembled the same way by :mod:`permerge.io.outputs`.

Example:
    >>> with open_checkpoint("b_model_dir", mmap=False) as src:  # doctest: +SKIP
    ...     for shard in plan_write(src, spec, max_shard_size="2GB"):
    ...         write_shard(out / shard.name, shard, permuted_producer(src, perm))
"""

from __future__ import annotations

import dataclasses
import json
import logging
import math
import os
import platform
import re
import secrets
import struct
from collections.abc import Callable, Iterable, Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import datetime, timezone
from enum import Enum
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path, PurePath
from typing import Any

import numpy as np
import torch
from safetensors.torch import save_file

from permerge.apply import permute_tensor
from permerge.errors import PermergeIOError
from permerge.io.read import (
    _SAFETENSORS_DTYPES,
    StrPath,
    TensorSource,
    checkpoint_hashes,
    hashed_files,
    load_state_dict,
)
from permerge.progress import progress
from permerge.spec import Axis, PermutationSpec

__all__ = [
    "INDEX_NAME",
    "PROVENANCE_NAME",
    "ShardPlan",
    "ShardWriter",
    "TensorsWriter",
    "WriteJob",
    "atomic_path",
    "atomic_write",
    "check_not_input",
    "jsonable",
    "load_permutation",
    "output_bytes",
    "package_version",
    "parse_size",
    "permutation_writer",
    "permuted_producer",
    "plan_write",
    "safetensors_writer",
    "shard_index",
    "text_writer",
    "prepare_output_dir",
    "save_permutation",
    "save_state_dict",
    "write_provenance",
    "write_shard",
]

LOG = logging.getLogger(__name__)

PROVENANCE_NAME = "provenance.json"
INDEX_NAME = "model.safetensors.index.json"
_DTYPE_NAMES = {v: k for k, v in _SAFETENSORS_DTYPES.items()}
# Tensors and arrays up to this many elements are written into provenance as lists; larger ones as shape+dtype.
_MAX_LISTED = 1024


@contextmanager
def atomic_path(path: StrPath) -> Iterator[Path]:
    """Yield a temporary path beside ``path``; on success fsync it and ``os.replace`` it onto ``path``.

    If the block raises, the temporary file is removed and ``path`` is left as it was. The temporary
    file lives in the same directory so the rename is atomic; it is not pre-created, so the writer
    creates it with the usual permissions.

    Example:
        >>> with atomic_path("out/model.safetensors") as tmp:  # doctest: +SKIP
        ...     save_file(tensors, tmp)
    """
    path = Path(path)
    if not path.parent.is_dir():
        raise PermergeIOError(f"cannot write {path}: directory {path.parent} does not exist; create it first")
    if path.is_dir():
        raise PermergeIOError(f"cannot write {path}: it is a directory")
    tmp = path.with_name(f".{path.name}.{secrets.token_hex(4)}.tmp")
    try:
        yield tmp
        if not tmp.is_file():
            raise PermergeIOError(f"cannot write {path}: the writer created no file at {tmp}")
        with open(tmp, "rb") as f:
            os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def atomic_write(path: StrPath, writer: Callable[[Path], None]) -> Path:
    """Call ``writer(tmp)`` and move ``tmp`` onto ``path`` only if it returns (see :func:`atomic_path`)."""
    with atomic_path(path) as tmp:
        writer(tmp)
    return Path(path)


def check_not_input(path: StrPath, protect: Iterable[StrPath]) -> None:
    """Raise unless writing ``path`` leaves every path in ``protect`` untouched.

    ``path`` may not be a protected file (same resolved path, or ``os.path.samefile``, which also
    catches symlinks and hard links) nor lie inside a protected directory.
    """
    target = Path(path)
    resolved = target.resolve()
    for p in map(Path, protect):
        inside = p.is_dir() and resolved.is_relative_to(p.resolve())
        if inside or resolved == p.resolve() or _samefile(target, p):
            raise PermergeIOError(
                f"refusing to write {target}: it would overwrite input {p}; choose an output path outside the inputs"
            )


def save_state_dict(
    sd: Mapping[str, torch.Tensor],
    path: StrPath,
    metadata: Mapping[str, str] | None = None,
    *,
    protect: Iterable[StrPath] = (),
) -> Path:
    """Write ``sd`` to a ``.safetensors`` file atomically; ``sd`` itself is never modified.

    Tied tensors (several keys on one storage, e.g. a Hugging Face ``lm_head.weight`` that *is*
    ``embed_tokens.weight``) are each written in full: safetensors refuses shared storage, and dropping
    a name would change the key set. They load back as independent, equal tensors. Non-contiguous
    tensors are packed. The header gets ``{"format": "pt"}`` (which ``transformers`` requires) plus
    ``metadata``.

    Args:
        sd: tensor name → tensor (any device; written from the CPU).
        path: destination, must end in ``.safetensors``; its directory must exist.
        metadata: extra string → string header entries.
        protect: input paths (files or directories) that must not be overwritten.

    Example:
        >>> save_state_dict(model.state_dict(), "out/model.safetensors", protect=["a.safetensors"])  # doctest: +SKIP
    """
    path = Path(path)
    if path.suffix != ".safetensors":
        raise PermergeIOError(f"cannot save to {path}: save_state_dict writes safetensors, name the file *.safetensors")
    check_not_input(path, protect)
    tensors = _packable(sd, path)
    header = {"format": "pt", **_check_metadata(metadata or {}, path)}
    atomic_write(path, lambda tmp: save_file(tensors, tmp, metadata=header))
    LOG.info("wrote %d tensors to %s", len(tensors), path)
    return path


def prepare_output_dir(out: StrPath, *, force: bool, inputs: Iterable[StrPath], create: bool = True) -> Path:
    """Check that ``out`` can become the output directory (and create it unless ``create=False``).

    Refuses when ``out`` is, contains or lies inside an input; when it exists and is not a
    directory; or when it is a non-empty directory, unless ``force`` (whose whole content the
    result then replaces: see :class:`~permerge.io.outputs.OutputDir`). Cheap: call it before long work.
    """
    out = Path(out)
    resolved = out.resolve()
    for p in map(Path, inputs):
        rp = p.resolve()
        if rp == resolved or rp.is_relative_to(resolved) or (p.is_dir() and resolved.is_relative_to(rp)):
            relation = "is" if rp == resolved else "contains" if rp.is_relative_to(resolved) else "is inside"
            raise PermergeIOError(
                f"output directory {out} {relation} input {p}; choose an output directory outside the inputs"
            )
    if out.exists():
        if not out.is_dir():
            raise PermergeIOError(f"output path {out} exists and is not a directory; choose a directory path")
        existing = sorted(p.name for p in out.iterdir())
        if existing and not force:
            raise PermergeIOError(
                f"output directory {out} is not empty ({len(existing)} entries, e.g. {', '.join(existing[:3])}); "
                "choose a new directory, or pass force=True (--force) to replace it and everything in it"
            )
    if create:
        out.mkdir(parents=True, exist_ok=True)
    return out


def write_provenance(
    out_dir: StrPath,
    *,
    command: list[str] | str,
    config: Mapping[str, Any],
    inputs: Mapping[str, StrPath],
    report: Mapping[str, Any] | None = None,
    quiet: bool = True,
) -> Path:
    """Write ``out_dir/provenance.json`` (atomically): how, from what, and with which software a result was made.

    It records library versions, platform, a UTC timestamp, the command and the directory it ran
    in (``cwd``: ``permerge run provenance.json`` re-runs it there), ``config`` and ``report``
    (converted to JSON: paths and dtypes as strings, tuples and sets as lists, dataclasses as dicts,
    tensors and arrays as lists up to 1024 elements and as shape + dtype beyond) and the SHA-256 of
    every input file (see :func:`~permerge.io.read.checkpoint_hashes`; a progress bar over the bytes
    hashed unless ``quiet``).
    """
    files = {name: hashed_files(p) for name, p in inputs.items()}
    LOG.info("hashing %d inputs for provenance", len(inputs))
    with progress(total=sum(f.stat().st_size for fs in files.values() for f in fs), desc="hashing inputs", unit="B",
                  quiet=quiet) as bar:  # fmt: skip
        hashes = {name: checkpoint_hashes(p, progress=bar.update) for name, p in inputs.items()}
    record = {
        "versions": {name: package_version(name) for name in ("permerge", "torch", "numpy", "scipy", "safetensors")}
        | {"python": platform.python_version(), "cuda": torch.version.cuda},
        "platform": platform.platform(),
        "created_utc": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "command": command if isinstance(command, str) else [str(c) for c in command],
        "cwd": os.getcwd(),
        "config": jsonable(config, "config"),
        "inputs": {name: {"path": str(Path(p).resolve()), "sha256": hashes[name]} for name, p in inputs.items()},
        "report": jsonable(report, "report"),
    }
    text = json.dumps(record, indent=2) + "\n"
    return atomic_write(Path(out_dir) / PROVENANCE_NAME, lambda tmp: tmp.write_text(text, encoding="utf-8"))


def save_permutation(perm: Mapping[str, torch.Tensor], path: StrPath, *, protect: Iterable[StrPath] = ()) -> Path:
    """Write a permutation (group name → index vector) as int64 tensors in a ``.safetensors`` file, atomically."""
    vectors = {name: _check_index_vector(name, p, path).to(torch.int64) for name, p in perm.items()}
    return save_state_dict(vectors, path, {"permerge": "permutation"}, protect=protect)


@dataclass(frozen=True)
class TensorsWriter:
    """Writes ``tensors`` as safetensors (tied tensors cloned, see :func:`save_state_dict`; header
    ``{"format": "pt"}`` plus ``metadata``). A writer for :func:`atomic_write` and result
    directories, which read ``nbytes`` for their progress bar."""

    tensors: Mapping[str, torch.Tensor]
    metadata: Mapping[str, str] | None = None

    @property
    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in self.tensors.values())

    def __call__(self, tmp: Path, progress: Callable[[int], object] | None = None) -> None:
        save_file(_packable(self.tensors, tmp), tmp, metadata={"format": "pt", **_check_metadata(self.metadata or {}, tmp)})
        if progress is not None:
            progress(self.nbytes)


def safetensors_writer(tensors: Mapping[str, torch.Tensor], metadata: Mapping[str, str] | None = None) -> TensorsWriter:
    """A :class:`TensorsWriter` for ``tensors``."""
    return TensorsWriter(tensors, metadata)


def permutation_writer(perm: Mapping[str, torch.Tensor]) -> TensorsWriter:
    """A writer for a permutation file (int64 index vectors, each checked to be a permutation)."""
    vectors = {name: _check_index_vector(name, p, name).to(torch.int64) for name, p in perm.items()}
    return safetensors_writer(vectors, {"permerge": "permutation"})


def text_writer(text: str) -> Callable[[Path], None]:
    """A writer for a UTF-8 text file."""

    def write(tmp: Path) -> None:
        tmp.write_text(text, encoding="utf-8")

    return write


def load_permutation(path: StrPath) -> dict[str, torch.Tensor]:
    """Read a permutation written by :func:`save_permutation`, checking every vector is one."""
    perm = load_state_dict(path)
    for name, p in perm.items():
        _check_index_vector(name, p, path)
        if p.dtype != torch.int64:
            raise PermergeIOError(f"{path}: permutation of group {name!r} has dtype {p.dtype}, expected torch.int64")
    return perm


def _packable(sd: Mapping[str, torch.Tensor], path: Path) -> dict[str, torch.Tensor]:
    """A new dict safetensors accepts: CPU, contiguous, no two entries on one storage."""
    if not sd:
        raise PermergeIOError(f"nothing to save to {path}: no tensors given")
    out: dict[str, torch.Tensor] = {}
    storages: set[int] = set()
    for key, t in sd.items():
        if not isinstance(key, str) or not isinstance(t, torch.Tensor):
            raise PermergeIOError(
                f"cannot save {key!r} to {path}: state dicts map str to tensors, got {type(key).__name__} → "
                f"{type(t).__name__}"
            )
        if t.is_meta:
            raise PermergeIOError(
                f"cannot save {key!r} to {path}: it is a meta tensor with no data; load weights first"
            )
        t = t.detach().cpu()
        if not t.is_contiguous():
            t = t.contiguous()
        ptr = t.untyped_storage().data_ptr()
        if ptr in storages:
            t = t.clone()
        storages.add(ptr)
        out[key] = t
    return out


def _check_metadata(metadata: Mapping[str, str], path: Path) -> dict[str, str]:
    for k, v in metadata.items():
        if not (isinstance(k, str) and isinstance(v, str)):
            raise PermergeIOError(f"cannot save {path}: metadata entry {k!r} → {v!r} must map str to str")
    return dict(metadata)


def _check_index_vector(name: str, p: Any, where: StrPath) -> torch.Tensor:
    ok = (
        isinstance(p, torch.Tensor)
        and p.dim() == 1
        and not p.is_floating_point()
        and not p.is_complex()
        and p.dtype != torch.bool
    )
    if not ok or not torch.equal(torch.sort(p.cpu()).values.to(torch.int64), torch.arange(len(p))):
        shape = tuple(p.shape) if isinstance(p, torch.Tensor) else type(p).__name__
        raise PermergeIOError(
            f"{where}: permutation of group {name!r} ({shape}) is not a 1-D integer vector holding each of "
            "0..n-1 exactly once"
        )
    return p.cpu()


def _samefile(a: Path, b: Path) -> bool:
    try:
        return os.path.samefile(a, b)
    except OSError:  # either path does not exist: then they cannot be one file
        return False


def package_version(dist: str) -> str:
    """The installed version of ``dist`` (``"unknown"`` when it is not installed as a package)."""
    try:
        return version(dist)
    except PackageNotFoundError:
        return "unknown"


def jsonable(obj: Any, where: str = "report") -> Any:
    """``obj`` as plain JSON values (reports, configs); ``where`` names it in the warning for unknown types."""
    if isinstance(obj, Enum):
        return jsonable(obj.value, where)
    if obj is None or isinstance(obj, (bool, int, float, str)):
        return obj
    if isinstance(obj, (PurePath, torch.dtype, torch.device, BaseException)):
        return str(obj)
    if isinstance(obj, np.generic):
        return jsonable(obj.item(), where)
    if isinstance(obj, (torch.Tensor, np.ndarray)):
        if math.prod(obj.shape) > _MAX_LISTED:
            return {"shape": list(obj.shape), "dtype": str(obj.dtype)}
        return jsonable(obj.tolist(), where)
    if dataclasses.is_dataclass(obj) and not isinstance(obj, type):
        return {f.name: jsonable(getattr(obj, f.name), f"{where}.{f.name}") for f in dataclasses.fields(obj)}
    if isinstance(obj, Mapping):
        return {str(k): jsonable(v, f"{where}.{k}") for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [jsonable(v, f"{where}[{i}]") for i, v in enumerate(obj)]
    if isinstance(obj, (set, frozenset)):
        return sorted((jsonable(v, where) for v in obj), key=repr)
    LOG.warning("provenance: %s is a %s, which JSON cannot hold; storing its repr", where, type(obj).__name__)
    return repr(obj)


# -- the planned writer (checkpoints larger than RAM) ------------------------------------------
#
# plan_write turns "permute every tensor of B and write it" into per-shard lists of WriteJob ("load
# key K, permute these axes, cast to D") from names, shapes and dtypes alone; write_shard then writes
# one safetensors file tensor by tensor: the header is known from the plan, so each tensor is
# produced, written and freed before the next one is read. Peak memory is one tensor (plus its
# permuted and cast copies), not one shard.


@dataclass(frozen=True)
class WriteJob:
    """Write tensor ``key``: read it, permute ``axes`` (``(group, Axis)`` pairs), cast to ``dtype``."""

    key: str
    shape: tuple[int, ...]
    dtype: torch.dtype
    axes: tuple[tuple[str, Axis], ...] = ()

    @property
    def nbytes(self) -> int:
        return math.prod(self.shape) * self.dtype.itemsize


@dataclass(frozen=True)
class ShardPlan:
    """One output safetensors file: its name and its tensors in the order they are written."""

    name: str
    jobs: tuple[WriteJob, ...]

    @property
    def nbytes(self) -> int:
        return sum(j.nbytes for j in self.jobs)


def parse_size(size: int | str) -> int:
    """``"5GB"`` → 5·10⁹, ``"500MiB"`` → 500·2²⁰, ``1000`` → 1000 (Hugging Face's convention)."""
    if isinstance(size, int):
        return size
    m = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([KMGT]?)(i?)B?\s*", size, flags=re.IGNORECASE)
    if not m:
        raise PermergeIOError(f"cannot read size {size!r}; write e.g. 5GB, 500MB, 2GiB or a number of bytes")
    base = 1024 if m.group(3) else 1000
    return int(float(m.group(1)) * base ** " KMGT".index(m.group(2).upper() or " "))


def plan_write(
    source: TensorSource,
    spec: PermutationSpec,
    *,
    out_dtype: torch.dtype | None = None,
    max_shard_size: int | str = "5GB",
    prefix: str = "model",
) -> tuple[ShardPlan, ...]:
    """Plan writing every tensor of ``source`` permuted by ``spec``'s groups, split into shards.

    Tensors keep the source's order and dtype (floating tensors become ``out_dtype`` when given) and
    are packed greedily into shards of at most ``max_shard_size`` bytes (a bigger tensor gets a shard
    of its own). One shard is named ``{prefix}.safetensors``; several are
    ``{prefix}-00001-of-0000N.safetensors``, as ``transformers`` names them.
    """
    limit = parse_size(max_shard_size)
    groups: list[list[WriteJob]] = [[]]
    used = 0
    for key in source.keys():  # noqa: SIM118 (a TensorSource is not iterable)
        dtype = source.dtype(key)
        if out_dtype is not None and dtype.is_floating_point:
            dtype = out_dtype
        job = WriteJob(key, tuple(source.shape(key)), dtype, spec.axes_of(key))
        if groups[-1] and used + job.nbytes > limit:
            groups.append([])
            used = 0
        groups[-1].append(job)
        used += job.nbytes
    n = len(groups)
    names = (
        [f"{prefix}.safetensors"]
        if n == 1
        else [f"{prefix}-{i:05d}-of-{n:05d}.safetensors" for i in range(1, n + 1)]
    )
    return tuple(ShardPlan(name, tuple(jobs)) for name, jobs in zip(names, groups, strict=True))


def output_bytes(source: TensorSource, out_dtype: torch.dtype | None = None) -> int:
    """Bytes of tensor data :func:`plan_write` will write for ``source`` (floating tensors as
    ``out_dtype`` when given): what an output directory should have room for."""
    total = 0
    for k in source.keys():  # noqa: SIM118 (a TensorSource is not iterable)
        dtype = source.dtype(k)
        dtype = out_dtype if out_dtype is not None and dtype.is_floating_point else dtype
        total += math.prod(source.shape(k)) * dtype.itemsize
    return total


def shard_index(shards: tuple[ShardPlan, ...]) -> dict[str, object]:
    """The ``model.safetensors.index.json`` content for ``shards`` (as ``transformers`` writes it)."""
    return {
        "metadata": {"total_size": sum(s.nbytes for s in shards)},
        "weight_map": {j.key: s.name for s in shards for j in s.jobs},
    }


def permuted_producer(
    source: TensorSource, perm: Mapping[str, torch.Tensor]
) -> Callable[[WriteJob], torch.Tensor]:
    """``job → source[job.key]`` permuted along ``job.axes`` and cast to ``job.dtype`` (one tensor)."""

    def produce(job: WriteJob) -> torch.Tensor:
        t = source.get(job.key)
        if job.axes:
            t = permute_tensor(t, job.axes, perm)
        return t.to(job.dtype)

    return produce


def write_shard(
    path: StrPath,
    shard: ShardPlan,
    produce: Callable[[WriteJob], torch.Tensor],
    metadata: Mapping[str, str] | None = None,
    *,
    progress: Callable[[int], object] | None = None,
) -> Path:
    """Write ``shard`` to ``path`` as safetensors, calling ``produce(job)`` for one tensor at a time
    (and ``progress(nbytes)`` after each).

    The header comes from the plan, so nothing is buffered: each tensor is written and dropped before
    the next is produced. The file is what ``safetensors.torch.save_file`` would accept on reading
    (``{"format": "pt"}`` metadata, which ``transformers`` requires). Not atomic by itself: write to a
    temporary name (see :func:`~permerge.io.write.atomic_write`).
    """
    path = Path(path)
    header: dict[str, object] = {"__metadata__": {"format": "pt", **(metadata or {})}}
    offset = 0
    for job in shard.jobs:
        if job.dtype not in _DTYPE_NAMES:
            raise PermergeIOError(f"cannot write {job.key!r} to {path}: safetensors has no dtype {job.dtype}")
        header[job.key] = {
            "dtype": _DTYPE_NAMES[job.dtype],
            "shape": list(job.shape),
            "data_offsets": [offset, offset + job.nbytes],
        }
        offset += job.nbytes
    text = json.dumps(header, separators=(",", ":")).encode()
    text += b" " * (-len(text) % 8)  # keep the data 8-byte aligned, as safetensors does
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", len(text)))
        f.write(text)
        for job in shard.jobs:
            t = produce(job)
            if tuple(t.shape) != job.shape or t.dtype != job.dtype:
                raise PermergeIOError(
                    f"cannot write {job.key!r} to {path}: planned {job.shape} {job.dtype}, got {tuple(t.shape)} {t.dtype}"
                )
            f.write(_tensor_bytes(t))
            del t
            if progress is not None:
                progress(job.nbytes)
    LOG.debug("wrote %s: %d tensors, %d bytes", path, len(shard.jobs), offset)
    return path


@dataclass(frozen=True)
class ShardWriter:
    """Writes one planned shard tensor by tensor (:func:`write_shard`); a writer for result
    directories, which read ``nbytes`` for their progress bar."""

    shard: ShardPlan
    produce: Callable[[WriteJob], torch.Tensor]

    @property
    def nbytes(self) -> int:
        return self.shard.nbytes

    def __call__(self, tmp: Path, progress: Callable[[int], object] | None = None) -> None:
        write_shard(tmp, self.shard, self.produce, progress=progress)


def _tensor_bytes(t: torch.Tensor) -> memoryview:
    """The raw little-endian bytes of ``t`` (CPU, contiguous) without another copy where possible."""
    t = t.detach().cpu().contiguous().reshape(-1)
    return memoryview(t.view(torch.uint8).numpy())
