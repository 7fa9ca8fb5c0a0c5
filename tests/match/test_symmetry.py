"""Guarantee 2 beyond permutations: a planted transform of every traced class is recovered, from weights
and from activations; the generalised alignment is never worse than permutations; align wires it up."""

from __future__ import annotations

import copy

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from test_transform import NAMES, _with, prepared
from zoo import ZOO_BY_NAME, two_seeds

import permerge as pm
from permerge.apply import apply_transform
from permerge.errors import IllConditionedError, PermergeError
from permerge.match.symmetry import transform_activation_matching, transform_weight_matching
from permerge.reparam import fold_gains
from permerge.spec import INVERTIBLE, Axis, Group, PermutationSpec
from permerge.transform import LinearMap, random_transform


def _worst(aligned: dict[str, torch.Tensor], a: dict[str, torch.Tensor], keys) -> float:
    """Largest per-tensor error relative to the tensor's largest entry."""
    return max(((aligned[k] - a[k]).abs().max() / a[k].abs().max().clamp_min(1e-12)).item() for k in keys)


@pytest.mark.parametrize("name", NAMES)
@settings(max_examples=2, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(seed=st.integers(0, 2**31 - 1))
def test_weight_matching_recovers_a_planted_transform(name, seed):
    """B = T(A) for a random T of every traced class (orthogonal streams, invertible per-head maps
    with permuted heads, scaled and plain permutations): aligning B gives A's weights back."""
    model, _, _, g, _ = prepared(name)
    a = fold_gains(g, model.state_dict())
    b = apply_transform(g.spec, random_transform(g.spec, seed, keep_ones=g.keep_ones), a)
    res = transform_weight_matching(g.spec, a, b, keep_ones=g.keep_ones, quiet=True)
    assert _worst(apply_transform(g.spec, res.transform, b), a, g.spec.keys) < 1e-3
    assert res.distance_after <= 1e-8 * res.distance_before


@pytest.mark.parametrize("name", ["hf_llama", "hf_vit", "transformer_manual_rms"])
def test_activation_matching_recovers_a_planted_transform(name):
    """From activations: heads re-paired by what they write, then each map solved from cross-moments
    at the affine layers' inputs and outputs (LLaMA: RMSNorm stream, grouped-query value·output maps).
    The default ridge pulls invertible maps towards orthogonal ones (what merges trained models
    best); a planted non-orthogonal map is recovered exactly once that pull is negligible."""
    model, _, kwargs, g, _ = prepared(name)
    a = fold_gains(g, model.state_dict())
    b = apply_transform(g.spec, random_transform(g.spec, 1, keep_ones=g.keep_ones), a)
    example = ZOO_BY_NAME[name].inputs()[0]
    gen = torch.Generator().manual_seed(1)
    make = (lambda: torch.randint(0, 64, (4, 8), generator=gen)) if example.dtype == torch.long else (
        lambda: torch.randn((4, *example.shape[1:]), generator=gen))  # fmt: skip
    data = [(make(),) for _ in range(6)]
    res = transform_activation_matching(_with(model, a), _with(model, b), g.spec, data, keep_ones=g.keep_ones,
                                        example_kwargs=kwargs, regularization=1e-9, quiet=True)  # fmt: skip
    assert _worst(apply_transform(g.spec, res.transform, b), a, g.spec.keys) < 1e-3


def test_generalised_matching_is_never_worse_than_permutations():
    """Two differently initialised models: the descent starts at permutation matching and only improves."""
    model, _, _, g, classes = prepared("hf_vit")
    other = copy.deepcopy(model)
    with torch.no_grad():
        for p in other.parameters():
            p.copy_(torch.randn_like(p) * p.std().clamp_min(0.1))
    a, b = fold_gains(g, model.state_dict()), fold_gains(g, other.state_dict())
    res = transform_weight_matching(g.spec, a, b, keep_ones=g.keep_ones, quiet=True)
    assert res.distance_after < res.permutation_distance <= res.distance_before
    assert any(isinstance(t, LinearMap) for t in res.transform.values())
    assert set(res.permutation) == {n for n, c in classes.items() if c == "permutation"}


def test_ill_conditioned_maps_are_refused():
    """A least-squares map beyond ``max_condition`` raises, naming the group and the fix."""
    members = (Axis("w1", 0, role="producer"), Axis("w2", 1, role="consumer"))
    spec = PermutationSpec((Group("h", 3, members, INVERTIBLE),))
    a = {"w1": torch.randn(3, 8), "w2": torch.randn(5, 3)}
    stretch = LinearMap(torch.diag(torch.tensor([1.0, 1.0, 50.0], dtype=torch.float64))[None])
    b = apply_transform(spec, {"h": stretch}, a)
    with pytest.raises(IllConditionedError, match=r"group 'h'.*condition number .*raise regularization"):
        transform_weight_matching(spec, a, b, max_condition=10.0, quiet=True)
    res = transform_weight_matching(spec, a, b, quiet=True)  # a condition of 50 is fine by default
    assert _worst(apply_transform(spec, res.transform, b), a, a) < 1e-6


@pytest.mark.parametrize("method", ["weight", "activation"])
def test_align_beyond_permutations(method):
    """``align(..., symmetries="all")``: same class and keys, same function as B, A's norm gains, inputs
    untouched; the result merges and interpolates like any aligned model (at α=1 it is B)."""
    a, b, x, kwargs = two_seeds("transformer_manual_ln")
    spec = pm.trace(a, x, example_kwargs=kwargs)
    before = {k: v.clone() for k, v in b.state_dict().items()}
    data = [(torch.randint(0, 64, (4, 8), generator=torch.Generator().manual_seed(i)),) for i in range(3)]
    res = pm.align(a, b, x, method, spec=spec, symmetries="all", data=data if method == "activation" else None, quiet=True)
    assert type(res.model) is type(b) and list(res.model.state_dict()) == list(b.state_dict())
    assert res.report["function_preservation_error"] < 1e-5 and res.report["end_to_end_error"] < 1e-5
    assert res.report["class_counts"] == {"invertible": 4, "orthogonal": 1, "permutation": 4}
    assert all(torch.equal(before[k], v) for k, v in b.state_dict().items())
    sd = res.model.state_dict()
    assert all(torch.equal(sd[k], a.state_dict()[k]) for k in res.report["folded_gains"])
    assert any(isinstance(t, LinearMap) for t in res.transform.values())
    merged = pm.merge([a, res.model])
    assert list(merged.state_dict()) == list(a.state_dict())
    tokens = data[0][0]
    curve = pm.interpolation_curve(a, res.model, [(tokens, tokens[:, 0] % 64)], alphas=[0.0, 1.0], metrics={},
                                   loss_fn=lambda out, y: torch.nn.functional.cross_entropy(out[:, 0], y))  # fmt: skip
    ref = torch.nn.functional.cross_entropy(b(tokens)[:, 0], tokens[:, 0] % 64).item()
    assert curve.values["data"]["loss"][1] == pytest.approx(ref, rel=1e-4)


def test_align_refuses_unsupported_requests_before_work():
    a, b, x, kwargs = two_seeds("transformer_manual_ln")
    spec = pm.trace(a, x, example_kwargs=kwargs)
    with pytest.raises(PermergeError, match="'ste' aligns permutations only"):
        pm.align(a, b, x, "ste", spec=spec, symmetries="all", data=[])
    with pytest.raises(PermergeError, match="needs data"):
        pm.align(a, b, x, "activation", spec=spec, symmetries="all")
    res = pm.align(a, b, x, spec=spec, symmetries="permutation", quiet=True)  # the default path, unchanged
    assert res.transform is None and "total_after" in res.report
