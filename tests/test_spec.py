"""PermutationSpec: JSON round trips, Git Re-Basin axes_to_perm import/export, validation."""

from __future__ import annotations

import dataclasses

import pytest
import torch
from conftest import traced, zoo_params

import permerge as pm
from permerge.errors import FunctionNotPreservedError, SpecError
from permerge.spec import Axis, Group, PermutationSpec


@pytest.mark.parametrize("name", zoo_params())
def test_json_round_trip(name):
    model, _, _, spec = traced(name)
    back = PermutationSpec.from_json(spec.to_json())
    assert back == spec
    back.validate(model.state_dict())


def _mlp():
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Linear(4, 6), torch.nn.ReLU(), torch.nn.Linear(6, 3)).eval()


AXES_TO_PERM = {"0.weight": ("P0", None), "0.bias": ("P0",), "2.weight": (None, "P0"), "2.bias": (None,)}


def test_axes_to_perm_import_matches_trace_and_exports_back():
    model = _mlp()
    sd = model.state_dict()
    spec = PermutationSpec.from_axes_to_perm(AXES_TO_PERM, sd)
    traced_spec = pm.trace(model, torch.randn(2, 4))
    # the same axes (a hand-written spec does not know which axes read and which produce)
    assert {a for g in spec.groups for a in g.members} == {
        dataclasses.replace(a, role=None) for g in traced_spec.groups for a in g.members
    }
    assert {a.role for g in traced_spec.groups for a in g.members} == {"producer", "consumer"}
    assert spec.to_axes_to_perm(sd) == {k: v for k, v in AXES_TO_PERM.items() if any(v)}
    assert pm.validate_spec(spec, model, torch.randn(2, 4)).relative_error < 1e-5


@pytest.mark.parametrize(
    ("axes", "message"),
    [
        ({"0.wieght": ("P0", None)}, "names '0.wieght', which is not in the state dict"),
        ({"0.weight": ("P0",)}, r"has 1 entries but the tensor has shape \(6, 4\)"),
        ({"0.weight": ("P0", "P0")}, "group 'P0' has size 6 elsewhere but '0.weight' dim 1 has length 4"),
    ],
)
def test_axes_to_perm_errors(axes, message):
    with pytest.raises(SpecError, match=message):
        PermutationSpec.from_axes_to_perm(axes, _mlp().state_dict())


def test_override_that_breaks_the_function_is_rejected_and_model_untouched():
    model = _mlp()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    typo = dict(AXES_TO_PERM, **{"2.weight": (None, None)})  # forgot the consumer of P0
    spec = PermutationSpec.from_axes_to_perm(typo, model.state_dict())
    with pytest.raises(FunctionNotPreservedError, match="group 'P0'"):
        pm.validate_spec(spec, model, torch.randn(2, 4))
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())


def test_validate_reports_every_mismatch_sorted():
    spec = PermutationSpec((Group("h", 6, (Axis("0.weight", 0), Axis("2.weight", 1, block=2), Axis("zz", 0))),))
    with pytest.raises(SpecError) as e:
        spec.validate(_mlp().state_dict())
    text = str(e.value)
    assert "'2.weight' dim 1 has length 6 but the axis needs 12" in text
    assert "tensor 'zz' is not in the state dict" in text


def test_malformed_json_and_duplicates():
    with pytest.raises(SpecError, match="not valid JSON"):
        PermutationSpec.from_json("{")
    with pytest.raises(SpecError, match="not a permerge spec"):
        PermutationSpec.from_json('{"groups": [{"name": "x"}]}')
    with pytest.raises(SpecError, match="duplicate group name 'x'"):
        PermutationSpec((Group("x", 2, ()), Group("x", 2, ())))


def test_without_freezes_named_groups():
    _, _, _, spec = traced("mlp")
    name = spec.groups[0].name
    less = spec.without([name])
    assert name not in less and any(f.reason == f"frozen by user ({name})" for f in less.frozen)
    with pytest.raises(SpecError, match="no group named 'bogus'; groups are"):
        spec.without(["bogus"])


def test_attention_layouts_cannot_be_exported_as_axes_to_perm():
    model, _, _, spec = traced("hf_gpt2")
    with pytest.raises(SpecError, match="axes_to_perm cannot express"):
        spec.to_axes_to_perm(model.state_dict())
