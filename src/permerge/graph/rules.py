"""Per-op channel rules: one small function per ATen op, registered in :data:`RULES`.

A rule receives a :class:`Call` (the node, its arguments' channel spaces and shapes) and returns
the spaces of the node's output: a tuple of space ids per output tensor (a list of those for ops
returning several tensors, ``None`` for no tensor). It ties spaces that must move together
(``union``), splits them (``refine``) and freezes what it cannot keep equivariant. An op with no
rule freezes every space it touches — see :mod:`permerge.graph.propagate`.

A rule also states which maps beyond permutations its op commutes with (``allow``; ``linear`` for
ops linear in every space they touch): every space it touches and does not mention is bounded to
permutations, so an op (or a user's rule) that says nothing allows only what it provably does. The
bounds meet into each group's symmetry class in :mod:`permerge.graph.classes`.

Rules are keyed by ``torch.ops.aten.<op>`` overload packets (torch.export's ATen graph), so the
vocabulary is small; register your own with :func:`register_rule`.
"""

from __future__ import annotations

import operator
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import fx

from permerge.graph.spaces import PROD, SUM, Spaces, Why, meet_bounds, tensor_dims
from permerge.spec import INVERTIBLE, ORTHOGONAL, PERMUTATION, SCALED_PERMUTATION, FrozenKind

__all__ = ["RULES", "Call", "Dims", "register_rule"]

aten = torch.ops.aten
Dims = tuple[int, ...]
Rule = Callable[["Call"], Any]

RULES: dict[object, Rule] = {}


def register_rule(*targets: object) -> Callable[[Rule], Rule]:
    """Register ``fn`` as the rule for ATen overload packets / callables ``targets``.

    Example:
        >>> @register_rule(torch.ops.aten.my_pointwise)      # doctest: +SKIP
        ... def _my_pointwise(c):
        ...     return c.dims(c.arg(0))
    """

    def deco(fn: Rule) -> Rule:
        for t in targets:
            RULES[t] = fn
        return fn

    return deco


def rule_key(target: object) -> object:
    """The registry key of a node target (ATen overloads share their packet's rule)."""
    return getattr(target, "overloadpacket", target)


def rule_for(target: object, table: Mapping[object, Rule]) -> Rule | None:
    """The rule for a node's ``target`` (an ATen overload or any callable), or None.

    Resolved from ATen's own metadata rather than one entry per spelling: ``table``'s rule for
    the op's packet; else, for an in-place variant (``hardswish_``, ``__iand__``), its functional
    op's rule; else, for an op ATen tags ``pointwise`` (and not randomly seeded), elementwise
    broadcasting. When the schema says the result aliases an argument it writes (in-place and
    ``out=`` variants), that argument's axes are tied to the result's.
    """
    rule = table.get(rule_key(target))
    if not isinstance(target, torch._ops.OpOverload):
        return rule
    if rule is None:
        rule = table.get(_functional(target))
    if rule is None and torch.Tag.pointwise in target.tags and torch.Tag.nondeterministic_seeded not in target.tags:
        rule = _elementwise
    written = _written(target._schema)
    return _writing(rule, written) if rule is not None and written else rule


def _functional(op: torch._ops.OpOverload) -> object:
    """The overload packet of an in-place op's functional form (``relu_`` → ``relu``), or None."""
    ns, name = op._schema.name.split("::")
    if name.startswith("__i") and name.endswith("__"):
        base = "__" + name[3:]
    elif name.endswith("_") and not name.endswith("__"):
        base = name[:-1]
    else:
        return None
    return getattr(getattr(torch.ops, ns), base, None)


def _written(schema: torch.FunctionSchema) -> tuple[tuple[int, int, str], ...]:
    """(result index, argument position, argument name) for results aliasing a written argument."""
    args = {
        frozenset(a.alias_info.before_set): (i, a.name)
        for i, a in enumerate(schema.arguments)
        if a.alias_info is not None and a.alias_info.is_write
    }
    out = []
    for j, r in enumerate(schema.returns):
        if r.alias_info is not None and r.alias_info.is_write and frozenset(r.alias_info.before_set) in args:
            out.append((j, *args[frozenset(r.alias_info.before_set)]))
    return tuple(out)


def _writing(rule: Rule, written: tuple[tuple[int, int, str], ...]) -> Rule:
    """``rule``, then the written arguments' axes tied to the results that alias them."""

    def writes(c: Call) -> Any:
        out = rule(c)
        results = out if isinstance(out, list) else [out]
        for j, pos, name in written:
            arg, res = c.arg(pos, name), results[j] if j < len(results) else None
            if not (c.is_tensor(arg) and isinstance(res, tuple) and len(res) == len(c.dims(arg))):
                return c.unsupported("result does not match the argument it writes")
            results[j] = tuple(c.union(a, b) for a, b in zip(c.dims(arg), res))
        return results if isinstance(out, list) else results[0]

    return writes


@dataclass(frozen=True)
class Call:
    """One node as a rule sees it: arguments by position/name, their spaces and shapes."""

    node: fx.Node
    spaces: Spaces
    env: dict[fx.Node, Any]
    allowed: dict[int, tuple[str, str | None]] = field(default_factory=dict)  # space → (class, if folded)
    duals: list[tuple[fx.Node, fx.Node, int]] = field(default_factory=list)  # (query, key, their shared space)

    def allow(self, cls: str, *spaces: int, if_folded: str | None = None) -> None:
        """State that this op commutes with maps of class ``cls`` on ``spaces`` (``if_folded``: the
        class once the norm gain this node applies is folded into the layers reading it)."""
        for s in spaces:
            old = self.allowed.get(s)
            self.allowed[s] = (cls, if_folded) if old is None else meet_bounds(old, (cls, if_folded))

    def linear(self, out: Any) -> Any:
        """Allow every map on every space this op touches (it is linear in each); returns ``out``."""
        args: list[fx.Node] = []
        fx.node.map_arg((self.node.args, self.node.kwargs), args.append)
        self.allow(INVERTIBLE, *(s for a in args for d in tensor_dims(self.env.get(a)) for s in d))
        self.allow(INVERTIBLE, *(s for d in tensor_dims(out) for s in d))
        return out

    def dual(self, query: Any, key: Any, space: int) -> None:
        """Record that ``query``'s and ``key``'s units in ``space`` meet in a dot product: a dense map
        ``M`` of the query side is undone by ``M⁻ᵀ`` on the key side (see :mod:`permerge.graph.classes`)."""
        self.duals.append((query, key, space))

    def arg(self, i: int, name: str | None = None, default: Any = None) -> Any:
        args, kwargs = self.node.args, self.node.kwargs
        if i < len(args):
            return args[i]
        if name is not None and name in kwargs:
            return kwargs[name]
        schema = getattr(self.node.target, "_schema", None)
        if schema is not None and i < len(schema.arguments):
            a = schema.arguments[i]
            if a.name in kwargs:
                return kwargs[a.name]
            if a.has_default_value():
                return a.default_value
        return default

    def dims(self, a: Any) -> Dims:
        v = self.env.get(a) if isinstance(a, fx.Node) else None
        if not isinstance(v, tuple):
            raise TypeError(f"argument {a!r} of {self.node.name} is not a tensor value")
        return v

    def shape(self, a: Any) -> tuple[int, ...]:
        return tuple(int(x) for x in a.meta["val"].shape)

    @property
    def out_shape(self) -> tuple[int, ...]:
        return tuple(int(x) for x in self.node.meta["val"].shape)

    def is_tensor(self, a: Any) -> bool:
        return isinstance(a, fx.Node) and isinstance(self.env.get(a), tuple)

    def fresh(self, shape: Sequence[int], what: str = "spatial") -> Dims:
        """New spaces for axes that are not channels (spatial, batch, statistics)."""
        return tuple(self.non_channel(n, f"{what} axis") for n in shape)

    def non_channel(self, n: int, what: str) -> int:
        return self.spaces.new(n, Why(FrozenKind.NON_CHANNEL, f"{what} of {self.node.name}"))

    def union(self, a: int, b: int) -> int:
        return self.spaces.union(a, b)

    def units(self, *spaces: int) -> None:
        """Mark ``spaces`` as a layer's units (see :meth:`Spaces.mark_units`)."""
        self.spaces.mark_units(*spaces)

    def freeze(self, s: int, reason: str, kind: FrozenKind = FrozenKind.UNSUPPORTED) -> None:
        """Freeze ``s``: by default because this op provably allows no non-trivial permutation of it."""
        self.spaces.freeze(s, self._why(kind, reason))

    def unsupported(self, reason: str) -> Any:
        """Give up on this node soundly: freeze every space its tensor arguments carry and return
        frozen spaces for its outputs. For cases a rule knows it does not cover (not a failure)."""
        why = self._why(FrozenKind.UNSUPPORTED, reason)
        args: list[fx.Node] = []
        fx.node.map_arg((self.node.args, self.node.kwargs), args.append)
        for a in args:
            for d in tensor_dims(self.env.get(a)):
                for s in d:
                    self.spaces.freeze(s, why)
        return self.spaces.like(self.node.meta.get("val"), Why(why.kind, f"output of {why.text}"))

    def _why(self, kind: FrozenKind, reason: str) -> Why:
        return Why(kind, f"{reason} at node {self.node.name} ({self.node.target})")


def _moves_values(rule: Rule) -> Rule:
    """For ops that only move, copy or select values (views, slices, concatenation): linear in every
    space they touch."""

    def moves(c: Call) -> Any:
        return c.linear(rule(c))

    moves.__doc__, moves.__name__ = rule.__doc__, rule.__name__
    return moves


# -- elementwise -----------------------------------------------------------------------------


def broadcast(c: Call, operands: Sequence[Any]) -> Dims:
    """Elementwise semantics: right-aligned axes of equal length are the same space."""
    out = c.out_shape
    dims: list[int | None] = [None] * len(out)
    for a in operands:
        if not c.is_tensor(a):
            continue
        ad, ash = c.dims(a), c.shape(a)
        if len(ad) > len(out):
            return c.unsupported(f"operand of shape {ash} does not broadcast to {out}")
        for k in range(1, len(ad) + 1):
            if ash[-k] != out[-k] or ash[-k] == 1:
                continue
            j = len(out) - k
            dims[j] = ad[-k] if dims[j] is None else c.union(dims[j], ad[-k])
    return tuple(d if d is not None else c.non_channel(n, "broadcast") for d, n in zip(dims, out))


@register_rule(
    aten.add, aten.sub, aten.mul, aten.div, aten.maximum, aten.minimum, aten.pow, aten.where,
    aten.masked_fill, aten.eq, aten.ne, aten.lt, aten.le, aten.gt, aten.ge, aten.__and__,
    aten.__or__, aten.logical_and, aten.logical_or, aten.atan2, aten.clamp, aten.rsub, aten.lerp,
    aten.addcmul, aten.addcdiv, aten.fmod, aten.remainder, aten.floor_divide, aten.copysign,
    aten.copy,
)  # fmt: skip
def _elementwise(c: Call) -> Dims:
    """Also the rule of every op ATen tags ``pointwise`` (see :func:`rule_for`)."""
    operands = list(c.node.args) + list(c.node.kwargs.values())
    out = broadcast(c, operands)
    if not isinstance(out, tuple):
        return out
    op = rule_key(c.node.target)
    if op is aten.copy:
        return c.linear(out)
    if op in (aten.add, aten.sub, aten.mul, aten.div):
        for j, s in enumerate(out):
            cls = _affine_class(c, op, (c.arg(0), c.arg(1)), len(out) - j)
            if cls is not None:
                c.allow(cls[0], s, if_folded=cls[1])
    elif op is aten.pow and c.arg(1) == 2:
        c.allow(ORTHOGONAL, *(out[r] for r in _norm_axes(c.node, len(out))))
    return out


def _carries(c: Call, a: Any, k: int) -> bool:
    """Whether operand ``a`` varies along the output's ``k``-th axis from the right (an expanded
    size-1 axis does not: ``x / ‖x‖.expand_as(x)``)."""
    if not (c.is_tensor(a) and len(c.shape(a)) >= k and c.shape(a)[-k] != 1):
        return False
    if rule_key(a.target) in (aten.expand, aten.expand_as):
        src = c.shape(a.args[0])
        return len(src) >= k and src[-k] != 1
    return True


def _affine_class(c: Call, op: object, operands: Sequence[Any], k: int) -> tuple[str, str | None] | None:
    """What ``add``/``sub``/``mul``/``div`` allow on the output's ``k``-th axis from the right.

    A sum of values that all carry the axis (features, biases, position tables) is linear in it; so
    is a product or quotient by something constant along it (a scalar, a per-token norm). Adding a
    constant along the axis (``x + 1``) is not. A product of two carriers is a gate, unless one is a
    1-D parameter: a gain, which commutes with scaled permutations, and with every map once folded.
    """
    tensors = [a for a in operands if c.is_tensor(a)]
    carriers = [a for a in tensors if _carries(c, a, k)]
    others = [a for a in operands if a not in carriers and (c.is_tensor(a) or isinstance(a, (int, float)))]
    if op in (aten.add, aten.sub):
        return None if others else (INVERTIBLE, None)
    if len(carriers) == 1 and (op is aten.mul or carriers[0] is c.arg(0)):
        return INVERTIBLE, None
    gains = [a for a in carriers if a.op == "placeholder" and len(c.shape(a)) == 1]
    if op is aten.mul and len(carriers) == 2 and len(gains) == 1:
        return SCALED_PERMUTATION, INVERTIBLE
    return None


def _norm_axes(node: fx.Node, ndim: int) -> set[int]:
    """The axes every reader of ``node`` (``x²``) sums or averages over: ``Σ x²`` over them is a squared
    norm, which orthogonal maps of those axes keep (RMSNorm written out: ``x·rsqrt(mean(x², -1))``)."""
    axes: set[int] | None = None
    for u in node.users:
        if rule_key(u.target) not in (aten.mean, aten.sum) or u.args[0] is not node or len(u.args) < 2:
            return set()
        dims = u.args[1] if isinstance(u.args[1], (list, tuple)) else [u.args[1]]
        red = {int(d) % ndim for d in dims}
        axes = red if axes is None else axes & red
    return axes or set()


@register_rule(
    aten.relu, aten.gelu, aten.silu, aten.sigmoid, aten.tanh, aten.neg, aten.dropout, aten.clone,
    aten.contiguous, aten.alias, aten.detach, aten._to_copy, aten.to, aten.rsqrt, aten.sqrt,
    aten.exp, aten.log, aten.abs, aten.hardtanh, aten.hardswish, aten.hardsigmoid, aten.leaky_relu,
    aten.elu, aten.softplus, aten.erf, aten.mish, aten.sin, aten.cos, aten.reciprocal,
    aten.lift_fresh_copy, aten.type_as, aten.square, aten.logical_not, aten.bitwise_not,
    aten.sign, aten.floor, aten.ceil, aten.round, aten.relu6, aten.selu, aten.celu, aten.log1p,
    aten.expm1, aten.exp2, aten.log2, aten.nan_to_num, aten.native_dropout, aten.feature_dropout,
    aten.alpha_dropout, aten.zeros_like, aten.ones_like, aten.full_like, aten.empty_like,
)  # fmt: skip
def _pointwise(c: Call) -> Dims | list[Dims]:
    x = c.arg(0)
    d = c.dims(x)
    if c.node.target == aten.native_dropout.default:
        return c.linear([d, d])
    if c.shape(x) != c.out_shape:
        return c.unsupported("a unary op changed the shape")
    op = rule_key(c.node.target)
    if op in _LINEAR_UNARY:
        return c.linear(d)
    if op in _HOMOGENEOUS:
        c.allow(SCALED_PERMUTATION, *d)
    return d


_LINEAR_UNARY = {
    aten.neg, aten.dropout, aten.feature_dropout, aten.clone, aten.contiguous, aten.alias, aten.detach,
    aten._to_copy, aten.to, aten.lift_fresh_copy, aten.type_as,
}  # fmt: skip
"""Unary ops linear in their input (dropout: in distribution, as every alignment method assumes)."""
_HOMOGENEOUS = {aten.relu, aten.leaky_relu}
"""Positively homogeneous units: ``f(s·x) = s·f(x)`` for ``s > 0``, so per-unit positive scales pass."""


@register_rule(aten._softmax, aten.softmax, aten._log_softmax, aten.log_softmax)
def _softmax(c: Call) -> Dims:
    """Softmax is permutation-equivariant along its axis, like any pointwise op."""
    return c.dims(c.arg(0))


# -- reductions ------------------------------------------------------------------------------


@register_rule(
    aten.mean, aten.sum, aten.amax, aten.amin, aten.var, aten.std, aten.logsumexp, aten.prod,
    aten.norm, aten.linalg_vector_norm, aten.var_mean, aten.std_mean,
)  # fmt: skip
def _reduce(c: Call) -> Dims | list[Dims]:
    """Symmetric reductions: invariant to any permutation of the reduced axes."""
    x = c.arg(0)
    xd = c.dims(x)
    n = len(xd)
    red = c.arg(1, "dim")
    if c.node.target in (aten.linalg_vector_norm.default, aten.norm.ScalarOpt_dim):
        red = c.arg(2, "dim")
    if isinstance(red, int):
        red = [red]
    red = set(range(n)) if red is None or red == [] else {r % n for r in red}
    keep = bool(c.node.kwargs.get("keepdim", False)) or any(
        a is True for a in c.node.args[2:] if isinstance(a, bool)
    )
    out = tuple(
        (c.non_channel(1, "reduced") if keep else None) if i in red else d
        for i, d in enumerate(xd)
    )
    out = tuple(d for d in out if d is not None)
    _reduction_classes(c, x, xd, red)
    val = c.node.meta["val"]
    if isinstance(val, (tuple, list)):
        return [out for _ in val]
    if len(out) != len(c.out_shape):
        return c.unsupported("reduction whose axes could not be followed")
    return out


def _reduction_classes(c: Call, x: Any, xd: Dims, red: set[int]) -> None:
    """Sums and means are linear in the axes they keep, maxima positively homogeneous; over the
    reduced axes, a Euclidean norm (``Σ x²``, ``‖x‖₂``) is kept by orthogonal maps."""
    op = rule_key(c.node.target)
    kept = [d for i, d in enumerate(xd) if i not in red]
    reduced = [d for i, d in enumerate(xd) if i in red]
    if op in (aten.mean, aten.sum):
        c.allow(INVERTIBLE, *kept)
        if isinstance(x, fx.Node) and rule_key(x.target) is aten.pow and x.args[1] == 2:
            c.allow(ORTHOGONAL, *reduced)
    elif op in (aten.amax, aten.amin):
        c.allow(SCALED_PERMUTATION, *kept)
    elif op in (aten.linalg_vector_norm, aten.norm) and c.arg(1, "ord", 2) == 2:
        c.allow(ORTHOGONAL, *reduced)


def _used_outputs(node: fx.Node) -> set[int]:
    """Which outputs of a multi-output node something reads (export adds getitems for all)."""
    return {u.args[1] for u in node.users if u.target is operator.getitem and u.users}


@register_rule(aten.max, aten.min, aten.argmax, aten.argmin)
def _extremum(c: Call) -> Dims | list[Dims]:
    """``max(x, y)`` is elementwise; ``max(x, dim)`` a symmetric reduction unless the positions it
    returns (argmax) are used, which depend on the order of the reduced axis: then it is frozen."""
    if c.node.target in (aten.max.other, aten.min.other):
        return _elementwise(c)
    arg = c.node.target.overloadpacket in (aten.argmax, aten.argmin)
    if arg or 1 in _used_outputs(c.node):
        x = c.arg(0)
        xd = c.dims(x)
        dim = c.arg(1, "dim")
        for d in range(len(xd)) if dim is None else [dim % len(xd)]:
            c.freeze(xd[d], "positions of the maximum or minimum are used")
    return _reduce(c)


# -- linear algebra --------------------------------------------------------------------------


@register_rule(aten.linear)
def _linear(c: Call) -> Dims:
    x, w, b = c.arg(0), c.arg(1), c.arg(2)
    xd, wd = c.dims(x), c.dims(w)
    c.units(wd[0], wd[1])
    c.union(xd[-1], wd[1])
    if c.is_tensor(b):
        c.union(c.dims(b)[-1], wd[0])
    return c.linear(xd[:-1] + (wd[0],))


def _matmul_dims(c: Call, a: Any, b: Any) -> Dims:
    ad, bd = c.dims(a), c.dims(b)
    if len(ad) < 2 or len(bd) < 2:
        return c.unsupported("matmul with a 1-d operand")
    for t, d in ((a, ad), (b, bd)):
        if t.op == "placeholder":  # a weight (GPT-2's Conv1D): its rows and columns are units
            c.units(*d[-2:])
    c.union(ad[-1], bd[-2])  # the contraction: Σ_k a_k b_k is invariant to one shared permutation
    if a.op != "placeholder" and b.op != "placeholder":  # two activations: q·kᵀ
        c.dual(a, b, ad[-1])
    out = c.out_shape
    batch_a, batch_b = ad[:-2], bd[:-2]
    ash, bsh = c.shape(a)[:-2], c.shape(b)[:-2]
    batch: list[int] = []
    nb = len(out) - 2
    for k in range(nb, 0, -1):
        cand = [
            dd[-k] for dd, sh in ((batch_a, ash), (batch_b, bsh)) if len(dd) >= k and sh[-k] == out[nb - k] and sh[-k] != 1
        ]
        s = cand[0] if cand else c.non_channel(out[nb - k], "broadcast")
        for o in cand[1:]:
            s = c.union(s, o)
        batch.append(s)
    return c.linear(tuple(batch) + (ad[-2], bd[-1]))


@register_rule(aten.matmul, aten.mm, aten.bmm)
def _matmul(c: Call) -> Dims:
    return _matmul_dims(c, c.arg(0), c.arg(1))


@register_rule(aten.addmm, aten.baddbmm)
def _addmm(c: Call) -> Dims:
    out = _matmul_dims(c, c.arg(1), c.arg(2))
    bias = c.arg(0)
    if c.is_tensor(bias):
        bd, bsh = c.dims(bias), c.shape(bias)
        for k in range(1, len(bd) + 1):
            if bsh[-k] == c.out_shape[-k] and bsh[-k] != 1:
                c.union(bd[-k], out[-k])
    return c.linear(out)


@register_rule(aten.einsum)
def _einsum(c: Call) -> Dims:
    """Every axis labelled with one letter is the same space (a contraction over it is a sum, which
    a shared permutation leaves unchanged); ``...`` axes broadcast like elementwise operands."""
    eq = c.arg(0).replace(" ", "")
    operands = list(c.arg(1))
    lhs, arrow, rhs = eq.partition("->")
    terms = lhs.split(",")
    if not arrow:
        rhs = "".join(sorted(ch for ch in set(lhs) if ch.isalpha() and lhs.count(ch) == 1))
    letters: dict[str, int] = {}
    ellipses: list[tuple[Dims, tuple[int, ...]]] = []
    for term, t in zip(terms, operands):
        d, shape = c.dims(t), c.shape(t)
        if t.op == "placeholder":  # a weight contracted with activations: its axes are units
            c.units(*d)
        head, dots, tail = term.partition("...")
        n_ell = len(d) - len(head) - len(tail) if dots else 0
        ellipses.append((d[len(head) : len(head) + n_ell], shape[len(head) : len(head) + n_ell]))
        labelled = list(zip(head, d, shape)) + list(zip(tail, d[len(head) + n_ell :], shape[len(head) + n_ell :]))
        for ch, s, n in labelled:
            if n != 1:
                letters[ch] = c.union(letters[ch], s) if ch in letters else s
    out_shape = c.out_shape
    head, dots, tail = rhs.partition("...")
    n_ell = len(out_shape) - len(head) - len(tail) if dots else 0
    ell: list[int | None] = [None] * n_ell
    for d, shape in ellipses:
        for k in range(1, len(d) + 1):
            if shape[-k] != 1 and k <= n_ell:
                ell[-k] = d[-k] if ell[-k] is None else c.union(ell[-k], d[-k])
    out = [letters.get(ch) for ch in head] + ell + [letters.get(ch) for ch in tail]
    return tuple(s if s is not None else c.spaces.new(n) for s, n in zip(out, out_shape))


@register_rule(aten.t, aten.numpy_T)
def _t(c: Call) -> Dims:
    return c.linear(tuple(reversed(c.dims(c.arg(0)))))


# -- convolutions ----------------------------------------------------------------------------


def _conv(
    c: Call, x: Any, w: Any, b: Any, transposed: bool, groups: int, stride: Any = 1, padding: Any = 0
) -> Dims:
    xd, wd = c.dims(x), c.dims(w)
    c.units(wd[0], wd[1])
    for k in wd[2:]:
        c.spaces.freeze(k, Why(FrozenKind.NON_CHANNEL, "kernel tap"))
    if not transposed:
        if groups == 1:
            c.union(xd[1], wd[1])
            out_ch = wd[0]
        else:
            cin, cout = c.shape(x)[1], c.shape(w)[0]
            xg, xw = c.spaces.refine(xd[1], PROD, (groups, cin // groups))
            og, _ = c.spaces.refine(wd[0], PROD, (groups, cout // groups))
            c.union(xg, og)
            c.union(xw, wd[1])
            out_ch = wd[0]
    else:
        c.union(xd[1], wd[0])
        if groups == 1:
            out_ch = wd[1]
        else:
            cin = c.shape(x)[1]
            xg, _ = c.spaces.refine(xd[1], PROD, (groups, cin // groups))
            out_ch = c.spaces.compose(PROD, (xg, wd[1]))
    if c.is_tensor(b):
        c.union(c.dims(b)[0], out_ch)
    # an axis with kernel 1, stride 1 and no padding is read pointwise (LambdaNet's Conv3d over
    # values): its positions pass through; every other axis the window slides over is mixed
    n = len(xd) - 2
    kernel, strides = c.shape(w)[2:], _per_axis(stride, n)
    pads = [0] * n if padding in ("valid", "same") else _per_axis(padding, n)
    through = [not transposed and (k, s_, p) == (1, 1, 0) for k, s_, p in zip(kernel, strides, pads)]
    _mixed(c, [d for d, t in zip(xd[2:], through) if not t], "convolution kernel")
    spatial = [d if t else c.non_channel(m, "spatial axis") for d, t, m in zip(xd[2:], through, c.out_shape[2:])]
    out = (xd[0], out_ch, *spatial)
    return c.linear(out) if groups == 1 else out


def _per_axis(v: Any, n: int) -> list[int]:
    """A conv's stride/padding argument (an int or a list of 1 or n) as one int per spatial axis."""
    v = [v] if isinstance(v, int) else list(v)
    return v * n if len(v) == 1 else v


def _mixed(c: Call, axes: Sequence[int], by: str) -> None:
    """Axes a window slides over (convolution, pooling, resampling) mix their positions: if units of
    a group sit there (features moved onto a 'spatial' axis), they must not move."""
    for s in axes:
        c.freeze(s, f"axis mixed by a {by} (units would be blended with their neighbours)")


@register_rule(aten.conv1d, aten.conv2d, aten.conv3d)
def _convnd(c: Call) -> Dims:
    if len(c.shape(c.arg(0))) == len(c.shape(c.arg(1))) - 1:
        return c.unsupported("unbatched convolution input")
    return _conv(c, c.arg(0), c.arg(1), c.arg(2), False, int(c.arg(6, "groups", 1)), c.arg(3, "stride", 1), c.arg(4, "padding", 0))


@register_rule(aten.conv_transpose1d, aten.conv_transpose2d, aten.conv_transpose3d)
def _conv_transpose(c: Call) -> Dims:
    return _conv(c, c.arg(0), c.arg(1), c.arg(2), True, int(c.arg(6, "groups", 1)))


@register_rule(aten.convolution)
def _convolution(c: Call) -> Dims:
    return _conv(c, c.arg(0), c.arg(1), c.arg(2), bool(c.arg(6)), int(c.arg(8)), c.arg(3), c.arg(4))


# -- normalisation ---------------------------------------------------------------------------


def _tie_channel(c: Call, x: Any, params: Sequence[Any], axis: int = 1) -> Dims:
    xd = c.dims(x)
    for p in params:
        if c.is_tensor(p) and c.shape(p) != (0,):
            c.units(c.dims(p)[0])
            c.union(c.dims(p)[0], xd[axis])
    return xd


@register_rule(aten.batch_norm, aten.instance_norm)
def _batch_norm(c: Call) -> Dims:
    """BatchNorm: weight, bias *and* running mean/var follow the channel (axis 1)."""
    return _tie_channel(c, c.arg(0), [c.arg(i) for i in (1, 2, 3, 4)])


@register_rule(
    aten._native_batch_norm_legit_no_training, aten._native_batch_norm_legit_functional,
    aten._native_batch_norm_legit, aten.native_batch_norm,
)  # fmt: skip
def _native_batch_norm(c: Call) -> list[Dims]:
    xd = _tie_channel(c, c.arg(0), [c.arg(i) for i in (1, 2, 3, 4)])
    outs: list[Dims] = [xd]
    for v in c.node.meta["val"][1:]:
        outs.append((xd[1],) if tuple(v.shape) == (c.shape(c.arg(0))[1],) else c.fresh(tuple(v.shape), "statistic"))
    return outs


def _normalized(c: Call, x: Any, normalized_shape: Sequence[int], params: Sequence[Any]) -> Dims:
    xd = c.dims(x)
    k = len(normalized_shape)
    for p in params:
        if c.is_tensor(p):
            c.units(*c.dims(p))
            for pd, s in zip(c.dims(p), xd[-k:]):
                c.union(pd, s)
    if k == 1:  # a norm over the units commutes with orthogonal maps, a gain only once folded
        gain = c.is_tensor(params[0]) if params else False
        c.allow(PERMUTATION if gain else ORTHOGONAL, xd[-1], if_folded=ORTHOGONAL if gain else None)
    return xd


@register_rule(aten.layer_norm, aten.rms_norm)
def _layer_norm(c: Call) -> Dims:
    """LayerNorm/RMSNorm normalise over the last axes with symmetric statistics."""
    params = [c.arg(2, "weight"), c.arg(3, "bias")] if c.node.target != aten.rms_norm.default else [c.arg(2, "weight")]
    return _normalized(c, c.arg(0), c.arg(1), params)


@register_rule(aten.native_layer_norm, aten._fused_rms_norm)
def _native_layer_norm(c: Call) -> list[Dims]:
    n = len(c.arg(1))
    params = [c.arg(2), c.arg(3)] if c.node.target != aten._fused_rms_norm.default else [c.arg(2)]
    xd = _normalized(c, c.arg(0), c.arg(1), params)
    return [xd] + [xd[:-n] + c.fresh((1,) * n, "statistic") for _ in c.node.meta["val"][1:]]


@register_rule(aten.group_norm, aten.native_group_norm)
def _group_norm(c: Call) -> Dims | list[Dims]:
    """GroupNorm: channels = groups ⊗ within-group; both factors may be permuted, nothing more."""
    x = c.arg(0)
    native = c.node.target == aten.native_group_norm.default
    groups = int(c.arg(6) if native else c.arg(1))
    params = [c.arg(1), c.arg(2)] if native else [c.arg(2), c.arg(3)]
    xd = c.dims(x)
    cin = c.shape(x)[1]
    c.spaces.refine(xd[1], PROD, (groups, cin // groups))
    _tie_channel(c, x, params)
    if native:
        return [xd] + [c.fresh(tuple(v.shape), "statistic") for v in c.node.meta["val"][1:]]
    return xd


# -- embeddings and attention ----------------------------------------------------------------


@register_rule(aten.embedding)
def _embedding(c: Call) -> Dims:
    w, idx = c.arg(0), c.arg(1)
    wd = c.dims(w)
    c.units(wd[1])
    c.freeze(wd[0], "embedding rows are indexed by token ids", FrozenKind.TOKEN_ROWS)
    c.allow(INVERTIBLE, wd[1])
    return c.dims(idx) + (wd[1],)


@register_rule(aten.scaled_dot_product_attention)
def _sdpa(c: Call) -> Dims:
    """softmax(q kᵀ) v per head: heads of q, k, v move together; q·k and v·out share head dims."""
    q, k, v, mask = c.arg(0), c.arg(1), c.arg(2), c.arg(3, "attn_mask")
    qd, kd, vd = c.dims(q), c.dims(k), c.dims(v)
    c.union(qd[-1], kd[-1])
    c.union(kd[-2], vd[-2])
    c.union(kd[-3], vd[-3])
    hq, hk = c.shape(q)[-3], c.shape(k)[-3]
    heads = qd[-3]
    if hq == hk:
        c.union(heads, kd[-3])
    else:  # grouped-query attention: query head h uses kv head h // (hq // hk)
        kv_part, _ = c.spaces.refine(heads, PROD, (hk, hq // hk))
        c.union(kv_part, kd[-3])
    batch = tuple(c.union(a, b) for a, b in zip(qd[:-3], kd[:-3]))
    out = batch + (heads, qd[-2], vd[-1])
    c.allow(INVERTIBLE, qd[-1], vd[-1])  # per head: q·kᵀ keeps W_Q·M, W_K·M⁻ᵀ; attn·v keeps W_V·N, N⁻¹·W_O
    c.dual(q, k, qd[-1])
    if c.is_tensor(mask):  # a mask that differs per head pins the heads (broadcast ties it)
        md, msh = c.dims(mask), c.shape(mask)
        for j in range(1, len(md) + 1):
            if msh[-j] != 1:
                c.union(md[-j], out[-j] if j != 1 else kd[-2])
    return out


# -- shape ops -------------------------------------------------------------------------------


def _reshape(c: Call, x: Any) -> Dims:
    """View/reshape: split axes become products of parts, merged axes become products."""
    xd, ish, osh = c.dims(x), c.shape(x), c.out_shape
    src = [(d, n) for d, n in zip(xd, ish) if n != 1]
    dst_pos = [j for j, n in enumerate(osh) if n != 1]
    out: list[int | None] = [None] * len(osh)
    i = j = 0
    while i < len(src) or j < len(dst_pos):
        pi, pj = src[i][1], osh[dst_pos[j]]
        i1, j1 = i + 1, j + 1
        while pi != pj:
            if pi < pj:
                pi *= src[i1][1]
                i1 += 1
            else:
                pj *= osh[dst_pos[j1]]
                j1 += 1
        ins, outs = [s for s, _ in src[i:i1]], dst_pos[j:j1]
        whole = ins[0] if len(ins) == 1 else c.spaces.compose(PROD, tuple(ins))
        parts = c.spaces.refine(whole, PROD, tuple(osh[p] for p in outs))
        for p, s in zip(outs, parts):
            out[p] = s
        i, j = i1, j1
    return tuple(s if s is not None else c.non_channel(1, "unit axis") for s in out)


@register_rule(
    aten.view, aten.reshape, aten._unsafe_view, aten.flatten, aten.unflatten, aten.unsqueeze,
    aten.squeeze, aten._reshape_alias, aten.view_as, aten.reshape_as,
)  # fmt: skip
@_moves_values
def _view(c: Call) -> Dims:
    """``view_as``/``reshape_as`` too: only the other tensor's shape matters, not its axes."""
    return _reshape(c, c.arg(0))


@register_rule(aten.expand, aten.expand_as)
@_moves_values
def _expand(c: Call) -> Dims:
    """Expanded axes repeat one value, which no permutation changes: they get free, untied spaces."""
    x = c.arg(0)
    xd, ish, osh = c.dims(x), c.shape(x), c.out_shape
    lead = len(osh) - len(xd)
    out = [c.spaces.new(m) for m in osh[:lead]]
    for d, n, m in zip(xd, ish, osh[lead:]):
        out.append(d if n == m else c.spaces.new(m))
    return tuple(out)


@register_rule(aten.permute)
@_moves_values
def _permute(c: Call) -> Dims:
    xd = c.dims(c.arg(0))
    return tuple(xd[p % len(xd)] for p in c.arg(1))


@register_rule(aten.transpose)
@_moves_values
def _transpose(c: Call) -> Dims:
    xd = list(c.dims(c.arg(0)))
    a, b = c.arg(1) % len(xd), c.arg(2) % len(xd)
    xd[a], xd[b] = xd[b], xd[a]
    return tuple(xd)


@register_rule(aten.select)
@_moves_values
def _select(c: Call) -> Dims:
    """The picked position must stay put; the positions before and after it may move among themselves."""
    x = c.arg(0)
    xd = c.dims(x)
    dim = c.arg(1) % len(xd)
    i = c.arg(2) % c.shape(x)[dim]
    _slice_parts(c, x, dim, (i, i + 1))
    return xd[:dim] + xd[dim + 1 :]


def _slice_parts(c: Call, x: Any, dim: int, bounds: Sequence[int]) -> tuple[int, ...]:
    """Refine axis ``dim`` of ``x`` at ``bounds`` and return the parts."""
    xd, n = c.dims(x), c.shape(x)[dim]
    edges = sorted({0, n, *(min(max(b, 0), n) for b in bounds)})
    sizes = tuple(b - a for a, b in zip(edges, edges[1:]))
    return c.spaces.refine(xd[dim], SUM, sizes) if len(sizes) > 1 else (xd[dim],)


@register_rule(aten.slice)
@_moves_values
def _slice(c: Call) -> Dims:
    x = c.arg(0)
    xd, ish = c.dims(x), c.shape(x)
    dim = c.arg(1, "dim", 0) % len(xd)
    n = ish[dim]
    start, end, step = c.arg(2, "start"), c.arg(3, "end"), c.arg(4, "step", 1)
    start = 0 if start is None else (start + n if start < 0 else min(start, n))
    end = n if end is None else (end + n if end < 0 else min(end, n))
    return _take(c, x, dim, start, end, step)


@register_rule(aten.narrow)
@_moves_values
def _narrow(c: Call) -> Dims:
    x = c.arg(0)
    dim = c.arg(1) % len(c.dims(x))
    n, start = c.shape(x)[dim], c.arg(2)
    start = start + n if start < 0 else start
    return _take(c, x, dim, start, start + c.arg(3), 1)


def _take(c: Call, x: Any, dim: int, start: int, end: int, step: int) -> Dims:
    """Positions ``start:end:step`` of axis ``dim``: a part of a sum (a strided pick freezes the axis)."""
    xd, n = c.dims(x), c.shape(x)[dim]
    if (start, end, step) == (0, n, 1):
        return xd
    out = list(xd)
    if step != 1:  # every step-th position: the positions are no longer interchangeable
        c.freeze(xd[dim], f"positions taken with stride {step}")
        out[dim] = c.spaces.new(c.out_shape[dim], c.spaces.reason(xd[dim]))
        return tuple(out)
    parts = _slice_parts(c, x, dim, (start, end))
    sizes = [c.spaces.size[c.spaces.find(p)] for p in parts]
    out[dim] = parts[[sum(sizes[:i]) for i in range(len(sizes))].index(start)]
    return tuple(out)


@register_rule(aten.split, aten.split_with_sizes, aten.chunk, aten.unsafe_split)
@_moves_values
def _split(c: Call) -> list[Dims]:
    x = c.arg(0)
    xd = c.dims(x)
    dim = c.arg(2, "dim", 0) % len(xd)
    sizes = [int(v.shape[dim]) for v in c.node.meta["val"]]
    parts = _slice_parts(c, x, dim, [sum(sizes[:i]) for i in range(1, len(sizes))])
    return [xd[:dim] + (p,) + xd[dim + 1 :] for p in parts]


@register_rule(aten.cat)
@_moves_values
def _cat(c: Call) -> Dims:
    tensors = [t for t in c.arg(0) if c.shape(t) != (0,)]
    dim = c.arg(1, "dim", 0)
    ref = c.dims(tensors[0])
    dim %= len(ref)
    for t in tensors[1:]:
        for k, (a, b) in enumerate(zip(ref, c.dims(t))):
            if k != dim:
                c.union(a, b)
    if len(tensors) == 1:
        return ref
    joined = c.spaces.compose(SUM, tuple(c.dims(t)[dim] for t in tensors))
    return ref[:dim] + (joined,) + ref[dim + 1 :]


@register_rule(aten.repeat_interleave)
@_moves_values
def _repeat_interleave(c: Call) -> Dims:
    """``repeats`` consecutive copies of each position: axis ⊗ copies (equal copies: a free factor)."""
    x, repeats, dim = c.arg(0), c.arg(1), c.arg(2, "dim")
    if c.node.target != aten.repeat_interleave.self_int or dim is None:
        return c.unsupported("repeat_interleave with tensor repeats or without a dim")
    xd = c.dims(x)
    dim %= len(xd)
    out = list(xd)
    out[dim] = c.spaces.compose(PROD, (xd[dim], c.spaces.new(int(repeats))))
    return tuple(out)


@register_rule(aten.im2col)
def _im2col(c: Call) -> Dims:
    """``unfold``: each channel's patch values become rows channel ⊗ kernel taps."""
    x = c.arg(0)
    xd = c.dims(x)
    _mixed(c, xd[-2:], "unfold window")
    col = c.spaces.compose(PROD, (xd[-3], *(c.non_channel(k, "kernel tap") for k in c.arg(1))))
    return xd[:-3] + (col, c.non_channel(c.out_shape[-1], "patch position"))


@register_rule(aten.col2im)
def _col2im(c: Call) -> Dims:
    """``fold``: rows channel ⊗ kernel taps are summed back into each channel's image."""
    x = c.arg(0)
    xd = c.dims(x)
    _mixed(c, xd[-1:], "fold (its patches overlap)")
    channel, *taps = c.spaces.refine(xd[-2], PROD, (c.out_shape[-3], *c.arg(2)))
    for t in taps:
        c.freeze(t, "kernel tap", FrozenKind.NON_CHANNEL)
    return xd[:-2] + (channel,) + c.fresh(c.out_shape[-2:])


@register_rule(aten.stack)
@_moves_values
def _stack(c: Call) -> Dims:
    tensors = list(c.arg(0))
    dim = c.arg(1, "dim", 0) % len(c.out_shape)
    ref = c.dims(tensors[0])
    for t in tensors[1:]:
        for a, b in zip(ref, c.dims(t)):
            c.union(a, b)
    return ref[:dim] + c.fresh((len(tensors),), "stacked") + ref[dim:]


@register_rule(aten.unbind)
@_moves_values
def _unbind(c: Call) -> list[Dims]:
    """Each position becomes its own tensor (q, k, v of a packed projection): a sum of size-1 parts."""
    x = c.arg(0)
    xd = c.dims(x)
    dim = c.arg(1, "dim", 0) % len(xd)
    _slice_parts(c, x, dim, range(1, c.shape(x)[dim]))
    return [xd[:dim] + xd[dim + 1 :] for _ in c.node.meta["val"]]


@register_rule(aten.roll, aten.flip)
@_moves_values
def _shift(c: Call) -> Dims:
    """Rolling or flipping moves positions along its axes (freeze them); other axes pass through."""
    x = c.arg(0)
    xd, shape = c.dims(x), c.shape(x)
    if c.node.target == aten.flip.default:
        moved = [(d, 1) for d in c.arg(1)]
    else:
        moved = list(zip(c.arg(2, "dims", ()), c.arg(1)))
        if not moved:
            return c.unsupported("roll of the flattened tensor")
    for d, shift in moved:
        if shift % shape[d % len(xd)]:
            c.freeze(xd[d % len(xd)], "positions rolled or flipped along the axis")
    return xd


@register_rule(aten.cumsum, aten.cumprod, aten.cummax, aten.cummin, aten.logcumsumexp)
def _cumulative(c: Call) -> Dims | list[Dims]:
    """A running sum/product/extremum mixes the positions of its axis in order (frozen); every other
    axis passes (a running sum is linear in them)."""
    xd = c.dims(c.arg(0))
    _mixed(c, [xd[c.arg(1, "dim") % len(xd)]], "cumulative op")
    if rule_key(c.node.target) is aten.cumsum:
        c.linear(xd)
    return [xd, xd] if isinstance(c.node.meta["val"], (tuple, list)) else xd


@register_rule(aten.sort, aten.argsort, aten.topk)
def _sort(c: Call) -> Dims | list[Dims]:
    """Sorting (or picking the top k) orders the positions of its axis by value (frozen); every
    other axis passes."""
    xd = list(c.dims(c.arg(0)))
    topk = rule_key(c.node.target) is aten.topk
    dim = c.arg(2, "dim", -1) % len(xd) if topk else c.arg(1, "dim", -1) % len(xd)
    c.freeze(xd[dim], "positions ordered by value")
    if topk:
        xd[dim] = c.non_channel(c.arg(1), "top-k positions")
    out = tuple(xd)
    return [out, out] if isinstance(c.node.meta["val"], (tuple, list)) else out


@register_rule(aten.prelu, aten._prelu_kernel)
def _prelu(c: Call) -> Dims:
    """PReLU's slopes (one, or one per channel of axis 1) follow the channels."""
    x, w = c.arg(0), c.arg(1)
    out = _tie_channel(c, x, [w]) if c.shape(w) not in ((), (1,)) and len(c.dims(x)) > 1 else c.dims(x)
    c.allow(SCALED_PERMUTATION, *out, *c.dims(w))  # positively homogeneous, slopes move with their channels
    return out


@register_rule(aten.bilinear)
def _bilinear(c: Call) -> Dims:
    """``y_o = Σ_ij x1_i W_oij x2_j + b_o``: each input's features tie to their axis of ``W``."""
    x1, x2, w, b = c.arg(0), c.arg(1), c.arg(2), c.arg(3)
    wd = c.dims(w)
    c.units(*wd)
    c.union(c.dims(x1)[-1], wd[1])
    c.union(c.dims(x2)[-1], wd[2])
    if c.is_tensor(b):
        c.union(c.dims(b)[0], wd[0])
    lead = tuple(c.union(a, b_) for a, b_ in zip(c.dims(x1)[:-1], c.dims(x2)[:-1]))
    return c.linear(lead + (wd[0],))  # linear in each input


# -- indexing: the indexed axis is read at given positions (frozen), every other axis passes ----


@register_rule(aten.index)
def _index(c: Call) -> Dims:
    """``x[..., idx, ...]`` (advanced indexing): non-indexed axes pass through; the index's axes are new.

    Relative-position biases index a ``(positions, heads)`` table: the heads axis follows the
    attention heads it is added to, the positions axis is read at fixed positions.
    """
    x = c.arg(0)
    xd = c.dims(x)
    idx = list(c.arg(1))
    used = [k for k, t in enumerate(idx) if t is not None]
    if any(c.node.args[1][k].meta["val"].dtype == torch.bool for k in used):
        return c.unsupported("boolean-mask indexing")
    for k in used:
        c.freeze(xd[k], "read at positions given by an index tensor")
    rest = tuple(d for k, d in enumerate(xd) if k not in used)
    nb = len(c.out_shape) - len(rest)
    adjacent = used == list(range(used[0], used[-1] + 1))
    at = used[0] if adjacent else 0
    new = _index_axes(c, [idx[k] for k in used], c.out_shape[at : at + nb])
    return rest[:at] + new + rest[at:]


def _index_axes(c: Call, indices: Sequence[Any], shape: Sequence[int]) -> Dims:
    """The result's axes that enumerate the index tensors' entries: out[j] = x[idx[j]], so they are
    the index tensors' own axes (broadcast together)."""
    dims: list[int | None] = [None] * len(shape)
    for t in indices:
        td, tsh = c.dims(t), c.shape(t)
        for k in range(1, min(len(td), len(shape)) + 1):
            if tsh[-k] == shape[-k] != 1:
                dims[-k] = td[-k] if dims[-k] is None else c.union(dims[-k], td[-k])
    return tuple(d if d is not None else c.non_channel(n, "indexed") for d, n in zip(dims, shape))


@register_rule(aten.index_select)
def _index_select(c: Call) -> Dims:
    x = c.arg(0)
    xd = c.dims(x)
    dim = c.arg(1) % len(xd)
    c.freeze(xd[dim], "read at positions given by an index tensor")
    return xd[:dim] + _index_axes(c, [c.arg(2)], (c.out_shape[dim],)) + xd[dim + 1 :]


@register_rule(aten.gather)
def _gather(c: Call) -> Dims:
    """``out[i][j] = x[index[i][j]][j]`` (dim 0): x's and index's other axes move together where equal."""
    x, index = c.arg(0), c.arg(2)
    xd, idd = c.dims(x), c.dims(index)
    dim = c.arg(1) % len(xd)
    out = []
    for k, (a, b, n, m) in enumerate(zip(xd, idd, c.shape(x), c.shape(index))):
        if k == dim or n != m:
            c.freeze(a, "read at positions given by an index tensor")
            out.append(b)
        else:
            out.append(c.union(a, b))
    return tuple(out)


@register_rule(aten.repeat)
@_moves_values
def _repeat(c: Call) -> Dims:
    xd = c.dims(c.arg(0))
    reps = list(c.arg(1))
    lead = len(reps) - len(xd)
    out = list(c.fresh(c.out_shape[:lead], "repeated"))
    for d, r in zip(xd, reps[lead:]):
        out.append(d if r == 1 else c.spaces.compose(PROD, (c.non_channel(r, "repeat count"), d)))
    return tuple(out)


@register_rule(
    aten.constant_pad_nd, aten.pad, aten.reflection_pad1d, aten.reflection_pad2d,
    aten.reflection_pad3d, aten.replication_pad1d, aten.replication_pad2d, aten.replication_pad3d,
)  # fmt: skip
def _pad(c: Call) -> Dims:
    """Constant padding appends constant slices (a sum: before ⊕ axis ⊕ after, the constant parts
    unchanged by any permutation); reflecting, replicating or circular padding copies positions
    of the axis, so it is frozen."""
    x = c.arg(0)
    xd = c.dims(x)
    pad = list(c.arg(1))
    constant = c.node.target.overloadpacket is aten.constant_pad_nd or (
        c.node.target.overloadpacket is aten.pad and c.arg(2, "mode", "constant") == "constant"
    )
    out = list(xd)
    for k in range(len(pad) // 2):
        j = len(xd) - 1 - k
        before, after = pad[2 * k], pad[2 * k + 1]
        if not (before or after):
            continue
        if constant and before >= 0 and after >= 0:
            out[j] = c.spaces.compose(SUM, (c.spaces.new(before), xd[j], c.spaces.new(after)))
        else:
            c.freeze(xd[j], "positions copied or cropped by padding")
            out[j] = c.spaces.new(c.out_shape[j], c.spaces.reason(xd[j]))
    value = c.arg(3 if c.node.target.overloadpacket is aten.pad else 2, "value", 0)
    return c.linear(tuple(out)) if constant and not value else tuple(out)


# -- pooling and resampling (channel-first: axis 1 passes through, spatial axes are new) ------


@register_rule(
    aten.max_pool1d, aten.max_pool2d, aten.max_pool3d, aten.avg_pool1d, aten.avg_pool2d,
    aten.avg_pool3d, aten.adaptive_avg_pool1d, aten.adaptive_avg_pool2d, aten.adaptive_avg_pool3d,
    aten._adaptive_avg_pool2d, aten.adaptive_max_pool1d, aten.adaptive_max_pool2d,
    aten.max_pool2d_with_indices, aten.upsample_nearest1d, aten.upsample_nearest2d,
    aten.upsample_bilinear2d, aten.upsample_bicubic2d, aten.upsample_linear1d,
    aten.upsample_nearest3d, aten.upsample_trilinear3d, aten._upsample_bilinear2d_aa,
    aten._upsample_bicubic2d_aa, aten._upsample_nearest_exact1d, aten._upsample_nearest_exact2d,
    aten._upsample_nearest_exact3d,
)  # fmt: skip
def _pool(c: Call) -> Dims | list[Dims]:
    """Each channel is pooled/resampled on its own over the trailing 1/2/3 spatial axes (from the name)."""
    x = c.arg(0)
    xd = c.dims(x)
    val = c.node.meta["val"]
    shape = tuple(val[0].shape) if isinstance(val, (tuple, list)) else c.out_shape
    rank = next((r for r in (1, 2, 3) if f"{r}d" in str(c.node.target)), None)
    if rank is None or len(shape) != len(xd):
        return c.unsupported("pooling whose spatial axes could not be found")
    keep = xd[: len(xd) - rank]
    _mixed(c, xd[len(keep) :], "pooling or resampling window")
    out = keep + c.fresh(shape[len(keep) :])
    if "max" in str(c.node.target):  # maxima are positively homogeneous; averages, resampling linear
        c.allow(SCALED_PERMUTATION, *xd)
    else:
        c.linear(out)
    if isinstance(val, (tuple, list)):  # (values, indices): indices are per channel, too
        return [out, out]
    return out


# -- recurrent layers --------------------------------------------------------------------------


@register_rule(aten.lstm, aten.gru, aten.rnn_tanh, aten.rnn_relu)
def _rnn(c: Call) -> list[Dims]:
    """LSTM/GRU/RNN: each layer's (and direction's) hidden units may be permuted; the gate blocks
    of its weights (gates ⊗ hidden, PyTorch's layout) move with them, the gate order cannot.

    A layer reads the previous layer's output (both directions: a sum) through ``weight_ih``'s
    columns and its own state through ``weight_hh``'s. Initial/final states hold every layer in
    one tensor, so where they carry values (not a constant such as the default zeros, and not
    unused) they tie all layers' hidden units to one permutation.
    """
    if c.node.target._overloadname != "input":
        return c.unsupported("packed-sequence recurrent layer")
    gates = {aten.lstm: 4, aten.gru: 3}.get(c.node.target.overloadpacket, 1)
    x, hx, params = c.arg(0), c.arg(1), list(c.arg(2))
    has_biases, layers, bidirectional = c.arg(3), c.arg(4), c.arg(7)
    directions = 2 if bidirectional else 1
    per = 4 if has_biases else 2
    if len(params) != layers * directions * per:
        return c.unsupported("LSTM with projections")
    xd = c.dims(x)
    _mixed(c, [xd[1 if c.arg(8) and len(xd) == 3 else 0]], "recurrent layer along its sequence axis")
    inp, hidden = xd[-1], []
    for layer in range(layers):
        outs = []
        for d in range(directions):
            w_ih, w_hh, *biases = (c.dims(p) for p in params[(layer * directions + d) * per :][:per])
            c.units(*w_ih, *w_hh)
            c.union(w_ih[1], inp)
            for t in (w_hh, *biases):
                c.union(t[0], w_ih[0])
            gate, h = c.spaces.refine(w_ih[0], PROD, (gates, c.shape(params[1])[1]))
            c.spaces.refine(gate, SUM, (1,) * gates)
            c.union(w_hh[1], h)
            outs.append(h)
        hidden += outs
        inp = c.spaces.compose(SUM, tuple(outs))
    states = list(hx) if isinstance(hx, (list, tuple)) else [hx]
    used = _used_outputs(c.node)
    for i, st in enumerate(states):
        if i + 1 in used or not (isinstance(st, fx.Node) and st.target in _FILLED):
            for h in hidden:
                c.union(c.dims(st)[-1], h)
    return [xd[:-1] + (inp,)] + [c.dims(st) if i + 1 in used else c.fresh(c.shape(st), "unused state") for i, st in enumerate(states)]


# -- structural no-ops, constants and getitem ------------------------------------------------


@register_rule(
    aten._assert_tensor_metadata, aten._assert_scalar, aten.sym_size, aten.sym_numel,
    aten.sym_stride, aten._assert_async, aten.sym_constrain_range_for_size,
)  # fmt: skip
@_moves_values
def _no_value(c: Call) -> None:
    return None


@register_rule(aten.arange, aten.empty, aten.new_empty, aten.rand, aten.randn, aten.linspace)
def _constant(c: Call) -> Dims:
    """Fresh tensors that vary along their axes carry no channel: every axis is frozen."""
    return c.fresh(c.out_shape, "constant")


_FILLED = (
    aten.full.default, aten.zeros.default, aten.ones.default, aten.new_ones.default,
    aten.new_zeros.default, aten.new_full.default, aten.scalar_tensor.default,
)  # fmt: skip


@register_rule(*{t.overloadpacket for t in _FILLED})
def _filled(c: Call) -> Dims:
    """One value everywhere, which no permutation changes: free, untied spaces (zeros: any map)."""
    out = tuple(c.spaces.new(n) for n in c.out_shape)
    return c.linear(out) if rule_key(c.node.target) in (aten.zeros, aten.new_zeros) else out


@register_rule(operator.getitem)
@_moves_values
def _getitem(c: Call) -> Any:
    seq, i = c.node.args
    v = c.env.get(seq)
    return v[i] if isinstance(v, list) else None
