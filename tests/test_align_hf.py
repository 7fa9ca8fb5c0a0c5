"""The Hugging Face pipeline's guarantees: configs compared before any work, a numeric function check
on every run (streamed too), nothing written on failure, clean outputs, tied checkpoints, spec round trips."""

from __future__ import annotations

import dataclasses
import json
import shutil
import sys

import pytest
import torch
from hf_zoo import KINDS, build, digest, example, spec_of, transformers, write

import permerge as pm
from permerge.align_hf import align_hf
from permerge.cli import main
from permerge.errors import ConfigMismatchError, FunctionNotPreservedError, StateDictMismatchError
from permerge.io.read import load_state_dict, open_checkpoint
from permerge.io.write import load_permutation
from permerge.spec import PermutationSpec


@pytest.fixture(scope="module")
def dirs(tmp_path_factory):
    root = tmp_path_factory.mktemp("hfpipe")
    return {k: (write(k, 1, root / f"{k}_a"), write(k, 2, root / f"{k}_b")) for k in KINDS}


def _load(path):
    cls = getattr(transformers, json.loads((path / "config.json").read_text())["architectures"][0])
    return cls.from_pretrained(path).eval()


def _nothing_written(root, out):
    assert not out.exists()
    assert not [p.name for p in root.iterdir() if p.name.startswith(".")]  # no partial dir, no lock file


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("stream", [True, False])
def test_every_run_records_a_numeric_function_error(dirs, tmp_path, kind, stream):
    a, b = dirs[kind]
    res = align_hf(a, b, tmp_path / "out", stream=stream, quiet=True, spec=spec_of(kind, str(b)))
    report = json.loads((tmp_path / "out" / "provenance.json").read_text())["report"]
    err = report["function_preservation_error"]
    assert isinstance(err, float) and 0.0 <= err < 1e-5, err
    assert err == res.report["function_preservation_error"]
    assert report["function_check"]["runs"] == ["eval, batch 1 (streamed)"]
    assert report["changed_groups"] > 0  # something moved, so the check compared two different weight sets


def test_head_layout_mismatch_is_refused_before_matching(tmp_path, monkeypatch):
    """8 heads of 4 vs 4 heads of 8: every tensor has the same shape, the functions differ."""
    a = write("llama", 1, tmp_path / "a")
    b = write("llama", 2, tmp_path / "b", num_attention_heads=8, num_key_value_heads=4)
    assert {k: v.shape for k, v in load_state_dict(a).items()} == {k: v.shape for k, v in load_state_dict(b).items()}
    called = []
    module = sys.modules["permerge.align_hf"]  # the attribute permerge.align_hf is the function
    monkeypatch.setattr(module, "stream_weight_matching", lambda *a, **k: called.append(1))
    monkeypatch.setattr(module, "trace_graph", lambda *a, **k: called.append(1))
    with pytest.raises(ConfigMismatchError, match=r"config.json field 'head_dim' is 8 vs 4 \(and 2 more: num_attention_heads, num_key_value_heads\)"):
        align_hf(a, b, tmp_path / "out", quiet=True)
    assert called == []
    assert not (tmp_path / "out").exists()
    assert main(["align", str(a), str(b), "-o", str(tmp_path / "out")]) == 2


def test_corrupted_spec_fails_the_streamed_check_and_writes_nothing(dirs, tmp_path):
    a, b = dirs["llama"]
    spec = spec_of("llama", str(b))
    # the MLP's hidden units: drop down_proj's columns, so up/gate rows move and down_proj does not
    g = next(g for g in spec.groups if any(ax.key.endswith("mlp.up_proj.weight") for ax in g.members))
    broken = dataclasses.replace(g, members=tuple(ax for ax in g.members if "down_proj" not in ax.key))
    bad = PermutationSpec(tuple(broken if x.name == g.name else x for x in spec.groups), spec.frozen)
    before = digest(a), digest(b)
    with pytest.raises(FunctionNotPreservedError, match="streamed check"):
        align_hf(a, b, tmp_path / "out", spec=bad, quiet=True)
    _nothing_written(tmp_path, tmp_path / "out")
    assert (digest(a), digest(b)) == before


def test_force_over_a_sharded_output_leaves_exactly_the_new_files(dirs, tmp_path):
    a, b = dirs["gpt2"]
    out = tmp_path / "out"
    spec = spec_of("gpt2", str(b))
    align_hf(a, b, out, quiet=True, max_shard_size="20KB", spec=spec)
    assert len(list(out.glob("model-*.safetensors"))) > 2 and (out / "model.safetensors.index.json").is_file()
    with pytest.raises(pm.PermergeError, match="not empty"):
        align_hf(a, b, out, quiet=True, spec=spec)
    align_hf(a, b, out, quiet=True, force=True, spec=spec)
    assert sorted(p.name for p in out.iterdir()) == [
        "README.md", "config.json", "generation_config.json", "model.safetensors", "permutation.safetensors",
        "provenance.json", "spec.json",
    ]  # fmt: skip
    assert _load(out) is not None
    assert not [p.name for p in tmp_path.iterdir() if p.name.startswith(".")]


def test_foreign_weight_files_are_left_out_and_listed(dirs, tmp_path):
    a, b0 = dirs["llama"]
    b = tmp_path / "b"
    shutil.copytree(b0, b)
    foreign = ["tf_model.h5", "flax_model.msgpack", "model.onnx", "model-q4.gguf", "rust_model.ot", "pytorch_model.bin"]
    for name in foreign:
        (b / name).write_bytes(b"unpermuted weights")
    (b / "tokenizer.json").write_text('{"version": "1.0"}')
    (b / "README.md").write_text("# model card\n")
    (b / "notes.txt").write_text("scratch")
    (b / "onnx").mkdir()
    out = tmp_path / "out"
    res = align_hf(a, b, out, quiet=True, spec=spec_of("llama", str(b0)))
    files = {p.name for p in out.iterdir()}
    assert {"tokenizer.json", "README.md"} <= files and not (files & {*foreign, "notes.txt", "onnx"})
    assert (out / "README.md").read_text().startswith("---\nlibrary_name: transformers\n")  # B's card is replaced
    left_out = json.loads((out / "provenance.json").read_text())["report"]["left_out"]
    assert left_out == res.report["left_out"]
    assert sorted(left_out) == sorted([*foreign, "notes.txt", "onnx", "README.md"])
    assert "replaced by permerge's" in left_out["README.md"]
    assert "TensorFlow" in left_out["tf_model.h5"] and "unpermuted" in left_out["model-q4.gguf"]
    assert "unpermuted" in left_out["pytorch_model.bin"] and "allow-list" in left_out["notes.txt"]


def test_tied_hf_checkpoints_work_with_model(dirs, tmp_path, capsys):
    a, b = dirs["llama_tied"]
    out = tmp_path / "out"
    assert main(["align", "--model", str(a), str(a), str(b), "-o", str(out)]) == 0
    assert "function check: relative error" in capsys.readouterr().out
    with open_checkpoint(b) as src:
        keys = set(src.keys())
    got = load_state_dict(out / "model.safetensors")
    assert set(got) == keys and "lm_head.weight" not in got  # the checkpoint's keys, not the module's
    spec = PermutationSpec.from_json((out / "spec.json").read_text())
    expected = pm.apply_permutation(spec, load_permutation(out / "permutation.safetensors"), load_state_dict(b))
    assert all(torch.equal(got[k], expected[k]) for k in keys)
    model_b, aligned = _load(b), build("llama_tied", 0)
    aligned.load_state_dict(got, strict=False)
    aligned.tie_weights()
    x = example("llama_tied")
    with torch.no_grad():
        torch.testing.assert_close(aligned(x).logits, model_b(x).logits, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("kind", ["vit", "llama_tied"])
def test_save_spec_round_trips_into_align(dirs, tmp_path, kind, capsys):
    a, b = dirs[kind]
    spec_file = tmp_path / "spec.json"
    assert main(["inspect", str(b), "--save-spec", str(spec_file)]) == 0
    saved = PermutationSpec.from_json(spec_file.read_text())
    with open_checkpoint(b) as src:
        assert set(saved.keys) <= set(src.keys())  # checkpoint keys: renamed (ViT), tied alias absent
    assert saved.keys == spec_of(kind, str(b)).keys
    capsys.readouterr()
    assert main(["align", str(a), str(b), "-o", str(tmp_path / "hf"), "--spec", str(spec_file)]) == 0
    assert main(["align", "--model", str(a), str(a), str(b), "-o", str(tmp_path / "mem"), "--spec", str(spec_file)]) == 0
    assert "function check" in capsys.readouterr().out


def test_config_only_dir_saves_checkpoint_keys(dirs, tmp_path):
    """inspect on a directory with only config.json names the keys save_pretrained would write."""
    _, b = dirs["vit"]
    cfg = tmp_path / "cfg"
    cfg.mkdir()
    shutil.copy(b / "config.json", cfg / "config.json")
    assert main(["inspect", str(cfg), "--save-spec", str(tmp_path / "s.json")]) == 0
    with open_checkpoint(b) as src:
        assert set(PermutationSpec.from_json((tmp_path / "s.json").read_text()).keys) <= set(src.keys())


def test_dtype_kind_mismatch_is_refused(dirs, tmp_path):
    a, b0 = dirs["llama"]
    b = tmp_path / "b"
    shutil.copytree(b0, b)
    sd = load_state_dict(b / "model.safetensors")
    sd["model.norm.weight"] = sd["model.norm.weight"].to(torch.int8)
    from safetensors.torch import save_file

    save_file(sd, b / "model.safetensors", metadata={"format": "pt"})
    with pytest.raises(StateDictMismatchError, match=r"stores 'model.norm.weight' as torch.int8 where the model has torch.float32"):
        align_hf(a, b, tmp_path / "out", quiet=True)
    _nothing_written(tmp_path, tmp_path / "out")
