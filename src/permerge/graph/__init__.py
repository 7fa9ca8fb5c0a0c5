"""Derive a :class:`~permerge.spec.PermutationSpec` from an arbitrary ``nn.Module``: the one traced product.

:func:`trace_graph` exports the model once per architecture and input shapes (cached per process) into
a :class:`Traced`: the spec, the exported program (without weights: bind any state dict with
:mod:`permerge.graph.run`), each group's activation sites and the layer semantics
(:mod:`permerge.graph.layers`). Matchers, REPAIR, PLeaS and partial merging take it instead of
exporting again; :func:`trace` returns its spec.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from functools import cached_property
from typing import Any

from torch import nn

from permerge.errors import TraceError
from permerge.graph import cache as _cache
from permerge.graph.capture import Captured, Program, as_args, capture
from permerge.graph.classes import symmetry_classes
from permerge.graph.groups import build_spec
from permerge.graph.layers import Layer, find_layers
from permerge.graph.propagate import propagate
from permerge.graph.rules import RULES, Call, Rule, register_rule
from permerge.graph.sites import Site, activation_sites
from permerge.spec import PermutationSpec

LOG = logging.getLogger(__name__)

__all__ = ["RULES", "Call", "Example", "Traced", "register_rule", "trace", "trace_graph"]


@dataclass(frozen=True)
class Example:
    """One example call of a model: ``model(*args, **kwargs)`` in eval mode, or train mode with ``train``.

    Pass extra examples to :func:`trace` for the code paths one call does not run (a task head chosen
    by a keyword, a branch taken only in training): every call is traced and their constraints
    combined, so a unit moves only if it may move under each of them.
    """

    args: tuple[Any, ...]
    kwargs: Mapping[str, Any] = field(default_factory=dict)
    train: bool = False


@dataclass(frozen=True)
class Traced:
    """What tracing a model yields: the spec, the exported program, activation sites, layers.

    ``program`` is the first example call's graph, holding no weights (run it with any state dict
    through :class:`permerge.graph.run.GraphRunner`); ``sites[g]`` are where group ``g``'s units appear
    as activations; ``layers`` the affine layers and norms in graph order; ``unknown`` counts the
    ops without a rule that froze channels.
    """

    spec: PermutationSpec
    program: Program
    sites: Mapping[str, tuple[Site, ...]]
    layers: tuple[Layer, ...]
    unknown: Mapping[str, int] = field(default_factory=dict)

    @cached_property
    def _by_node(self) -> dict[str, Layer]:
        return {layer.node: layer for layer in self.layers}

    def layer(self, node: str) -> Layer | None:
        """The layer computed by graph node ``node``, if it is one."""
        return self._by_node.get(node)


def _examples(
    example_inputs: Any, example_kwargs: Mapping[str, Any] | None, extra: Sequence[Example], train_mode: bool
) -> list[Example]:
    first = Example(as_args(example_inputs), dict(example_kwargs or {}))
    calls = [first] + ([Example(first.args, first.kwargs, True)] if train_mode else [])
    for e in extra:
        if not isinstance(e, Example):
            raise TraceError(f"extra_examples must be permerge.graph.Example(args, kwargs, train), got {type(e).__name__}")
        calls.append(Example(as_args(e.args), dict(e.kwargs), e.train))
    return calls


def _capture_all(model: nn.Module, calls: list[Example], train_mode: bool) -> list[Captured]:
    """Export every call; the implicit train-mode export is best effort (some models cannot be
    exported in train mode, e.g. BatchNorm with batch size 1): it is dropped with a warning."""
    caps = [capture(model, calls[0].args, calls[0].kwargs)]
    for i, c in enumerate(calls[1:], start=1):
        try:
            caps.append(capture(model, c.args, c.kwargs, train=c.train))
        except TraceError as e:
            if not (train_mode and i == 1):
                raise
            LOG.warning("traced %s in eval mode only (train-mode export failed: %s); code that runs only in "
                        "training is not covered", type(model).__name__, str(e).splitlines()[0])  # fmt: skip
    return caps


def trace_graph(
    model: nn.Module,
    example_inputs: Any,
    *,
    example_kwargs: Mapping[str, Any] | None = None,
    extra_examples: Sequence[Example] = (),
    train_mode: bool = True,
    rules: Mapping[object, Rule] | None = None,
    strict: bool = False,
    cache: bool = True,
) -> Traced:
    """Trace ``model`` once per architecture and input shapes (see :func:`trace`); the full product."""
    calls = _examples(example_inputs, example_kwargs, extra_examples, train_mode)
    k = _cache.key(model, calls, strict, RULES) if cache and rules is None else None
    traced = _cache.get(k) if k is not None else None
    if traced is not None:
        LOG.info("traced %s: cached, %d groups", type(model).__name__, len(traced.spec.groups))
        return traced
    caps = _capture_all(model, calls, train_mode)
    prop = propagate(caps, rules, strict)
    layers = [find_layers(c) for c in caps]
    spec, roots = build_spec(prop, caps[0].aliases, caps[0].state_keys, symmetry_classes(prop, caps, layers))
    if prop.unknown:
        LOG.warning(
            "froze channels at ops without a rule: %s",
            ", ".join(f"{op} ×{n}" for op, n in sorted(prop.unknown.items())),
        )
    LOG.info("traced %s: %d groups, %d frozen spaces", type(model).__name__, len(spec.groups), len(spec.frozen))
    targets = {n.name: n.target for n in caps[0].graph.nodes}
    traced = Traced(spec, caps[0].program, activation_sites(prop, roots, targets), layers[0], prop.unknown)
    if k is not None:
        _cache.put(k, traced)
    return traced


def trace(
    model: nn.Module,
    example_inputs: Any,
    *,
    example_kwargs: Mapping[str, Any] | None = None,
    extra_examples: Sequence[Example] = (),
    train_mode: bool = True,
    rules: Mapping[object, Rule] | None = None,
    freeze: Iterable[str] = (),
    strict: bool = False,
    cache: bool = True,
) -> PermutationSpec:
    """Find every group of hidden units that can be permuted without changing ``model``'s function.

    Traces ``model(*example_inputs, **example_kwargs)`` with ``torch.export`` (eval mode; the model
    is left as it was), propagates channel spaces through the ATen graph with the per-op
    :data:`RULES` (plus ``rules``, which take precedence), and returns the groups and the frozen
    spaces with their kinds and reasons. Ops without a rule freeze what they touch (``strict=True``
    raises instead); ``freeze`` names groups to leave unpermuted.

    The forward is traced in eval mode and, with ``train_mode`` (default), in train mode too, so
    branches that run only in training (auxiliary heads, say) constrain the groups. Parameters no
    traced call reads are frozen, with a warning: pass ``extra_examples`` for the calls that do read
    them (a task head chosen by a keyword argument, another input shape).

    The spec depends on the architecture and the input shapes only, so it is cached per process
    (see :mod:`permerge.graph.cache` for the key): tracing a second model of the same architecture
    with same-shaped inputs costs microseconds. ``cache=False`` always traces afresh.

    Example:
        >>> import torch, permerge
        >>> mlp = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.ReLU(), torch.nn.Linear(8, 2))
        >>> spec = permerge.trace(mlp, torch.randn(3, 4))
        >>> [(g.name, g.size) for g in spec.groups]
        [('0.weight:0', 8)]
    """
    traced = trace_graph(
        model, example_inputs, example_kwargs=example_kwargs, extra_examples=extra_examples, train_mode=train_mode,
        rules=rules, strict=strict, cache=cache,
    )  # fmt: skip
    return traced.spec.without(freeze) if freeze else traced.spec
