"""Activation matching (Git Re-Basin §3.1): pair B's units with A's by correlation on data.

Each group's units are recorded at a few activation sites of the traced graph (see
:mod:`permerge.graph.sites`), for A and B on the same batches; running sums give the Pearson
correlation of every (A unit, B unit) pair without storing activations. One linear assignment per
group maximises the summed correlation; groups are independent, so no coordinate descent.
"""

from __future__ import annotations

import logging
import sys
import time
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from types import MappingProxyType
from typing import Any

import torch
from torch import nn
from tqdm.auto import tqdm

from permerge.batches import as_call, inputs_of
from permerge.errors import PermergeError, SpecError
from permerge.graph import Traced, trace_graph
from permerge.graph.run import run_program
from permerge.graph.sites import Site
from permerge.match import lap
from permerge.permutation import Permutation
from permerge.spec import PermutationSpec

LOG = logging.getLogger(__name__)

__all__ = ["ActivationMatchingResult", "Correlation", "activation_matching", "batch_inputs", "record", "unit_samples"]


@dataclass(frozen=True)
class Correlation:
    """Running sums for the Pearson correlation of A's and B's units (immutable: update → new)."""

    count: int = 0
    sum_a: torch.Tensor = field(default_factory=lambda: torch.zeros(0, dtype=torch.float64))
    sum_b: torch.Tensor = field(default_factory=lambda: torch.zeros(0, dtype=torch.float64))
    sq_a: torch.Tensor = field(default_factory=lambda: torch.zeros(0, dtype=torch.float64))
    sq_b: torch.Tensor = field(default_factory=lambda: torch.zeros(0, dtype=torch.float64))
    cross: torch.Tensor = field(default_factory=lambda: torch.zeros(0, 0, dtype=torch.float64))

    def update(self, a: torch.Tensor, b: torch.Tensor) -> Correlation:
        """Add samples ``a``, ``b`` of shape ``(units, samples)``."""
        a, b = a.double(), b.double()
        if self.count == 0:
            return Correlation(a.shape[1], a.sum(1), b.sum(1), (a * a).sum(1), (b * b).sum(1), a @ b.T)
        return Correlation(
            self.count + a.shape[1], self.sum_a + a.sum(1), self.sum_b + b.sum(1),
            self.sq_a + (a * a).sum(1), self.sq_b + (b * b).sum(1), self.cross + a @ b.T,
        )  # fmt: skip

    def matrix(self, eps: float = 1e-8) -> torch.Tensor:
        n = max(self.count, 1)
        mean_a, mean_b = self.sum_a / n, self.sum_b / n
        std_a = (self.sq_a / n - mean_a**2).clamp_min(0).sqrt()
        std_b = (self.sq_b / n - mean_b**2).clamp_min(0).sqrt()
        cov = self.cross / n - torch.outer(mean_a, mean_b)
        return cov / (torch.outer(std_a, std_b) + eps)


@dataclass(frozen=True)
class ActivationMatchingResult:
    """Permutation (B's unit landing at each of A's positions), mean matched correlation per group."""

    permutation: Permutation
    correlation_before: Mapping[str, float]
    correlation_after: Mapping[str, float]
    batches: int
    samples: int
    backend: str
    seconds: float
    costs: Mapping[str, torch.Tensor] | None = None  # group → (A units × B units) correlation, if asked


def batch_inputs(batch: Any) -> tuple[Any, ...]:
    """Default ``input_fn``: the batch's positional model inputs (see :mod:`permerge.batches`)."""
    args, kwargs = as_call(inputs_of(batch))
    if kwargs or not args:
        raise PermergeError(f"cannot find positional model inputs in a batch of type {type(batch).__name__}; pass input_fn")
    return args


def activation_matching(
    model_a: nn.Module,
    model_b: nn.Module,
    spec: PermutationSpec | None,
    data: Iterable[Any],
    *,
    input_fn: Callable[[Any], tuple[Any, ...]] = batch_inputs,
    example_kwargs: Mapping[str, Any] | None = None,
    max_batches: int | None = None,
    backend: str = "auto",
    return_costs: bool = False,
    quiet: bool = False,
) -> ActivationMatchingResult:
    """Match every group of ``spec`` by the correlation of A's and B's activations on ``data``.

    ``data`` is any iterable of batches (a DataLoader, a list of tensors); ``input_fn`` turns a
    batch into the model's positional inputs. The graph is traced on the first batch; batches of
    another shape (a last partial batch) are skipped. ``spec`` (default: traced) must name groups
    the trace finds, since activations are located through the traced graph. ``return_costs``
    keeps each group's correlation matrix in ``result.costs`` (rows: A's units, columns: B's units
    in B's own order, so ``costs[g][i, permutation[g][i]]`` is the matched pair's correlation),
    which partial merging uses to decide which pairs to keep apart.
    """
    start = time.perf_counter()
    backend = lap.resolve_backend(backend)
    kwargs = dict(example_kwargs or {})
    it = iter(data)
    try:
        first = input_fn(next(it))
    except StopIteration:
        raise PermergeError("activation matching needs data: the iterable is empty") from None
    traced = trace_graph(model_a, first, example_kwargs=kwargs)
    spec = traced.spec if spec is None else spec
    missing = [g.name for g in spec.groups if not traced.sites.get(g.name)]
    if missing:
        raise SpecError(f"no activation site for groups {missing[:5]}; activation matching needs traced groups")
    sd_a, sd_b = model_a.state_dict(), model_b.state_dict()
    shape = [tuple(x.shape) for x in first if isinstance(x, torch.Tensor)]
    corr: dict[tuple[str, int], Correlation] = {}
    batches = 0
    inputs: tuple[Any, ...] | None = first
    bar = tqdm(total=max_batches, desc="activations", disable=quiet or not sys.stderr.isatty())
    while inputs is not None and (max_batches is None or batches < max_batches):
        if [tuple(x.shape) for x in inputs if isinstance(x, torch.Tensor)] == shape:
            _accumulate(traced, spec, sd_a, sd_b, inputs, kwargs, corr)
            batches += 1
            bar.update()
        else:
            LOG.warning("skipping a batch of shape %s (traced on %s)", inputs[0].shape, shape)
        inputs = input_fn(b) if (b := next(it, None)) is not None else None
    bar.close()
    perm, before, after, costs = {}, {}, {}, {}
    for g in spec.groups:
        cost = sum(corr[(g.name, i)].matrix() for i in range(len(traced.sites[g.name])))
        cost = cost / len(traced.sites[g.name])
        perm[g.name] = lap.solve(cost.float(), backend=backend)
        before[g.name] = cost.diagonal().mean().item()
        after[g.name] = cost[torch.arange(g.size), perm[g.name]].mean().item()
        if return_costs:
            costs[g.name] = cost.float()
    samples = sum(c.count for (name, i), c in corr.items() if i == 0)
    seconds = time.perf_counter() - start
    LOG.info("activation matching: %d groups on %d batches in %.2f s", len(spec.groups), batches, seconds)
    return ActivationMatchingResult(
        perm, MappingProxyType(before), MappingProxyType(after), batches, samples, backend, seconds,
        MappingProxyType(costs) if return_costs else None,
    )


def record(traced: Traced, state_dict: Mapping[str, torch.Tensor], inputs: tuple[Any, ...],
           kwargs: Mapping[str, Any], wanted: set[str]) -> dict[str, torch.Tensor]:  # fmt: skip
    """The values of graph nodes ``wanted`` when the traced program runs on ``inputs`` with ``state_dict``."""
    values: dict[str, torch.Tensor] = {}

    def keep(node: Any, vals: list[Any]) -> None:
        if node.name in wanted and isinstance(vals[0], torch.Tensor):
            values[node.name] = vals[0]

    run_program(traced.program, state_dict, inputs, kwargs, hook=keep)
    return values


def _accumulate(traced: Traced, spec: PermutationSpec, sd_a: Any, sd_b: Any, inputs: tuple[Any, ...],
                kwargs: Mapping[str, Any], corr: dict[tuple[str, int], Correlation]) -> None:  # fmt: skip
    wanted = {site.axis.key for g in spec.groups for site in traced.sites[g.name]}
    vals_a = record(traced, sd_a, inputs, kwargs, wanted)
    vals_b = record(traced, sd_b, inputs, kwargs, wanted)
    for g in spec.groups:
        for i, site in enumerate(traced.sites[g.name]):
            a, b = (unit_samples(v[site.axis.key], site, g.size) for v in (vals_a, vals_b))
            corr[(g.name, i)] = corr.get((g.name, i), Correlation()).update(a, b)


def unit_samples(value: torch.Tensor, site: Site, n: int) -> torch.Tensor:
    """``(n, samples)`` activations of the group's units at one site.

    At a clean site every other axis is batch/space/sequence: all of them are samples. Elsewhere
    other groups (head_dim under heads, say) reorder B's entries, so each unit is summarised per
    sample by statistics no permutation of those entries changes: their mean and mean square.
    """
    ax = site.axis
    x = value.float()
    if site.clean:
        return x.movedim(ax.dim, 0)[ax.offset : ax.offset + n].reshape(n, -1)
    keep = [d for d in range(x.dim()) if d != ax.dim and d not in site.reduce_dims]
    x = x.permute(ax.dim, *keep, *site.reduce_dims)
    samples = int(torch.tensor(x.shape[1 : 1 + len(keep)]).prod())
    x = x[ax.positions(n).flatten()].reshape(ax.repeat, n, ax.block, samples, -1)
    x = x.permute(1, 3, 0, 2, 4).reshape(n, samples, -1)
    return torch.cat([x.mean(-1), x.pow(2).mean(-1)], dim=1)
