"""MergeMany (Git Re-Basin, Algorithm 3): align N models to each other, then average them.

Repeatedly, each model in a seeded random order is weight-matched to the average of all the
others and permuted in place of its old self; when a full round permutes nothing, the models share
one basis and their average is the merge.
"""

from __future__ import annotations

import copy
import logging
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from permerge.apply import apply_permutation
from permerge.graph import trace
from permerge.match.weight import weight_matching
from permerge.merge import check_same_architecture, merge, state_dict_of
from permerge.permutation import Permutation, compose, identity, is_identity
from permerge.spec import PermutationSpec

LOG = logging.getLogger(__name__)

__all__ = ["MergeManyResult", "merge_many"]


@dataclass(frozen=True)
class MergeManyResult:
    merged: nn.Module | dict[str, torch.Tensor]
    permutations: tuple[Permutation, ...]  # per input model: apply to its state dict to align it
    rounds: int
    converged: bool
    seconds: float


def merge_many(
    models: Sequence[nn.Module | Mapping[str, torch.Tensor]],
    example_inputs: Any = None,
    *,
    spec: PermutationSpec | None = None,
    example_kwargs: Mapping[str, Any] | None = None,
    max_rounds: int = 20,
    seed: int = 0,
    backend: str = "auto",
) -> MergeManyResult:
    """Align every model to the mean of the others until nothing changes, then average.

    Pass modules and ``example_inputs`` (the spec is traced from the first model), or any models
    with a ``spec``.

    The permutations are relative to each input model, so ``apply_permutation(spec, res.
    permutations[i], state_dict_i)`` reproduces model ``i`` in the shared basis.
    """
    start = time.perf_counter()
    if len(models) < 2:
        raise ValueError(f"merge_many needs at least 2 models, got {len(models)}")
    if spec is None:
        if not isinstance(models[0], nn.Module) or example_inputs is None:
            raise ValueError("merge_many needs a spec, or modules plus example_inputs to trace one")
        spec = trace(models[0], example_inputs, example_kwargs=example_kwargs)
    originals = [state_dict_of(m) for m in models]
    check_same_architecture(originals)
    current = [dict(sd) for sd in originals]
    perms = [identity(spec) for _ in models]
    gen = torch.Generator().manual_seed(seed)
    rounds, converged = 0, False
    for rounds in range(1, max_rounds + 1):
        changed = 0
        for i in torch.randperm(len(models), generator=gen).tolist():
            others = merge([sd for j, sd in enumerate(current) if j != i])
            step = weight_matching(spec, others, current[i], seed=seed + rounds, backend=backend, quiet=True)
            if not is_identity(step.permutation):
                current[i] = apply_permutation(spec, step.permutation, current[i])
                perms[i] = compose(step.permutation, perms[i])
                changed += 1
        LOG.info("MergeMany round %d: %d of %d models moved", rounds, changed, len(models))
        if not changed:
            converged = True
            break
    merged = merge(current)
    if isinstance(models[0], nn.Module):
        module = copy.deepcopy(models[0])
        module.load_state_dict(merged)
        merged = module
    return MergeManyResult(merged, tuple(perms), rounds, converged, time.perf_counter() - start)
