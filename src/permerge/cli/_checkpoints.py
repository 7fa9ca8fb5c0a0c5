"""Load checkpoints into fresh copies of the CLI's model, with errors that name the keys."""

from __future__ import annotations

import copy
import importlib
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import torch
from torch import nn

from permerge.errors import PermergeError, StateDictMismatchError
from permerge.io.read import load_state_dict

__all__ = ["load_into", "resolve_callable"]


def load_into(template: nn.Module, path: str | Path, name: str) -> nn.Module:
    """A copy of ``template`` holding the weights at ``path`` (keys and shapes must match)."""
    sd = load_state_dict(path)
    model = copy.deepcopy(template)
    expected = model.state_dict()
    tied = {k for k, v in expected.items() for k2, v2 in expected.items() if k != k2 and v is v2}
    missing = sorted(set(expected) - set(sd) - tied)
    extra = sorted(set(sd) - set(expected))
    if missing or extra:
        raise StateDictMismatchError(
            f"{name} ({path}) does not fit the model: missing keys {missing[:10]}, unexpected keys {extra[:10]}"
        )
    wrong = sorted(k for k in sd if tuple(sd[k].shape) != tuple(expected[k].shape))
    if wrong:
        k = wrong[0]
        raise StateDictMismatchError(
            f"{name} ({path}) has {len(wrong)} tensors of the wrong shape, e.g. {k!r}: "
            f"{tuple(sd[k].shape)}, the model expects {tuple(expected[k].shape)}"
        )
    bad = sorted(k for k, v in sd.items() if v.is_floating_point() and not torch.isfinite(v).all())
    if bad:
        raise StateDictMismatchError(f"{name} ({path}) has NaN or infinite values in {bad[:10]}")
    model.load_state_dict(sd, strict=False)
    return model.eval()


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
