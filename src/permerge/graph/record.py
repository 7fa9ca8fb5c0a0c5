"""Run an exported graph with any model's weights and hand the values at chosen nodes to a callback.

The lifted ATen graph takes parameters and buffers as inputs, so the same graph runs with A's or
B's state dict without touching either model (no ``load_state_dict`` on anything the user owns).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

import torch
from torch import fx
from torch.export.graph_signature import InputKind
from torch.utils import _pytree as pytree

from permerge.errors import PermergeError

__all__ = ["run_recording"]


class _Recorder(fx.Interpreter):
    def __init__(self, gm: fx.GraphModule, wanted: set[str], sink: Callable[[str, torch.Tensor], None]):
        super().__init__(gm)
        self.wanted, self.sink = wanted, sink

    def run_node(self, n: fx.Node) -> Any:
        out = super().run_node(n)
        if n.name in self.wanted and isinstance(out, torch.Tensor):
            self.sink(n.name, out)
        return out


def run_recording(
    program: torch.export.ExportedProgram,
    state_dict: Mapping[str, torch.Tensor],
    args: tuple[Any, ...],
    kwargs: Mapping[str, Any],
    wanted: set[str],
    sink: Callable[[str, torch.Tensor], None],
) -> None:
    """Evaluate ``program`` on ``(args, kwargs)`` with weights from ``state_dict``; call
    ``sink(node_name, value)`` for every node in ``wanted``. Shapes must match the export's."""
    user = pytree.tree_flatten((tuple(args), dict(kwargs)))[0]
    flat: list[Any] = []
    user_iter = iter(user)
    for spec in program.graph_signature.input_specs:
        if spec.kind in (InputKind.PARAMETER, InputKind.BUFFER) and spec.target in state_dict:
            flat.append(state_dict[spec.target])
        elif spec.kind in (InputKind.PARAMETER, InputKind.BUFFER):
            flat.append(program.state_dict.get(spec.target, program.constants.get(spec.target)))
        elif spec.kind in (InputKind.CONSTANT_TENSOR, InputKind.CUSTOM_OBJ):
            flat.append(program.constants[spec.target])
        elif spec.kind == InputKind.USER_INPUT:
            try:
                flat.append(next(user_iter))
            except StopIteration:
                raise PermergeError("batch has fewer inputs than the traced example input") from None
        else:
            raise PermergeError(f"cannot feed graph input of kind {spec.kind}")
    with torch.no_grad():
        _Recorder(program.graph_module, wanted, sink).run(*flat)
