"""`permerge align` / `permerge merge` in-process: outputs, refusals, and nothing written on error."""

from __future__ import annotations

import hashlib
import json
import os
import signal
import time

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


def test_align_restarts_and_learned_matching_options(ckpts, tmp_path, capsys):
    a, b = ckpts
    assert main(["align", *MODEL, str(a), str(b), "--restarts", "3", "-o", str(tmp_path / "r")]) == 0
    report = json.loads((tmp_path / "r" / "provenance.json").read_text())["report"]
    assert len(report["restarts"]) == 3 and report["total_after"] == max(report["restarts"])
    assert main(["align", *MODEL, str(a), str(b), "--steps", "5", "-o", str(tmp_path / "s")]) == 2
    assert "--steps cannot be used with --method weight" in capsys.readouterr().err
    assert main(["align", *MODEL, str(a), str(b), "--method", "ste", "--restarts", "2", "--lr", "0.1",
                 "-o", str(tmp_path / "t")]) == 2  # fmt: skip
    assert "--restarts cannot be used with --method ste" in capsys.readouterr().err
    assert not (tmp_path / "s").exists() and not (tmp_path / "t").exists()


def test_align_refuses_existing_output_unless_forced(ckpts, tmp_path, capsys):
    a, b = ckpts
    out = tmp_path / "out"
    out.mkdir()
    (out / "old.txt").write_text("previous run")
    assert main(["align", *MODEL, str(a), str(b), "-o", str(out)]) == 2
    assert "is not empty" in capsys.readouterr().err
    assert [p.name for p in out.iterdir()] == ["old.txt"]
    assert main(["align", *MODEL, str(a), str(b), "-o", str(out), "--force"]) == 0
    assert sorted(p.name for p in out.iterdir()) == ["model.safetensors", "permutation.safetensors", "provenance.json", "report.html", "spec.json"]


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
        message = r"non-finite \(NaN or inf\) weights in B \(.*bad.safetensors\)\['net.3.bias'\]"
    bad = tmp_path / "bad.safetensors"
    save_file(sd, bad)
    out = tmp_path / "out"
    assert main(["align", *MODEL, str(a), str(bad), "-o", str(out)]) == 2
    assert pytest.importorskip("re").search(message, capsys.readouterr().err)
    assert not out.exists() and not list(tmp_path.glob(".out.*"))


@pytest.mark.parametrize(("signal_name", "code", "message"), [("SIGINT", 130, "interrupted, nothing written"),
                                                                ("SIGTERM", 143, "interrupted (SIGTERM), nothing written")])
def test_interrupted_write_leaves_no_output(ckpts, tmp_path, monkeypatch, capsys, signal_name, code, message):
    """The signal arrives while the result is being written; in-process (the subprocess version, with
    SIGKILL too, is in test_cli_signals.py)."""
    a, b = ckpts
    out = tmp_path / "out"

    def interrupted(*args, **kwargs):
        os.kill(os.getpid(), getattr(signal, signal_name))
        time.sleep(1)  # the handler raises before this returns
        raise AssertionError("signal not delivered")

    monkeypatch.setattr("permerge.io.outputs.write_provenance", interrupted)
    # a shell starts background jobs with SIGINT ignored; test what Python does by default
    previous = signal.signal(signal.SIGINT, signal.default_int_handler)
    try:
        assert main(["align", *MODEL, str(a), str(b), "-o", str(out)]) == code
    finally:
        signal.signal(signal.SIGINT, previous)
    err = capsys.readouterr().err
    assert err == f"permerge align: {message}\n"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a.safetensors", "b.pt"]  # no output, no partial, no lock
    assert signal.getsignal(signal.SIGTERM) is signal.SIG_DFL  # the handler is main()'s only


@pytest.mark.parametrize("method", ["weight", "many", "c2m3", "average"])
def test_merge_methods(ckpts, tmp_path, capsys, method):
    a, b = ckpts
    out = tmp_path / method
    assert main(["merge", *MODEL, str(a), str(b), str(a), "--method", method, "-o", str(out)]) == 0
    assert f"merged 3 models ({method})" in capsys.readouterr().out
    merged = load_file(out / "model.safetensors")
    assert set(merged) == set(_mlp(0).state_dict())
    assert len(list(out.glob("permutation_*.safetensors"))) == (3 if method != "average" else 0)


def test_merge_many_round_limit_is_reported(ckpts, tmp_path):
    a, b = ckpts
    out = tmp_path / "many"
    with pytest.warns(UserWarning, match="MergeMany stopped after max_rounds=1"):
        assert main(["merge", *MODEL, str(a), str(b), str(a), "--method", "many", "--max-rounds", "1", "-o", str(out)]) == 0
    report = json.loads((out / "provenance.json").read_text())["report"]
    assert report["rounds"] == 1 and report["converged"] is False and report["objective_after"] >= report["objective_before"]


def test_merge_errors(ckpts, tmp_path, capsys):
    a, b = ckpts
    assert main(["merge", *MODEL, str(a), "-o", str(tmp_path / "x")]) == 2
    assert "at least two checkpoints" in capsys.readouterr().err
    assert main(["merge", *MODEL, str(a), str(b), "--weights", "0.9,0.9", "-o", str(tmp_path / "y")]) == 2
    assert "sum to 1" in capsys.readouterr().err
    assert main(["merge", *MODEL, str(a), str(b), "--weights", "a,b", "-o", str(tmp_path / "z")]) == 2
    assert "comma-separated numbers" in capsys.readouterr().err
    assert main(["merge", *MODEL, str(a), str(b), "--weights", "nan,nan", "-o", str(tmp_path / "n")]) == 2
    assert "finite" in capsys.readouterr().err
    assert not any((tmp_path / n).exists() for n in "xyzn")


@pytest.mark.parametrize("method", ["weight", "many", "average", "partial"])
def test_every_merge_method_records_a_numeric_function_check(ckpts, tmp_path, method):
    a, b = ckpts
    out = tmp_path / method
    extra = ["--budget", "1.5"] if method == "partial" else []
    assert main(["merge", *MODEL, str(a), str(b), "--method", method, "-o", str(out), *extra]) == 0
    report = __import__("json").loads((out / "provenance.json").read_text())["report"]
    err = report["function_preservation_error"]
    assert isinstance(err, float) and 0.0 <= err < 1e-5
    checks = [c for c in report["function_checks"] if c is not None]  # None: that model was not permuted
    assert len(checks) == (0 if method == "average" else 1)
    assert all(c["runs"] == ["eval, batch 2", "train (dropout off), batch 2", "eval, batch 3"] for c in checks)


def test_model_path_keeps_checkpoint_dtypes(tmp_path, capsys):
    """fp16 and bf16 checkpoints come out fp16 and bf16, integer buffers stay integer; a float
    parameter stored as int8 is refused with a message, before any tracing."""
    torch.manual_seed(0)
    base = ["--model", "resnet20", "--model-kwargs", '{"width": 1}']
    from permerge.models import ResNet20

    m = ResNet20()
    sd = {k: v.to(torch.bfloat16) if k.startswith("stem") and v.is_floating_point() else v.half() if v.is_floating_point() else v
          for k, v in m.state_dict().items()}  # fmt: skip
    a, b = tmp_path / "a.safetensors", tmp_path / "b.safetensors"
    save_file(sd, a)
    save_file({k: v if not v.is_floating_point() else v + 0.01 * torch.randn_like(v.float()).to(v.dtype)
               for k, v in sd.items()}, b)  # fmt: skip
    assert main(["align", *base, str(a), str(b), "-o", str(tmp_path / "out")]) == 0
    got = load_file(tmp_path / "out" / "model.safetensors")
    assert {k: v.dtype for k, v in got.items()} == {k: v.dtype for k, v in sd.items()}
    assert main(["merge", *base, str(a), str(b), "-o", str(tmp_path / "merged")]) == 0
    got = load_file(tmp_path / "merged" / "model.safetensors")
    assert {k: v.dtype for k, v in got.items()} == {k: v.dtype for k, v in sd.items()}
    capsys.readouterr()
    sd["stem.0.weight"] = sd["stem.0.weight"].to(torch.int8)
    save_file(sd, b)
    assert main(["align", *base, str(a), str(b), "-o", str(tmp_path / "bad")]) == 2
    assert "stores 'stem.0.weight' as torch.int8 where the model has torch.float32" in capsys.readouterr().err
    assert not (tmp_path / "bad").exists()


def test_align_symmetries_all_writes_scaled_permutations(ckpts, tmp_path, capsys):
    """A ReLU MLP's units take positive scales: ``--symmetries all`` aligns by scaled permutations,
    writes them to transform.safetensors, and the output still computes B's function."""
    a, b = ckpts
    out = tmp_path / "out"
    assert main(["align", *MODEL, str(a), str(b), "-o", str(out), "--symmetries", "all"]) == 0
    assert "transform.safetensors" in {p.name for p in out.iterdir()}
    t = load_file(out / "transform.safetensors")
    scales = [v for k, v in t.items() if k.endswith(".scale")]
    assert len(scales) == 2 and all(bool((s > 0).all()) for s in scales)
    assert any(not torch.allclose(s, torch.ones_like(s)) for s in scales)  # really scaled, not just permuted
    model_b, aligned = _mlp(1), _mlp(1)
    aligned.load_state_dict(load_file(out / "model.safetensors"))
    x = example_input("mlp")[0]
    with torch.no_grad():
        assert torch.allclose(aligned(x), model_b(x), atol=1e-4, rtol=1e-4)
    prov = __import__("json").loads((out / "provenance.json").read_text())
    assert prov["config"]["symmetries"] == "all" and prov["report"]["class_counts"] == {"scaled_permutation": 2}
    assert prov["report"]["function_preservation_error"] < 1e-5


@pytest.mark.parametrize(("extra", "message"), [
    (["--symmetries", "affine"], "unknown symmetry class"),
    (["--symmetries", "all", "--method", "ste", "--data", "x:y"], "--method ste aligns permutations only"),
])  # fmt: skip
def test_align_symmetries_refused_before_work(ckpts, tmp_path, capsys, extra, message):
    a, b = ckpts
    out = tmp_path / "out"
    code = main(["align", *MODEL, str(a), str(b), "-o", str(out), *extra])
    assert code != 0 and message in capsys.readouterr().err
    assert not out.exists()


def test_align_symmetries_need_model_for_hf_dirs(tmp_path, capsys):
    (tmp_path / "a").mkdir()
    (tmp_path / "b").mkdir()
    out = tmp_path / "out"
    assert main(["align", str(tmp_path / "a"), str(tmp_path / "b"), "-o", str(out), "--symmetries", "all"]) != 0
    assert "--symmetries beyond permutation needs --model" in capsys.readouterr().err
    assert not out.exists()
