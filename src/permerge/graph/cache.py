"""A per-process cache of traced graphs, keyed by everything the trace can depend on.

Tracing (``torch.export``) is most of a small model's alignment time (0.24 of 0.32 s for a
ResNet-20), yet its product depends only on the architecture and the example calls' shapes, not on
the weights. So :func:`permerge.graph.trace_graph` keeps the last products it derived under a key
made of

* every submodule's name, class (the class object itself, so a redefined class is a new key) and
  configuration, **by value**: plain attributes (numbers, strings, dtypes, ...), containers of
  them, dataclasses, enums, ``functools.partial`` objects, classes and functions (by identity) and
  HF-style ``config.to_dict()``; an attribute with no value to key on (an arbitrary object) makes
  the model uncacheable — it is traced every time rather than risk another instance's spec;
* every parameter's and buffer's name, shape and dtype, and which names share one tensor (tying);
* every example call's structure: tensors by shape, dtype and device type, other leaves by value,
  and its mode (eval or train);
* the ``strict`` flag and the rule registry's contents (so a newly registered rule re-traces).

A forward pass that depends on anything else (a global, a monkeypatched method) can defeat the
key; ``trace(..., cache=False)`` bypasses the cache and :func:`clear` empties it, and
:func:`permerge.align` still checks function preservation on the model it permutes.
"""

from __future__ import annotations

import dataclasses
import enum
import functools
import inspect
from collections import OrderedDict
from collections.abc import Hashable, Mapping, Sequence
from typing import Any

import torch
from torch import nn
from torch.utils import _pytree as pytree

__all__ = ["MAX_ENTRIES", "clear", "get", "key", "put"]

MAX_ENTRIES = 32
"""Traced products kept (least recently used evicted first); each holds a graph, no weights."""

_PLAIN = (bool, int, float, complex, str, bytes, type(None), torch.dtype, torch.device, torch.Size)
_CACHE: OrderedDict[Hashable, Any] = OrderedDict()
_DEPTH = 6  # how deep configuration objects are followed before giving up (no caching)


class _Unkeyable(Exception):
    """A value with nothing stable to key on: the trace is not cached."""


def key(model: nn.Module, calls: Sequence[Any], strict: bool, rules: Mapping[object, Any]) -> Hashable | None:
    """The cache key of a trace of ``model`` under example ``calls`` (each with ``args``, ``kwargs``,
    ``train``), or ``None`` (do not cache) when ``model`` is not a module or an input leaf or a
    configuration attribute has no stable value to key on."""
    if not isinstance(model, nn.Module):
        return None
    try:
        inputs = tuple((_leaves((c.args, dict(c.kwargs))), bool(c.train)) for c in calls)
        modules = tuple((name, type(m), _config(m)) for name, m in model.named_modules(remove_duplicate=False))
    except _Unkeyable:
        return None
    first: dict[int, int] = {}
    tensors = []
    for i, (name, t) in enumerate(
        [*model.named_parameters(remove_duplicate=False), *model.named_buffers(remove_duplicate=False)]
    ):
        tensors.append((name, tuple(t.shape), t.dtype, first.setdefault(id(t), i)))
    registry = frozenset((id(k), id(v)) for k, v in rules.items())
    return (modules, tuple(tensors), inputs, strict, registry)


def get(k: Hashable) -> Any | None:
    """The cached product for ``k`` (marked most recently used), or ``None``."""
    value = _CACHE.get(k)
    if value is not None:
        _CACHE.move_to_end(k)
    return value


def put(k: Hashable, value: Any) -> None:
    """Remember ``value`` under ``k``, evicting the least recently used beyond :data:`MAX_ENTRIES`."""
    _CACHE[k] = value
    _CACHE.move_to_end(k)
    while len(_CACHE) > MAX_ENTRIES:
        _CACHE.popitem(last=False)


def clear() -> None:
    """Forget every cached product (the next trace of any model traces again)."""
    _CACHE.clear()


def _config(m: nn.Module) -> tuple[tuple[str, Hashable], ...]:
    """A module's configuration, by value: its public attributes other than submodules and tensors."""
    items = []
    for name, value in vars(m).items():
        if name.startswith("_") or isinstance(value, (nn.Module, torch.Tensor)):
            continue
        if name == "config" and callable(getattr(value, "to_dict", None)):
            items.append((name, repr(sorted(value.to_dict().items(), key=lambda kv: kv[0]))))
        else:
            items.append((name, _value(value, _DEPTH)))
    return tuple(items)


def _value(v: Any, depth: int) -> Hashable:
    """A hashable value standing for ``v``'s configuration, or :class:`_Unkeyable`."""
    if depth < 0:
        raise _Unkeyable
    if isinstance(v, (*_PLAIN, enum.Enum)):
        return (type(v), v)
    if isinstance(v, type):
        return ("class", v)
    if isinstance(v, (tuple, list, frozenset, set)):
        items = [_value(x, depth - 1) for x in v]
        return (type(v), tuple(sorted(items, key=repr)) if isinstance(v, (set, frozenset)) else tuple(items))
    if isinstance(v, Mapping):
        return (type(v), tuple(sorted(((repr(k), _value(x, depth - 1)) for k, x in v.items()), key=lambda kv: kv[0])))
    if isinstance(v, functools.partial):
        return ("partial", _value(v.func, depth - 1), _value(v.args, depth - 1), _value(v.keywords, depth - 1))
    if inspect.isroutine(v):  # self.act = F.relu: which function it is matters
        owner = getattr(v, "__self__", None)
        if owner is not None and not isinstance(owner, type) and not inspect.ismodule(owner):
            raise _Unkeyable  # a bound method of some object: its state is not part of the key
        code = getattr(v, "__code__", None)  # Python functions: the code and what it closes over
        cells = tuple(_value(c.cell_contents, depth - 1) for c in (getattr(v, "__closure__", None) or ()))
        defaults = _value(getattr(v, "__defaults__", None), depth - 1)
        return ("routine", getattr(v, "__module__", None), getattr(v, "__qualname__", None), code, cells, defaults)
    if dataclasses.is_dataclass(v):
        fields = tuple((f.name, _value(getattr(v, f.name), depth - 1)) for f in dataclasses.fields(v))
        return (type(v), fields)
    if isinstance(v, torch.Tensor):
        raise _Unkeyable  # a tensor held outside the state dict: its values may change the graph
    state = getattr(v, "__dict__", None)
    if state is not None and not isinstance(v, nn.Module):
        return (type(v), tuple(sorted(((k, _value(x, depth - 1)) for k, x in state.items() if not k.startswith("__")),
                                      key=lambda kv: kv[0])))  # fmt: skip
    raise _Unkeyable


def _leaves(inputs: Any) -> tuple[Hashable, ...]:
    out: list[Hashable] = []
    leaves, treespec = pytree.tree_flatten(inputs)
    for leaf in leaves:
        if isinstance(leaf, torch.Tensor):
            out.append(("tensor", tuple(leaf.shape), leaf.dtype, leaf.device.type))
        else:
            out.append(_value(leaf, _DEPTH))
    return (str(treespec), *out)
