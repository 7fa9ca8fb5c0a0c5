"""align(), merge(), merge_many() and activation/STE matching end to end."""

from __future__ import annotations

import copy

import pytest
import torch
from conftest import traced

import permerge as pm
from permerge.errors import PermergeError, StateDictMismatchError, TraceError
from permerge.evaluate import interpolation_curve
from permerge.match import UnknownMatcherError
from permerge.models import MLP, VGG


def _pair(factory, seeds=(0, 1)):
    out = []
    for s in seeds:
        torch.manual_seed(s)
        out.append(factory().eval())
    return out


def _digits():
    datasets = pytest.importorskip("sklearn.datasets")
    d = datasets.load_digits()
    x = torch.tensor(d.data, dtype=torch.float32) / 16.0
    y = torch.tensor(d.target)
    idx = torch.randperm(len(x), generator=torch.Generator().manual_seed(0))
    return x, y, idx[:1400], idx[1400:]


def _train_digits_mlp(seed, x, y, train_idx, epochs=20):
    torch.manual_seed(seed)
    model = MLP(in_features=64, hidden=(256, 256), num_classes=10)
    opt = torch.optim.Adam(model.parameters(), 1e-3)
    gen = torch.Generator().manual_seed(seed)
    for _ in range(epochs):
        order = train_idx[torch.randperm(len(train_idx), generator=gen)]
        for i in range(0, len(order), 32):
            b = order[i : i + 32]
            loss = torch.nn.functional.cross_entropy(model(x[b]), y[b])
            opt.zero_grad()
            loss.backward()
            opt.step()
    return model.eval()


def test_weight_matching_closes_the_barrier_on_trained_mlps():
    """Two MLPs trained from different seeds on sklearn's digits: Git Re-Basin's headline result."""
    x, y, tr, te = _digits()
    a, b = (_train_digits_mlp(s, x, y, tr) for s in (0, 1))
    test = [(x[te], y[te])]
    naive = interpolation_curve(a, b, test).loss_barrier
    res = pm.align(a, b, x[:2])
    aligned = interpolation_curve(a, res.model, test).loss_barrier
    assert naive > 0.1  # the models really are in different basins before alignment
    assert aligned <= 0.02
    assert aligned <= naive / 10


def test_align_returns_copy_same_keys_and_report():
    a, b = _pair(lambda: VGG(widths=(4, 4, 8, 8)))
    x = torch.randn(2, 1, 28, 28)
    before = {k: v.clone() for k, v in b.state_dict().items()}
    res = pm.align(a, b, x)
    assert type(res.model) is VGG and list(res.model.state_dict()) == list(b.state_dict())
    assert all(torch.equal(before[k], v) for k, v in b.state_dict().items())  # B untouched
    r = res.report
    assert r["method"] == "weight" and r["groups"] == len(res.spec.groups) == 5
    assert r["function_preservation_error"] < 1e-5 and r["converged"]
    assert r["total_after"] >= r["total_before"]
    with torch.no_grad():  # the aligned copy computes B's function
        assert torch.allclose(res.model(x), b(x), atol=1e-5)


@pytest.mark.parametrize("method", ["weight", "activation"])
def test_align_recovers_a_permuted_copy(method):
    model, x, _, spec = traced("resnet20")
    perm = pm.random_permutation(spec, 5)
    b = copy.deepcopy(model)
    b.load_state_dict(pm.apply_permutation(spec, perm, model.state_dict()))
    data = [torch.randn(16, 1, 28, 28, generator=torch.Generator().manual_seed(i)) for i in range(3)]
    res = pm.align(model, b, x, method, spec=spec, data=data)
    for k, v in model.state_dict().items():
        assert torch.equal(res.model.state_dict()[k], v), k


def _batch_like(x, seed):
    gen = torch.Generator().manual_seed(seed)
    if x.dtype == torch.long:
        return torch.randint(0, 64, (8, *x.shape[1:]), generator=gen)
    return torch.randn(8, *x.shape[1:], generator=gen)


def test_activation_matching_aligns_activations_across_the_zoo():
    """On a permuted copy, matched units have identical activations (dead units may swap)."""
    from permerge.graph import trace_graph
    from permerge.match.activation import record

    for name in ("mlp", "densenet", "unet", "hf_llama", "hf_gpt2", "transformer_torch"):
        model, x, kwargs, spec = traced(name)
        b = copy.deepcopy(model)
        b.load_state_dict(pm.apply_permutation(spec, pm.random_permutation(spec, 1), model.state_dict()))
        data = [_batch_like(x[0], seed) for seed in range(4)]
        res = pm.activation_matching(model, b, spec, data, example_kwargs=kwargs)
        aligned = pm.apply_permutation(spec, res.permutation, b.state_dict())
        traced_graph = trace_graph(model, (data[0],), example_kwargs=kwargs)
        sites = {s.axis.key for g in spec.groups for s in traced_graph.sites[g.name]}
        got_a = record(traced_graph, model.state_dict(), (data[0],), kwargs, sites)
        got_b = record(traced_graph, aligned, (data[0],), kwargs, sites)
        for k in sites:
            assert torch.allclose(got_a[k], got_b[k], atol=1e-5), (name, k)


def test_ste_matching_returns_a_valid_function_preserving_permutation():
    a, b = _pair(lambda: MLP(in_features=16, hidden=(16, 16), num_classes=3))
    gen = torch.Generator().manual_seed(0)
    data = [(torch.randn(32, 16, generator=gen), torch.randint(0, 3, (32,), generator=gen)) for _ in range(4)]
    res = pm.align(a, b, data[0][0], "ste", data=data, steps=8, lr=1e-2)
    assert len(res.report["losses"]) == 8 and all(torch.isfinite(torch.tensor(res.report["losses"])))
    assert res.report["function_preservation_error"] < 1e-5


@pytest.mark.parametrize(
    ("b_factory", "error", "message"),
    [
        (lambda: VGG(widths=(4, 4, 8, 8)), StateDictMismatchError, "different classes: MLP vs VGG"),
        (lambda: MLP(in_features=16, hidden=(8,), num_classes=3), StateDictMismatchError, "different shapes"),
    ],
)
def test_align_rejects_different_architectures(b_factory, error, message):
    a = MLP(in_features=16, hidden=(4,), num_classes=3)
    with pytest.raises(error, match=message):
        pm.align(a, b_factory(), torch.randn(2, 16))


def test_align_rejects_nan_weights_bad_inputs_and_unknown_method():
    a, b = _pair(lambda: MLP(in_features=16, hidden=(8,), num_classes=3))
    x = torch.randn(2, 16)
    with torch.no_grad():
        b.net[1].weight[0, 0] = float("nan")
    with pytest.raises(StateDictMismatchError, match=r"non-finite \(NaN or inf\) weights in model B\['net.1.weight'\]"):
        pm.align(a, b, x)
    b = copy.deepcopy(a)
    with pytest.raises(TraceError, match="forward failed on the example input"):
        pm.align(a, b, torch.randn(2, 5))
    with pytest.raises(UnknownMatcherError, match="registered: activation, sinkhorn, ste, weight"):
        pm.align(a, b, x, "annealing")
    with pytest.raises(PermergeError, match="activation matching needs data"):
        pm.align(a, b, x, "activation")


def test_merge_weights_and_endpoints():
    a, b = _pair(lambda: MLP(in_features=16, hidden=(8,), num_classes=3))
    for k, v in pm.interpolate(a, b, 0.0).state_dict().items():
        assert torch.equal(v, a.state_dict()[k])
    mid = pm.merge([a, b]).state_dict()
    for k in mid:
        assert torch.allclose(mid[k], (a.state_dict()[k] + b.state_dict()[k]) / 2)
    with pytest.raises(ValueError, match="sum to 1"):
        pm.merge([a, b], [0.7, 0.7])
    with pytest.raises(ValueError, match="2 weights for 1 models"):
        pm.merge([a], [0.5, 0.5])


def test_merge_many_of_permuted_copies_recovers_the_model():
    model, x, _, spec = traced("vgg")
    copies = []
    for seed in range(3):
        c = copy.deepcopy(model)
        c.load_state_dict(pm.apply_permutation(spec, pm.random_permutation(spec, seed), model.state_dict()))
        copies.append(c)
    res = pm.merge_many(copies, x, spec=spec)
    assert res.converged
    with torch.no_grad():
        assert torch.allclose(res.merged(*x), model(*x), atol=1e-5)
    for c, p in zip(copies, res.permutations):  # each permutation maps its model to the shared basis
        shared = pm.apply_permutation(spec, p, c.state_dict())
        assert all(torch.allclose(shared[k], res.merged.state_dict()[k], atol=1e-6) for k in shared)
