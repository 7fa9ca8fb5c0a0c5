"""N-model merges: MergeMany's objective-based stopping and report, C2M3 merging."""

from __future__ import annotations

import copy
import warnings

import pytest
import torch
from conftest import traced

import permerge as pm
from permerge.merge.many import NotConvergedWarning, c2m3_merge, merge_many, objective


def _permuted_copies(name: str, n: int = 3):
    model, x, _, spec = traced(name)
    copies = []
    for seed in range(n):
        c = copy.deepcopy(model)
        c.load_state_dict(pm.apply_permutation(spec, pm.random_permutation(spec, seed), model.state_dict()))
        copies.append(c)
    return model, x, spec, copies


def _random_models(n: int):
    """``n`` MLPs of the zoo's shapes with unrelated random weights."""
    model, x, _, spec = traced("mlp")
    gen = torch.Generator().manual_seed(3)
    out = []
    for _ in range(n):
        m = copy.deepcopy(model)
        m.load_state_dict({k: torch.randn(v.shape, generator=gen) for k, v in model.state_dict().items()})
        out.append(m)
    return x, spec, out


@pytest.mark.parametrize("merger", [merge_many, c2m3_merge])
@pytest.mark.parametrize("name", ["vgg", "resnet20", "transformer_torch"])
def test_permuted_copies_of_one_model_are_recovered(merger, name):
    model, x, spec, copies = _permuted_copies(name)
    with warnings.catch_warnings():
        warnings.simplefilter("error", NotConvergedWarning)
        res = merger(copies, x, spec=spec)
    assert res.converged
    keys = [k for k, v in model.state_dict().items() if v.is_floating_point()]
    aligned = [m.state_dict() for m in res.aligned]  # modules in, modules out
    assert [k for a in aligned[1:] for k in keys if not torch.equal(a[k], aligned[0][k])] == []  # one basis
    assert all(torch.allclose(res.merged.state_dict()[k], aligned[0][k], atol=1e-6) for k in keys)
    with torch.no_grad():
        assert torch.allclose(res.merged(*x), model(*x), atol=1e-5)
    for c, p, a in zip(copies, res.permutations, aligned):  # each permutation maps its model to the shared basis
        shared = pm.apply_permutation(spec, p, c.state_dict())
        assert all(torch.equal(shared[k], a[k]) for k in shared)


def test_objective_rises_and_the_report_says_so():
    x, spec, models = _random_models(4)
    before = [{k: v.clone() for k, v in m.state_dict().items()} for m in models]
    res = merge_many(models, spec=spec, seed=1)
    assert res.converged and res.method == "many"
    assert res.objective_before == pytest.approx(objective(spec, [m.state_dict() for m in models]))
    assert res.objective_after == pytest.approx(objective(spec, [m.state_dict() for m in res.aligned]), rel=1e-9)
    assert res.objective_after > res.objective_before
    assert res.objectives[-1] == pytest.approx(res.objective_after, rel=1e-6)  # tracked gains add up
    assert all(b >= a for a, b in zip(res.objectives, res.objectives[1:]))
    assert res.report()["rounds"] == res.rounds == len(res.objectives)
    assert all(torch.equal(b[k], m.state_dict()[k]) for b, m in zip(before, models) for k in b)  # inputs untouched


def test_stopping_at_the_round_limit_warns_and_reports_non_convergence(caplog):
    x, spec, models = _random_models(4)
    with pytest.warns(NotConvergedWarning, match=r"MergeMany stopped after max_rounds=1 rounds .* raise max_rounds"):
        res = merge_many(models, spec=spec, max_rounds=1)
    assert not res.converged and res.rounds == 1
    assert "MergeMany stopped after max_rounds=1" in caplog.text


def test_c2m3_reaches_at_least_the_objective_of_its_own_projection():
    x, spec, models = _random_models(3)
    res = c2m3_merge(models, spec=spec, refine=True)
    raw = c2m3_merge(models, spec=spec, refine=False)
    assert res.method == raw.method == "c2m3" and res.converged and raw.converged
    assert res.objective_after >= raw.objective_after
    assert raw.rounds < res.rounds


def test_errors_before_any_work():
    x, spec, models = _random_models(2)
    with pytest.raises(ValueError, match="at least 2"):
        merge_many(models[:1], spec=spec)
    with pytest.raises(ValueError, match="max_rounds must be >= 1"):
        merge_many(models, spec=spec, max_rounds=0)
    with pytest.raises(ValueError, match="needs a spec, or modules plus example_inputs"):
        merge_many([m.state_dict() for m in models])
    with pytest.raises(ValueError, match="init holds 1 permutations for 2 models"):
        merge_many(models, spec=spec, init=[pm.identity(spec)])
    with pytest.raises(pm.errors.StateDictMismatchError, match="different keys"):
        c2m3_merge([models[0], {k: v for k, v in models[1].state_dict().items() if k != "net.1.bias"}], spec=spec)


def test_c2m3_refining_is_mergemany_from_the_projection():
    x, spec, models = _random_models(3)
    raw = c2m3_merge(models, spec=spec, refine=False, seed=4)
    refined = c2m3_merge(models, spec=spec, refine=True, seed=4)
    again = merge_many(models, spec=spec, init=raw.permutations, seed=4)
    assert all(torch.equal(p[g], q[g]) for p, q in zip(refined.permutations, again.permutations) for g in spec.names)
    assert refined.objective_after == pytest.approx(again.objective_after)


def test_c2m3_warns_when_frank_wolfe_hits_its_iteration_limit():
    x, spec, models = _random_models(3)
    with pytest.warns(NotConvergedWarning, match=r"Frank–Wolfe stopped after max_iter=1 .* raise max_iter"):
        res = c2m3_merge(models, spec=spec, max_iter=1, refine=False)
    assert not res.converged and res.rounds == 1
