"""The one graph runner: evaluate a traced :class:`~permerge.graph.capture.Program` with any weights.

The exported ATen graph takes parameters and buffers as inputs, so one graph runs with A's, B's, a
merged model's weights, or tensors read lazily from a checkpoint — without touching any user model.
Every consumer of traced graphs runs them through :class:`GraphRunner`:

* activation matching records a few nodes' values (``hook``);
* REPAIR runs all batches in lockstep, measures and corrects a site's statistics before anything
  downstream sees them (``hook``) and runs BatchNorm sites in train mode (``intercept``);
* PLeaS pauses before each layer it refits (:meth:`GraphRunner.run_to`), changes the weights, and
  continues: weights are read from ``params`` at each use, so a change takes effect downstream;
* the streamed function check reads each tensor of a checkpoint at its use and frees it after.

Values are kept per batch; a node that depends on no batch (a weight transform) is computed once.
Every value is freed after its last use unless it is in ``keep``.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from typing import Any

import torch
from torch import fx
from torch.utils import _pytree as pytree

from permerge.errors import PermergeError
from permerge.graph.capture import CONSTANT, STATE, USER, Program

__all__ = ["Batch", "GraphRunner", "run_program"]

Batch = tuple[tuple[Any, ...], Mapping[str, Any]]
"""One call's ``(args, kwargs)``, shaped like the example the program was exported with."""

Hook = Callable[[fx.Node, list[Any]], "list[Any] | None"]
"""``hook(node, values)`` after a node ran (one value per batch); a returned list replaces them."""

Intercept = Callable[[fx.Node, list[tuple[tuple[Any, ...], dict[str, Any]]]], "list[Any] | None"]
"""``intercept(node, calls)`` before a node runs (its ``(args, kwargs)`` per batch); a returned list
is used instead of running the node."""


class _Shared:
    """A value that does not depend on the batch (weights, constants, what is computed from them)."""

    __slots__ = ("value",)

    def __init__(self, value: Any):
        self.value = value


class _Batched:
    """A value per batch (anything computed from the inputs)."""

    __slots__ = ("values",)

    def __init__(self, values: list[Any]):
        self.values = values


def _at(v: Any, b: int) -> Any:
    """Leaf ``v`` of a node's arguments for batch ``b`` (literals pass through)."""
    if isinstance(v, _Batched):
        return v.values[b]
    return v.value if isinstance(v, _Shared) else v


class GraphRunner:
    """Run ``program`` on ``batches`` in lockstep, node by node, with weights from ``params``.

    ``params`` maps state-dict keys to tensors (a dict, or any lazy mapping); each is looked up when
    a node uses it and not kept. Raises :class:`~permerge.errors.PermergeError` naming missing keys
    or a batch that does not fit the program, before running anything.
    """

    def __init__(
        self,
        program: Program,
        params: Mapping[str, torch.Tensor],
        batches: Sequence[Batch],
        *,
        keep: Sequence[str] = (),
        hook: Hook | None = None,
        intercept: Intercept | None = None,
    ) -> None:
        if not batches:
            raise PermergeError("the graph runner needs at least one batch")
        self.program, self.params, self.hook, self.intercept = program, params, hook, intercept
        self.nodes = list(program.graph.nodes)
        self.batches = len(batches)
        self.keep = set(keep)
        self.kept: dict[str, Any] = {}
        self.env: dict[str, Any] = {}
        self.state: dict[str, str] = {}  # placeholder → state-dict key, looked up at each use
        flat = [pytree.tree_flatten((tuple(args), {**program.defaults, **kwargs}))[0] for args, kwargs in batches]
        users = sum(kind == USER for kind, _ in program.inputs)
        if any(len(f) < users for f in flat):
            raise PermergeError(f"a batch has fewer inputs than the traced example input ({users})")
        available = set(params)  # iterating keys reads no tensor of a lazy mapping
        missing = sorted(k for kind, k in program.inputs if kind == STATE and k not in available)
        if missing:
            raise PermergeError(f"the weights lack tensors the traced graph reads: {missing[:10]}")
        placeholders = [n for n in self.nodes if n.op == "placeholder"]
        u = 0
        for node, (kind, target) in zip(placeholders, program.inputs):
            if kind == STATE:
                self.state[node.name] = target  # type: ignore[assignment]
            elif kind == CONSTANT:
                self.env[node.name] = _Shared(program.constants[target])  # type: ignore[index]
            else:
                self.env[node.name] = _Batched([f[u] for f in flat])
                u += 1
        last: dict[str, int] = {}
        for i, n in enumerate(self.nodes):
            for a in n.all_input_nodes:
                last[a.name] = i
        self.free_at: dict[int, list[str]] = {}
        for name, i in last.items():
            self.free_at.setdefault(i, []).append(name)
        self.i = len(placeholders)
        self.outputs: list[Any] | None = None

    # -- stepping ---------------------------------------------------------------------------------

    def _get(self, n: fx.Node) -> Any:
        if n.name in self.state:
            return _Shared(self.params[self.state[n.name]])
        return self.env[n.name]

    def step(self) -> None:
        """Run the next node (for every batch), then free what no later node reads."""
        n = self.nodes[self.i]
        if n.op == "call_function":
            args, kwargs = fx.node.map_arg((n.args, n.kwargs), self._get)
            leaves, tree = pytree.tree_flatten((args, kwargs))
            if any(isinstance(v, _Batched) for v in leaves):
                calls = [pytree.tree_unflatten([_at(v, b) for v in leaves], tree) for b in range(self.batches)]
                values = self.intercept(n, calls) if self.intercept is not None else None
                if values is None:
                    values = [n.target(*a, **k) for a, k in calls]
                if self.hook is not None:
                    values = self.hook(n, values) or values
                self.env[n.name] = _Batched(values)
            else:
                a, k = pytree.tree_unflatten([_at(v, 0) for v in leaves], tree)
                self.env[n.name] = _Shared(n.target(*a, **k))
            if n.name in self.keep:
                self.kept[n.name] = self.env[n.name]
        elif n.op == "output":
            outs = fx.node.map_arg(n.args[0], self._get)
            self.outputs = [[_at(outs[i], b) for i in self.program.user_outputs] for b in range(self.batches)]
        else:
            raise PermergeError(f"cannot run graph node {n.name} ({n.op})")
        for name in self.free_at.get(self.i, ()):
            self.env.pop(name, None)
        self.i += 1

    @property
    def done(self) -> bool:
        return self.i >= len(self.nodes)

    def run_to(self, name: str) -> None:
        """Run every node before ``name`` (``name`` itself not yet)."""
        while self.nodes[self.i].name != name:
            if self.nodes[self.i].op == "output":
                raise PermergeError(f"graph node {name} was not reached")
            self.step()

    def values(self, name: str) -> list[Any]:
        """The value of a computed, not yet freed node ``name``, one per batch."""
        return self._per_batch(self.env[name])

    def take(self, name: str) -> list[Any]:
        """The values of kept node ``name`` (running the graph up to it if needed), then forgotten."""
        while name not in self.kept:
            if self.done:
                raise PermergeError(f"graph node {name} was not reached")
            self.step()
        return self._per_batch(self.kept.pop(name))

    def run(self) -> list[list[Any]]:
        """Run to the end; the forward's flat outputs, one list per batch."""
        while not self.done:
            self.step()
        assert self.outputs is not None, "an exported graph ends with its output node"
        return self.outputs

    def _per_batch(self, v: Any) -> list[Any]:
        return [v.value] * self.batches if isinstance(v, _Shared) else v.values


def run_program(
    program: Program,
    params: Mapping[str, torch.Tensor],
    args: tuple[Any, ...],
    kwargs: Mapping[str, Any] | None = None,
    *,
    hook: Hook | None = None,
) -> list[Any]:
    """Evaluate ``program`` once on ``(args, kwargs)`` with weights from ``params`` (no autograd);
    returns the forward's flat outputs. ``hook(node, [value])`` sees every computed node."""
    with torch.no_grad():
        return GraphRunner(program, params, [(tuple(args), dict(kwargs or {}))], hook=hook).run()[0]
