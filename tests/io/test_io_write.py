"""Writing: bit-exact safetensors, atomicity, input protection, output directories, provenance, permutations."""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
from datetime import datetime
from pathlib import Path

import numpy as np
import pytest
import torch
from bitexact import assert_bit_equal
from safetensors import safe_open
from safetensors.torch import save as safetensors_bytes

from permerge.errors import PermergeIOError
from permerge.io import (
    atomic_path,
    atomic_write,
    checkpoint_hashes,
    load_permutation,
    load_state_dict,
    prepare_output_dir,
    save_permutation,
    save_state_dict,
    write_provenance,
)


def make_sd() -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    return {
        "fc1.weight": torch.randn(8, 4, generator=g),
        "fc1.bias": torch.randn(8, generator=g).half(),
        "fc2.weight": torch.randn(3, 8, generator=g).bfloat16(),
        "special": torch.tensor([float("nan"), float("inf"), -0.0, 1e-40]).bfloat16(),
        "bn.num_batches_tracked": torch.tensor(7, dtype=torch.int64),
        "index": torch.arange(-5, 5, dtype=torch.int64),
    }


def sha(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def listing(directory: Path) -> list[str]:
    return sorted(p.name for p in directory.iterdir())


# --- atomic writes ------------------------------------------------------------------------------


def test_atomic_write_replaces_only_on_success(tmp_path: Path) -> None:
    target = tmp_path / "f.txt"
    target.write_text("old")
    assert atomic_write(target, lambda tmp: tmp.write_text("new")) == target
    assert target.read_text() == "new"
    assert listing(tmp_path) == ["f.txt"]


@pytest.mark.parametrize("exc", [RuntimeError("disk full"), KeyboardInterrupt()], ids=["error", "interrupt"])
def test_failed_writer_leaves_previous_file_and_no_temp(tmp_path: Path, exc: BaseException) -> None:
    target = tmp_path / "f.txt"
    target.write_text("previous content")

    def writer(tmp: Path) -> None:
        tmp.write_text("partial")
        raise exc

    with pytest.raises(type(exc)):
        atomic_write(target, writer)
    assert target.read_text() == "previous content"
    assert listing(tmp_path) == ["f.txt"]


def test_failed_block_creates_nothing_new(tmp_path: Path) -> None:
    def write_then_fail() -> None:
        with atomic_path(tmp_path / "new.safetensors") as tmp:
            tmp.write_bytes(b"partial")
            raise ValueError("boom")

    with pytest.raises(ValueError, match="boom"):
        write_then_fail()
    assert listing(tmp_path) == []


def test_temp_path_is_beside_target_and_hidden(tmp_path: Path) -> None:
    with atomic_path(tmp_path / "x.json") as tmp:
        assert tmp.parent == tmp_path
        assert tmp.name.startswith(".x.json.")
        assert not tmp.exists()
        tmp.write_text("{}")
    assert listing(tmp_path) == ["x.json"]


def test_writer_that_writes_nothing(tmp_path: Path) -> None:
    with pytest.raises(PermergeIOError, match=r"cannot write .*x\.bin: the writer created no file"):
        atomic_write(tmp_path / "x.bin", lambda tmp: None)
    assert listing(tmp_path) == []


def test_atomic_write_bad_destinations(tmp_path: Path) -> None:
    with pytest.raises(PermergeIOError, match=r"directory .*missing does not exist; create it first"):
        atomic_write(tmp_path / "missing" / "x.bin", lambda tmp: tmp.write_text(""))
    (tmp_path / "d").mkdir()
    with pytest.raises(PermergeIOError, match=r"cannot write .*d: it is a directory"):
        atomic_write(tmp_path / "d", lambda tmp: tmp.write_text(""))


# --- save_state_dict ----------------------------------------------------------------------------


def test_save_is_bit_exact_and_matches_safetensors_bytes(tmp_path: Path) -> None:
    sd = make_sd()
    path = save_state_dict(sd, tmp_path / "m.safetensors")
    assert path.read_bytes() == safetensors_bytes(sd, metadata={"format": "pt"})  # golden: plain safetensors
    assert_bit_equal(load_state_dict(path), sd)


def test_tied_weights_are_saved_under_every_name(tmp_path: Path) -> None:
    emb = torch.randn(10, 4)
    sd = {"embed_tokens.weight": emb, "lm_head.weight": emb, "norm.weight": torch.ones(4)}
    sd["qkv_view"] = emb[2:4]  # a view into the same storage, too
    save_state_dict(sd, tmp_path / "tied.safetensors")
    got = load_state_dict(tmp_path / "tied.safetensors")
    assert sorted(got) == sorted(sd)
    assert_bit_equal(got, {k: v.clone() for k, v in sd.items()})
    assert sd["lm_head.weight"] is emb
    assert sd["embed_tokens.weight"] is emb


def test_tied_parameters_of_a_module(tmp_path: Path) -> None:
    emb = torch.nn.Embedding(6, 3)
    head = torch.nn.Linear(3, 6, bias=False)
    head.weight = emb.weight
    model = torch.nn.ModuleDict({"embed": emb, "head": head})
    sd = model.state_dict(keep_vars=True)  # Parameters with requires_grad, sharing storage
    save_state_dict(sd, tmp_path / "m.safetensors")
    got = load_state_dict(tmp_path / "m.safetensors")
    assert torch.equal(got["embed.weight"], emb.weight.detach())
    assert torch.equal(got["head.weight"], emb.weight.detach())


def test_non_contiguous_and_sliced_tensors(tmp_path: Path) -> None:
    base = torch.randn(6, 8)
    sd = {
        "transposed": base.T,
        "strided": base[:, ::2],
        "row_slice": base[2:4],
        "expanded": torch.ones(3, 1).expand(3, 5),
    }
    assert not sd["transposed"].is_contiguous()
    assert not sd["strided"].is_contiguous()
    save_state_dict(sd, tmp_path / "nc.safetensors")
    assert_bit_equal(load_state_dict(tmp_path / "nc.safetensors"), {k: v.contiguous() for k, v in sd.items()})
    assert not sd["transposed"].is_contiguous()  # input untouched


def test_metadata_is_stored_with_format(tmp_path: Path) -> None:
    save_state_dict(make_sd(), tmp_path / "m.safetensors", {"source": "unit test"})
    with safe_open(str(tmp_path / "m.safetensors"), framework="pt") as f:
        assert f.metadata() == {"format": "pt", "source": "unit test"}


@pytest.mark.parametrize(
    ("sd", "pattern"),
    [
        ({}, r"nothing to save to .*m\.safetensors: no tensors given"),
        ({"w": torch.zeros(1), "lr": 0.1}, r"cannot save 'lr' to .*: state dicts map str to tensors, got str → float"),
        ({"w": torch.empty(2, device="meta")}, r"cannot save 'w' .*meta tensor with no data"),
    ],
    ids=["empty", "non-tensor", "meta"],
)
def test_save_refuses_bad_state_dicts(tmp_path: Path, sd, pattern: str) -> None:
    with pytest.raises(PermergeIOError, match=pattern):
        save_state_dict(sd, tmp_path / "m.safetensors")
    assert listing(tmp_path) == []


def test_save_refuses_bad_metadata_and_suffix(tmp_path: Path) -> None:
    with pytest.raises(PermergeIOError, match=r"metadata entry 'step' → 3 must map str to str"):
        save_state_dict(make_sd(), tmp_path / "m.safetensors", {"step": 3})
    with pytest.raises(PermergeIOError, match=r"cannot save to .*m\.pt: .*name the file \*\.safetensors"):
        save_state_dict(make_sd(), tmp_path / "m.pt")
    assert listing(tmp_path) == []


def test_save_refuses_to_overwrite_inputs(tmp_path: Path) -> None:
    inp = tmp_path / "in.safetensors"
    save_state_dict(make_sd(), inp)
    before = sha(inp)
    (tmp_path / "link.safetensors").symlink_to(inp)
    os.link(inp, tmp_path / "hard.safetensors")
    (tmp_path / "hf").mkdir()
    for target, protect in [
        (inp, [inp]),
        (tmp_path / "sub" / ".." / "in.safetensors", [str(inp)]),
        (tmp_path / "link.safetensors", [inp]),
        (tmp_path / "hard.safetensors", [inp]),
        (tmp_path / "hf" / "model.safetensors", [tmp_path / "hf"]),
    ]:
        with pytest.raises(PermergeIOError, match=r"refusing to write .*: it would overwrite input .*; choose"):
            save_state_dict({"w": torch.zeros(1)}, target, protect=protect)
    assert sha(inp) == before
    save_state_dict({"w": torch.zeros(1)}, tmp_path / "out.safetensors", protect=[inp, tmp_path / "hf"])


def test_round_trip_never_modifies_the_input(tmp_path: Path) -> None:
    inp = tmp_path / "in.safetensors"
    save_state_dict(make_sd(), inp)
    before = sha(inp)
    sd = load_state_dict(inp)
    save_state_dict(
        {k: v * 2 if v.is_floating_point() else v for k, v in sd.items()}, tmp_path / "out.safetensors", protect=[inp]
    )
    assert sha(inp) == before


# --- prepare_output_dir -------------------------------------------------------------------------


def test_prepare_output_dir_creates_nested(tmp_path: Path) -> None:
    out = prepare_output_dir(tmp_path / "a" / "b", force=False, inputs=[])
    assert out == tmp_path / "a" / "b"
    assert out.is_dir()
    assert prepare_output_dir(out, force=False, inputs=[]) == out  # an existing empty dir is fine


def test_prepare_output_dir_refuses_non_empty_without_force(tmp_path: Path) -> None:
    out = tmp_path / "out"
    out.mkdir()
    (out / "model.safetensors").write_text("old result")
    (out / "notes.txt").write_text("keep me")
    with pytest.raises(
        PermergeIOError, match=r"out is not empty \(2 entries, e\.g\. model\.safetensors, notes\.txt\).*force=True"
    ):
        prepare_output_dir(out, force=False, inputs=[])


@pytest.mark.parametrize("force", [False, True])
def test_prepare_output_dir_refuses_inputs(tmp_path: Path, force: bool) -> None:
    hf = tmp_path / "hf"
    hf.mkdir()
    save_state_dict(make_sd(), hf / "model.safetensors")
    before = checkpoint_hashes(hf)
    with pytest.raises(PermergeIOError, match=r"output directory .*hf is input .*hf; choose"):
        prepare_output_dir(hf, force=force, inputs=[hf])
    with pytest.raises(PermergeIOError, match=r"output directory .* contains input .*model\.safetensors"):
        prepare_output_dir(tmp_path, force=force, inputs=[hf / "model.safetensors"])
    with pytest.raises(PermergeIOError, match=r"contains input .*hf"):
        prepare_output_dir(tmp_path, force=force, inputs=[hf])
    with pytest.raises(PermergeIOError, match=r"output directory .*hf/out is inside input .*hf"):
        prepare_output_dir(hf / "out", force=force, inputs=[hf])
    assert checkpoint_hashes(hf) == before


def test_prepare_output_dir_refuses_a_file(tmp_path: Path) -> None:
    (tmp_path / "out").write_text("x")
    with pytest.raises(PermergeIOError, match=r"output path .*out exists and is not a directory"):
        prepare_output_dir(tmp_path / "out", force=True, inputs=[])


# --- provenance ---------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class _Options:
    method: str = "weight"
    max_iter: int = 100
    freeze: tuple[str, ...] = ("fc1",)


def test_provenance_contents(tmp_path: Path) -> None:
    a, hf = tmp_path / "a.safetensors", tmp_path / "hf"
    save_state_dict(make_sd(), a)
    hf.mkdir()
    save_state_dict(make_sd(), hf / "model.safetensors")
    (hf / "config.json").write_text("{}")
    out = prepare_output_dir(tmp_path / "out", force=False, inputs=[a, hf])
    config = {
        "out": out,
        "alphas": (0.0, 0.5, 1.0),
        "dtype": torch.bfloat16,
        "options": _Options(),
        "groups": {"b", "a"},
        "seed": np.int64(3),
        "small": torch.tensor([1, 2]),
        "big": torch.zeros(2048),
    }
    report = {"barrier": 0.25, "loss": np.array([0.5, 0.25]), "callback": len}
    path = write_provenance(
        out, command=["permerge", "align", str(a), str(hf)], config=config, inputs={"a": a, "b": hf}, report=report
    )
    assert path == out / "provenance.json"
    assert listing(out) == ["provenance.json"]
    record = json.loads(path.read_text())
    assert set(record) == {"versions", "platform", "created_utc", "command", "cwd", "config", "inputs", "report"}
    assert record["cwd"] == str(Path.cwd())
    assert set(record["versions"]) == {"permerge", "python", "torch", "numpy", "scipy", "safetensors", "cuda"}
    assert record["versions"]["torch"].split("+")[0] == torch.__version__.split("+")[0]
    assert record["versions"]["numpy"] == np.__version__
    assert datetime.fromisoformat(record["created_utc"]).utcoffset().total_seconds() == 0
    assert record["command"] == ["permerge", "align", str(a), str(hf)]
    assert record["config"] == {
        "out": str(out),
        "alphas": [0.0, 0.5, 1.0],
        "dtype": "torch.bfloat16",
        "options": {"method": "weight", "max_iter": 100, "freeze": ["fc1"]},
        "groups": ["a", "b"],
        "seed": 3,
        "small": [1, 2],
        "big": {"shape": [2048], "dtype": "torch.float32"},
    }
    assert record["report"]["barrier"] == 0.25
    assert record["report"]["loss"] == [0.5, 0.25]
    assert record["report"]["callback"] == repr(len)
    assert record["inputs"]["a"] == {"path": str(a.resolve()), "sha256": {"a.safetensors": sha(a)}}
    assert record["inputs"]["b"]["sha256"] == {
        "config.json": sha(hf / "config.json"),
        "model.safetensors": sha(hf / "model.safetensors"),
    }


def test_provenance_minimal_and_replaced_atomically(tmp_path: Path) -> None:
    a = tmp_path / "a.pt"
    torch.save(make_sd(), a)
    out = tmp_path / "out"
    out.mkdir()
    write_provenance(out, command="permerge demo", config={}, inputs={"a": a}, report=None)
    first = json.loads((out / "provenance.json").read_text())
    assert first["command"] == "permerge demo"
    assert first["report"] is None
    assert first["config"] == {}
    write_provenance(out, command="permerge demo --again", config={}, inputs={"a": a})
    assert json.loads((out / "provenance.json").read_text())["command"] == "permerge demo --again"
    assert listing(out) == ["provenance.json"]


def test_provenance_missing_input(tmp_path: Path) -> None:
    with pytest.raises(PermergeIOError, match=r"checkpoint not found: .*gone\.safetensors"):
        write_provenance(tmp_path, command="x", config={}, inputs={"a": tmp_path / "gone.safetensors"})
    assert listing(tmp_path) == []


# --- permutations -------------------------------------------------------------------------------


def test_permutation_round_trip(tmp_path: Path) -> None:
    g = torch.Generator().manual_seed(1)
    perm = {
        "fc1:out": torch.randperm(64, generator=g),
        "block.0/heads": torch.randperm(5, generator=g).int(),
        "one": torch.zeros(1, dtype=torch.int64),
    }
    path = save_permutation(perm, tmp_path / "perm.safetensors")
    got = load_permutation(path)
    assert sorted(got) == sorted(perm)
    assert all(got[k].dtype == torch.int64 and torch.equal(got[k], perm[k].long()) for k in perm)
    assert perm["block.0/heads"].dtype == torch.int32  # input untouched
    with safe_open(str(path), framework="pt") as f:
        assert f.metadata()["permerge"] == "permutation"


@pytest.mark.parametrize(
    "bad",
    [torch.tensor([0, 0, 1]), torch.tensor([1, 2, 3]), torch.tensor([0.0, 1.0]), torch.tensor([[0, 1]]), [0, 1]],
    ids=["repeat", "out-of-range", "float", "2-d", "list"],
)
def test_save_permutation_refuses_non_permutations(tmp_path: Path, bad) -> None:
    with pytest.raises(
        PermergeIOError, match=r"permutation of group 'layer1' .*not a 1-D integer vector holding each of 0\.\.n-1"
    ):
        save_permutation({"ok": torch.arange(3), "layer1": bad}, tmp_path / "p.safetensors")
    assert listing(tmp_path) == []


def test_load_permutation_refuses_other_files(tmp_path: Path) -> None:
    save_state_dict({"g": torch.tensor([2, 0, 1], dtype=torch.int32)}, tmp_path / "int32.safetensors")
    with pytest.raises(
        PermergeIOError, match=r"permutation of group 'g' has dtype torch\.int32, expected torch\.int64"
    ):
        load_permutation(tmp_path / "int32.safetensors")
    save_state_dict({"g": torch.randn(3)}, tmp_path / "weights.safetensors")
    with pytest.raises(PermergeIOError, match=r"weights\.safetensors: permutation of group 'g'"):
        load_permutation(tmp_path / "weights.safetensors")
