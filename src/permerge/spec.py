"""The permutation spec: which tensor axes move together when hidden units are reordered.

A *group* is a set of unit positions that must be permuted together for the model's function to
stay the same (a "permutation group" in Git Re-Basin). Each member of a group is an :class:`Axis`:
a dimension of one state-dict tensor plus the layout of the group's units along that dimension.

Example:
    >>> from permerge.spec import Axis, Group, PermutationSpec
    >>> hidden = Group("fc1:out", 4, (Axis("fc1.weight", 0), Axis("fc1.bias", 0), Axis("fc2.weight", 1)))
    >>> spec = PermutationSpec((hidden,))
    >>> spec.axes_of("fc2.weight")
    (('fc1:out', Axis(key='fc2.weight', dim=1, block=1, offset=0, repeat=1, stride=0)),)
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Mapping
from dataclasses import asdict, dataclass, field
from enum import Enum
from functools import cached_property
from types import MappingProxyType

import torch

from permerge.errors import SpecError

__all__ = [
    "CONSUMER", "INVERTIBLE", "ORTHOGONAL", "PERMUTATION", "PRODUCER", "SCALED_PERMUTATION", "SYMMETRIES",
    "Axis", "Frozen", "FrozenKind", "Group", "PermutationSpec", "meet", "within",
]  # fmt: skip

PRODUCER, CONSUMER = "producer", "consumer"
"""Axis roles: a *producer* axis carries the group's features (a weight's output rows, a bias, norm
parameters, running statistics, embedding columns); a *consumer* axis reads them (a weight's input
columns). Partial merging applies merge maps to producers and unmerge maps to consumers."""


@dataclass(frozen=True)
class Axis:
    """Where a group's ``n`` units sit along dimension ``dim`` of tensor ``key``.

    The positions are ``offset + r*stride + i*block + b`` for ``r < repeat``, unit ``i < n`` and
    ``b < block``: ``block`` covers a flattened conv→linear edge (each unit owns ``H*W`` columns) and
    whole attention heads (a head owns ``head_dim`` rows); ``repeat``/``stride`` cover the
    within-head dimension shared by every head; ``offset`` covers a slice of a concatenation.
    """

    key: str
    dim: int
    block: int = 1
    offset: int = 0
    repeat: int = 1
    stride: int = 0
    role: str | None = None  # PRODUCER / CONSUMER when traced; None in hand-written specs
    dual: bool = False  # the key side of a query·key product (see ``contravariant``)

    def positions(self, n: int) -> torch.Tensor:
        """Index tensor of shape ``(repeat, n, block)``: the positions unit ``i`` occupies."""
        r = torch.arange(self.repeat).view(-1, 1, 1) * self.stride
        i = torch.arange(n).view(1, -1, 1) * self.block
        b = torch.arange(self.block).view(1, 1, -1)
        return self.offset + r + i + b

    @property
    def contravariant(self) -> bool:
        """Whether a dense map ``M`` of the group acts on this axis as ``M⁻ᵀ``: a consumer, or the key
        side of a query·key product (``dual``), which reads the query's units through a dot product."""
        return self.role == CONSUMER or self.dual

    def extent(self, n: int) -> int:
        """One past the largest position this axis touches."""
        return self.offset + (self.repeat - 1) * self.stride + n * self.block


PERMUTATION, SCALED_PERMUTATION, ORTHOGONAL, INVERTIBLE = "permutation", "scaled_permutation", "orthogonal", "invertible"
SYMMETRIES = (PERMUTATION, SCALED_PERMUTATION, ORTHOGONAL, INVERTIBLE)
"""Symmetry classes of a group. Permutations are contained in every other class; scaled permutations
(a permutation times positive per-unit scales, for ReLU-like units) and orthogonal maps are both
invertible maps, but neither contains the other. A group's class is the largest under which every
op touching its units is equivariant; permutations are always allowed."""

_BELOW = {PERMUTATION: {PERMUTATION}, SCALED_PERMUTATION: {PERMUTATION, SCALED_PERMUTATION},
          ORTHOGONAL: {PERMUTATION, ORTHOGONAL}, INVERTIBLE: set(SYMMETRIES)}  # fmt: skip


def meet(a: str, b: str) -> str:
    """The largest class contained in both ``a`` and ``b`` (orthogonal ∧ scaled permutation = permutation)."""
    common = _BELOW[a] & _BELOW[b]
    return next(c for c in (INVERTIBLE, ORTHOGONAL, SCALED_PERMUTATION, PERMUTATION) if c in common)


def within(cls: str) -> frozenset[str]:
    """The classes contained in ``cls`` (itself included)."""
    return frozenset(_BELOW[cls])


@dataclass(frozen=True)
class Group:
    """A set of ``size`` units whose positions in every member axis move together.

    ``symmetry`` is the largest class of maps of the units that keeps the function (see
    :data:`SYMMETRIES`); matching uses permutations unless a richer class is asked for.
    """

    name: str
    size: int
    members: tuple[Axis, ...]
    symmetry: str = PERMUTATION

    @cached_property
    def keys(self) -> frozenset[str]:
        """The tensors this group's members live on."""
        return frozenset(ax.key for ax in self.members)


class FrozenKind(str, Enum):
    """Why a channel space is left unpermuted, as data (``Frozen.reason`` is the human-readable detail)."""

    MODEL_INPUT = "model_input"  # the task's boundary: fixed by the data, not a hidden unit ...
    MODEL_OUTPUT = "model_output"  # ... fixed by the labels / the caller
    TOKEN_ROWS = "token_rows"  # embedding rows indexed by token ids
    NO_RULE = "no_rule"  # an op without a rule touched it (register one to unfreeze)
    RULE_ERROR = "rule_error"  # a rule raised: a bug in permerge, frozen to stay safe
    CONFLICT = "conflict"  # two layouts (concatenation vs heads, say) with no common refinement
    UNSUPPORTED = "unsupported"  # a rule proves no non-trivial permutation keeps the function (RoPE dims, …)
    LAYOUT = "layout"  # units sit at positions no Axis layout describes
    UNREACHED = "unreached"  # a parameter the traced forward never reads: no evidence it may move
    USER = "user"  # frozen on request (``freeze=``)
    NON_CHANNEL = "non_channel"  # not a channel at all (kernel taps, spatial, batch axes); never reported

    @property
    def boundary(self) -> bool:
        return self in _BOUNDARY


_BOUNDARY = frozenset({FrozenKind.MODEL_INPUT, FrozenKind.MODEL_OUTPUT, FrozenKind.TOKEN_ROWS})


@dataclass(frozen=True)
class Frozen:
    """A channel space left unpermuted: its ``kind`` (data) and the ``reason`` (for people).

    ``boundary`` spaces (model inputs, outputs, token-id rows) are fixed by the task itself and
    are not hidden units; every other frozen space is a hidden symmetry left unused.
    """

    size: int
    reason: str
    members: tuple[Axis, ...] = ()
    kind: FrozenKind = FrozenKind.UNSUPPORTED

    @property
    def boundary(self) -> bool:
        return self.kind.boundary


@dataclass(frozen=True)
class PermutationSpec:
    """Groups of coupled axes plus the frozen spaces; the one contract between trace, match, apply.

    The reverse index ``key → ((group, axis), …)`` is derived here and nowhere else.
    """

    groups: tuple[Group, ...]
    frozen: tuple[Frozen, ...] = ()
    _by_name: Mapping[str, Group] = field(init=False, repr=False, compare=False)
    _by_key: Mapping[str, tuple[tuple[str, Axis], ...]] = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        by_name: dict[str, Group] = {}
        by_key: dict[str, list[tuple[str, Axis]]] = {}
        for g in self.groups:
            if g.name in by_name:
                raise SpecError(f"duplicate group name {g.name!r}")
            if g.size < 1:
                raise SpecError(f"group {g.name!r} has size {g.size}; sizes must be >= 1")
            if g.symmetry not in SYMMETRIES:
                raise SpecError(f"group {g.name!r} has symmetry {g.symmetry!r}; choose one of {', '.join(SYMMETRIES)}")
            by_name[g.name] = g
            for ax in g.members:
                by_key.setdefault(ax.key, []).append((g.name, ax))
        object.__setattr__(self, "_by_name", MappingProxyType(by_name))
        object.__setattr__(
            self, "_by_key", MappingProxyType({k: tuple(v) for k, v in by_key.items()})
        )

    def __getitem__(self, name: str) -> Group:
        try:
            return self._by_name[name]
        except KeyError:
            raise SpecError(
                f"no group named {name!r}; groups are: {', '.join(sorted(self._by_name)) or '(none)'}"
            ) from None

    def __contains__(self, name: object) -> bool:
        return name in self._by_name

    def __len__(self) -> int:
        return len(self.groups)

    @property
    def names(self) -> tuple[str, ...]:
        return tuple(g.name for g in self.groups)

    @property
    def keys(self) -> tuple[str, ...]:
        """State-dict keys touched by at least one group."""
        return tuple(self._by_key)

    def axes_of(self, key: str) -> tuple[tuple[str, Axis], ...]:
        """``(group name, axis)`` pairs that permute tensor ``key`` (empty if none)."""
        return self._by_key.get(key, ())

    # -- validation -------------------------------------------------------------------------
    def validate(self, shapes: Mapping[str, torch.Size | tuple[int, ...] | torch.Tensor]) -> None:
        """Raise :class:`SpecError` unless every member axis fits the tensor it names.

        ``shapes`` maps state-dict keys to shapes (or tensors). Overlapping positions of two
        groups on one dimension are only allowed when they factorise it (heads × head_dim).
        """
        problems: list[str] = []
        for g in self.groups:
            for ax in g.members:
                if ax.key not in shapes:
                    problems.append(f"group {g.name!r}: tensor {ax.key!r} is not in the state dict")
                    continue
                v = shapes[ax.key]
                shape = tuple(v.shape) if isinstance(v, torch.Tensor) else tuple(v)
                if not -len(shape) <= ax.dim < len(shape):
                    problems.append(
                        f"group {g.name!r}: {ax.key!r} has {len(shape)} dims, axis dim={ax.dim}"
                    )
                    continue
                length = shape[ax.dim]
                if ax.block < 1 or ax.repeat < 1 or ax.offset < 0:
                    problems.append(f"group {g.name!r}: bad layout {ax}")
                elif ax.repeat > 1 and ax.stride < g.size * ax.block:
                    problems.append(f"group {g.name!r}: {ax} has stride < size*block (overlap)")
                elif ax.extent(g.size) > length:
                    problems.append(
                        f"group {g.name!r} (size {g.size}): {ax.key!r} dim {ax.dim} has length "
                        f"{length} but the axis needs {ax.extent(g.size)}"
                    )
        if problems:
            raise SpecError("spec does not match the model:\n  " + "\n  ".join(sorted(problems)))

    # -- views ------------------------------------------------------------------------------
    def summary(self) -> list[dict[str, object]]:
        """One row per group: name, size, number of distinct tensors, symmetry class."""
        return [
            {"name": g.name, "size": g.size, "tensors": len({a.key for a in g.members}), "symmetry": g.symmetry}
            for g in self.groups
        ]

    def permutable_fraction(self, shapes: Mapping[str, torch.Tensor | tuple[int, ...]]) -> float:
        """Share of hidden channel axes that some group permutes, each axis weighted by its
        tensor's element count (boundary axes — model input/output, token rows — excluded)."""

        def numel(key: str) -> int:
            v = shapes[key]
            return v.numel() if isinstance(v, torch.Tensor) else int(torch.Size(v).numel())

        moved = sum(numel(a.key) for g in self.groups for a in g.members)
        lost = sum(numel(a.key) for f in self.frozen if not f.boundary for a in f.members)
        return moved / (moved + lost) if moved + lost else 0.0

    def restricted_to(self, keys: Iterable[str]) -> PermutationSpec:
        """The same groups seeing only tensors in ``keys`` (e.g. parameters without buffers);
        groups left with no member are dropped."""
        keys = set(keys)
        groups = []
        for g in self.groups:
            members = tuple(a for a in g.members if a.key in keys)
            if members:
                groups.append(Group(g.name, g.size, members, g.symmetry))
        return PermutationSpec(tuple(groups), self.frozen)

    def without(self, names: Iterable[str]) -> PermutationSpec:
        """A copy with the named groups frozen (reason: user override)."""
        names = set(names)
        for n in names:
            self[n]  # raises with the list of names
        keep = tuple(g for g in self.groups if g.name not in names)
        extra = tuple(
            Frozen(g.size, f"frozen by user ({g.name})", g.members, FrozenKind.USER)
            for g in self.groups
            if g.name in names
        )
        return PermutationSpec(keep, self.frozen + extra)

    # -- serialisation ----------------------------------------------------------------------
    def to_dict(self) -> dict[str, object]:
        def axes(members: tuple[Axis, ...]) -> list[dict[str, object]]:
            out = []
            for a in members:
                d = asdict(a)
                # keep the JSON readable: drop fields at their defaults
                out.append({k: v for k, v in d.items() if k in ("key", "dim") or v != _AXIS_DEFAULTS[k]})
            return out

        return {
            "format": _FORMAT,
            "groups": [
                {"name": g.name, "size": g.size, "members": axes(g.members)}
                | ({"symmetry": g.symmetry} if g.symmetry != PERMUTATION else {})
                for g in self.groups
            ],
            "frozen": [
                {"size": f.size, "kind": f.kind.value, "reason": f.reason, "members": axes(f.members)}
                for f in self.frozen
            ],
        }

    def to_json(self, indent: int | None = 1) -> str:
        return json.dumps(self.to_dict(), indent=indent)

    @classmethod
    def from_dict(cls, data: Mapping[str, object]) -> PermutationSpec:
        try:
            groups = tuple(
                Group(str(g["name"]), int(g["size"]), tuple(Axis(**a) for a in g["members"]), str(g.get("symmetry", PERMUTATION)))
                for g in data["groups"]  # type: ignore[union-attr]
            )
            frozen = tuple(
                Frozen(int(f["size"]), str(f["reason"]), tuple(Axis(**a) for a in f.get("members", ())), _kind(f))
                for f in data.get("frozen", ())  # type: ignore[union-attr]
            )
        except (KeyError, TypeError, ValueError) as e:
            raise SpecError(f"not a permerge spec: {e!r}") from e
        return cls(groups, frozen)

    @classmethod
    def from_json(cls, text: str) -> PermutationSpec:
        try:
            return cls.from_dict(json.loads(text))
        except json.JSONDecodeError as e:
            raise SpecError(f"spec is not valid JSON: {e}") from e

    # -- Git Re-Basin's axes_to_perm form ---------------------------------------------------
    @classmethod
    def from_axes_to_perm(
        cls, axes_to_perm: Mapping[str, Iterable[str | None]], shapes: Mapping[str, object]
    ) -> PermutationSpec:
        """Build a spec from ``{param: (group or None per axis)}``, the form hand-written specs use.

        ``shapes`` (state dict or key → shape) gives each group's size and is validated against.
        """
        members: dict[str, list[Axis]] = {}
        sizes: dict[str, int] = {}
        for key, names in axes_to_perm.items():
            if key not in shapes:
                raise SpecError(f"axes_to_perm names {key!r}, which is not in the state dict")
            v = shapes[key]
            shape = tuple(v.shape) if isinstance(v, torch.Tensor) else tuple(v)  # type: ignore[arg-type]
            names = tuple(names)
            if len(names) != len(shape):
                raise SpecError(
                    f"axes_to_perm[{key!r}] has {len(names)} entries but the tensor has shape {shape}"
                )
            for dim, name in enumerate(names):
                if name is None:
                    continue
                if sizes.setdefault(name, shape[dim]) != shape[dim]:
                    raise SpecError(
                        f"group {name!r} has size {sizes[name]} elsewhere but {key!r} dim {dim} "
                        f"has length {shape[dim]}"
                    )
                members.setdefault(name, []).append(Axis(key, dim))
        spec = cls(tuple(Group(n, sizes[n], tuple(m)) for n, m in members.items()))
        spec.validate(shapes)  # type: ignore[arg-type]
        return spec

    def to_axes_to_perm(self, shapes: Mapping[str, object]) -> dict[str, tuple[str | None, ...]]:
        """Export as ``{param: (group or None per axis)}``; raises if a layout does not fit it."""
        out: dict[str, list[str | None]] = {}
        for g in self.groups:
            for a in g.members:
                if (a.block, a.offset, a.repeat) != (1, 0, 1):
                    raise SpecError(
                        f"group {g.name!r} member {a} uses a block/offset/repeat layout, which "
                        "axes_to_perm cannot express"
                    )
                v = shapes[a.key]
                ndim = v.dim() if isinstance(v, torch.Tensor) else len(v)  # type: ignore[arg-type]
                row = out.setdefault(a.key, [None] * ndim)
                if row[a.dim] is not None:
                    raise SpecError(f"{a.key!r} dim {a.dim} is in two groups")
                row[a.dim] = g.name
        return {k: tuple(v) for k, v in out.items()}


_AXIS_DEFAULTS = {"block": 1, "offset": 0, "repeat": 1, "stride": 0, "role": None, "dual": False}
_FORMAT = "permerge.spec/2"


def _kind(f: Mapping[str, object]) -> FrozenKind:
    """A frozen entry's kind; ``permerge.spec/1`` files had only a ``boundary`` flag."""
    if "kind" in f:
        return FrozenKind(f["kind"])
    if not f.get("boundary", False):
        return FrozenKind.UNSUPPORTED
    reason = str(f.get("reason", ""))  # spec/1 only: its boundary reasons started with these words
    return FrozenKind.MODEL_INPUT if reason.startswith("model input") else (
        FrozenKind.TOKEN_ROWS if reason.startswith("embedding rows") else FrozenKind.MODEL_OUTPUT)
