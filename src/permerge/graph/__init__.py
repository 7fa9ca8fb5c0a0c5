"""Derive a :class:`~permerge.spec.PermutationSpec` from an arbitrary ``nn.Module``."""

from __future__ import annotations

import logging
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from permerge.graph import cache as _cache
from permerge.graph.capture import capture
from permerge.graph.groups import build_spec
from permerge.graph.propagate import propagate
from permerge.graph.rules import RULES, Call, Rule, register_rule
from permerge.graph.sites import Site, activation_sites
from permerge.spec import PermutationSpec

LOG = logging.getLogger(__name__)

__all__ = ["RULES", "Call", "Traced", "register_rule", "trace", "trace_graph"]


@dataclass(frozen=True)
class Traced:
    """A spec plus the exported graph and, per group, where its units appear as activations."""

    spec: PermutationSpec
    sites: dict[str, tuple[Site, ...]]  # group → where its units appear as activations
    program: torch.export.ExportedProgram
    consumer_axes: frozenset[tuple[str, int]]  # (key, dim) that read a group's features (W's dim 1)


def trace_graph(
    model: nn.Module,
    example_inputs: Any,
    *,
    example_kwargs: Mapping[str, Any] | None = None,
    rules: Mapping[object, Rule] | None = None,
    strict: bool = False,
) -> Traced:
    """Like :func:`trace`, also returning the exported program and each group's activation sites."""
    cap = capture(model, example_inputs, example_kwargs)
    prop = propagate(cap, rules, strict)
    spec, roots = build_spec(prop, cap.aliases, cap.state_keys)
    if prop.unknown:
        LOG.warning(
            "froze channels at ops without a rule: %s",
            ", ".join(f"{op} ×{n}" for op, n in sorted(prop.unknown.items())),
        )
    LOG.info("traced %s: %d groups, %d frozen spaces", type(model).__name__, len(spec.groups), len(spec.frozen))
    targets = {n.name: n.target for n in cap.graph.nodes}
    consumers = frozenset((alias, dim) for key, dim in prop.consumer_axes for alias in cap.aliases.get(key, (key,)))
    return Traced(spec, activation_sites(prop, roots, targets), cap.program, consumers)


def trace(
    model: nn.Module,
    example_inputs: Any,
    *,
    example_kwargs: Mapping[str, Any] | None = None,
    rules: Mapping[object, Rule] | None = None,
    freeze: Iterable[str] = (),
    strict: bool = False,
    cache: bool = True,
) -> PermutationSpec:
    """Find every group of hidden units that can be permuted without changing ``model``'s function.

    Traces ``model(*example_inputs, **example_kwargs)`` with ``torch.export`` (eval mode; the model
    is left as it was), propagates channel spaces through the ATen graph with the per-op
    :data:`RULES` (plus ``rules``, which take precedence), and returns the groups and the frozen
    spaces with their reasons. Ops without a rule freeze what they touch (``strict=True`` raises
    instead); ``freeze`` names groups to leave unpermuted.

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
    k = _cache.key(model, example_inputs, example_kwargs, strict, RULES) if cache and rules is None else None
    spec = _cache.get(k) if k is not None else None
    if spec is None:
        spec = trace_graph(model, example_inputs, example_kwargs=example_kwargs, rules=rules, strict=strict).spec
        if k is not None:
            _cache.put(k, spec)
    else:
        LOG.info("traced %s: cached spec, %d groups", type(model).__name__, len(spec.groups))
    return spec.without(freeze) if freeze else spec
