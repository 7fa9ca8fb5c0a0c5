"""REPAIR: sites found in the graph, endpoints unchanged, statistics hit their targets, barriers shrink."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import permerge as pm
from permerge.evaluate import evaluate, interpolation_curve
from permerge.graph import trace_graph
from permerge.models import MLP, VGG, ResNet20
from permerge.repair import repair, repair_sites, repair_transform, reset_bn_stats


def _seeded(factory, seed):
    torch.manual_seed(seed)
    return factory().eval()


def _data(shape, n_batches=3, batch=32, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [(torch.randn(batch, *shape, generator=g), torch.randint(0, 10, (batch,), generator=g)) for _ in range(n_batches)]


class AddmmNet(nn.Module):
    """Linear layers written as addmm: transposed (nn.Linear layout) and HF Conv1D layout (in, out)."""

    def __init__(self):
        super().__init__()
        self.w1, self.b1 = nn.Parameter(torch.randn(16, 8) / 3), nn.Parameter(torch.randn(16))
        self.w2, self.b2 = nn.Parameter(torch.randn(16, 12) / 4), nn.Parameter(torch.randn(12))
        self.head = nn.Linear(12, 3)

    def forward(self, x):
        h = torch.relu(torch.addmm(self.b1, x, self.w1.t()))
        h = torch.relu(torch.addmm(self.b2, h, self.w2))
        return self.head(h)


class TiedNet(nn.Module):
    def __init__(self):
        super().__init__()
        self.a = nn.Linear(6, 6)
        self.b = nn.Linear(6, 6)
        self.b.weight = self.a.weight
        self.out = nn.Linear(6, 2)

    def forward(self, x):
        return self.out(torch.relu(self.b(torch.relu(self.a(x)))))


def _sites(model, x, **kw):
    return repair_sites(trace_graph(model, x), **kw)


def test_sites_are_found_in_the_graph_for_each_layer_kind():
    mlp = _sites(MLP(in_features=10, hidden=(8, 8)), torch.randn(2, 10))
    assert [(s.weight, s.bias, s.channel_dim, s.weight_dim) for s in mlp] == [
        ("net.1.weight", "net.1.bias", -1, 0), ("net.3.weight", "net.3.bias", -1, 0)]  # fmt: skip
    assert [s.weight for s in _sites(MLP(in_features=10, hidden=(8,)), torch.randn(2, 10), include_outputs=True)] == [
        "net.1.weight", "net.3.weight"]  # fmt: skip
    bn = _sites(VGG((4, 4, 8, 8)), torch.randn(2, 1, 28, 28))
    assert [s.weight for s in bn] == [f"features.{i}.1.weight" for i in (0, 1, 3, 4)] + ["classifier.1.weight"]
    assert bn[0].running == ("features.0.1.running_mean", "features.0.1.running_var")  # bias-free convs are skipped
    plain = _sites(VGG((4, 4, 8, 8), norm="none"), torch.randn(2, 1, 28, 28))
    assert [s.weight for s in plain] == [f"features.{i}.0.weight" for i in (0, 1, 3, 4)] + ["classifier.1.weight"]
    ln = _sites(ResNet20(norm="ln"), torch.randn(2, 1, 28, 28))
    assert len(ln) == 21 and all(s.channel_dim == 1 and "conv" not in s.weight for s in ln)  # stem + 9 blocks x 2 + 2 shortcuts
    seq = _sites(nn.Sequential(nn.Linear(4, 5), nn.LayerNorm(5), nn.ReLU(), nn.Linear(5, 2)), torch.randn(2, 4))
    assert [s.weight for s in seq] == ["0.weight", "1.weight"]
    addmm = _sites(AddmmNet(), torch.randn(2, 8))
    assert [(s.weight, s.weight_dim) for s in addmm] == [("w1", 0), ("w2", 1)]
    assert [s.weight for s in _sites(TiedNet(), torch.randn(2, 6))] == []  # a tied weight cannot take two corrections


@pytest.mark.parametrize(
    "factory, shape",
    [
        (lambda: MLP(in_features=20, hidden=(16, 16, 16)), (20,)),
        (lambda: VGG((4, 4, 8, 8), norm="none"), (1, 28, 28)),
        (lambda: ResNet20(norm="ln"), (1, 16, 16)),
        (AddmmNet, (8,)),
    ],
    ids=["mlp", "vgg-none", "resnet20-ln", "addmm"],
)
def test_repair_leaves_the_endpoints_unchanged(factory, shape):
    a, b = _seeded(factory, 0), _seeded(factory, 1)
    data = _data(shape)
    x = torch.randn(16, *shape)
    fix = repair_transform(a, b, data)
    for alpha, model in ((0.0, a), (1.0, b)):
        merged = pm.interpolate(a, b, alpha)
        fixed = fix(merged, alpha)
        with torch.no_grad():
            assert torch.allclose(fixed(x), model(x), atol=1e-4, rtol=1e-4)


def test_repair_on_a_bn_net_at_an_endpoint_is_a_bn_reset():
    a, b = _seeded(lambda: VGG((4, 4, 8, 8)), 0), _seeded(lambda: VGG((4, 4, 8, 8)), 1)
    data = _data((1, 28, 28), n_batches=1, batch=64)
    fixed = repair(a, b, pm.interpolate(a, b, 0.0), data, alpha=0.0)
    reset = reset_bn_stats(a, data, batches=1)
    x = torch.randn(8, 1, 28, 28)
    with torch.no_grad():
        assert torch.allclose(fixed(x), reset(x), atol=1e-5, rtol=1e-5)


def test_repair_on_a_net_whose_every_site_is_a_bn_is_a_bn_reset_at_every_alpha():
    """REPAIR measures BN nets as a BN reset does (train mode), so where every site is a BatchNorm
    (a ResNet-20: bias-free convs, the logits excluded) it changes nothing a BN reset would not."""
    a, b = _seeded(lambda: ResNet20(), 0), _seeded(lambda: ResNet20(), 1)
    data = _data((1, 16, 16), n_batches=3, batch=32)
    x = torch.randn(8, 1, 16, 16)
    fix = repair_transform(a, b, data, batches=3)
    for alpha in (0.3, 0.5):
        merged = pm.interpolate(a, b, alpha)
        fixed, reset = fix(merged, alpha), reset_bn_stats(merged, data, batches=3)
        with torch.no_grad():
            assert torch.allclose(fixed(x), reset(x), atol=1e-4, rtol=1e-4)
        for k, v in reset.state_dict().items():
            if v.is_floating_point():  # not num_batches_tracked, which REPAIR leaves as merged
                torch.testing.assert_close(fixed.state_dict()[k], v, atol=1e-4, rtol=1e-4, msg=k)


def _hidden_stats(model, data, types=(nn.Linear,)):
    """Per-channel mean/std of every hidden layer's output (not the logits), over all of data."""
    outs: dict[str, list[torch.Tensor]] = {}
    mods = [(n, m) for n, m in model.named_modules() if isinstance(m, types)][:-1]
    hooks = [m.register_forward_hook(lambda m, i, o, n=n: outs.setdefault(n, []).append(o)) for n, m in mods]
    with torch.no_grad():
        for x, _ in data:
            model(x)
    for h in hooks:
        h.remove()
    res = {}
    for n, vs in outs.items():
        v = torch.cat(vs).double()
        res[n] = (v.mean(0), v.std(0, unbiased=False))
    return res


def test_repaired_statistics_match_the_interpolated_targets_at_every_site():
    """All sites at once, measured on the finished model: holds only if each site was measured with
    the upstream corrections already in place."""
    a, b = _seeded(lambda: MLP(in_features=20, hidden=(32, 32, 32)), 0), _seeded(lambda: MLP(in_features=20, hidden=(32, 32, 32)), 1)
    data = _data((20,), n_batches=4, batch=64)
    fixed = repair(a, b, pm.interpolate(a, b, 0.3), data, alpha=0.3)
    sa, sb, sf = _hidden_stats(a, data), _hidden_stats(b, data), _hidden_stats(fixed, data)
    assert len(sf) == 3
    for n, (mean, std) in sf.items():
        torch.testing.assert_close(mean, 0.7 * sa[n][0] + 0.3 * sb[n][0], atol=1e-4, rtol=1e-4)
        torch.testing.assert_close(std, 0.7 * sa[n][1] + 0.3 * sb[n][1], atol=1e-4, rtol=1e-4)


def test_repair_returns_a_copy_with_the_same_class_and_keys_and_leaves_inputs_alone():
    a, b = _seeded(lambda: VGG((4, 4, 8, 8)), 0), _seeded(lambda: VGG((4, 4, 8, 8)), 1)
    merged = pm.interpolate(a, b, 0.5)
    before = [{k: v.clone() for k, v in m.state_dict().items()} for m in (a, b, merged)]
    fixed = repair(a, b, merged, _data((1, 28, 28), n_batches=2))
    assert type(fixed) is VGG and list(fixed.state_dict()) == list(merged.state_dict())
    for m, sd in zip((a, b, merged), before):
        assert all(torch.equal(sd[k], v) for k, v in m.state_dict().items())
    changed = [k for k, v in fixed.state_dict().items() if not torch.equal(v, merged.state_dict()[k])]
    assert "features.0.1.running_var" in changed and "features.0.1.weight" in changed
    assert "features.0.0.weight" not in changed  # bias-free conv: the BN after it carries the correction


def test_repair_without_sites_warns_and_returns_an_equal_copy(caplog):
    a, b = _seeded(TiedNet, 0), _seeded(TiedNet, 1)
    merged = pm.interpolate(a, b, 0.5)
    fixed = repair(a, b, merged, _data((6,)))
    assert fixed is not merged and "no repairable site" in caplog.text
    assert all(torch.equal(v, merged.state_dict()[k]) for k, v in fixed.state_dict().items())


def test_repair_rejects_empty_data():
    a = MLP(in_features=4, hidden=(4,))
    with pytest.raises(pm.PermergeError, match="no batches"):
        repair(a, a, a, [])


def _digits():
    datasets = pytest.importorskip("sklearn.datasets")
    d = datasets.load_digits()
    x = (torch.tensor(d.data, dtype=torch.float32) / 16.0 - 0.3) / 0.4
    y = torch.tensor(d.target)
    idx = torch.randperm(len(x), generator=torch.Generator().manual_seed(0))
    return x, y, idx[:1400], idx[1400:]


def _train(seed, x, y, tr, hidden=(64, 64, 64, 64), epochs=10):
    torch.manual_seed(seed)
    model = MLP(in_features=64, hidden=hidden, num_classes=10)
    opt = torch.optim.Adam(model.parameters(), 1e-3)
    gen = torch.Generator().manual_seed(seed)
    for _ in range(epochs):
        order = tr[torch.randperm(len(tr), generator=gen)]
        for i in range(0, len(order) - 31, 32):
            bi = order[i : i + 32]
            loss = nn.functional.cross_entropy(model(x[bi]), y[bi])
            opt.zero_grad()
            loss.backward()
            opt.step()
    return model.eval()


def test_repair_reduces_the_midpoint_loss_of_a_trained_pair():
    """Two deep no-norm MLPs trained on digits: REPAIR lowers the aligned midpoint and barrier."""
    x, y, tr, te = _digits()
    a, b = _train(0, x, y, tr), _train(1, x, y, tr)
    b = pm.align(a, b, x[:2]).model
    train = [(x[tr[i : i + 200]], y[tr[i : i + 200]]) for i in range(0, 1400, 200)]
    test = [(x[te], y[te])]
    mid = evaluate(pm.interpolate(a, b, 0.5), test, nn.functional.cross_entropy, {})["loss"]
    fixed = repair(a, b, pm.interpolate(a, b, 0.5), train)
    repaired = evaluate(fixed, test, nn.functional.cross_entropy, {})["loss"]
    assert repaired < mid - 0.02
    aligned = interpolation_curve(a, b, test, alphas=5)
    with_repair = interpolation_curve(a, b, test, alphas=5, transform=repair_transform(a, b, train))
    assert with_repair.loss_barrier < aligned.loss_barrier
    assert with_repair.values["data"]["loss"][0] == pytest.approx(aligned.values["data"]["loss"][0], abs=1e-5)


# -- correlation-gated REPAIR ------------------------------------------------------------------


def test_correlation_is_pearson_per_channel():
    from permerge.repair import _correlation

    g = torch.Generator().manual_seed(0)
    a = torch.randn(500, 3, generator=g)
    b = torch.stack([2 * a[:, 0] + 1, -a[:, 1], torch.full((500,), 3.0)], dim=1)
    torch.testing.assert_close(_correlation(a, b), torch.tensor([1.0, -1.0, 0.0], dtype=torch.float64))


def test_gate_below_every_correlation_is_plain_repair_and_above_every_one_changes_nothing():
    a, b = _seeded(lambda: MLP(in_features=20, hidden=(32, 32)), 0), _seeded(lambda: MLP(in_features=20, hidden=(32, 32)), 1)
    data = _data((20,), n_batches=3, batch=64)
    merged = pm.interpolate(a, b, 0.4)
    plain = repair(a, b, merged, data, alpha=0.4).state_dict()
    every = repair(a, b, merged, data, alpha=0.4, min_correlation=-1.0).state_dict()
    none = repair(a, b, merged, data, alpha=0.4, min_correlation=1.0).state_dict()
    assert all(torch.equal(plain[k], every[k]) for k in plain)
    assert all(torch.equal(merged.state_dict()[k], none[k]) for k in none)


def test_gate_repairs_exactly_the_correlated_channels():
    """B = A with half of the first layer's units perturbed a little (correlated) and the rest
    unrelated: only the correlated half is corrected."""
    a = _seeded(lambda: MLP(in_features=20, hidden=(16,)), 0)
    b = _seeded(lambda: MLP(in_features=20, hidden=(16,)), 1)
    g = torch.Generator().manual_seed(2)
    with torch.no_grad():
        b.net[1].weight[:8] = a.net[1].weight[:8] + 0.5 * a.net[1].weight[:8].std() * torch.randn(8, 20, generator=g)
    data = _data((20,), n_batches=4, batch=64)
    merged = pm.interpolate(a, b, 0.5)
    fixed = repair(a, b, merged, data, min_correlation=0.5)
    w0, w1 = merged.net[1].weight, fixed.net[1].weight
    assert torch.equal(w1[8:], w0[8:])  # unrelated units: left as merged
    scale = (w1[:8] / w0[:8]).mean(1)
    assert (scale > 1.001).all()  # correlated units: variance collapse undone (std scaled up)
    assert torch.equal(repair(a, b, merged, data).net[1].weight[:8], w1[:8])  # as plain REPAIR does


@pytest.mark.parametrize("bad", [float("nan"), 1.5, -2.0])
def test_gate_outside_minus_one_to_one_is_rejected(bad):
    from permerge.errors import PermergeError

    a, b = _seeded(lambda: MLP(in_features=20, hidden=(8,)), 0), _seeded(lambda: MLP(in_features=20, hidden=(8,)), 1)
    with pytest.raises(PermergeError, match="min_correlation must be a correlation"):
        repair(a, b, pm.interpolate(a, b, 0.5), _data((20,)), min_correlation=bad)


def test_repair_merge_of_n_models_hits_the_weighted_mean_statistics():
    models = [_seeded(lambda: MLP(in_features=20, hidden=(32, 32, 32)), s) for s in range(3)]
    data = _data((20,), n_batches=4, batch=64)
    weights = [0.5, 0.3, 0.2]
    fixed = pm.repair_merge(models, pm.merge(models, weights), data, weights=weights)
    stats = [_hidden_stats(m, data) for m in models]
    for n, (mean, std) in _hidden_stats(fixed, data).items():
        torch.testing.assert_close(mean, sum(w * s[n][0] for w, s in zip(weights, stats)), atol=1e-4, rtol=1e-4)
        torch.testing.assert_close(std, sum(w * s[n][1] for w, s in zip(weights, stats)), atol=1e-4, rtol=1e-4)


def test_repair_merge_of_two_is_repair_and_bad_weights_are_refused():
    a, b = (_seeded(lambda: VGG((4, 4, 8, 8)), s) for s in (0, 1))
    data = _data((1, 28, 28), n_batches=2)
    merged = pm.interpolate(a, b, 0.3)
    two = pm.repair_merge([a, b], merged, data, weights=[0.7, 0.3])
    ref = repair(a, b, merged, data, alpha=0.3)
    for k, v in ref.state_dict().items():
        assert torch.equal(two.state_dict()[k], v), k
    for bad in ([0.5, 0.6], [float("nan"), 1.0], [1.2, -0.2], [1.0]):
        with pytest.raises(pm.PermergeError, match="weights"):
            pm.repair_merge([a, b], merged, data, weights=bad)
    with pytest.raises(pm.PermergeError, match="at least two"):
        pm.repair_merge([a], merged, data)


def test_repair_and_bn_reset_pass_example_kwargs_to_every_call():
    """An HF causal LM must run with use_cache=False; REPAIR and BN reset take it as example_kwargs."""
    transformers = pytest.importorskip("transformers")
    cfg = transformers.GPT2Config(vocab_size=64, n_embd=32, n_layer=2, n_head=4, n_positions=16, bos_token_id=0,
                                  eos_token_id=0)  # fmt: skip
    a, b = (_seeded(lambda: transformers.GPT2LMHeadModel(cfg), s) for s in (0, 1))
    gen = torch.Generator().manual_seed(0)
    data = [torch.randint(0, 64, (4, 8), generator=gen) for _ in range(3)]
    kwargs = {"use_cache": False}
    fixed = repair(a, b, pm.interpolate(a, b, 0.5), data, example_kwargs=kwargs)
    assert sorted(fixed.state_dict()) == sorted(a.state_dict())
    with torch.no_grad():
        assert torch.isfinite(fixed(data[0], use_cache=False).logits).all()
    same = reset_bn_stats(a, data, example_kwargs=kwargs)  # no BatchNorm: an equal copy
    assert all(torch.equal(v, a.state_dict()[k]) for k, v in same.state_dict().items())
