"""C2M3: cycle-consistent N-model matching through a universe (Frank–Wolfe)."""

from __future__ import annotations

import itertools

import pytest
import torch
from conftest import traced

import permerge as pm
from permerge.match.c2m3 import c2m3_matching, pairwise


def _copies(name: str, n: int):
    model, _, _, spec = traced(name)
    sd = model.state_dict()
    planted = [pm.identity(spec)] + [pm.random_permutation(spec, s) for s in range(1, n)]
    return spec, sd, [pm.apply_permutation(spec, p, sd) for p in planted]


def _unrelated(name: str, n: int):
    """The spec and ``n`` unrelated random weight sets of a zoo model's shapes."""
    model, _, _, spec = traced(name)
    gen = torch.Generator().manual_seed(5)
    sds = [{k: torch.randn(v.shape, generator=gen) if v.is_floating_point() else v for k, v in model.state_dict().items()}
           for _ in range(n)]  # fmt: skip
    return spec, sds


@pytest.mark.parametrize("name", ["mlp", "vgg", "resnet20", "transformer_torch", "hf_llama"])
def test_permuted_copies_are_recovered_exactly(name):
    spec, sd, sds = _copies(name, 3)
    res = c2m3_matching(spec, sds, quiet=True)
    assert res.converged
    assert pm.permutation.is_identity(res.permutations[0])  # model 0's basis is the universe
    for p, s in zip(res.permutations, sds):
        aligned = pm.apply_permutation(spec, p, s)
        assert [k for k in sd if not torch.equal(aligned[k], sd[k])] == []


def test_permutations_are_cycle_consistent_and_raise_the_objective():
    spec, sds = _unrelated("mlp", 4)
    res = c2m3_matching(spec, sds, quiet=True)
    assert res.objective_after > res.objective_before
    assert all(b >= a - 1e-6 * abs(a) for a, b in zip(res.objectives, res.objectives[1:]))
    for i, j, k in itertools.permutations(range(4), 3):
        p_ij, p_ik, p_kj = pairwise(res.permutations, i, j), pairwise(res.permutations, i, k), pairwise(res.permutations, k, j)
        assert all(torch.equal(p_ij[g], pm.permutation.compose(p_ik, p_kj)[g]) for g in spec.names)
    # P_ij maps model j into model i's basis: i's and j's universe images then agree
    p_01 = pairwise(res.permutations, 0, 1)
    via_0 = pm.apply_permutation(spec, res.permutations[0], pm.apply_permutation(spec, p_01, sds[1]))
    direct = pm.apply_permutation(spec, res.permutations[1], sds[1])
    assert all(torch.equal(via_0[k], direct[k]) for k in direct)


def test_iteration_limit_inputs_untouched_and_errors():
    spec, sds = _unrelated("mlp", 3)
    before = [{k: v.clone() for k, v in sd.items()} for sd in sds]
    res = c2m3_matching(spec, sds, max_iter=1, quiet=True)
    assert res.iterations == 1 and not res.converged and len(res.objectives) == 1
    assert all(torch.equal(a[k], b[k]) for a, b in zip(before, sds) for k in a)
    with pytest.raises(ValueError, match="at least 2 models"):
        c2m3_matching(spec, sds[:1])
    bad = dict(sds[1])
    bad.pop(spec.keys[0])
    with pytest.raises(pm.errors.StateDictMismatchError, match="different keys"):
        c2m3_matching(spec, [sds[0], bad])
    with pytest.raises(ValueError, match=r"init\[0\] must be the identity"):
        c2m3_matching(spec, sds, init=[pm.random_permutation(spec, 1)] * 3)
