"""Transforms beyond permutations: applied exactly, function-preserving for every traced class, validated."""

from __future__ import annotations

import copy
import dataclasses
import functools

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from zoo import ZOO_BY_NAME

import permerge as pm
from permerge.apply import apply_transform
from permerge.check import check_function_preserved
from permerge.errors import FunctionNotPreservedError, SpecError
from permerge.match.symmetry import DENSE, permutation_matrix
from permerge.reparam import fold_gains, gauge, unfold_gains
from permerge.spec import (
    INVERTIBLE,
    ORTHOGONAL,
    PERMUTATION,
    SCALED_PERMUTATION,
    Axis,
    Group,
    PermutationSpec,
)
from permerge.transform import LinearMap, ScaledPermutation, map_blocks, random_transform, resolve_symmetries

# the zoo's transformers (pre-norm with LayerNorm or RMSNorm, GPT-2 with a tied head, post-norm BERT,
# LLaMA with RoPE and grouped-query attention, tied or not) and the ReLU MLP (scaled permutations)
NAMES = ["hf_gpt2", "hf_llama", "hf_llama_tied", "hf_bert", "hf_vit", "transformer_manual_ln",
         "transformer_manual_rms", "transformer_torch", "mlp"]  # fmt: skip


@functools.cache
def prepared(name: str):
    """(model with random norm gains and biases, inputs, kwargs, gauge, classes)."""
    z = ZOO_BY_NAME[name]
    model, inputs = z.build(), z.inputs()
    gen = torch.Generator().manual_seed(5)
    with torch.no_grad():  # gains of 1 and biases of 0 (the initialisation) would hide a missed fold
        for p in model.parameters():
            if p.dim() == 1:
                p.add_(0.5 * torch.randn(p.shape, generator=gen))
    kwargs = z.input_kwargs
    traced = pm.trace_graph(model, inputs, example_kwargs=kwargs)
    spec = traced.spec
    classes = resolve_symmetries(spec, "all")
    return model, inputs, kwargs, gauge(traced, [g for g, c in classes.items() if c in DENSE], spec), classes


def _with(model: torch.nn.Module, sd: dict[str, torch.Tensor]) -> torch.nn.Module:
    out = copy.deepcopy(model)
    out.load_state_dict(sd)
    return out


def test_traced_classes_cover_every_class():
    """The property test below is not vacuous: the tracer grants each class somewhere in the zoo."""
    granted = {c for name in NAMES for c in prepared(name)[4].values()}
    assert granted == {PERMUTATION, SCALED_PERMUTATION, ORTHOGONAL, INVERTIBLE}
    assert prepared("hf_llama")[4]["model.embed_tokens.weight:1"] == ORTHOGONAL  # RMSNorm stream
    assert prepared("hf_vit")[3].keep_ones  # LayerNorm stream: maps keep the all-ones direction
    assert ORTHOGONAL not in prepared("hf_bert")[4].values()  # post-norm: gains feed residual adds
    assert ORTHOGONAL not in prepared("hf_gpt2")[4].values()  # the final norm feeds the tied LM head


@pytest.mark.parametrize("name", NAMES)
@settings(max_examples=3, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(seed=st.integers(0, 2**31 - 1))
def test_random_transform_preserves_function(name, seed):
    """Guarantee 1 for every class: random maps of the traced classes (gains folded) keep every output."""
    model, inputs, kwargs, g, classes = prepared(name)
    folded = _with(model, fold_gains(g, model.state_dict()))
    transform = random_transform(g.spec, seed, keep_ones=g.keep_ones)
    check_function_preserved(folded, g.spec, inputs, transform, example_kwargs=kwargs, tol=1e-5)
    before = folded.state_dict()
    after = apply_transform(g.spec, transform, before)
    assert any((after[k] - before[k]).abs().max() > 1e-3 for k in g.spec.keys)  # it really moved weights
    # and back in the original gauge (what align returns): the same function, the original gains
    restored = _with(model, unfold_gains(g, after, model.state_dict()))
    pm.check.check_same_function(model, restored, inputs, example_kwargs=kwargs, tol=1e-5)
    assert all(torch.equal(restored.state_dict()[x.gain], model.state_dict()[x.gain]) for x in g.gains)


def test_layernorm_streams_need_maps_that_keep_the_ones_direction():
    """The constraint is real: an orthogonal map of a LayerNorm stream that moves 1 changes the output."""
    model, inputs, kwargs, g, classes = prepared("transformer_manual_ln")
    stream = next(iter(g.keep_ones))
    folded = _with(model, fold_gains(g, model.state_dict()))
    free = random_transform(PermutationSpec((g.spec[stream],)), 0)  # Haar, ignores the constraint
    with pytest.raises(FunctionNotPreservedError, match=stream):
        check_function_preserved(folded, g.spec, inputs, free, example_kwargs=kwargs, tol=1e-5)
    kept = random_transform(g.spec, 0, keep_ones=g.keep_ones)[stream]
    ones = torch.ones(g.spec[stream].size, dtype=torch.float64)
    assert torch.allclose(kept.matrix[0] @ ones, ones, atol=1e-12)
    check_function_preserved(folded, g.spec, inputs, {stream: kept}, example_kwargs=kwargs, tol=1e-5)


@pytest.mark.parametrize("name", ["hf_llama", "transformer_manual_ln", "hf_vit"])
def test_fold_preserves_function_and_unfolds_exactly(name):
    model, inputs, kwargs, g, _ = prepared(name)
    sd = model.state_dict()
    folded = fold_gains(g, sd)
    assert g.gains and all(torch.equal(folded[x.gain], torch.ones_like(sd[x.gain])) for x in g.gains)
    pm.check.check_same_function(model, _with(model, folded), inputs, example_kwargs=kwargs, tol=1e-5)
    back = unfold_gains(g, folded, sd)
    assert all(torch.allclose(back[k], sd[k], rtol=1e-5, atol=1e-6) for k in sd)


@pytest.mark.parametrize("name", ["hf_llama", "hf_vit", "hf_gpt2", "mlp"])
def test_permutations_apply_exactly_as_before(name):
    """A transform of index vectors is ``apply_permutation`` bit for bit; the input is not modified."""
    model, _, _, g, _ = prepared(name)
    sd = model.state_dict()
    before = {k: v.clone() for k, v in sd.items()}
    perm = pm.random_permutation(g.spec, 3)
    out = apply_transform(g.spec, perm, sd)
    ref = pm.apply_permutation(g.spec, perm, sd)
    assert list(out) == list(sd) and all(torch.equal(out[k], ref[k]) for k in sd)
    assert all(torch.equal(before[k], sd[k]) for k in sd)
    assert all(out[k].dtype == sd[k].dtype and out[k].shape == sd[k].shape for k in sd)


def test_dense_permutation_matrices_act_like_index_vectors():
    """A LinearMap holding permutation matrices (per head) does what the index vector does."""
    model, _, _, g, classes = prepared("hf_vit")
    sd = fold_gains(g, model.state_dict())
    perm = pm.random_permutation(g.spec, 1)
    dense = {n: LinearMap(permutation_matrix(p, map_blocks(g.spec[n]))) if classes[n] in DENSE else p for n, p in perm.items()}
    out, ref = apply_transform(g.spec, dense, sd), pm.apply_permutation(g.spec, perm, sd)
    assert all(torch.allclose(out[k], ref[k], atol=1e-7) for k in sd)


def test_per_head_maps_follow_grouped_query_heads():
    """Under grouped-query attention the value·output map is one per key/value head."""
    _, _, _, g, classes = prepared("hf_llama")
    vo = [n for n, c in classes.items() if c == INVERTIBLE]
    assert vo and all(map_blocks(g.spec[n]) == 2 for n in vo)  # 2 KV heads, each shared by 2 query heads
    assert {ax.repeat for n in vo for ax in g.spec[n].members} == {2, 4}


def _toy(symmetry: str) -> tuple[PermutationSpec, dict[str, torch.Tensor]]:
    members = (Axis("w1", 0, role="producer"), Axis("b1", 0, role="producer"), Axis("w2", 1, role="consumer"))
    spec = PermutationSpec((Group("h", 3, members, symmetry),))
    return spec, {"w1": torch.randn(3, 2), "b1": torch.randn(3), "w2": torch.randn(4, 3)}


def test_check_transform_rejects_maps_outside_the_class():
    spec, sd = _toy(PERMUTATION)
    eye = LinearMap(torch.eye(3, dtype=torch.float64)[None])
    with pytest.raises(SpecError, match="allows permutation maps, not dense ones"):
        apply_transform(spec, {"h": eye}, sd)
    with pytest.raises(SpecError, match="not scaled permutations"):
        apply_transform(spec, {"h": ScaledPermutation(torch.arange(3), torch.ones(3, dtype=torch.float64))}, sd)
    spec, sd = _toy(ORTHOGONAL)
    with pytest.raises(SpecError, match="is orthogonal but its map is not"):
        apply_transform(spec, {"h": LinearMap(2 * torch.eye(3, dtype=torch.float64)[None])}, sd)
    with pytest.raises(SpecError, match=r"expected \(k, 3, 3\)"):
        apply_transform(spec, {"h": LinearMap(torch.eye(2, dtype=torch.float64)[None])}, sd)
    spec, sd = _toy(SCALED_PERMUTATION)
    with pytest.raises(SpecError, match="finite positive scales"):
        apply_transform(spec, {"h": ScaledPermutation(torch.arange(3), torch.tensor([1.0, -1.0, 1.0]))}, sd)
    hand = PermutationSpec((dataclasses.replace(spec["h"], symmetry=INVERTIBLE, members=(Axis("w1", 0),)),))
    with pytest.raises(SpecError, match="without a producer/consumer role"):
        apply_transform(hand, {"h": eye}, sd)


def test_toy_invertible_map_is_exact():
    """``W2·M⁻¹ · (M·(W1·x + b1))`` equals ``W2·(W1·x + b1)`` for a linear pair."""
    spec, sd = _toy(INVERTIBLE)
    t = random_transform(spec, 4)
    out = apply_transform(spec, t, sd)
    x = torch.randn(5, 2)
    ref = (x @ sd["w1"].T + sd["b1"]) @ sd["w2"].T
    assert torch.allclose((x @ out["w1"].T + out["b1"]) @ out["w2"].T, ref, atol=1e-5)
    assert not torch.allclose(out["w1"], sd["w1"])


def test_resolve_symmetries_follows_the_lattice():
    groups = tuple(Group(c, 2, (Axis(f"w{c}", 0, role="producer"),), c) for c in (PERMUTATION, SCALED_PERMUTATION, ORTHOGONAL, INVERTIBLE))
    spec = PermutationSpec(groups)
    assert resolve_symmetries(spec, "all") == {g.name: g.name for g in groups}
    assert set(resolve_symmetries(spec, "permutation").values()) == {PERMUTATION}
    assert resolve_symmetries(spec, {ORTHOGONAL}) == {
        PERMUTATION: PERMUTATION, SCALED_PERMUTATION: PERMUTATION, ORTHOGONAL: ORTHOGONAL, INVERTIBLE: ORTHOGONAL,
    }  # fmt: skip
    assert resolve_symmetries(spec, {SCALED_PERMUTATION})[INVERTIBLE] == SCALED_PERMUTATION
    with pytest.raises(SpecError, match="unknown symmetry"):
        resolve_symmetries(spec, {"rotation"})


def test_gauge_refuses_gains_that_cannot_fold():
    """Forcing a stream whose final norm feeds a tied head (or whose norms feed residual adds) orthogonal
    fails before any work, naming the gain and the reason."""
    for name, why in (("hf_gpt2", "tied or computed"), ("hf_bert", "not only linear layers")):
        model, inputs, kwargs, _, _ = prepared(name)
        traced = pm.trace_graph(model, inputs, example_kwargs=ZOO_BY_NAME[name].input_kwargs)
        stream = max(traced.spec.groups, key=lambda grp: len(grp.members))
        forced = PermutationSpec(tuple(dataclasses.replace(grp, symmetry=ORTHOGONAL) if grp is stream else grp
                                       for grp in traced.spec.groups), traced.spec.frozen)  # fmt: skip
        with pytest.raises(SpecError, match=why):
            gauge(traced, [stream.name], forced)
