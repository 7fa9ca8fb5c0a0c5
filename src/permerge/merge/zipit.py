"""ZipIt! (Stoica, Bolya et al., ICLR 2024): merge features within and across models, up to a depth.

Partial merging pairs each of A's units with one of B's (a permutation) and averages the pairs.
Models trained on different tasks share few features, so ZipIt! lets a feature merge with *any*
other feature of the ensemble — another model's, or one of its own model's (two redundant units of
A) — and can stop zipping at a depth, leaving the later layers as separate per-model heads.

Per group of ``n`` units, for ``N`` models (``N·n`` ensemble features):

1. **Statistics.** The Pearson correlation of every pair of ensemble features on unlabeled data
   (A×A, A×B, B×B, … blocks: the joint correlation of ``[f_A; f_B; …]``), at the group's
   activation sites of the traced graph, averaged over sites as activation matching does.
2. **Matching** (:func:`zip_features`, the paper's greedy algorithm). Repeatedly merge the two most
   correlated features — never a feature with itself — until ``width = round(budget·n)`` remain
   (``budget`` 1: as narrow as one model, the paper's full zip; ``N``: nothing merged).
   ``alpha`` (the paper's "repeated matching", §4.3): in [0, 1]; a merged feature may merge again,
   its correlation with every other feature being ``alpha`` times the smaller of its parts'; 0
   forbids it (every merged feature is exactly one pair). ``beta`` (the "same-model budget"): in
   [0, 1]; at most ``beta`` of the group's merges may join two features of one model (a merge of
   two features that share a model counts), split equally over the models (each model's share
   rounded half up); 0 forbids same-model
   merges, so with two models and ``alpha`` 0 the result is a greedy one-to-one matching of A's
   units with B's (partial merging solves that matching optimally and keeps the worst pairs
   apart; the greedy one keeps apart what is left unmatched — the two agree whenever the greedy
   pairs are also the optimal assignment).
3. **Zip.** The merge and unmerge maps of every group (:class:`~permerge.merge.partial.GroupMerge`,
   one slot per feature) are applied to every tensor as partial merging does
   (:func:`~permerge.merge.partial.merge_state_dicts`): ``M`` (average the features sent to one
   slot) on producer axes, ``U`` (sum the weights reading them) on consumer axes. The result is a
   widened copy of the first model's class (:func:`~permerge.merge.partial.widen_module`).

**Partial zip** (``depth``). A group is *zipped* when every linear/convolution layer writing its
features comes before the zip point; the others keep every model's units (width ``N·n``, the
ensemble's block-diagonal weights), so the layers past the zip point run as separate per-model
copies and the outputs are separate heads (every model's outputs, concatenated in model order).
``depth`` is a fraction of the traced linear/convolution layers that write hidden features (the
output layers do not count), in graph order — 0: nothing zipped, an ensemble in one module; 1 or
None: everything zipped — or the names of the groups to zip (:func:`zip_depths` gives each
group's depth).

Groups that cannot be widened or split into arbitrary slots (attention-head layouts, tied
parameters) are aligned to the first model by a linear assignment on the same correlations and
averaged, as partial merging does at budget 1; the result notes each one. BatchNorm statistics are
re-estimated on the data afterwards (``reset_bn``), as the paper does. When nothing was merged
(every group kept at full width) the result must reproduce every model exactly: it is checked on
the first batch.
"""

from __future__ import annotations

import logging
import math
import sys
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from types import MappingProxyType
from typing import Any

import torch
from torch import nn
from tqdm.auto import tqdm

from permerge.apply import apply_permutation
from permerge.batches import take_batches
from permerge.check import model_outputs
from permerge.errors import PermergeError
from permerge.graph import Traced, trace_graph
from permerge.graph.layers import CONV, CONV_TRANSPOSE, LINEAR
from permerge.match import lap
from permerge.match.activation import Correlation, batch_inputs, record, unit_samples
from permerge.merge import check_same_architecture
from permerge.merge.partial import (
    LOAD_HINT,
    Budget,
    BudgetError,
    GroupMerge,
    WidenedMerge,
    check_forward,
    consumer_axes,
    head_merges,
    merge_state_dicts,
    resolve_budget,
    unwidenable,
    widen_with_notes,
)
from permerge.permutation import Permutation, identity
from permerge.repair import reset_bn_stats
from permerge.spec import PRODUCER, PermutationSpec

LOG = logging.getLogger(__name__)

__all__ = ["ZipItError", "ZipItResult", "ZipStats", "check_options", "zip_depths", "zip_features", "zipit"]

Depth = float | Sequence[str] | None


class ZipItError(PermergeError, ValueError):
    """ZipIt!'s hyperparameters are out of range or cannot reach the requested width."""


@dataclass(frozen=True)
class ZipStats:
    """One group's zip: merges of two features of one model (``within``) or of different models
    (``across``), and the mean correlation of the merged features when they were chosen."""

    within: int
    across: int
    correlation: float


@dataclass(frozen=True, kw_only=True)
class ZipItResult(WidenedMerge):
    """The zipped model (the first model's class, widened where units were kept apart) and how.

    ``zipped`` are the merged groups (the rest keep every model's units); ``merges[g].slots[m]``
    the merged slot of model ``m``'s unit ``i``; ``stats[g]`` each zipped group's merge counts;
    ``aligned`` the groups that could not be zipped and were averaged after a linear-assignment
    alignment (with the reason); ``permutations[m]`` that alignment of model ``m`` (identity
    elsewhere); ``correlations`` the statistics the matching read (pass them to another call to
    try other hyperparameters without collecting them again).
    """

    alpha: float
    beta: float
    budgets: Mapping[str, float]
    zipped: tuple[str, ...]
    merges: Mapping[str, GroupMerge]
    stats: Mapping[str, ZipStats]
    aligned: Mapping[str, str]
    permutations: tuple[Permutation, ...]
    correlations: Mapping[str, torch.Tensor]  # group → joint correlation of the models' units (reusable)
    samples: int
    seconds: float
    timing: Mapping[str, float] = field(default_factory=dict)

    def architecture(self) -> dict[str, Any]:
        """A JSON-able description: per group its size, width, whether zipped and each model's slots."""
        return {
            "format": "permerge.zipit/1",
            "models": self.models,
            "alpha": self.alpha,
            "beta": self.beta,
            "keep_heads": self.keep_heads,
            "output": "every model's outputs, in model order, along the output dimension" if self.keep_heads
            else "the mean of the models' outputs",
            "parameters": self.num_parameters(),
            "groups": {
                name: {
                    "size": self.sizes[name], "width": self.widths[name], "zipped": name in self.zipped,
                    "budget": self.budgets.get(name), "aligned": self.aligned.get(name),
                    **({"within": s.within, "across": s.across, "correlation": s.correlation}
                       if (s := self.stats.get(name)) else {}),
                    "slots": [t.tolist() for t in self.merges[name].slots],
                }
                for name in self.merges
            },
            "tensors": {k: list(v) for k, v in sorted(self.widened.items())},
            "notes": list(self.notes),
            "load": LOAD_HINT,
        }  # fmt: skip


# -- the matching ---------------------------------------------------------------------------------


def _check_unit(name: str, value: Any) -> float:
    try:
        v = float(value)
    except (TypeError, ValueError):
        raise ZipItError(f"{name} must be a number in [0, 1], got {value!r}") from None
    if not 0.0 <= v <= 1.0:  # also rejects NaN
        meaning = {"alpha": "0: a merged feature never merges again, 1: it may, at its full correlation",
                   "beta": "0: no merge within one model, 1: every merge may be one, each model an equal share"}[name]  # fmt: skip
        raise ZipItError(f"{name} is {v:g}; it must lie in [0, 1] ({meaning})")
    return v


def zip_features(
    corr: torch.Tensor, models: int, width: int, *, alpha: float, beta: float, name: str = "group"
) -> tuple[GroupMerge, ZipStats]:
    """ZipIt!'s greedy matching of ``models·n`` ensemble features down to ``width`` merged ones.

    ``corr`` is the ``(models·n, models·n)`` correlation of the stacked features (model ``m``'s unit
    ``i`` at row ``m·n + i``). Merged slots are ordered by their first ensemble feature, so with
    ``width = models·n`` model ``m``'s unit ``i`` sits at slot ``m·n + i`` (the ensemble layout).

    Example:
        >>> corr = torch.tensor([[1., .1, .9, .2], [.1, 1., .3, .8], [.9, .3, 1., .1], [.2, .8, .1, 1.]])
        >>> gm, stats = zip_features(corr, 2, 2, alpha=0.0, beta=0.0)
        >>> [s.tolist() for s in gm.slots], stats.across
        ([[0, 1], [0, 1]], 2)
    """
    alpha, beta = _check_unit("alpha", alpha), _check_unit("beta", beta)
    total = corr.shape[0]
    if corr.dim() != 2 or corr.shape[1] != total or models < 1 or total % models:
        raise ZipItError(f"{name}: correlation of shape {tuple(corr.shape)} is not square over {models} models' units")
    n = total // models
    if not n <= width <= total:
        raise ZipItError(f"{name}: width {width} must lie in [{n}, {total}] (one model's units .. all of them)")
    merges = total - width
    if alpha == 0 and width < math.ceil(total / 2):
        raise ZipItError(
            f"{name}: alpha=0 merges every feature at most once, so {total} features cannot shrink below "
            f"{math.ceil(total / 2)} (asked for {width}); raise alpha or the budget"
        )
    s = torch.nan_to_num(corr.detach().float().clone(), nan=0.0)
    s.fill_diagonal_(-math.inf)  # never pair a feature with itself
    origin = torch.zeros(total, models, dtype=torch.bool)  # which models each merged feature draws from
    origin[torch.arange(total), torch.arange(total) // n] = True
    alive = torch.ones(total, dtype=torch.bool)
    root = torch.arange(total)  # the merged feature (its first ensemble index) each feature belongs to
    quota = torch.full((models,), math.floor(beta * merges / models + 0.5))  # rounded half up
    within = across = 0
    picked = 0.0

    def forbid_exhausted() -> None:
        spent = (quota <= 0).nonzero().flatten()
        if len(spent):
            o = origin[:, spent].float()
            s[(o @ o.T) > 0] = -math.inf  # two features drawing on one exhausted model may not merge

    forbid_exhausted()
    best, arg = s.max(1)
    for _ in range(merges):
        r = int(best.argmax())
        value = float(best[r])
        if value == -math.inf:
            raise ZipItError(
                f"{name}: no allowed merge left at width {int(alive.sum())} (asked for {width}) under alpha={alpha:g}, "
                f"beta={beta:g}; raise beta (same-model merges) or alpha (repeated merges), or the budget"
            )
        i, j = sorted((r, int(arg[r])))
        shared = origin[i] & origin[j]
        if shared.any():
            within += 1
            quota[shared] -= 1
        else:
            across += 1
        picked += value
        root[root == j] = i
        origin[i] |= origin[j]
        alive[j] = False
        new = torch.minimum(s[i], s[j]) * alpha if alpha > 0 else torch.full_like(s[i], -math.inf)
        new[~alive] = -math.inf
        new[i] = -math.inf
        s[j, :] = s[:, j] = -math.inf
        s[i, :] = s[:, i] = new
        if shared.any() and (quota[shared] <= 0).any():
            forbid_exhausted()
            best, arg = s.max(1)
            continue
        stale = (arg == i) | (arg == j)
        stale[i] = stale[j] = True  # j is gone; its row may have pointed elsewhere on a tie
        best[stale], arg[stale] = s[stale].max(1)
        better = s[:, i] > best
        best[better], arg[better] = s[better, i], i
    slot = torch.cumsum(alive.long(), 0) - 1  # slots in order of each merged feature's first member
    slots = slot[root]
    gm = GroupMerge(name, n, width, tuple(slots[m * n : (m + 1) * n].clone() for m in range(models)))
    return gm, ZipStats(within, across, picked / merges if merges else float("nan"))


# -- depth ----------------------------------------------------------------------------------------


def zip_depths(traced: Traced) -> tuple[dict[str, int], int]:
    """Each group's depth and the number of depths: the traced linear/convolution layers that write
    a group's features, in graph order; a group's depth is the index of the last one writing it
    (-1 if none does). Output layers write no group, so they do not count."""
    writes = {(a.key, a.dim): g.name for g in traced.spec.groups for a in g.members if a.role == PRODUCER}
    layers = [writes[key] for la in traced.layers
              if la.op in (LINEAR, CONV, CONV_TRANSPOSE) and (key := (la.weight, la.weight_dim)) in writes]  # fmt: skip
    depth = {g.name: -1 for g in traced.spec.groups}
    for i, name in enumerate(layers):
        depth[name] = i
    return depth, len(layers)


def check_options(alpha: Any, beta: Any, depth: Depth = None) -> tuple[float, float]:
    """Refuse out-of-range ``alpha``, ``beta`` or a malformed ``depth`` (one line, before any work);
    returns ``(alpha, beta)`` as floats."""
    alpha, beta = _check_unit("alpha", alpha), _check_unit("beta", beta)
    names = isinstance(depth, Sequence) and not isinstance(depth, str) and all(isinstance(d, str) for d in depth)
    if depth is not None and not names and (
        isinstance(depth, bool) or not isinstance(depth, (int, float)) or not 0.0 <= depth <= 1.0
    ):
        raise ZipItError(
            f"depth must be None (zip everything), a fraction in [0, 1] of the traced linear/conv layers, "
            f"or a list of group names; got {depth!r}"
        )
    return alpha, beta


def _zipped_groups(spec: PermutationSpec, traced: Traced, depth: Depth) -> list[str]:
    """The groups of ``spec`` before the zip point, in spec order."""
    names = spec.names
    if depth is None:
        return list(names)
    if not isinstance(depth, (int, float)):
        unknown = sorted(set(depth) - set(names))
        if unknown:
            raise ZipItError(f"depth names group(s) the model does not have: {unknown}; valid groups: {', '.join(names)}")
        return [n for n in names if n in set(depth)]
    at, layers = zip_depths(traced)
    point = math.floor(depth * layers + 0.5)
    return [n for n in names if max(at.get(n, -1), 0) < point]


# -- the merge ------------------------------------------------------------------------------------


@dataclass(frozen=True)
class _Plan:
    """What to do with each group, decided before any statistics are collected."""

    zipped: list[str]
    budgets: dict[str, float]
    widths: dict[str, int]  # target width of every group that is not aligned
    aligned: dict[str, str]  # group → why it is aligned and averaged instead
    need: list[str]  # groups whose correlations the merge reads


def _plan(spec: PermutationSpec, traced: Traced, model: nn.Module, count: int, budget: Budget, depth: Depth,
          alpha: float) -> _Plan:  # fmt: skip
    zipped = _zipped_groups(spec, traced, depth)
    fixed = unwidenable(spec, model)
    if isinstance(budget, Mapping):
        after = sorted(set(budget) - set(zipped) - set(fixed))
        if after:
            raise BudgetError(f"budget names group(s) past the zip point, which keep every model's units: {after}")
    budgets = resolve_budget(spec, budget, fixed, models=count)
    widths = {g.name: math.floor(budgets[g.name] * g.size + 0.5) if g.name in zipped else count * g.size
              for g in spec.groups}  # fmt: skip
    aligned = {g: why for g, why in fixed.items() if g in zipped or widths[g] > spec[g].size}
    short = [g for g in zipped if g not in aligned and alpha == 0 and widths[g] < math.ceil(count * spec[g].size / 2)]
    if short:
        raise ZipItError(
            f"alpha=0 merges every feature at most once, so {count} models' units cannot shrink below half their "
            f"total (groups {short[:3]}, budget {budgets[short[0]]:g}); raise alpha or the budget to >= {count / 2:g}"
        )
    need = [g.name for g in spec.groups if g.name in aligned or (g.name in zipped and widths[g.name] < count * g.size)]
    return _Plan(zipped, budgets, widths, aligned, need)


def zipit(
    models: Sequence[nn.Module],
    data: Iterable[Any],
    *,
    alpha: float = 0.5,
    beta: float = 0.5,
    budget: Budget = 1.0,
    depth: Depth = None,
    keep_heads: bool | None = None,
    spec: PermutationSpec | None = None,
    correlations: Mapping[str, torch.Tensor] | None = None,
    batches: int = 16,
    reset_bn: bool = True,
    input_fn: Callable[[Any], tuple[Any, ...]] = batch_inputs,
    example_kwargs: Mapping[str, Any] | None = None,
    check: bool = True,
    backend: str = "auto",
    quiet: bool = False,
) -> ZipItResult:
    """Zip 2+ models of one architecture into one (multi-head, with a partial zip) model.

    Args:
        models: the models, in their own bases (no alignment needed); none is modified.
        data: unlabeled batches (``input_fn`` picks the inputs); the first ``batches`` batches of
            the first batch's shape give the correlations and the BatchNorm statistics.
        alpha: repeated matching, in [0, 1]: 0 merges every feature at most once; otherwise a
            merged feature may merge again, its correlations scaled by ``alpha``.
        beta: same-model budget, in [0, 1]: the share of merges that may join two features of one
            model (0: only merges across models).
        budget: merged width over one model's width, in [1, N], global or ``{group: ratio}``
            (unnamed zipped groups: 1.0), for the zipped groups.
        depth: the zip point: None (everything), a fraction in [0, 1] of the traced linear/conv
            layers, or the names of the groups to zip (see the module docstring).
        keep_heads: keep every model's outputs apart (concatenated in model order) instead of
            averaging them; None: heads for a partial zip, averaged outputs otherwise.
        spec: groups to zip (default: traced from the first model on the first batch).
        correlations: per group, the joint correlation of the models' features from an earlier
            zip of the same models on the same data (``result.correlations``): skips collecting
            them again, e.g. to try several ``alpha``, ``beta``, budgets or depths.
        reset_bn: re-estimate BatchNorm statistics on the batches after zipping.
        check: run the zipped model on the first batch (a forward that hard-codes widths fails
            here, clearly); when nothing was merged, also check it reproduces every model.

    Returns:
        :class:`ZipItResult`; ``result.model`` is the first model's class, widened.

    Example:
        >>> import torch
        >>> from permerge.models import MLP
        >>> a, b = MLP(hidden=(16,)), MLP(hidden=(16,))
        >>> res = zipit([a, b], [torch.randn(32, 784) for _ in range(4)], budget=1.5, quiet=True)
        >>> dict(res.widths), res.model(torch.randn(2, 784)).shape
        ({'net.1.weight:0': 24}, torch.Size([2, 10]))
    """
    start = time.perf_counter()
    if len(models) < 2:
        raise ZipItError(f"ZipIt! merges 2 or more models, got {len(models)}")
    alpha, beta = check_options(alpha, beta, depth)
    count = len(models)
    if not isinstance(budget, Mapping):
        resolve_budget(PermutationSpec(()), budget, models=count)  # the range, checked before tracing
    sds = [m.state_dict() for m in models]
    check_same_architecture(sds, [f"model {i}" for i in range(count)])
    kwargs = dict(example_kwargs or {})
    inputs = take_batches(data, batches, "ZipIt!", lambda b: tuple(input_fn(b)))
    traced = trace_graph(models[0], inputs[0], example_kwargs=kwargs)
    spec = spec or traced.spec
    spec.validate(sds[0])
    missing = [g.name for g in spec.groups if not traced.sites.get(g.name)]
    if missing:
        raise ZipItError(f"no activation site for groups {missing[:5]}; ZipIt! needs groups of the traced graph")
    consumers = consumer_axes(spec)
    plan = _plan(spec, traced, models[0], count, budget, depth, alpha)
    keep_heads = len(plan.zipped) < len(spec.groups) if keep_heads is None else keep_heads
    if keep_heads:
        head_merges(spec, consumers, count)  # fails now, before the statistics, if there is no head to keep
    timing = {"plan": time.perf_counter() - start}
    t0 = time.perf_counter()
    if correlations is None:
        corr = _correlations(traced, spec, sds, inputs, kwargs, plan.need, quiet)
    else:
        corr = _given(correlations, spec, plan.need, count)
    timing["statistics"] = time.perf_counter() - t0
    t0 = time.perf_counter()
    merges, stats, perms = _group_merges(spec, plan, corr, count, alpha, beta, backend)
    aligned_sds = [sds[0], *(apply_permutation(spec, p, sd) for p, sd in zip(perms[1:], sds[1:]))]
    layout = {g.name: (merges[g.name], g.members) for g in spec.groups}
    if keep_heads:
        layout.update(head_merges(spec, consumers, count))
    merged_sd, maps = merge_state_dicts(aligned_sds, layout, consumers)
    model, width_notes = widen_with_notes(models[0], merged_sd)
    notes = [f"group {g!r} aligned and averaged, not zipped: {why}" for g, why in sorted(plan.aligned.items())]
    notes += width_notes
    if len(plan.zipped) < len(spec.groups):
        notes.append(f"partial zip: {len(plan.zipped)} of {len(spec.groups)} groups zipped; the rest keep every model's units")
    if check:
        widened = sorted(n for n, gm in merges.items() if gm.width != gm.size)
        check_forward(model, inputs[0], kwargs, widened, fix="zip the groups involved at budget 1.0 (depth, budget)")
        if not any(st.within + st.across for st in stats.values()) and not plan.aligned and not width_notes:
            _check_ensemble(model, models, inputs[0], kwargs, keep_heads)
    timing["zip"] = time.perf_counter() - t0
    t0 = time.perf_counter()
    if reset_bn:  # each batch as ((args...),): the positional inputs of one call, however many
        model = reset_bn_stats(model, [(x,) for x in inputs], batches=len(inputs), example_kwargs=kwargs)
    timing["bn_reset"] = time.perf_counter() - t0
    for note in notes:
        LOG.info("ZipIt!: %s", note)
    return ZipItResult(
        model=model.eval(),
        state_dict=MappingProxyType({k: v.detach().clone() for k, v in model.state_dict().items()}),
        spec=spec,
        sizes=MappingProxyType({g.name: g.size for g in spec.groups}),
        widths=MappingProxyType({n: gm.width for n, gm in merges.items()}),
        maps=MappingProxyType(maps),
        widened=MappingProxyType({k: tuple(v.shape) for k, v in merged_sd.items() if v.shape != sds[0][k].shape}),
        keep_heads=keep_heads,
        notes=tuple(notes),
        models=count,
        alpha=alpha,
        beta=beta,
        budgets=MappingProxyType({n: plan.budgets[n] for n in plan.zipped}),
        zipped=tuple(plan.zipped),
        merges=MappingProxyType(merges),
        stats=MappingProxyType(stats),
        aligned=MappingProxyType(plan.aligned),
        permutations=tuple(perms),
        correlations=MappingProxyType(corr),
        samples=sum(int(x[0].shape[0]) for x in inputs if isinstance(x[0], torch.Tensor)),
        seconds=time.perf_counter() - start,
        timing=MappingProxyType(timing),
    )


def _group_merges(spec: PermutationSpec, plan: _Plan, corr: Mapping[str, torch.Tensor], count: int, alpha: float,
                  beta: float, backend: str) -> tuple[dict[str, GroupMerge], dict[str, ZipStats], list[Permutation]]:  # fmt: skip
    """Every group's slots: zipped (greedy matching), aligned (a linear assignment to model 0, then
    shared slots) or kept (the ensemble layout); and each model's alignment permutation."""
    perms = [identity(spec) for _ in range(count)]
    merges: dict[str, GroupMerge] = {}
    stats: dict[str, ZipStats] = {}
    for g in spec.groups:
        n = g.size
        if g.name in plan.aligned:
            for m in range(1, count):
                perms[m][g.name] = lap.solve(corr[g.name][:n, m * n : (m + 1) * n], backend=backend)
            merges[g.name] = GroupMerge(g.name, n, n, (torch.arange(n),) * count)
        elif g.name in plan.need:
            merges[g.name], stats[g.name] = zip_features(corr[g.name], count, plan.widths[g.name], alpha=alpha,
                                                         beta=beta, name=g.name)  # fmt: skip
        else:
            merges[g.name] = GroupMerge.ensemble(g.name, n, count)
    return merges, stats, perms


def _given(correlations: Mapping[str, torch.Tensor], spec: PermutationSpec, need: Sequence[str], count: int
           ) -> dict[str, torch.Tensor]:  # fmt: skip
    for g in need:
        c, size = correlations.get(g), count * spec[g].size
        if c is None or tuple(c.shape) != (size, size):
            got = "none" if c is None else f"shape {tuple(c.shape)}"
            raise ZipItError(
                f"correlations for group {g!r}: expected a ({size}, {size}) matrix, got {got}; pass the "
                "correlations of a zip of the same models whose groups include it (result.correlations)"
            )
    return {g: correlations[g].cpu() for g in need}


def _correlations(traced: Traced, spec: PermutationSpec, sds: Sequence[Mapping[str, torch.Tensor]],
                  inputs: list[tuple[Any, ...]], kwargs: Mapping[str, Any], groups: Sequence[str],
                  quiet: bool) -> dict[str, torch.Tensor]:  # fmt: skip
    """Per group, the correlation of the stacked features of every model, averaged over its sites."""
    if not groups:
        return {}
    wanted = {site.axis.key for g in groups for site in traced.sites[g]}
    acc: dict[tuple[str, int], Correlation] = {}
    for x in tqdm(inputs, desc="ZipIt! statistics", disable=quiet or not sys.stderr.isatty()):
        values = [record(traced, sd, x, kwargs, wanted) for sd in sds]
        for g in groups:
            for i, site in enumerate(traced.sites[g]):
                f = torch.cat([unit_samples(v[site.axis.key], site, spec[g].size) for v in values])
                acc[(g, i)] = acc.get((g, i), Correlation()).update(f, f)
    return {g: (sum(acc[(g, i)].matrix() for i in range(len(traced.sites[g]))) / len(traced.sites[g])).cpu()
            for g in groups}  # fmt: skip


def _check_ensemble(model: nn.Module, members: Sequence[nn.Module], x: tuple[Any, ...], kwargs: Mapping[str, Any],
                    keep_heads: bool) -> None:  # fmt: skip
    """Nothing merged: the model must compute every member's outputs (concatenated, or their mean)."""
    got = model_outputs(model, x, kwargs)
    outs = [model_outputs(m, x, kwargs) for m in members]
    for k, y in enumerate(got):
        if not y.is_floating_point():
            continue
        parts = [o[k].float() for o in outs]
        if keep_heads:
            dims = [d for d in range(y.dim()) if y.shape[d] != parts[0].shape[d]]
            want = torch.cat(parts, dims[0]) if dims else parts[0]
        else:
            want = sum(parts) / len(parts)
        err = float((y.float() - want).abs().max()) / max(float(want.abs().max()), 1e-12) if want.shape == y.shape else math.inf
        if err > 1e-4:
            raise PermergeError(
                f"ZipIt! kept every unit but the zipped model's output {k} differs from the models' "
                f"({'concatenated' if keep_heads else 'averaged'}) outputs by {err:.2e} (relative); this is a bug, please report it"
            )
