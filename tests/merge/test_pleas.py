"""PLeaS: the least-squares step never increases its objective; budget 2 stays the ensemble; CLI."""

from __future__ import annotations

import json
import sys
import textwrap

import pytest
import torch
from safetensors.torch import load_file, save_file

import permerge as pm
from permerge.merge.partial import BudgetError, widen_module
from permerge.merge.pleas import pleas, ridge_step
from permerge.models import MLP, VGG

torch.set_num_threads(1)


def _models(factory, seeds=(0, 1)):
    out = []
    for s in seeds:
        torch.manual_seed(s)
        out.append(factory().eval())
    return out


def _data(shape, n=4, seed=5):
    gen = torch.Generator().manual_seed(seed)
    return [torch.randn(*shape, generator=gen) for _ in range(n)]


def test_ridge_step_never_increases_the_objective_row_by_row():
    gen = torch.Generator().manual_seed(0)
    for ridge in (1e-6, 1e-2, 10.0):
        x = torch.randn(200, 7, generator=gen, dtype=torch.float64)
        y = torch.randn(200, 3, generator=gen, dtype=torch.float64)
        w0 = torch.randn(3, 7, generator=gen, dtype=torch.float64)
        w, before, after = ridge_step(x.T @ x, y.T @ x, (y**2).sum(0), w0, ridge)
        measured = [((x @ m.T - y) ** 2).sum(0) for m in (w0, w)]
        assert torch.allclose(before, measured[0]) and torch.allclose(after, measured[1])
        assert (after <= before).all()
    exact = x @ w0.T  # a perfect W0 stays put
    w, before, after = ridge_step(x.T @ x, exact.T @ x, (exact**2).sum(0), w0, 1e-2)
    assert torch.allclose(w, w0) and after.abs().max() < 1e-8


def test_each_fit_lowers_the_measured_feature_error_of_its_layer():
    a, b = _models(lambda: MLP(hidden=(24, 24)))
    data = _data((64, 784))
    res = pleas(a, b, data, budget=1.5, max_layers=2, quiet=True)  # fits net.1 and net.3; the head is left
    assert [f.weight for f in res.layers] == ["net.1.weight", "net.3.weight"] and not res.complete
    assert all(f.after <= f.before for f in res.layers)
    assert res.layers[1].after < res.layers[1].before  # hidden layer 2 really improves

    # measure layer 2's objective independently: merged pre-activation vs the merged-space target
    aligned_b = widen_module(b, pm.apply_permutation(res.partial.spec, res.permutation, b.state_dict()))
    m = res.partial.output_map("net.3.weight", 0)

    def error(model):
        total, count = 0.0, 0
        for x in data:
            feats: dict[str, torch.Tensor] = {}
            hooks = [mod.net[3].register_forward_hook(lambda _m, _i, o, k=key, f=feats: f.__setitem__(k, o))
                     for key, mod in (("merged", model), ("a", a), ("b", aligned_b))]  # fmt: skip
            with torch.no_grad():
                model(x), a(x), aligned_b(x)
            for h in hooks:
                h.remove()
            target = m.merge(feats["a"], feats["b"], dim=1)
            total += ((feats["merged"] - target) ** 2).sum().item()
            count += target.numel()
        return total / count

    before, after = error(res.partial.model), error(res.model)
    assert after < before
    assert after == pytest.approx(res.layers[1].after, rel=1e-3)
    assert before == pytest.approx(res.layers[1].before, rel=1e-3)


def test_budget_two_keeps_the_ensemble_through_conv_batchnorm_folds():
    a, b = _models(lambda: VGG(widths=(4, 4, 8, 8)))
    for model in (a, b):
        for mod in model.modules():
            if isinstance(mod, torch.nn.BatchNorm2d):
                mod.running_mean.normal_()
                mod.running_var.uniform_(0.5, 2.0)
    data = _data((16, 1, 28, 28), n=2)
    res = pleas(a, b, data, budget=2.0, reset_bn=False, positions=16, quiet=True)
    assert res.complete and any(f.norm for f in res.layers)  # conv + BatchNorm fitted as one
    assert all(f.after <= f.before <= 1e-6 for f in res.layers)
    with torch.no_grad():
        x = data[0]
        assert torch.allclose(res.model(x), 0.5 * (a(x) + b(x)), atol=1e-4)
    heads = pleas(a, b, data, budget=1.25, keep_heads=True, positions=8, quiet=True)
    assert heads.model(data[0]).shape == (16, 20) and all(f.after <= f.before for f in heads.layers)


def test_bad_arguments_are_refused():
    a, b = _models(lambda: MLP(hidden=(8,)))
    data = _data((8, 784), n=1)
    with pytest.raises(BudgetError, match=r"\[1, 2\]"):
        pleas(a, b, data, budget=2.5, quiet=True)
    with pytest.raises(BudgetError, match="valid groups: net.1.weight:0"):
        pleas(a, b, data, budget={"net.9.weight:0": 1.5}, quiet=True)
    with pytest.raises(pm.PermergeError, match="needs data"):
        pleas(a, b, [], quiet=True)
    with pytest.raises(pm.PermergeError, match="ridge"):
        pleas(a, b, data, ridge=0.0, quiet=True)


@pytest.fixture
def data_module(tmp_path, monkeypatch):
    (tmp_path / "pleas_test_data.py").write_text(textwrap.dedent("""
        import torch
        def unlabeled():
            gen = torch.Generator().manual_seed(0)
            return [torch.randn(16, 784, generator=gen) for _ in range(3)]
    """))
    monkeypatch.syspath_prepend(str(tmp_path))
    yield "pleas_test_data:unlabeled"
    sys.modules.pop("pleas_test_data", None)


def test_cli_merge_pleas_writes_the_wider_model_and_its_architecture(tmp_path, data_module, capsys):
    from permerge.cli import main

    a, b = _models(lambda: MLP(hidden=(16, 16)))
    paths = [tmp_path / "a.safetensors", tmp_path / "b.safetensors"]
    for m, p in zip((a, b), paths):
        save_file(m.state_dict(), p)
    model = ["--model", "permerge.models:MLP", "--model-kwargs", '{"hidden": [16, 16]}', "--input-shape", "2,784"]
    out = tmp_path / "out"
    argv = ["merge", *model, *map(str, paths), "-o", str(out), "--method", "pleas", "--budget", "1.5", "--data", data_module]
    assert main(argv) == 0
    assert "pleas" in capsys.readouterr().out
    assert sorted(p.name for p in out.iterdir()) == [
        "architecture.json", "model.safetensors", "permutation_0.safetensors", "permutation_1.safetensors",
        "provenance.json", "report.html", "spec.json",
    ]  # fmt: skip
    arch = json.loads((out / "architecture.json").read_text())
    assert {g["width"] for g in arch["groups"].values()} == {24}
    merged = widen_module(MLP(hidden=(16, 16)), load_file(out / "model.safetensors"))
    assert merged.net[1].out_features == 24 and merged(torch.randn(2, 784)).shape == (2, 10)
    prov = json.loads((out / "provenance.json").read_text())
    assert prov["report"]["method"] == "pleas" and prov["report"]["widths"] == {k: 24 for k in arch["groups"]}

    bad = ["merge", *model, *map(str, paths), "-o", str(tmp_path / "bad"), "--method", "pleas", "--budget", "3",
           "--data", data_module]  # fmt: skip
    assert main(bad) == 2
    assert "[1, 2]" in capsys.readouterr().err and not (tmp_path / "bad").exists()
