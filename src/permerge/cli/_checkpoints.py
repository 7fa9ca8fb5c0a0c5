"""Load checkpoints into fresh copies of the CLI's model: checked first, dtypes kept, ties kept."""

from __future__ import annotations

import copy
import importlib
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from permerge.check import check_compatible, tied_aliases
from permerge.errors import PermergeError, StateDictMismatchError
from permerge.hf import checkpoint_keys
from permerge.io.read import load_state_dict

__all__ = ["Loaded", "data_from", "load_checkpoint", "load_into", "resolve_callable"]


@dataclass(frozen=True)
class Loaded:
    """A model holding a checkpoint's weights, and which checkpoint key each state-dict key came from."""

    model: nn.Module
    keys: dict[str, str]  # module key → checkpoint key (tied aliases share one; HF files may rename)

    def checkpoint_state(self, state: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """``state`` (module keys, e.g. the aligned model's) under the checkpoint's keys: the same key
        set out as in."""
        return {ck: state[mk] for mk, ck in self.keys.items()}


def load_checkpoint(template: nn.Module, path: str | Path, name: str) -> Loaded:
    """A copy of ``template`` holding the weights at ``path``, in the checkpoint's own dtypes.

    Checked first (:func:`~permerge.check.check_compatible`: keys, shapes, dtype kinds, finite
    values). A tied alias the checkpoint lacks (a Hugging Face ``lm_head.weight``) takes its
    canonical tensor, and keys ``transformers`` renames on save are mapped back
    (:func:`~permerge.hf.checkpoint_keys`). The tensors are assigned, not copied into the template's,
    so an fp16 or bf16 checkpoint stays fp16 or bf16; tied parameters stay one tensor.
    """
    sd = load_state_dict(path)
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
    return Loaded(model.eval(), keys)


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
