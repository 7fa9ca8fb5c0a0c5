"""Read checkpoints: whole state dicts, lazy tensor sources, and content hashes.

Formats: ``.safetensors`` (read one tensor at a time, memory-mapped or with ``pread``),
``.pt``/``.pth``/``.bin`` (``torch.load(weights_only=True)``: a raw state dict, or one under
``"state_dict"`` or ``"model"``), a shard index ``*.index.json``, Hugging Face model directories
holding any of these, and in-memory state dicts (:class:`MemorySource`), so every pipeline stage
reads its inputs through one interface.

Why ``mmap=False`` exists: ``safe_open`` memory-maps the file, and every page it touches stays in
the process's resident set until the file is closed, so streaming two 16 GB checkpoints through an
mmap shows 32 GB of RSS although one tensor is in use (measured: reading a 1 GiB file tensor by
tensor through ``safe_open`` raised VmRSS by 1.05 GB). Reading with ``pread`` into a buffer per
tensor leaves those pages to the kernel's page cache, which is not charged to the process.
"""

from __future__ import annotations

import difflib
import hashlib
import json
import logging
import os
import struct
from abc import ABC, abstractmethod
from collections.abc import Callable, Mapping
from pathlib import Path
from types import TracebackType

import torch
from safetensors import SafetensorError, safe_open

from permerge.errors import PermergeIOError

__all__ = [
    "HF_WEIGHT_FILES",
    "SUPPORTED_SUFFIXES",
    "MemorySource",
    "StrPath",
    "TensorSource",
    "checkpoint_hashes",
    "file_bytes",
    "file_sha256",
    "hashed_files",
    "load_state_dict",
    "open_checkpoint",
]

LOG = logging.getLogger(__name__)

StrPath = str | os.PathLike[str]

TORCH_SUFFIXES = (".pt", ".pth", ".bin")
SUPPORTED_SUFFIXES = (".safetensors", *TORCH_SUFFIXES)
# transformers' lookup order: safetensors before pickles, a single file before a shard index.
HF_WEIGHT_FILES = (
    "model.safetensors",
    "model.safetensors.index.json",
    "pytorch_model.bin",
    "pytorch_model.bin.index.json",
)
_HASHED_SUFFIXES = (*SUPPORTED_SUFFIXES, ".json")
_CHUNK = 1 << 20
_SUPPORTED_TEXT = ".safetensors, .pt, .pth, .bin, a *.index.json shard index, or a Hugging Face model directory"

# safetensors' dtype names (from its format spec) → torch attribute names; some need a recent torch.
_SAFETENSORS_DTYPE_NAMES = {
    "F64": "float64", "F32": "float32", "F16": "float16", "BF16": "bfloat16", "C64": "complex64",
    "I64": "int64", "I32": "int32", "I16": "int16", "I8": "int8", "BOOL": "bool",
    "U64": "uint64", "U32": "uint32", "U16": "uint16", "U8": "uint8",
    "F8_E4M3": "float8_e4m3fn", "F8_E5M2": "float8_e5m2",
    "F8_E4M3FNUZ": "float8_e4m3fnuz", "F8_E5M2FNUZ": "float8_e5m2fnuz",
}  # fmt: skip
_SAFETENSORS_DTYPES = {k: getattr(torch, v) for k, v in _SAFETENSORS_DTYPE_NAMES.items() if hasattr(torch, v)}
_HEADER_LIMIT = 100 << 20  # safetensors' own limit on the JSON header


class TensorSource(ABC):
    """A lazy, read-only view of the tensors in one checkpoint.

    It exists so that work can be planned from names, shapes and dtypes alone and then executed one
    tensor at a time: for safetensors nothing is read until :meth:`get`, so checkpoints larger than
    RAM can be streamed. Torch pickles cannot be read piecewise and are loaded whole, once.
    Each :meth:`get` of a safetensors tensor returns a tensor of its own (writing to it never touches
    the file); a torch source returns the tensor it loaded, so do not modify that in place. Close it, or use it as a context manager.

    Example:
        >>> with open_checkpoint("model.safetensors") as src:  # doctest: +SKIP
        ...     sizes = {k: src.shape(k) for k in src.keys()}
        ...     w = src.get("fc.weight")
    """

    def __init__(self, path: Path | None, keys: tuple[str, ...], name: str | None = None) -> None:
        self.path = path
        self.name = name or str(path)  # what error messages call it: the path, or "model B"
        self._keys = keys
        self._key_set = frozenset(keys)
        self._closed = False

    def keys(self) -> tuple[str, ...]:
        """Tensor names in a deterministic order: as stored for pickles and shard indexes, sorted for safetensors."""
        return self._keys

    def shape(self, key: str) -> torch.Size:
        """Shape of tensor ``key``, without reading its data."""
        self._check(key)
        return self._shape(key)

    def dtype(self, key: str) -> torch.dtype:
        """Dtype of tensor ``key``, without reading its data."""
        self._check(key)
        return self._dtype(key)

    def get(self, key: str) -> torch.Tensor:
        """Read tensor ``key`` (on the CPU)."""
        self._check(key)
        return self._get(key)

    def close(self) -> None:
        """Release file handles and cached tensors; further reads raise. Safe to call twice."""
        if not self._closed:
            self._closed = True
            self._close()

    def __contains__(self, key: object) -> bool:
        return key in self._key_set

    def __len__(self) -> int:
        return len(self._keys)

    def __enter__(self) -> TensorSource:
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.close()

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.name!r}, {len(self)} tensors{', closed' if self._closed else ''})"

    def _check(self, key: str) -> None:
        if self._closed:
            raise PermergeIOError(f"{self.name}: the tensor source is closed; open it again with open_checkpoint")
        if key not in self._key_set:
            close = difflib.get_close_matches(key, self._keys, n=3)
            hint = f"; did you mean {', '.join(map(repr, close))}?" if close else ""
            raise PermergeIOError(f"{self.name} holds no tensor named {key!r} ({len(self)} tensors){hint}")

    @abstractmethod
    def _shape(self, key: str) -> torch.Size: ...

    @abstractmethod
    def _dtype(self, key: str) -> torch.dtype: ...

    @abstractmethod
    def _get(self, key: str) -> torch.Tensor: ...

    @abstractmethod
    def _close(self) -> None: ...


class _SafetensorsSource(TensorSource):
    """A memory-mapped safetensors file: only the header is read when opened."""

    def __init__(self, path: Path) -> None:
        try:
            self._handle = safe_open(str(path), framework="pt", device="cpu")
        except (SafetensorError, OSError) as e:
            raise PermergeIOError(
                f"cannot read {path} as safetensors ({e}); the file may be truncated or corrupt: "
                "re-download or re-save it"
            ) from e
        super().__init__(path, tuple(self._handle.keys()))

    def _shape(self, key: str) -> torch.Size:
        return torch.Size(self._handle.get_slice(key).get_shape())

    def _dtype(self, key: str) -> torch.dtype:
        name = self._handle.get_slice(key).get_dtype()
        if name not in _SAFETENSORS_DTYPES:
            raise PermergeIOError(f"{self.path}: tensor {key!r} has dtype {name}, which this torch build cannot hold")
        return _SAFETENSORS_DTYPES[name]

    def _get(self, key: str) -> torch.Tensor:
        return self._handle.get_tensor(key)

    def _close(self) -> None:
        # safe_open has no close(); leaving its context is how the mmap is released.
        self._handle.__exit__(None, None, None)


class MemorySource(TensorSource):
    """Tensors already in memory (a state dict, or a torch pickle loaded whole, which cannot be read
    piecewise). :meth:`get` returns the tensor itself: do not modify it in place.

    Example:
        >>> src = MemorySource({"w": torch.zeros(2)}, name="model B")
        >>> src.shape("w")
        torch.Size([2])
    """

    def __init__(self, tensors: Mapping[str, torch.Tensor], *, name: str, path: Path | None = None) -> None:
        self._state = dict(tensors)
        super().__init__(path, tuple(self._state), name)

    def _shape(self, key: str) -> torch.Size:
        return self._state[key].shape

    def _dtype(self, key: str) -> torch.dtype:
        return self._state[key].dtype

    def _get(self, key: str) -> torch.Tensor:
        return self._state[key]

    def _close(self) -> None:
        self._state = {}


class _PreadSafetensors(TensorSource):
    """One safetensors file read with ``pread``: the header once, each tensor into its own buffer
    (so a returned tensor is the caller's to modify, and reads are thread-safe)."""

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
                raise PermergeIOError(f"{path}: tensor {key!r} has dtype {v['dtype']}, which this torch build cannot hold")
            begin, end = v["data_offsets"]
            if self._base + end > size:
                raise PermergeIOError(f"{path}: tensor {key!r} ends past the end of the file; the file is truncated")
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


class _ShardedSource(TensorSource):
    """A shard index (``*.index.json``): each shard is opened on first use of one of its tensors,
    by ``open_shard`` (:func:`_open_file` with the source's ``mmap`` choice)."""

    def __init__(self, index: Path, open_shard: Callable[[Path], TensorSource]) -> None:
        self._weight_map = _read_index(index)
        self._shards: dict[str, TensorSource] = {}
        self._open_shard = open_shard
        super().__init__(index, tuple(self._weight_map))

    def _shard(self, key: str) -> TensorSource:
        name = self._weight_map[key]
        if name not in self._shards:
            LOG.debug("%s: opening shard %s", self.path, name)
            self._shards[name] = self._open_shard(self.path.parent / name)
        shard = self._shards[name]
        if key not in shard:
            raise PermergeIOError(
                f"{self.path} maps {key!r} to shard {name}, which holds no such tensor; "
                "the index and its shards do not match, re-download the checkpoint"
            )
        return shard

    def _shape(self, key: str) -> torch.Size:
        return self._shard(key).shape(key)

    def _dtype(self, key: str) -> torch.dtype:
        return self._shard(key).dtype(key)

    def _get(self, key: str) -> torch.Tensor:
        return self._shard(key).get(key)

    def _close(self) -> None:
        for shard in self._shards.values():
            shard.close()
        self._shards = {}


def open_checkpoint(path: StrPath, *, mmap: bool = True) -> TensorSource:
    """Open a checkpoint file or Hugging Face model directory as a lazy :class:`TensorSource`.

    Args:
        path: a ``.safetensors``/``.pt``/``.pth``/``.bin`` file, a ``*.index.json`` shard index, or a
            directory holding ``model.safetensors``, ``model.safetensors.index.json``,
            ``pytorch_model.bin`` or ``pytorch_model.bin.index.json`` (looked for in that order).
        mmap: memory-map safetensors files (fast random access); ``False`` reads each tensor with
            ``pread`` into its own buffer, so the process holds only the tensors in use: use it to
            stream checkpoints larger than RAM (see the module docstring). Pickles load whole either way.

    Raises:
        PermergeIOError: the path is missing, of an unknown kind, corrupt, or holds no tensors.
    """
    path = Path(path)
    if path.is_dir():
        source = _open_dir(path, mmap)
    elif path.is_file():
        source = _open_file(path, mmap)
    else:
        raise PermergeIOError(f"checkpoint not found: {path}")
    if not len(source):
        source.close()
        raise PermergeIOError(f"{source.name} holds no tensors; is it the right checkpoint?")
    LOG.debug("opened %r", source)
    return source


def load_state_dict(path: StrPath) -> dict[str, torch.Tensor]:
    """Read a whole checkpoint (any kind :func:`open_checkpoint` takes) into a CPU state dict.

    Example:
        >>> sd = load_state_dict("model.safetensors")  # doctest: +SKIP
    """
    with open_checkpoint(path) as source:
        return {key: source.get(key) for key in source.keys()}


def file_sha256(path: StrPath, *, progress: Callable[[int], object] | None = None) -> str:
    """SHA-256 hex digest of a file, read in 1 MiB chunks so any size fits in memory; ``progress(n)``
    is called with each chunk's size (a progress bar's ``update``)."""
    digest = hashlib.sha256()
    try:
        with open(path, "rb") as f:
            while chunk := f.read(_CHUNK):
                digest.update(chunk)
                if progress is not None:
                    progress(len(chunk))
    except OSError as e:
        raise PermergeIOError(f"cannot hash {path}: {e}") from e
    return digest.hexdigest()


def file_bytes(path: StrPath) -> int:
    """Size on disk of a checkpoint: the file, or a directory's weight files (0 if missing)."""
    path = Path(path)
    if path.is_file():
        return path.stat().st_size
    if path.is_dir():
        return sum(p.stat().st_size for p in path.iterdir() if p.is_file() and p.suffix.lower() in SUPPORTED_SUFFIXES)
    return 0


def hashed_files(path: StrPath) -> list[Path]:
    """The files :func:`checkpoint_hashes` reads: the file itself, or every weight and ``.json``
    config file at the top level of a directory (hidden files skipped), sorted by name."""
    path = Path(path)
    if path.is_file():
        return [path]
    if not path.is_dir():
        raise PermergeIOError(f"checkpoint not found: {path}")
    files = sorted(
        p for p in path.iterdir() if p.is_file() and not p.name.startswith(".") and p.suffix.lower() in _HASHED_SUFFIXES
    )
    if not files:
        raise PermergeIOError(
            f"{path} holds no weight or config files to hash (looked for {', '.join(_HASHED_SUFFIXES)})"
        )
    return files


def checkpoint_hashes(path: StrPath, *, progress: Callable[[int], object] | None = None) -> dict[str, str]:
    """SHA-256 of a checkpoint: ``{file name: digest}`` for each of :func:`hashed_files`.

    Recorded in provenance so a result can be traced to the exact bytes it came from; ``progress``
    as for :func:`file_sha256`.
    """
    return {p.name: file_sha256(p, progress=progress) for p in hashed_files(path)}


def _open_file(path: Path, mmap: bool = True) -> TensorSource:
    suffix = path.suffix.lower()
    if suffix == ".safetensors":
        return _SafetensorsSource(path) if mmap else _PreadSafetensors(path)
    if suffix in TORCH_SUFFIXES:
        return MemorySource(_load_torch(path), name=str(path), path=path)
    if path.name.endswith(".index.json"):
        return _ShardedSource(path, lambda shard: _open_file(shard, mmap))
    raise PermergeIOError(f"{path}: unknown checkpoint extension {path.suffix!r}; supported: {_SUPPORTED_TEXT}")


def _open_dir(path: Path, mmap: bool) -> TensorSource:
    for name in HF_WEIGHT_FILES:
        if (path / name).is_file():
            LOG.debug("%s: reading %s", path, name)
            return _open_file(path / name, mmap)
    found = sorted(p.name for p in path.iterdir() if p.suffix.lower() in SUPPORTED_SUFFIXES)
    hint = f"; it has {', '.join(found)}: pass one of those files instead" if found else ""
    raise PermergeIOError(
        f"{path} is not a Hugging Face model directory: it has none of {', '.join(HF_WEIGHT_FILES)}{hint}"
    )


def _read_index(index: Path) -> dict[str, str]:
    try:
        data = json.loads(index.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise PermergeIOError(f"cannot read shard index {index}: {e}") from e
    weight_map = data.get("weight_map") if isinstance(data, dict) else None
    if not isinstance(weight_map, dict) or not all(
        isinstance(k, str) and isinstance(v, str) for k, v in weight_map.items()
    ):
        raise PermergeIOError(f"{index} has no valid 'weight_map' (an object mapping tensor names to shard file names)")
    missing = sorted({name for name in weight_map.values() if not (index.parent / name).is_file()})
    if missing:
        raise PermergeIOError(
            f"{index} names shards missing from {index.parent}: {', '.join(missing)}; download them, "
            "or point at a complete checkpoint"
        )
    return weight_map


def _load_torch(path: Path) -> dict[str, torch.Tensor]:
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # torch.load signals bad files with many types (RuntimeError, UnpicklingError, EOFError, …)
        first_line = str(e).strip().splitlines()[0][:200] if str(e).strip() else ""
        raise PermergeIOError(
            f"cannot read {path} as a torch checkpoint ({type(e).__name__}: {first_line}); it may be corrupt, "
            "or pickle objects other than tensors, which weights_only loading refuses: "
            "re-save it with torch.save(model.state_dict(), path)"
        ) from e
    if not isinstance(obj, Mapping):
        raise PermergeIOError(f"{path} holds a {type(obj).__name__}, not a state dict; save model.state_dict() instead")
    where = ""
    for wrapper in ("state_dict", "model"):
        if isinstance(obj.get(wrapper), Mapping):
            obj, where = obj[wrapper], f" (under {wrapper!r})"
            break
    LOG.debug("%s: using the state dict%s", path, where or " at the top level")
    for key, value in obj.items():
        if not isinstance(value, torch.Tensor):
            raise PermergeIOError(
                f"{path}: key {key!r}{where} holds a {type(value).__name__}, not a tensor; permerge reads "
                "checkpoints whose values are all tensors (a state dict, or a dict holding one under "
                "'state_dict' or 'model')"
            )
        if not isinstance(key, str):
            raise PermergeIOError(f"{path}: key {key!r}{where} is a {type(key).__name__}; state dict keys must be str")
    return dict(obj)
