"""Symmetry classes from the tracer: each op's bound, the graph-wide facts, and guarantee 1 for every class."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
from conftest import traced, zoo_params
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from torch import nn
from zoo import randomized

import permerge as pm
from permerge.check import check_function_preserved
from permerge.graph import register_rule
from permerge.graph.rules import RULES
from permerge.match.symmetry import DENSE
from permerge.reparam import fold_gains, gauge
from permerge.spec import INVERTIBLE, ORTHOGONAL, PERMUTATION, SCALED_PERMUTATION, PermutationSpec
from permerge.transform import random_transform, resolve_symmetries

TOL = 2e-4  # as for permutations (test_apply.py): float32 noise of the zoo's deepest nets


def classes(model: nn.Module, *inputs: torch.Tensor) -> dict[str, str]:
    spec = pm.trace(model, inputs, cache=False)
    return {g.name: g.symmetry for g in spec.groups}


def test_unit_nonlinearities_bound_the_class():
    """ReLU units take positive scales, GELU units only permutations, units between two linear layers
    any invertible map (a product of two matrices)."""
    m = nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 8), nn.GELU(), nn.Linear(8, 6), nn.Linear(6, 2))
    assert classes(m, torch.randn(3, 4)) == {"0.weight:0": SCALED_PERMUTATION, "2.weight:0": PERMUTATION,
                                             "4.weight:0": INVERTIBLE}  # fmt: skip


class _Ops(nn.Module):
    """One hidden space per case, between two linear layers, touched by one op."""

    def __init__(self, op):
        super().__init__()
        self.inp, self.out, self.op = nn.Linear(4, 6), nn.Linear(6, 2), op

    def forward(self, x):
        return self.out(self.op(self.inp(x), x))


@pytest.mark.parametrize(("op", "cls"), [
    (lambda h, x: h * 0.5 - h / 3, INVERTIBLE),  # scalings and sums of features
    (lambda h, x: h + 1.0, PERMUTATION),  # a constant added along the units moves with no dense map
    (lambda h, x: h * x.norm(dim=-1, keepdim=True), INVERTIBLE),  # a per-row scalar commutes with linear maps...
    (lambda h, x: F.normalize(h, dim=-1), ORTHOGONAL),  # ...but a Euclidean norm is kept by orthogonal maps only
    (lambda h, x: h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + 1e-6), ORTHOGONAL),  # RMSNorm written out
    (lambda h, x: h - h.mean(-1, keepdim=True), PERMUTATION),  # centring: only maps keeping 1 (not a class)
    (lambda h, x: F.leaky_relu(h, 0.1), SCALED_PERMUTATION),
    (lambda h, x: torch.sigmoid(h) * h, PERMUTATION),  # a gate
    (lambda h, x: torch.cat([h, h], -1)[..., :6], INVERTIBLE),  # moves values only
    (lambda h, x: h.softmax(-1), PERMUTATION),
])  # fmt: skip
def test_elementwise_and_reduction_bounds(op, cls):
    assert classes(_Ops(op), torch.randn(3, 4)) == {"inp.weight:0": cls}


def test_convolutions_pools_and_batchnorm():
    """Convolutions and average pools are linear in the channels, max pools positively homogeneous;
    BatchNorm (statistics per channel) allows permutations only."""
    x = torch.randn(2, 3, 8, 8)
    lin = nn.Sequential(nn.Conv2d(3, 8, 3), nn.AvgPool2d(2), nn.Conv2d(8, 8, 1), nn.ReLU(), nn.MaxPool2d(2), nn.Conv2d(8, 2, 1))
    assert classes(lin, x) == {"0.weight:0": INVERTIBLE, "2.weight:0": SCALED_PERMUTATION}
    bn = nn.Sequential(nn.Conv2d(3, 8, 3), nn.BatchNorm2d(8), nn.Conv2d(8, 2, 1))
    assert classes(bn, x) == {"0.weight:0": PERMUTATION}
    prelu = nn.Sequential(nn.Conv2d(3, 8, 3), nn.PReLU(8), nn.Conv2d(8, 2, 1))  # slopes move with their channels
    assert classes(prelu, x) == {"0.weight:0": SCALED_PERMUTATION}


class _Tied(nn.Module):
    """An autoencoder with tied weights: ``W`` makes the code and ``Wᵀ`` reads it, so ``M = M⁻ᵀ``."""

    def __init__(self):
        super().__init__()
        self.w = nn.Parameter(torch.randn(6, 4))

    def forward(self, x):
        return F.linear(F.linear(x, self.w), self.w.t())


def test_an_axis_that_makes_and_reads_units_is_orthogonal():
    assert classes(_Tied(), torch.randn(3, 4)) == {"w:0": ORTHOGONAL}


class _PreNorm(nn.Module):
    """A pre-norm residual block with a written-out RMSNorm (a gain) and a manual attention."""

    def __init__(self, d=8, heads=2, fold=True, qk_norm=False):
        super().__init__()
        self.embed = nn.Embedding(16, d)
        self.gains = nn.ParameterList([nn.Parameter(torch.rand(d) + 0.5) for _ in range(2)])
        self.q, self.k, self.v, self.o = (nn.Linear(d, d) for _ in range(4))
        self.head, self.heads, self.fold, self.qk_norm = nn.Linear(d, 16), heads, fold, qk_norm

    def norm(self, x, i):
        return self.gains[i] * (x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + 1e-6))

    def forward(self, tokens):
        x = self.embed(tokens)
        h = self.norm(x, 0)
        b, t, d = h.shape
        q, k, v = (f(h).view(b, t, self.heads, -1).transpose(1, 2) for f in (self.q, self.k, self.v))
        if self.qk_norm:
            q, k = F.layer_norm(q, q.shape[-1:]), F.layer_norm(k, k.shape[-1:])
        att = (q @ k.transpose(-1, -2) / 2.0).softmax(-1)
        x = x + self.o((att @ v).transpose(1, 2).reshape(b, t, d))
        return self.head(self.norm(x, 1) if self.fold else F.gelu(self.norm(x, 1)))


def test_transformer_block_classes_and_key_side():
    """The stream is orthogonal when the gain folds, query·key and value·output per head invertible,
    heads permuted; the key projection's rows are the key side (``dual``, maps act as ``M⁻ᵀ``)."""
    tokens = torch.randint(0, 16, (2, 5))
    spec = pm.trace(_PreNorm(), tokens, cache=False)
    got = {g.name: g.symmetry for g in spec.groups}
    assert got == {"embed.weight:1": ORTHOGONAL, "q.weight:0#0": PERMUTATION, "q.weight:0#1": INVERTIBLE,
                   "v.weight:0#1": INVERTIBLE}  # fmt: skip
    qk = spec["q.weight:0#1"]
    assert {a.key for a in qk.members if a.contravariant} == {"k.weight", "k.bias"}
    assert not any(a.dual for g in spec.groups if g.name != "q.weight:0#1" for a in g.members)
    # the stream's gain feeds a GELU: it cannot fold, so the stream keeps permutations
    assert pm.trace(_PreNorm(fold=False), tokens, cache=False)["embed.weight:1"].symmetry == PERMUTATION
    # a norm between the projections and the product: nothing proves a map of the key side
    assert pm.trace(_PreNorm(qk_norm=True), tokens, cache=False)["q.weight:0#1"].symmetry == PERMUTATION


def test_packed_projection_marks_only_the_key_slice():
    """GPT-2's packed q/k/v: the query·key group is invertible and only the key slice is dual."""
    _, _, _, spec = traced("hf_gpt2")
    qk = next(g for g in spec.groups if g.symmetry == INVERTIBLE and any(a.dual for a in g.members))
    width = next(a for a in qk.members if not a.dual and a.key.endswith("c_attn.weight")).extent(qk.size)
    assert {(a.key.rsplit(".", 1)[1], a.offset >= width) for a in qk.members} == {("weight", False), ("weight", True),
                                                                                ("bias", False), ("bias", True)}
    assert all(a.dual == (a.offset >= width) for a in qk.members)


def test_a_rule_that_says_nothing_allows_permutations_only():
    """A user's rule states no allowance: every space it touches keeps permutations."""
    m = nn.Sequential(nn.Linear(4, 8), nn.Hardtanh(), nn.Linear(8, 2))
    x = torch.randn(3, 4)
    old = RULES.get(torch.ops.aten.hardtanh)
    try:
        register_rule(torch.ops.aten.hardtanh)(lambda c: c.dims(c.arg(0)))
        assert classes(m, x) == {"0.weight:0": PERMUTATION}
        register_rule(torch.ops.aten.hardtanh)(lambda c: c.linear(c.dims(c.arg(0))))  # wrong, but what it says
        assert classes(m, x) == {"0.weight:0": INVERTIBLE}
    finally:
        RULES[torch.ops.aten.hardtanh] = old


def test_classes_and_key_sides_survive_json():
    _, _, _, spec = traced("hf_gpt2")
    back = PermutationSpec.from_json(spec.to_json())
    assert back == spec and INVERTIBLE in {g.symmetry for g in back.groups}
    assert any(a.dual for g in back.groups for a in g.members)


@pytest.mark.parametrize("name", zoo_params())
@settings(max_examples=2, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(seed=st.integers(0, 2**31 - 1))
def test_random_transform_of_traced_classes_preserves_outputs(name, seed):
    """Guarantee 1 for every class the tracer grants, over the whole zoo: on a copy with norm
    statistics, affines and biases redrawn and the dense groups' gains folded, a random map of each
    group's class (Haar orthogonal, well-conditioned invertible, positive scales) keeps every output."""
    model, inputs, kwargs, _ = traced(name)
    model = randomized(model, seed)
    tr = pm.trace_graph(model, inputs, example_kwargs=kwargs)
    dense = [n for n, c in resolve_symmetries(tr.spec, "all").items() if c in DENSE]
    g = gauge(tr, dense, tr.spec)
    folded = copy.deepcopy(model)
    folded.load_state_dict(fold_gains(g, model.state_dict()))
    transform = random_transform(g.spec, seed, keep_ones=g.keep_ones)
    report = check_function_preserved(folded, g.spec, inputs, transform, example_kwargs=kwargs, tol=TOL)
    assert report.relative_error <= TOL
