"""Soft permutations act through every layout exactly as hard ones do; Sinkhorn's implicit gradient."""

from __future__ import annotations

import pytest
import torch
from conftest import traced
from zoo import ZOO

import permerge as pm
from permerge.match.soft import as_matrix, sinkhorn, soft_apply

NAMES = [z.name for z in ZOO]


@pytest.mark.parametrize("name", NAMES)
def test_a_permutation_matrix_acts_exactly_like_the_index_vector(name):
    model, _, _, spec = traced(name)
    sd = {k: v.double() if v.is_floating_point() else v for k, v in model.state_dict().items()}
    perm = pm.random_permutation(spec, 3)
    hard = pm.apply_permutation(spec, perm, sd)
    soft = soft_apply(spec, {g: as_matrix(p, torch.float64) for g, p in perm.items()}, sd)
    assert [k for k in soft if sd[k].is_floating_point() and not torch.equal(soft[k], hard[k])] == []


def test_a_soft_matrix_mixes_units_linearly():
    model, _, _, spec = traced("transformer_torch")  # heads x head_dim: two groups on one dimension
    sd = {k: v.double() for k, v in model.state_dict().items() if v.is_floating_point()}
    gen = torch.Generator().manual_seed(0)
    mats = {g.name: sinkhorn(torch.randn(g.size, g.size, generator=gen, dtype=torch.float64)) for g in spec.groups}
    p, q = pm.random_permutation(spec, 1), pm.random_permutation(spec, 2)
    hp, hq = ({g: as_matrix(v, torch.float64) for g, v in x.items()} for x in (p, q))
    # mixing with 0.3·P + 0.7·Q of one group (others fixed) is the same blend of the two results
    g = spec.groups[0].name
    blend = soft_apply(spec, {**mats, g: 0.3 * hp[g] + 0.7 * hq[g]}, sd)
    a, b = soft_apply(spec, {**mats, g: hp[g]}, sd), soft_apply(spec, {**mats, g: hq[g]}, sd)
    assert all(torch.allclose(blend[k], 0.3 * a[k] + 0.7 * b[k], atol=1e-12) for k in blend)


def test_sinkhorn_is_doubly_stochastic_and_tends_to_the_assignment():
    gen = torch.Generator().manual_seed(0)
    scores = torch.randn(7, 7, generator=gen, dtype=torch.float64)
    p = sinkhorn(scores, tau=1.0, iters=1000, tol=1e-12)
    assert torch.allclose(p.sum(0), torch.ones(7, dtype=torch.float64), atol=1e-10)
    assert torch.allclose(p.sum(1), torch.ones(7, dtype=torch.float64), atol=1e-10)
    cold = sinkhorn(scores, tau=1e-3, iters=10000, tol=1e-9)
    best = pm.match.solve(scores)
    assert torch.equal(cold.argmax(1), best)
    with pytest.raises(ValueError, match="tau must be positive"):
        sinkhorn(scores, tau=0.0)


def test_sinkhorn_implicit_gradient_equals_the_unrolled_one():
    gen = torch.Generator().manual_seed(1)
    scores = torch.randn(6, 6, generator=gen, dtype=torch.float64, requires_grad=True)
    weights = torch.randn(6, 6, generator=gen, dtype=torch.float64)
    (sinkhorn(scores, tau=0.5, iters=5000, tol=1e-13) * weights).sum().backward()
    unrolled = scores.detach().clone().requires_grad_(True)
    log_p = unrolled / 0.5
    for _ in range(2000):
        log_p = log_p - torch.logsumexp(log_p, 1, keepdim=True)
        log_p = log_p - torch.logsumexp(log_p, 0, keepdim=True)
    (log_p.exp() * weights).sum().backward()
    assert torch.allclose(scores.grad, unrolled.grad, atol=1e-9)
