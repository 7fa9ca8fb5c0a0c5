"""Norm gains of a traced graph and whether they fold into the layers that read them.

An RMSNorm or LayerNorm *without* a gain commutes with orthogonal maps of its input (LayerNorm's
only if they keep the all-ones direction, since it subtracts the mean), but ``γ ⊙ x`` commutes with
no map other than a permutation. When every reader of ``γ ⊙ x (+ β)`` is a linear layer, ``γ``
folds into those layers' input columns (SliceGPT, QuaRot), after which the norm is gain-free. This
module finds each gain, what reads it, and why it cannot be folded where it cannot;
:mod:`permerge.reparam` does the folding on state dicts.

Recognised: ``layer_norm`` / ``native_layer_norm`` (centred; weight and bias), ``rms_norm``, and a
written-out norm (Hugging Face LLaMA's RMSNorm): ``mul`` of a 1-D state tensor and a value of that
width, optionally followed by ``add`` of another (its bias); it counts as centred when a
``sub(x, mean(x, -1))`` precedes it.
"""

from __future__ import annotations

import operator
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import torch
from torch import fx

from permerge.graph.capture import STATE, Program
from permerge.graph.layers import LINEAR, Layer

__all__ = ["TRANSPOSES", "VIEWS", "Gain", "find_gains"]

aten = torch.ops.aten


@dataclass(frozen=True)
class Gain:
    """An elementwise gain ``γ`` (a 1-D state tensor) and what reads ``γ ⊙ x (+ β)``.

    Attributes:
        node: the graph node computing ``γ ⊙ x (+ β)``.
        gain, bias: state-dict keys of ``γ`` and of the bias added after it (LayerNorm's ``β``), if any.
        centred: the normalisation before the gain subtracts the mean of its input (LayerNorm).
        consumers: ``(weight key, input dim)`` of every linear layer reading the product.
        blocked: why ``γ`` cannot be folded into the consumers (None when it can).
    """

    node: str
    gain: str
    bias: str | None
    centred: bool
    consumers: tuple[tuple[str, int], ...]
    blocked: str | None = None


VIEWS = {
    aten.view.default, aten.reshape.default, aten._unsafe_view.default, aten.clone.default, aten.alias.default,
    aten.contiguous.default, aten._to_copy.default, aten.to.dtype, aten.to.dtype_layout, aten.to.device,
    aten.detach.default, aten.dropout.default, aten.unsqueeze.default, aten.squeeze.dim, aten.expand.default,
}  # fmt: skip
"""Ops that pass a tensor's values through unchanged, up to layout, dtype or a size-1 axis."""
TRANSPOSES = {aten.t.default, aten.numpy_T.default, aten.transpose.int, aten.permute.default}
"""Ops that only reorder a tensor's axes."""
_INDEXING = {aten.select.int, aten.slice.Tensor}
_IGNORED = {aten._assert_tensor_metadata.default}


def _width(node: Any) -> int | None:
    val = node.meta.get("val") if isinstance(node, fx.Node) else None
    return int(val.shape[-1]) if isinstance(val, torch.Tensor) and val.dim() else None


def _keeps_last_axis(user: fx.Node, width: int) -> bool:
    """Whether ``user`` maps each row along the last axis to a row, unchanged (views, casts, row picks)."""
    if _width(user) != width:
        return False
    if user.target in VIEWS:
        return True
    if user.target in _INDEXING:
        ndim = user.args[0].meta["val"].dim()
        return int(user.args[1]) % ndim != ndim - 1
    if user.target in (aten.transpose.int,):
        ndim = user.args[0].meta["val"].dim()
        return ndim - 1 not in {int(d) % ndim for d in user.args[1:3]}
    if user.target is aten.permute.default:
        return list(user.args[1])[-1] % len(user.args[1]) == len(user.args[1]) - 1
    return False


def _readers(start: fx.Node, width: int, layers: Mapping[str, Layer]) -> tuple[list[Layer], str | None]:
    """The linear layers reading ``start``'s rows through views and casts, or why some other node reads them."""
    found, todo, seen = [], [start], set()
    while todo:
        node = todo.pop()
        for user in node.users:
            if user.name in seen or user.target in _IGNORED:
                continue
            seen.add(user.name)
            layer = layers.get(user.name)
            if layer is not None and layer.op == LINEAR and layer.input == node.name:
                if not layer.rewritable:
                    return found, f"it feeds {user.name}, whose weight {layer.weight} is tied or computed"
                found.append(layer)
            elif user.op == "output":
                return found, "it is a model output"
            elif _keeps_last_axis(user, width):
                todo.append(user)
            else:
                return found, f"it feeds {user.name} ({user.target}), not only linear layers"
    return found, None


def _centred(node: fx.Node, depth: int = 12) -> bool:
    """Whether a ``sub(x, mean(x, -1))`` is among ``node``'s nearest ancestors."""
    todo, seen = [(node, 0)], set()
    while todo:
        n, d = todo.pop()
        if n.name in seen or d > depth:
            continue
        seen.add(n.name)
        if n.target is aten.sub.Tensor and len(n.args) > 1 and getattr(n.args[1], "target", None) is aten.mean.dim:
            return True
        todo += [(a, d + 1) for a in n.all_input_nodes]
    return False


def find_gains(program: Program, layers: tuple[Layer, ...]) -> tuple[Gain, ...]:
    """Every norm gain of ``program`` (see the module docstring), in graph order."""
    graph = program.graph
    placeholders = [n for n in graph.nodes if n.op == "placeholder"]
    keys = {n.name: key for n, (kind, key) in zip(placeholders, program.inputs) if kind == STATE}
    by_node = {layer.node: layer for layer in layers}
    out = []
    for node in graph.nodes:
        if node.op != "call_function":
            continue
        found = _gain_at(node, keys)
        if found is None:
            continue
        gain, bias, centred, result = found
        readers, blocked = _readers(result, _width(result) or -1, by_node)
        if blocked is None and any(len(n.users) != 1 for n in placeholders if keys.get(n.name) == gain):
            blocked = f"the gain {gain} is read elsewhere too"
        consumers = tuple((r.weight, 1 - r.weight_dim) for r in readers if r.weight is not None)
        out.append(Gain(result.name, gain, bias, centred, consumers, blocked))
    return tuple(out)


def _gain_at(node: fx.Node, keys: Mapping[str, str]) -> tuple[str, str | None, bool, fx.Node] | None:
    """``(gain key, bias key, centred, node holding γ⊙x+β)`` if ``node`` applies a norm gain."""
    key = lambda a: keys.get(a.name) if isinstance(a, fx.Node) else None  # noqa: E731
    if node.target in (aten.layer_norm.default, aten.native_layer_norm.default):
        gain = key(node.args[2]) if len(node.args) > 2 else None
        if gain is None:
            return None
        result = node
        if node.target is aten.native_layer_norm.default:
            result = next((u for u in node.users if u.target is operator.getitem and u.args[1] == 0), None)
            if result is None:
                return None
        return gain, key(node.args[3]) if len(node.args) > 3 else None, True, result
    if node.target is aten.rms_norm.default:
        gain = key(node.args[2]) if len(node.args) > 2 else None
        return None if gain is None else (gain, None, False, node)
    if node.target is aten.mul.Tensor and len(node.args) == 2:
        for i in (0, 1):
            g, x = node.args[i], node.args[1 - i]
            gain = key(g)
            if gain is None or g.meta["val"].dim() != 1 or _width(x) != g.meta["val"].shape[0] or key(x) is not None:
                continue
            users = [u for u in node.users if u.target not in _IGNORED]
            add = users[0] if len(users) == 1 and users[0].target is aten.add.Tensor else None
            bias = next((key(a) for a in (add.args if add else ()) if a is not node and key(a)), None)
            return gain, bias, _centred(x), add if bias else node
    return None
