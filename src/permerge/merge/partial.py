"""Partial (budgeted) merging: average the well-matched units of two aligned models, keep the rest.

Full merging (Git Re-Basin) averages every matched pair of units; models trained on different
data share only part of their features, so averaging the rest destroys them. Partial merging
(ZipIt!, Stoica et al. 2024; PLeaS, Nasery et al. 2025) keeps the ``k`` least-correlated matched
pairs of each group *apart*: the merged model carries both units, so a group of ``n`` units
becomes ``n + k`` wide. The budget is that width ratio, ``1 + k/n`` in [1, 2]: 1.0 is aligned
averaging, 2.0 keeps every unit of both models (an ensemble of their features).

How it generalises to any traced spec (ZipIt!'s merge/unmerge matrices). For one group, stack
A's features and B's aligned features into a ``2n`` "ensemble" vector. A merge matrix ``M``
(``(n+k) × 2n``) averages each merged pair and copies each kept-apart unit; an unmerge matrix
``U`` (``2n × (n+k)``) sends every merged feature back to the A and B units it came from, so
``M U = I``. A tensor of the merged model is the block-diagonal ensemble of A's and π(B)'s tensor
with ``M`` applied on every axis that *produces* the group's features (a weight's output rows,
biases, norm parameters and running statistics) and ``U`` on every axis that *reads* them (a
weight's input columns: traced axes with role ``consumer``). Both are sparse — each
merged position comes from one or two ensemble positions — so they are applied as index-adds,
never as dense matrices. Spaces no group owns (model inputs and outputs, frozen spaces) are
shared: the first layer reads the one input, the output layer averages the two models' outputs
(with ``keep_heads`` it concatenates them instead: each model keeps its own head).

The maps are one merged slot per unit per model (:class:`GroupMerge`, :class:`DimMap`), so they
serve any number of models and any assignment of units to slots: ZipIt!
(:mod:`permerge.merge.zipit`) sends two units of one model to one slot, or keeps every model's
units apart past its zip point, through the same :func:`merge_state_dicts`.

Consequences, which the tests check: with budget 1 every tensor is ``(A + π(B)) / 2`` bit for
bit, i.e. aligned interpolation at α = ½; with budget 2 the merged model computes both models'
features exactly (its logits are the mean of A's and B's, or both with ``keep_heads``) provided
no op mixes statistics across the widened channels — BatchNorm and elementwise ops are fine,
LayerNorm/GroupNorm/RMSNorm normalise over the widened width, so there budget 2 only approximates
the ensemble (a note says so). Frozen hidden spaces (ops without a rule) are averaged at every
budget.

The widened model. It is a copy of model A with its parameters and buffers replaced by the
widened tensors and the shape attributes of known layer types updated (``in_features``,
``num_features``, ``normalized_shape``, … — a registry of small rules, :data:`WIDTH_RULES`). So the
result is the user's own class: same keys, trainable, BatchNorm statistics can be re-estimated,
and it can be merged again. We chose this over re-wiring the exported ATen graph because an
exported program is eval-only (BatchNorm is baked in inference form), is not the user's class,
and bakes every width into its ``view``/``reshape`` nodes anyway. The limit: a forward that
hard-codes a width (``x.view(B, 64)``, heads derived from a config) cannot be widened; the merged
model is run on the example input and a failure raises an error naming the fix (budget 1.0 for
the groups involved). Groups laid out as attention heads (``repeat > 1``) or touching tied
parameters are never widened (a global budget leaves them at 1.0 with a note; an explicit
budget for them is an error). To rebuild a saved merged model: build the original architecture
and call :func:`widen_module` with the saved state dict (the shapes carry the widths).
"""

from __future__ import annotations

import copy
import logging
import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from types import MappingProxyType
from typing import Any

import torch
from torch import nn

from permerge.apply import apply_permutation
from permerge.check import check_function_preserved
from permerge.errors import PermergeError, SpecError, StateDictMismatchError
from permerge.merge import check_same_architecture
from permerge.permutation import Permutation, check_permutation, is_identity
from permerge.spec import CONSUMER, Axis, FrozenKind, PermutationSpec

LOG = logging.getLogger(__name__)

__all__ = [
    "WIDTH_RULES",
    "BudgetError",
    "DimMap",
    "GroupMerge",
    "PartialMergeResult",
    "WidenedMerge",
    "check_forward",
    "consumer_axes",
    "head_merges",
    "merge_state_dicts",
    "output_groups",
    "partial_merge",
    "register_width_rule",
    "resolve_budget",
    "unwidenable",
    "widen_module",
    "widen_with_notes",
]

Budget = float | Mapping[str, float]


class BudgetError(PermergeError, ValueError):
    """A budget is out of [1, 2], names a group the spec does not have, or cannot be honoured."""


# -- per-group and per-dimension maps -------------------------------------------------------------


@dataclass(frozen=True)
class GroupMerge:
    """One group's merge of ``models`` models: ``slots[m][i]`` is the merged slot of model ``m``'s unit ``i``.

    Slots range over ``0 .. width-1``; a slot that several units are sent to holds their average
    (a merged feature), a slot one unit is sent to holds that unit. Units of one model may share a
    slot (ZipIt!'s within-model merges). Partial merging's layout (:meth:`pairs`): slot ``i < n``
    holds unit ``i`` (the pair's average, or A's unit when the pair is kept apart); slots
    ``n .. n+k-1`` hold B's kept-apart units in ascending unit order.
    """

    name: str
    size: int
    width: int
    slots: tuple[torch.Tensor, ...]  # int64, one per model, each of length ``size``

    @classmethod
    def pairs(cls, name: str, size: int, unmerged: torch.Tensor) -> GroupMerge:
        """Two aligned models: A's and B's unit ``i`` share slot ``i`` unless ``i`` is ``unmerged``."""
        b = torch.arange(size)
        b[unmerged] = size + torch.arange(len(unmerged))
        return cls(name, size, size + len(unmerged), (torch.arange(size), b))

    @classmethod
    def ensemble(cls, name: str, size: int, models: int) -> GroupMerge:
        """Every unit of every model kept: model ``m``'s unit ``i`` at slot ``m·size + i``."""
        return cls(name, size, size * models, tuple(m * size + torch.arange(size) for m in range(models)))

    @property
    def models(self) -> int:
        return len(self.slots)

    @property
    def shared(self) -> bool:
        """Every model's unit ``i`` sits at slot ``i`` (aligned averaging: nothing moves or widens)."""
        return self.width == self.size and all(torch.equal(s, torch.arange(self.size)) for s in self.slots)


@dataclass(frozen=True)
class DimMap:
    """The merge (``M``) and unmerge (``U``) maps of one tensor dimension, as slot indices.

    Position ``p`` of model ``m``'s tensor goes to merged position ``slots[m][p]``. ``U`` is that
    assignment (a merged position is read by every ensemble position sent to it); ``M`` is its
    transpose normalised to average (``M U = I``).
    """

    length: int
    width: int
    slots: tuple[torch.Tensor, ...]

    @classmethod
    def shared(cls, length: int, models: int = 2) -> DimMap:
        """A space every model shares (frozen): all map to the same positions."""
        idx = torch.arange(length)
        return cls(length, length, (idx,) * models)

    @property
    def models(self) -> int:
        return len(self.slots)

    def counts(self) -> torch.Tensor:
        return torch.bincount(torch.cat(self.slots), minlength=self.width)

    def scatter(self, t: torch.Tensor, dim: int, model: int) -> torch.Tensor:
        """Sum model ``model``'s positions of ``t`` along ``dim`` into the merged layout (``U``)."""
        shape = list(t.shape)
        shape[dim] = self.width
        return t.new_zeros(shape).index_add_(dim, self.slots[model].to(t.device), t)

    def merge(self, *features: torch.Tensor, dim: int) -> torch.Tensor:
        """``M`` applied to the ensemble ``[f_0; f_1; …]`` along ``dim``: the merged-space features."""
        if len(features) != self.models:
            raise ValueError(f"this map merges {self.models} models' features, got {len(features)}")
        out = sum(self.scatter(f, dim, m) for m, f in enumerate(features))
        shape = [1] * out.dim()
        shape[dim] = self.width
        return out / self.counts().to(out).view(shape)


def _dim_map(key: str, dim: int, length: int, members: list[tuple[GroupMerge, Axis]], models: int) -> DimMap:
    """Layout of one dimension: group segments widened in place, frozen gaps kept as they are."""
    if all(gm.shared for gm, _ in members):
        return DimMap.shared(length, models)  # nothing moves here: every model lands on the same positions
    bad = sorted({gm.name for gm, ax in members if ax.repeat != 1})
    if bad:
        raise BudgetError(
            f"{key!r} dim {dim} holds groups laid out as heads (repeat > 1): {bad}; widening or zipping them is not "
            "supported: give every group on this dimension budget 1.0"
        )
    slots = [torch.empty(length, dtype=torch.long) for _ in range(models)]
    pos = new = 0
    for gm, ax in sorted(members, key=lambda m: m[1].offset):
        start, stop = ax.offset, ax.offset + gm.size * ax.block
        if start < pos or stop > length:
            raise SpecError(f"{key!r} dim {dim}: group {gm.name!r} overlaps another group or runs past the end")
        gap = torch.arange(new, new + start - pos)
        unit = torch.arange(gm.size).repeat_interleave(ax.block)
        within = torch.arange(ax.block).repeat(gm.size)
        for s, g in zip(slots, gm.slots):
            s[pos:start] = gap
            s[start:stop] = new + start - pos + g[unit] * ax.block + within
        new += start - pos + gm.width * ax.block
        pos = stop
    for s in slots:
        s[pos:] = torch.arange(new, new + length - pos)
    return DimMap(length, new + length - pos, tuple(slots))


# -- budgets --------------------------------------------------------------------------------------


def _check_value(where: str, value: Any, models: int = 2) -> float:
    try:
        v = float(value)
    except (TypeError, ValueError):
        raise BudgetError(f"{where} must be a number in [1, {models}], got {value!r}") from None
    if not 1.0 <= v <= models:  # also rejects NaN
        kept = "both models kept" if models == 2 else f"all {models} models kept"
        raise BudgetError(
            f"{where} is {v:g}; a budget is the merged width over the original width, in [1, {models}] "
            f"(1.0: fully merged, like aligned averaging; {models}.0: {kept}, an ensemble)"
        )
    return v


def resolve_budget(spec: PermutationSpec, budget: Budget, fixed: Mapping[str, str] | None = None, *,
                   models: int = 2) -> dict[str, float]:  # fmt: skip
    """Per-group budgets from a global float or a ``{group: float}`` dict (unnamed groups: 1.0);
    a budget lies in ``[1, models]``.

    ``fixed`` maps groups that cannot widen to the reason: a global budget leaves them at 1.0, an
    explicit budget > 1 for one of them is an error.

    Example:
        >>> from permerge.spec import Axis, Group, PermutationSpec
        >>> spec = PermutationSpec((Group("h", 4, (Axis("w", 0),)),))
        >>> resolve_budget(spec, 1.5)
        {'h': 1.5}
        >>> resolve_budget(spec, {"x": 1.5})
        Traceback (most recent call last):
        ...
        permerge.merge.partial.BudgetError: budget names group(s) the model does not have: ['x']; valid groups: h
    """
    fixed = dict(fixed or {})
    names = spec.names
    if isinstance(budget, Mapping):
        unknown = sorted(set(budget) - set(names))
        if unknown:
            raise BudgetError(
                f"budget names group(s) the model does not have: {unknown}; valid groups: {', '.join(names)}"
            )
        out = {n: 1.0 for n in names}
        for n, v in budget.items():
            out[n] = _check_value(f"budget of group {n!r}", v, models)
            if out[n] > 1.0 and n in fixed:
                raise BudgetError(f"group {n!r} cannot be widened ({fixed[n]}); give it budget 1.0")
        return out
    b = _check_value("budget", budget, models)
    if b > 1.0 and fixed:
        LOG.warning("keeping %d group(s) fully merged (cannot widen): %s", len(fixed), sorted(fixed))
    return {n: 1.0 if n in fixed else b for n in names}


def unwidenable(spec: PermutationSpec, model: nn.Module) -> dict[str, str]:
    """Groups of ``model`` that must stay at width n (attention-head layouts, tied parameters), with the reason."""
    tied = _tied_keys(model)
    reasons: dict[str, str] = {}
    head_dims = {(a.key, a.dim) for g in spec.groups for a in g.members if a.repeat != 1}
    for g in spec.groups:
        for a in g.members:
            if a.repeat != 1 or (a.key, a.dim) in head_dims:
                reasons.setdefault(g.name, f"attention-head layout on {a.key!r}")
            elif len(tied.get(a.key, ())) > 1:
                reasons.setdefault(g.name, f"tied parameter {a.key!r} = {[k for k in tied[a.key] if k != a.key]}")
    return reasons


def _tied_keys(model: nn.Module) -> dict[str, tuple[str, ...]]:
    by_id: dict[int, list[str]] = {}
    for k, v in model.state_dict(keep_vars=True).items():
        by_id.setdefault(id(v), []).append(k)
    return {k: tuple(ks) for ks in by_id.values() if len(ks) > 1 for k in ks}


def _round_half_up(x: float) -> int:
    return math.floor(x + 0.5)


def _pair_scores(
    spec: PermutationSpec,
    name: str,
    perm: Mapping[str, torch.Tensor],
    costs: Mapping[str, torch.Tensor] | None,
    sd_a: Mapping[str, torch.Tensor],
    sd_bp: Mapping[str, torch.Tensor],
    consumers: frozenset[tuple[str, int]],
) -> torch.Tensor:
    """How well each of A's units matches its partner (higher: more alike)."""
    g = spec[name]
    if costs is not None:
        if name not in costs:
            raise BudgetError(f"costs has no matrix for group {name!r}, whose budget is > 1")
        c = torch.as_tensor(costs[name])
        if tuple(c.shape) != (g.size, g.size):
            raise BudgetError(f"costs[{name!r}] has shape {tuple(c.shape)}, expected ({g.size}, {g.size})")
        p = perm.get(name, torch.arange(g.size))
        return c.float()[torch.arange(g.size), p.long()]
    # Without activation statistics: cosine similarity of the units' outgoing parameters (every
    # producer slice of the group, each tensor normalised so no single tensor dominates).
    parts_a, parts_b = [], []
    for ax in g.members:
        if (ax.key, ax.dim) in consumers or ax.repeat != 1 or not sd_a[ax.key].is_floating_point():
            continue
        idx = ax.positions(g.size).flatten()
        a = sd_a[ax.key].float().movedim(ax.dim, 0)[idx].reshape(g.size, -1)
        b = sd_bp[ax.key].float().movedim(ax.dim, 0)[idx].reshape(g.size, -1)
        scale = (a.norm() + b.norm()).clamp_min(1e-12)
        parts_a.append(a / scale)
        parts_b.append(b / scale)
    if not parts_a:
        return torch.zeros(g.size)
    a, b = torch.cat(parts_a, 1), torch.cat(parts_b, 1)
    return torch.nn.functional.cosine_similarity(a, b, dim=1)


# -- the widened module ---------------------------------------------------------------------------

WidthRule = Callable[[nn.Module], str | None]
WIDTH_RULES: dict[type, WidthRule] = {}
"""Module type → rule updating its shape attributes after its tensors were widened (returns a note
or None). Dispatch walks the type's MRO, so subclasses inherit rules."""


def register_width_rule(*types: type) -> Callable[[WidthRule], WidthRule]:
    def decorate(fn: WidthRule) -> WidthRule:
        for t in types:
            WIDTH_RULES[t] = fn
        return fn

    return decorate


@register_width_rule(nn.Linear)
def _linear_width(m: nn.Module) -> None:
    m.out_features, m.in_features = m.weight.shape  # type: ignore[assignment]


@register_width_rule(nn.modules.conv._ConvNd)
def _conv_width(m: nn.Module) -> None:
    w = m.weight
    if m.transposed:  # type: ignore[attr-defined]
        m.in_channels, m.out_channels = w.shape[0], w.shape[1] * m.groups  # type: ignore[attr-defined]
    else:
        m.out_channels, m.in_channels = w.shape[0], w.shape[1] * m.groups  # type: ignore[attr-defined]


@register_width_rule(nn.modules.batchnorm._NormBase)
def _batchnorm_width(m: nn.Module) -> None:
    ref = m.weight if m.weight is not None else m.running_mean  # type: ignore[attr-defined]
    m.num_features = ref.shape[0]  # type: ignore[union-attr]


@register_width_rule(nn.LayerNorm, nn.RMSNorm)
def _layernorm_width(m: nn.Module) -> str:
    if m.weight is None:
        raise PermergeError(f"{type(m).__name__} without an affine weight cannot be widened")
    m.normalized_shape = tuple(m.weight.shape)  # type: ignore[assignment]
    return f"{type(m).__name__} normalises across the widened features: budget 2 only approximates the ensemble"


@register_width_rule(nn.GroupNorm)
def _groupnorm_width(m: nn.Module) -> str:
    if m.num_groups != 1:  # type: ignore[attr-defined]
        raise PermergeError(
            f"GroupNorm with {m.num_groups} groups cannot be widened (its channel groups would be split); "
            "give the groups it normalises budget 1.0"
        )
    m.num_channels = m.weight.shape[0]  # type: ignore[attr-defined]
    return "GroupNorm normalises across the widened channels: budget 2 only approximates the ensemble"


@register_width_rule(nn.Embedding)
def _embedding_width(m: nn.Module) -> None:
    m.num_embeddings, m.embedding_dim = m.weight.shape  # type: ignore[assignment]


def _width_rule(module: nn.Module) -> WidthRule | None:
    for t in type(module).__mro__:
        if t in WIDTH_RULES:
            return WIDTH_RULES[t]
    return None


def widen_module(template: nn.Module, state_dict: Mapping[str, torch.Tensor]) -> nn.Module:
    """A copy of ``template`` holding ``state_dict``, whose tensors may be wider than the template's.

    Same-shaped tensors are copied in (ties kept); wider ones replace the template's parameter or
    buffer, and the layer's shape attributes are updated by :data:`WIDTH_RULES`. This is how a
    saved partial merge is loaded: build the original architecture, then call this. The template
    is not modified.

    Example:
        >>> import torch
        >>> lin = torch.nn.Linear(3, 2)
        >>> wide = widen_module(lin, {"weight": torch.zeros(4, 3), "bias": torch.zeros(4)})
        >>> wide.out_features, tuple(lin.weight.shape)
        (4, (2, 3))
    """
    return widen_with_notes(template, state_dict)[0]


def widen_with_notes(template: nn.Module, state_dict: Mapping[str, torch.Tensor]) -> tuple[nn.Module, tuple[str, ...]]:
    """:func:`widen_module`, plus the width rules' notes (norms that only approximate the ensemble)."""
    model = copy.deepcopy(template)
    own = model.state_dict(keep_vars=True)
    missing, extra = sorted(set(own) - set(state_dict)), sorted(set(state_dict) - set(own))
    if missing or extra:
        raise StateDictMismatchError(f"state dict does not fit the model: missing {missing[:10]}, unexpected {extra[:10]}")
    tied = _tied_keys(model)
    changed: dict[str, nn.Module] = {}
    with torch.no_grad():
        for key, value in state_dict.items():
            old = own[key]
            if tuple(old.shape) == tuple(value.shape):
                old.copy_(value)
                continue
            if key in tied:
                raise PermergeError(f"cannot widen {key!r}: it is tied to {[k for k in tied[key] if k != key]}")
            prefix, _, attr = key.rpartition(".")
            module = model.get_submodule(prefix)
            if attr in module._parameters:
                module._parameters[attr] = nn.Parameter(value.detach().clone().to(old.dtype), requires_grad=old.requires_grad)
            else:
                module._buffers[attr] = value.detach().clone().to(old.dtype)
            changed[prefix] = module
    notes = set()
    for prefix, module in changed.items():
        rule = _width_rule(module)
        if rule is None:
            LOG.debug("no width rule for %s (%s); its tensors were replaced as they are", prefix, type(module).__name__)
            continue
        note = rule(module)
        if note:
            notes.add(note)
    for note in sorted(notes):
        LOG.warning("%s", note)
    return model, tuple(sorted(notes))


# -- the merge ------------------------------------------------------------------------------------


@dataclass(frozen=True, kw_only=True)
class WidenedMerge:
    """A merged model that may be wider than its members: the model, its state dict, the layout.

    ``sizes[g]`` / ``widths[g]`` are group ``g``'s original and merged widths, ``maps[(key, dim)]``
    the merge/unmerge slots of every tensor dimension a group touches (``models`` models merged).
    With ``keep_heads`` the model's output holds every model's outputs, in order, along the output
    dimension.
    """

    model: nn.Module
    state_dict: Mapping[str, torch.Tensor]
    spec: PermutationSpec
    sizes: Mapping[str, int]
    widths: Mapping[str, int]
    maps: Mapping[tuple[str, int], DimMap]
    widened: Mapping[str, tuple[int, ...]] = field(default_factory=dict)  # key → new shape (changed ones)
    keep_heads: bool = False
    notes: tuple[str, ...] = ()
    models: int = 2

    def output_map(self, key: str, dim: int = 0) -> DimMap:
        """Merge map of the features produced along ``dim`` of tensor ``key`` (shared if no group)."""
        return self.maps.get((key, dim)) or DimMap.shared(self.state_dict[key].shape[dim], self.models)

    def num_parameters(self) -> int:
        return sum(p.numel() for p in self.model.parameters())


@dataclass(frozen=True, kw_only=True)
class PartialMergeResult(WidenedMerge):
    """How two models were merged partially: B's alignment, the budgets, the pairs kept apart.

    ``widths[g]`` is the group's size plus the units kept apart; ``unmerged[g]`` A's positions whose
    matched pair was kept apart. With ``keep_heads`` the output holds A's outputs, then B's.
    ``function_preservation_error``: how much ``permutation`` changed B's outputs (None: not
    checked, or nothing moved).
    """

    permutation: Permutation
    budgets: Mapping[str, float]
    unmerged: Mapping[str, torch.Tensor]
    function_preservation_error: float | None = None

    def architecture(self) -> dict[str, Any]:
        """A JSON-able description: per-group sizes, widths and units kept apart; widened shapes."""
        return {
            "format": "permerge.partial/1",
            "keep_heads": self.keep_heads,
            "output": "A's outputs, then B's, along the output dimension" if self.keep_heads
            else "the mean of A's and B's outputs",
            "parameters": self.num_parameters(),
            "groups": {
                name: {
                    "size": self.sizes[name], "width": self.widths[name], "budget": self.budgets.get(name),
                    "unmerged": self.unmerged[name].tolist(),
                }
                for name in self.widths
            },
            "tensors": {k: list(v) for k, v in sorted(self.widened.items())},
            "notes": list(self.notes),
            "load": LOAD_HINT,
        }  # fmt: skip


LOAD_HINT = "build the original architecture, then permerge.merge.partial.widen_module(model, state_dict)"


def consumer_axes(spec: PermutationSpec) -> frozenset[tuple[str, int]]:
    """``(key, dim)`` of every axis that reads a group's features, from the traced axis roles."""
    axes = [a for g in spec.groups for a in g.members] + [a for f in spec.frozen for a in f.members]
    unknown = sorted({f"{a.key}:{a.dim}" for a in axes if a.role is None})
    if unknown:
        raise SpecError(
            f"widening merges (partial, PLeaS, ZipIt!) must know which axes read a group's features and which produce them, but "
            f"{len(unknown)} axes have no role (e.g. {unknown[0]}): pass a traced spec (permerge.trace) or set "
            "each axis's \"role\" (\"producer\"/\"consumer\") in the spec JSON"
        )
    return frozenset((a.key, a.dim) for a in axes if a.role == CONSUMER)


def output_groups(spec: PermutationSpec, consumers: frozenset[tuple[str, int]]) -> list[tuple[str, int, tuple[Axis, ...]]]:
    """The model-output spaces as ``(name, size, members)``, for ``keep_heads``."""
    out = []
    for i, f in enumerate(spec.frozen):
        if f.kind is not FrozenKind.MODEL_OUTPUT:
            continue
        if not f.members or any((a.key, a.dim) in consumers or a.repeat != 1 for a in f.members):
            raise PermergeError(
                "keep_heads needs every model output to be produced by a parameter (a classifier head); "
                f"output space {i} ({f.reason}) is not"
            )
        out.append((f"<model output {i}>", f.size, f.members))
    if not out:
        raise PermergeError("keep_heads: the traced model has no output produced by a parameter (no head to keep)")
    return out


def partial_merge(
    spec: PermutationSpec,
    model_a: nn.Module,
    model_b: nn.Module,
    perm: Mapping[str, torch.Tensor],
    costs: Mapping[str, torch.Tensor] | None = None,
    budget: Budget = 1.0,
    *,
    keep_heads: bool = False,
    example_inputs: Any = None,
    example_kwargs: Mapping[str, Any] | None = None,
    check: bool = True,
) -> PartialMergeResult:
    """Merge A and B (aligned by ``perm``) into a model between 1× and 2× as wide.

    Args:
        spec: model A's traced spec (its axis roles say which axes read a group's features and
            which produce them).
        model_a, model_b: same architecture; neither is modified.
        perm: B's permutation onto A (``activation_matching`` / ``weight_matching``); groups it
            does not name stay unpermuted.
        costs: per group, the ``(n, n)`` similarity of A's units (rows) and B's units in B's own
            order (columns), e.g. ``activation_matching(..., return_costs=True).costs``. The
            ``k`` matched pairs with the lowest similarity are kept apart. None: use the cosine
            similarity of each pair's outgoing parameters.
        budget: width ratio in [1, 2], global or ``{group: ratio}`` (unnamed groups: 1.0). Group
            ``g`` of ``n`` units keeps ``round((budget - 1) · n)`` pairs apart.
        keep_heads: do not average the model outputs: the merged model returns A's outputs, then
            B's, concatenated along the output dimension (two label spaces, two heads).
        example_inputs, example_kwargs: an example call, needed with ``check``: ``perm`` must keep
            model B's function there (:func:`~permerge.check.check_function_preserved`), and the
            merged model is run on it (a forward that hard-codes widths fails here, with a clear
            error, rather than later).
        check: run both checks (``check=False`` skips them; then nothing vouches for ``perm``).

    Returns:
        :class:`PartialMergeResult`.

    Example:
        >>> import torch, permerge
        >>> from permerge.models import MLP
        >>> a, b = MLP(hidden=(8,)), MLP(hidden=(8,))
        >>> spec = permerge.trace(a, torch.randn(2, 784))
        >>> res = partial_merge(spec, a, b, permerge.identity(spec), None, 1.5)
        >>> dict(res.widths), res.model.net[1].out_features
        ({'net.1.weight:0': 12}, 12)
    """
    consumers = consumer_axes(spec)
    sd_a, sd_b = model_a.state_dict(), model_b.state_dict()
    check_same_architecture([sd_a, sd_b], ["model A", "model B"])
    spec.validate(sd_a)
    check_permutation(spec, perm)
    if check and example_inputs is None and not is_identity(perm):
        raise PermergeError(
            "partial_merge checks that the permutation keeps model B's function: pass example_inputs= "
            "(or check=False to skip the check)"
        )
    preservation = (
        check_function_preserved(model_b, spec, example_inputs, perm, example_kwargs=example_kwargs).relative_error
        if check and not is_identity(perm) else None
    )  # fmt: skip
    fixed = unwidenable(spec, model_a)
    budgets = resolve_budget(spec, budget, fixed)
    sd_bp = apply_permutation(spec, perm, sd_b)

    merges: dict[str, GroupMerge] = {}
    unmerged: dict[str, torch.Tensor] = {}
    for g in spec.groups:
        k = min(g.size, max(0, _round_half_up((budgets[g.name] - 1.0) * g.size)))
        unmerged[g.name] = torch.zeros(0, dtype=torch.long)
        if k:
            scores = _pair_scores(spec, g.name, perm, costs, sd_a, sd_bp, consumers)
            unmerged[g.name] = torch.sort(torch.argsort(scores, stable=True)[:k]).values
        merges[g.name] = GroupMerge.pairs(g.name, g.size, unmerged[g.name])
    layout = {g.name: (merges[g.name], g.members) for g in spec.groups}
    if keep_heads:
        layout.update(heads := head_merges(spec, consumers, 2))
        merges.update({name: gm for name, (gm, _) in heads.items()})
        unmerged.update({name: torch.arange(gm.size) for name, (gm, _) in heads.items()})
    merged_sd, maps = merge_state_dicts([sd_a, sd_bp], layout, consumers)
    model, width_notes = widen_with_notes(model_a, merged_sd)
    global_budget = None if isinstance(budget, Mapping) else float(budget)
    notes = [f"group {g!r} kept fully merged: {why}" for g, why in sorted(fixed.items()) if (global_budget or 1.0) > 1.0]
    notes += width_notes
    widths = {n: m.width for n, m in merges.items()}
    if check and example_inputs is not None:
        check_forward(model, example_inputs, example_kwargs, sorted(n for n, m in merges.items() if m.width != m.size))
    LOG.info("partial merge: widths %s", {n: f"{merges[n].size}→{w}" for n, w in widths.items() if w != merges[n].size})
    return PartialMergeResult(
        model=model.eval(),
        state_dict=MappingProxyType(merged_sd),
        spec=spec,
        permutation=dict(perm),
        budgets=MappingProxyType(budgets),
        sizes=MappingProxyType({n: m.size for n, m in merges.items()}),
        widths=MappingProxyType(widths),
        unmerged=MappingProxyType(unmerged),
        maps=MappingProxyType(maps),
        widened=MappingProxyType({k: tuple(v.shape) for k, v in merged_sd.items() if v.shape != sd_a[k].shape}),
        keep_heads=keep_heads,
        notes=tuple(notes),
        function_preservation_error=preservation,
    )


def head_merges(spec: PermutationSpec, consumers: frozenset[tuple[str, int]], models: int
                ) -> dict[str, tuple[GroupMerge, tuple[Axis, ...]]]:  # fmt: skip
    """``keep_heads``: every model-output space as a group whose units all stay apart (outputs
    concatenated in model order), keyed ``<model output i>``, with the axes that produce it."""
    return {name: (GroupMerge.ensemble(name, size, models), axes) for name, size, axes in output_groups(spec, consumers)}


def merge_state_dicts(
    state_dicts: Sequence[Mapping[str, torch.Tensor]],
    merges: Mapping[str, tuple[GroupMerge, Sequence[Axis]]],
    consumers: frozenset[tuple[str, int]],
) -> tuple[dict[str, torch.Tensor], dict[tuple[str, int], DimMap]]:
    """The merged state dict of ``state_dicts`` (each in its own basis) under per-group merges.

    ``merges[g]`` is group ``g``'s :class:`GroupMerge` and the axes it owns. Every tensor is the
    block-diagonal ensemble of the models' tensors with ``M`` applied along producer axes and ``U``
    along consumer axes (``consumers``, from :func:`consumer_axes`); spaces no entry owns are
    shared (averaged). Returns the state dict and the map of every dimension an entry touches.
    """
    members: dict[tuple[str, int], list[tuple[GroupMerge, Axis]]] = {}
    for gm, axes in merges.values():
        for ax in axes:
            members.setdefault((ax.key, ax.dim), []).append((gm, ax))
    ref, models = state_dicts[0], len(state_dicts)
    maps = {(key, dim): _dim_map(key, dim, ref[key].shape[dim], ms, models) for (key, dim), ms in members.items()}
    by_key: dict[str, dict[int, DimMap]] = {}
    for (key, dim), m in maps.items():
        by_key.setdefault(key, {})[dim] = m
    merged = {
        key: _merge_tensor([sd[key] for sd in state_dicts], by_key.get(key, {}),
                           {d for d in by_key.get(key, {}) if (key, d) not in consumers})
        for key in ref
    }  # fmt: skip
    return merged, maps


def _merge_tensor(ts: Sequence[torch.Tensor], dims: Mapping[int, DimMap], producers: set[int]) -> torch.Tensor:
    """One merged tensor: scatter every model's entries into the merged layout along every group
    dimension (``U`` on consumer axes), sum, then average along producer axes (``M``).

    A tensor with no producer axis among its group dimensions feeds a space the models share (the
    model output, say), so the contributions are averaged: the output layer averages logits.
    """
    ref = ts[0]
    if not ref.is_floating_point():
        return ref.clone()
    w = 1.0 / len(ts)
    if not dims:
        return sum(w * t.float() for t in ts).to(ref.dtype)  # type: ignore[union-attr]  # exactly what merge() computes
    parts = []
    for m, t in enumerate(ts):
        t = t.float()
        for d, dm in dims.items():
            t = dm.scatter(t, d, m)
        parts.append(t)
    out = sum(parts)
    for d in producers:
        shape = [1] * out.dim()
        shape[d] = dims[d].width
        out = out / dims[d].counts().to(out).view(shape)
    if not producers:
        out = out * w
    return out.to(ref.dtype)  # type: ignore[union-attr]


def check_forward(model: nn.Module, example_inputs: Any, example_kwargs: Mapping[str, Any] | None,
                  widened: list[str], fix: str = "give the groups involved budget 1.0") -> None:  # fmt: skip
    """Run a widened model once; a failure (a forward that hard-codes a width) raises naming ``fix``."""
    args = example_inputs if isinstance(example_inputs, tuple) else (example_inputs,)
    try:
        with torch.no_grad():
            model.eval()(*args, **dict(example_kwargs or {}))
    except Exception as e:
        raise PermergeError(
            f"the widened model's forward failed ({type(e).__name__}: {str(e).strip().splitlines()[0] if str(e).strip() else ''}); "
            "its forward code probably hard-codes a width (a reshape to a fixed size, a head count from a config). "
            f"{fix} (widened: {', '.join(widened) or 'none'})"
        ) from e
