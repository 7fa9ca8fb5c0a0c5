"""ZipIt!: nothing merged reproduces every model, the greedy matching's rules (never a unit with
itself, alpha, beta), partial zips give one head per model, bad inputs are refused before work."""

from __future__ import annotations

import json
import math
import re
import sys

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from safetensors.torch import load_file, save_file

import permerge as pm
from permerge.cli import main
from permerge.errors import StateDictMismatchError
from permerge.graph import trace_graph
from permerge.match import lap
from permerge.merge.partial import BudgetError, partial_merge, widen_module
from permerge.merge.zipit import ZipItError, zip_depths, zip_features, zipit
from permerge.models import MLP, VGG, DenseBlockNet, TransformerBlockNet

torch.set_num_threads(1)

FACTORIES = {
    "mlp": lambda: MLP(hidden=(16, 12)),
    "vgg": lambda: VGG(widths=(4, 4, 8, 8)),  # conv→linear flatten: blocks of H·W columns
    "densenet": lambda: DenseBlockNet(stem=8, growth=4, num_layers=2),  # concatenations: offsets shift
}


def _data(batches=3, size=8):
    gen = torch.Generator().manual_seed(5)
    return [torch.randn(size, 1, 28, 28, generator=gen) for _ in range(batches)]


def _outputs(models, x):
    with torch.no_grad():
        return [m(x) for m in models]


@pytest.mark.parametrize("count", [2, 3])
@pytest.mark.parametrize("name", sorted(FACTORIES))
def test_full_width_reproduces_every_model(name, count, bn_models):
    models, data = bn_models(FACTORIES[name], range(count)), _data()
    before = [{k: v.clone() for k, v in m.state_dict().items()} for m in models]
    x = data[0]
    outs = _outputs(models, x)
    heads = zipit(models, data, budget=count, keep_heads=True, reset_bn=False, quiet=True)
    averaged = zipit(models, data, budget=count, keep_heads=False, reset_bn=False, quiet=True)
    nothing = zipit(models, data, depth=0.0, reset_bn=False, quiet=True)  # a partial zip: heads by default
    with torch.no_grad():
        assert torch.allclose(heads.model(x), torch.cat(outs, -1), atol=1e-5)
        assert torch.allclose(averaged.model(x), sum(outs) / count, atol=1e-5)
        assert nothing.zipped == () and nothing.keep_heads
        assert torch.allclose(nothing.model(x), torch.cat(outs, -1), atol=1e-5)
    g = models[0]
    assert all(heads.widths[n] == count * heads.sizes[n] for n in heads.widths)
    assert heads.num_parameters() > count * sum(p.numel() for p in g.parameters()) - 1  # block-diagonal ensemble
    for m, sd in zip(models, before):  # inputs untouched
        assert all(torch.equal(v, sd[k]) for k, v in m.state_dict().items())


@pytest.mark.parametrize("name", sorted(FACTORIES))
def test_budget_one_is_one_model_wide_and_runs(name, bn_models):
    models, data = bn_models(FACTORIES[name], range(3)), _data()
    res = zipit(models, data, budget=1.0, alpha=0.5, beta=0.5, quiet=True)
    a = models[0]
    assert res.widened == {} and all(res.widths[n] == res.sizes[n] for n in res.widths)
    assert sum(p.numel() for p in res.model.parameters()) == sum(p.numel() for p in a.parameters())
    for g, s in res.stats.items():
        assert s.within + s.across == 2 * res.sizes[g]  # 3n features down to n
    with torch.no_grad():
        y = res.model(data[0])
    assert y.shape == a(data[0]).shape and torch.isfinite(y).all()
    arch = res.architecture()
    assert arch["models"] == 3 and arch["groups"][res.spec.groups[0].name]["zipped"]


def test_partial_zip_returns_one_head_per_model(bn_models):
    models, data = bn_models(FACTORIES["vgg"], range(3)), _data()
    traced = trace_graph(models[0], data[0])
    depths, layers = zip_depths(traced)
    assert sorted(depths.values()) == list(range(layers))  # one conv/linear writes each group of this VGG
    res = zipit(models, data, depth=0.5, quiet=True)
    assert res.keep_heads and set(res.zipped) == {g for g, d in depths.items() if d < math.floor(0.5 * layers + 0.5)}  # rounded half up
    assert 0 < len(res.zipped) < len(traced.spec.groups)
    for g in traced.spec.groups:
        assert res.widths[g.name] == (g.size if g.name in res.zipped else 3 * g.size)
    with torch.no_grad():
        y = res.model(data[0])
    assert y.shape == (8, 30)  # three 10-way heads, model 0's first
    named = zipit(models, data, depth=list(res.zipped), quiet=True)
    assert named.zipped == res.zipped
    # past the zip point every model keeps its own units, so a zip that merges nothing is each model
    exact = zipit(models, data, depth=0.5, budget=3.0, reset_bn=False, quiet=True)
    with torch.no_grad():
        assert torch.allclose(exact.model(data[0]), torch.cat(_outputs(models, data[0]), -1), atol=1e-5)


def test_heads_and_tied_groups_are_aligned_not_zipped():
    torch.manual_seed(0)
    a = TransformerBlockNet(attention="manual").eval()
    torch.manual_seed(1)
    b = TransformerBlockNet(attention="manual").eval()
    data = [torch.randint(0, 64, (4, 8), generator=torch.Generator().manual_seed(i)) for i in range(2)]
    res = zipit([a, b], data, budget=1.0, quiet=True)
    heads = [g.name for g in res.spec.groups if any(ax.repeat != 1 for ax in g.members)]
    assert heads and set(heads) <= set(res.aligned)
    assert all(res.merges[g].shared for g in res.aligned) and any(f"group {heads[0]!r} aligned" in n for n in res.notes)
    for g in res.aligned:  # aligned by a linear assignment on the correlations: a permutation of B's units
        assert sorted(res.permutations[1][g].tolist()) == list(range(res.sizes[g]))
    with torch.no_grad():
        assert res.model(data[0]).shape == a(data[0]).shape


# -- the matching ---------------------------------------------------------------------------------


def _random_corr(total, seed):
    gen = torch.Generator().manual_seed(seed)
    f = torch.randn(total, 64, generator=gen)
    f = f + torch.randn(1, 64, generator=gen) * 0.5
    return torch.corrcoef(f)


@settings(max_examples=40, deadline=None)
@given(
    models=st.integers(2, 3), n=st.integers(2, 6), seed=st.integers(0, 10_000),
    frac=st.floats(0.0, 1.0), alpha=st.sampled_from([0.0, 0.3, 1.0]), beta=st.sampled_from([0.0, 0.5, 1.0]),
)  # fmt: skip
def test_matching_invariants(models, n, seed, frac, alpha, beta):
    total = models * n
    low = n if alpha > 0 else math.ceil(total / 2)
    width = low + round(frac * (total - low))
    corr = _random_corr(total, seed)
    corr.diagonal().fill_(10.0)  # a unit is most correlated with itself: it must still never pair with itself
    try:
        gm, stats = zip_features(corr, models, width, alpha=alpha, beta=beta)
    except ZipItError as e:
        assert "no allowed merge left" in str(e) and beta < 1  # stuck only when same-model merges are limited
        return
    slots = torch.cat(gm.slots)
    counts = torch.bincount(slots, minlength=gm.width)
    assert gm.width == width and counts.min() >= 1 and counts.sum() == total  # every slot holds >= 1 feature
    assert stats.within + stats.across == total - width  # each merge removes exactly one feature
    firsts = [int(torch.nonzero(slots == s)[0]) for s in range(width)]
    assert firsts == sorted(firsts)  # slots ordered by their first ensemble feature
    if alpha == 0:
        assert counts.max() <= 2  # every merged feature is one pair
    per_model = torch.stack([torch.bincount(s, minlength=width) for s in gm.slots])  # (models, width)
    if beta == 0:
        assert per_model.max() <= 1 and stats.within == 0
    quota = math.floor(beta * (total - width) / models + 0.5)
    assert (per_model - 1).clamp_min(0).sum(1).max() <= quota  # no model spends more than its share


def test_full_width_is_the_ensemble_layout_and_a_unit_never_pairs_with_itself():
    corr = torch.eye(6) * 5 + _random_corr(6, 0)
    gm, stats = zip_features(corr, 2, 6, alpha=0.5, beta=0.5)
    assert [s.tolist() for s in gm.slots] == [[0, 1, 2], [3, 4, 5]] and stats.within == stats.across == 0
    gm, _ = zip_features(corr, 2, 3, alpha=0.0, beta=0.0)  # every feature pairs with another model's
    assert sorted(torch.cat(gm.slots).tolist()) == [0, 0, 1, 1, 2, 2]
    assert sorted(gm.slots[1].tolist()) == [0, 1, 2]


def test_alpha_allows_repeated_merges():
    # A0, A1 and B0 are one feature three times; A2, B1, B2 are unrelated to everything
    corr = torch.full((6, 6), 0.0)
    for i, j in ((0, 1), (0, 3), (1, 3)):
        corr[i, j] = corr[j, i] = 0.9
    corr[2, 4] = corr[4, 2] = corr[2, 5] = corr[5, 2] = corr[4, 5] = corr[5, 4] = 0.1
    gm, stats = zip_features(corr, 2, 3, alpha=1.0, beta=1.0)
    assert gm.slots[0][0] == gm.slots[0][1] == gm.slots[1][0]  # the triple became one feature
    once, _ = zip_features(corr, 2, 3, alpha=0.0, beta=1.0)
    assert torch.bincount(torch.cat(once.slots)).max() == 2  # alpha 0: pairs only
    with pytest.raises(ZipItError, match="alpha=0"):
        zip_features(corr, 3, 2, alpha=0.0, beta=1.0)  # three models of two units down to two needs triples


def test_beta_limits_same_model_merges():
    # A's two units are near copies; B's units match A's only weakly
    corr = torch.tensor([[1.0, 0.95, 0.3, 0.2], [0.95, 1.0, 0.2, 0.3], [0.3, 0.2, 1.0, 0.0], [0.2, 0.3, 0.0, 1.0]])
    within, s_within = zip_features(corr, 2, 3, alpha=0.0, beta=1.0)
    assert within.slots[0][0] == within.slots[0][1] and s_within.within == 1  # A's copies merged
    across, s_across = zip_features(corr, 2, 3, alpha=0.0, beta=0.0)
    assert across.slots[0][0] != across.slots[0][1] and s_across.within == 0
    assert s_across.correlation == pytest.approx(0.3)


def test_beta_zero_pairs_as_partial_merging_does_when_greedy_is_optimal():
    """With two models, alpha=0 and beta=0, ZipIt! is a greedy one-to-one matching of A's units with
    B's; partial merging solves the matching optimally and keeps the worst pairs apart. On
    correlations where greedy is optimal (B a noisy permuted copy of A) both pick the same pairs."""
    torch.manual_seed(0)
    a = MLP(hidden=(12,)).eval()
    b = MLP(hidden=(12,)).eval()
    spec = trace_graph(a, torch.randn(2, 784)).spec
    g = spec.groups[0]
    n, perm = g.size, torch.randperm(g.size)
    cross = torch.full((n, n), 0.05)
    cross[torch.arange(n), perm] = torch.linspace(0.9, 0.4, n)  # A's unit i is B's unit perm[i]
    corr = torch.eye(2 * n)
    corr[:n, n:], corr[n:, :n] = cross, cross.T
    for budget in (1.0, 1.5):
        width = round(budget * n)
        gm, _ = zip_features(corr, 2, width, alpha=0.0, beta=0.0)
        zip_pairs = {(i, j) for i in range(n) for j in range(n) if gm.slots[0][i] == gm.slots[1][j]}
        matched = lap.solve(cross)
        part = partial_merge(spec, a, b, {g.name: matched}, {g.name: cross}, budget, check=False)  # only the pairing
        kept = set(part.unmerged[g.name].tolist())
        assert zip_pairs == {(i, int(matched[i])) for i in range(n) if i not in kept}
    # where greedy is not optimal they differ: greedy takes the best pair first
    cross = torch.tensor([[0.9, 0.8], [0.8, 0.1]])
    corr = torch.eye(4)
    corr[:2, 2:], corr[2:, :2] = cross, cross.T
    gm, _ = zip_features(corr, 2, 2, alpha=0.0, beta=0.0)
    assert gm.slots[1].tolist() == [0, 1] and lap.solve(cross).tolist() == [1, 0]


# -- bad inputs -----------------------------------------------------------------------------------


class _Untouched:
    """Data that fails the test if it is ever iterated (work started)."""

    def __iter__(self):
        raise AssertionError("the data was read before the error")


@pytest.mark.parametrize(
    ("kwargs", "error", "match"),
    [
        ({"alpha": 1.5}, ZipItError, r"alpha is 1\.5; it must lie in \[0, 1\] \(0: a merged feature never merges again"),
        ({"beta": -0.1}, ZipItError, r"beta is -0\.1"),
        ({"beta": "x"}, ZipItError, "beta must be a number"),
        ({"budget": 0.5}, BudgetError, r"in \[1, 2\]"),
        ({"budget": 2.5}, BudgetError, r"in \[1, 2\]"),
        ({"depth": 1.5}, ZipItError, "depth must be None"),
        ({"depth": "net.1.weight:0"}, ZipItError, "depth must be None"),
    ],
)
def test_bad_options_are_refused_before_any_work(kwargs, error, match, bn_models):
    models = bn_models(FACTORIES["mlp"], range(2))
    before = [{k: v.clone() for k, v in m.state_dict().items()} for m in models]
    with pytest.raises(error, match=match) as e:
        zipit(models, _Untouched(), **kwargs)
    assert "\n" not in str(e.value)
    for m, sd in zip(models, before):
        assert all(torch.equal(v, sd[k]) for k, v in m.state_dict().items())


def test_bad_models_and_groups_are_refused_before_the_statistics(monkeypatch, bn_models):
    models = bn_models(FACTORIES["mlp"], range(3))
    with pytest.raises(ZipItError, match="2 or more models"):
        zipit(models[:1], _Untouched())
    with pytest.raises(StateDictMismatchError, match="model 0 and model 1"):
        zipit([models[0], MLP(hidden=(8, 12))], _Untouched())

    def no_statistics(*args, **kwargs):
        raise AssertionError("statistics were collected before the error")

    monkeypatch.setattr(sys.modules["permerge.merge.zipit"], "_correlations", no_statistics)
    data = _data()
    with pytest.raises(ZipItError, match=r"depth names group\(s\) the model does not have: \['nope'\]; valid groups"):
        zipit(models, data, depth=["nope"])
    with pytest.raises(ZipItError, match="alpha=0 merges every feature at most once"):
        zipit(models, data, alpha=0.0, budget=1.0)  # three models need triples to reach one model's width
    with pytest.raises(BudgetError, match="past the zip point"):
        zipit(models, data, depth=["net.1.weight:0"], budget={"net.3.weight:0": 1.5})
    with pytest.raises(pm.PermergeError, match="needs data"):
        zipit(models, [])


def test_reused_correlations_give_the_same_zip(monkeypatch, bn_models):
    models, data = bn_models(FACTORIES["vgg"], range(2)), _data()
    first = zipit(models, data, budget=1.0, alpha=0.5, beta=0.5, quiet=True)
    fresh = zipit(models, data, budget=1.25, alpha=1.0, beta=0.0, quiet=True)

    def no_statistics(*args, **kwargs):
        raise AssertionError("statistics collected again")

    monkeypatch.setattr(sys.modules["permerge.merge.zipit"], "_correlations", no_statistics)
    reused = zipit(models, data, budget=1.25, alpha=1.0, beta=0.0, correlations=first.correlations, quiet=True)
    assert all(torch.equal(reused.state_dict[k], v) for k, v in fresh.state_dict.items())
    g = first.spec.groups[0]
    bad = {**first.correlations, g.name: torch.zeros(3, 3)}
    with pytest.raises(ZipItError, match=rf"correlations for group '{g.name}': expected a \({2 * g.size}, {2 * g.size}\)"):
        zipit(models, data, correlations=bad)


# -- permerge merge --method zipit ----------------------------------------------------------------

CLI_MODEL = ["--model", "permerge.models:MLP", "--model-kwargs", '{"hidden": [16, 12]}', "--input-shape", "2,784"]


@pytest.fixture
def cli_setup(tmp_path, monkeypatch):
    paths = []
    for seed in range(3):
        torch.manual_seed(seed)
        paths.append(tmp_path / f"m{seed}.safetensors")
        save_file(MLP(hidden=(16, 12)).state_dict(), paths[-1])
    (tmp_path / "zipit_data.py").write_text(
        "import torch\n\ndef unlabeled():\n"
        "    gen = torch.Generator().manual_seed(0)\n"
        "    return [torch.randn(16, 784, generator=gen) for _ in range(3)]\n"
    )
    monkeypatch.syspath_prepend(str(tmp_path))
    return [str(p) for p in paths]


def test_cli_merge_zipit_writes_a_multi_head_model(cli_setup, tmp_path, capsys):
    out = tmp_path / "zipped"
    argv = ["merge", *CLI_MODEL, *cli_setup, "--method", "zipit", "--data", "zipit_data:unlabeled",
            "--alpha", "1", "--beta", "1", "--zip-depth", "0.5", "-o", str(out)]  # fmt: skip
    assert main(argv) == 0
    assert "merged 3 models (zipit" in capsys.readouterr().out
    arch = json.loads((out / "architecture.json").read_text())
    assert arch["format"] == "permerge.zipit/1" and arch["models"] == 3 and arch["keep_heads"]
    assert arch["groups"]["net.1.weight:0"]["zipped"] and not arch["groups"]["net.3.weight:0"]["zipped"]
    report = json.loads((out / "provenance.json").read_text())["report"]
    assert report["method"] == "zipit" and report["zipped"] == ["net.1.weight:0"]
    model = widen_module(MLP(hidden=(16, 12)), load_file(out / "model.safetensors"))
    with torch.no_grad():
        assert model(torch.randn(2, 784)).shape == (2, 30)  # three heads


@pytest.mark.parametrize(
    ("extra", "message"),
    [
        (["--alpha", "2"], r"alpha is 2; it must lie in \[0, 1\]"),
        (["--zip-depth", "1.5"], "depth must be None"),
        (["--budget", "3.5"], r"budget ratios must be numbers in \[1, 3\]"),
        (["--weights", "0.2,0.3,0.5"], "drop --weights"),
    ],
)
def test_cli_merge_zipit_refuses_bad_options_before_loading(cli_setup, tmp_path, capsys, extra, message):
    out = tmp_path / "never"
    argv = ["merge", *CLI_MODEL, *cli_setup, "--method", "zipit", "--data", "zipit_data:unlabeled", *extra, "-o", str(out)]
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert re.search(message, err) and err.count("\n") == 1
    assert not out.exists()
    assert main(["merge", *CLI_MODEL, *cli_setup, "--method", "zipit", "-o", str(out)]) == 2
    assert "ZipIt! needs unlabeled data" in capsys.readouterr().err and not out.exists()


def test_ties_never_revive_a_merged_feature():
    # every pair equally correlated: the greedy search must still merge live features only
    for models, n, width in ((2, 4, 4), (3, 3, 3), (2, 5, 6)):
        corr = torch.full((models * n, models * n), 0.5)
        gm, stats = zip_features(corr, models, width, alpha=1.0, beta=1.0)
        counts = torch.bincount(torch.cat(gm.slots), minlength=width)
        assert gm.width == width and counts.min() >= 1 and stats.within + stats.across == models * n - width


def test_a_full_width_zip_that_changes_the_function_is_caught(monkeypatch, bn_models):
    models, data = bn_models(FACTORIES["mlp"], range(2)), _data()
    module = sys.modules["permerge.merge.zipit"]
    real = module.merge_state_dicts

    def broken(*args, **kwargs):
        sd, maps = real(*args, **kwargs)
        sd["net.1.bias"] = sd["net.1.bias"] + 1.0
        return sd, maps

    monkeypatch.setattr(module, "merge_state_dicts", broken)
    with pytest.raises(pm.PermergeError, match="kept every unit but the zipped model's output 0 differs"):
        zipit(models, data, budget=2.0, quiet=True)
