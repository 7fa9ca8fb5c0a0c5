"""Barriers on hand-made curves (exact numbers, both definitions), metrics with explicit directions,
model outputs of every shape, causal-LM token metrics, interpolation curves, and BatchNorm reset."""

from __future__ import annotations

import json
import math
import types

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

import permerge as pm
from permerge.errors import PermergeError
from permerge.evaluate import (
    ACCURACY,
    BARRIERS,
    Curve,
    Metric,
    barrier,
    call_kwargs,
    causal_lm_loss,
    evaluate,
    interpolation_curve,
    logits,
    metric_set,
    metrics_for,
)
from permerge.repair import reset_bn_stats

ALPHAS = (0.0, 0.25, 0.5, 0.75, 1.0)
# endpoints' line for loss: 1.0, 1.25, 1.5, 1.75, 2.0 → excess 0, 0.75, 2.5, 0.75, 0
LOSS = (1.0, 2.0, 4.0, 2.5, 2.0)
# endpoints' line for accuracy: 0.9, 0.875, 0.85, 0.825, 0.8 → deficit 0, 0.075, 0.35, 0.125, 0
ACC = (0.9, 0.8, 0.5, 0.7, 0.8)
# endpoints far apart: line 1, 1.5, 2, 2.5, 3 → excess 0, 0, 0, 1, 0 (line: 1.0);
# mean 2 → excess -1, -0.5, 0, 1.5, 1 (mean: 1.5, above ½|L(A) − L(B)| = 1)
SKEWED_LOSS = (1.0, 1.5, 2.0, 3.5, 3.0)
# line 1, .875, .75, .625, .5 → deficit 0, .125, .25, .375, 0 (line: 0.375); mean .75 → -.25, 0, .25, .5, .25 (mean: 0.5)
SKEWED_ACC = (1.0, 0.75, 0.5, 0.25, 0.5)


def _curve():
    return Curve(
        ALPHAS,
        {"test": {"loss": LOSS, "accuracy": ACC}, "train": {"loss": (0.5, 0.5, 0.5, 0.5, 0.5), "accuracy": ACC}},
        {"accuracy": True},
    )


def test_both_barrier_definitions_on_hand_made_curves():
    assert barrier(LOSS, ALPHAS) == barrier(LOSS, ALPHAS, definition="line") == pytest.approx(2.5, abs=1e-12)
    assert barrier(LOSS, ALPHAS, definition="mean") == pytest.approx(2.5, abs=1e-12)  # equal-ish endpoints, same peak
    assert barrier(ACC, ALPHAS, higher_is_better=True) == pytest.approx(0.35, abs=1e-12)
    assert barrier(ACC, ALPHAS, higher_is_better=True, definition="mean") == pytest.approx(0.35, abs=1e-12)
    assert barrier(SKEWED_LOSS, ALPHAS, definition="line") == 1.0
    assert barrier(SKEWED_LOSS, ALPHAS, definition="mean") == 1.5
    assert barrier(SKEWED_ACC, ALPHAS, higher_is_better=True, definition="line") == 0.375
    assert barrier(SKEWED_ACC, ALPHAS, higher_is_better=True, definition="mean") == 0.5
    # the worst point need not be the midpoint
    assert barrier((0.0, 3.0, 1.0, 1.0, 0.0), ALPHAS) == pytest.approx(3.0)
    # a convex path (below the line everywhere) has line barrier exactly 0: the endpoints count;
    # the mean definition is then ½|L(A) − L(B)| at the worse endpoint
    assert barrier((1.0, 0.5, 0.2, 0.5, 1.0), ALPHAS) == 0.0
    assert barrier((1.0, 0.5, 0.2, 0.5, 2.0), ALPHAS, definition="mean") == 0.5
    assert barrier((0.5, 0.9, 0.95, 0.9, 0.5), ALPHAS, higher_is_better=True) == 0.0
    assert set(BARRIERS) == {"line", "mean"}
    assert "Entezari" in BARRIERS["line"].citation and "Git Re-Basin" in BARRIERS["mean"].citation


def test_barrier_errors_name_the_fix():
    with pytest.raises(PermergeError, match="unknown barrier definition 'rebasin'; choose from line, mean"):
        barrier(LOSS, ALPHAS, definition="rebasin")
    with pytest.raises(PermergeError, match="one value per α"):
        barrier(LOSS[:3], ALPHAS)


@settings(max_examples=60, deadline=None)
@given(st.lists(st.floats(-1e3, 1e3), min_size=2, max_size=12))
def test_barrier_definitions_relate_through_the_endpoint_gap(values):
    alphas = [i / (len(values) - 1) for i in range(len(values))]
    line, mean = barrier(values, alphas), barrier(values, alphas, definition="mean")
    half_gap = 0.5 * abs(values[0] - values[-1])
    assert line >= 0.0  # the endpoints sit on their own line
    assert mean >= half_gap - 1e-9  # the worse endpoint sits ½|gap| above the mean
    assert abs(mean - line) <= half_gap + 1e-9  # the two references differ by (α − ½)(L(B) − L(A))
    # accuracy is the loss with the sign flipped
    assert barrier([-v for v in values], alphas, higher_is_better=True) == pytest.approx(line, abs=1e-9)


def test_curve_barriers_need_an_explicit_dataset_when_there_are_several():
    c = _curve()
    with pytest.raises(PermergeError, match=r"datasets \['test', 'train'\]: name one"):
        _ = c.loss_barrier
    assert c.barrier("loss", "test") == pytest.approx(2.5) and c.barrier("accuracy", "test") == pytest.approx(0.35)
    assert c.barrier("loss", "train") == 0.0 and c.barrier("loss", "train", "mean") == 0.0
    assert c.midpoint_gap("loss", "test") == pytest.approx(4.0 - 1.5)
    assert c.midpoint_gap("accuracy", "test") == pytest.approx(0.5 - 0.85)
    with pytest.raises(PermergeError, match="no dataset 'val'"):
        c.barrier("loss", "val")
    one = Curve(ALPHAS, {"test": {"loss": SKEWED_LOSS, "accuracy": SKEWED_ACC}}, {"accuracy": True})
    assert one.loss_barrier == 1.0 and one.accuracy_barrier == 0.375  # one dataset: no ambiguity


def test_metric_directions_are_stated_never_guessed_from_names():
    top1 = Curve(ALPHAS, {"test": {"loss": LOSS, "top1": SKEWED_ACC}}, {"top1": True})
    assert top1.barrier("top1") == 0.375  # higher-is-better because it says so, whatever its name
    as_loss = Curve(ALPHAS, {"test": {"loss": LOSS, "accuracy": SKEWED_LOSS}}, {"accuracy": False})
    assert as_loss.barrier("accuracy") == 1.0  # a metric named "accuracy" declared lower-is-better is treated so
    unstated = Curve(ALPHAS, {"test": {"loss": LOSS, "accuracy": ACC}})
    with pytest.raises(PermergeError, match=r"does not state whether 'accuracy'.*higher_is_better=\{'accuracy': True\}"):
        unstated.barrier("accuracy")
    assert unstated.loss_barrier == pytest.approx(2.5)  # the loss is lower-is-better by contract
    assert list(unstated.summary()["test"]) == ["loss"]  # no barrier for a metric of unknown direction


def test_metric_set_resolution_and_errors():
    assert list(metric_set()) == ["loss", "accuracy"] and metric_set()["accuracy"] is ACCURACY
    assert list(metric_set("causal-lm")) == ["loss", "perplexity", "token_accuracy"]
    assert [m.higher_is_better for m in metric_set("causal-lm").values()] == [False, False, True]
    assert metric_set({"accuracy": pm.evaluate.accuracy})["accuracy"] is ACCURACY  # the built-in function, by identity
    top1 = Metric.mean(lambda out, y: (out.argmax(-1) == y).float().mean(), higher_is_better=True)
    resolved = metric_set({"top1": top1})
    assert list(resolved) == ["loss", "top1"] and resolved["top1"] is top1 and not resolved["loss"].higher_is_better
    with pytest.raises(PermergeError, match=r"metric 'top1' is a plain function.*Metric.mean\(fn, higher_is_better"):
        metric_set({"top1": lambda out, y: (out.argmax(-1) == y).float().mean()})
    with pytest.raises(PermergeError, match="unknown metric set 'lm'; choose from classification, causal-lm"):
        metric_set("lm")
    with pytest.raises(PermergeError, match="the loss is given twice"):
        metric_set("causal-lm", nn.functional.mse_loss)


def test_curve_serialises_to_json_and_csv_and_back():
    d = json.loads(_curve().to_json())
    assert d["alphas"] == list(ALPHAS) and d["values"]["test"]["loss"] == list(LOSS)
    assert d["summary"]["test"]["loss"]["barrier"] == {"line": pytest.approx(2.5), "mean": pytest.approx(2.5)}
    assert d["summary"]["test"]["accuracy"]["barrier"]["line"] == pytest.approx(0.35)
    assert d["higher_is_better"] == {"loss": False, "accuracy": True}
    assert set(d["barrier_definitions"]) == {"line", "mean"}
    back = Curve.from_dict(d)
    assert back == _curve() and back.barrier("accuracy", "test") == pytest.approx(0.35)
    with pytest.raises(PermergeError, match="not a curve"):
        Curve.from_dict({"alphas": [0, 1]})
    rows = _curve().to_csv().strip().splitlines()
    assert rows[0] == "dataset,metric,0,0.25,0.5,0.75,1"
    assert rows[1] == "test,loss,1,2,4,2.5,2"
    assert len(rows) == 5


class _Out:
    def __init__(self, t):
        self.logits = t


def test_logits_understands_every_output_shape():
    t = torch.randn(2, 3)
    assert logits(t) is t
    assert logits((t, torch.zeros(1))) is t and logits([t]) is t
    assert logits({"loss": torch.zeros(()), "logits": t}) is t
    assert logits(_Out(t)) is t
    transformers = pytest.importorskip("transformers")
    out = transformers.modeling_outputs.CausalLMOutputWithPast(logits=t)
    assert logits(out) is t
    with pytest.raises(PermergeError, match=r"a dict \(keys \['hidden'\]\).*'logits'"):
        logits({"hidden": t})
    with pytest.raises(PermergeError, match="cannot find the predictions"):
        logits("text")


def test_causal_lm_loss_shifts_and_ignores_padding():
    g = torch.Generator().manual_seed(0)
    out = torch.randn(2, 5, 7, generator=g)
    ids = torch.randint(0, 7, (2, 5), generator=g)
    labels = ids.clone()
    labels[1, 3:] = -100  # padding at the end of the second row
    # by hand: position t predicts token t+1; 4 + 2 = 6 scored tokens
    logp = out.log_softmax(-1)
    terms = [-logp[0, t, ids[0, t + 1]] for t in range(4)] + [-logp[1, t, ids[1, t + 1]] for t in range(2)]
    assert float(causal_lm_loss(out, labels)) == pytest.approx(float(sum(terms) / 6), rel=1e-6)
    assert float(causal_lm_loss(torch.zeros(1, 3, 4), ids[:1, :3] % 4)) == pytest.approx(math.log(4), rel=1e-6)
    with pytest.raises(PermergeError, match=r"logits \(batch, seq, vocab\) and labels \(batch, seq\)"):
        causal_lm_loss(torch.zeros(2, 7), ids[:, 0])


class _Table(nn.Module):
    """Logits read from a fixed table by token id: known numbers, no training."""

    def __init__(self, table):
        super().__init__()
        self.table = nn.Parameter(table)

    def forward(self, ids):
        return self.table[ids]


def test_token_metrics_pool_tokens_over_batches_of_different_lengths():
    g = torch.Generator().manual_seed(1)
    model = _Table(torch.randn(6, 6, generator=g))
    short = torch.randint(0, 6, (1, 3), generator=g)  # 2 scored tokens
    long = torch.randint(0, 6, (2, 9), generator=g)  # 16 scored tokens
    vals = evaluate(model, [(short, short), (long, long)], metrics="causal-lm")
    with torch.no_grad():
        total = causal_lm_loss(model(short), short) * 2 + causal_lm_loss(model(long), long) * 16
        hits = sum(int((model(x)[:, :-1].argmax(-1) == x[:, 1:]).sum()) for x in (short, long))
    assert vals["loss"] == pytest.approx(float(total) / 18, rel=1e-6)  # per token, not a mean of batch means
    assert vals["perplexity"] == pytest.approx(math.exp(float(total) / 18), rel=1e-6)  # exp of the pooled loss
    assert vals["token_accuracy"] == pytest.approx(hits / 18)
    with pytest.raises(PermergeError, match="evaluation data is empty"):
        evaluate(model, [], metrics="causal-lm")


def _tiny_llama(seed: int):
    transformers = pytest.importorskip("transformers")
    cfg = transformers.LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
                                   num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64)  # fmt: skip
    torch.manual_seed(seed)
    return transformers.LlamaForCausalLM(cfg).eval()


def test_evaluate_matches_hugging_face_own_causal_lm_loss():
    model = _tiny_llama(0)
    ids = torch.randint(0, 64, (3, 12), generator=torch.Generator().manual_seed(0))
    labels = ids.clone()
    labels[2, 8:] = -100
    assert call_kwargs(model) == {"use_cache": False} and call_kwargs(nn.Linear(2, 2)) == {}
    cached_config_only = nn.Linear(2, 2)
    cached_config_only.config = types.SimpleNamespace(use_cache=True)  # a config flag its forward does not take
    assert call_kwargs(cached_config_only) == {}
    assert metrics_for(model) == "causal-lm" and metrics_for(nn.Linear(2, 2)) == "classification"
    vals = evaluate(model, [({"input_ids": ids}, labels)], metrics="causal-lm")
    with torch.no_grad():
        hf = model(input_ids=ids, labels=labels, use_cache=False).loss
    assert vals["loss"] == pytest.approx(float(hf), rel=1e-5)
    assert vals["perplexity"] == pytest.approx(math.exp(float(hf)), rel=1e-5)
    assert evaluate(model, [(ids, labels)], metrics="causal-lm")["loss"] == pytest.approx(vals["loss"], rel=1e-6)


def test_interpolation_curve_of_a_causal_lm_reports_perplexity_barriers():
    a, b = _tiny_llama(0), _tiny_llama(1)
    g = torch.Generator().manual_seed(0)
    data = {"train": [(torch.randint(0, 64, (2, 10), generator=g),) * 2], "test": [(torch.randint(0, 64, (2, 10), generator=g),) * 2]}
    c = interpolation_curve(a, b, data, alphas=3, metrics="causal-lm")
    assert c.higher_is_better == {"loss": False, "perplexity": False, "token_accuracy": True}
    ends = evaluate(a, data["test"], metrics="causal-lm"), evaluate(b, data["test"], metrics="causal-lm")
    assert c.values["test"]["perplexity"][0] == pytest.approx(ends[0]["perplexity"], rel=1e-5)
    assert c.values["test"]["perplexity"][-1] == pytest.approx(ends[1]["perplexity"], rel=1e-5)
    ppl = c.values["test"]["perplexity"]
    assert c.barrier("perplexity", "test", "mean") == pytest.approx(max(ppl) - 0.5 * (ppl[0] + ppl[-1]), rel=1e-9)
    assert c.seconds is not None and c.seconds > 0


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
    assert c.barrier("loss", "test") == pytest.approx(0.0, abs=1e-6)
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
