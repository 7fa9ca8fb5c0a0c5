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


def test_demo_quick_prints_the_table_and_writes_plots_and_curves(tmp_path, capsys):
    pytest.importorskip("sklearn")
    out = tmp_path / "demo"
    assert main(["-q", "demo", "--quick", "-o", str(out)]) == 0
    text = capsys.readouterr().out
    assert "| model | acc A / B | naive: loss / acc barrier | weight-matched: loss / acc barrier |" in text
    assert "| MLP 64-128-128-128-128-10 |" in text and "| CNN conv 16-16-32-32, no norm |" in text
    names = ["barriers.md", "cnn.png", "curves.csv", "curves.json", "mlp.png", "provenance.json"]
    assert sorted(p.name for p in out.iterdir()) == names
    assert (out / "mlp.png").read_bytes().startswith(PNG) and (out / "cnn.png").read_bytes().startswith(PNG)
    curves = json.loads((out / "curves.json").read_text())
    assert set(curves) == {"mlp", "cnn"}
    assert set(curves["mlp"]) == {"naive", "weight-matched", "weight-matched + REPAIR"}
    assert len(curves["mlp"]["naive"]["alphas"]) == 11
    # the endpoints are the trained models themselves on every curve (REPAIR leaves them unchanged)
    ends = [(c["values"]["data"]["loss"][0], c["values"]["data"]["loss"][-1]) for c in curves["mlp"].values()]
    assert all(e == pytest.approx(ends[0], abs=1e-4) for e in ends)
    assert (out / "curves.csv").read_text().startswith("curve,dataset,metric,0,0.1,")
    prov = json.loads((out / "provenance.json").read_text())
    assert prov["config"]["quick"] is True and "naive" in prov["report"]["table"]


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

def not_data():
    return 3
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


def test_barrier_writes_curves_plot_and_provenance(setup, tmp_path, capsys):
    a, b = setup
    digests = [_digest(a), _digest(b)]
    out = tmp_path / "out"
    argv = ["barrier", *MODEL, a, b, "--data", "pm_cli_data:loader", "--repair", "--alphas", "5", "-o", str(out)]
    assert main(argv) == 0
    text = capsys.readouterr().out
    lines = text.splitlines()
    assert lines[0].split() == ["curve", "loss", "barrier", "acc", "barrier"]
    assert [line.split()[0] for line in lines[1:4]] == ["naive", "aligned", "aligned+REPAIR"]  # no BN: no BN-reset curve
    assert sorted(p.name for p in out.iterdir()) == ["barrier.png", "curves.csv", "curves.json", "provenance.json"]
    assert (out / "barrier.png").read_bytes().startswith(PNG)
    curves = json.loads((out / "curves.json").read_text())
    assert list(curves) == ["naive", "aligned", "aligned+REPAIR"] and curves["naive"]["alphas"] == [0, 0.25, 0.5, 0.75, 1]
    assert f"{curves['aligned']['summary']['data']['loss']['barrier']:.4f}" in text
    # the aligned B computes B's function: the endpoints agree
    assert curves["aligned"]["values"]["data"]["loss"][-1] == pytest.approx(curves["naive"]["values"]["data"]["loss"][-1], abs=1e-5)
    prov = json.loads((out / "provenance.json").read_text())
    assert set(prov["report"]["barriers"]) == set(curves) and prov["config"]["repair"] is True
    assert [_digest(a), _digest(b)] == digests


def test_barrier_align_none_svg_and_generator_data(setup, tmp_path, capsys):
    a, b = setup
    out = tmp_path / "out"
    argv = ["barrier", *MODEL, a, b, "--data", "pm_cli_data:generator", "--align", "none", "--repair",
            "--plot-format", "svg", "-o", str(out)]  # fmt: skip
    assert main(argv) == 0
    assert list(json.loads((out / "curves.json").read_text())) == ["naive", "naive+REPAIR"]
    assert "<svg" in (out / "barrier.svg").read_text()


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
    assert not out.exists()  # nothing written on error
    out.mkdir()
    (out / "x").write_text("keep")
    assert main([*base, "--data", "pm_cli_data:loader"]) == 2
    assert "not empty" in capsys.readouterr().err
    assert main([*base, "--data", "pm_cli_data:loader", "--force"]) == 0
    assert (out / "x").read_text() == "keep" and (out / "curves.json").is_file()
