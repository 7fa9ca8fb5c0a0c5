"""A per-process cache of traced specs, keyed by everything the trace can depend on.

Tracing (``torch.export``) is most of a small model's alignment time (0.24 of 0.32 s for a
ResNet-20), yet the spec depends only on the architecture and the example input's shapes, not on
the weights. So :func:`permerge.trace` keeps the last specs it derived under a key made of

* every submodule's name, class (the class object itself, so a redefined class is a new key),
  plain configuration attributes (ints, floats, strings, ... and HF-style ``config.to_dict()``),
  the qualified names of function attributes (``self.act = F.relu``) and the types of the rest;
* every parameter's and buffer's name, shape and dtype, and which names share one tensor (tying);
* the example inputs' structure: tensors by shape, dtype and device type, other leaves by value;
* the ``strict`` flag and the rule registry's contents (so a newly registered rule re-traces).

A forward pass that depends on anything else (a global, a monkeypatched method) can defeat the
key; ``trace(..., cache=False)`` bypasses the cache and :func:`clear` empties it, and
:func:`permerge.align` still checks function preservation on the model it permutes.
"""

from __future__ import annotations

import inspect
from collections import OrderedDict
from collections.abc import Hashable, Mapping
from typing import Any

import torch
from torch import nn
from torch.utils import _pytree as pytree

from permerge.spec import PermutationSpec

__all__ = ["MAX_ENTRIES", "clear", "get", "key", "put"]

MAX_ENTRIES = 32
"""Specs kept (least recently used evicted first); each is a few KB of axes, no tensors."""

_PLAIN = (bool, int, float, str, bytes, type(None), torch.dtype, torch.device)
_CACHE: OrderedDict[Hashable, PermutationSpec] = OrderedDict()


def key(
    model: nn.Module, example_inputs: Any, example_kwargs: Mapping[str, Any] | None, strict: bool,
    rules: Mapping[object, Any],
) -> Hashable | None:  # fmt: skip
    """The cache key of a trace, or ``None`` (do not cache) when ``model`` is not a module or an
    input leaf has no stable value to key on."""
    inputs = _leaves((example_inputs, dict(example_kwargs or {})))
    if inputs is None or not isinstance(model, nn.Module):
        return None
    modules = tuple((name, type(m), _config(m)) for name, m in model.named_modules(remove_duplicate=False))
    first: dict[int, int] = {}
    tensors = []
    for i, (name, t) in enumerate(
        [*model.named_parameters(remove_duplicate=False), *model.named_buffers(remove_duplicate=False)]
    ):
        tensors.append((name, tuple(t.shape), t.dtype, first.setdefault(id(t), i)))
    registry = frozenset((id(k), id(v)) for k, v in rules.items())
    return (modules, tuple(tensors), inputs, strict, registry)


def get(k: Hashable) -> PermutationSpec | None:
    """The cached spec for ``k`` (marked most recently used), or ``None``."""
    spec = _CACHE.get(k)
    if spec is not None:
        _CACHE.move_to_end(k)
    return spec


def put(k: Hashable, spec: PermutationSpec) -> None:
    """Remember ``spec`` under ``k``, evicting the least recently used beyond :data:`MAX_ENTRIES`."""
    _CACHE[k] = spec
    _CACHE.move_to_end(k)
    while len(_CACHE) > MAX_ENTRIES:
        _CACHE.popitem(last=False)


def clear() -> None:
    """Forget every cached spec (the next :func:`permerge.trace` of any model traces again)."""
    _CACHE.clear()


def _config(m: nn.Module) -> tuple[tuple[str, Hashable], ...]:
    """A module's configuration: its plain public attributes and an HF-style ``config``."""
    items = []
    for name, value in vars(m).items():
        if name.startswith("_") or isinstance(value, (nn.Module, torch.Tensor)):
            continue
        if name == "config" and callable(getattr(value, "to_dict", None)):
            items.append((name, repr(sorted(value.to_dict().items(), key=lambda kv: kv[0]))))
        elif (v := _plain(value)) is not None:
            items.append((name, v))
        elif inspect.isroutine(value):  # e.g. self.act = F.relu: which function it is matters
            items.append((name, (getattr(value, "__module__", None), getattr(value, "__qualname__", repr(value)))))
        else:
            items.append((name, type(value)))  # an opaque attribute: at least its type must agree
    return tuple(items)


def _plain(value: Any) -> Hashable | None:
    if isinstance(value, _PLAIN):
        return (type(value), value)
    if isinstance(value, (tuple, list)):
        parts = [_plain(v) for v in value]
        return None if any(p is None for p in parts) else (type(value), tuple(parts))
    return None


def _leaves(inputs: Any) -> tuple[Hashable, ...] | None:
    out: list[Hashable] = []
    leaves, treespec = pytree.tree_flatten(inputs)
    for leaf in leaves:
        if isinstance(leaf, torch.Tensor):
            out.append(("tensor", tuple(leaf.shape), leaf.dtype, leaf.device.type))
        elif (v := _plain(leaf)) is not None:
            out.append(v)
        else:
            return None
    return (str(treespec), *out)
