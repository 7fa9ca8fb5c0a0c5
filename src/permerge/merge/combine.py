"""merge_models(): the one entry point behind ``permerge merge`` — align N models, then average."""

from __future__ import annotations

import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from torch import nn

from permerge.align import align
from permerge.graph import trace
from permerge.merge import merge
from permerge.merge.many import merge_many
from permerge.permutation import Permutation, identity
from permerge.spec import PermutationSpec

__all__ = ["METHODS", "MergeResult", "merge_models"]

METHODS = ("weight", "many", "average")


@dataclass(frozen=True)
class MergeResult:
    model: nn.Module
    permutations: tuple[Permutation, ...]  # per input: maps it into the merged basis (empty: average)
    spec: PermutationSpec
    report: dict[str, Any] = field(default_factory=dict)


def merge_models(
    models: Sequence[nn.Module],
    example_inputs: Any,
    *,
    method: str = "weight",
    weights: Sequence[float] | None = None,
    spec: PermutationSpec | None = None,
    example_kwargs: Mapping[str, Any] | None = None,
    seed: int = 0,
    quiet: bool = False,
) -> MergeResult:
    """Merge 2+ models of one architecture.

    ``"weight"``: weight-match every model to the first, then average with ``weights``;
    ``"many"``: MergeMany (align each to the mean of the others until stable), uniform average;
    ``"average"``: plain weighted average without alignment (the naive baseline).
    """
    if method not in METHODS:
        raise ValueError(f"unknown merge method {method!r}; choose one of {', '.join(METHODS)}")
    if len(models) < 2:
        raise ValueError(f"merging needs at least 2 models, got {len(models)}")
    start = time.perf_counter()
    spec = spec or trace(models[0], example_inputs, example_kwargs=example_kwargs)
    report: dict[str, Any] = {"method": method, "models": len(models), "groups": len(spec.groups)}
    if method == "many":
        if weights is not None:
            raise ValueError("MergeMany averages uniformly; drop --weights or use --method weight")
        res = merge_many(models, spec=spec, seed=seed)
        report.update(rounds=res.rounds, converged=res.converged)
        merged, perms = res.merged, res.permutations
    elif method == "weight":
        aligned = [align(models[0], m, example_inputs, spec=spec, example_kwargs=example_kwargs, seed=seed, quiet=quiet)
                   for m in models[1:]]  # fmt: skip
        report["alignments"] = [a.report for a in aligned]
        merged = merge([models[0], *(a.model for a in aligned)], weights)
        perms = (identity(spec), *(a.permutation for a in aligned))
    else:
        merged = merge(list(models), weights)
        perms = ()  # nothing was permuted
    report["seconds"] = time.perf_counter() - start
    return MergeResult(merged, tuple(perms), spec, report)  # type: ignore[arg-type]
