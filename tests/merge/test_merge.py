"""merge / interpolate / merge_models: numeric inputs refused, dtypes kept, inputs never mutated,
every method's permutations checked, and the subpackage importable under its own name."""

from __future__ import annotations

import copy
import dataclasses
import importlib
import math

import pytest
import torch

import permerge as pm
from permerge.errors import FunctionNotPreservedError
from permerge.merge import MergeWeightsError, check_merge_weights
from permerge.merge.combine import merge_models
from permerge.models import VGG
from permerge.spec import PermutationSpec


def test_the_subpackage_is_importable_and_merge_still_callable():
    partial = importlib.import_module("permerge.merge.partial")
    import permerge.merge.partial as by_statement

    assert by_statement is partial and pm.merge.partial is partial and pm.merge.many.merge_many is pm.merge_many
    a, b = {"w": torch.ones(2)}, {"w": torch.zeros(2)}
    assert torch.equal(pm.merge([a, b], [0.25, 0.75])["w"], torch.full((2,), 0.25))


@pytest.mark.parametrize(
    "weights", [[math.nan, math.nan], [math.inf, 0.0], [1.5, -0.5], [0.7, 0.7], [0.5], ["x", 0.5], [-0.0 - 1e-3, 1.001]]
)
def test_merge_weights_must_be_a_convex_combination(weights):
    with pytest.raises(MergeWeightsError):
        check_merge_weights(weights, 2)
    with pytest.raises(MergeWeightsError):
        pm.merge([{"w": torch.ones(1)}, {"w": torch.zeros(1)}], weights)


@pytest.mark.parametrize("alpha", [math.nan, -0.1, 1.1, math.inf])
def test_interpolate_refuses_alpha_outside_the_segment(alpha):
    with pytest.raises(MergeWeightsError, match="alpha must be finite and in \\[0, 1\\]"):
        pm.interpolate({"w": torch.ones(1)}, {"w": torch.zeros(1)}, alpha)


def test_merge_keeps_dtypes_and_never_mutates_inputs():
    a = {"w": torch.ones(3, dtype=torch.float16), "n": torch.tensor(7), "m": torch.tensor([True, False]),
         "q": torch.ones(2, dtype=torch.bfloat16)}  # fmt: skip
    b = {"w": torch.zeros(3, dtype=torch.float16), "n": torch.tensor(9), "m": torch.tensor([False, False]),
         "q": torch.zeros(2, dtype=torch.bfloat16)}  # fmt: skip
    before = copy.deepcopy((a, b))
    out = pm.merge([a, b], [0.5, 0.5])
    assert {k: v.dtype for k, v in out.items()} == {k: v.dtype for k, v in a.items()}
    assert torch.equal(out["n"], torch.tensor(7)) and torch.equal(out["m"], a["m"])  # integers: the first model's
    assert all(torch.equal(x[k], y[k]) for x, y in zip((a, b), before) for k in x)
    out["n"] += 1
    assert int(a["n"]) == 7  # a copy, not the input's tensor


def _vggs():
    torch.manual_seed(0)
    a, b = VGG(widths=(4, 4, 8, 8)).eval(), VGG(widths=(4, 4, 8, 8)).eval()
    with torch.no_grad():  # BatchNorm statistics that are not the constants of a fresh model
        for m in (a, b):
            for name, t in m.state_dict().items():
                if "running" in name or name.endswith("1.weight"):
                    t.copy_(torch.rand_like(t) + 0.5)
    return a, b, torch.randn(3, 1, 28, 28)


@pytest.mark.parametrize("method", ["weight", "many", "c2m3", "average", "partial"])
def test_every_method_checks_its_permutations_and_mutates_nothing(method):
    a, b, x = _vggs()
    before = [copy.deepcopy(m.state_dict()) for m in (a, b)]
    res = merge_models([a, b], x, method=method, budget=1.5 if method == "partial" else 1.0)
    assert isinstance(res.report["function_preservation_error"], float) and res.report["function_preservation_error"] < 1e-4
    assert all(torch.equal(v, sd[k]) for m, sd in zip((a, b), before) for k, v in m.state_dict().items())


@pytest.mark.parametrize("method", ["weight", "many", "c2m3"])
def test_a_corrupted_spec_is_caught_by_every_method(method):
    a, b, x = _vggs()
    spec = pm.trace(a, x)
    g = spec.groups[0]  # the first conv's channels without their BatchNorm
    bad = PermutationSpec(
        (dataclasses.replace(g, members=tuple(ax for ax in g.members if ".1." not in ax.key)), *spec.groups[1:]), spec.frozen
    )
    with pytest.raises(FunctionNotPreservedError, match="model 1|model 0"):
        merge_models([a, b], x, method=method, spec=bad)


def test_ste_leaves_model_a_untouched_batchnorm_counters_included():
    a, b, x = _vggs()
    before = [copy.deepcopy(m.state_dict()) for m in (a, b)]
    data = [(torch.randn(4, 1, 28, 28), torch.randint(0, 10, (4,))) for _ in range(2)]
    res = pm.align(a, b, x, "ste", data=data, steps=3)
    assert res.report["function_preservation_error"] < 1e-4
    for m, sd in zip((a, b), before):
        assert all(torch.equal(v, sd[k]) for k, v in m.state_dict().items()), [k for k, v in m.state_dict().items() if not torch.equal(v, sd[k])]
