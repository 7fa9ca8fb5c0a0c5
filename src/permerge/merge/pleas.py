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
is a state-dict parameter used once (a filter over the traced layers, :func:`fittable_layers`);
others (grouped/depthwise convolutions, tied weights, computed weights) keep their partially
merged weights and are reported as skipped.

The graph is the traced program of the widened merged model, run node by node for every batch in
lockstep by the one graph runner (:mod:`permerge.graph.run`): it pauses just before the layer
being fitted, so one pass over the merged model and one over each original suffices for the whole
fit. Convolutions are sampled at ``positions`` random output locations per image.

Multi-head models (two label spaces): ``keep_heads=True`` keeps both output layers; the merged
model returns A's outputs then B's, concatenated along the output dimension (a ``(N, C_A + C_B)``
tensor for classifiers: with A's classes before B's, the argmax over it is a joint prediction).
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field, replace
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from permerge.apply import apply_permutation
from permerge.batches import take_batches
from permerge.errors import PermergeError
from permerge.graph import Traced, trace_graph
from permerge.graph.layers import CONV, LINEAR, Layer
from permerge.graph.run import GraphRunner
from permerge.match.activation import activation_matching, batch_inputs
from permerge.merge.partial import Budget, PartialMergeResult, partial_merge, resolve_budget
from permerge.permutation import Permutation
from permerge.progress import progress
from permerge.repair import reset_bn_stats
from permerge.spec import PermutationSpec

LOG = logging.getLogger(__name__)

__all__ = ["LayerFit", "PleasResult", "fittable_layers", "pleas", "ridge_step"]

aten = torch.ops.aten


# -- fittable layers: a filter over the traced layers ---------------------------------------------


def fittable_layers(traced: Traced) -> tuple[list[Layer], dict[str, str]]:
    """The layers PLeaS refits, in graph order, and ``{node: reason}`` for the linear/conv ones it
    cannot: weights in the ``(out, in, ...)`` layout that only this layer reads, ungrouped 2-d
    convolutions; a following inference-mode BatchNorm is folded into the fit (:attr:`Layer.norm`)."""
    layers, skipped = [], {}
    for la in traced.layers:
        if la.op not in (LINEAR, CONV):
            continue
        if la.weight is None or la.computed:
            skipped[la.node] = "weight or bias is not a state-dict tensor"
        elif la.shared:
            skipped[la.node] = f"weight {la.weight!r} is tied or read by another node"
        elif la.weight_dim != 0:
            skipped[la.node] = "weight stored as (in, out) (a Conv1D)"
        elif la.op == CONV and (la.groups != 1 or la.conv is None or len(la.conv[0]) != 2):
            skipped[la.node] = "grouped convolution" if la.groups != 1 else "not a 2-d convolution"
        else:
            norm = traced.layer(la.norm) if la.norm is not None else None
            folded = norm is not None and norm.rewritable and norm.bias is not None and norm.running is not None
            layers.append(replace(la, norm=la.norm if folded else None))
    return layers, skipped


def _target(traced: Traced, layer: Layer) -> tuple[str, int | None]:
    """The node whose value is the layer's feature (after a folded BatchNorm) and its tuple index."""
    if layer.norm is None:
        return layer.node, layer.output_index
    norm = traced.layer(layer.norm)
    assert norm is not None
    return norm.node, norm.output_index


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
    op: str  # "linear" | "conv"
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
    inputs = take_batches(data, batches, "PLeaS", lambda b: tuple(input_fn(b)))
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
    part = partial_merge(spec, model_a, model_b, perm, costs, budget,
                         keep_heads=keep_heads, example_inputs=inputs[0], example_kwargs=kwargs)  # fmt: skip
    merged = part.model
    if reset_bn:  # each batch as (inputs,): a tuple of positional inputs, whatever their number
        merged = reset_bn_stats(merged, [(x,) for x in inputs], batches=len(inputs), example_kwargs=kwargs)
    timing["partial"] = time.perf_counter() - t0
    t0 = time.perf_counter()
    sd = {k: v.detach().clone() for k, v in merged.state_dict().items()}
    fits, skipped, complete = _least_squares(
        traced, merged, sd, model_a.state_dict(), apply_permutation(spec, perm, model_b.state_dict()),
        part, inputs, kwargs, positions=positions, ridge=ridge, max_layers=max_layers, max_seconds=max_seconds,
        seed=seed, quiet=quiet,
    )  # fmt: skip
    merged.load_state_dict(sd)
    timing["least_squares"] = time.perf_counter() - t0
    seconds = time.perf_counter() - start
    LOG.info("PLeaS: %d layers fitted in %.1f s (%s)", len(fits), seconds, "complete" if complete else "budget reached")
    return PleasResult(merged.eval(), sd, part, dict(perm), tuple(fits), skipped, complete, seconds, timing)


def _least_squares(
    traced: Traced,
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
    """Fit every layer of the merged model in graph order; updates ``sd`` in place.

    Three runs of the graph advance in lockstep over all batches (the one graph runner): the merged
    model's pauses before each layer it fits (reading ``sd`` at each use, so every refit takes effect
    downstream), A's and π(B)'s keep each layer's feature until it is taken.
    """
    merged_traced = trace_graph(merged, inputs[0], example_kwargs=kwargs)
    layers, skipped = fittable_layers(merged_traced)
    originals = {layer.weight: layer for layer in fittable_layers(traced)[0]}
    todo = []
    for layer in layers:
        orig = originals.get(layer.weight)
        if orig is None or (orig.norm is None) != (layer.norm is None):
            skipped[layer.node] = "no matching layer in the original models"
        else:
            todo.append((layer, merged_traced.layer(layer.norm) if layer.norm else None, _target(traced, orig)))
    batches = [(x, dict(kwargs)) for x in inputs]
    keep = [t for _, _, (t, _) in todo]
    runs = (GraphRunner(merged_traced.program, sd, batches), GraphRunner(traced.program, sd_a, batches, keep=keep),
            GraphRunner(traced.program, sd_bp, batches, keep=keep))  # fmt: skip
    fits: list[LayerFit] = []
    start = time.perf_counter()
    complete = True
    with torch.no_grad():
        for li, (layer, norm, (target, index)) in enumerate(progress(todo, desc="PLeaS least squares", quiet=quiet)):
            if (max_layers is not None and li >= max_layers) or (
                max_seconds is not None and time.perf_counter() - start > max_seconds
            ):
                complete = False
                for rest, _, _ in todo[li:]:
                    skipped[rest.node] = "step/time budget reached"
                break
            t0 = time.perf_counter()
            gen = torch.Generator().manual_seed(seed * 100_003 + li)
            out_map = part.output_map(layer.weight, 0)
            scale, shift = _affine(norm, sd)
            kernel = tuple(sd[layer.weight].shape[2:])
            acc = _Accumulator()
            runs[0].run_to(layer.node)
            xs_all = runs[0].values(layer.input)
            ya_all, yb_all = (r.take(target) for r in runs[1:])
            for x, ya, yb in zip(xs_all, ya_all, yb_all):
                if index is not None:
                    ya, yb = ya[index], yb[index]
                xs, (ya, yb) = _samples(layer, x, (ya, yb), positions, gen, kernel)
                y = out_map.merge(ya, yb, dim=1)
                acc.add(xs, (y - shift) / scale)  # the pre-norm values the folded norm maps onto y
            fits.append(_solve(layer, norm, acc, sd, scale, ridge, time.perf_counter() - t0))
    return fits, skipped, complete


def _affine(norm: Layer | None, sd: Mapping[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    """``(s, t)`` of the folded inference BatchNorm ``y = s·z + t`` (1 and 0 without one); a zero
    scale is replaced by 1 (that unit's fit is then discarded, see :func:`_solve`)."""
    if norm is None:
        return torch.ones(()), torch.zeros(())
    s = _norm_scale(norm, sd)
    t = sd[norm.bias].double() - s * sd[norm.running[0]].double()  # type: ignore[index]
    s = torch.where(s.abs() < 1e-12, torch.ones_like(s), s)
    return s.float(), t.float()


def _norm_scale(norm: Layer, sd: Mapping[str, torch.Tensor]) -> torch.Tensor:
    """An inference BatchNorm's per-channel scale ``γ / sqrt(var + ε)``, float64."""
    return sd[norm.weight].double() / (sd[norm.running[1]].double() + norm.eps).sqrt()  # type: ignore[index, operator]


def _samples(layer: Layer, x: torch.Tensor, ys: tuple[torch.Tensor, torch.Tensor], positions: int,
             gen: torch.Generator, kernel: tuple[int, ...]) -> tuple[torch.Tensor, list[torch.Tensor]]:  # fmt: skip
    """Rows of the layer's input (im2col patches for a convolution) and the features there."""
    if layer.op == CONV:
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


def _solve(layer: Layer, norm: Layer | None, acc: _Accumulator, sd: dict[str, torch.Tensor], scale: torch.Tensor,
           ridge: float, seconds: float) -> LayerFit:  # fmt: skip
    """Ridge-fit one layer from its statistics and write the weights (and the folded norm) into ``sd``."""
    weight = sd[layer.weight]
    out, p = weight.shape[0], weight[0].numel()
    fit_shift = layer.bias is not None or norm is not None
    bias0 = sd[layer.bias].double() if layer.bias is not None else torch.zeros(out, dtype=torch.float64)
    w0 = torch.cat([weight.reshape(out, p).double(), bias0[:, None]], 1)  # shift column: bias, or 0 (norm's shift)
    n = slice(None) if fit_shift else slice(0, p)
    gram, cross, yy = acc.gram[n, n], acc.cross[:, n], acc.yy  # type: ignore[index]
    w, before, after = ridge_step(gram, cross, yy, w0[:, n], ridge)
    if norm is not None:
        dead = _norm_scale(norm, sd).abs() < 1e-12
        w[dead], before[dead], after[dead] = w0[dead], 0.0, 0.0
    if not fit_shift:
        w = torch.cat([w, w0[:, p:]], 1)
    sd[layer.weight] = w[:, :p].reshape(weight.shape).to(weight.dtype)
    if layer.bias is not None:
        sd[layer.bias] = w[:, p].to(sd[layer.bias].dtype)
    if norm is not None:
        _refold_norm(layer, norm, sd, w, acc, scale.double())
    units = (scale.double() ** 2).expand(out) if norm is not None else torch.ones(out, dtype=torch.float64)
    denom = max(acc.count, 1) * out
    return LayerFit(
        layer.weight, layer.op, norm.node if norm else None, acc.count,
        max(0.0, float((units * before).sum() / denom)), max(0.0, float((units * after).sum() / denom)), seconds,
    )  # fmt: skip


def _refold_norm(layer: Layer, norm: Layer, sd: dict[str, torch.Tensor], w: torch.Tensor, acc: _Accumulator,
                 s: torch.Tensor) -> None:  # fmt: skip
    """Make the BatchNorm compute ``s·(W x + shift) + t`` with running statistics equal to those of
    its new input ``z`` (so the function is exactly the fitted one, and the statistics are honest)."""
    assert norm.running is not None and norm.weight is not None and norm.bias is not None and norm.eps is not None
    mean_key, var_key = norm.running
    p = w.shape[1] - 1
    t = sd[norm.bias].double() - s * sd[mean_key].double()
    z_w = torch.cat([w[:, :p], (w[:, p] if layer.bias is not None else torch.zeros_like(w[:, p]))[:, None]], 1)
    shift = torch.zeros_like(w[:, p]) if layer.bias is not None else w[:, p]
    count = max(acc.count, 1)
    mean = (z_w @ acc.gram[:, p]) / count  # type: ignore[index]
    var = (((z_w @ acc.gram) * z_w).sum(1) / count - mean**2).clamp_min(0)
    alive = _norm_scale(norm, sd).abs() >= 1e-12
    gamma = s * (var + norm.eps).sqrt()
    beta = t + s * (mean + shift)
    for key, new in ((mean_key, mean), (var_key, var), (norm.weight, gamma), (norm.bias, beta)):
        sd[key] = torch.where(alive, new, sd[key].double()).to(sd[key].dtype)
