"""Batches and calls: the one reading of what a data batch holds and how a model is called on it.

A *batch* is the model's input alone, or a ``(inputs, targets, ...)`` tuple/list; the *inputs* are a
tensor (one positional argument), a tuple (several), or a mapping (keyword arguments, as Hugging
Face batches are). Every consumer of data — evaluation, BatchNorm reset, REPAIR, activation
matching, PLeaS — reads batches through these functions.
"""

from __future__ import annotations

import inspect
import itertools
import logging
from collections.abc import Callable, Iterable, Mapping
from typing import Any, TypeVar

import torch
from torch import nn
from torch.utils import _pytree as pytree

from permerge.errors import PermergeError

LOG = logging.getLogger(__name__)

__all__ = ["as_call", "call_kwargs", "inputs_of", "take_batches", "targets_of"]

T = TypeVar("T")


def inputs_of(batch: Any) -> Any:
    """The model inputs of a batch: its first element if it is a tuple or list, else the batch."""
    return batch[0] if isinstance(batch, (tuple, list)) else batch


def targets_of(batch: Any) -> Any:
    """The targets of an ``(inputs, targets, ...)`` batch, or None."""
    return batch[1] if isinstance(batch, (tuple, list)) and len(batch) > 1 else None


def as_call(inputs: Any, kwargs: Mapping[str, Any] | None = None) -> tuple[tuple[Any, ...], dict[str, Any]]:
    """Inputs as ``(args, kwargs)`` for ``model(*args, **kwargs)``, with ``kwargs`` added to every call
    (keys from a mapping of inputs win)."""
    extra = dict(kwargs or {})
    if isinstance(inputs, Mapping):
        return (), {**extra, **inputs}
    if isinstance(inputs, (tuple, list)):
        return tuple(inputs), extra
    return (inputs,), extra


def call_kwargs(model: nn.Module) -> dict[str, Any]:
    """Keyword arguments every call of ``model`` should carry: ``use_cache=False`` for Hugging Face
    models with a cache (scoring or tracing whole sequences never reuses it, it costs memory, and
    ``torch.export`` cannot trace the cache object it returns)."""
    if getattr(getattr(model, "config", None), "use_cache", None) is None:
        return {}
    params = inspect.signature(model.forward).parameters
    takes = "use_cache" in params or any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params.values())
    return {"use_cache": False} if takes else {}


def take_batches(data: Iterable[Any], count: int, what: str, prepare: Callable[[Any], T] = lambda b: b) -> list[T]:
    """``prepare(batch)`` for the first ``count`` batches of ``data`` whose tensors have the first
    one's shapes (an exported graph fixes them; a last, smaller batch is skipped with a log line).

    ``what`` names the consumer in the one-line error raised when ``count`` is not positive or the
    data yields nothing.
    """
    if isinstance(count, bool) or not isinstance(count, int) or count < 1:
        raise PermergeError(f"{what}: batches must be a positive integer, got {count!r}")
    out: list[T] = []
    first = None
    for batch in itertools.islice(iter(data), count):
        item = prepare(batch)
        shapes = [tuple(t.shape) for t in pytree.tree_leaves(item) if isinstance(t, torch.Tensor)]
        first = shapes if first is None else first
        if shapes == first:
            out.append(item)
        else:
            LOG.info("%s: skipping a batch shaped %s (the first was %s)", what, shapes, first)
    if not out:
        raise PermergeError(f"{what} needs data: the data iterable yielded no batches")
    return out
