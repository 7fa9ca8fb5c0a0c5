"""Write state dicts, permutations and provenance: atomically, and never over an input.

Every file is written to a temporary name beside its destination and renamed into place only once
complete, so an interrupted run leaves either the old file or the new one, never a partial one.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import math
import os
import platform
import secrets
from collections.abc import Callable, Iterable, Iterator, Mapping
from contextlib import contextmanager
from datetime import datetime, timezone
from enum import Enum
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path, PurePath
from typing import Any

import numpy as np
import torch
from safetensors.torch import save_file

from permerge.errors import PermergeIOError
from permerge.io.read import StrPath, checkpoint_hashes, load_state_dict

__all__ = [
    "PROVENANCE_NAME",
    "atomic_path",
    "atomic_write",
    "check_not_input",
    "load_permutation",
    "permutation_writer",
    "safetensors_writer",
    "text_writer",
    "prepare_output_dir",
    "save_permutation",
    "save_state_dict",
    "write_provenance",
]

LOG = logging.getLogger(__name__)

PROVENANCE_NAME = "provenance.json"
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
    """Create the output directory ``out``, refusing one that could clobber results or inputs.

    Refuses when ``out`` is, or contains, an input; or when it exists and is not empty, unless
    ``force``. With ``force`` nothing is deleted: files permerge writes replace their namesakes
    atomically, everything else in ``out`` is kept. ``create=False`` only checks (call it before
    long work, so a bad output path fails fast).
    """
    out = Path(out)
    resolved = out.resolve()
    for p in map(Path, inputs):
        if p.resolve() == resolved or p.resolve().is_relative_to(resolved):
            relation = "is" if p.resolve() == resolved else "contains"
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
                "choose a new directory, or pass force=True (--force) to write into it: files permerge writes "
                "are replaced, all others are kept"
            )
        if existing:
            LOG.warning("writing into non-empty %s (force): its %d existing entries are kept", out, len(existing))
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
) -> Path:
    """Write ``out_dir/provenance.json`` (atomically): how, from what, and with which software a result was made.

    It records library versions, platform, a UTC timestamp, the command, ``config`` and ``report``
    (converted to JSON: paths and dtypes as strings, tuples and sets as lists, dataclasses as dicts,
    tensors and arrays as lists up to 1024 elements and as shape + dtype beyond) and the SHA-256 of
    every input file (see :func:`~permerge.io.read.checkpoint_hashes`).
    """
    LOG.info("hashing %d inputs for provenance", len(inputs))
    record = {
        "versions": {name: _version(name) for name in ("permerge", "torch", "numpy", "scipy", "safetensors")}
        | {"python": platform.python_version(), "cuda": torch.version.cuda},
        "platform": platform.platform(),
        "created_utc": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "command": command if isinstance(command, str) else [str(c) for c in command],
        "config": _jsonable(config, "config"),
        "inputs": {
            name: {"path": str(Path(p).resolve()), "sha256": checkpoint_hashes(p)} for name, p in inputs.items()
        },
        "report": _jsonable(report, "report"),
    }
    text = json.dumps(record, indent=2) + "\n"
    return atomic_write(Path(out_dir) / PROVENANCE_NAME, lambda tmp: tmp.write_text(text, encoding="utf-8"))


def save_permutation(perm: Mapping[str, torch.Tensor], path: StrPath, *, protect: Iterable[StrPath] = ()) -> Path:
    """Write a permutation (group name → index vector) as int64 tensors in a ``.safetensors`` file, atomically."""
    vectors = {name: _check_index_vector(name, p, path).to(torch.int64) for name, p in perm.items()}
    return save_state_dict(vectors, path, {"permerge": "permutation"}, protect=protect)


def safetensors_writer(tensors: Mapping[str, torch.Tensor], metadata: Mapping[str, str] | None = None) -> Callable[[Path], None]:
    """A writer for :func:`atomic_write` / ``write_files``: ``tensors`` as safetensors, tied tensors
    cloned (see :func:`save_state_dict`), header ``{"format": "pt"}`` plus ``metadata``."""

    def write(tmp: Path) -> None:
        save_file(_packable(tensors, tmp), tmp, metadata={"format": "pt", **_check_metadata(metadata or {}, tmp)})

    return write


def permutation_writer(perm: Mapping[str, torch.Tensor]) -> Callable[[Path], None]:
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


def _version(dist: str) -> str:
    try:
        return version(dist)
    except PackageNotFoundError:
        return "unknown"


def _jsonable(obj: Any, where: str) -> Any:
    """``obj`` as plain JSON values; ``where`` names it in the warning for unknown types."""
    if isinstance(obj, Enum):
        return _jsonable(obj.value, where)
    if obj is None or isinstance(obj, (bool, int, float, str)):
        return obj
    if isinstance(obj, (PurePath, torch.dtype, torch.device)):
        return str(obj)
    if isinstance(obj, np.generic):
        return _jsonable(obj.item(), where)
    if isinstance(obj, (torch.Tensor, np.ndarray)):
        if math.prod(obj.shape) > _MAX_LISTED:
            return {"shape": list(obj.shape), "dtype": str(obj.dtype)}
        return _jsonable(obj.tolist(), where)
    if dataclasses.is_dataclass(obj) and not isinstance(obj, type):
        return {f.name: _jsonable(getattr(obj, f.name), f"{where}.{f.name}") for f in dataclasses.fields(obj)}
    if isinstance(obj, Mapping):
        return {str(k): _jsonable(v, f"{where}.{k}") for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_jsonable(v, f"{where}[{i}]") for i, v in enumerate(obj)]
    if isinstance(obj, (set, frozenset)):
        return sorted((_jsonable(v, where) for v in obj), key=repr)
    LOG.warning("provenance: %s is a %s, which JSON cannot hold; storing its repr", where, type(obj).__name__)
    return repr(obj)
