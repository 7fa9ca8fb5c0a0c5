"""PLeaS (Nasery, Hayase, Koh & Oh, CVPR 2025): partial merging, then layer-wise least squares.

Step 1 aligns B to A by activation matching and partially merges them (:mod:`permerge.merge.partial`).
Step 2 refits the merged model's weights one layer at a time, in graph order, on unlabeled data:
each layer's output on the *merged model's own* inputs should equal the merged-space image of the
original models' features at that layer, ``M · [f_A; f_π(B)]`` (the average of a merged pair, each
model's own unit for pairs kept apart, both heads' or the mean logits at the output). Because the
inputs come from the already refitted earlier layers, each fit also corrects the error those
layers left behind.

Each fit is a ridge regression pulled towards the current weights ``W0``::

    W* = argmin_W  ||W X − Y||² + λ ||W − W0||²,      λ = ridge · mean(diag(X Xᵀ))

which has a closed form from the sufficient statistics ``X Xᵀ`` and ``Y Xᵀ`` accumulated over
batches, so no gradient steps, learning rates or epochs. Pulling towards ``W0`` rather than 0
guarantees the step never increases its own objective: ``||W* X − Y||² ≤ ||W*X − Y||² + λ||W* −
W0||² ≤ ||W0 X − Y||²`` for every output unit separately. We measure both sides for every unit
and keep ``W0`` for a unit where rounding says otherwise, so the guarantee holds as computed
(``LayerFit.before`` / ``after``).

A convolution or linear layer followed by an inference-mode BatchNorm is fitted as one affine
layer ``s ⊙ (W x + d) + t`` (``s``, ``t`` from the BatchNorm; the objective is measured after it):
the fitted shift goes into the layer's bias, or into the BatchNorm's shift for bias-free
convolutions, and the BatchNorm's running statistics are reset to the statistics of the new
pre-norm outputs with its affine adjusted so the function is exactly what was fitted (so a later
statistics reset changes little). Layers fitted: ``linear`` and ungrouped ``conv2d`` whose weight
is a state-dict parameter used once; others (grouped/depthwise convolutions, tied weights, ops
without a rule in :data:`LAYER_RULES`) keep their partially merged weights and are reported as
skipped.

The graph is the ``torch.export`` program of the widened merged model, run node by node for
every batch in lockstep (:class:`_Stepper`): each batch pauses just before the layer being fitted,
so one pass over the merged model and one over each original per batch suffices for the whole
fit. Convolutions are sampled at ``positions`` random output locations per image.

Multi-head models (two label spaces): ``keep_heads=True`` keeps both output layers; the merged
model returns A's outputs then B's, concatenated along the output dimension (a ``(N, C_A + C_B)``
tensor for classifiers: with A's classes before B's, the argmax over it is a joint prediction).
"""

from __future__ import annotations

import itertools
import logging
import time
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F
from torch import fx, nn
from torch.export.graph_signature import InputKind
from torch.utils import _pytree as pytree
from tqdm.auto import tqdm

from permerge.apply import apply_permutation
from permerge.errors import PermergeError
from permerge.graph import trace_graph
from permerge.graph.capture import capture
from permerge.match.activation import activation_matching, batch_inputs
from permerge.merge.partial import Budget, PartialMergeResult, partial_merge, resolve_budget
from permerge.permutation import Permutation
from permerge.repair import reset_bn_stats
from permerge.spec import PermutationSpec

LOG = logging.getLogger(__name__)

__all__ = ["LAYER_RULES", "Layer", "LayerFit", "PleasResult", "pleas", "register_layer_rule", "ridge_step"]

aten = torch.ops.aten


# -- layers: a registry of small rules over the exported graph ------------------------------------


@dataclass(frozen=True)
class Norm:
    """An inference-mode BatchNorm right after a layer (its only user), folded into the fit."""

    node: str
    weight: str
    bias: str
    mean: str
    var: str
    eps: float


@dataclass(frozen=True)
class Layer:
    """A fittable layer: ``node`` computes ``weight · input (+ bias)``; its feature is ``target``."""

    node: str
    kind: str  # "linear" | "conv2d"
    input: str
    weight: str
    bias: str | None
    conv: tuple[tuple[int, ...], tuple[int, ...], tuple[int, ...]] | None = None  # stride, padding, dilation
    norm: Norm | None = None

    @property
    def target(self) -> str:
        return self.norm.node if self.norm else self.node


LayerRule = Callable[[fx.Node, Mapping[str, str]], "Layer | str"]
LAYER_RULES: dict[Any, LayerRule] = {}
"""ATen op → rule returning a :class:`Layer`, or a string saying why the node cannot be fitted."""


def register_layer_rule(*ops: Any) -> Callable[[LayerRule], LayerRule]:
    def decorate(fn: LayerRule) -> LayerRule:
        for op in ops:
            LAYER_RULES[op] = fn
        return fn

    return decorate


def _arg(node: fx.Node, i: int, name: str, default: Any = None) -> Any:
    return node.args[i] if len(node.args) > i else node.kwargs.get(name, default)


def _param(a: Any, params: Mapping[str, str]) -> str | None:
    return params.get(a.name) if isinstance(a, fx.Node) else None


@register_layer_rule(aten.linear.default)
def _linear(node: fx.Node, params: Mapping[str, str]) -> Layer | str:
    w, b = _param(node.args[1], params), _param(_arg(node, 2, "bias"), params)
    if w is None or (_arg(node, 2, "bias") is not None and b is None):
        return "weight or bias is not a state-dict tensor"
    return Layer(node.name, "linear", node.args[0].name, w, b)


@register_layer_rule(aten.conv2d.default)
def _conv2d(node: fx.Node, params: Mapping[str, str]) -> Layer | str:
    w, b = _param(node.args[1], params), _param(_arg(node, 2, "bias"), params)
    if w is None or (_arg(node, 2, "bias") is not None and b is None):
        return "weight or bias is not a state-dict tensor"
    if _arg(node, 6, "groups", 1) != 1:
        return "grouped convolution"

    def pair(v: Any) -> tuple[int, ...]:
        return tuple(v) * (2 // len(v)) if isinstance(v, (list, tuple)) else (int(v), int(v))

    conv = (pair(_arg(node, 3, "stride", 1)), pair(_arg(node, 4, "padding", 0)), pair(_arg(node, 5, "dilation", 1)))
    return Layer(node.name, "conv2d", node.args[0].name, w, b, conv)


def _norm_after(node: fx.Node, params: Mapping[str, str]) -> Norm | None:
    users = list(node.users)
    if len(users) != 1 or users[0].target is not aten.batch_norm.default:
        return None
    bn = users[0]
    if bn.args[0] is not node or _arg(bn, 5, "training") is not False:
        return None
    keys = [_param(_arg(bn, i, n), params) for i, n in ((1, "weight"), (2, "bias"), (3, "running_mean"), (4, "running_var"))]
    if any(k is None for k in keys):
        return None  # non-affine BatchNorm: its shift cannot absorb the fitted bias
    return Norm(bn.name, *keys, float(_arg(bn, 7, "eps", 1e-5)))  # type: ignore[arg-type]


def _param_names(program: torch.export.ExportedProgram) -> dict[str, str]:
    return {
        s.arg.name: s.target
        for s in program.graph_signature.input_specs
        if s.kind in (InputKind.PARAMETER, InputKind.BUFFER) and s.target is not None
    }


def find_layers(program: torch.export.ExportedProgram) -> tuple[list[Layer], dict[str, str]]:
    """Fittable layers in graph order, and ``{node: reason}`` for layer-like nodes that are not."""
    params = _param_names(program)
    uses: dict[str, int] = {}
    for n in program.graph.nodes:
        for a in n.all_input_nodes:
            if a.name in params:
                uses[params[a.name]] = uses.get(params[a.name], 0) + 1
    layers, skipped = [], {}
    for n in program.graph.nodes:
        rule = LAYER_RULES.get(n.target)
        if rule is None:
            continue
        got = rule(n, params)
        if isinstance(got, str):
            skipped[n.name] = got
        elif uses.get(got.weight, 0) != 1:
            skipped[n.name] = f"weight {got.weight!r} is used by {uses.get(got.weight, 0)} nodes"
        else:
            norm = _norm_after(n, params)
            layers.append(Layer(got.node, got.kind, got.input, got.weight, got.bias, got.conv, norm))
    return layers, skipped


# -- running a graph node by node -----------------------------------------------------------------


class _Stepper:
    """Runs an exported graph on one batch, node by node, pausing where asked.

    Parameters and buffers are looked up in ``params`` when a node uses them, so weights refitted
    while the stepper is paused take effect for every node not yet run. Values are freed after
    their last use, except the nodes in ``keep``, which are held until :meth:`take`.
    """

    def __init__(self, program: torch.export.ExportedProgram, params: Mapping[str, torch.Tensor],
                 args: tuple[Any, ...], kwargs: Mapping[str, Any], keep: set[str]) -> None:  # fmt: skip
        self.nodes = list(program.graph.nodes)
        self.params, self.keep = params, keep
        self.lazy: dict[str, str] = {}
        self.env: dict[str, Any] = {}
        self.kept: dict[str, Any] = {}
        user = iter(pytree.tree_flatten((tuple(args), dict(kwargs)))[0])
        placeholders = [n for n in self.nodes if n.op == "placeholder"]
        for spec, node in zip(program.graph_signature.input_specs, placeholders):
            if spec.kind in (InputKind.PARAMETER, InputKind.BUFFER) and spec.target in params:
                self.lazy[node.name] = spec.target
            elif spec.kind in (InputKind.PARAMETER, InputKind.BUFFER):
                self.env[node.name] = program.state_dict.get(spec.target, program.constants.get(spec.target))
            elif spec.kind in (InputKind.CONSTANT_TENSOR, InputKind.CUSTOM_OBJ):
                self.env[node.name] = program.constants[spec.target]
            elif spec.kind == InputKind.USER_INPUT:
                self.env[node.name] = next(user)
            else:
                raise PermergeError(f"cannot feed graph input of kind {spec.kind}")
        last: dict[str, int] = {}
        for i, n in enumerate(self.nodes):
            for a in n.all_input_nodes:
                last[a.name] = i
        self.free_at: dict[int, list[str]] = {}
        for name, i in last.items():
            self.free_at.setdefault(i, []).append(name)
        self.i = len(placeholders)

    def _get(self, n: fx.Node) -> Any:
        return self.params[self.lazy[n.name]] if n.name in self.lazy else self.env[n.name]

    def _step(self) -> None:
        n = self.nodes[self.i]
        if n.op == "call_function":
            args, kwargs = fx.node.map_arg((n.args, n.kwargs), self._get)
            self.env[n.name] = n.target(*args, **kwargs)
            if n.name in self.keep:
                self.kept[n.name] = self.env[n.name]
        elif n.op != "output":
            raise PermergeError(f"cannot run graph node {n.name} ({n.op})")
        for name in self.free_at.get(self.i, ()):
            self.env.pop(name, None)
        self.i += 1

    def run_to(self, name: str) -> None:
        """Run every node before ``name`` (``name`` itself not yet)."""
        while self.nodes[self.i].name != name:
            if self.nodes[self.i].op == "output":
                raise PermergeError(f"graph node {name} was not reached")
            self._step()

    def value(self, name: str) -> Any:
        return self.env[name]

    def take(self, name: str) -> Any:
        """The value of kept node ``name``, running the graph up to it if needed."""
        while name not in self.kept:
            if self.nodes[self.i].op == "output":
                raise PermergeError(f"graph node {name} was not reached")
            self._step()
        return self.kept.pop(name)


# -- the least-squares step -----------------------------------------------------------------------


def ridge_step(gram: torch.Tensor, cross: torch.Tensor, yy: torch.Tensor, w0: torch.Tensor, ridge: float
               ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:  # fmt: skip
    """Minimise ``||W X − Y||² + λ||W − W0||²`` row by row from ``X Xᵀ`` (``gram``), ``Y Xᵀ``
    (``cross``) and ``Σ Y²`` per row (``yy``), with ``λ = ridge · mean(diag(gram))``.

    Returns ``(W, before, after)``: the new weights and each row's ``||W X − Y||²`` at ``W0`` and
    at ``W``. Rows whose computed residual would grow keep ``W0``, so ``after <= before``.
    """
    gram, cross, yy, w0 = gram.double(), cross.double(), yy.double(), w0.double()

    def residual(w: torch.Tensor) -> torch.Tensor:
        return ((w @ gram) * w).sum(1) - 2 * (w * cross).sum(1) + yy

    lam = ridge * gram.diagonal().mean().clamp_min(1e-12)
    eye = torch.eye(len(gram), dtype=gram.dtype)
    w = torch.linalg.solve(gram + lam * eye, (cross + lam * w0).T).T
    before, after = residual(w0), residual(w)
    worse = after > before
    w[worse] = w0[worse]
    after = torch.where(worse, before, after)
    return w, before, after


@dataclass(frozen=True)
class LayerFit:
    """One layer's least-squares fit: mean squared feature error per unit and sample, before/after."""

    weight: str
    kind: str
    norm: str | None  # the folded BatchNorm's node, if any
    samples: int
    before: float
    after: float
    seconds: float


@dataclass(frozen=True)
class PleasResult:
    """The merged model (widened per ``partial.widths``), how it was built, and every layer's fit."""

    model: nn.Module
    state_dict: Mapping[str, torch.Tensor]
    partial: PartialMergeResult
    permutation: Permutation
    layers: tuple[LayerFit, ...]
    skipped: Mapping[str, str]  # layer node → why it kept its partially merged weights
    complete: bool  # every fittable layer was fitted within the step/time budget
    seconds: float
    timing: Mapping[str, float] = field(default_factory=dict)

    @property
    def widths(self) -> Mapping[str, int]:
        return self.partial.widths

    def architecture(self) -> dict[str, Any]:
        arch = self.partial.architecture()
        arch["parameters"] = sum(p.numel() for p in self.model.parameters())
        arch["pleas"] = {
            "complete": self.complete,
            "layers": [{"weight": f.weight, "samples": f.samples, "before": f.before, "after": f.after} for f in self.layers],
            "skipped": dict(self.skipped),
        }
        return arch


def pleas(
    model_a: nn.Module,
    model_b: nn.Module,
    data: Iterable[Any],
    *,
    budget: Budget = 1.0,
    keep_heads: bool = False,
    perm: Mapping[str, torch.Tensor] | None = None,
    costs: Mapping[str, torch.Tensor] | None = None,
    spec: PermutationSpec | None = None,
    batches: int = 16,
    positions: int = 32,
    ridge: float = 1e-2,
    max_layers: int | None = None,
    max_seconds: float | None = None,
    reset_bn: bool = True,
    input_fn: Callable[[Any], tuple[Any, ...]] = batch_inputs,
    example_kwargs: Mapping[str, Any] | None = None,
    seed: int = 0,
    quiet: bool = False,
) -> PleasResult:
    """Merge A and B with PLeaS: activation matching, partial merging, layer-wise least squares.

    Args:
        model_a, model_b: same architecture (for two label spaces, two heads of the same shape);
            neither is modified.
        data: unlabeled batches (a DataLoader, a list of tensors, ``(inputs, labels)`` pairs:
            ``input_fn`` picks the inputs). The first ``batches`` batches of the first batch's
            shape are used for matching, the BatchNorm reset and the fits.
        budget: merged width ratio in [1, 2], global or per group (see :func:`partial_merge`).
        keep_heads: keep both models' outputs (returned concatenated, A's first).
        perm, costs: a precomputed alignment of B to A and per-group unit similarities (see
            :func:`~permerge.merge.partial.partial_merge`); without ``perm`` both come from
            :func:`~permerge.match.activation.activation_matching` on ``data``; a ``perm`` without
            ``costs`` ranks pairs by the similarity of their weights.
        spec: groups to merge (default: traced from A on the first batch).
        positions: output locations sampled per image for a convolution's fit.
        ridge: pull towards the partially merged weights, relative to the input scale.
        max_layers, max_seconds: step and time budget of the least-squares phase; layers not
            reached keep their partially merged weights (``result.complete`` is then False).
        reset_bn: re-estimate BatchNorm statistics of the partial merge on ``data`` first.

    Returns:
        :class:`PleasResult`; ``result.model`` is model A's class with widened layers.

    Example:
        >>> import torch
        >>> from permerge.models import MLP
        >>> a, b = MLP(hidden=(16,)), MLP(hidden=(16,))
        >>> data = [torch.randn(32, 784) for _ in range(4)]
        >>> res = pleas(a, b, data, budget=1.5, quiet=True)
        >>> dict(res.widths), all(f.after <= f.before for f in res.layers)
        ({'net.1.weight:0': 24}, True)
    """
    if not ridge > 0:
        raise PermergeError(f"ridge must be > 0 (the pull towards the partial merge keeps each fit well posed), got {ridge}")
    if positions < 1:
        raise PermergeError(f"positions must be >= 1, got {positions}")
    start = time.perf_counter()
    timing: dict[str, float] = {}
    kwargs = dict(example_kwargs or {})
    inputs = _take_batches(data, batches, input_fn)
    traced = trace_graph(model_a, inputs[0], example_kwargs=kwargs)
    spec = spec or traced.spec
    resolve_budget(spec, budget)  # fail before the expensive steps
    timing["trace"] = time.perf_counter() - start
    t0 = time.perf_counter()
    if perm is None:
        am = activation_matching(model_a, model_b, spec, inputs, input_fn=lambda b: b, example_kwargs=kwargs,
                                 return_costs=True, quiet=quiet)  # fmt: skip
        perm, costs = am.permutation, (am.costs if costs is None else costs)
    timing["match"] = time.perf_counter() - t0
    t0 = time.perf_counter()
    part = partial_merge(traced if spec is traced.spec else spec, model_a, model_b, perm, costs, budget,
                         keep_heads=keep_heads, example_inputs=inputs[0], example_kwargs=kwargs)  # fmt: skip
    merged = part.model
    if reset_bn:
        if all(len(x) == 1 for x in inputs) and not kwargs:
            merged = reset_bn_stats(merged, [x[0] for x in inputs], batches=len(inputs))
        else:
            LOG.warning("BatchNorm statistics not reset: the model takes several inputs")
    timing["partial"] = time.perf_counter() - t0
    t0 = time.perf_counter()
    sd = {k: v.detach().clone() for k, v in merged.state_dict().items()}
    fits, skipped, complete = _least_squares(
        traced.program, merged, sd, model_a.state_dict(), apply_permutation(spec, perm, model_b.state_dict()),
        part, inputs, kwargs, positions=positions, ridge=ridge, max_layers=max_layers, max_seconds=max_seconds,
        seed=seed, quiet=quiet,
    )  # fmt: skip
    merged.load_state_dict(sd)
    timing["least_squares"] = time.perf_counter() - t0
    seconds = time.perf_counter() - start
    LOG.info("PLeaS: %d layers fitted in %.1f s (%s)", len(fits), seconds, "complete" if complete else "budget reached")
    return PleasResult(merged.eval(), sd, part, dict(perm), tuple(fits), skipped, complete, seconds, timing)


def _take_batches(data: Iterable[Any], batches: int, input_fn: Callable[[Any], tuple[Any, ...]]) -> list[tuple[Any, ...]]:
    if batches < 1:
        raise PermergeError(f"batches must be >= 1, got {batches}")
    out: list[tuple[Any, ...]] = []
    shape = None
    for batch in itertools.islice(data, batches):
        x = tuple(input_fn(batch))
        s = [tuple(t.shape) for t in x if isinstance(t, torch.Tensor)]
        if shape is None:
            shape = s
        if s == shape:
            out.append(x)
        else:
            LOG.warning("skipping a batch of shape %s (the first had %s)", s, shape)
    if not out:
        raise PermergeError("PLeaS needs data: the iterable is empty")
    return out


def _least_squares(
    program: torch.export.ExportedProgram,
    merged: nn.Module,
    sd: dict[str, torch.Tensor],
    sd_a: Mapping[str, torch.Tensor],
    sd_bp: Mapping[str, torch.Tensor],
    part: PartialMergeResult,
    inputs: list[tuple[Any, ...]],
    kwargs: Mapping[str, Any],
    *,
    positions: int,
    ridge: float,
    max_layers: int | None,
    max_seconds: float | None,
    seed: int,
    quiet: bool,
) -> tuple[list[LayerFit], dict[str, str], bool]:
    """Fit every layer of the merged model in graph order; updates ``sd`` in place."""
    merged_program = capture(merged, inputs[0], kwargs).program
    layers, skipped = find_layers(merged_program)
    originals = {layer.weight: layer for layer in find_layers(program)[0]}
    todo = []
    for layer in layers:
        orig = originals.get(layer.weight)
        if orig is None or (orig.norm is None) != (layer.norm is None):
            skipped[layer.node] = "no matching layer in the original models"
        else:
            todo.append((layer, orig))
    keep = {o.target for _, o in todo}
    steppers = [
        (_Stepper(merged_program, sd, x, kwargs, set()), _Stepper(program, sd_a, x, kwargs, keep),
         _Stepper(program, sd_bp, x, kwargs, keep))
        for x in inputs
    ]  # fmt: skip
    fits: list[LayerFit] = []
    start = time.perf_counter()
    complete = True
    with torch.no_grad():
        for li, (layer, orig) in enumerate(tqdm(todo, desc="PLeaS least squares", disable=quiet)):
            if (max_layers is not None and li >= max_layers) or (
                max_seconds is not None and time.perf_counter() - start > max_seconds
            ):
                complete = False
                for rest, _ in todo[li:]:
                    skipped[rest.node] = "step/time budget reached"
                break
            t0 = time.perf_counter()
            gen = torch.Generator().manual_seed(seed * 100_003 + li)
            out_map = part.output_map(layer.weight, 0)
            scale, shift = _affine(layer, sd)
            kernel = tuple(sd[layer.weight].shape[2:])
            acc = _Accumulator()
            for m, a, b in steppers:
                m.run_to(layer.node)
                xs, (ya, yb) = _samples(layer, m.value(layer.input), (a.take(orig.target), b.take(orig.target)),
                                        positions, gen, kernel)  # fmt: skip
                y = out_map.merge(ya, yb, dim=1)
                acc.add(xs, (y - shift) / scale)  # the pre-norm values the folded norm maps onto y
            fits.append(_solve(layer, acc, sd, scale, ridge, time.perf_counter() - t0))
    return fits, skipped, complete


def _affine(layer: Layer, sd: Mapping[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    """``(s, t)`` of the folded inference BatchNorm ``y = s·z + t`` (1 and 0 without one); a zero
    scale is replaced by 1 (that unit's fit is then discarded, see :func:`_solve`)."""
    if layer.norm is None:
        return torch.ones(()), torch.zeros(())
    n = layer.norm
    s = sd[n.weight].double() / (sd[n.var].double() + n.eps).sqrt()
    t = sd[n.bias].double() - s * sd[n.mean].double()
    s = torch.where(s.abs() < 1e-12, torch.ones_like(s), s)
    return s.float(), t.float()


def _samples(layer: Layer, x: torch.Tensor, ys: tuple[torch.Tensor, torch.Tensor], positions: int,
             gen: torch.Generator, kernel: tuple[int, ...]) -> tuple[torch.Tensor, list[torch.Tensor]]:  # fmt: skip
    """Rows of the layer's input (im2col patches for a convolution) and the features there."""
    if layer.kind == "conv2d":
        stride, padding, dilation = layer.conv  # type: ignore[misc]
        n, c, h, w = ys[0].shape
        cols = F.unfold(x.float(), kernel, dilation=dilation, padding=padding, stride=stride)  # (N, P, H*W)
        p = min(positions, h * w)
        idx = torch.rand(n, h * w, generator=gen).argsort(1)[:, :p]
        xs = cols.gather(2, idx.unsqueeze(1).expand(-1, cols.shape[1], -1)).transpose(1, 2).reshape(n * p, -1)
        out = [y.float().reshape(n, c, h * w).gather(2, idx.unsqueeze(1).expand(-1, c, -1)).transpose(1, 2).reshape(n * p, c)
               for y in ys]  # fmt: skip
        return xs, out
    x = x.float()
    if x.dim() <= 2:
        return x.reshape(-1, x.shape[-1]), [y.float().reshape(-1, y.shape[-1]) for y in ys]
    n, f = x.shape[0], x.shape[-1]
    x = x.reshape(n, -1, f)
    p = min(positions, x.shape[1])
    idx = torch.rand(n, x.shape[1], generator=gen).argsort(1)[:, :p]
    xs = x.gather(1, idx.unsqueeze(-1).expand(-1, -1, f)).reshape(n * p, f)
    out = []
    for y in ys:
        y = y.float().reshape(n, -1, y.shape[-1])
        out.append(y.gather(1, idx.unsqueeze(-1).expand(-1, -1, y.shape[-1])).reshape(n * p, -1))
    return xs, out


class _Accumulator:
    """Running ``X̃ᵀX̃``, ``YᵀX̃`` and ``Σ Y²`` per output unit (X̃: X with a column of ones), float64."""

    def __init__(self) -> None:
        self.gram = self.cross = self.yy = None  # type: ignore[var-annotated]
        self.count = 0

    def add(self, x: torch.Tensor, y: torch.Tensor) -> None:
        x = torch.cat([x, x.new_ones(len(x), 1)], 1)
        g, c, yy = (x.T @ x).double(), (y.T @ x).double(), (y.double() ** 2).sum(0)
        self.gram = g if self.gram is None else self.gram + g
        self.cross = c if self.cross is None else self.cross + c
        self.yy = yy if self.yy is None else self.yy + yy
        self.count += len(x)


def _solve(layer: Layer, acc: _Accumulator, sd: dict[str, torch.Tensor], scale: torch.Tensor, ridge: float,
           seconds: float) -> LayerFit:  # fmt: skip
    """Ridge-fit one layer from its statistics and write the weights (and the folded norm) into ``sd``."""
    weight = sd[layer.weight]
    out, p = weight.shape[0], weight[0].numel()
    fit_shift = layer.bias is not None or layer.norm is not None
    bias0 = sd[layer.bias].double() if layer.bias is not None else torch.zeros(out, dtype=torch.float64)
    w0 = torch.cat([weight.reshape(out, p).double(), bias0[:, None]], 1)  # shift column: bias, or 0 (norm's shift)
    n = slice(None) if fit_shift else slice(0, p)
    gram, cross, yy = acc.gram[n, n], acc.cross[:, n], acc.yy  # type: ignore[index]
    w, before, after = ridge_step(gram, cross, yy, w0[:, n], ridge)
    if layer.norm is not None:
        dead = (sd[layer.norm.weight].double() / (sd[layer.norm.var].double() + layer.norm.eps).sqrt()).abs() < 1e-12
        w[dead], before[dead], after[dead] = w0[dead], 0.0, 0.0
    if not fit_shift:
        w = torch.cat([w, w0[:, p:]], 1)
    sd[layer.weight] = w[:, :p].reshape(weight.shape).to(weight.dtype)
    if layer.bias is not None:
        sd[layer.bias] = w[:, p].to(sd[layer.bias].dtype)
    if layer.norm is not None:
        _refold_norm(layer, sd, w, acc, scale.double())
    units = (scale.double() ** 2).expand(out) if layer.norm is not None else torch.ones(out, dtype=torch.float64)
    denom = max(acc.count, 1) * out
    return LayerFit(
        layer.weight, layer.kind, layer.norm.node if layer.norm else None, acc.count,
        max(0.0, float((units * before).sum() / denom)), max(0.0, float((units * after).sum() / denom)), seconds,
    )  # fmt: skip


def _refold_norm(layer: Layer, sd: dict[str, torch.Tensor], w: torch.Tensor, acc: _Accumulator, s: torch.Tensor) -> None:
    """Make the BatchNorm compute ``s·(W x + shift) + t`` with running statistics equal to those of
    its new input ``z`` (so the function is exactly the fitted one, and the statistics are honest)."""
    norm = layer.norm
    assert norm is not None
    p = w.shape[1] - 1
    t = sd[norm.bias].double() - s * sd[norm.mean].double()
    z_w = torch.cat([w[:, :p], (w[:, p] if layer.bias is not None else torch.zeros_like(w[:, p]))[:, None]], 1)
    shift = torch.zeros_like(w[:, p]) if layer.bias is not None else w[:, p]
    count = max(acc.count, 1)
    mean = (z_w @ acc.gram[:, p]) / count  # type: ignore[index]
    var = (((z_w @ acc.gram) * z_w).sum(1) / count - mean**2).clamp_min(0)
    alive = (sd[norm.weight].double() / (sd[norm.var].double() + norm.eps).sqrt()).abs() >= 1e-12
    gamma = s * (var + norm.eps).sqrt()
    beta = t + s * (mean + shift)
    for key, new in ((norm.mean, mean), (norm.var, var), (norm.weight, gamma), (norm.bias, beta)):
        sd[key] = torch.where(alive, new, sd[key].double()).to(sd[key].dtype)
