"""Write one result directory (weights, permutations, spec, provenance) all or nothing.

A new directory is assembled under a temporary name beside it and renamed into place at the end,
so an interrupted run leaves no half-written output; with ``force`` into an existing directory
every file is still replaced atomically.
"""

from __future__ import annotations

import os
import secrets
import shutil
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import torch

from permerge.io.read import StrPath
from permerge.io.write import (
    atomic_write,
    check_not_input,
    permutation_writer,
    prepare_output_dir,
    safetensors_writer,
    text_writer,
    write_provenance,
)
from permerge.spec import PermutationSpec

__all__ = ["write_files", "write_result"]


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
    """Write ``<name>.safetensors`` per state dict, ``<name>.safetensors`` per permutation,
    ``spec.json`` and ``provenance.json`` into ``out`` (see :func:`write_files`)."""
    files: dict[str, Callable[[Path], object]] = {f"{n}.safetensors": safetensors_writer(sd) for n, sd in state_dicts.items()}
    files.update({f"{n}.safetensors": permutation_writer(p) for n, p in permutations.items() if p})
    files["spec.json"] = text_writer(spec.to_json())
    return write_files(out, files, force=force, inputs=inputs, command=command, config=config, report=report)


def write_files(
    out: StrPath,
    files: Mapping[str, Callable[[Path], object]],
    *,
    force: bool,
    inputs: Mapping[str, StrPath],
    command: list[str],
    config: Mapping[str, Any],
    report: Mapping[str, Any],
) -> Path:
    """Like :func:`write_result` for any files: ``files[name](path)`` writes ``out/name``.

    The same all-or-nothing rules: a new ``out`` is assembled under a temporary name and renamed
    into place; with ``force`` into an existing one each file is replaced atomically. Adds
    ``provenance.json``; inputs are never overwritten.
    """
    out = prepare_output_dir(out, force=force, inputs=inputs.values(), create=False)
    fresh = not out.exists()
    target = out.with_name(f".{out.name}.{secrets.token_hex(4)}.partial") if fresh else out
    target.mkdir(parents=True, exist_ok=not fresh)
    try:
        for name, writer in files.items():
            check_not_input(target / name, inputs.values())
            atomic_write(target / name, writer)
        write_provenance(target, command=command, config=config, inputs=inputs, report=report)
        if fresh:
            os.rename(target, out)
    except BaseException:
        if fresh:
            shutil.rmtree(target, ignore_errors=True)
        raise
    return out
