"""Guarantee 2: weight matching recovers a planted permutation exactly; plus its contract."""

from __future__ import annotations

import logging

import pytest
import torch
from conftest import traced, zoo_params
from hypothesis import given, settings
from hypothesis import strategies as st
from zoo import randomized

import permerge as pm
from permerge.errors import SpecError, StateDictMismatchError
from permerge.match import (
    MATCHERS,
    MatchRequest,
    UnknownMatcherError,
    WeightMatchingResult,
    get_matcher,
    register_matcher,
    weight_matching,
)
from permerge.match.lap import LapError
from permerge.match.weight import _unit_rows
from permerge.spec import Axis, Group, PermutationSpec


def _distinguishable(spec: PermutationSpec, sd: dict[str, torch.Tensor], name: str) -> bool:
    """Whether no two units of group ``name`` hold identical weights in every member tensor."""
    g = spec[name]
    rows = torch.cat([_unit_rows(sd[ax.key].float(), ax, g.size) for ax in g.members], dim=1)
    return len(torch.unique(rows, dim=0)) == g.size


@pytest.mark.parametrize("name", zoo_params())
@settings(max_examples=2, deadline=None)
@given(seed=st.integers(0, 2**31 - 1))
def test_recovers_planted_permutation_exactly(name, seed):
    """On a copy with its constant state redrawn (so norm statistics tell units apart too)."""
    model, _, _, spec = traced(name)
    sd_a = randomized(model, seed).state_dict()
    planted = pm.random_permutation(spec, seed)
    sd_b = pm.apply_permutation(spec, planted, sd_a)
    res = weight_matching(spec, sd_a, sd_b, seed=seed, quiet=True)
    assert res.converged
    aligned = pm.apply_permutation(spec, res.permutation, sd_b)
    assert [k for k in sd_a if not torch.equal(aligned[k], sd_a[k])] == []
    expected = pm.inverse(planted)
    for g in spec.groups:
        if g.size > 1 and _distinguishable(spec, sd_a, g.name):
            assert torch.equal(res.permutation[g.name], expected[g.name]), g.name


@pytest.mark.parametrize("name", ["mlp", "resnet20", "hf_llama"])
def test_matching_a_model_to_itself_is_identity(name):
    model, _, _, spec = traced(name)
    sd = model.state_dict()
    res = weight_matching(spec, sd, sd, quiet=True)
    assert pm.permutation.is_identity(res.permutation)
    assert res.sweeps == 1 and res.converged
    assert res.total_after == res.total_before


def _two_models(name: str = "resnet20"):
    """The spec, a zoo model's weights and an unrelated perturbed copy (noise of the same scale)."""
    model, _, _, spec = traced(name)
    sd_a = model.state_dict()
    gen = torch.Generator().manual_seed(7)
    sd_b = {k: (v + torch.randn(v.shape, generator=gen)) if v.is_floating_point() else v for k, v in sd_a.items()}
    return spec, sd_a, sd_b


def test_objective_never_decreases_and_is_deterministic():
    spec, sd_a, sd_b = _two_models()
    res = weight_matching(spec, sd_a, sd_b, seed=3, quiet=True)
    again = weight_matching(spec, sd_a, sd_b, seed=3, quiet=True)
    assert res.total_after >= res.total_before
    assert res.total_after > res.total_before  # unrelated weights: there is something to gain
    assert all(torch.equal(res.permutation[g], again.permutation[g]) for g in res.permutation)
    assert res.objective_after == again.objective_after
    assert set(res.objective_before) == set(res.objective_after) == set(spec.names)
    # the reported objective is the one the permutation achieves
    aligned = pm.apply_permutation(spec, res.permutation, sd_b)
    direct = sum(torch.dot(sd_a[k].flatten().float(), aligned[k].flatten().float()).item() for k in spec.keys)
    assert direct == pytest.approx(res.total_after, rel=1e-5)


def test_init_is_respected_and_inputs_untouched():
    spec, sd_a, sd_b = _two_models()
    before = {k: v.clone() for k, v in sd_b.items()}
    first = weight_matching(spec, sd_a, sd_b, quiet=True)
    res = weight_matching(spec, sd_a, sd_b, init=first.permutation, quiet=True)
    assert res.sweeps == 1  # started at a fixed point
    assert all(torch.equal(res.permutation[g], first.permutation[g]) for g in spec.names)
    assert all(torch.equal(before[k], sd_b[k]) for k in sd_b)


def test_max_sweeps_and_logging(caplog):
    spec, sd_a, sd_b = _two_models()
    with caplog.at_level(logging.INFO, logger="permerge.match.weight"):
        res = weight_matching(spec, sd_a, sd_b, max_sweeps=1, quiet=True)
    assert res.sweeps == 1 and not res.converged
    assert "sweep 1:" in caplog.text


def test_half_precision_weights_are_matched_in_float32():
    model, _, _, spec = traced("mlp")
    sd_a = {k: v.to(torch.bfloat16) for k, v in model.state_dict().items()}
    planted = pm.random_permutation(spec, 5)
    sd_b = pm.apply_permutation(spec, planted, sd_a)
    res = weight_matching(spec, sd_a, sd_b, quiet=True)
    aligned = pm.apply_permutation(spec, res.permutation, sd_b)
    assert all(torch.equal(aligned[k], sd_a[k]) for k in sd_a)


def _heads_and_head_dim():
    """2 heads × 3 dims on q's rows / o's columns: both groups act on the same dims and commute.
    Returns the spec, A, a planted permutation and B = planted·A."""
    heads = Group("heads", 2, (Axis("q", 0, block=3), Axis("o", 1, block=3)))
    within = Group("hd", 3, (Axis("q", 0, repeat=2, stride=3), Axis("o", 1, repeat=2, stride=3)))
    spec = PermutationSpec((heads, within))
    gen = torch.Generator().manual_seed(0)
    sd_a = {"q": torch.randn(6, 4, generator=gen), "o": torch.randn(4, 6, generator=gen)}
    planted = {"heads": torch.tensor([1, 0]), "hd": torch.tensor([2, 0, 1])}
    return spec, sd_a, planted, pm.apply_permutation(spec, planted, sd_a)


def test_heads_and_head_dim_sharing_one_dim():
    spec, sd_a, planted, sd_b = _heads_and_head_dim()
    res = weight_matching(spec, sd_a, sd_b, quiet=True)
    assert all(torch.equal(res.permutation[g], pm.inverse(planted)[g]) for g in planted)


def test_default_start_escapes_the_identity_local_optimum():
    # heads × head_dim: from the identity, coordinate descent stalls here (the paper's Algorithm 1)
    spec, sd_a, planted, sd_b = _heads_and_head_dim()
    stuck = weight_matching(spec, sd_a, sd_b, init=pm.identity(spec), quiet=True)
    assert not torch.equal(stuck.permutation["heads"], pm.inverse(planted)["heads"])
    res = weight_matching(spec, sd_a, sd_b, quiet=True)
    assert all(torch.equal(res.permutation[g], pm.inverse(planted)[g]) for g in planted)


def _cost_by_brute_force(spec, sd_a, sd_b, perm, g):
    """C[i, j] = change of the objective ⟨A, P·B⟩ when unit j of B is put at position i, computed
    from whole permuted state dicts (no caching, no unit-row tricks)."""
    n = spec[g].size
    others = {h: p for h, p in perm.items() if h != g}
    permuted = pm.apply_permutation(spec, others, {k: sd_b[k] for k in spec.keys})
    cost = torch.zeros(n, n, dtype=torch.float64)
    for i in range(n):
        for j in range(n):
            # the objective restricted to unit position i of g, with B's unit j placed there
            for ax in spec[g].members:
                pos_a = ax.positions(n)[:, i, :].flatten()
                pos_b = ax.positions(n)[:, j, :].flatten()
                a = sd_a[ax.key].index_select(ax.dim, pos_a).double()
                b = permuted[ax.key].index_select(ax.dim, pos_b).double()
                cost[i, j] += (a * b).sum()
    return cost


@pytest.mark.parametrize("name", ["resnet20", "hf_llama", "densenet"])
def test_incremental_costs_equal_a_fresh_computation(name):
    from permerge.match import weight as wm

    model, _, _, spec = traced(name)
    sd_a = model.state_dict()
    gen = torch.Generator().manual_seed(1)
    sd_b = {k: torch.randn(v.shape, generator=gen) if v.is_floating_point() else v for k, v in sd_a.items()}
    a = {k: sd_a[k] for k in spec.keys}
    perm = pm.identity(spec)
    costs = wm._Costs(spec, a, perm, {k: sd_b[k].clone() for k in spec.keys})
    groups = [g.name for g in spec.groups if g.size > 1]
    for g in groups:
        costs.matrix(g)  # fill every cache
    for step in range(12):
        g = groups[int(torch.randint(len(groups), (1,), generator=gen))]
        p = costs.perm[g].clone()
        if step % 3 == 0:  # most units move: the stale path
            p = torch.randperm(len(p), generator=gen)
        else:  # one swap: the low-rank update path
            i, j = torch.randperm(len(p), generator=gen)[:2].tolist()
            p[[i, j]] = p[[j, i]]
        costs.move(g, p)
        perm[g] = p
    fresh = wm._Costs(spec, a, perm, {k: pm.apply.permute_tensor(sd_b[k], spec.axes_of(k), perm) for k in spec.keys})
    for g in groups:
        torch.testing.assert_close(costs.matrix(g), fresh.matrix(g), rtol=1e-4, atol=1e-3)
    small = min(groups, key=lambda g: spec[g].size * len(spec[g].members))
    brute = _cost_by_brute_force(spec, sd_a, sd_b, perm, small)
    torch.testing.assert_close(costs.matrix(small).double(), brute, rtol=1e-4, atol=1e-3)


def test_uncached_costs_give_the_same_answer(monkeypatch):
    from permerge.match import weight as wm

    spec, sd_a, sd_b = _two_models()
    cached = weight_matching(spec, sd_a, sd_b, quiet=True)
    monkeypatch.setattr(wm, "_CACHE_BYTES", 0)
    uncached = weight_matching(spec, sd_a, sd_b, quiet=True)
    assert all(torch.equal(cached.permutation[g], uncached.permutation[g]) for g in spec.names)


@pytest.mark.parametrize("name", ["mlp", "vgg", "resnet20", "hf_llama"])
def test_parallel_laps_give_the_sequential_answer(name, monkeypatch):
    from permerge.match import weight as wm

    model, _, _, spec = traced(name)
    sd_a = model.state_dict()
    sd_b = {k: v + 0.5 * torch.randn_like(v) if v.is_floating_point() else v for k, v in sd_a.items()}
    sd_b = pm.apply_permutation(spec, pm.random_permutation(spec, seed=2), sd_b)
    runs: list[int] = []  # sizes of the runs of LAPs solved together
    real = wm._independent_runs

    def recording(order, state, size):
        for run in real(order, state, size):
            runs.append(len(run))
            yield run

    monkeypatch.setattr(wm, "_independent_runs", recording)
    one = weight_matching(spec, sd_a, sd_b, seed=4, quiet=True, workers=1)
    assert max(runs) == 1
    runs.clear()
    many = weight_matching(spec, sd_a, sd_b, seed=4, quiet=True, workers=3)
    assert max(runs) > 1  # some LAPs really ran concurrently
    assert (one.sweeps, one.total_after) == (many.sweeps, many.total_after)
    assert all(torch.equal(one.permutation[g], many.permutation[g]) for g in spec.names)


def test_workers_must_be_positive():
    spec, sd_a, sd_b = _two_models()
    with pytest.raises(ValueError, match="workers must be >= 1"):
        weight_matching(spec, sd_a, sd_b, workers=0)


def test_backends_give_the_same_answer():
    spec, sd_a, sd_b = _two_models()
    results = [weight_matching(spec, sd_a, sd_b, backend=b, quiet=True) for b in pm.match.available_backends()]
    assert all(r.backend == b for r, b in zip(results, pm.match.available_backends(), strict=True))
    for r in results[1:]:
        assert all(torch.equal(r.permutation[g], results[0].permutation[g]) for g in spec.names)


# -- error paths -------------------------------------------------------------------------------


def test_different_keys_are_named_sorted():
    spec, sd_a, sd_b = _two_models()
    sd_b = dict(sd_b)
    sd_b["zz.extra"] = torch.zeros(1)
    sd_b["aa.extra"] = torch.zeros(1)
    with pytest.raises(StateDictMismatchError, match=r"only in B \['aa.extra', 'zz.extra'\]"):
        weight_matching(spec, sd_a, sd_b, quiet=True)


def test_different_shapes_are_named():
    spec, sd_a, sd_b = _two_models()
    key = spec.keys[0]
    sd_b = {**sd_b, key: torch.zeros(*sd_b[key].shape[:-1], sd_b[key].shape[-1] + 1)}
    with pytest.raises(StateDictMismatchError, match=f"different shapes: \\['{key}"):
        weight_matching(spec, sd_a, sd_b, quiet=True)


def test_non_finite_weights_are_named():
    spec, sd_a, sd_b = _two_models()
    key = spec.keys[-1]
    bad = sd_b[key].clone()
    bad.view(-1)[0] = float("nan")
    with pytest.raises(StateDictMismatchError, match=rf"non-finite .*B\['{key}'\]"):
        weight_matching(spec, sd_a, {**sd_b, key: bad}, quiet=True)


def test_spec_that_does_not_fit_raises_spec_error():
    spec = PermutationSpec((Group("h", 5, (Axis("w", 0),)),))
    sd = {"w": torch.randn(4, 2)}
    with pytest.raises(SpecError, match="'w' dim 0 has length 4"):
        weight_matching(spec, sd, sd, quiet=True)


def test_unknown_backend_lists_the_available_ones():
    spec, sd_a, sd_b = _two_models()
    with pytest.raises(LapError, match="unknown LAP backend 'hungarian'; choose one of auto, .*scipy"):
        weight_matching(spec, sd_a, sd_b, backend="hungarian", quiet=True)


def test_bad_init_is_rejected():
    spec, sd_a, sd_b = _two_models()
    name = spec.names[0]
    with pytest.raises(SpecError, match="not a permutation"):
        weight_matching(spec, sd_a, sd_b, init={name: torch.zeros(spec[name].size, dtype=torch.long)})


# -- registry ----------------------------------------------------------------------------------


def test_registry():
    model, _, _, spec = traced("mlp")
    res = get_matcher("weight")(MatchRequest(spec, model, model, quiet=True, options={"max_sweeps": 3}))
    assert isinstance(res, WeightMatchingResult) and pm.permutation.is_identity(res.permutation)
    with pytest.raises(UnknownMatcherError, match="no matcher named 'nope'; registered: .*weight"):
        get_matcher("nope")

    @register_matcher("_test_identity")
    def _identity(req):
        return pm.identity(req.spec)

    try:
        assert get_matcher("_test_identity") is _identity
    finally:
        del MATCHERS["_test_identity"]


@settings(max_examples=5, deadline=None)
@given(seed=st.integers(0, 2**31 - 1), restarts=st.integers(2, 4))
def test_restarts_never_return_a_lower_objective_than_one_run(seed, restarts):
    spec, sd_a, sd_b = _two_models("mlp")
    one = weight_matching(spec, sd_a, sd_b, seed=seed, quiet=True)
    best = weight_matching(spec, sd_a, sd_b, seed=seed, restarts=restarts, quiet=True)
    assert len(best.restarts) == restarts and best.restarts[0] == one.total_after  # attempt 0 is the single run
    assert best.total_after == max(best.restarts) >= one.total_after
    aligned = pm.apply_permutation(spec, best.permutation, sd_b)  # the reported objective is the permutation's
    direct = sum(torch.dot(sd_a[k].flatten().float(), aligned[k].flatten().float()).item() for k in spec.keys)
    assert direct == pytest.approx(best.total_after, rel=1e-5)


def test_parallel_restarts_give_the_sequential_result():
    spec, sd_a, sd_b = _two_models("mlp")
    seq = weight_matching(spec, sd_a, sd_b, seed=2, restarts=3, workers=1, quiet=True)
    par = weight_matching(spec, sd_a, sd_b, seed=2, restarts=3, workers=3, quiet=True)
    assert seq.restarts == par.restarts
    assert all(torch.equal(seq.permutation[g], par.permutation[g]) for g in spec.names)
    with pytest.raises(ValueError, match="restarts must be >= 1"):
        weight_matching(spec, sd_a, sd_b, restarts=0)


@pytest.mark.parametrize("name", ["mlp", "vgg", "resnet20", "transformer_torch"])
def test_annealed_start_recovers_planted_permutation(name):
    model, _, _, spec = traced(name)
    sd_a = model.state_dict()
    sd_b = pm.apply_permutation(spec, pm.random_permutation(spec, 4), sd_a)
    res = weight_matching(spec, sd_a, sd_b, init="anneal", quiet=True)
    aligned = pm.apply_permutation(spec, res.permutation, sd_b)
    assert [k for k in sd_a if not torch.equal(aligned[k], sd_a[k])] == []


def test_annealed_start_is_deterministic_and_checked():
    spec, sd_a, sd_b = _two_models("mlp")
    one, two = (weight_matching(spec, sd_a, sd_b, init="anneal", quiet=True) for _ in range(2))
    assert all(torch.equal(one.permutation[g], two.permutation[g]) for g in spec.names)
    assert one.total_after > one.total_before
    with pytest.raises(ValueError, match="init must be a permutation, None or 'anneal'"):
        weight_matching(spec, sd_a, sd_b, init="annealing")
