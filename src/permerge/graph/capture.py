"""Graph capture: the only module that calls ``torch.export``.

We use ``torch.export.export(..., strict=False)`` rather than ``torch.fx.symbolic_trace``: fx
fails on every Hugging Face model tried (Python control flow on proxies), while non-strict export
runs the real Python code and records an ATen graph with ~30 op types, in which parameters and
buffers appear as placeholders named by their state-dict keys (tied weights appear once).

Where the graph holds composite ops that no rule covers but that ATen decomposes into core ops
(``pixel_shuffle`` into view/permute, ``glu`` into slices and a product), or autocast/grad-mode
regions (higher-order ops wrapping a subgraph), the program is decomposed once, with a table
restricted to those ops: every op that has a rule (norms, linear, conv, attention, …) stays
intact, the regions are inlined, and graphs without either pay nothing.
"""

from __future__ import annotations

import copy
import dataclasses
import logging
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import torch
from torch import fx, nn
from torch.export.graph_signature import InputKind, OutputKind
from torch.utils import _pytree as pytree

from permerge.batches import call_kwargs
from permerge.errors import TraceError
from permerge.graph.rules import RULES, rule_for
from permerge.graph.spaces import Why
from permerge.spec import FrozenKind

LOG = logging.getLogger(__name__)

__all__ = ["STATE", "CONSTANT", "USER", "Captured", "Program", "capture", "as_args"]

STATE, CONSTANT, USER = "state", "constant", "user"


@dataclass(frozen=True)
class Program:
    """An exported ATen graph and how to feed it — without the model's weights.

    ``inputs[i]`` says what placeholder ``i`` takes: ``(STATE, key)`` a state-dict tensor (bound by
    :mod:`permerge.graph.run` from any mapping, so the same graph runs with A's, B's or a merged
    model's weights, or with tensors read lazily from a checkpoint), ``(CONSTANT, name)`` one of
    ``constants`` (non-persistent buffers, lifted constants), ``(USER, None)`` the next flattened
    user input. ``user_outputs`` are the positions of the graph's outputs the forward returns
    (the rest are buffer mutations of a train-mode export). Holding no weights, a cached program
    keeps no model alive.
    """

    module: fx.GraphModule
    inputs: tuple[tuple[str, str | None], ...]
    constants: Mapping[str, torch.Tensor]
    user_outputs: tuple[int, ...]
    example: tuple[tuple[Any, ...], Mapping[str, Any]]  # the (args, kwargs) it was exported with
    defaults: Mapping[str, Any]  # keyword arguments added to every call (use_cache=False for HF models)

    @property
    def graph(self) -> fx.Graph:
        return self.module.graph

    def on(self, device: torch.device | str, constants: Mapping[str, torch.Tensor] | None = None) -> Program:
        """A copy runnable on ``device``: device arguments baked into the graph (``arange(...,
        device="meta")`` of a model traced on the meta device) moved there, and ``constants`` (e.g.
        non-persistent buffers recomputed for real) in place of the program's. Cached programs are
        never changed."""
        target = torch.device(device)
        module = copy.deepcopy(self.module)
        for node in module.graph.nodes:
            node.args, node.kwargs = pytree.tree_map(
                lambda x: target if isinstance(x, torch.device) and x != target else x, (node.args, node.kwargs)
            )
        merged = {**self.constants, **(constants or {})}
        meta = sorted(k for k, v in merged.items() if v.is_meta)
        if meta:
            raise TraceError(f"the traced program has no values for constants {meta[:5]}: pass them to Program.on")
        return dataclasses.replace(self, module=module, constants=merged)


@dataclass(frozen=True)
class Captured:
    """An exported program plus what each placeholder is, for channel propagation."""

    program: Program
    params: Mapping[str, str]  # placeholder name → state-dict key (parameters, persistent buffers)
    # placeholder → why it cannot move: one reason, or one per axis (None: an axis along which
    # the tensor holds one value, which no permutation changes)
    frozen_inputs: Mapping[str, Why | list[Why | None]]
    aliases: Mapping[str, tuple[str, ...]]  # state-dict key → every key sharing its tensor
    state_keys: tuple[str, ...]  # state-dict order, for deterministic naming

    @property
    def graph(self) -> fx.Graph:
        return self.program.graph


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


def _with_training_flags_restored(model: nn.Module, fn: Any, train: bool) -> Any:
    flags = [(m, m.training) for m in model.modules()]
    try:
        model.train(train)
        return fn()
    finally:
        for m, t in flags:
            m.training = t


def _uniform_axes(value: Any) -> list[bool]:
    """Per axis of a tensor outside the state dict: does it hold one value along that axis?

    Such an axis (EVA's zero ``k_bias``, a blur filter repeated per channel) is unchanged by any
    permutation, so it constrains nothing. Values on the meta device are unknown: not uniform.
    """
    if not isinstance(value, torch.Tensor):
        return []
    if value.is_meta or value.numel() == 0:
        return [False] * value.dim()
    return [torch.equal(value, value.narrow(k, 0, 1).expand_as(value)) for k in range(value.dim())]


def _reads_floats(node: fx.Node) -> bool:
    vals = [a.meta.get("val") for a in node.all_input_nodes]
    return any(isinstance(v, torch.Tensor) and v.is_floating_point() for v in vals)


def _decomposed(ep: torch.export.ExportedProgram) -> torch.export.ExportedProgram:
    """``ep`` with its rule-less, non-core ops decomposed and wrapped regions inlined (or ``ep``)."""
    from torch._decomp import decomposition_table

    table = {
        n.target: decomposition_table[n.target]
        for n in ep.graph.nodes
        if n.op == "call_function"
        and n.target in decomposition_table
        and torch.Tag.core not in n.target.tags
        and rule_for(n.target, RULES) is None
        and _reads_floats(n)  # channels live in floating-point values, not in masks or indices
    }
    wrapped = any(isinstance(n.target, torch._ops.HigherOrderOperator) for n in ep.graph.nodes)
    if not table and not wrapped:  # autocast / grad-mode regions are inlined by the pass too
        return ep
    try:
        return ep.run_decompositions(table)
    except Exception as e:  # the undecomposed graph is still correct: its rule-less ops freeze
        LOG.info("could not decompose %s: %s: %s", sorted(map(str, table)), type(e).__name__, _first_line(e))
        return ep


def capture(
    model: nn.Module, example_inputs: Any, example_kwargs: Mapping[str, Any] | None = None, *, train: bool = False
) -> Captured:
    """Export ``model`` in eval mode, or train mode with ``train`` (flags restored afterwards;
    weights and buffers never touched). Hugging Face models get ``use_cache=False`` unless the
    example says otherwise (their cache object cannot be traced)."""
    if not isinstance(model, nn.Module):
        raise TraceError(f"expected an nn.Module, got {type(model).__name__}")
    defaults = {k: v for k, v in call_kwargs(model).items() if k not in (example_kwargs or {})}
    args, kwargs = as_args(example_inputs), {**defaults, **(example_kwargs or {})}

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

    ep = _decomposed(_with_training_flags_restored(model, run, train))
    params: dict[str, str] = {}
    frozen: dict[str, Why | list[Why | None]] = {}
    inputs: list[tuple[str, str | None]] = []
    placeholders = [n for n in ep.graph.nodes if n.op == "placeholder"]
    specs = ep.graph_signature.input_specs
    if len(placeholders) != len(specs):
        raise TraceError(f"the exported graph of {type(model).__name__} has inputs its signature does not describe")
    for node, spec in zip(placeholders, specs):
        name = node.name
        if spec.kind == InputKind.PARAMETER or (spec.kind == InputKind.BUFFER and spec.persistent):
            params[name] = spec.target
            inputs.append((STATE, spec.target))
        elif spec.kind == InputKind.USER_INPUT:
            frozen[name] = Why(FrozenKind.MODEL_INPUT, f"model input {name!r}")
            inputs.append((USER, None))
        elif spec.kind in (InputKind.BUFFER, InputKind.CONSTANT_TENSOR):
            what = "non-persistent buffer" if spec.kind == InputKind.BUFFER else "constant tensor"
            why = Why(FrozenKind.UNSUPPORTED, f"fixed values along this axis: {what} {spec.target}, not in the state dict, cannot be permuted")
            axes = _uniform_axes(ep.constants.get(spec.target))
            frozen[name] = [None if u else why for u in axes] if axes else why
            inputs.append((CONSTANT, spec.target))
        else:
            raise TraceError(f"the exported graph of {type(model).__name__} takes a {spec.kind.name} input, "
                             "which permerge cannot feed")  # fmt: skip
    user_outputs = tuple(i for i, s in enumerate(ep.graph_signature.output_specs) if s.kind == OutputKind.USER_OUTPUT)
    constants = {k: v for k, v in ep.constants.items() if isinstance(v, torch.Tensor)}
    program = Program(ep.graph_module, tuple(inputs), constants, user_outputs, (args, kwargs), defaults)
    LOG.debug("exported %s: %d nodes", type(model).__name__, len(ep.graph.nodes))
    return Captured(program, params, frozen, _aliases(model), tuple(model.state_dict().keys()))
