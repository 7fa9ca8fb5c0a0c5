"""Turn propagated spaces into a :class:`PermutationSpec`: one group per free atomic space.

Each parameter axis is decomposed along its space's sum/product structure into atomic parts; the
positions each part occupies are fitted to an :class:`Axis` layout (offset, repeat, stride,
block). A part that fits no such layout is frozen, and the extraction runs again.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterator, Mapping

import torch

from permerge.errors import TraceError
from permerge.graph.classes import Classes
from permerge.graph.propagate import Propagation
from permerge.graph.spaces import PROD, Spaces, Why
from permerge.spec import CONSUMER, PERMUTATION, PRODUCER, Axis, Frozen, FrozenKind, Group, PermutationSpec

__all__ = ["build_spec", "fit", "parts"]


def parts(sp: Spaces, s: int, pos: torch.Tensor) -> Iterator[tuple[int, torch.Tensor]]:
    """Yield ``(atomic root, positions (R, n, B))`` for every atomic part of space ``s``."""
    r = sp.find(s)
    st = sp.struct.get(r)
    if st is None:
        yield r, pos
        return
    kind, children = st
    sizes = [sp.size[sp.find(c)] for c in children]
    rep, _, blk = pos.shape
    if kind == PROD:
        for p, child in enumerate(children):
            before, after = _prod(sizes[:p]), _prod(sizes[p + 1 :])
            yield from parts(sp, child, pos.reshape(rep * before, sizes[p], after * blk))
    else:
        start = 0
        for child, n in zip(children, sizes):
            yield from parts(sp, child, pos[:, start : start + n, :])
            start += n


def fit(key: str, dim: int, pos: torch.Tensor) -> Axis | None:
    rep, _, blk = pos.shape
    offset = int(pos[0, 0, 0])
    stride = int(pos[1, 0, 0]) - offset if rep > 1 else 0
    ax = Axis(key, dim, block=blk, offset=offset, repeat=rep, stride=stride)
    return ax if torch.equal(ax.positions(pos.shape[1]), pos) else None


def _name(ax: Axis, part: int, nparts: int) -> str:
    return f"{ax.key}:{ax.dim}" + (f"#{part}" if nparts > 1 else "")


def build_spec(
    prop: Propagation, aliases: Mapping[str, tuple[str, ...]], state_keys: tuple[str, ...], classes: Classes
) -> tuple[PermutationSpec, dict[str, int]]:
    """Groups = live, unfrozen atomic spaces of size > 1 that some parameter axis touches, each with
    its symmetry class; frozen ones are reported where they are boundaries or hold units (see
    :func:`_hidden`).

    Returns the spec and each group's space (root id), used to find its activation sites.
    """
    sp = prop.spaces
    order = {k: i for i, k in enumerate(state_keys)}
    canon = sorted(prop.param_dims, key=lambda k: order.get(k, len(order)))
    refrozen: set[int] = set()
    while True:  # each pass freezes one more free space that fits no Axis, so it ends
        members: dict[int, list[tuple[Axis, int, int]]] = {}
        units: set[int] = set()  # atomic spaces that are part of some layer's units
        misfit: int | None = None
        for key in canon:
            for dim, s in enumerate(prop.param_dims[key]):
                n = sp.size[sp.find(s)]
                pieces = list(parts(sp, s, torch.arange(n).view(1, n, 1)))
                role = CONSUMER if (key, dim) in prop.consumer_axes else PRODUCER
                if sp.find(s) in sp.units:
                    units.update(root for root, _ in pieces)
                for i, (root, pos) in enumerate(pieces):
                    for alias in aliases.get(key, (key,)):
                        ax = fit(alias, dim, pos)
                        if ax is None:
                            if root not in sp.frozen:  # a frozen space needs no Axis: it is never permuted
                                misfit = root
                            break
                        members.setdefault(root, []).append((dataclasses.replace(ax, role=role), i, len(pieces)))
        if misfit is None:
            break
        if misfit in refrozen:  # freezing it did not take: a bug, not a reason to spin
            raise TraceError(f"internal error: space {misfit} fits no Axis layout and cannot be frozen; please report it")
        refrozen.add(misfit)
        sp.freeze(misfit, Why(FrozenKind.LAYOUT, "layout too irregular for an Axis (nested repeats)"))
    groups: list[Group] = []
    roots: dict[str, int] = {}
    frozen: list[Frozen] = []
    live = {leaf for s in prop.live for leaf in sp.leaves(s)}
    taken: set[str] = set()
    for root, mem in members.items():
        axes = tuple(dict.fromkeys(a for a, _, _ in mem))
        size = sp.size[root]
        reason = sp.frozen.get(root)
        if reason is None and size > 1 and root in live:
            axes, symmetry = _query_key(classes, root, axes, size)
            first, part, nparts = mem[0]
            name = _name(first, part, nparts)
            while name in taken:
                name += "'"
            taken.add(name)
            groups.append(Group(name, size, axes, symmetry))
            roots[name] = root
        elif reason is not None and size > 1 and reason.kind is FrozenKind.NON_CHANNEL and root in sp.units:
            # a layer's units tied to an axis that is no channel: a constant or position grid varying along them
            frozen.append(Frozen(size, f"units meet a non-channel axis ({reason.text}): a constant, mask or position "
                                       "grid varies along them", axes, FrozenKind.UNSUPPORTED))  # fmt: skip
        elif reason is not None and size > 1 and _hidden(reason.kind, root in units):
            frozen.append(Frozen(size, reason.text, axes, reason.kind))
    return PermutationSpec(tuple(groups), tuple(frozen)), roots


def _query_key(classes: Classes, root: int, axes: tuple[Axis, ...], size: int) -> tuple[tuple[Axis, ...], str]:
    """A group's members with the key side marked ``dual``, and its class: permutations where a
    query·key group holds a member of neither projection (nothing proves its map)."""
    sides = [classes.side(root, ax, size) for ax in axes]
    if "other" in sides:
        return axes, PERMUTATION
    return tuple(dataclasses.replace(ax, dual=True) if s == "key" else ax for ax, s in zip(axes, sides)), classes(root)


_ALWAYS = frozenset({FrozenKind.UNREACHED, FrozenKind.USER, FrozenKind.RULE_ERROR})


def _hidden(kind: FrozenKind, units: bool) -> bool:
    """Whether a frozen space is reported: boundaries, unread parameters, user requests and rule
    errors always; what a rule froze only where it holds some layer's units (a position grid or
    a relative-position table frozen is no lost symmetry)."""
    return kind is not FrozenKind.NON_CHANNEL and (kind.boundary or kind in _ALWAYS or units)


def _prod(xs: list[int]) -> int:
    out = 1
    for x in xs:
        out *= x
    return out
