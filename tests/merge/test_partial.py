"""Partial merging: budget 2 is the ensemble, budget 1 is aligned averaging, bad budgets are refused."""

from __future__ import annotations

import math

import pytest
import torch

import permerge as pm
from permerge.graph import trace_graph
from permerge.merge import interpolate
from permerge.merge.partial import BudgetError, partial_merge, resolve_budget, widen_module
from permerge.models import MLP, VGG, DenseBlockNet, TransformerBlockNet

torch.set_num_threads(1)

FACTORIES = {
    "mlp": lambda: MLP(hidden=(16, 12)),
    "vgg": lambda: VGG(widths=(4, 4, 8, 8)),  # conv→linear flatten: blocks of H·W columns
    "densenet": lambda: DenseBlockNet(stem=8, growth=4, num_layers=2),  # concatenations: offsets shift
}


@pytest.fixture(scope="module", params=sorted(FACTORIES))
def setup(request, bn_models):
    a, b = bn_models(FACTORIES[request.param], (0, 1))
    x = torch.randn(3, 1, 28, 28, generator=torch.Generator().manual_seed(2))
    traced = trace_graph(a, x)
    perm = pm.random_permutation(traced.spec, seed=3)
    gen = torch.Generator().manual_seed(4)
    costs = {g.name: torch.randn(g.size, g.size, generator=gen) for g in traced.spec.groups}
    return a, b, x, traced, perm, costs, request.param


def test_budget_two_is_the_ensemble(setup):
    a, b, x, traced, perm, costs, name = setup
    res = partial_merge(traced.spec, a, b, perm, costs, 2.0, example_inputs=x)
    assert all(res.widths[g.name] == 2 * g.size for g in traced.spec.groups)
    with torch.no_grad():
        assert torch.allclose(res.model(x), 0.5 * (a(x) + b(x)), atol=1e-4)
        heads = partial_merge(traced.spec, a, b, perm, costs, 2.0, keep_heads=True, example_inputs=x).model(x)
        assert torch.allclose(heads, torch.cat([a(x), b(x)], -1), atol=1e-4)


def test_budget_one_is_aligned_interpolation_at_half(setup):
    a, b, x, traced, perm, costs, name = setup
    res = partial_merge(traced.spec, a, b, perm, costs, 1.0, example_inputs=x)
    aligned = pm.apply_permutation(traced.spec, perm, b.state_dict())
    expected = interpolate(a.state_dict(), aligned, 0.5)
    assert res.widened == {} and res.widths == {g.name: g.size for g in traced.spec.groups}
    assert all(torch.equal(res.state_dict[k], v) for k, v in expected.items())
    reference = widen_module(a, expected)  # same shapes: a plain copy of A holding the average
    with torch.no_grad():
        assert torch.allclose(res.model(x), reference(x), atol=1e-6)


def test_intermediate_budget_keeps_the_least_correlated_pairs_apart(setup):
    a, b, x, traced, perm, costs, name = setup
    res = partial_merge(traced.spec, a, b, perm, costs, 1.5, example_inputs=x)
    for g in traced.spec.groups:
        k = math.floor(0.5 * g.size + 0.5)
        assert res.widths[g.name] == g.size + k
        scores = costs[g.name][torch.arange(g.size), perm[g.name]]
        kept = set(res.unmerged[g.name].tolist())
        assert len(kept) == k and all(scores[i] <= scores[j] for i in kept for j in set(range(g.size)) - kept)
    n = lambda m: sum(p.numel() for p in m.parameters())  # noqa: E731
    with torch.no_grad():
        assert res.model(x).shape == a(x).shape
    assert n(a) < res.num_parameters() < n(partial_merge(traced.spec, a, b, perm, costs, 2.0, example_inputs=x).model)
    arch = res.architecture()
    assert arch["groups"][traced.spec.groups[0].name]["width"] == res.widths[traced.spec.groups[0].name]


def test_widened_model_reloads_from_its_state_dict(setup):
    a, b, x, traced, perm, costs, name = setup
    res = partial_merge(traced.spec, a, b, perm, None, {traced.spec.groups[0].name: 2.0}, example_inputs=x)  # weight-similarity pairs
    fresh = FACTORIES[name]()
    reloaded = widen_module(fresh.eval(), {k: v.clone() for k, v in res.state_dict.items()})
    with torch.no_grad():
        assert torch.equal(reloaded(x), res.model(x))
    assert next(a.parameters()).shape == next(fresh.parameters()).shape  # templates untouched


@pytest.mark.parametrize("bad", [0.5, 0.999, 2.01, float("nan"), "wide"])
def test_budget_out_of_range_is_refused(setup, bad):
    a, b, x, traced, perm, costs, name = setup
    with pytest.raises(BudgetError, match=r"\[1, 2\]"):
        partial_merge(traced.spec, a, b, perm, costs, bad, example_inputs=x)
    with pytest.raises(BudgetError, match=r"budget of group"):
        partial_merge(traced.spec, a, b, perm, costs, {traced.spec.groups[0].name: bad}, example_inputs=x)


def test_unknown_group_names_are_refused_with_the_valid_ones(setup):
    a, b, x, traced, perm, costs, name = setup
    with pytest.raises(BudgetError) as e:
        partial_merge(traced.spec, a, b, perm, costs, {"no.such.group": 1.5}, example_inputs=x)
    assert "no.such.group" in str(e.value) and all(g.name in str(e.value) for g in traced.spec.groups)


def test_bad_costs_and_specs_without_roles_are_refused(setup):
    a, b, x, traced, perm, costs, name = setup
    g = traced.spec.groups[0]
    with pytest.raises(BudgetError, match="shape"):
        partial_merge(traced.spec, a, b, perm, {**costs, g.name: torch.zeros(2, 2)}, 1.5, example_inputs=x)
    hand_written = pm.PermutationSpec.from_json(traced.spec.to_json().replace('"role": "consumer"', '"role": null'))
    with pytest.raises(pm.SpecError, match="no role"):
        partial_merge(hand_written, a, b, perm, costs, 1.5, example_inputs=x)


def test_resolve_budget_defaults_unnamed_groups_to_fully_merged():
    spec = pm.PermutationSpec((pm.Group("h", 4, (pm.Axis("w", 0),)), pm.Group("g", 2, (pm.Axis("v", 0),))))
    assert resolve_budget(spec, {"h": 2}) == {"h": 2.0, "g": 1.0}
    with pytest.raises(BudgetError, match="cannot be widened"):
        resolve_budget(spec, {"h": 1.5}, fixed={"h": "attention-head layout"})
    assert resolve_budget(spec, 1.5, fixed={"h": "attention-head layout"}) == {"h": 1.0, "g": 1.5}


def test_attention_heads_stay_merged_and_hard_coded_widths_fail_clearly():
    torch.manual_seed(0)
    a = TransformerBlockNet(attention="manual").eval()
    torch.manual_seed(1)
    b = TransformerBlockNet(attention="manual").eval()
    x = torch.randint(0, 64, (2, 8))
    traced = trace_graph(a, x)
    perm = pm.identity(traced.spec)
    res = partial_merge(traced.spec, a, b, perm, None, 1.0, example_inputs=x)  # budget 1 always works
    with torch.no_grad():
        assert res.model(x).shape == a(x).shape
    heads = [g.name for g in traced.spec.groups if any(ax.repeat != 1 for ax in g.members)]
    if heads:
        with pytest.raises(BudgetError, match="cannot be widened"):
            partial_merge(traced.spec, a, b, perm, None, {heads[0]: 1.5}, example_inputs=x)
    # widening the residual stream breaks ManualAttention's `d // n_heads` reshape: a clear error
    with pytest.raises(pm.PermergeError, match="budget 1.0"):
        partial_merge(traced.spec, a, b, perm, None, 1.5, example_inputs=x)
