"""N-model merges: MergeMany's objective-based stopping and report, C2M3 merging, the function check of every member."""

from __future__ import annotations

import copy
import dataclasses
import warnings

import pytest
import torch
from conftest import traced

import permerge as pm
from permerge.errors import FunctionNotPreservedError, PermergeError
from permerge.merge.many import NotConvergedWarning, c2m3_merge, merge_many, objective
from permerge.models import VGG
from permerge.spec import PermutationSpec


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
    res = merge_many(models, x, spec=spec, seed=1)
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
        res = merge_many(models, x, spec=spec, max_rounds=1)
    assert not res.converged and res.rounds == 1
    assert "MergeMany stopped after max_rounds=1" in caplog.text


def test_c2m3_reaches_at_least_the_objective_of_its_own_projection():
    x, spec, models = _random_models(3)
    res = c2m3_merge(models, x, spec=spec, refine=True)
    raw = c2m3_merge(models, x, spec=spec, refine=False)
    assert res.method == raw.method == "c2m3" and res.converged and raw.converged
    assert res.objective_after >= raw.objective_after
    assert raw.rounds < res.rounds


def test_errors_before_any_work(monkeypatch):
    x, spec, models = _random_models(2)

    def no_work(*args, **kwargs):
        raise AssertionError("matching ran before the inputs were refused")

    monkeypatch.setattr("permerge.merge.many.weight_matching", no_work)
    monkeypatch.setattr("permerge.merge.many.c2m3_matching", no_work)
    monkeypatch.setattr("permerge.merge.many.trace", no_work)
    sds = [m.state_dict() for m in models]
    cases = [
        (lambda: merge_many(models[:1], x, spec=spec), "at least 2, got 1"),
        (lambda: merge_many(models, x, spec=spec, max_rounds=0), "max_rounds must be a positive integer, got 0"),
        (lambda: c2m3_merge(models, x, spec=spec, fw_tol=float("nan")), "fw_tol must be a finite number >= 0"),
        (lambda: c2m3_merge(models, x, spec=spec, max_iter=-1), "max_iter must be a non-negative integer"),
        (lambda: merge_many(sds, check=False), "needs a spec, or modules plus example_inputs"),
        (lambda: merge_many(models, x, spec=spec, init=[pm.identity(spec)]), "init holds 1 permutations for 2 models"),
        # the function check needs modules and an example call
        (lambda: merge_many(sds, spec=spec), "checks that each model's permutation keeps its function"),
        (lambda: c2m3_merge(models, spec=spec), "pass modules and example_inputs= (or check=False"),
    ]
    for call, message in cases:
        with pytest.raises(PermergeError) as e:
            call()
        assert message in str(e.value)
    with pytest.raises(pm.errors.StateDictMismatchError, match="different keys"):
        c2m3_merge([sds[0], {k: v for k, v in sds[1].items() if k != "net.1.bias"}], spec=spec, check=False)


def _vggs(n: int = 3):
    """Small BN VGGs whose norm affines and running statistics are not a fresh model's constants."""
    torch.manual_seed(0)
    models = [VGG(widths=(4, 4, 8, 8)).eval() for _ in range(n)]
    with torch.no_grad():
        for m in models:
            for name, t in m.state_dict().items():
                if "running" in name or name.endswith("1.weight"):
                    t.copy_(torch.rand_like(t) + 0.5)
    return models, torch.randn(3, 1, 28, 28)


@pytest.mark.parametrize("merger", [merge_many, c2m3_merge])
def test_each_members_permutation_is_checked_and_its_error_recorded(merger):
    models, x = _vggs()
    before = [copy.deepcopy(m.state_dict()) for m in models]
    res = merger(models, x)
    assert len(res.function_checks) == 3
    moved = [r for r, p in zip(res.function_checks, res.permutations) if not pm.permutation.is_identity(p)]
    assert len(moved) >= 2 and all(r is not None and r.relative_error < 1e-5 for r in moved)
    assert all(r is None for r, p in zip(res.function_checks, res.permutations) if pm.permutation.is_identity(p))
    assert res.function_preservation_error == max(r.relative_error for r in moved)
    assert {"eval, batch 3", "eval, batch 4"} <= set(moved[0].runs)  # the example batch and one more
    report = res.report()
    assert report["function_preservation_error"] == res.function_preservation_error
    assert [c is None for c in report["function_checks"]] == [r is None for r in res.function_checks]
    for m, sd in zip(models, before):
        assert all(torch.equal(v, sd[k]) for k, v in m.state_dict().items())
    unchecked = merger(models, x, check=False)
    assert unchecked.function_preservation_error is None and unchecked.function_checks == ()


@pytest.mark.parametrize("merger", [merge_many, c2m3_merge])
def test_a_corrupted_spec_is_caught_and_nothing_returned(merger):
    models, x = _vggs()
    spec = pm.trace(models[0], x)
    g = spec.groups[0]  # the first conv's channels without their BatchNorm
    bad = PermutationSpec(
        (dataclasses.replace(g, members=tuple(ax for ax in g.members if ".1." not in ax.key)), *spec.groups[1:]), spec.frozen
    )
    with pytest.raises(FunctionNotPreservedError, match=r"^model \d: permutation changed the model output"):
        merger(models, x, spec=bad)


def test_c2m3_refining_is_mergemany_from_the_projection():
    x, spec, models = _random_models(3)
    raw = c2m3_merge(models, x, spec=spec, refine=False, seed=4)
    refined = c2m3_merge(models, x, spec=spec, refine=True, seed=4)
    again = merge_many(models, x, spec=spec, init=raw.permutations, seed=4)
    assert all(torch.equal(p[g], q[g]) for p, q in zip(refined.permutations, again.permutations) for g in spec.names)
    assert refined.objective_after == pytest.approx(again.objective_after)


def test_c2m3_warns_when_frank_wolfe_hits_its_iteration_limit():
    x, spec, models = _random_models(3)
    with pytest.warns(NotConvergedWarning, match=r"Frank–Wolfe stopped after max_iter=1 .* raise max_iter"):
        res = c2m3_merge(models, x, spec=spec, max_iter=1, refine=False)
    assert not res.converged and res.rounds == 1
