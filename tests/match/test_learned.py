"""Learned matchers (STE, Sinkhorn re-basin): valid, function-preserving permutations that never
score worse than weight matching's on their selection batches; inputs untouched."""

from __future__ import annotations

import copy

import pytest
import torch
from conftest import traced
from test_align import _digits, _train_digits_mlp

import permerge as pm
from permerge.errors import PermergeError
from permerge.match import sinkhorn_matching, ste_matching
from permerge.match.learned import PathLoss
from permerge.permutation import check_permutation

MATCHERS = {"ste": ste_matching, "sinkhorn": sinkhorn_matching}


@pytest.fixture(scope="module")
def digits_pair():
    x, y, tr, _ = _digits()
    a, b = (_train_digits_mlp(s, x, y, tr, epochs=5) for s in (0, 1))
    data = [(x[tr[i : i + 100]], y[tr[i : i + 100]]) for i in range(0, 1000, 100)]
    return a, b, data


@pytest.mark.parametrize("method", ["ste", "sinkhorn"])
def test_learned_permutation_is_valid_preserves_function_and_beats_weight_matching(method, digits_pair):
    a, b, data = digits_pair
    res = pm.align(a, b, data[0][0], method, data=data, steps=40, seed=0, quiet=True)
    assert res.report["function_preservation_error"] < 1e-5
    check_permutation(res.spec, res.permutation)
    assert res.report["best_loss"] < res.report["start_loss"]  # moved off weight matching's optimum, for the better
    wm = pm.align(a, b, data[0][0], quiet=True)
    assert any(not torch.equal(res.permutation[g], wm.permutation[g]) for g in res.spec.names)
    path = PathLoss(a, torch.nn.functional.cross_entropy)  # the reported loss is the permutation's
    with torch.no_grad():
        mid = sum(float(path(res.model.state_dict(), batch, 0.5)) for batch in data[:4]) / 4
    assert mid == pytest.approx(res.report["best_loss"], rel=1e-5)
    assert len(res.report["losses"]) == 40 and all(torch.isfinite(torch.tensor(res.report["losses"])))


@pytest.mark.parametrize("method", ["ste", "sinkhorn"])
def test_inputs_and_batchnorm_counters_are_never_modified(method):
    model, x, _, spec = traced("vgg")
    a, b = copy.deepcopy(model).train(), copy.deepcopy(model)
    b.load_state_dict(pm.apply_permutation(spec, pm.random_permutation(spec, 1), model.state_dict()))
    gen = torch.Generator().manual_seed(0)
    data = [(torch.randn(8, 1, 28, 28, generator=gen), torch.randint(0, 10, (8,), generator=gen)) for _ in range(3)]
    before = [{k: v.clone() for k, v in m.state_dict().items()} for m in (a, b)]
    res = MATCHERS[method](spec, a, b, data, steps=3, quiet=True)
    check_permutation(spec, res.permutation)
    assert a.training and not b.training
    for m, sd in zip((a, b), before):
        assert all(torch.equal(sd[k], v) for k, v in m.state_dict().items())  # num_batches_tracked included


def test_sinkhorn_acts_on_heads_and_head_dims():
    model, x, _, spec = traced("transformer_torch")  # heads x head_dim groups share q/k/v rows
    b = copy.deepcopy(model)
    b.load_state_dict(pm.apply_permutation(spec, pm.random_permutation(spec, 2), model.state_dict()))
    gen = torch.Generator().manual_seed(0)
    data = [(torch.randint(0, 64, (4, 8), generator=gen), torch.zeros(4)) for _ in range(2)]
    res = pm.align(model, b, x, "sinkhorn", data=data, steps=4, loss_fn=lambda out, _: out.float().square().mean(),
                   quiet=True)  # fmt: skip
    assert res.report["function_preservation_error"] < 1e-5
    aligned = res.model.state_dict()  # a permuted copy: the learned permutation must still recover it
    assert all(torch.equal(aligned[k], v) for k, v in model.state_dict().items())


@pytest.mark.parametrize("method", ["ste", "sinkhorn"])
def test_errors_before_any_work(method):
    a, b = (pm.models.MLP(in_features=8, hidden=(4,), num_classes=2) for _ in range(2))
    spec = pm.trace(a, torch.randn(2, 8))
    with pytest.raises(PermergeError, match=r"needs \(inputs, targets\) batches"):
        MATCHERS[method](spec, a, b, [torch.randn(2, 8)], steps=1)
    with pytest.raises(PermergeError, match="got no data"):
        MATCHERS[method](spec, a, b, [], steps=1)
    with pytest.raises(ValueError, match="steps must be >= 0"):
        MATCHERS[method](spec, a, b, [(torch.randn(2, 8), torch.zeros(2, dtype=torch.long))], steps=-1)
