"""Barriers on hand-made curves (exact numbers), interpolation curves, and BatchNorm reset."""

from __future__ import annotations

import json

import pytest
import torch
from torch import nn

import permerge as pm
from permerge.evaluate import Curve, barrier, evaluate, interpolation_curve
from permerge.repair import reset_bn_stats

ALPHAS = (0.0, 0.25, 0.5, 0.75, 1.0)
# endpoints' line for loss: 1.0, 1.25, 1.5, 1.75, 2.0 → excess 0, 0.75, 2.5, 0.75, 0
LOSS = (1.0, 2.0, 4.0, 2.5, 2.0)
# endpoints' line for accuracy: 0.9, 0.875, 0.85, 0.825, 0.8 → deficit 0, 0.075, 0.35, 0.125, 0
ACC = (0.9, 0.8, 0.5, 0.7, 0.8)


def _curve():
    return Curve(ALPHAS, {"test": {"loss": LOSS, "accuracy": ACC}, "train": {"loss": (0.5, 0.5, 0.5, 0.5, 0.5), "accuracy": ACC}})


def test_barrier_is_the_worst_excess_over_the_endpoints_line():
    assert barrier(LOSS, ALPHAS) == pytest.approx(2.5, abs=1e-12)
    assert barrier(ACC, ALPHAS, higher_is_better=True) == pytest.approx(0.35, abs=1e-12)
    # the worst point need not be the midpoint
    assert barrier((0.0, 3.0, 1.0, 1.0, 0.0), ALPHAS) == pytest.approx(3.0)
    # a convex path (below the line everywhere) has barrier exactly 0: the endpoints count
    assert barrier((1.0, 0.5, 0.2, 0.5, 1.0), ALPHAS) == 0.0
    assert barrier((0.5, 0.9, 0.95, 0.9, 0.5), ALPHAS, higher_is_better=True) == 0.0


def test_curve_barriers_midpoint_gap_and_datasets():
    c = _curve()
    assert c.loss_barrier == pytest.approx(2.5) and c.accuracy_barrier == pytest.approx(0.35)  # first dataset
    assert c.barrier("loss", "train") == 0.0
    assert c.midpoint_gap("loss") == pytest.approx(4.0 - 1.5)
    assert c.midpoint_gap("accuracy") == pytest.approx(0.5 - 0.85)


def test_curve_serialises_to_json_and_csv():
    d = json.loads(_curve().to_json())
    assert d["alphas"] == list(ALPHAS) and d["values"]["test"]["loss"] == list(LOSS)
    assert d["summary"]["test"]["loss"]["barrier"] == pytest.approx(2.5)
    assert d["summary"]["test"]["accuracy"]["barrier"] == pytest.approx(0.35)
    rows = _curve().to_csv().strip().splitlines()
    assert rows[0] == "dataset,metric,0,0.25,0.5,0.75,1"
    assert rows[1] == "test,loss,1,2,4,2.5,2"
    assert len(rows) == 5


def _blobs(n=600, seed=0):
    g = torch.Generator().manual_seed(seed)
    y = torch.randint(0, 3, (n,), generator=g)
    centres = torch.tensor([[2.0, 0.0, 0.0, 1.0], [0.0, 2.0, 0.0, -1.0], [0.0, 0.0, 2.0, 0.0]])
    x = centres[y] * 3 + 5 + torch.randn(n, 4, generator=g)  # offset and scale: BN statistics matter
    return x, y


def _bn_net(seed=0):
    torch.manual_seed(seed)
    net = nn.Sequential(nn.Linear(4, 16), nn.BatchNorm1d(16), nn.ReLU(), nn.Linear(16, 3))
    x, y = _blobs()
    opt = torch.optim.Adam(net.parameters(), 1e-2)
    net.train()
    for _ in range(60):
        for i in range(0, len(x), 100):
            loss = nn.functional.cross_entropy(net(x[i : i + 100]), y[i : i + 100])
            opt.zero_grad()
            loss.backward()
            opt.step()
    return net.eval()


def test_bn_reset_restores_accuracy_after_the_buffers_are_garbled():
    net = _bn_net()
    x, y = _blobs(seed=1)
    data = [(x[i : i + 100], y[i : i + 100]) for i in range(0, len(x), 100)]
    good = evaluate(net, data, nn.functional.cross_entropy, {"accuracy": pm.evaluate.accuracy})["accuracy"]
    assert good > 0.95
    broken = pm.merge([net], [1.0])  # a copy
    bn = broken[1]
    with torch.no_grad():
        bn.running_mean.copy_(torch.randn(16, generator=torch.Generator().manual_seed(0)) * 20)
        bn.running_var.fill_(1e-2)
    bad = evaluate(broken, data, nn.functional.cross_entropy, {"accuracy": pm.evaluate.accuracy})["accuracy"]
    assert bad < 0.7
    fixed = reset_bn_stats(broken, data, batches=6)
    assert not fixed.training and fixed[1].momentum == bn.momentum
    assert torch.equal(bn.running_var, torch.full((16,), 1e-2))  # the input model is untouched
    restored = evaluate(fixed, data, nn.functional.cross_entropy, {"accuracy": pm.evaluate.accuracy})["accuracy"]
    assert restored == pytest.approx(good, abs=0.01)


def test_interpolation_curve_endpoints_and_identical_models():
    net = _bn_net()
    x, y = _blobs(seed=1)
    data = {"test": [(x, y)], "half": [(x[:300], y[:300])]}
    c = interpolation_curve(net, net, data, alphas=3)
    assert c.alphas == (0.0, 0.5, 1.0) and set(c.values) == {"test", "half"}
    losses = c.values["test"]["loss"]
    assert losses[0] == pytest.approx(losses[1]) == pytest.approx(losses[2])
    assert c.loss_barrier == pytest.approx(0.0, abs=1e-6)
    ref = evaluate(net, [(x, y)], nn.functional.cross_entropy, {})["loss"]
    assert losses[0] == pytest.approx(ref)
    seen = []
    interpolation_curve(net, net, [(x, y)], alphas=(0.0, 0.3, 1.0), transform=lambda m, a: seen.append(a) or m)
    assert seen == [0.0, 0.3, 1.0]


def test_compare_curves_names_the_curves_and_keeps_endpoints():
    from permerge.demo import compare_curves
    from permerge.models import VGG

    torch.manual_seed(0)
    a = VGG((4, 4, 8, 8)).eval()
    torch.manual_seed(1)
    b = VGG((4, 4, 8, 8)).eval()
    g = torch.Generator().manual_seed(0)
    data = [(torch.randn(16, 1, 28, 28, generator=g), torch.randint(0, 10, (16,), generator=g)) for _ in range(2)]
    curves = compare_curves(a, b, data, data[0][0][:2], alphas=3, bn_batches=2, repair_batches=2)
    assert list(curves) == ["naive", "aligned", "aligned+BN reset", "aligned+REPAIR"]
    assert curves["naive"].values["data"]["loss"][-1] == pytest.approx(curves["aligned"].values["data"]["loss"][-1], abs=1e-5)
    given = compare_curves(a, b, data, None, aligned=b, bn_batches=0, repair=False, alphas=3, labels={"aligned": "as-is"})
    assert list(given) == ["naive", "as-is"] and given["as-is"].values == given["naive"].values
