"""Merging N models: MergeMany (Git Re-Basin, Algorithm 3) and C2M3 (cycle-consistent, Frank–Wolfe).

Both bring every model into one shared basis and average there. They maximise the same objective,
the sum of all pairwise weight-matching objectives ``F = Σ_{i<j} ⟨π_i θ_i, π_j θ_j⟩``, and both
are cycle-consistent (each model has one permutation into the shared basis); they differ in the
optimiser:

* **MergeMany** visits the models in a seeded random order and weight-matches each to the mean
  of the others (not of all: the model itself would pull towards staying put), a block-coordinate
  ascent on ``F``: a move of model ``i`` raises ``F`` by ``(N-1)·`` the gain of its weight
  matching. **Stopping rule**: a round whose gain in ``F`` is at most ``tol·|F|`` ends it
  (Git Re-Basin's own stops when no model moved, which float ties and tiny gains can postpone
  indefinitely); after ``max_rounds`` it stops anyway, warns (:class:`NotConvergedWarning`) and
  reports ``converged=False`` with the last round's gain.
* **C2M3** (:mod:`permerge.match.c2m3`) relaxes every permutation to a doubly stochastic matrix
  and climbs ``F`` for all models jointly by Frank–Wolfe, then projects. With ``refine`` (default)
  MergeMany's rounds then polish the projected permutations, so the result is a local optimum of
  the hard problem too (the projection alone is not one).

Every permutation returned is checked to keep its model's function (the check ``align`` runs,
:func:`permerge.check.check_permutations`: eval and train mode, two batch sizes), before anything
is returned; the largest relative error is the result's ``function_preservation_error``. So the
models must be modules with ``example_inputs`` unless ``check=False``.

The merged model's BatchNorm statistics are the members' averaged statistics, which are wrong for
the merge; reset them (:func:`permerge.repair.reset_bn_stats`) or REPAIR the merge toward the
members' mean statistics (``repair_merge(res.aligned, res.merged, data)``).
"""

from __future__ import annotations

import copy
import logging
import math
import time
import warnings
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from permerge.apply import apply_permutation
from permerge.check import PreservationReport, check_compatible, check_permutations
from permerge.errors import PermergeError
from permerge.graph import trace
from permerge.match.c2m3 import c2m3_matching
from permerge.match.soft import universe_objective
from permerge.match.weight import weight_matching
from permerge.merge import merge, state_dict_of
from permerge.permutation import Permutation, check_permutation, compose, identity, is_identity
from permerge.pipeline import positive
from permerge.spec import PermutationSpec

LOG = logging.getLogger(__name__)

__all__ = ["MergeManyResult", "NotConvergedWarning", "c2m3_merge", "merge_many"]

Model = nn.Module | Mapping[str, torch.Tensor]


class NotConvergedWarning(UserWarning):
    """An iterative merge stopped at its round limit while the objective was still rising."""


@dataclass(frozen=True)
class MergeManyResult:
    """What an N-model merge did.

    Attributes:
        merged: the average of the aligned models (a module if modules were given).
        permutations: per input model, the permutation into the shared basis:
            ``apply_permutation(spec, permutations[i], state_dict_i)`` is ``aligned[i]``.
        aligned: the input models in the shared basis (what ``merged`` averages; copies of the
            modules if modules were given, else state dicts): ``repair_merge(aligned, merged, data)``.
        rounds: MergeMany rounds (C2M3: Frank–Wolfe iterations, plus refining rounds).
        converged: whether the stopping rule fired before the round limit.
        objectives: ``F`` after each round (C2M3: after each iteration, then each refining round).
        objective_before / objective_after: ``F`` for the models as given / as aligned.
        method: ``"many"`` or ``"c2m3"``.
        seconds: wall time.
        function_preservation_error: the largest relative output error of a model permuted into
            the shared basis (0.0 when nothing moved; None with ``check=False``).
        function_checks: per model, its check's report (None: not permuted, or not checked).
    """

    merged: Model
    permutations: tuple[Permutation, ...]
    aligned: tuple[Model, ...]
    rounds: int
    converged: bool
    objectives: tuple[float, ...]
    objective_before: float
    objective_after: float
    method: str
    seconds: float
    function_preservation_error: float | None = None
    function_checks: tuple[PreservationReport | None, ...] = ()

    def report(self) -> dict[str, Any]:
        """The numbers, for provenance."""
        return {
            "method": self.method, "rounds": self.rounds, "converged": self.converged,
            "objective_before": self.objective_before, "objective_after": self.objective_after,
            "objectives": list(self.objectives), "seconds": self.seconds,
            "function_preservation_error": self.function_preservation_error,
            "function_checks": [None if r is None else {"relative_error": r.relative_error, "runs": list(r.runs),
                                                        "skipped": list(r.skipped)} for r in self.function_checks],
        }  # fmt: skip


def merge_many(
    models: Sequence[Model],
    example_inputs: Any = None,
    *,
    spec: PermutationSpec | None = None,
    example_kwargs: Mapping[str, Any] | None = None,
    max_rounds: int = 100,
    tol: float = 1e-6,
    seed: int = 0,
    init: Sequence[Mapping[str, torch.Tensor]] | None = None,
    backend: str = "auto",
    check: bool = True,
) -> MergeManyResult:
    """MergeMany: align every model to the mean of the others until ``F`` stops rising, then average.

    Pass modules and ``example_inputs`` (the spec is traced from the first model unless ``spec``
    is given). ``init`` optionally gives starting permutations (one per model, into a shared
    basis). Warns with :class:`NotConvergedWarning` if ``max_rounds`` ran out first. Each model's
    permutation is checked to keep its function (see the module docstring); ``check=False`` skips
    that, and then state dicts with a ``spec`` are accepted too (nothing vouches for the result).

    Example:
        >>> import torch, permerge as pm
        >>> from permerge.models import MLP
        >>> models = [MLP(hidden=(16,)) for _ in range(3)]
        >>> res = pm.merge_many(models, torch.randn(2, 784))
        >>> res.converged, res.objective_after >= res.objective_before
        (True, True)
    """
    start = time.perf_counter()
    _check_options(max_rounds=max_rounds, tol=tol)
    if init is not None and len(init) != len(models):
        raise PermergeError(f"init holds {len(init)} permutations for {len(models)} models; give one per model")
    spec, sds = _prepare(models, example_inputs, spec, example_kwargs, check)
    perms = [identity(spec) for _ in sds] if init is None else [_checked(spec, p) for p in init]
    before = objective(spec, sds)
    perms, rounds, converged, history = _rounds(spec, sds, perms, max_rounds, tol, seed, backend)
    return _finish(models, spec, sds, perms, rounds, converged, history, before, "many", start,
                   example_inputs if check else None, example_kwargs)  # fmt: skip


def c2m3_merge(
    models: Sequence[Model],
    example_inputs: Any = None,
    *,
    spec: PermutationSpec | None = None,
    example_kwargs: Mapping[str, Any] | None = None,
    max_iter: int = 100,
    fw_tol: float = 1e-4,
    refine: bool = True,
    max_rounds: int = 100,
    tol: float = 1e-6,
    seed: int = 0,
    backend: str = "auto",
    check: bool = True,
    quiet: bool = False,
) -> MergeManyResult:
    """C2M3: cycle-consistent Frank–Wolfe matching of all models at once, then average.

    ``max_iter`` and ``fw_tol`` bound the Frank–Wolfe iterations (see
    :func:`~permerge.match.c2m3.c2m3_matching`); with ``refine``, MergeMany rounds (at most
    ``max_rounds``, stopping rule ``tol``) polish the projected permutations. Warns with
    :class:`NotConvergedWarning` if either stopped at its limit. Arguments (``check`` included)
    otherwise as :func:`merge_many`.
    """
    start = time.perf_counter()
    _check_options(max_rounds=max_rounds, tol=tol, max_iter=max_iter, fw_tol=fw_tol)
    spec, sds = _prepare(models, example_inputs, spec, example_kwargs, check)
    fw = c2m3_matching(spec, sds, max_iter=max_iter, tol=fw_tol, backend=backend, quiet=quiet)
    perms, rounds, converged, history = list(fw.permutations), fw.iterations, fw.converged, list(fw.objectives)
    if not converged:
        _warn(f"C2M3's Frank–Wolfe stopped after max_iter={max_iter} iterations before its duality gap fell "
              f"below fw_tol={fw_tol}; raise max_iter")  # fmt: skip
    if refine:
        perms, extra, converged, polished = _rounds(spec, sds, perms, max_rounds, tol, seed, backend)
        rounds, history = rounds + extra, history + polished
    return _finish(models, spec, sds, perms, rounds, converged, history, fw.objective_before, "c2m3", start,
                   example_inputs if check else None, example_kwargs)  # fmt: skip


def objective(spec: PermutationSpec, sds: Sequence[Mapping[str, torch.Tensor]]) -> float:
    """``F = Σ_{i<j} ⟨θ_i, θ_j⟩`` over the spec's tensors (float64 sums)."""
    return universe_objective(spec, sds, [{}] * len(sds)).item()


def _rounds(spec: PermutationSpec, sds: Sequence[Mapping[str, torch.Tensor]], perms: list[Permutation],
            max_rounds: int, tol: float, seed: int, backend: str) -> tuple[list[Permutation], int, bool, list[float]]:  # fmt: skip
    """MergeMany's block-coordinate ascent on ``F`` from ``perms``; see the module docstring."""
    n = len(sds)
    current = [apply_permutation(spec, p, sd) for p, sd in zip(perms, sds)]
    value = objective(spec, current)
    gen = torch.Generator().manual_seed(seed)
    history: list[float] = []
    rounds, converged, gain = 0, False, 0.0
    for rounds in range(1, max_rounds + 1):
        gain, moved = 0.0, 0
        for i in torch.randperm(n, generator=gen).tolist():
            others = merge([sd for j, sd in enumerate(current) if j != i])
            step = weight_matching(spec, others, current[i], seed=seed + rounds, backend=backend, quiet=True)
            if not is_identity(step.permutation):
                current[i] = apply_permutation(spec, step.permutation, current[i])
                perms[i] = compose(step.permutation, perms[i])
                gain += (n - 1) * (step.total_after - step.total_before)
                moved += 1
        value += gain
        history.append(value)
        LOG.info("MergeMany round %d: %d of %d models moved, objective %.6g (+%.3g)", rounds, moved, n, value, gain)
        # Stopping rule: a round that raises F by at most tol·|F| (or moves nothing) ends the ascent.
        if gain <= tol * abs(value):
            converged = True
            break
    if not converged:
        _warn(f"MergeMany stopped after max_rounds={max_rounds} rounds with the objective still rising "
              f"(last round +{gain:.3g}, {gain / max(abs(value), 1e-30):.2g} relative > tol={tol}); "
              "raise max_rounds or tol")  # fmt: skip
    return perms, rounds, converged, history


def _check_options(*, max_rounds: int, tol: float, max_iter: int = 0, fw_tol: float = 0.0) -> None:
    positive("max_rounds", max_rounds, integer=True)
    if isinstance(max_iter, bool) or not isinstance(max_iter, int) or max_iter < 0:
        raise PermergeError(f"max_iter must be a non-negative integer, got {max_iter!r}")
    for name, value in (("tol", tol), ("fw_tol", fw_tol)):
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0 <= value < math.inf:
            raise PermergeError(f"{name} must be a finite number >= 0, got {value!r}")


def _prepare(models: Sequence[Model], example_inputs: Any, spec: PermutationSpec | None,
             example_kwargs: Mapping[str, Any] | None, check: bool) -> tuple[PermutationSpec, list[dict[str, torch.Tensor]]]:  # fmt: skip
    """Everything checkable before matching (the function check's requirements included), and the spec."""
    if len(models) < 2:
        raise PermergeError(f"merging N models needs at least 2, got {len(models)}")
    modules = all(isinstance(m, nn.Module) for m in models)
    if check and not (modules and example_inputs is not None):
        raise PermergeError("an N-model merge checks that each model's permutation keeps its function: pass modules "
                            "and example_inputs= (or check=False, with a spec, to merge state dicts unchecked)")  # fmt: skip
    if spec is None and not (isinstance(models[0], nn.Module) and example_inputs is not None):
        raise PermergeError("an N-model merge needs a spec, or modules plus example_inputs to trace one")
    sds = [state_dict_of(m) for m in models]
    check_compatible(sds, [f"model {i}" for i in range(len(sds))])
    if spec is None:
        spec = trace(models[0], example_inputs, example_kwargs=example_kwargs)
    else:
        spec.validate(sds[0])
    return spec, sds


def _checked(spec: PermutationSpec, p: Mapping[str, torch.Tensor]) -> Permutation:
    check_permutation(spec, p)
    return {**identity(spec), **{k: v.long() for k, v in p.items()}}


def _warn(message: str) -> None:
    LOG.warning(message)
    warnings.warn(message, NotConvergedWarning, stacklevel=3)


def _module(like: nn.Module, sd: Mapping[str, torch.Tensor]) -> nn.Module:
    out = copy.deepcopy(like)
    out.load_state_dict(sd)
    return out


def _finish(models: Sequence[Model], spec: PermutationSpec, sds: list[dict[str, torch.Tensor]], perms: list[Permutation],
            rounds: int, converged: bool, history: list[float], before: float, method: str, start: float,
            example_inputs: Any, example_kwargs: Mapping[str, Any] | None) -> MergeManyResult:  # fmt: skip
    """The aligned models and their average, after checking each permutation keeps its model's function
    (``example_inputs`` None: unchecked)."""
    checks: tuple[PreservationReport | None, ...] = ()
    error = None
    if example_inputs is not None:
        checks = tuple(check_permutations(models, spec, perms, example_inputs, example_kwargs=example_kwargs))  # type: ignore[arg-type]
        error = max((r.relative_error for r in checks if r is not None), default=0.0)
    aligned_sds = [apply_permutation(spec, p, sd) for p, sd in zip(perms, sds)]
    merged: Model = merge(aligned_sds)  # type: ignore[assignment]
    aligned: tuple[Model, ...] = tuple(aligned_sds)
    if isinstance(models[0], nn.Module):
        merged, aligned = _module(models[0], merged), tuple(_module(m, sd) for m, sd in zip(models, aligned_sds))  # type: ignore[arg-type]
    after = objective(spec, aligned_sds)
    seconds = time.perf_counter() - start
    LOG.info("%s: %d models, objective %.6g -> %.6g in %d rounds (%.2f s, %s)", method, len(sds), before, after, rounds,
             seconds, "converged" if converged else "not converged")  # fmt: skip
    return MergeManyResult(merged, tuple(perms), aligned, rounds, converged, tuple(history), before, after, method, seconds,
                           error, checks)  # fmt: skip
