"""Hugging Face directories in and out: from_pretrained loads the aligned B, which computes B's function."""

from __future__ import annotations

import json

import pytest
import torch
from hf_zoo import KINDS, build, digest, example, spec_of, transformers, write

import permerge as pm
from permerge.align_hf import align_hf
from permerge.cli import main
from permerge.io.read import load_state_dict, open_checkpoint
from permerge.io.write import load_permutation
from permerge.spec import PermutationSpec


@pytest.fixture(scope="session")
def dirs(tmp_path_factory):
    root = tmp_path_factory.mktemp("hf")
    return {k: (write(k, 1, root / f"{k}_a"), write(k, 2, root / f"{k}_b", shard="40KB")) for k in KINDS}


def _load(path):
    cls = getattr(transformers, json.loads((path / "config.json").read_text())["architectures"][0])
    model, info = cls.from_pretrained(path, output_loading_info=True)
    assert not any(info.values()), info  # no missing, unexpected or mismatched keys
    return model.eval()


@pytest.mark.parametrize("kind", KINDS)
def test_output_loads_and_computes_b(dirs, tmp_path, kind):
    a, b = dirs[kind]
    before = digest(a), digest(b)
    out = tmp_path / "out"
    res = align_hf(a, b, out, quiet=True, max_shard_size="30KB")
    assert (digest(a), digest(b)) == before  # inputs untouched
    files = {p.name for p in out.iterdir()}
    assert {"config.json", "model.safetensors.index.json", "permutation.safetensors", "spec.json", "provenance.json"} <= files
    assert (out / "config.json").read_text() == (b / "config.json").read_text()
    assert not any(p.name.startswith(".") for p in tmp_path.iterdir())  # no temp dir left
    # exactly B's keys (a tied lm_head stays absent), each equal to the in-memory permuted B, bit for bit
    spec = PermutationSpec.from_json((out / "spec.json").read_text())
    expected = pm.apply_permutation(spec, load_permutation(out / "permutation.safetensors"), load_state_dict(b))
    got = load_state_dict(out)
    assert sorted(got) == sorted(expected) and all(torch.equal(got[k], expected[k]) for k in got)
    assert any(not torch.equal(got[k], v) for k, v in load_state_dict(b).items())  # something moved
    model_b, aligned = _load(b), _load(out)
    x = example(kind)
    with torch.no_grad():
        yb, yo = model_b(x).logits, aligned(x).logits
    torch.testing.assert_close(yo, yb, rtol=1e-5, atol=1e-5)
    prov = json.loads((out / "provenance.json").read_text())
    assert prov["report"]["streamed"] is True and prov["report"]["changed_groups"] == res.report["changed_groups"] > 0


def test_tied_llama_keeps_the_checkpoint_keys(dirs):
    a, b = dirs["llama_tied"]
    spec = spec_of("llama_tied", str(b))
    with open_checkpoint(b) as src:
        assert "lm_head.weight" not in src.keys() and "lm_head.weight" not in spec.keys  # noqa: SIM118
    assert "model.embed_tokens.weight" in spec.keys


def test_renamed_keys_vit(dirs):
    """transformers 5 renames ViT's keys between files and modules; the spec names the files' keys."""
    _, b = dirs["vit"]
    spec = spec_of("vit", str(b))
    with open_checkpoint(b) as src:
        assert set(spec.keys) <= set(src.keys())
    assert any("attention.attention.query" in k for k in spec.keys)


def test_bf16_stays_bf16_unless_out_dtype(tmp_path):
    a, b = write("llama", 1, tmp_path / "a", torch.bfloat16), write("llama", 2, tmp_path / "b", torch.bfloat16)
    out = align_hf(a, b, tmp_path / "out", quiet=True).out
    sd = load_state_dict(out)
    assert {v.dtype for v in sd.values()} == {torch.bfloat16}
    spec = PermutationSpec.from_json((out / "spec.json").read_text())  # skip tracing again
    mem = align_hf(a, b, tmp_path / "mem", quiet=True, stream=False, spec=spec).out
    assert all(torch.equal(sd[k], v) for k, v in load_state_dict(mem).items())  # streamed == in memory
    f32 = align_hf(a, b, tmp_path / "f32", quiet=True, out_dtype="float32", spec=spec).out
    sd32 = load_state_dict(f32)
    assert {v.dtype for v in sd32.values()} == {torch.float32}
    assert all(torch.equal(sd32[k], sd[k].float()) for k in sd)
    assert json.loads((f32 / "config.json").read_text())["dtype"] == "float32"
    assert _load(f32).dtype == torch.float32


def test_interrupted_write_leaves_nothing(dirs, tmp_path, monkeypatch):
    import permerge.io.write as stream

    a, b = dirs["llama"]
    before = digest(a), digest(b)
    calls = {"n": 0}
    real = stream._tensor_bytes

    def failing(t):
        calls["n"] += 1
        if calls["n"] == 5:
            raise KeyboardInterrupt("simulated interruption mid-write")
        return real(t)

    monkeypatch.setattr(stream, "_tensor_bytes", failing)
    out = tmp_path / "out"
    with pytest.raises(KeyboardInterrupt):
        align_hf(a, b, out, quiet=True, max_shard_size="30KB", spec=spec_of("llama", str(b)))
    assert calls["n"] == 5
    assert not out.exists() and list(tmp_path.iterdir()) == []  # no output, no temp dir
    assert (digest(a), digest(b)) == before


def test_cli_aligns_hf_directories(dirs, tmp_path, capsys):
    a, b = dirs["llama"]
    out = tmp_path / "out"
    argv = ["align", str(a), str(b), "-o", str(out), "--workers", "2", "--max-shard-size", "50KB", "--out-dtype", "bfloat16"]
    assert main(argv) == 0
    assert "groups (weight, streamed); function check: relative error" in capsys.readouterr().out
    assert {v.dtype for v in load_state_dict(out).values()} == {torch.bfloat16}
    assert json.loads((out / "provenance.json").read_text())["config"]["workers"] == 2
    assert main(["align", str(a), str(b), "-o", str(out)]) == 2  # exists: refused
    assert "not empty" in capsys.readouterr().err
    assert main(["align", str(tmp_path / "nope"), str(b), "-o", str(tmp_path / "o2")]) == 2
    assert "checkpoint A not found" in capsys.readouterr().err


def test_meta_architecture_needs_no_weights(dirs):
    from permerge.hf import hf_architecture

    arch = hf_architecture(dirs["gpt2"][0])
    assert all(p.is_meta for p in arch.model.parameters())
    assert type(arch.model) is type(build("gpt2", 0))
