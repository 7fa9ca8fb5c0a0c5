"""`permerge demo` and `permerge barrier` in-process: stdout, files, and the error paths."""

from __future__ import annotations

import hashlib
import json
import textwrap

import pytest
import torch
from safetensors.torch import save_file

from permerge.cli import main
from permerge.models import MLP

pytest.importorskip("matplotlib")
PNG = b"\x89PNG\r\n\x1a\n"


def test_demo_quick_prints_the_table_and_writes_plots_curves_and_report(tmp_path, capsys):
    pytest.importorskip("sklearn")
    out = tmp_path / "demo"
    assert main(["-q", "demo", "--quick", "-o", str(out)]) == 0
    text = capsys.readouterr().out
    assert "| model | acc A / B | naive: loss / acc barrier | weight-matched: loss / acc barrier |" in text
    assert "| MLP 64-128-128-128-128-10 |" in text and "| CNN conv 16-16-32-32, no norm |" in text
    names = ["barriers.md", "cnn.png", "curves.csv", "curves.json", "mlp.png", "provenance.json", "report.html"]
    assert sorted(p.name for p in out.iterdir()) == names
    assert (out / "mlp.png").read_bytes().startswith(PNG) and (out / "cnn.png").read_bytes().startswith(PNG)
    curves = json.loads((out / "curves.json").read_text())
    assert set(curves) == {"mlp", "cnn"}
    assert set(curves["mlp"]) == {"naive", "weight-matched", "weight-matched + REPAIR"}
    naive = curves["mlp"]["naive"]
    assert len(naive["alphas"]) == 11 and list(naive["values"]) == ["train", "test"]
    assert set(naive["summary"]["test"]["loss"]["barrier"]) == {"line", "mean"}
    # the endpoints are the trained models themselves on every curve (REPAIR leaves them unchanged)
    ends = [(c["values"]["test"]["loss"][0], c["values"]["test"]["loss"][-1]) for c in curves["mlp"].values()]
    assert all(e == pytest.approx(ends[0], abs=1e-4) for e in ends)
    # the table shows the test barriers ("line" definition) of curves.json
    row = next(line for line in text.splitlines() if line.startswith("| MLP"))
    assert f"{naive['summary']['test']['loss']['barrier']['line']:.3f} / " in row
    assert (out / "curves.csv").read_text().startswith("curve,dataset,metric,0,0.1,")
    prov = json.loads((out / "provenance.json").read_text())
    assert prov["config"]["quick"] is True and "naive" in prov["report"]["table"]
    assert set(prov["report"]["align"]) == {"mlp", "cnn"} and prov["report"]["align"]["mlp"]["groups"] == 4
    page = (out / "report.html").read_text()
    assert page.count("<svg") == 2 and "Git Re-Basin" in page and "Entezari" in page and "net.1.weight:0" in page


def test_demo_refuses_a_non_empty_output_directory_before_training(tmp_path, capsys):
    out = tmp_path / "demo"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    assert main(["-q", "demo", "--quick", "-o", str(out)]) == 2
    err = capsys.readouterr().err
    assert "not empty" in err and "--force" in err
    assert [p.name for p in out.iterdir()] == ["keep.txt"]


DATA_MODULE = """
import torch
from torch.utils.data import DataLoader, TensorDataset

def loader():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(96, 20, generator=g)
    return DataLoader(TensorDataset(x, (x[:, 0] > 0).long() + 2 * (x[:, 1] > 0).long()), batch_size=32)

def generator():
    g = torch.Generator().manual_seed(0)
    for _ in range(3):
        yield torch.randn(32, 20, generator=g), torch.randint(0, 10, (32,), generator=g)

def test_loader():
    g = torch.Generator().manual_seed(1)
    x = torch.randn(64, 20, generator=g)
    return DataLoader(TensorDataset(x, (x[:, 0] > 0).long() + 2 * (x[:, 1] > 0).long()), batch_size=32)


def not_data():
    return 3


from permerge.evaluate import Metric, accuracy

UNDIRECTED = {"top1": lambda out, y: (out.argmax(-1) == y).float().mean()}
TOP1 = {"top1": Metric.mean(accuracy, higher_is_better=True)}
"""

MODEL = ["--model", "permerge.models:MLP", "--model-kwargs", '{"in_features": 20, "hidden": [16, 16]}', "--input-shape", "2,20"]


@pytest.fixture
def setup(tmp_path, monkeypatch):
    (tmp_path / "pm_cli_data.py").write_text(textwrap.dedent(DATA_MODULE))
    monkeypatch.syspath_prepend(str(tmp_path))
    paths = []
    for seed in (0, 1):
        torch.manual_seed(seed)
        p = tmp_path / f"m{seed}.safetensors"
        save_file(MLP(in_features=20, hidden=(16, 16)).state_dict(), p)
        paths.append(str(p))
    return paths


def _digest(p):
    return hashlib.sha256(open(p, "rb").read()).hexdigest()


def test_barrier_writes_curves_plot_spec_report_and_provenance(setup, tmp_path, capsys):
    a, b = setup
    digests = [_digest(a), _digest(b)]
    out = tmp_path / "out"
    argv = ["barrier", *MODEL, a, b, "--train-data", "pm_cli_data:loader", "--test-data", "pm_cli_data:test_loader",
            "--repair", "--alphas", "5", "-o", str(out)]  # fmt: skip
    assert main(argv) == 0
    text = capsys.readouterr().out
    lines = text.splitlines()
    assert lines[0] == "barriers on train:" and lines[6] == "barriers on test:"
    assert lines[1].split() == ["curve", "loss", "line", "loss", "mean", "accuracy", "line", "accuracy", "mean"]
    assert [line.split()[0] for line in lines[2:5]] == ["naive", "aligned", "aligned+REPAIR"]  # no BN: no BN-reset curve
    names = ["barrier.png", "curves.csv", "curves.json", "provenance.json", "report.html", "spec.json"]
    assert sorted(p.name for p in out.iterdir()) == names
    assert (out / "barrier.png").read_bytes().startswith(PNG)
    curves = json.loads((out / "curves.json").read_text())
    assert list(curves) == ["naive", "aligned", "aligned+REPAIR"] and curves["naive"]["alphas"] == [0, 0.25, 0.5, 0.75, 1]
    assert list(curves["naive"]["values"]) == ["train", "test"]
    for ds, first in (("train", 2), ("test", 8)):  # each table row prints the four barriers of curves.json
        got = [float(x) for x in lines[first + 1].split()[1:]]
        want = [curves["aligned"]["summary"][ds][m]["barrier"][d] for m in ("loss", "accuracy") for d in ("line", "mean")]
        assert got == pytest.approx(want, abs=6e-5)
    # the aligned B computes B's function: the endpoints agree
    assert curves["aligned"]["values"]["test"]["loss"][-1] == pytest.approx(curves["naive"]["values"]["test"]["loss"][-1], abs=1e-5)
    assert "Entezari et al. 2022" in text and "Git Re-Basin" in text
    prov = json.loads((out / "provenance.json").read_text())
    assert set(prov["report"]["barriers"]) == set(curves) and prov["config"]["repair"] is True
    assert prov["report"]["align"]["groups"] == 2 and set(prov["report"]["timing_s"]) >= {"align", "curves"}
    assert [_digest(a), _digest(b)] == digests
    page = (out / "report.html").read_text()
    assert page.count("<svg") == 1 and "net.1.weight:0" in page and "<th>curve (on test)</th>" in page


def test_barrier_align_none_svg_and_generator_data(setup, tmp_path, capsys):
    a, b = setup
    out = tmp_path / "out"
    argv = ["barrier", *MODEL, a, b, "--data", "pm_cli_data:generator", "--align", "none", "--repair",
            "--plot-format", "svg", "-o", str(out)]  # fmt: skip
    assert main(argv) == 0
    curves = json.loads((out / "curves.json").read_text())
    assert list(curves) == ["naive", "naive+REPAIR"] and list(curves["naive"]["values"]) == ["test"]
    assert "<svg" in (out / "barrier.svg").read_text()
    assert not (out / "spec.json").exists()


def test_barrier_error_paths(setup, tmp_path, capsys):
    a, b = setup
    out = tmp_path / "out"
    base = ["barrier", *MODEL, a, b, "-o", str(out)]
    assert main([*base, "--data", "pm_cli_data:missing"]) == 2
    assert "cannot import 'pm_cli_data:missing'" in capsys.readouterr().err
    assert main([*base, "--data", "no_such_module_xyz:loader"]) == 2
    assert "cannot import" in capsys.readouterr().err
    assert main([*base, "--data", "pm_cli_data"]) == 2
    assert "package.module:function" in capsys.readouterr().err
    assert main([*base, "--data", "pm_cli_data:not_data"]) == 2
    assert "not an iterable" in capsys.readouterr().err
    assert main([*base, "--data", "pm_cli_data:loader", "--metrics", "pm_cli_data:UNDIRECTED"]) == 2
    assert "metric 'top1' is a plain function, so its direction is unknown" in capsys.readouterr().err
    assert main([*base, "--data", "pm_cli_data:loader", "--metrics", "lm"]) == 2
    assert "--metrics 'lm': choose classification, causal-lm, auto" in capsys.readouterr().err
    assert not out.exists()  # nothing written on error
    out.mkdir()
    (out / "x").write_text("keep")
    assert main([*base, "--data", "pm_cli_data:loader"]) == 2
    assert "not empty" in capsys.readouterr().err
    assert main([*base, "--data", "pm_cli_data:loader", "--metrics", "pm_cli_data:TOP1", "--force"]) == 0
    assert not (out / "x").exists() and (out / "curves.json").is_file()  # --force replaces the directory whole
    curves = json.loads((out / "curves.json").read_text())
    assert curves["naive"]["higher_is_better"] == {"loss": False, "top1": True}  # a user metric, direction as declared


LM_DATA = """
import pathlib
import textwrap

import torch

TEXT = pathlib.Path(textwrap.__file__).read_bytes()  # local text, tokenised as bytes: no tokenizer


def _batches(offset):
    ids = torch.tensor(list(TEXT[offset : offset + 3 * 2 * 24]), dtype=torch.long).view(3, 2, 24)
    return [(x, x) for x in ids]


def train():
    return _batches(0)


def test():
    return _batches(4000)
"""


def test_barrier_on_a_tiny_causal_lm_reports_perplexity_cli_and_api(tmp_path, monkeypatch, capsys):
    transformers = pytest.importorskip("transformers")
    from permerge.demo import compare_curves
    from permerge.evaluate import evaluate

    (tmp_path / "pm_lm_data.py").write_text(textwrap.dedent(LM_DATA))
    monkeypatch.syspath_prepend(str(tmp_path))
    import pm_lm_data

    cfg = transformers.LlamaConfig(vocab_size=256, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
                                   num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64)  # fmt: skip
    dirs, models = [], []
    for seed in (0, 1):
        torch.manual_seed(seed)
        models.append(transformers.LlamaForCausalLM(cfg).eval())
        models[-1].save_pretrained(tmp_path / f"llama{seed}")
        dirs.append(str(tmp_path / f"llama{seed}"))
    out = tmp_path / "out"
    argv = ["-q", "barrier", "--model", dirs[0], *dirs, "--train-data", "pm_lm_data:train", "--test-data", "pm_lm_data:test",
            "--alphas", "3", "-o", str(out)]  # fmt: skip
    assert main(argv) == 0
    text = capsys.readouterr().out
    assert "perplexity line" in text and "token_accuracy mean" in text
    curves = json.loads((out / "curves.json").read_text())
    naive = curves["naive"]
    assert naive["higher_is_better"] == {"loss": False, "perplexity": False, "token_accuracy": True}
    ppl = naive["values"]["test"]["perplexity"]
    want = evaluate(models[0], pm_lm_data.test(), metrics="causal-lm")
    assert ppl[0] == pytest.approx(want["perplexity"], rel=1e-4) and 100 < ppl[0] < 1000  # random init: ~vocab size
    assert naive["summary"]["test"]["perplexity"]["barrier"]["mean"] == pytest.approx(max(ppl) - (ppl[0] + ppl[-1]) / 2, rel=1e-9)
    # aligning B to A changes no function: the aligned curve ends at B's perplexity
    assert curves["aligned"]["values"]["test"]["perplexity"][-1] == pytest.approx(ppl[-1], rel=1e-4)
    assert "<th>perplexity (mean)</th>" in (out / "report.html").read_text()
    # the API gives the same numbers
    api = compare_curves(*models, {"test": pm_lm_data.test()}, None, align_method=None, repair=False, alphas=3, metrics="causal-lm")
    assert api["naive"].values["test"]["perplexity"] == pytest.approx(ppl, rel=1e-5)


def test_repair_curve_on_a_hugging_face_causal_lm():
    pytest.importorskip("transformers")
    from hf_zoo import build

    from permerge.demo import compare_curves

    a, b = build("gpt2", 0), build("gpt2", 1)  # GPT-2 has biased linears and LayerNorms: REPAIR sites
    g = torch.Generator().manual_seed(0)
    data = [(x, x) for x in torch.randint(0, 64, (2, 4, 10), generator=g)]
    curves = compare_curves(a, b, data, (data[0][0][:1],), alphas=3, repair_batches=2, metrics="causal-lm")
    assert list(curves) == ["naive", "aligned", "aligned+REPAIR"]
    rep, ali = curves["aligned+REPAIR"].values["data"]["loss"], curves["aligned"].values["data"]["loss"]
    assert rep[0] == pytest.approx(ali[0], rel=1e-4) and rep[1] != pytest.approx(ali[1], rel=1e-6)  # endpoint kept, midpoint corrected
