"""Every user error is found before any tracing, in well under a second: one line, exit code 2,
nothing written. (The table of these cases is in docs/errors.md.)"""

from __future__ import annotations

import shutil
import time

import pytest
import torch
from safetensors.torch import save_file

from permerge.cli import main
from permerge.models import MLP

MODEL = ["--model", "permerge.models:MLP", "--model-kwargs", '{"hidden": [8]}', "--input-shape", "2,784"]


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    from hf_zoo import write

    root = tmp_path_factory.mktemp("validation")
    a, b = root / "a.safetensors", root / "b.safetensors"
    save_file(MLP(hidden=(8,)).state_dict(), a)
    save_file(MLP(hidden=(8,)).state_dict(), b)
    hf_a, hf_b = write("llama", 1, root / "hf_a"), write("llama", 2, root / "hf_b", shard="40KB")
    no_config = root / "no_config"
    shutil.copytree(hf_b, no_config)
    (no_config / "config.json").unlink()
    missing_shard = root / "missing_shard"
    shutil.copytree(hf_b, missing_shard)
    next(missing_shard.glob("model-00002-*.safetensors")).unlink()
    return {"a": a, "b": b, "hf_a": hf_a, "hf_b": hf_b, "no_config": no_config, "missing_shard": missing_shard, "root": root}


def _cases(f, out):
    a, b, hf_a, hf_b = (str(f[k]) for k in ("a", "b", "hf_a", "hf_b"))
    cuda = [] if torch.cuda.is_available() else [
        (["align", hf_a, hf_b, "-o", out, "--device", "cuda"], "CUDA is not available"),
        (["align", *MODEL, a, b, "-o", out, "--device", "cuda"], "CUDA is not available"),
    ]  # fmt: skip
    return [
        (["align", hf_a, hf_b, "-o", str(f["hf_b"] / "out")], "is inside input"),
        (["align", hf_a, hf_b, "-o", hf_b, "--force"], "is input"),
        (["align", hf_a, hf_b, "-o", str(f["root"]), "--force"], "contains input"),
        (["align", *MODEL, a, b, "-o", str(f["root"]), "--force"], "contains input"),
        (["align", hf_a, str(f["no_config"]), "-o", out], "has no config.json"),
        (["align", hf_a, str(f["missing_shard"]), "-o", out], "names shards missing"),
        (["align", hf_a, str(f["root"] / "nope"), "-o", out], "checkpoint B not found"),
        (["align", hf_a, hf_b, "-o", out, "--device", "tpu"], "is not a device name|runs on cpu, cuda or mps"),
        (["align", hf_a, hf_b, "-o", out, "--max-shard-size", "lots"], "cannot read size 'lots'"),
        (["align", hf_a, hf_b, "-o", out, "--out-dtype", "float8"], "unknown output dtype 'float8'"),
        (["align", hf_a, hf_b, "-o", out, "--workers", "0"], "--workers must be a positive integer"),
        (["align", hf_a, hf_b, "-o", out, "--method", "activation"], "weight matching only"),
        (["align", *MODEL, a, b, "-o", out, "--method", "sinkhorn9"], "no matcher named 'sinkhorn9'; registered:"),
        (["align", *MODEL, a, b, "-o", out, "--method", "activation"], "activation matching needs data"),
        (["align", *MODEL, a, b, "-o", out, "--out-dtype", "bfloat16"], "applies to Hugging Face directories"),
        (["align", *MODEL, a, b, "-o", out, "--spec", str(f["root"] / "none.json")], "cannot read --spec"),
        (["align", *MODEL, a, b, "-o", out, "--max-sweeps", "-1"], "--max-sweeps must be a positive integer"),
        (["align", *MODEL, a, b, "-o", out, "--restarts", "0"], "--restarts must be a positive integer"),
        (["align", *MODEL, a, b, "-o", out, "--method", "ste", "--restarts", "2"], "--restarts cannot be used with --method ste"),
        (["align", *MODEL, a, b, "-o", out, "--method", "sinkhorn"], "Sinkhorn matching needs data"),
        (["align", *MODEL, a, b, "-o", out, "--method", "sinkhorn", "--lr", "-1"], "--lr must be a positive number"),
        (["align", hf_a, hf_b, "-o", out, "--restarts", "2"], "--restarts applies to --model checkpoints only"),
        (["merge", *MODEL, a, b, "-o", out, "--method", "c2m3", "--max-rounds", "0"], "--max-rounds must be a positive integer"),
        (["merge", *MODEL, a, b, "-o", out, "--method", "c2m3", "--weights", "0.5,0.5"], "drop --weights"),
        (["merge", *MODEL, a, b, "-o", out, "--method", "nope"], "invalid choice: 'nope'"),
        (["merge", *MODEL, a, b, "-o", out, "--weights", "nan,nan"], "finite, in \\[0, 1\\] and sum to 1"),
        (["merge", *MODEL, a, b, "-o", out, "--weights", "0.2,0.3,0.5"], "3 weights for 2 models"),
        (["merge", *MODEL, a, b, a, "-o", out, "--method", "partial"], "merges exactly two models"),
        (["merge", *MODEL, a, b, "-o", out, "--method", "partial", "--budget", "3"], "budget ratios must be numbers in \\[1, 2\\]"),
        (["merge", *MODEL, a, b, "-o", out, "--method", "pleas"], "PLeaS needs unlabeled data"),
        (["merge", *MODEL, a, b, "-o", out, "--method", "many", "--weights", "0.5,0.5"], "drop --weights"),
        (["merge", *MODEL, a, str(f["root"] / "gone.pt"), "-o", out], "checkpoint 1 not found"),
        (["align", *MODEL, a, b, "-o", out, "--bogus"], "unrecognized arguments: --bogus"),
        *cuda,
    ]


def test_each_user_error_is_one_line_rc2_fast_and_before_tracing(files, tmp_path, monkeypatch, capsys):
    def no_tracing(*args, **kwargs):
        raise AssertionError("traced before validating")

    monkeypatch.setattr(torch.export, "export", no_tracing)
    out = str(tmp_path / "out")
    for argv, message in _cases(files, out):
        start = time.process_time()  # CPU time: wall time on this shared 2-core box includes other jobs' turns
        code = main(argv)
        seconds = time.process_time() - start
        err = capsys.readouterr().err
        assert code == 2, (argv, err)
        assert err.count("\n") == 1 and err.startswith("permerge"), (argv, err)
        assert pytest.importorskip("re").search(message, err), (argv, err)
        assert seconds < 1.0, (argv, seconds)
        assert not (tmp_path / "out").exists() and list(tmp_path.iterdir()) == [], argv
