"""Symmetry classes granted to traced groups from facts that hold for any model of a kind.

The tracer does not set ``Group.symmetry`` yet; until it does, the tests and the transformer
benchmark upgrade traced specs here, from facts stated generally (not per architecture):

* a group that holds norm gains, every one of which folds into linear layers (a pre-norm
  transformer's residual stream: its units only pass through linear maps, residual adds, embeddings
  and, once the gains are folded, gain-free norms) is **orthogonal**;
* a within-head group (every member repeats per head) of two projections' rows is a query·key
  group and **invertible** — the second projection in state-dict order (offset, for a fused one)
  is the key side, which gets ``M⁻ᵀ``, so its members become consumers; a within-head group whose
  producers (value rows) repeat no more often than its consumers (output columns: query heads)
  is a value·output group and **invertible** (a packed q/k/v projection, whose rows repeat three
  times per head, is neither and keeps permutations);
* every group of a model made of linear layers and ReLUs only is a **scaled permutation**.
"""

from __future__ import annotations

import dataclasses

from torch import nn

from permerge.graph import Traced
from permerge.graph.norms import find_gains
from permerge.spec import CONSUMER, INVERTIBLE, ORTHOGONAL, SCALED_PERMUTATION, Group, PermutationSpec


def grant(traced: Traced, model: nn.Module) -> PermutationSpec:
    """``traced.spec`` with each group's class raised as the module docstring says."""
    gains = find_gains(traced.program, traced.layers)
    on_group: dict[str, list[bool]] = {}
    for g in traced.spec.groups:
        keys = {(ax.key, ax.dim) for ax in g.members}
        on_group[g.name] = [gain.blocked is None for gain in gains if (gain.gain, 0) in keys]
    relu_mlp = all(isinstance(m, (nn.Linear, nn.ReLU, nn.Sequential, nn.Flatten)) or m is model for m in model.modules())
    groups = []
    for g in traced.spec.groups:
        if relu_mlp:
            g = dataclasses.replace(g, symmetry=SCALED_PERMUTATION)
        elif on_group[g.name] and all(on_group[g.name]) and all(ax.repeat == ax.block == 1 for ax in g.members):
            g = dataclasses.replace(g, symmetry=ORTHOGONAL)
        elif all(ax.repeat > 1 and ax.block == 1 for ax in g.members):
            g = _within_head(g)
        groups.append(g)
    return PermutationSpec(tuple(groups), traced.spec.frozen)


def _within_head(g: Group) -> Group:
    consumers = [ax.repeat for ax in g.members if ax.role == CONSUMER]
    if consumers:  # value·output, unless the value rows repeat more often than the heads reading them
        producers = [ax.repeat for ax in g.members if ax.role != CONSUMER]
        return dataclasses.replace(g, symmetry=INVERTIBLE) if max(producers) <= min(consumers) else g
    sides = sorted({(ax.key.rsplit(".", 1)[0], ax.offset) for ax in g.members}, key=lambda s: (s[1], s[0]))
    layers = list(dict.fromkeys(ax.key.rsplit(".", 1)[0] for ax in g.members))
    if len(sides) != 2:
        return g
    key_side = sides[1] if sides[0][1] != sides[1][1] else sorted(sides, key=lambda s: layers.index(s[0]))[1]
    members = tuple(
        dataclasses.replace(ax, role=CONSUMER) if (ax.key.rsplit(".", 1)[0], ax.offset) == key_side else ax
        for ax in g.members
    )
    return dataclasses.replace(g, members=members, symmetry=INVERTIBLE)
