"""Graph capture: the only module that calls ``torch.export``.

We use ``torch.export.export(..., strict=False)`` rather than ``torch.fx.symbolic_trace``: fx
fails on every Hugging Face model tried (Python control flow on proxies), while non-strict export
runs the real Python code and records an ATen graph with ~30 op types, in which parameters and
buffers appear as placeholders named by their state-dict keys (tied weights appear once).
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import torch
from torch import fx, nn
from torch.export.graph_signature import InputKind

from permerge.errors import TraceError
from permerge.graph.spaces import Why
from permerge.spec import FrozenKind

LOG = logging.getLogger(__name__)

__all__ = ["Captured", "capture", "as_args"]


@dataclass(frozen=True)
class Captured:
    """An exported graph plus what each placeholder is."""

    graph: fx.Graph
    params: Mapping[str, str]  # placeholder name → state-dict key (parameters, persistent buffers)
    frozen_inputs: Mapping[str, Why]  # placeholder name → why it cannot move (constants, inputs)
    aliases: Mapping[str, tuple[str, ...]]  # state-dict key → every key sharing its tensor
    state_keys: tuple[str, ...]  # state-dict order, for deterministic naming
    program: torch.export.ExportedProgram  # kept to record activations (graph/record.py)


def as_args(example_inputs: Any) -> tuple[Any, ...]:
    return example_inputs if isinstance(example_inputs, tuple) else (example_inputs,)


def _aliases(model: nn.Module) -> dict[str, tuple[str, ...]]:
    by_id: dict[int, list[str]] = {}
    for k, v in model.state_dict(keep_vars=True).items():
        by_id.setdefault(id(v), []).append(k)
    return {k: tuple(ks) for ks in by_id.values() for k in ks}


def _first_line(e: BaseException) -> str:
    text = str(e).strip()
    return text.splitlines()[0] if text else type(e).__name__


def _user_frame(e: BaseException) -> str:
    """The innermost traceback frame outside torch: usually the user's module that failed."""
    tb, where = e.__traceback__, ""
    while tb is not None:
        f = tb.tb_frame.f_code
        if "/torch/" not in f.co_filename and "/permerge/" not in f.co_filename:
            where = f" (in {f.co_name} at {f.co_filename}:{tb.tb_lineno})"
        tb = tb.tb_next
    return where


def _raise_for_input(model: nn.Module, args: tuple[Any, ...], kwargs: Mapping[str, Any]) -> None:
    """Run the eager forward; if it fails too, the example input is at fault: say so."""
    with torch.no_grad():
        try:
            model(*args, **kwargs)
        except Exception as e:
            shapes = [tuple(a.shape) if isinstance(a, torch.Tensor) else type(a).__name__ for a in args]
            raise TraceError(
                f"the model's forward failed on the example input (shapes {shapes}): "
                f"{type(e).__name__}: {_first_line(e)}. Pass an input the model accepts."
            ) from e


def _with_training_flags_restored(model: nn.Module, fn: Any) -> Any:
    flags = [(m, m.training) for m in model.modules()]
    try:
        model.eval()
        return fn()
    finally:
        for m, t in flags:
            m.training = t


def capture(
    model: nn.Module, example_inputs: Any, example_kwargs: Mapping[str, Any] | None = None
) -> Captured:
    """Export ``model`` in eval mode (flags restored afterwards; weights never touched)."""
    if not isinstance(model, nn.Module):
        raise TraceError(f"expected an nn.Module, got {type(model).__name__}")
    args, kwargs = as_args(example_inputs), dict(example_kwargs or {})

    def run() -> Any:
        try:
            return torch.export.export(model, args, kwargs, strict=False)
        except Exception as e:
            _raise_for_input(model, args, kwargs)  # a bad example input gets its own message
            raise TraceError(
                f"torch.export could not trace {type(model).__name__}: {type(e).__name__}: "
                f"{_first_line(e)}{_user_frame(e)}. Work around it by passing a hand-written spec "
                "instead of tracing (permerge.PermutationSpec.from_axes_to_perm(...), or a JSON "
                "spec via --spec), or register a rule for the op."
            ) from e

    ep = _with_training_flags_restored(model, run)
    params: dict[str, str] = {}
    frozen: dict[str, Why] = {}
    for spec in ep.graph_signature.input_specs:
        name = getattr(spec.arg, "name", None)
        if name is None:
            continue
        if spec.kind == InputKind.PARAMETER or (spec.kind == InputKind.BUFFER and spec.persistent):
            params[name] = spec.target
        elif spec.kind == InputKind.BUFFER:
            frozen[name] = Why(FrozenKind.UNSUPPORTED, f"non-persistent buffer {spec.target} (not in the state dict)")
        elif spec.kind == InputKind.USER_INPUT:
            frozen[name] = Why(FrozenKind.MODEL_INPUT, f"model input {name!r}")
        else:
            frozen[name] = Why(FrozenKind.UNSUPPORTED, f"constant {spec.target}")
    LOG.debug("exported %s: %d nodes", type(model).__name__, len(ep.graph.nodes))
    return Captured(ep.graph, params, frozen, _aliases(model), tuple(model.state_dict().keys()), ep)
