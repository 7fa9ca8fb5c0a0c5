"""Run an exported program on weights read lazily: each tensor at its first use, freed after its last.

Stand-in for the lead's ``permerge.graph.run`` (one graph runner for REPAIR, PLeaS and the checks),
written against the same minimal interface so it can be swapped for it: ``run_program(program,
weights, args, kwargs) -> user outputs``. A program traced on the meta device runs on the CPU (device
arguments baked into the graph, such as ``arange(..., device="meta")``, are redirected).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch
from torch import fx
from torch.export.graph_signature import InputKind, OutputKind
from torch.utils import _pytree as pytree

from permerge.errors import PermergeError

__all__ = ["run_program"]


class _Weight:
    """Placeholder value standing for ``weights[key]`` until a node reads it."""

    __slots__ = ("key",)

    def __init__(self, key: str) -> None:
        self.key = key


class _LazyRunner(fx.Interpreter):
    def __init__(self, gm: fx.GraphModule, weights: Mapping[str, torch.Tensor], device: torch.device) -> None:
        super().__init__(gm)  # garbage_collect_values: activations are dropped after their last use
        self.weights, self.device = weights, device
        self.loaded: dict[str, torch.Tensor] = {}
        self.release: dict[fx.Node, list[str]] = {}  # node → weights read for the last time there
        self.placeholder_key: dict[fx.Node, str] = {}

    def run_node(self, n: fx.Node) -> Any:
        if n.op == "placeholder":
            return super().run_node(n)
        with self._set_current_node(n):
            args, kwargs = self.fetch_args_kwargs_from_env(n)
            args, kwargs = pytree.tree_map(self._resolve, (args, kwargs))
            out = getattr(self, n.op)(n.target, args, kwargs)
        for key in self.release.get(n, ()):
            self.loaded.pop(key, None)
        return out

    def _resolve(self, x: Any) -> Any:
        if isinstance(x, _Weight):
            if x.key not in self.loaded:
                self.loaded[x.key] = self.weights[x.key].to(self.device)
            return self.loaded[x.key]
        if isinstance(x, torch.device) and x.type == "meta":
            return self.device
        return x


def run_program(
    program: torch.export.ExportedProgram,
    weights: Mapping[str, torch.Tensor],
    args: tuple[Any, ...],
    kwargs: Mapping[str, Any],
    *,
    device: torch.device | str = "cpu",
) -> list[Any]:
    """Evaluate ``program`` on ``(args, kwargs)`` with parameters and buffers from ``weights``
    (state-dict keys; read at first use, dropped after last use); returns the user outputs, flat.

    Buffers ``weights`` lacks come from the program (its constants); inputs must have the exported
    shapes. Nothing is cached between calls, so two runs hold one model's tensors at a time, at most.
    """
    gm = program.graph_module
    runner = _LazyRunner(gm, weights, torch.device(device))
    user = iter(pytree.tree_flatten((tuple(args), dict(kwargs)))[0])
    flat: list[Any] = []
    for spec in program.graph_signature.input_specs:
        if spec.kind in (InputKind.PARAMETER, InputKind.BUFFER) and spec.target in weights:
            flat.append(_Weight(spec.target))
        elif spec.kind in (InputKind.BUFFER, InputKind.CONSTANT_TENSOR, InputKind.CUSTOM_OBJ):
            value = program.constants.get(spec.target, program.state_dict.get(spec.target))
            if isinstance(value, torch.Tensor) and value.is_meta:
                raise PermergeError(f"cannot run the traced program: {spec.target!r} has no value (pass it in weights)")
            flat.append(value)
        elif spec.kind == InputKind.USER_INPUT:
            try:
                flat.append(next(user))
            except StopIteration:
                raise PermergeError("the input has fewer leaves than the traced example input") from None
        else:
            raise PermergeError(f"cannot feed graph input {spec.target!r} of kind {spec.kind.name}")
    order = {n: i for i, n in enumerate(gm.graph.nodes)}
    placeholders = [n for n in gm.graph.nodes if n.op == "placeholder"]
    for node, value in zip(placeholders, flat, strict=True):
        if isinstance(value, _Weight) and node.users:
            runner.release.setdefault(max(node.users, key=order.__getitem__), []).append(value.key)
    with torch.no_grad():
        outs = runner.run(*flat)
    kinds = [s.kind for s in program.graph_signature.output_specs]
    return [o for o, k in zip(outs, kinds, strict=True) if k == OutputKind.USER_OUTPUT]
