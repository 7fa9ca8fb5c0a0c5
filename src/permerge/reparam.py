"""Reparametrisations that dense transforms need, kept inside the architecture (same keys, same classes).

A residual stream admits orthogonal maps only once its norms are gain-free (see
:mod:`permerge.graph.norms`): :func:`fold_gains` folds each gain ``γ`` into the input columns of the
linear layers reading the norm (``W → W·diag(γ)``, LayerNorm's ``β → β/γ``, ``γ → 1``), which leaves
the function unchanged. After aligning the folded models, :func:`unfold_gains` moves B's result into
A's gauge (``γ → γ_A``, ``W → W·diag(1/γ_A)``, ``β → β·γ_A``): B keeps its function and gets A's
gains, and since that map is linear and the same for both models, interpolating A with the result
is interpolating the folded models.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass

import torch

from permerge.errors import SpecError
from permerge.graph import Traced
from permerge.graph.norms import Gain, find_gains
from permerge.spec import Group, PermutationSpec

__all__ = ["Gauge", "fold_gains", "gauge", "unfold_gains"]

_TINY = 1e-12


@dataclass(frozen=True)
class Gauge:
    """What dense maps of some groups need: the gains to fold and the maps' constraints.

    Attributes:
        spec: the spec with the folded gains left out of their groups (a folded gain is all ones and
            must stay so under the group's map).
        gains: the norm gains of the dense groups, to fold.
        keep_ones: dense groups a centred norm (LayerNorm) normalises: their maps must fix the
            all-ones vector.
    """

    spec: PermutationSpec
    gains: tuple[Gain, ...]
    keep_ones: frozenset[str]


def gauge(traced: Traced, dense: Iterable[str], spec: PermutationSpec | None = None) -> Gauge:
    """The :class:`Gauge` for mapping the groups ``dense`` of ``spec`` (default: the traced one) densely.

    Raises:
        SpecError: if a gain on a dense group cannot be folded (its norm feeds something other
            than linear layers: a residual add in a post-norm block, a tied LM head, a model output),
            before any work is done.
    """
    spec = traced.spec if spec is None else spec
    dense = set(dense)
    group_of: dict[tuple[str, int], set[str]] = {}
    for g in spec.groups:
        for ax in g.members:
            group_of.setdefault((ax.key, ax.dim), set()).add(g.name)
    gains, keep, problems = [], set(), []
    for gain in find_gains(traced.program, traced.layers):
        owners = set().union(*(group_of.get(at, set()) for at in ((gain.gain, 0), *gain.consumers))) & dense
        if not owners:
            continue
        if gain.blocked is not None:
            problems.append(f"group {sorted(owners)[0]!r}: the gain {gain.gain} cannot be folded ({gain.blocked})")
            continue
        gains.append(gain)
        keep |= owners if gain.centred else set()
    if problems:
        raise SpecError(
            "dense maps need gain-free norms: " + "; ".join(problems)
            + ". Align those groups with permutations (symmetries='permutation'), or freeze them"
        )  # fmt: skip
    folded = {g.gain for g in gains}
    groups = tuple(
        Group(g.name, g.size, tuple(ax for ax in g.members if ax.key not in folded or g.name not in dense), g.symmetry)
        for g in spec.groups
    )
    return Gauge(PermutationSpec(groups, spec.frozen), tuple(gains), frozenset(keep))


def fold_gains(gauge: Gauge, state_dict: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """``state_dict`` with the gauge's gains folded into their consumers (same function, gains all ones)."""
    return _rescale(gauge, state_dict, {g.gain: state_dict[g.gain] for g in gauge.gains}, fold=True)


def unfold_gains(
    gauge: Gauge, state_dict: Mapping[str, torch.Tensor], gains: Mapping[str, torch.Tensor]
) -> dict[str, torch.Tensor]:
    """A folded ``state_dict`` moved to the gauge whose gains are ``gains`` (A's state dict, say)."""
    return _rescale(gauge, state_dict, {g.gain: gains[g.gain] for g in gauge.gains}, fold=False)


def _rescale(gauge: Gauge, sd: Mapping[str, torch.Tensor], gains: Mapping[str, torch.Tensor], fold: bool) -> dict[str, torch.Tensor]:
    out = dict(sd)
    for g in gauge.gains:
        gamma = gains[g.gain].double()
        if fold and g.bias is not None or not fold:
            zero = int((gamma.abs() < _TINY).sum())
            if zero:
                raise SpecError(f"norm gain {g.gain} has {zero} zero entries: it cannot be divided out; align with "
                                "symmetries='permutation'")  # fmt: skip
        scale = gamma if fold else 1.0 / gamma
        for key, dim in g.consumers:
            w = out[key]
            shape = [1] * w.dim()
            shape[dim] = -1
            out[key] = (w.double() * scale.view(shape)).to(w.dtype)
        if g.bias is not None:
            out[g.bias] = (out[g.bias].double() / scale).to(out[g.bias].dtype)
        out[g.gain] = (torch.ones_like(gamma) if fold else gamma).to(sd[g.gain].dtype)
    return out
