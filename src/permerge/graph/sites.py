"""Activation sites: where in the traced graph each group's units appear as activations.

Activation matching (Git Re-Basin §3.1) correlates the units of A and B on data; the units of a
group show up on many intermediate values (a linear's output, the activation after it, every add
of a residual stream). We prefer post-nonlinearity values, as the paper does, and keep a few sites
spread over the graph so a residual stream is matched along its whole depth.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

import torch

from permerge.graph.groups import fit, parts
from permerge.graph.propagate import Propagation
from permerge.spec import Axis

__all__ = ["Site", "activation_sites"]


@dataclass(frozen=True)
class Site:
    """A group's units on one traced value: ``axis.key`` is the node name.

    ``reduce_dims`` are the value's other axes that carry groups: B's entries along them are
    reordered by those groups, so a matcher must summarise over them (see activation matching).
    """

    axis: Axis
    reduce_dims: tuple[int, ...] = ()

    @property
    def clean(self) -> bool:
        return not self.reduce_dims and (self.axis.repeat, self.axis.block) == (1, 1)

aten = torch.ops.aten
_NONLINEAR = {
    aten.relu, aten.gelu, aten.silu, aten.tanh, aten.sigmoid, aten.hardtanh, aten.hardswish,
    aten.leaky_relu, aten.elu, aten.mish, aten.softplus,
}  # fmt: skip


def activation_sites(
    prop: Propagation, roots: Mapping[str, int], targets: Mapping[str, object], max_sites: int = 4
) -> dict[str, tuple[Site, ...]]:
    """For each group, up to ``max_sites`` sites where its units appear, clean ones first.

    ``targets`` maps node names to their op (to recognise nonlinearities).
    """
    sp = prop.spaces
    group_of = {sp.find(r): name for name, r in roots.items()}
    found: dict[str, list[tuple[bool, bool, Site]]] = {name: [] for name in roots}
    for node, value in prop.values.items():
        if not isinstance(value, tuple):
            continue
        nonlinear = getattr(targets.get(node), "overloadpacket", None) in _NONLINEAR
        per_dim = [
            [(group_of.get(sp.find(root)), pos) for root, pos in parts(sp, s, torch.arange(sp.size[sp.find(s)]).view(1, -1, 1))]
            for s in value
        ]
        grouped_dims = [d for d, ps in enumerate(per_dim) if any(name is not None for name, _ in ps)]
        for dim in grouped_dims:
            for name, pos in per_dim[dim]:
                ax = fit(node, dim, pos) if name is not None else None
                if ax is None:
                    continue
                site = Site(ax, tuple(d for d in grouped_dims if d != dim))
                found[name].append((site.clean, nonlinear, site))
    out: dict[str, tuple[Site, ...]] = {}
    for name, cands in found.items():
        cands = [c for c in cands if c[0]] or cands
        pick = [a for _, nl, a in cands if nl] or [a for _, _, a in cands]
        if len(pick) > max_sites:
            step = (len(pick) - 1) / (max_sites - 1)
            pick = [pick[round(i * step)] for i in range(max_sites)]
        out[name] = tuple(pick)
    return out
