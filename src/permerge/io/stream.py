"""Out-of-core checkpoint I/O: read tensors without mapping whole files, plan writes, write tensor by tensor.

Two pieces, both for checkpoints larger than RAM:

* :func:`open_unmapped` reads safetensors files (single or sharded) with ``pread`` into a fresh
  buffer per tensor. ``safe_open`` memory-maps the file, and every page it touches stays in the
  process's resident set (as ``RssFile``) until the file is closed: streaming two 16 GB checkpoints
  through an mmap shows 32 GB of RSS even though only one tensor is in use (measured: reading a
  1 GiB file tensor by tensor through ``safe_open`` raised VmRSS by 1.05 GB). Reading with ``pread``
  leaves those pages to the kernel's page cache, which is not charged to the process.
* :func:`plan_write` turns "permute every tensor of B and write it" into per-shard lists of
  :class:`WriteJob` ("load key K, permute these axes, cast to D") from names, shapes and dtypes
  alone; :func:`write_shard` then writes one safetensors file tensor by tensor: the header is known
  from the plan, so each tensor is produced, written and freed before the next one is read.
  Peak memory is one tensor (plus its permuted and cast copies), not one shard.

Example:
    >>> with open_unmapped("b_model_dir") as src:  # doctest: +SKIP
    ...     shards = plan_write(src, spec, max_shard_size="2GB")
    ...     for shard in shards:
    ...         write_shard(out / shard.name, shard, lambda job: src.get(job.key))
"""

from __future__ import annotations

import json
import logging
import math
import os
import re
import struct
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path

import torch

from permerge.apply import permute_tensor
from permerge.errors import PermergeIOError
from permerge.io.read import (
    _SAFETENSORS_DTYPES,
    StrPath,
    TensorSource,
    _open_file,
    _ShardedSource,
    open_checkpoint,
)
from permerge.spec import Axis, PermutationSpec

__all__ = [
    "INDEX_NAME",
    "ShardPlan",
    "WriteJob",
    "open_unmapped",
    "parse_size",
    "plan_write",
    "shard_index",
    "write_shard",
]

LOG = logging.getLogger(__name__)

INDEX_NAME = "model.safetensors.index.json"
_DTYPE_NAMES = {v: k for k, v in _SAFETENSORS_DTYPES.items()}
_HEADER_LIMIT = 100 << 20  # safetensors' own limit on the JSON header


# -- reading ----------------------------------------------------------------------------------


class _PreadSafetensors(TensorSource):
    """One safetensors file read with ``pread``: the header once, each tensor into its own buffer."""

    def __init__(self, path: Path) -> None:
        try:
            with open(path, "rb") as f:
                (n,) = struct.unpack("<Q", f.read(8))
                if n > _HEADER_LIMIT:
                    raise ValueError(f"header length {n} is implausible")
                header = json.loads(f.read(n))
            size = path.stat().st_size
        except (OSError, ValueError, struct.error) as e:
            raise PermergeIOError(
                f"cannot read {path} as safetensors ({e}); the file may be truncated or corrupt: re-download or re-save it"
            ) from e
        self._base = 8 + n
        self._info: dict[str, tuple[torch.dtype, torch.Size, int, int]] = {}
        for key, v in header.items():
            if key == "__metadata__":
                continue
            if v["dtype"] not in _SAFETENSORS_DTYPES:
                raise PermergeIOError(
                    f"{path}: tensor {key!r} has dtype {v['dtype']}, which this torch build cannot hold"
                )
            begin, end = v["data_offsets"]
            if self._base + end > size:
                raise PermergeIOError(
                    f"{path}: tensor {key!r} ends past the end of the file; the file is truncated"
                )
            self._info[key] = (_SAFETENSORS_DTYPES[v["dtype"]], torch.Size(v["shape"]), begin, end)
        self._fd = os.open(path, os.O_RDONLY)
        super().__init__(path, tuple(sorted(self._info)))

    def _shape(self, key: str) -> torch.Size:
        return self._info[key][1]

    def _dtype(self, key: str) -> torch.dtype:
        return self._info[key][0]

    def _get(self, key: str) -> torch.Tensor:
        dtype, shape, begin, end = self._info[key]
        buf = torch.empty(end - begin, dtype=torch.uint8)
        view, done = memoryview(buf.numpy()), 0
        while done < len(view):  # pread may return fewer bytes than asked
            got = os.preadv(self._fd, [view[done:]], self._base + begin + done)
            if got <= 0:
                raise PermergeIOError(f"{self.path}: unexpected end of file reading {key!r}")
            done += got
        return buf.view(dtype).reshape(shape)

    def _close(self) -> None:
        os.close(self._fd)


def _open_shard_unmapped(path: Path) -> TensorSource:
    return _PreadSafetensors(path) if path.suffix == ".safetensors" else _open_file(path)


def open_unmapped(path: StrPath) -> TensorSource:
    """Like :func:`~permerge.io.read.open_checkpoint`, but safetensors are read with ``pread``, not mmap.

    Use it to stream checkpoints larger than RAM: the process holds only the tensors it was given
    (see the module docstring). Other formats fall back to :func:`open_checkpoint`. Each ``get``
    returns a new tensor, safe to modify; reads are thread-safe.
    """
    path = Path(path)
    target = path
    if path.is_dir():
        for name in ("model.safetensors", INDEX_NAME):
            if (path / name).is_file():
                target = path / name
                break
    if target.is_file() and target.suffix == ".safetensors":
        source: TensorSource = _PreadSafetensors(target)
    elif target.is_file() and target.name.endswith(".safetensors.index.json"):
        source = _ShardedSource(target, _open_shard_unmapped)
    else:
        return open_checkpoint(path)
    if not len(source):
        source.close()
        raise PermergeIOError(f"{target} holds no tensors; is it the right checkpoint?")
    return source


# -- planning ---------------------------------------------------------------------------------


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


# -- writing ----------------------------------------------------------------------------------


def write_shard(
    path: StrPath,
    shard: ShardPlan,
    produce: Callable[[WriteJob], torch.Tensor],
    metadata: Mapping[str, str] | None = None,
) -> Path:
    """Write ``shard`` to ``path`` as safetensors, calling ``produce(job)`` for one tensor at a time.

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
    LOG.debug("wrote %s: %d tensors, %d bytes", path, len(shard.jobs), offset)
    return path


def _tensor_bytes(t: torch.Tensor) -> memoryview:
    """The raw little-endian bytes of ``t`` (CPU, contiguous) without another copy where possible."""
    t = t.detach().cpu().contiguous().reshape(-1)
    return memoryview(t.view(torch.uint8).numpy())
