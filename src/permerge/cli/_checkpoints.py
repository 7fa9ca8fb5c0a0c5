"""Load checkpoints into fresh copies of the CLI's model: checked first, dtypes kept, ties kept."""

from __future__ import annotations

import argparse
import copy
import importlib
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from permerge.check import check_compatible, tied_aliases
from permerge.errors import PermergeError, StateDictMismatchError
from permerge.evaluate import METRIC_SETS, metric_set
from permerge.hf import checkpoint_keys, checkpoint_spec, is_hf_dir
from permerge.io.outputs import Planned, hf_extras, result_files, source_files
from permerge.io.read import open_checkpoint
from permerge.permutation import Permutation
from permerge.spec import PermutationSpec

__all__ = [
    "Loaded", "add_metrics_argument", "batches_from", "data_from", "hf_home", "load_checkpoint", "load_into",
    "metrics_from", "resolve_callable",
]  # fmt: skip


@dataclass(frozen=True)
class Loaded:
    """A model holding a checkpoint's weights, which checkpoint key each state-dict key came from,
    and where the checkpoint is (its path, and the weight files read there)."""

    model: nn.Module
    keys: dict[str, str]  # module key → checkpoint key (tied aliases share one; HF files may rename)
    path: Path
    files: tuple[str, ...] = ()

    def checkpoint_state(self, state: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """``state`` (module keys, e.g. the aligned model's) under the checkpoint's keys: the same key
        set out as in."""
        return {ck: state[mk] for mk, ck in self.keys.items()}

    def result_files(
        self, state: Mapping[str, torch.Tensor], permutations: Mapping[str, Permutation], spec: PermutationSpec,
        hf_dir: Path | None,
    ) -> tuple[dict[str, Planned], dict[str, str]]:  # fmt: skip
        """The files of a result in this checkpoint's format: ``state`` and ``spec`` (module keys,
        e.g. the aligned model's) under the checkpoint's keys, the permutations, and, for a Hugging
        Face model (``hf_dir``), its config, tokenizer and a model card (:func:`~permerge.io.outputs.hf_extras`);
        plus what of ``hf_dir`` was left out."""
        files = result_files({"model": self.checkpoint_state(state)}, permutations,
                             checkpoint_spec(spec, self.model, self.keys.values()))  # fmt: skip
        if hf_dir is None:
            return files, {}
        read = self.files if hf_dir in (self.path, self.path.parent) else ()
        extras, left_out = hf_extras(hf_dir, read=read)
        return {**files, **extras}, left_out


def hf_home(checkpoint: str | Path, model: str | None) -> Path | None:
    """The Hugging Face directory a result computed from ``checkpoint`` belongs to (its config and
    tokenizer go with it): the checkpoint if it is one, the directory holding it, else ``--model``'s."""
    path = Path(checkpoint)
    for candidate in (path, path.parent if path.is_file() else None, Path(model) if model else None):
        if candidate is not None and is_hf_dir(candidate):
            return candidate
    return None


def load_checkpoint(template: nn.Module, path: str | Path, name: str) -> Loaded:
    """A copy of ``template`` holding the weights at ``path``, in the checkpoint's own dtypes.

    Checked first (:func:`~permerge.check.check_compatible`: keys, shapes, dtype kinds, finite
    values). A tied alias the checkpoint lacks (a Hugging Face ``lm_head.weight``) takes its
    canonical tensor, and keys ``transformers`` renames on save are mapped back
    (:func:`~permerge.hf.checkpoint_keys`). The tensors are assigned, not copied into the template's,
    so an fp16 or bf16 checkpoint stays fp16 or bf16; tied parameters stay one tensor.
    """
    with open_checkpoint(path) as src:
        sd = {k: src.get(k) for k in src.keys()}  # noqa: SIM118 (a TensorSource is not iterable)
        files = tuple(p.name for p in source_files(src))
    label = f"{name} ({path})"
    keys = checkpoint_keys(template, sd, name=label)
    expected = template.state_dict()
    check_compatible([sd], [label], architecture={ck: expected[mk] for mk, ck in keys.items()})
    aliases = tied_aliases(template)
    for alias, canonical in aliases.items():
        a, c = keys[alias], keys[canonical]
        if a != c and not torch.equal(sd[a], sd[c]):
            raise StateDictMismatchError(f"{label}: the model ties {alias!r} to {canonical!r}, but the checkpoint holds different values for them")
    model = copy.deepcopy(template)
    params = dict(model.named_parameters(remove_duplicate=False))
    shared: dict[str, torch.Tensor] = {}
    for mk in keys:
        ck = keys[aliases.get(mk, mk)]
        if ck not in shared:
            shared[ck] = nn.Parameter(sd[ck], requires_grad=params[mk].requires_grad) if mk in params else sd[ck]
    # one Parameter object per tensor: ties stay ties
    model.load_state_dict({mk: shared[keys[aliases.get(mk, mk)]] for mk in keys}, assign=True)
    return Loaded(model.eval(), keys, Path(path), files)


def load_into(template: nn.Module, path: str | Path, name: str) -> nn.Module:
    """:func:`load_checkpoint`'s model."""
    return load_checkpoint(template, path, name).model


def resolve_callable(ref: str) -> Any:
    """Import ``package.module:function``."""
    module_name, sep, attr = ref.partition(":")
    if not sep:
        raise PermergeError(f"expected 'package.module:function', got {ref!r}")
    try:
        return getattr(importlib.import_module(module_name), attr)
    except (ImportError, AttributeError) as e:
        raise PermergeError(f"cannot import {ref!r}: {e}") from e


def data_from(ref: str | None) -> Iterable[Any] | None:
    return None if ref is None else resolve_callable(ref)()


def batches_from(ref: str, flag: str) -> Iterable[Any]:
    """The batches ``package.module:function`` returns, as a re-iterable (a generator would be used up
    by the first α of a curve); raises naming ``flag`` if they are not an iterable."""
    data = resolve_callable(ref)
    if not callable(data):
        raise PermergeError(f"{flag} {ref!r} is not a function")
    data = data()
    if isinstance(data, Iterator):
        data = list(data)
    if not isinstance(data, Iterable):
        raise PermergeError(f"{flag} {ref!r} returned {type(data).__name__}, not an iterable of (inputs, targets) batches")
    return data


def add_metrics_argument(p: argparse.ArgumentParser) -> None:
    p.add_argument("--metrics", default="auto",
                   help=f"metric set: {', '.join(METRIC_SETS)}, auto (causal-lm for Hugging Face causal LMs, else "
                        "classification) or package.module:name of a dict name → permerge.evaluate.Metric")  # fmt: skip


def metrics_from(ref: str) -> Any:
    """The metric set --metrics names (None for auto: it depends on the model), checked before any work."""
    if ref == "auto":
        return None
    if ref in METRIC_SETS:
        return ref
    if ":" not in ref:
        raise PermergeError(f"--metrics {ref!r}: choose {', '.join(METRIC_SETS)}, auto, or package.module:name")
    return metric_set(resolve_callable(ref))  # checks every direction is stated
