"""Propagate channel spaces through a captured graph, asking the per-op rules at every node.

Generic: no op knowledge lives here. A node without a rule (or whose rule gives up) freezes every
space it touches — the identity is always safe, a wrong tie is a silent bug — and the reason is
recorded; with ``strict=True`` it raises instead.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from torch import fx

from permerge.errors import TraceError
from permerge.graph.capture import Captured
from permerge.graph.norms import TRANSPOSES, VIEWS
from permerge.graph.rules import RULES, Call, Dims, Rule, rule_for
from permerge.graph.spaces import Cap, Spaces, Why, meet_bounds
from permerge.graph.spaces import tensor_dims as _tensor_dims
from permerge.spec import INVERTIBLE, PERMUTATION, FrozenKind

LOG = logging.getLogger(__name__)

__all__ = ["Propagation", "propagate"]


@dataclass(frozen=True)
class Propagation:
    spaces: Spaces
    param_dims: Mapping[str, Dims]  # state-dict key (canonical) → space of each axis
    live: frozenset[int]  # spaces seen on some activation (roots at the end of the run)
    values: Mapping[str, Any]  # node name → spaces of its output (activation sites)
    consumer_axes: frozenset[tuple[str, int]]  # parameter axes that read an input (linear's dim 1)
    unknown: Mapping[str, int]  # op → number of nodes frozen for lack of a rule
    producer_axes: frozenset[tuple[str, int]] = frozenset()  # parameter axes that make an output (not read by it)
    duals: tuple[tuple[int, str, str, int], ...] = ()  # (capture, query node, key node, space) of q·kᵀ products


def _arg_nodes(node: fx.Node) -> list[fx.Node]:
    out: list[fx.Node] = []
    fx.node.map_arg((node.args, node.kwargs), lambda n: out.append(n) or n)
    return out


def propagate(
    caps: Sequence[Captured], rules: Mapping[object, Rule] | None = None, strict: bool = False
) -> Propagation:
    """Run every node's rule in graph order, over every captured call; one set of spaces for all.

    Several captures (the same model exported under other example calls: other keyword arguments,
    train mode) share their parameters' spaces, so their constraints add up: a unit may move only if
    it may move under every call. A parameter no call reads is frozen (UNREACHED): nothing shows how
    its axes relate to the rest. Activation sites (``values``) come from the first capture.
    """
    table = {**RULES, **(rules or {})}
    spaces = Spaces()
    param_dims: dict[str, Dims] = {}
    reached: set[str] = set()
    unknown: dict[str, int] = {}
    consumers: set[tuple[str, int]] = set()
    producers: set[tuple[str, int]] = set()
    duals: list[tuple[int, str, str, int]] = []
    live: set[int] = set()
    values: dict[str, Any] = {}
    for i, cap in enumerate(caps):
        env = _propagate_one(i, cap, table, strict, spaces, param_dims, reached, unknown, (consumers, producers), duals)
        live |= {spaces.find(s) for v in env.values() for d in _tensor_dims(v) for s in d}
        if i == 0:
            values = {n.name: v for n, v in env.items() if n.op == "call_function"}
    # tensors with an axis of length > 1 that no call reads (scalars such as BN counters cannot move anyway)
    unreached = [k for k, dims in param_dims.items() if k not in reached and any(spaces.size[d] > 1 for d in dims)]
    for key in unreached:
        for s in param_dims[key]:
            spaces.freeze(s, Why(FrozenKind.UNREACHED, f"{key} is not read by the traced forward"))
    if unreached:
        LOG.warning(
            "%d tensors are not read by the traced forward and stay unpermuted (%s%s); code paths that use "
            "them (other arguments, input shapes) may compute differently after permuting: pass "
            "extra_examples=[permerge.graph.Example(args, kwargs)] for those calls",
            len(unreached), ", ".join(unreached[:3]), ", …" if len(unreached) > 3 else "",
        )  # fmt: skip
    live = {spaces.find(s) for s in live}
    return Propagation(
        spaces, param_dims, frozenset(live), values, frozenset(consumers), unknown, frozenset(producers), tuple(duals)
    )


def _propagate_one(
    i: int, cap: Captured, table: Mapping[object, Rule], strict: bool, spaces: Spaces, param_dims: dict[str, Dims],
    reached: set[str], unknown: dict[str, int], roles: tuple[set[tuple[str, int]], set[tuple[str, int]]],
    duals: list[tuple[int, str, str, int]],
) -> dict[fx.Node, Any]:  # fmt: skip
    env: dict[fx.Node, Any] = {}
    params = {name: cap.aliases.get(key, (key,))[0] for name, key in cap.params.items()}  # node → canonical key
    for node in cap.graph.nodes:
        val = node.meta.get("val")
        if node.op == "placeholder":
            if node.name in cap.params:
                key = cap.params[node.name]
                canon = cap.aliases.get(key, (key,))[0]  # tied weights: one tensor, one set of spaces
                dims = tuple(spaces.new(int(n)) for n in val.shape)
                if canon in param_dims:
                    dims = tuple(spaces.union(a, b) for a, b in zip(param_dims[canon], dims))
                param_dims[canon] = dims
                if node.users:
                    reached.add(canon)
                env[node] = dims
            else:
                why = cap.frozen_inputs.get(node.name, Why(FrozenKind.MODEL_INPUT, f"input {node.name}"))
                env[node] = spaces.like(val, why)
            continue
        if node.op == "output":
            outs = node.args[0]
            for i in cap.program.user_outputs:
                for d in _tensor_dims(env.get(outs[i]) if isinstance(outs[i], fx.Node) else None):
                    for s in d:
                        spaces.freeze(s, Why(FrozenKind.MODEL_OUTPUT, "model output"))
            continue
        if node.op != "call_function":
            env[node] = None
            continue
        rule = rule_for(node.target, table)
        call = Call(node, spaces, env)
        try:
            if rule is None:
                raise NotImplementedError("no rule")
            env[node] = rule(call)
        except Exception as e:  # a rule that gives up must never leave a wrong tie behind
            env[node] = _frozen_node(node, spaces, env, e, unknown, strict)
        else:
            if node.target in _VIEWS_OF_PARAMS and node.args and getattr(node.args[0], "name", None) in params:
                params[node.name] = params[node.args[0].name]  # Wᵀ read by a linear layer is still W
            consumers, producers = _roles(node, env, spaces, params, param_dims)
            roles[0].update(consumers)
            roles[1].update(producers)
            _bound(call, env[node], (i, node.name))
            duals.extend((i, q.name, k.name, s) for q, k, s in call.duals)
    return env


def _bound(c: Call, out: Any, where: tuple[int, str]) -> None:
    """Bound the class of every space the node touched by what its rule allowed (permutations
    where it said nothing)."""
    sp = c.spaces
    allowed: dict[int, tuple[str, str | None]] = {}
    for s, bound in c.allowed.items():
        r = sp.find(s)
        allowed[r] = bound if r not in allowed else meet_bounds(allowed[r], bound)
    touched = {sp.find(s) for a in _arg_nodes(c.node) for d in _tensor_dims(c.env.get(a)) for s in d}
    touched |= {sp.find(s) for d in _tensor_dims(out) for s in d}
    for r in touched:
        cls, folded = allowed.get(r, (PERMUTATION, None))
        if (cls, folded) != (INVERTIBLE, None):
            sp.cap(r, Cap(cls, folded, where))


def _roles(
    node: fx.Node, env: dict[fx.Node, Any], spaces: Spaces, params: Mapping[str, str], param_dims: Mapping[str, Dims]
) -> tuple[set[tuple[str, int]], set[tuple[str, int]]]:
    """Axes of the node's parameters (or of views of them) tied to an input activation but not to
    its output (consumers), and tied to its output but not to an input (producers).

    A linear's weight dim 1 reads the input features (consumer); dim 0 and the bias make the
    output (producer). Partial merging (PLeaS) needs to know which is which; an axis that is both
    (a tied embedding and output layer) can only take maps with ``M = M⁻ᵀ``.
    """
    out = {spaces.find(s) for d in _tensor_dims(env.get(node)) for s in d}
    args = _arg_nodes(node)
    acts = {spaces.find(s) for a in args if a.name not in params for d in _tensor_dims(env.get(a)) for s in d}
    consumers, producers = set(), set()
    for a in args:
        key = params.get(a.name)
        if key is None:
            continue
        roots = [spaces.find(s) for s in param_dims[key]]
        for s in env[a] if isinstance(env.get(a), tuple) else ():
            r = spaces.find(s)
            for dim in (d for d, root in enumerate(roots) if root == r):
                if r in acts and r not in out:
                    consumers.add((key, dim))
                elif r in out and r not in acts:
                    producers.add((key, dim))
    return consumers, producers


_VIEWS_OF_PARAMS = VIEWS | TRANSPOSES  # a parameter seen through these is still that parameter


def _frozen_node(
    node: fx.Node, spaces: Spaces, env: dict[fx.Node, Any], err: Exception, unknown: dict[str, int], strict: bool
) -> Any:
    target = str(node.target)
    no_rule = str(err) == "no rule"
    why = "no rule for this op" if no_rule else f"rule failed: {type(err).__name__}: {err}"
    touched = [s for a in _arg_nodes(node) for d in _tensor_dims(env.get(a)) for s in d]
    channels = [s for s in touched if not spaces.is_frozen(s) and spaces.size[spaces.find(s)] > 1 and spaces.find(s) in spaces.units]
    if strict and channels:
        stack = node.meta.get("stack_trace") or ""
        where = stack.strip().splitlines()[-2:] if stack else []
        raise TraceError(
            f"node {node.name} ({target}): {why}. It touches channel axes, which would be frozen. "
            f"{' '.join(x.strip() for x in where)} Register a rule with "
            "permerge.graph.register_rule, or trace with strict=False to freeze them."
        ) from err
    reason = Why(FrozenKind.NO_RULE if no_rule else FrozenKind.RULE_ERROR, f"{target} at node {node.name}: {why}")
    for s in touched:
        spaces.freeze(s, reason)
    if channels:
        unknown[target] = unknown.get(target, 0) + 1
        LOG.info("froze %d axes at %s (%s)", len(channels), node.name, why)
    return spaces.like(node.meta.get("val"), Why(reason.kind, f"output of {reason.text}"))
