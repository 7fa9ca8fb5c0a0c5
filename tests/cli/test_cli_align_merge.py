"""`permerge align` / `permerge merge` in-process: outputs, refusals, and nothing written on error."""

from __future__ import annotations

import hashlib

import pytest
import torch
from safetensors.torch import load_file, save_file

import permerge as pm
from permerge.cli import main
from permerge.io.write import load_permutation
from permerge.models import MLP, example_input
from permerge.spec import PermutationSpec


def _mlp(seed):
    torch.manual_seed(seed)
    return MLP(hidden=(16, 16)).eval()


@pytest.fixture
def ckpts(tmp_path):
    a, b = tmp_path / "a.safetensors", tmp_path / "b.pt"
    save_file(_mlp(0).state_dict(), a)
    torch.save(_mlp(1).state_dict(), b)
    return a, b


def _digest(p):
    return hashlib.sha256(p.read_bytes()).hexdigest()


MODEL = ["--model", "permerge.models:MLP", "--model-kwargs", '{"hidden": [16, 16]}', "--input-shape", "2,784"]


def test_align_writes_aligned_model_permutation_spec_provenance(ckpts, tmp_path, capsys):
    a, b = ckpts
    digests = (_digest(a), _digest(b))
    out = tmp_path / "out"
    assert main(["align", *MODEL, str(a), str(b), "-o", str(out)]) == 0
    assert "aligned 2/2 groups (weight)" in capsys.readouterr().out
    names = ["model.safetensors", "permutation.safetensors", "provenance.json", "report.html", "spec.json"]
    assert sorted(p.name for p in out.iterdir()) == names
    assert "<h2>Alignment</h2>" in (out / "report.html").read_text() and "net.1.weight:0" in (out / "report.html").read_text()
    assert (_digest(a), _digest(b)) == digests  # inputs untouched
    model_b, aligned = _mlp(1), _mlp(1)
    aligned.load_state_dict(load_file(out / "model.safetensors"))
    x = example_input("mlp")[0]
    with torch.no_grad():
        assert torch.allclose(aligned(x), model_b(x), atol=1e-5)  # same function as B
    spec = PermutationSpec.from_json((out / "spec.json").read_text())
    permuted = pm.apply_permutation(spec, load_permutation(out / "permutation.safetensors"), model_b.state_dict())
    assert all(torch.equal(permuted[k], v) for k, v in load_file(out / "model.safetensors").items())
    prov = __import__("json").loads((out / "provenance.json").read_text())
    assert prov["inputs"]["a"]["sha256"] == {"a.safetensors": digests[0]}
    assert prov["report"]["method"] == "weight" and prov["config"]["method"] == "weight"


def test_align_refuses_existing_output_unless_forced(ckpts, tmp_path, capsys):
    a, b = ckpts
    out = tmp_path / "out"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    assert main(["align", *MODEL, str(a), str(b), "-o", str(out)]) == 2
    assert "is not empty" in capsys.readouterr().err
    assert [p.name for p in out.iterdir()] == ["keep.txt"]
    assert main(["align", *MODEL, str(a), str(b), "-o", str(out), "--force"]) == 0
    assert (out / "keep.txt").read_text() == "mine" and (out / "model.safetensors").exists()


def test_align_refuses_to_write_into_an_input(ckpts, tmp_path, capsys):
    a, b = ckpts
    assert main(["align", *MODEL, str(a), str(b), "-o", str(tmp_path), "--force"]) == 2
    assert "contains input" in capsys.readouterr().err


@pytest.mark.parametrize("problem", ["missing", "shape", "nan"])
def test_bad_checkpoint_clear_error_nothing_written(ckpts, tmp_path, capsys, problem):
    a, b = ckpts
    sd = _mlp(1).state_dict()
    if problem == "missing":
        del sd["net.3.bias"]
        message = r"missing keys \['net.3.bias'\]"
    elif problem == "shape":
        sd["net.3.bias"] = torch.zeros(3)
        message = "wrong shape, e.g. 'net.3.bias': \\(3,\\), the model expects \\(16,\\)"
    else:
        sd["net.3.bias"][0] = float("nan")
        message = r"NaN or infinite values in \['net.3.bias'\]"
    bad = tmp_path / "bad.safetensors"
    save_file(sd, bad)
    out = tmp_path / "out"
    assert main(["align", *MODEL, str(a), str(bad), "-o", str(out)]) == 2
    assert pytest.importorskip("re").search(message, capsys.readouterr().err)
    assert not out.exists() and not list(tmp_path.glob(".out.*"))


def test_interrupted_write_leaves_no_output(ckpts, tmp_path, monkeypatch):
    a, b = ckpts
    out = tmp_path / "out"

    def boom(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr("permerge.io.outputs.write_provenance", boom)
    with pytest.raises(KeyboardInterrupt):
        main(["align", *MODEL, str(a), str(b), "-o", str(out)])
    assert not out.exists() and not list(tmp_path.glob(".out.*"))


@pytest.mark.parametrize("method", ["weight", "many", "average"])
def test_merge_methods(ckpts, tmp_path, capsys, method):
    a, b = ckpts
    out = tmp_path / method
    assert main(["merge", *MODEL, str(a), str(b), str(a), "--method", method, "-o", str(out)]) == 0
    assert f"merged 3 models ({method})" in capsys.readouterr().out
    merged = load_file(out / "model.safetensors")
    assert set(merged) == set(_mlp(0).state_dict())
    assert len(list(out.glob("permutation_*.safetensors"))) == (3 if method != "average" else 0)


def test_merge_errors(ckpts, tmp_path, capsys):
    a, b = ckpts
    assert main(["merge", *MODEL, str(a), "-o", str(tmp_path / "x")]) == 2
    assert "at least two checkpoints" in capsys.readouterr().err
    assert main(["merge", *MODEL, str(a), str(b), "--weights", "0.9,0.9", "-o", str(tmp_path / "y")]) == 2
    assert "sum to 1" in capsys.readouterr().err
    assert main(["merge", *MODEL, str(a), str(b), "--weights", "a,b", "-o", str(tmp_path / "z")]) == 2
    assert "comma-separated numbers" in capsys.readouterr().err
    assert not any((tmp_path / n).exists() for n in "xyz")
