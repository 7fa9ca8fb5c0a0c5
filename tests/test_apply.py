"""Guarantee 1: applying any permutation of a traced spec leaves the model's function unchanged."""

from __future__ import annotations

import pytest
import torch
from conftest import traced, zoo_params
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from zoo import ZOO_BY_NAME, randomized

import permerge as pm
from permerge.check import check_function_preserved
from permerge.errors import FunctionNotPreservedError, SpecError
from permerge.spec import FrozenKind

# float32 noise: a train-mode pass of the zoo's deepest BatchNorm net (Inception v3) is 6e-5 from
# its float64 value, so two float32 passes over reordered sums differ by up to ~1e-4
TOL = 2e-4


@pytest.mark.parametrize("name", zoo_params())
@settings(max_examples=3, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(seed=st.integers(0, 2**31 - 1))
def test_random_permutation_preserves_outputs(name, seed):
    """On a copy whose norm statistics, affines and zero biases are redrawn (a forgotten buffer
    would show), a random permutation changes no output by more than TOL relative (eval and
    train mode; a forgotten buffer or a wrong tie moves outputs by 1e-2 to 1)."""
    model, inputs, kwargs, spec = traced(name)
    model = randomized(model, seed)
    perm = pm.random_permutation(spec, seed)
    report = check_function_preserved(model, spec, inputs, perm, example_kwargs=kwargs, tol=TOL)
    assert report.relative_error <= TOL
    # the permutation really moved weights (the test would be vacuous otherwise)
    if any(len(p) > 1 and not torch.equal(p, torch.arange(len(p))) for p in perm.values()):
        sd = model.state_dict()
        moved = pm.apply_permutation(spec, perm, sd)
        assert any(not torch.equal(sd[k], moved[k]) for k in spec.keys)


@pytest.mark.parametrize("name", zoo_params())
def test_permutable_fraction_floor_and_no_rule_errors(name):
    """Each model keeps at least its floor of hidden axes permutable, and no rule raised on it
    (a rule that raises is a bug: its spaces would be frozen as RULE_ERROR)."""
    model, _, _, spec = traced(name)
    assert spec.permutable_fraction(model.state_dict()) >= ZOO_BY_NAME[name].min_permutable_fraction - 1e-9
    assert [f.reason for f in spec.frozen if f.kind is FrozenKind.RULE_ERROR] == []


def test_apply_is_pure_and_keeps_keys():
    model, _, _, spec = traced("resnet20")
    sd = model.state_dict()
    before = {k: v.clone() for k, v in sd.items()}
    out = pm.apply_permutation(spec, pm.random_permutation(spec, 3), sd)
    assert list(out) == list(sd)
    assert all(torch.equal(before[k], sd[k]) for k in sd)
    assert all(out[k].shape == sd[k].shape and out[k].dtype == sd[k].dtype for k in sd)


def test_apply_inverse_round_trips_exactly():
    model, _, _, spec = traced("hf_llama")
    sd = model.state_dict()
    p = pm.random_permutation(spec, 7)
    back = pm.apply_permutation(spec, pm.inverse(p), pm.apply_permutation(spec, p, sd))
    assert all(torch.equal(back[k], sd[k]) for k in sd)


def test_apply_rejects_bad_permutations():
    model, _, _, spec = traced("mlp")
    sd = model.state_dict()
    g = spec.groups[0]
    with pytest.raises(SpecError, match="no group named 'nope'"):
        pm.apply_permutation(spec, {"nope": torch.arange(3)}, sd)
    with pytest.raises(SpecError, match=f"group {g.name!r} has shape"):
        pm.apply_permutation(spec, {g.name: torch.arange(g.size + 1)}, sd)
    with pytest.raises(SpecError, match="is not a permutation"):
        pm.apply_permutation(spec, {g.name: torch.zeros(g.size, dtype=torch.long)}, sd)
    with pytest.raises(SpecError, match="lacks tensors"):
        pm.apply_permutation(spec, pm.identity(spec), {k: v for k, v in sd.items() if k != g.members[0].key})


def test_check_names_the_offending_group():
    """A hand-made spec that ties the wrong axes is caught, and the group is named."""
    model = torch.nn.Sequential(torch.nn.Linear(4, 6), torch.nn.ReLU(), torch.nn.Linear(6, 6))
    x = torch.randn(5, 4)
    bad = pm.PermutationSpec.from_axes_to_perm(
        {"0.weight": ("h", None), "0.bias": ("h",), "2.weight": ("out", None)}, model.state_dict()
    )
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(FunctionNotPreservedError, match=r"group 'h' \(size 6\).*freeze=\["):
        check_function_preserved(model, bad, x)
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
