"""Learned refinement of dense maps (permerge.match.refine): never worse than the matcher, maps stay in
their class, the function is kept, bad requests refused before any work."""

from __future__ import annotations

import copy
import importlib

import pytest
import torch
from zoo import two_seeds

import permerge as pm
from permerge.apply import apply_transform
from permerge.errors import PermergeError
from permerge.match.refine import _generator, refine_transform
from permerge.reparam import fold_gains, gauge
from permerge.spec import ORTHOGONAL
from permerge.transform import LinearMap, resolve_symmetries


def _pair(name):
    return two_seeds(name)[:3]


def _loss(out, y):
    return torch.nn.functional.cross_entropy(out[:, 0], y)


DATA = [(t, t[:, 0] % 64) for t in (torch.randint(0, 64, (8, 8), generator=torch.Generator().manual_seed(i)) for i in range(10))]


def test_refinement_moves_towards_a_planted_rotation():
    """B is A with its residual stream rotated (same function). From the identity, refinement lowers
    the held-out midpoint loss towards A's own (the planted rotation's inverse would reach it)."""
    a, _, x = _pair("transformer_manual_ln")
    tr = pm.trace_graph(a, x)
    classes = resolve_symmetries(tr.spec, {"orthogonal"})
    dense = [n for n, c in classes.items() if c == ORTHOGONAL]
    g = gauge(tr, dense, tr.spec)
    fa = copy.deepcopy(a)
    fa.load_state_dict(fold_gains(g, a.state_dict()))
    gen = torch.Generator().manual_seed(0)
    start, planted = {}, {}
    for grp in g.spec.groups:
        if grp.name in dense:
            s = 0.4 * torch.randn(1, grp.size, grp.size, generator=gen, dtype=torch.float64)
            planted[grp.name] = LinearMap(torch.linalg.matrix_exp(_generator(ORTHOGONAL, s, grp.name in g.keep_ones)))
            start[grp.name] = LinearMap(torch.eye(grp.size, dtype=torch.float64)[None])
        else:
            start[grp.name] = planted[grp.name] = torch.arange(grp.size)
    sd_b = apply_transform(g.spec, planted, fa.state_dict())
    with torch.no_grad():
        teacher = [(t, a(t)[:, 0].argmax(-1)) for t, _ in DATA]  # targets A predicts: A's loss is low
    _, info = refine_transform(g.spec, fa, sd_b, start, classes, teacher, _loss, steps=60, lr=0.05, every=10,
                               keep_ones=g.keep_ones)  # fmt: skip
    assert info["steps"] == 60 and info["best_loss"] < 0.9 * info["start_loss"]  # measured: 3.41 -> 2.79


def test_refinement_never_worse_and_keeps_the_function():
    a, b, x = _pair("transformer_manual_ln")
    before = {k: v.clone() for k, v in b.state_dict().items()}
    matched = pm.align(a, b, x, "activation", symmetries="all", data=DATA, quiet=True)
    refined = pm.align(a, b, x, "activation", symmetries="all", data=DATA, quiet=True,
                       refine={"steps": 30, "lr": 0.02, "loss_fn": _loss, "every": 10})  # fmt: skip
    info = refined.report["refined"]
    assert info["steps"] == 30 and info["best_loss"] <= info["start_loss"]
    assert refined.report["function_preservation_error"] < 1e-5 and refined.report["end_to_end_error"] < 1e-5
    assert all(torch.equal(before[k], v) for k, v in b.state_dict().items())  # B untouched
    with torch.no_grad():  # the selection loss is the loss of the plain average in A's gauge
        mids = [sum(float(_loss(pm.merge([a, r.model])(xx), yy)) for xx, yy in DATA[:4]) / 4 for r in (matched, refined)]
    assert mids[0] == pytest.approx(info["start_loss"], rel=1e-4) and mids[1] == pytest.approx(info["best_loss"], rel=1e-4)
    # orthogonal groups stay orthogonal (the check would refuse otherwise); LayerNorm streams keep 1
    stream = next(iter(refined.report["keep_ones"]))
    q = refined.transform[stream]
    assert isinstance(q, LinearMap)
    ones = torch.ones(q.matrix.shape[-1], dtype=torch.float64)
    assert torch.allclose(q.matrix[0] @ ones, ones, atol=1e-9)
    assert torch.allclose(q.matrix[0].T @ q.matrix[0], torch.eye(len(ones), dtype=torch.float64), atol=1e-9)


def test_no_steps_returns_the_matched_maps():
    a, b, x = _pair("transformer_manual_ln")
    matched = pm.align(a, b, x, "weight", symmetries="all", quiet=True)
    same = pm.align(a, b, x, "weight", symmetries="all", quiet=True, refine={"steps": 0, "loss_fn": _loss, "data": DATA})
    assert all(torch.equal(matched.model.state_dict()[k], v) for k, v in same.model.state_dict().items())


@pytest.mark.parametrize(("kwargs", "message"), [
    ({"symmetries": "permutation", "data": DATA}, "needs symmetries beyond 'permutation'"),
    ({"symmetries": "all"}, "and \\(inputs, targets\\) data"),
])  # fmt: skip
def test_refine_refused_before_work(kwargs, message, monkeypatch):
    a, b, x = _pair("transformer_manual_ln")
    monkeypatch.setattr(importlib.import_module("permerge.align"), "trace", lambda *a, **k: pytest.fail("traced first"))
    with pytest.raises(PermergeError, match=message):
        pm.align(a, b, x, "weight", quiet=True, refine={"steps": 5, "loss_fn": _loss}, **kwargs)
