"""The checks every pipeline path runs: inputs compatible before any work, function kept after it.

* :func:`check_compatible` is the one validator of inputs: configs field by field, keys, shapes,
  dtype kinds against the architecture, the spec's fit, finite values. Cheap checks first; it runs
  before tracing or matching.
* :func:`check_function_preserved` runs a model and its permuted (or otherwise transformed:
  :mod:`permerge.transform`) weights on the example input in eval mode, in train mode (seeded, dropout off: see below) and at a second batch size, and raises
  naming the groups that change the output. The model is never modified: weights go in through
  ``functional_call``, buffers as copies (BatchNorm's running statistics and ``num_batches_tracked``
  update the copies), training flags and the RNG state are restored.
* :func:`check_same_function` compares two models end to end (a reparametrised and transformed
  model against the original), on the same runs.
* :class:`StreamedCheck` does the same for checkpoints that are never in memory: it runs the traced
  program once with B's tensors and once with them permuted, reading each at its first use and
  dropping it after its last.
* :func:`validate_spec` checks a hand-written spec harder than a matcher's output needs: on a copy
  with constant tensors (fresh norm affines, running statistics) randomised, under several
  non-identity permutations of every group.

Outputs are compared leaf by leaf: floating outputs to a tolerance relative to the largest output
magnitude (float32 reorders sums), integer and boolean outputs (argmax ids, masks) exactly.

Why dropout is switched off in train mode: a dropout mask is drawn per *position*, so after a
permutation unit ``i`` gets the mask unit ``π(i)`` had, and the two runs differ although the
function, as a distribution, is the same. Running with dropout probabilities at zero keeps every
other train-mode difference (BatchNorm batch statistics, training-only branches); per-sample
randomness (stochastic depth) is kept and matched by seeding both runs alike.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from torch.func import functional_call
from torch.overrides import TorchFunctionMode
from torch.utils import _pytree as pytree

from permerge.apply import apply_transform, permute_tensor
from permerge.errors import (
    ConfigMismatchError,
    FunctionNotPreservedError,
    PermergeError,
    StateDictMismatchError,
)
from permerge.graph.capture import Program, as_args
from permerge.graph.run import run_program
from permerge.io.read import TensorSource
from permerge.permutation import is_identity, random_permutation
from permerge.spec import PermutationSpec

__all__ = [
    "PreservationReport",
    "StreamedCheck",
    "all_finite",
    "check_compatible",
    "check_function_preserved",
    "check_permutations",
    "check_same_function",
    "model_outputs",
    "output_error",
    "random_moving_permutation",
    "tied_aliases",
    "validate_spec",
]

Tensors = TensorSource | Mapping[str, torch.Tensor] | nn.Module


# -- inputs ---------------------------------------------------------------------------------------


def _meta(x: Tensors) -> dict[str, tuple[torch.Size, torch.dtype]]:
    if isinstance(x, nn.Module):
        x = x.state_dict()
    if isinstance(x, TensorSource):
        return {k: (x.shape(k), x.dtype(k)) for k in x.keys()}  # noqa: SIM118 (not iterable)
    return {k: (v.shape, v.dtype) for k, v in x.items()}


def _kind(dtype: torch.dtype) -> str:
    return "bool" if dtype == torch.bool else "floating" if dtype.is_floating_point else "complex" if dtype.is_complex else "integer"


def all_finite(t: torch.Tensor) -> bool:
    """Whether every element of ``t`` is finite; a sum first (15× faster than ``isfinite`` on a CPU:
    NaN or inf anywhere makes it non-finite), the elementwise test only when the sum overflowed."""
    if not (t.is_floating_point() or t.is_complex()) or bool(torch.isfinite(t.sum())):
        return True
    return bool(torch.isfinite(t).all())


def tied_aliases(x: nn.Module | Mapping[str, torch.Tensor]) -> dict[str, str]:
    """``alias → first key`` for state-dict entries that are one tensor under several names.

    Detected by storage (same storage, offset, shape and strides), not by object identity:
    ``state_dict()`` returns a new tensor object per name even for tied parameters. A module is
    asked for its own tensors (``keep_vars``), which also covers meta tensors (no storage).
    """
    if isinstance(x, nn.Module):
        seen_ids: dict[int, str] = {}
        out = {}
        for k, v in x.state_dict(keep_vars=True).items():
            if id(v) in seen_ids:
                out[k] = seen_ids[id(v)]
            else:
                seen_ids[id(v)] = k
        return out
    seen: dict[tuple[Any, ...], str] = {}
    out = {}
    for k, v in x.items():
        if v.is_meta:
            continue
        ident = (v.untyped_storage().data_ptr(), v.storage_offset(), tuple(v.shape), v.stride(), v.dtype, v.device)
        if ident in seen:
            out[k] = seen[ident]
        else:
            seen[ident] = k
    return out


def check_compatible(
    models: Sequence[Tensors],
    names: Sequence[str],
    *,
    architecture: Tensors | None = None,
    optional: Iterable[str] = (),
    configs: Sequence[Mapping[str, Any]] | None = None,
    spec: PermutationSpec | None = None,
    finite: bool = True,
) -> None:
    """Raise, in one line naming the first problem and the fix, unless ``models`` can be aligned or merged.

    Checks, cheapest first: ``configs`` (architecture-defining fields, e.g.
    :func:`permerge.hf.architecture_fields`) equal field by field; one class (modules); equal key
    sets; equal shapes;
    each model's keys, shapes and dtype kinds fit ``architecture`` (a module or its state dict:
    keys in ``optional`` — tied aliases — may be missing; floating stays floating, integer
    integer); ``spec`` fits the shapes; floating tensors finite (in-memory ones only: lazy sources
    are checked as their tensors are read). Nothing is read from lazy sources but headers.

    Raises:
        ConfigMismatchError: a config field differs (names it and both values).
        StateDictMismatchError: keys, shapes, dtypes or values that do not fit.
        SpecError: the spec does not fit the tensors.
    """
    if configs is not None:
        ref_cfg = configs[0]
        for name, cfg in zip(names[1:], configs[1:]):
            diff = sorted(k for k in set(ref_cfg) | set(cfg) if ref_cfg.get(k, "<unset>") != cfg.get(k, "<unset>"))
            if diff:
                k = diff[0]
                raise ConfigMismatchError(
                    f"{names[0]} and {name} have different architectures: config.json field {k!r} is "
                    f"{ref_cfg.get(k, '<unset>')!r} vs {cfg.get(k, '<unset>')!r}"
                    + (f" (and {len(diff) - 1} more: {', '.join(diff[1:6])})" if len(diff) > 1 else "")
                    + "; equal tensor shapes do not make equal models: align checkpoints of one config"
                )
    for name, m in zip(names[1:], models[1:]):
        if isinstance(models[0], nn.Module) and isinstance(m, nn.Module) and type(m) is not type(models[0]):
            raise StateDictMismatchError(
                f"{names[0]} and {name} have different classes: {type(models[0]).__name__} vs {type(m).__name__}"
            )
    metas = [_meta(m) for m in models]
    ref = metas[0]
    for name, meta in zip(names[1:], metas[1:]):
        only_a, only_b = sorted(set(ref) - set(meta)), sorted(set(meta) - set(ref))
        if only_a or only_b:
            raise StateDictMismatchError(
                f"{names[0]} and {name} have different keys: only in {names[0]} {only_a[:10]}, "
                f"only in {name} {only_b[:10]}; they must share one architecture"
            )
        shapes = sorted(f"{k}: {tuple(ref[k][0])} vs {tuple(meta[k][0])}" for k in ref if tuple(ref[k][0]) != tuple(meta[k][0]))
        if shapes:
            raise StateDictMismatchError(
                f"{names[0]} and {name} have different shapes: {shapes[:10]}; they must share one architecture and size"
            )
    if architecture is not None:
        expected, may_miss = _meta(architecture), set(optional) | set(tied_aliases(architecture))
        for name, meta in zip(names, metas):
            missing = sorted(set(expected) - set(meta) - may_miss)
            extra = sorted(set(meta) - set(expected))
            if missing or extra:
                raise StateDictMismatchError(
                    f"{name} does not fit the model: missing keys {missing[:10]}, unexpected keys {extra[:10]}"
                )
            wrong = sorted(k for k in meta if tuple(meta[k][0]) != tuple(expected[k][0]))
            if wrong:
                k = wrong[0]
                raise StateDictMismatchError(
                    f"{name} has {len(wrong)} tensors of the wrong shape, e.g. {k!r}: "
                    f"{tuple(meta[k][0])}, the model expects {tuple(expected[k][0])}"
                )
            kinds = sorted(k for k in meta if _kind(meta[k][1]) != _kind(expected[k][1]))
            if kinds:
                k = kinds[0]
                raise StateDictMismatchError(
                    f"{name} stores {k!r} as {meta[k][1]} where the model has {expected[k][1]} "
                    f"({len(kinds)} such tensors); permerge keeps checkpoint dtypes and the model cannot "
                    "compute with these: convert (e.g. dequantize) the checkpoint first"
                )
    if spec is not None:
        spec.validate({k: s for k, (s, _) in ref.items()})
    if finite:
        for name, m in zip(names, models):
            if isinstance(m, TensorSource):
                continue
            sd = m.state_dict() if isinstance(m, nn.Module) else m
            bad = sorted(k for k, v in sd.items() if not all_finite(v))
            if bad:
                where = ", ".join(f"{name}[{k!r}]" for k in bad[:10])
                raise StateDictMismatchError(f"non-finite (NaN or inf) weights in {where}; fix or drop that checkpoint")


# -- outputs --------------------------------------------------------------------------------------


@dataclass(frozen=True)
class PreservationReport:
    """How far the permuted model's outputs were from the original's, over every run made."""

    max_abs_error: float
    relative_error: float  # max |Δ| / max |output| over floating outputs; inf if exact outputs differ
    tol: float
    runs: tuple[str, ...] = ()  # e.g. "eval, batch 2", "train (dropout off), batch 2", "eval, batch 3"
    skipped: tuple[str, ...] = ()  # runs the model does not allow, with the reason


def _leaves(out: Any) -> list[torch.Tensor]:
    if hasattr(out, "to_tuple"):
        out = out.to_tuple()
    return [t for t in pytree.tree_leaves(out) if isinstance(t, torch.Tensor)]


def output_error(a: Sequence[torch.Tensor], b: Sequence[torch.Tensor]) -> tuple[float, float]:
    """(max absolute difference, that difference relative to the largest output magnitude).

    Floating leaves are compared to float precision; integer and boolean leaves must be equal
    (any difference, like a different structure or shape, or a non-finite output of ``b`` where
    ``a`` is finite, is ``(inf, inf)``).
    """
    if len(a) != len(b) or any(x.shape != y.shape or x.dtype != y.dtype for x, y in zip(a, b)):
        return math.inf, math.inf
    err = scale = 0.0
    for x, y in zip(a, b):
        if not x.numel():
            continue
        if not x.is_floating_point() and not x.is_complex():
            if not torch.equal(x, y):
                return math.inf, math.inf
            continue
        x, y = x.detach().double(), y.detach().double()
        if not (all_finite(x) and all_finite(y)):  # rare: compare where finite, and where not exactly
            if not torch.equal(torch.isfinite(x), torch.isfinite(y)):
                return math.inf, math.inf
            ok = torch.isfinite(x)
            x, y = x[ok], y[ok]
        if x.numel():
            err = max(err, float((x - y).abs().max()))
            scale = max(scale, float(x.abs().max()))
    return err, err / max(scale, 1e-12)


_DROPOUTS = frozenset({
    F.dropout, F.dropout1d, F.dropout2d, F.dropout3d, F.alpha_dropout, F.feature_alpha_dropout,
    torch.dropout, torch.alpha_dropout, torch.feature_dropout, torch.feature_alpha_dropout,
})  # fmt: skip


class _DropoutOff(TorchFunctionMode):
    """Dropout (module or functional, and SDPA's ``dropout_p``) as the identity; RReLU at its eval slope."""

    def __torch_function__(self, func: Any, types: Any, args: tuple[Any, ...] = (), kwargs: dict | None = None) -> Any:
        kwargs = dict(kwargs or {})
        if func in _DROPOUTS:
            return args[0] if args else kwargs["input"]
        if func is F.scaled_dot_product_attention:
            args, kwargs = args[:4], {**kwargs, "dropout_p": 0.0}
        elif func is F.rrelu:
            args, kwargs = args[:3], {**kwargs, "training": False}
        return func(*args, **kwargs)


@dataclass(frozen=True)
class _Run:
    label: str
    args: tuple[Any, ...]
    kwargs: Mapping[str, Any]
    train: bool


def _grow_batch(args: tuple[Any, ...], kwargs: Mapping[str, Any]) -> tuple[tuple[Any, ...], dict[str, Any]] | None:
    """The inputs with one more sample (the first repeated), if every tensor leaf shares a batch size."""
    leaves = [t for t in pytree.tree_leaves((args, dict(kwargs))) if isinstance(t, torch.Tensor)]
    sizes = {t.shape[0] if t.dim() else None for t in leaves}
    if len(sizes) != 1 or None in sizes:
        return None
    grown = pytree.tree_map(lambda t: torch.cat([t, t[:1]]) if isinstance(t, torch.Tensor) else t, (args, dict(kwargs)))
    return grown[0], grown[1]


def _runs(args: tuple[Any, ...], kwargs: Mapping[str, Any]) -> list[_Run]:
    leaves = [t for t in pytree.tree_leaves((args, dict(kwargs))) if isinstance(t, torch.Tensor) and t.dim()]
    b = leaves[0].shape[0] if leaves else None
    runs = [_Run(f"eval, batch {b}", args, kwargs, False), _Run(f"train (dropout off), batch {b}", args, kwargs, True)]
    grown = _grow_batch(args, kwargs)
    if grown is not None:
        runs.append(_Run(f"eval, batch {b + 1}", grown[0], grown[1], False))
    return runs


def _f32(x: Any) -> Any:
    """Half-precision floats as float32: the check compares permutations, not rounding."""
    return x.float() if isinstance(x, torch.Tensor) and x.dtype in (torch.float16, torch.bfloat16) else x


def _forward(model: nn.Module, state: Mapping[str, torch.Tensor], run: _Run, seed: int) -> list[torch.Tensor]:
    """``model`` with ``state`` on ``run``'s inputs; buffers are copied so in-place updates (BatchNorm
    in train mode) never reach the model, and its training flags and the RNG are restored."""
    buffers = {k for k, _ in model.named_buffers(remove_duplicate=False)}
    aliases = tied_aliases(model)  # functional_call ties them again from their canonical key
    state = {k: v.clone() if k in buffers and _f32(v) is v else _f32(v) for k, v in state.items() if k not in aliases}
    args, kwargs = pytree.tree_map(_f32, (run.args, dict(run.kwargs)))
    flags = [(m, m.training) for m in model.modules()]
    devices = sorted({v.device.index or 0 for v in state.values() if v.device.type == "cuda"})
    try:
        model.train(run.train)
        with torch.random.fork_rng(devices=devices), torch.no_grad():
            torch.manual_seed(seed)
            if run.train:
                with _DropoutOff():
                    out = functional_call(model, state, args, kwargs)
            else:
                out = functional_call(model, state, args, kwargs)
        return [t.detach() for t in _leaves(out)]
    finally:
        for m, t in flags:
            m.training = t


def model_outputs(model: nn.Module, example_inputs: Any, example_kwargs: Mapping[str, Any] | None = None, *,
                  train: bool = False, seed: int = 0) -> list[torch.Tensor]:  # fmt: skip
    """``model``'s output leaves on the inputs, as the check computes them: eval mode (or train mode
    with dropout off), seeded, no gradients, the model, its flags and the RNG left as they were."""
    run = _Run("eval", as_args(example_inputs), dict(example_kwargs or {}), train)
    return _forward(model, model.state_dict(), run, seed)


def _tf32_off() -> tuple[bool, bool]:
    prev = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False
    return prev


def _check_state(
    model: nn.Module,
    state: Mapping[str, torch.Tensor],
    spec: PermutationSpec,
    perm: Mapping[str, torch.Tensor],
    args: tuple[Any, ...],
    kwargs: Mapping[str, Any],
    tol: float,
    seed: int,
) -> PreservationReport:
    aliases = tied_aliases(model)
    state = {k: v for k, v in state.items() if k not in aliases}  # permuted through their canonical key
    spec = spec.restricted_to(state)
    prev = _tf32_off()
    try:
        refs: list[tuple[_Run, list[torch.Tensor]]] = []
        skipped: list[str] = []
        for i, run in enumerate(_runs(args, kwargs)):
            try:
                refs.append((run, _forward(model, state, run, seed)))
            except Exception as e:
                if i == 0:
                    raise  # the example input itself must run
                skipped.append(f"{run.label}: {type(e).__name__}: {str(e).strip().splitlines()[0] if str(e).strip() else ''}"[:200])

        def worst(p: Mapping[str, torch.Tensor]) -> tuple[float, float, str]:
            permuted = apply_transform(spec, {k: v for k, v in p.items() if k in spec}, state)
            errs = [(*output_error(out, _forward(model, permuted, run, seed)), run.label) for run, out in refs]
            return max(errs, key=lambda e: (e[1], e[0]))

        err, rel, label = worst(perm)
        report = PreservationReport(err, rel, tol, tuple(r.label for r, _ in refs), tuple(skipped))
        if rel <= tol:
            return report
        bad = []
        for name in (n for n in perm if n in spec):
            _, r, _ = worst({name: perm[name]})
            if r > tol:
                bad.append((name, r))
        raise FunctionNotPreservedError(
            f"permutation changed the model output ({label}: relative error {rel:.2e} > tol {tol:.0e}). "
            + ("; ".join(f"group {n!r} (size {spec[n].size}) changed it by {r:.2e}" for n, r in bad) if bad
               else "no single group is to blame: groups interact")
            + (f". Pass freeze={[n for n, _ in bad]} to leave them unpermuted." if bad else ".")
        )  # fmt: skip
    finally:
        torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = prev


def check_function_preserved(
    model: nn.Module,
    spec: PermutationSpec,
    example_inputs: Any,
    perm: Mapping[str, Any] | None = None,
    *,
    example_kwargs: Mapping[str, Any] | None = None,
    tol: float = 1e-4,
    seed: int = 0,
) -> PreservationReport:
    """Run ``model`` with its weights and with them permuted by ``perm``; raise if outputs differ.

    ``perm`` may be any transform (:mod:`permerge.transform`: scaled permutations, dense maps),
    applied by :func:`~permerge.apply.apply_transform`.

    Three runs, each seeded alike: eval mode on the example input, train mode with dropout off (see
    the module docstring), and eval mode at one more sample than the example's batch (skipped, and
    listed in the report, when the model does not accept it; so is train mode, e.g. BatchNorm at
    batch 1). ``perm`` defaults to a random permutation of every group. Floating outputs must agree
    to ``tol`` relative to the largest output magnitude, integer and boolean outputs exactly.
    Half-precision models are checked in float32. The model is never modified; TF32 is off for the
    duration (with it on, permuted GPU models differ by ~1e-2).

    Raises:
        FunctionNotPreservedError: naming each group whose permutation alone changes the output.
    """
    perm = dict(perm) if perm is not None else random_permutation(spec, seed)
    return _check_state(model, model.state_dict(), spec, perm, as_args(example_inputs), dict(example_kwargs or {}), tol, seed)


def check_permutations(
    models: Sequence[nn.Module],
    spec: PermutationSpec,
    permutations: Sequence[Mapping[str, Any]],
    example_inputs: Any,
    *,
    example_kwargs: Mapping[str, Any] | None = None,
    tol: float = 1e-4,
    seed: int = 0,
) -> list[PreservationReport | None]:
    """:func:`check_function_preserved` for each model and its permutation (into a merged basis, say):
    a merge changes the function on purpose, the permutations must not. ``None``: nothing moved.

    Raises:
        FunctionNotPreservedError: prefixed with the model's index.
    """
    reports: list[PreservationReport | None] = []
    for i, (model, perm) in enumerate(zip(models, permutations)):
        if is_identity(perm):
            reports.append(None)
            continue
        try:
            reports.append(check_function_preserved(model, spec, example_inputs, perm, example_kwargs=example_kwargs,
                                                    tol=tol, seed=seed))  # fmt: skip
        except PermergeError as e:
            raise type(e)(f"model {i}: {e}") from e
    return reports


def check_same_function(
    reference: nn.Module,
    candidate: nn.Module,
    example_inputs: Any,
    *,
    example_kwargs: Mapping[str, Any] | None = None,
    tol: float = 1e-4,
    seed: int = 0,
) -> PreservationReport:
    """Raise :class:`FunctionNotPreservedError` unless ``candidate`` computes ``reference``'s outputs on
    the runs :func:`check_function_preserved` makes (eval, train with dropout off, a second batch
    size): the end-to-end check of a reparametrised and transformed model, whose reparametrisation
    a per-group check of the transform cannot see."""
    args, kwargs = as_args(example_inputs), dict(example_kwargs or {})
    prev = _tf32_off()
    try:
        worst, runs, skipped = (0.0, 0.0, ""), [], []
        for i, run in enumerate(_runs(args, kwargs)):
            try:
                ref = _forward(reference, reference.state_dict(), run, seed)
            except Exception as e:
                if i == 0:
                    raise
                skipped.append(f"{run.label}: {type(e).__name__}")
                continue
            err, rel = output_error(ref, _forward(candidate, candidate.state_dict(), run, seed))
            runs.append(run.label)
            worst = max(worst, (rel, err, run.label))
    finally:
        torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = prev
    rel, err, label = worst
    if rel > tol:
        raise FunctionNotPreservedError(f"the transformed model's outputs differ ({label}: relative error {rel:.2e} > tol {tol:.0e})")
    return PreservationReport(err, rel, tol, tuple(runs), tuple(skipped))


def random_moving_permutation(spec: PermutationSpec, seed: int = 0) -> dict[str, torch.Tensor]:
    """A random permutation that moves every group of size ≥ 2 (a uniform draw of a size-2 group is
    the identity half the time, and an identity permutation proves nothing)."""
    gen = torch.Generator().manual_seed(seed)
    out = {}
    for g in spec.groups:
        p = torch.randperm(g.size, generator=gen)
        while g.size > 1 and torch.equal(p, torch.arange(g.size)):
            p = torch.randperm(g.size, generator=gen)
        out[g.name] = p
    return out


def _randomised(state: Mapping[str, torch.Tensor], seed: int) -> dict[str, torch.Tensor]:
    """``state`` with every constant floating tensor of more than one element (fresh norm weights and
    biases, running means and variances) replaced by random values of the same sign."""
    gen = torch.Generator().manual_seed(seed)
    out = {}
    for k, v in state.items():
        if v.is_floating_point() and v.numel() > 1 and bool((v == v.flatten()[0]).all()):
            c = float(v.flatten()[0])
            noise = torch.rand(v.shape, generator=gen, dtype=torch.float32)
            v = (c * (0.5 + noise) if c else noise - 0.5).to(v)
        out[k] = v
    return out


def validate_spec(
    spec: PermutationSpec,
    model: nn.Module,
    example_inputs: Any,
    *,
    example_kwargs: Mapping[str, Any] | None = None,
    tol: float = 1e-4,
    seed: int = 0,
    trials: int = 3,
) -> PreservationReport:
    """Check a user-supplied (hand-written, JSON or ``axes_to_perm``) spec against ``model``.

    Shapes first (:class:`SpecError` naming each mismatch), then function preservation (as
    :func:`check_function_preserved`) under ``trials`` permutations that move every group, on a copy
    of the weights whose constant tensors are randomised: a freshly initialised norm (weight 1, bias
    0) or running statistic hides a wrong tie, and so does a permutation that happens to be the
    identity. Returns the worst report.

    Raises:
        SpecError, FunctionNotPreservedError: naming the offending tensors or groups.
    """
    spec.validate(model.state_dict())
    args, kwargs = as_args(example_inputs), dict(example_kwargs or {})
    state = _randomised(model.state_dict(), seed)
    reports = [
        _check_state(model, state, spec, random_moving_permutation(spec, seed + t), args, kwargs, tol, seed)
        for t in range(trials)
    ]
    return max(reports, key=lambda r: r.relative_error)


# -- checkpoints never held in memory --------------------------------------------------------------


class _SourceWeights(Mapping[str, torch.Tensor]):
    """``module key → B's tensor`` (float32, permuted by ``perm`` when given), read on access."""

    def __init__(
        self, source: TensorSource, key_map: Mapping[str, str], spec: PermutationSpec,
        perm: Mapping[str, torch.Tensor] | None,
    ) -> None:  # fmt: skip
        self.source, self.key_map, self.spec, self.perm = source, key_map, spec, perm

    def __getitem__(self, key: str) -> torch.Tensor:
        ck = self.key_map[key]
        t = self.source.get(ck)
        if self.perm is None and not all_finite(t):  # the unpermuted run reads every tensor once
            raise StateDictMismatchError(f"non-finite (NaN or inf) weights in {self.source.name}[{ck!r}]; fix or drop that checkpoint")
        if self.perm is not None and self.spec.axes_of(ck):
            t = permute_tensor(t, self.spec.axes_of(ck), self.perm)  # before the upcast: half the bytes to move
        return t.float() if t.is_floating_point() else t

    def __iter__(self) -> Iterator[str]:
        return iter(self.key_map)

    def __len__(self) -> int:
        return len(self.key_map)

    def __contains__(self, key: object) -> bool:
        return key in self.key_map


class StreamedCheck:
    """Function check of B permuted, for checkpoints never held in memory whole.

    Runs ``program`` (:func:`permerge.graph.run.run_program`; for a program traced on the meta
    device see :meth:`permerge.graph.capture.Program.on`) on ``inputs`` twice, with ``source``'s tensors (``key_map``:
    module key → checkpoint key) and with them permuted tensor by tensor; each tensor is read (and
    checked finite) at its use and dropped after, so peak memory is a few tensors and the activations
    of a tiny input. :meth:`reference` (the plain run) can go before matching, so a checkpoint the program
    cannot run fails before the expensive work. Eval mode, one batch size: the program is exported
    with static shapes in eval mode (see docs/design.md).

    Example:
        >>> check = StreamedCheck(traced.program.on("cpu", buffers), spec, src_b, key_map, inputs)  # doctest: +SKIP
        >>> check.reference(); check.verify(perm).relative_error  # doctest: +SKIP
    """

    def __init__(
        self,
        program: Program,
        spec: PermutationSpec,
        source: TensorSource,
        key_map: Mapping[str, str],
        inputs: tuple[tuple[Any, ...], Mapping[str, Any]],
        *,
        tol: float = 1e-4,
        name: str | None = None,
    ) -> None:
        self.program, self.spec, self.source, self.key_map = program, spec, source, key_map
        self.name = name or source.name
        self.args, self.kwargs = inputs
        self.tol = tol
        self._ref: list[torch.Tensor] | None = None

    def _outputs(self, perm: Mapping[str, torch.Tensor] | None) -> list[torch.Tensor]:
        weights = _SourceWeights(self.source, self.key_map, self.spec, perm)
        return [t for t in run_program(self.program, weights, self.args, self.kwargs) if isinstance(t, torch.Tensor)]

    def reference(self) -> None:
        """Run the program with B's own tensors (once)."""
        if self._ref is None:
            self._ref = self._outputs(None)

    def verify(self, perm: Mapping[str, torch.Tensor]) -> PreservationReport:
        """Run with B's tensors permuted by ``perm``; raise :class:`FunctionNotPreservedError` if the
        outputs moved by more than ``tol`` (relative), else return the report."""
        self.reference()
        assert self._ref is not None
        err, rel = output_error(self._ref, self._outputs(perm))
        b = next((t.shape[0] for t in pytree.tree_leaves(self.args) if isinstance(t, torch.Tensor) and t.dim()), None)
        report = PreservationReport(err, rel, self.tol, (f"eval, batch {b} (streamed)",))
        if not rel <= self.tol:
            raise FunctionNotPreservedError(
                f"the permutation changed the outputs of {self.name} (relative error {rel:.2e} > tol "
                f"{self.tol:.0e}, streamed check): the spec does not fit this checkpoint; nothing was written"
            )
        return report
