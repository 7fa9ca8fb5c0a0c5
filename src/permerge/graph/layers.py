"""Layer semantics: the affine layers and norms of a traced graph, from one registry of small rules.

Channel rules (:mod:`permerge.graph.rules`) say which axes move together; the rules here say what a
layer *is*: which state-dict tensors are its weight and bias, along which axes its output channels
run, what it reads, and which BatchNorm follows it. REPAIR's sites, PLeaS's fittable layers and
anything else that rewrites one layer's weights are filters over :func:`find_layers`' result, so no
other module reads ATen node internals.

Register a rule for another op with :func:`register_layer_rule`: ``rule(node, ctx) -> Layer | None``.
"""

from __future__ import annotations

import operator
from collections.abc import Callable, Mapping
from dataclasses import dataclass, replace
from typing import Any

import torch
from torch import fx

from permerge.graph.capture import Captured

__all__ = [
    "BATCH_NORM", "CONV", "CONV_TRANSPOSE", "GROUP_NORM", "LAYER_NORM", "LAYER_RULES", "LINEAR", "NORMS",
    "Layer", "LayerContext", "find_layers", "register_layer_rule",
]  # fmt: skip

aten = torch.ops.aten

LINEAR, CONV, CONV_TRANSPOSE = "linear", "conv", "conv_transpose"
BATCH_NORM, LAYER_NORM, GROUP_NORM = "batch_norm", "layer_norm", "group_norm"
NORMS = frozenset({BATCH_NORM, LAYER_NORM, GROUP_NORM})


@dataclass(frozen=True)
class Layer:
    """One affine layer or norm: node ``node`` computes ``weight · input (+ bias)`` per channel.

    Attributes:
        node: the graph node; its output (element ``output_index`` of it, for ops returning tuples)
            holds the channels along ``channel_dim``.
        op: ``linear`` (also ``addmm`` / GPT-2's ``Conv1D``), ``conv``, ``conv_transpose`` or a norm.
        input: the node whose value the layer reads (its activation input).
        weight, bias: state-dict keys (None when absent or not a state-dict tensor).
        weight_dim: the weight's output-channel axis (1 for ``conv_transpose`` and ``Conv1D``).
        running: a BatchNorm's ``(running_mean, running_var)`` keys.
        eps: a norm's epsilon.
        groups: a convolution's groups; ``normalized_dims``: how many trailing axes a LayerNorm spans.
        conv: a convolution's ``(stride, padding, dilation)``, one entry per spatial axis.
        norm: the inference-mode BatchNorm node that is this layer's only user, if any.
        shared: the weight or bias is tied or read by another node too (not rewritable alone).
        computed: the weight or bias is computed in the graph (weight standardisation, a bias
            derived from other tensors), not a state-dict tensor.
        output: the layer's value is a model output.
    """

    node: str
    op: str
    input: str | None
    weight: str | None
    bias: str | None
    channel_dim: int
    weight_dim: int = 0
    output_index: int | None = None
    running: tuple[str, str] | None = None
    eps: float | None = None
    groups: int = 1
    normalized_dims: int = 1
    conv: tuple[tuple[int, ...], tuple[int, ...], tuple[int, ...]] | None = None
    norm: str | None = None
    shared: bool = False
    computed: bool = False
    output: bool = False

    @property
    def rewritable(self) -> bool:
        """Whether the weight (and bias) are state-dict tensors that only this layer reads."""
        return self.weight is not None and not (self.shared or self.computed)


@dataclass(frozen=True)
class LayerContext:
    """What a layer rule may look at: which placeholders are state-dict tensors, how often each is read."""

    params: Mapping[str, str]  # placeholder name → state-dict key
    reads: Mapping[str, int]  # state-dict key → number of nodes reading it (tied aliases summed)

    def key(self, arg: Any) -> str | None:
        """The state-dict key of ``arg`` if it is a weight/buffer placeholder, else None."""
        return self.params.get(arg.name) if isinstance(arg, fx.Node) else None

    def computed(self, *args: Any) -> bool:
        """Whether any of ``args`` is a tensor computed in the graph rather than a state-dict tensor."""
        return any(isinstance(a, fx.Node) and a.name not in self.params for a in args)


LayerRule = Callable[[fx.Node, LayerContext], "Layer | None"]
LAYER_RULES: dict[Any, LayerRule] = {}
"""ATen overload (or overload packet) → rule returning the node's :class:`Layer`, or None."""


def register_layer_rule(*ops: Any) -> Callable[[LayerRule], LayerRule]:
    """Register ``rule(node, ctx) -> Layer | None`` for ATen ``ops`` (overloads or packets)."""

    def deco(fn: LayerRule) -> LayerRule:
        for op in ops:
            LAYER_RULES[op] = fn
        return fn

    return deco


def _arg(node: fx.Node, i: int, name: str, default: Any = None) -> Any:
    return node.args[i] if len(node.args) > i else node.kwargs.get(name, default)


def _name(a: Any) -> str | None:
    return a.name if isinstance(a, fx.Node) else None


def _geometry(node: fx.Node, first: int, spatial: int) -> tuple[tuple[int, ...], ...]:
    def per_axis(v: Any) -> tuple[int, ...]:
        v = tuple(v) if isinstance(v, (list, tuple)) else (v,)
        return tuple(int(x) for x in (v * spatial if len(v) == 1 else v))

    names = ("stride", "padding", "dilation")
    defaults = (1, 0, 1)
    return tuple(per_axis(_arg(node, first + i, n, d)) for i, (n, d) in enumerate(zip(names, defaults)))  # type: ignore[return-value]


@register_layer_rule(aten.linear.default)
def _linear(node: fx.Node, ctx: LayerContext) -> Layer | None:
    w, b = node.args[1], _arg(node, 2, "bias")
    return Layer(node.name, LINEAR, _name(node.args[0]), ctx.key(w), ctx.key(b), -1, computed=ctx.computed(w, b))


@register_layer_rule(aten.addmm.default)
def _addmm(node: fx.Node, ctx: LayerContext) -> Layer | None:
    """``bias + x @ W``: GPT-2's ``Conv1D`` (W is (in, out)) or a linear written with ``t(W)``."""
    bias, x, mat2 = node.args[0], node.args[1], node.args[2]
    if node.kwargs.get("beta", 1) != 1 or node.kwargs.get("alpha", 1) != 1:
        return None
    if ctx.key(mat2) is not None:
        return Layer(node.name, LINEAR, _name(x), ctx.key(mat2), ctx.key(bias), -1, weight_dim=1, computed=ctx.computed(bias))
    transposed = isinstance(mat2, fx.Node) and len(mat2.users) == 1 and (
        mat2.target in (aten.t.default, aten.numpy_T.default)
        or (mat2.target == aten.transpose.int and sorted(d % 2 for d in mat2.args[1:3]) == [0, 1])
        or (mat2.target == aten.permute.default and list(mat2.args[1]) == [1, 0])
    )  # fmt: skip
    if transposed and ctx.key(mat2.args[0]) is not None:
        return Layer(node.name, LINEAR, _name(x), ctx.key(mat2.args[0]), ctx.key(bias), -1, computed=ctx.computed(bias))
    return None


_CONV_RANK = {aten.conv1d.default: 1, aten.conv2d.default: 2, aten.conv3d.default: 3}


@register_layer_rule(*_CONV_RANK)
def _conv(node: fx.Node, ctx: LayerContext) -> Layer | None:
    w, b = node.args[1], _arg(node, 2, "bias")
    return Layer(
        node.name, CONV, _name(node.args[0]), ctx.key(w), ctx.key(b), 1, groups=int(_arg(node, 6, "groups", 1)),
        conv=_geometry(node, 3, _CONV_RANK[node.target]), computed=ctx.computed(w, b),
    )  # fmt: skip


@register_layer_rule(aten.conv_transpose1d.default, aten.conv_transpose2d.input, aten.conv_transpose3d.input)
def _conv_transpose(node: fx.Node, ctx: LayerContext) -> Layer | None:
    w, b = node.args[1], _arg(node, 2, "bias")
    return Layer(
        node.name, CONV_TRANSPOSE, _name(node.args[0]), ctx.key(w), ctx.key(b), 1, weight_dim=1,
        groups=int(_arg(node, 6, "groups", 1)), computed=ctx.computed(w, b),
    )  # fmt: skip


@register_layer_rule(aten.batch_norm.default)
def _batch_norm(node: fx.Node, ctx: LayerContext) -> Layer | None:
    if _arg(node, 5, "training") is not False:
        return None  # a train-mode export: no inference form to fold into
    mean, var = ctx.key(_arg(node, 3, "running_mean")), ctx.key(_arg(node, 4, "running_var"))
    w, b = _arg(node, 1, "weight"), _arg(node, 2, "bias")
    return Layer(
        node.name, BATCH_NORM, _name(node.args[0]), ctx.key(w), ctx.key(b), 1,
        running=(mean, var) if mean and var else None, eps=float(_arg(node, 7, "eps", 1e-5)), computed=ctx.computed(w, b),
    )  # fmt: skip


@register_layer_rule(aten._native_batch_norm_legit_no_training.default)
def _native_batch_norm(node: fx.Node, ctx: LayerContext) -> Layer | None:
    mean, var = ctx.key(node.args[3]), ctx.key(node.args[4])
    w, b = node.args[1], node.args[2]
    return Layer(
        node.name, BATCH_NORM, _name(node.args[0]), ctx.key(w), ctx.key(b), 1, output_index=0,
        running=(mean, var) if mean and var else None, eps=float(_arg(node, 6, "eps", 1e-5)), computed=ctx.computed(w, b),
    )  # fmt: skip


@register_layer_rule(aten.layer_norm.default)
def _layer_norm(node: fx.Node, ctx: LayerContext) -> Layer | None:
    w, b = _arg(node, 2, "weight"), _arg(node, 3, "bias")
    return Layer(
        node.name, LAYER_NORM, _name(node.args[0]), ctx.key(w), ctx.key(b), -1, eps=float(_arg(node, 4, "eps", 1e-5)),
        normalized_dims=len(node.args[1]), computed=ctx.computed(w, b),
    )  # fmt: skip


@register_layer_rule(aten.native_layer_norm.default)
def _native_layer_norm(node: fx.Node, ctx: LayerContext) -> Layer | None:
    w, b = node.args[2], node.args[3]
    return Layer(
        node.name, LAYER_NORM, _name(node.args[0]), ctx.key(w), ctx.key(b), -1, output_index=0, eps=float(node.args[4]),
        normalized_dims=len(node.args[1]), computed=ctx.computed(w, b),
    )  # fmt: skip


@register_layer_rule(aten.group_norm.default)
def _group_norm(node: fx.Node, ctx: LayerContext) -> Layer | None:
    w, b = _arg(node, 2, "weight"), _arg(node, 3, "bias")
    return Layer(
        node.name, GROUP_NORM, _name(node.args[0]), ctx.key(w), ctx.key(b), 1, groups=int(node.args[1]),
        eps=float(_arg(node, 4, "eps", 1e-5)), computed=ctx.computed(w, b),
    )  # fmt: skip


@register_layer_rule(aten.native_group_norm.default)
def _native_group_norm(node: fx.Node, ctx: LayerContext) -> Layer | None:
    w, b = node.args[1], node.args[2]
    return Layer(
        node.name, GROUP_NORM, _name(node.args[0]), ctx.key(w), ctx.key(b), 1, output_index=0, groups=int(node.args[6]),
        eps=float(node.args[7]), computed=ctx.computed(w, b),
    )  # fmt: skip


def _rule_for(target: Any) -> LayerRule | None:
    return LAYER_RULES.get(target) or LAYER_RULES.get(getattr(target, "overloadpacket", None))


def _feeds_output(node: fx.Node) -> bool:
    return any(u.op == "output" for u in node.users) or any(
        u.target is operator.getitem and any(v.op == "output" for v in u.users) for u in node.users
    )


def _only_user(node: fx.Node) -> fx.Node | None:
    """The one node reading ``node``'s value (through ``getitem 0`` for tuple-valued ops)."""
    users = list(node.users)
    if len(users) != 1:
        return None
    u = users[0]
    return u if u.args and u.args[0] is node else None


def find_layers(cap: Captured) -> tuple[Layer, ...]:
    """Every node a layer rule recognises, in graph (topological) order.

    ``shared`` is set where the weight or bias is tied or read by another node; ``norm`` where an
    inference-mode BatchNorm is the layer's only user (so a refit can be measured after it).
    """
    reads: dict[str, int] = {}
    for n in cap.graph.nodes:
        if n.op == "placeholder" and n.name in cap.params:
            key = cap.params[n.name]
            canon = cap.aliases.get(key, (key,))[0]
            reads[canon] = reads.get(canon, 0) + len(n.users)
    canon_reads = {k: reads.get(cap.aliases.get(k, (k,))[0], 0) for k in cap.params.values()}
    ctx = LayerContext(cap.params, canon_reads)
    found: dict[str, Layer] = {}
    for n in cap.graph.nodes:
        rule = _rule_for(n.target) if n.op == "call_function" else None
        layer = rule(n, ctx) if rule is not None else None
        if layer is None:
            continue
        shared = any(
            k is not None and (canon_reads.get(k, 0) != 1 or len(cap.aliases.get(k, (k,))) > 1)
            for k in (layer.weight, layer.bias)
        )
        found[n.name] = replace(layer, shared=shared, output=_feeds_output(n))
    out = []
    for n in cap.graph.nodes:
        layer = found.get(n.name)
        if layer is None:
            continue
        user = _only_user(n)
        nxt = found.get(user.name) if user is not None else None
        if layer.op not in NORMS and nxt is not None and nxt.op == BATCH_NORM and nxt.input == n.name:
            layer = replace(layer, norm=nxt.node)
        out.append(layer)
    return tuple(out)
