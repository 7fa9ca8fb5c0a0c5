"""Result directories (the pipeline's sinks), written all or nothing and claimed before any work.

:class:`OutputDir` is entered before tracing or matching: it checks the path (not an input, not
inside one, not a dangling link; new or empty unless ``force``), takes a lock beside it (a second
run on the same output fails at once instead of racing), removes the hidden ``.partial``
directories dead runs left (restoring the old output if a run died mid-swap), creates its own
``.partial`` directory (which proves the location writable) and checks free space. The result is
written into that directory, which then replaces the output: renamed into place, or with
``force`` swapped with the existing directory, which is then removed, so ``--force`` leaves exactly
the new files. Any failure, Ctrl-C or SIGTERM removes the partial directory; the output is never
half-written.

:func:`hf_files` plans the files of a Hugging Face directory: B's tensors permuted (sharded
safetensors written tensor by tensor) plus :func:`hf_extras`: B's ``config.json``, an allow-list of
non-weight files (tokenizer, generation config, chat template, license) and a model card rendered
from the result's provenance (:func:`~permerge.hf.model_card`); everything else, in particular
other weight formats (``tf_model.h5``, ``flax_model.msgpack``, ``model.onnx``, ``*.gguf``, which
would still hold B's unpermuted weights), is left out and listed with the reason. Results computed
in memory (``--model``) get the same :func:`hf_extras` beside their weights.
"""

from __future__ import annotations

import errno
import json
import logging
import os
import secrets
import shutil
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from types import TracebackType
from typing import Any

import torch

from permerge.errors import PermergeIOError
from permerge.io.read import SUPPORTED_SUFFIXES, StrPath, TensorSource
from permerge.io.write import (
    INDEX_NAME,
    ShardWriter,
    permutation_writer,
    permuted_producer,
    plan_write,
    prepare_output_dir,
    safetensors_writer,
    shard_index,
    text_writer,
    write_provenance,
)
from permerge.progress import progress
from permerge.spec import PermutationSpec

try:
    import fcntl
except ImportError:  # pragma: no cover - Windows: no advisory locks, outputs are still atomic
    fcntl = None  # type: ignore[assignment]

LOG = logging.getLogger(__name__)

__all__ = [
    "COPIED_FILES",
    "CARD_NAME",
    "FromProvenance",
    "OutputDir",
    "hf_extras",
    "hf_files",
    "os_error",
    "source_files",
    "write_files",
    "write_result",
]

Writer = Callable[[Path], object]


@dataclass(frozen=True)
class FromProvenance:
    """A text file rendered from the result's provenance record (a model card): written after
    ``provenance.json``, before the result is put in place."""

    render: Callable[[Mapping[str, Any]], str]


Planned = Writer | FromProvenance

CARD_NAME = "README.md"

COPIED_FILES = frozenset({
    "generation_config.json", "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json",
    "added_tokens.json", "vocab.json", "vocab.txt", "merges.txt", "tokenizer.model", "spiece.model",
    "sentencepiece.bpe.model", "chat_template.json", "chat_template.jinja", "preprocessor_config.json",
    "processor_config.json", "image_processor_config.json", "feature_extractor_config.json",
    "LICENSE", "LICENSE.txt", "LICENSE.md", "NOTICE", "USE_POLICY.md",
})  # fmt: skip
"""Non-weight files of an HF directory copied to the output (``config.json`` is always written;
``README.md`` is replaced by permerge's model card)."""

COPIED_DIRS = frozenset({"additional_chat_templates"})
"""Directories of an HF directory copied whole (named chat templates, ``transformers`` ≥ 4.54)."""

_REPLACED_CARD = "B's model card, replaced by permerge's (README.md: what was done, inputs and their hashes)"

_FOREIGN_WEIGHTS = {
    ".h5": "TensorFlow weights", ".msgpack": "Flax weights", ".onnx": "an ONNX export", ".gguf": "GGUF weights",
    ".ot": "rust-bert weights", ".tflite": "a TFLite export", ".mlmodel": "a Core ML export", ".npz": "NumPy arrays",
}  # fmt: skip
_SPACE_MARGIN = 1.02  # headers, index, provenance


def _size(n: float) -> str:
    return f"{n / 1e9:.2f} GB" if n >= 1e8 else f"{n / 1e6:.2f} MB" if n >= 1e5 else f"{n:.0f} bytes"


def os_error(e: OSError, what: str) -> PermergeIOError:
    """One line for an OS error: what failed, why (the system's words), and what to do."""
    fix = {
        errno.ENOSPC: "free some space or choose another output location",
        errno.EDQUOT: "free some space or choose another output location",
        errno.EROFS: "the file system is read-only: choose another output location",
        errno.EACCES: "check the permissions or choose another output location",
        errno.EPERM: "check the permissions or choose another output location",
    }.get(e.errno or 0, "check the path")
    where = f" ({e.filename})" if e.filename else ""
    return PermergeIOError(f"{what}: {e.strerror or e}{where}; {fix}")


class OutputDir:
    """Claim ``out`` now, write it later, all or nothing (see the module docstring).

    Args:
        out: the output directory.
        force: replace an existing non-empty ``out`` (all of it) instead of refusing.
        inputs: input paths ``out`` must not be, contain or lie inside.
        expected_bytes: about how much will be written (checked against free space now).
        quiet: no progress bars (writing, hashing the inputs for provenance).

    Example:
        >>> with OutputDir("merged", force=False, inputs=["a.pt", "b.pt"], expected_bytes=2e9) as od:  # doctest: +SKIP
        ...     result = expensive_work()
        ...     od.commit({"model.safetensors": safetensors_writer(result)}, command=sys.argv, config={}, report={})
    """

    def __init__(
        self, out: StrPath, *, force: bool, inputs: Mapping[str, StrPath], expected_bytes: float = 0, quiet: bool = True,
    ) -> None:  # fmt: skip
        self.out = Path(out)
        self.force, self.inputs, self.expected_bytes, self.quiet = force, inputs, expected_bytes, quiet
        self._lock_fd: int | None = None
        self._lock_path: Path | None = None
        self._partial: Path | None = None
        self._made: list[Path] = []  # parent directories this run created (removed again on failure)
        self.committed = False

    # -- claim ----------------------------------------------------------------------------
    def __enter__(self) -> OutputDir:
        if self.out.is_symlink() and not self.out.exists():
            raise PermergeIOError(f"output path {self.out} is a dangling symbolic link; remove it or choose another path")
        self.out = prepare_output_dir(self.out, force=self.force, inputs=self.inputs.values(), create=False).resolve()
        try:
            self._make_parents(self.out.parent)
            self._lock()
            if self._clean_stale():  # a dead run's output is back: check it as found
                prepare_output_dir(self.out, force=self.force, inputs=self.inputs.values(), create=False)
            self._partial = self.out.with_name(f".{self.out.name}.{secrets.token_hex(4)}.partial")
            self._partial.mkdir()
            self._check_space()
        except BaseException as e:
            self._release()
            if isinstance(e, OSError) and not isinstance(e, PermergeIOError):
                raise os_error(e, f"cannot write to {self.out.parent}") from e
            raise
        return self

    def _make_parents(self, parent: Path) -> None:
        missing = [p for p in (parent, *parent.parents) if not p.exists()]
        for p in reversed(missing):
            p.mkdir()
            self._made.append(p)

    def _lock(self) -> None:
        self._lock_path = self.out.with_name(f".{self.out.name}.lock")
        if fcntl is None:
            return
        while True:
            fd = os.open(self._lock_path, os.O_RDWR | os.O_CREAT, 0o644)
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                os.close(fd)
                raise PermergeIOError(
                    f"another permerge run is writing {self.out} (lock {self._lock_path} is held); wait for it "
                    "or choose another output directory"
                ) from None
            try:  # the holder before us may have removed the file between our open and our lock
                same = os.fstat(fd).st_ino == os.stat(self._lock_path).st_ino
            except FileNotFoundError:
                same = False
            if same:
                self._lock_fd = fd
                return
            os.close(fd)

    def _clean_stale(self) -> bool:
        """Under the lock no other live run writes here: every partial or old copy is a dead run's.
        Returns whether the output was restored from a run that died while replacing it."""
        olds = sorted(self.out.parent.glob(f".{self.out.name}.*.old"))
        restored = bool(olds) and not self.out.exists()
        if restored:
            LOG.warning("restoring %s from %s: a run died while replacing it", self.out, olds[-1].name)
            os.rename(olds.pop(), self.out)
        stale = sorted(self.out.parent.glob(f".{self.out.name}.*.partial")) + olds
        for p in stale:
            shutil.rmtree(p, ignore_errors=True)
        if stale:
            LOG.warning("removed %d unfinished output(s) of interrupted runs: %s", len(stale), ", ".join(p.name for p in stale))
        return restored

    def _check_space(self) -> None:
        assert self._partial is not None
        free = shutil.disk_usage(self._partial).free
        need = self.expected_bytes * _SPACE_MARGIN
        if need > free:
            raise PermergeIOError(
                f"not enough free space for {self.out}: about {_size(need)} needed, {_size(free)} free "
                f"on {self.out.parent}; free some space or choose another output location"
            )

    # -- write ----------------------------------------------------------------------------
    def commit(
        self,
        files: Mapping[str, Planned],
        *,
        command: list[str] | str,
        config: Mapping[str, Any],
        report: Mapping[str, Any],
        view: Callable[[Path], object] | None = None,
    ) -> Path:
        """Write ``files[name](path)`` for each name, then ``provenance.json``, then the files
        rendered from it (:class:`FromProvenance`: the model card), then put the directory in place
        of ``out``. Returns ``out``. Writers with an ``nbytes`` attribute (weights) advance one progress
        bar over the bytes written.

        ``view(out)`` then adds a file rendered from the complete directory (the HTML report), still
        under the lock; the result is complete without it, so its failure is a warning."""
        if self._partial is None:
            raise PermergeIOError("OutputDir.commit outside its with-block")
        later = {name: w for name, w in files.items() if isinstance(w, FromProvenance)}
        try:
            total = sum(getattr(w, "nbytes", 0) for w in files.values())
            with progress(total=total, desc=f"writing {self.out.name}", unit="B", quiet=self.quiet) as bar:
                for name, writer in files.items():
                    if name in later:
                        continue
                    path = self._partial / name
                    if hasattr(writer, "nbytes"):
                        writer(path, bar.update)  # type: ignore[call-arg]
                    else:
                        writer(path)  # type: ignore[operator]
                    _fsync(path)
            prov = write_provenance(self._partial, command=command, config=config, inputs=self.inputs, report=report,
                                    quiet=self.quiet)  # fmt: skip
            record = json.loads(prov.read_text(encoding="utf-8"))
            for name, rendered in later.items():
                path = self._partial / name
                path.write_text(rendered.render(record), encoding="utf-8")
                _fsync(path)
            self._swap()
        except OSError as e:
            if isinstance(e, PermergeIOError):
                raise
            raise os_error(e, f"cannot write {self.out}; nothing was written") from e
        self.committed = True
        if view is not None:
            try:
                view(self.out)
            except Exception as e:  # the result is in place and valid; only its rendering failed
                LOG.warning("the result in %s is complete, but its report could not be written: %s", self.out, e)
        return self.out

    def _swap(self) -> None:
        assert self._partial is not None
        fd = os.open(self._partial, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
        if not self.out.exists():
            os.rename(self._partial, self.out)
            return
        old = self.out.with_name(f".{self.out.name}.{secrets.token_hex(4)}.old")
        LOG.info("replacing %s (force): its %d previous entries are removed", self.out, len(list(self.out.iterdir())))
        os.rename(self.out, old)
        try:
            os.rename(self._partial, self.out)
        except BaseException:
            os.rename(old, self.out)
            raise
        shutil.rmtree(old, ignore_errors=True)

    # -- release --------------------------------------------------------------------------
    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None) -> None:
        self._release()

    def _release(self) -> None:
        if self._partial is not None and self._partial.exists():
            shutil.rmtree(self._partial, ignore_errors=True)
        self._partial = None
        if self._lock_fd is not None:
            if self._lock_path is not None:
                self._lock_path.unlink(missing_ok=True)
            os.close(self._lock_fd)
            self._lock_fd = None
        if not self.committed:
            for p in reversed(self._made):
                try:
                    p.rmdir()
                except OSError:
                    break
        self._made = []


def write_files(
    out: StrPath,
    files: Mapping[str, Planned],
    *,
    force: bool,
    inputs: Mapping[str, StrPath],
    command: list[str],
    config: Mapping[str, Any],
    report: Mapping[str, Any],
) -> Path:
    """Write ``files`` (``name → writer(path)``) plus ``provenance.json`` as the directory ``out``, all
    or nothing (an :class:`OutputDir` claimed and committed at once)."""
    with OutputDir(out, force=force, inputs=inputs) as od:
        return od.commit(files, command=command, config=config, report=report)


def result_files(
    state_dicts: Mapping[str, Mapping[str, torch.Tensor]],
    permutations: Mapping[str, Mapping[str, torch.Tensor]],
    spec: PermutationSpec,
) -> dict[str, Writer]:
    """``<name>.safetensors`` per state dict and per (non-empty) permutation, and ``spec.json``."""
    files: dict[str, Writer] = {f"{n}.safetensors": safetensors_writer(sd) for n, sd in state_dicts.items()}
    files.update({f"{n}.safetensors": permutation_writer(p) for n, p in permutations.items() if p})
    files["spec.json"] = text_writer(spec.to_json())
    return files


def write_result(
    out: StrPath,
    *,
    force: bool,
    inputs: Mapping[str, StrPath],
    state_dicts: Mapping[str, Mapping[str, torch.Tensor]],
    permutations: Mapping[str, Mapping[str, torch.Tensor]],
    spec: PermutationSpec,
    command: list[str],
    config: Mapping[str, Any],
    report: Mapping[str, Any],
) -> Path:
    """:func:`result_files` written with :func:`write_files`."""
    return write_files(out, result_files(state_dicts, permutations, spec), force=force, inputs=inputs,
                       command=command, config=config, report=report)  # fmt: skip


# -- Hugging Face directories ------------------------------------------------------------------------


def hf_files(
    source: TensorSource,
    model_dir: StrPath,
    spec: PermutationSpec,
    perm: Mapping[str, torch.Tensor],
    *,
    out_dtype: torch.dtype | None = None,
    max_shard_size: int | str = "5GB",
) -> tuple[dict[str, Planned], dict[str, str]]:
    """The files of B (``source``, read from ``model_dir``) permuted by ``perm`` as an HF directory,
    and the files of ``model_dir`` left out, with the reason.

    Weights are planned (:func:`~permerge.io.write.plan_write`: per tensor "read K, permute, cast")
    and written shard by shard, tensor by tensor, with ``model.safetensors.index.json`` when
    sharded; then :func:`hf_extras` (``config.json`` with ``dtype`` = ``out_dtype`` when given, the
    allow-listed files, the model card); ``permutation.safetensors`` and ``spec.json`` are added.
    """
    shards = plan_write(source, spec, out_dtype=out_dtype, max_shard_size=max_shard_size)
    produce = permuted_producer(source, perm)
    files: dict[str, Planned] = {s.name: ShardWriter(s, produce) for s in shards}
    if len(shards) > 1:
        files[INDEX_NAME] = text_writer(json.dumps(shard_index(shards), indent=2, sort_keys=True) + "\n")
    extras, left_out = hf_extras(model_dir, read=[p.name for p in source_files(source)], out_dtype=out_dtype)
    files.update(extras)
    files["permutation.safetensors"] = permutation_writer(perm)
    files["spec.json"] = text_writer(spec.to_json())
    return files, left_out


def hf_extras(
    model_dir: StrPath,
    *,
    read: Iterable[str] = (),
    out_dtype: torch.dtype | None = None,
    config: str = "config.json",
    card: Callable[[Mapping[str, Any]], str] | None = None,
) -> tuple[dict[str, Planned], dict[str, str]]:
    """What makes a result's weights a Hugging Face directory like ``model_dir``: its
    ``config.json`` (or ``config``: an adapter's ``adapter_config.json``; ``dtype`` set to
    ``out_dtype`` when given), the allow-listed non-weight files
    (:data:`COPIED_FILES`, :data:`COPIED_DIRS`) and a model card rendered from the provenance record
    (``card``, default :func:`~permerge.hf.model_card`); and every other entry of ``model_dir``
    except the weight files ``read``, with the reason it was left out (logged unless it is B's own
    card, which the new one replaces).
    """
    from permerge.hf import model_card

    model_dir = Path(model_dir)
    files: dict[str, Planned] = {config: text_writer(_config_text(model_dir / config, out_dtype))}
    files[CARD_NAME] = FromProvenance(card or model_card)
    skip = set(read) | set(files)
    left_out: dict[str, str] = {}
    for p in sorted(model_dir.iterdir()):
        if p.name in skip and p.name != CARD_NAME:
            continue
        if p.is_file() and p.name in COPIED_FILES:
            files[p.name] = partial(_copy, src=p)
        elif p.is_dir() and p.name in COPIED_DIRS:
            files[p.name] = partial(shutil.copytree, p)
        else:
            left_out[p.name] = _REPLACED_CARD if p.name == CARD_NAME else _left_out_reason(p)
    warn = {k: v for k, v in left_out.items() if k != CARD_NAME}
    if warn:
        LOG.warning("not copied from %s: %s", model_dir, "; ".join(f"{k} ({v})" for k, v in warn.items()))
    return files, left_out


def source_files(source: TensorSource) -> list[Path]:
    """The files ``source`` reads (the index and its shards, or the single file)."""
    if source.path is None:
        return []
    if source.path.name.endswith(".index.json"):
        data = json.loads(source.path.read_text(encoding="utf-8"))
        return [source.path, *(source.path.parent / n for n in sorted(set(data["weight_map"].values())))]
    return [source.path]


def _fsync(path: Path) -> None:
    for p in sorted(path.rglob("*")) if path.is_dir() else [path]:
        if p.is_file():
            with open(p, "rb") as f:
                os.fsync(f.fileno())


def _left_out_reason(p: Path) -> str:
    suffix = p.suffix.lower()
    if p.is_dir():
        return "a directory; only listed files are copied"
    if suffix in _FOREIGN_WEIGHTS:
        return f"{_FOREIGN_WEIGHTS[suffix]}: would still hold B's unpermuted weights"
    if suffix in SUPPORTED_SUFFIXES or p.name.endswith(".index.json"):
        return "another copy of B's weights, unpermuted (the permuted ones are written as safetensors)"
    return "not on the allow-list of non-weight files (tokenizer, generation config, chat template, license)"


def _config_text(path: Path, out_dtype: torch.dtype | None) -> str:
    text = path.read_text(encoding="utf-8")
    if out_dtype is None:
        return text
    data = json.loads(text)
    name = str(out_dtype).removeprefix("torch.")
    for key in ("dtype", "torch_dtype"):
        if key in data or key == "dtype":
            data[key] = name
    return json.dumps(data, indent=2, sort_keys=True) + "\n"


def _copy(tmp: Path, src: Path) -> None:
    shutil.copyfile(src, tmp)
