"""Guarantee 1: applying any permutation of a traced spec leaves the model's function unchanged."""

from __future__ import annotations

import copy

import pytest
import torch
from conftest import traced
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from zoo import ZOO

import permerge as pm
from permerge.check import check_function_preserved
from permerge.errors import FunctionNotPreservedError, SpecError

NAMES = [z.name for z in ZOO]


@pytest.mark.parametrize("name", NAMES)
@settings(max_examples=4, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(seed=st.integers(0, 2**31 - 1))
def test_random_permutation_preserves_outputs(name, seed):
    model, inputs, kwargs, spec = traced(name)
    perm = pm.random_permutation(spec, seed)
    permuted = copy.deepcopy(model)
    permuted.load_state_dict(pm.apply_permutation(spec, perm, model.state_dict()))
    with torch.no_grad():
        a, b = model(*inputs, **kwargs), permuted(*inputs, **kwargs)
    a = a if isinstance(a, torch.Tensor) else a[0]
    b = b if isinstance(b, torch.Tensor) else b[0]
    scale = a.abs().max().item()
    assert (a - b).abs().max().item() <= 1e-5 * max(scale, 1.0)
    # the permutation really moved weights (the test would be vacuous otherwise)
    if any(len(p) > 1 and not torch.equal(p, torch.arange(len(p))) for p in perm.values()):
        sd, sd2 = model.state_dict(), permuted.state_dict()
        assert any(not torch.equal(sd[k], sd2[k]) for k in spec.keys)


@pytest.mark.parametrize("name", NAMES)
def test_permutable_fraction_floor(name):
    model, _, _, spec = traced(name)
    floor = next(z for z in ZOO if z.name == name).min_permutable_fraction
    assert spec.permutable_fraction(model.state_dict()) >= floor - 1e-9


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
