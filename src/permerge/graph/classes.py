"""Symmetry classes of traced groups: the largest class of maps every op touching a group commutes with.

Each rule bounds the spaces its op touches (:meth:`permerge.graph.rules.Call.allow`; permutations
where it says nothing), and :mod:`permerge.graph.propagate` records the bounds per space. Here they
meet into one class per group (permutation ⊂ scaled permutation, orthogonal ⊂ invertible), after
the facts only the whole graph shows:

* **norm gains**: a norm commutes with orthogonal maps only once its gain is folded into the linear
  layers reading it (:func:`permerge.graph.norms.find_gains` says where it cannot be);
* **tied axes**: a parameter axis that both makes and reads a group's units (an embedding tied to
  the output layer) takes ``M`` and ``M⁻ᵀ`` at once, so only maps with ``M = M⁻ᵀ``: orthogonal;
* **query·key products**: ``q·kᵀ`` keeps ``W_Q·M`` and ``W_K·M⁻ᵀ``, so the key projection's output
  axes are marked ``dual``. Both sides must come straight (through views) from their own linear
  layers; a packed q/k/v projection, a rotary embedding or a norm in between keeps permutations.
"""

from __future__ import annotations

import operator
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import torch
from torch import fx

from permerge.graph.capture import Captured
from permerge.graph.layers import LINEAR, Layer
from permerge.graph.norms import TRANSPOSES, VIEWS, find_gains
from permerge.graph.propagate import Propagation
from permerge.graph.rules import rule_key
from permerge.spec import INVERTIBLE, ORTHOGONAL, PERMUTATION, Axis, meet

__all__ = ["Classes", "symmetry_classes"]

aten = torch.ops.aten


Side = frozenset[tuple[str, int, int, int]]
"""A projection's output axes: ``(key, dim, lo, hi)`` — positions ``lo ≤ p < hi`` of that axis (a
slice of a packed q/k/v projection)."""


@dataclass(frozen=True)
class Classes:
    """Each free leaf space's symmetry class (by root id) and, for query·key spaces, the query and
    key projections' axes."""

    of: Mapping[int, str]
    pairs: Mapping[int, tuple[Side, Side]]

    def __call__(self, root: int) -> str:
        return self.of.get(root, INVERTIBLE)

    def side(self, root: int, ax: Axis, n: int) -> str | None:
        """``"key"`` or ``"query"`` for a member of a query·key space, ``"other"`` for a member that
        is neither (the space then keeps permutations), None for a space that is no query·key space."""
        pair = self.pairs.get(root)
        if pair is None:
            return None
        inside = [any(k == ax.key and d == ax.dim and lo <= ax.offset and ax.extent(n) <= hi for k, d, lo, hi in side)
                  for side in pair]  # fmt: skip
        return "other" if inside[0] == inside[1] else "key" if inside[1] else "query"


def symmetry_classes(prop: Propagation, caps: Sequence[Captured], layers: Sequence[tuple[Layer, ...]]) -> Classes:
    """Meet every recorded bound of each space, with the graph-wide facts of the module docstring;
    ``layers[i]`` are capture ``i``'s layers (:func:`~permerge.graph.layers.find_layers`)."""
    sp = prop.spaces
    graphs = [({n.name: n for n in cap.graph.nodes}, {layer.node: layer for layer in found}) for cap, found in zip(caps, layers)]
    folded = _folded_gains(caps, graphs)
    of: dict[int, str] = {}
    for root, bounds in sp.caps.items():
        cls = INVERTIBLE
        for b in bounds:
            cls = meet(cls, b.if_folded if b.if_folded is not None and b.where in folded else b.cls)
        of[root] = cls

    def bound(s: int, cls: str) -> None:
        for leaf in sp.leaves(s):
            of[leaf] = meet(of.get(leaf, INVERTIBLE), cls)

    for key, dim in prop.consumer_axes & prop.producer_axes:
        bound(prop.param_dims[key][dim], ORTHOGONAL)
    pairs: dict[int, tuple[Side, Side]] = {}
    for i, q, k, s in prop.duals:
        sides = [_projection(*graphs[i], name) for name in (q, k)]
        if sides[0] is None or sides[1] is None or sides[0] & sides[1]:
            bound(s, PERMUTATION)
            continue
        for leaf in sp.leaves(s):
            old = pairs.get(leaf, (frozenset(), frozenset()))
            pairs[leaf] = (old[0] | sides[0], old[1] | sides[1])
    return Classes(of, pairs)


_Graph = tuple[Mapping[str, fx.Node], Mapping[str, Layer]]


def _folded_gains(caps: Sequence[Captured], graphs: Sequence[_Graph]) -> set[tuple[int, str]]:
    """``(capture, node)`` of every norm applying a gain that folds into the layers reading it."""
    out: set[tuple[int, str]] = set()
    for i, (cap, (nodes, layers)) in enumerate(zip(caps, graphs)):
        for g in find_gains(cap.program, tuple(layers.values())):
            if g.blocked is None:
                node = nodes[g.node]
                out |= {(i, g.node)} | {(i, a.name) for a in node.all_input_nodes if node.target is operator.getitem}
    return out


_SPLITS = (aten.split, aten.split_with_sizes, aten.chunk, aten.unsafe_split)


def _projection(nodes: Mapping[str, fx.Node], layers: Mapping[str, Layer], name: str) -> Side | None:
    """The output axes of the linear layer whose output reaches node ``name`` through views,
    transposes, scalings by constants and slices of its last axis only (None otherwise)."""
    node, lo, hi = nodes[name], 0, None  # node's last axis is positions [lo, hi) of the layer's output
    while node.name not in layers:
        src = node.args[0] if node.args else None
        if not isinstance(src, fx.Node):
            return None
        op = rule_key(node.target)
        part = _last_axis_part(node, op)
        if part is not None:  # a slice of the last axis: positions shift by where it starts
            start, size = part
            lo, hi = start + lo, start + (size if hi is None else hi)
            node = src.args[0] if op is operator.getitem else src
            continue
        if op is operator.getitem or (hi is not None and not _keeps_last_axis(node)):
            return None
        if hi is None and not _passes(node, op):
            return None
        node = src
    layer = layers[node.name]
    if layer.op != LINEAR or layer.weight is None or layer.shared or layer.computed:
        return None
    hi = 1 << 62 if hi is None else hi
    return frozenset({(layer.weight, layer.weight_dim, lo, hi)} | ({(layer.bias, 0, lo, hi)} if layer.bias else set()))


def _shape(node: object) -> tuple[int, ...] | None:
    val = node.meta.get("val") if isinstance(node, fx.Node) else None
    return tuple(int(n) for n in val.shape) if isinstance(val, torch.Tensor) else None


def _last_axis_part(node: fx.Node, op: object) -> tuple[int, int] | None:
    """``(start, size)`` when ``node`` takes a contiguous part of its input's last axis (a slice, or
    one output of a split along it), else None."""
    if op is operator.getitem:
        split = node.args[0]
        if not isinstance(split, fx.Node) or rule_key(split.target) not in _SPLITS:
            return None
        x, parts = _shape(split.args[0]), split.meta.get("val")
        dim = split.args[2] if len(split.args) > 2 else split.kwargs.get("dim", 0)
        if x is None or int(dim) % len(x) != len(x) - 1:
            return None
        sizes = [int(t.shape[-1]) for t in parts]
        return sum(sizes[: node.args[1]]), sizes[node.args[1]]
    if op is aten.slice:
        x, out = _shape(node.args[0]), _shape(node)
        args = list(node.args[1:])
        dim, start, step = (args + [0])[0], (args[1:2] + [None])[0] or 0, (args[3:4] + [1])[0]
        if x is None or out is None or int(dim) % len(x) != len(x) - 1 or step != 1 or x == out:
            return None
        return (start % x[-1] if start < 0 else min(start, x[-1])), out[-1]
    return None


def _keeps_last_axis(node: fx.Node) -> bool:
    """A view or cast that leaves the last axis as it is (between a slice and its layer)."""
    x, out = _shape(node.args[0]), _shape(node)
    return node.target in VIEWS and x is not None and out is not None and x[-1] == out[-1]


def _passes(node: fx.Node, op: object) -> bool:
    """Views, transposes, whole slices and scalings by a constant: the layer's output units pass."""
    scaled = op in (aten.mul, aten.div) and len(node.args) == 2 and not isinstance(node.args[1], fx.Node)
    whole = op is aten.slice and _shape(node) == _shape(node.args[0])
    return node.target in VIEWS or node.target in TRANSPOSES or scaled or whole
