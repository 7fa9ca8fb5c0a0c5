"""Conventions every subcommand keeps: `--json` prints one JSON object on stdout and nothing else
(errors too), `--version`, and results that match what the files say."""

from __future__ import annotations

import json
import textwrap

import pytest
import torch
from safetensors.torch import load_file, save_file

from permerge import __version__
from permerge.cli import COMMANDS, main
from permerge.models import MLP

MODEL = ["--model", "permerge.models:MLP", "--model-kwargs", '{"in_features": 20, "hidden": [16, 16]}', "--input-shape", "2,20"]
DATA = """
import torch

def batches():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(64, 20, generator=g)
    return [(x[i:i + 32], (x[i:i + 32, 0] > 0).long()) for i in (0, 32)]
"""


@pytest.fixture
def ckpts(tmp_path, monkeypatch):
    (tmp_path / "pm_json_data.py").write_text(textwrap.dedent(DATA))
    monkeypatch.syspath_prepend(str(tmp_path))
    paths = []
    for seed in (0, 1):
        torch.manual_seed(seed)
        paths.append(str(tmp_path / f"m{seed}.safetensors"))
        save_file(MLP(in_features=20, hidden=(16, 16)).state_dict(), paths[-1])
    return paths


def _json(capsys, argv):
    """Run ``argv`` with --json; stdout must be exactly one JSON object."""
    assert main([*argv, "--json"]) == 0, capsys.readouterr().err
    out = capsys.readouterr().out
    data = json.loads(out)  # the whole of stdout: one object, nothing before or after it
    assert isinstance(data, dict) and out.count("\n") == out.rstrip("\n").count("\n") + 1
    return data


def test_every_subcommand_prints_one_json_object(ckpts, tmp_path, capsys):
    pytest.importorskip("matplotlib")
    a, b = ckpts
    seen = set()

    data = _json(capsys, ["inspect", "mlp"])
    assert data["command"] == "inspect" and data["permutable_fraction"] == 1.0 and len(data["groups"]) == 3
    seen.add("inspect")

    data = _json(capsys, ["align", *MODEL, a, b, "-o", str(tmp_path / "al")])
    assert data["command"] == "align" and data["out"] == str((tmp_path / "al").resolve())
    assert data["files"] == sorted(p.name for p in (tmp_path / "al").iterdir())
    prov = json.loads((tmp_path / "al" / "provenance.json").read_text())
    assert data["report"] == prov["report"]  # the report the files hold
    assert 0 <= data["report"]["function_preservation_error"] < 1e-5
    seen.add("align")

    data = _json(capsys, ["merge", *MODEL, a, b, "-o", str(tmp_path / "mg"), "--weights", "0.3,0.7"])
    assert data["command"] == "merge" and data["report"]["models"] == 2 and "model.safetensors" in data["files"]
    seen.add("merge")

    data = _json(capsys, ["apply", *MODEL, str(tmp_path / "al"), b, "-o", str(tmp_path / "ap")])
    assert data["command"] == "apply" and data["report"]["method"] == "saved"
    assert data["report"]["changed_groups"] == json.loads((tmp_path / "al" / "provenance.json").read_text())["report"]["changed_groups"]
    seen.add("apply")

    data = _json(capsys, ["barrier", *MODEL, a, b, "--test-data", "pm_json_data:batches", "--alphas", "3", "-o", str(tmp_path / "br")])
    curves = json.loads((tmp_path / "br" / "curves.json").read_text())
    assert data["command"] == "barrier" and data["report"]["barriers"]["naive"] == curves["naive"]["summary"]
    seen.add("barrier")

    recipe = tmp_path / "merge.yaml"
    recipe.write_text(f"command: merge\nmodel: permerge.models:MLP\nmodel_kwargs: {{in_features: 20, hidden: [16, 16]}}\n"
                      f"input_shape: 2,20\ncheckpoints: [{a}, {b}]\nout: {tmp_path / 'rn'}\n")  # fmt: skip
    data = _json(capsys, ["run", str(recipe)])
    assert data["command"] == "merge" and data["recipe"] == str(recipe)
    assert torch.equal(load_file(tmp_path / "rn" / "model.safetensors")["net.1.weight"],
                       _merged_weight(tmp_path, ckpts, capsys))  # fmt: skip
    seen.add("run")

    pytest.importorskip("sklearn")
    data = _json(capsys, ["-q", "demo", "--quick", "--models", "mlp", "-o", str(tmp_path / "demo")])
    assert data["command"] == "demo" and [r["model"] for r in data["report"]["barriers_test_line"]] == ["mlp"]
    assert set(data["report"]["barriers_test_line"][0]["barriers"]) == {"naive", "weight-matched", "weight-matched + REPAIR"}
    seen.add("demo")
    assert seen == set(COMMANDS)


def _merged_weight(tmp_path, ckpts, capsys):
    """The same merge from the command line (the recipe must give the same bits)."""
    a, b = ckpts
    assert main(["-q", "merge", *MODEL, a, b, "-o", str(tmp_path / "cli")]) == 0
    capsys.readouterr()
    return load_file(tmp_path / "cli" / "model.safetensors")["net.1.weight"]


def test_json_errors_are_one_object_on_stdout_and_one_line_on_stderr(ckpts, tmp_path, capsys):
    a, b = ckpts
    cases = [
        (["align", *MODEL, a, str(tmp_path / "nope.pt"), "-o", str(tmp_path / "x"), "--json"], "checkpoint B not found"),
        (["merge", *MODEL, a, b, "-o", str(tmp_path / "x"), "--bogus", "--json"], "unrecognized arguments: --bogus"),
        (["--json", "inspect", "no_such_model"], "cannot resolve model"),
    ]
    for argv, message in cases:
        assert main(argv) == 2
        captured = capsys.readouterr()
        data = json.loads(captured.out)
        assert data["exit_code"] == 2 and message in data["error"]
        assert captured.err.count("\n") == 1 and message in captured.err
        assert data["error"] == captured.err.strip()
    assert not (tmp_path / "x").exists()


def test_version(capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["--version"])
    assert exit_info.value.code == 0
    assert capsys.readouterr().out == f"permerge {__version__}\n"
    assert __version__ != "unknown"  # installed: the version comes from the package metadata
