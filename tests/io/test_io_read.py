"""Reading checkpoints: bit-exact loads of every supported kind, lazy access, and every error path."""

from __future__ import annotations

import hashlib
import json
import logging
import os
import pathlib
from pathlib import Path

import pytest
import torch
from bitexact import assert_bit_equal
from safetensors import SafetensorError
from safetensors.torch import save_file

import permerge.io.read as read_mod
from permerge.errors import PermergeError, PermergeIOError
from permerge.io import checkpoint_hashes, file_sha256, load_state_dict, open_checkpoint


def make_sd() -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    special = torch.tensor([float("nan"), float("inf"), -float("inf"), -0.0, 1e-40])
    return {
        "fc1.weight": torch.randn(8, 4, generator=g),
        "fc1.bias": torch.randn(8, generator=g).half(),
        "fc2.weight": torch.randn(3, 8, generator=g).bfloat16(),
        "special": special,
        "special_bf16": special.bfloat16(),
        "bn.num_batches_tracked": torch.tensor(7, dtype=torch.int64),
        "index": torch.arange(-5, 5, dtype=torch.int64),
    }


def sha(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


# --- whole-file loads ---------------------------------------------------------------------------


def test_safetensors_loads_bit_exact(tmp_path: Path) -> None:
    sd = make_sd()
    save_file(sd, tmp_path / "m.safetensors")
    assert_bit_equal(load_state_dict(tmp_path / "m.safetensors"), sd)


@pytest.mark.parametrize("suffix", [".pt", ".pth", ".bin"])
@pytest.mark.parametrize(
    ("wrap", "log_text"),
    [
        (lambda sd: sd, "at the top level"),
        (lambda sd: {"state_dict": sd, "epoch": 3, "hparams": {"lr": 0.1}}, "under 'state_dict'"),
        (lambda sd: {"model": sd, "optimizer": {"state": {}}}, "under 'model'"),
    ],
    ids=["raw", "state_dict", "model"],
)
def test_torch_checkpoint_shapes(tmp_path: Path, caplog: pytest.LogCaptureFixture, suffix, wrap, log_text) -> None:
    sd = make_sd()
    path = tmp_path / f"ckpt{suffix}"
    torch.save(wrap(sd), path)
    with caplog.at_level(logging.DEBUG, logger="permerge.io.read"):
        got = load_state_dict(path)
    assert list(got) == list(sd)  # pickles keep the state dict's order
    assert_bit_equal(got, sd)
    assert log_text in caplog.text


def test_torch_tied_weights_load(tmp_path: Path) -> None:
    emb = torch.randn(5, 3)
    torch.save({"embed.weight": emb, "lm_head.weight": emb}, tmp_path / "tied.pt")
    got = load_state_dict(tmp_path / "tied.pt")
    assert torch.equal(got["embed.weight"], emb)
    assert torch.equal(got["lm_head.weight"], emb)


def test_hf_dir_single_safetensors_preferred_over_bin(tmp_path: Path) -> None:
    sd = make_sd()
    save_file(sd, tmp_path / "model.safetensors")
    torch.save({"other": torch.zeros(1)}, tmp_path / "pytorch_model.bin")
    assert_bit_equal(load_state_dict(tmp_path), sd)


def test_hf_dir_pytorch_model_bin(tmp_path: Path) -> None:
    sd = make_sd()
    torch.save(sd, tmp_path / "pytorch_model.bin")
    (tmp_path / "config.json").write_text("{}")
    assert_bit_equal(load_state_dict(tmp_path), sd)


def write_sharded(directory: Path, sd: dict[str, torch.Tensor], *, bin_shards: bool = False) -> list[Path]:
    """Split ``sd`` over two shards plus an index.json, as transformers' save_pretrained does."""
    keys = list(sd)
    halves = [keys[: len(keys) // 2], keys[len(keys) // 2 :]]
    ext, stem = (".bin", "pytorch_model") if bin_shards else (".safetensors", "model")
    weight_map, shards = {}, []
    for i, part in enumerate(halves, 1):
        name = f"{stem}-{i:05d}-of-00002{ext}"
        tensors = {k: sd[k] for k in part}
        if bin_shards:
            torch.save(tensors, directory / name)
        else:
            save_file(tensors, directory / name, metadata={"format": "pt"})
        weight_map |= {k: name for k in part}
        shards.append(directory / name)
    index = {"metadata": {"total_size": 0}, "weight_map": weight_map}
    (directory / f"{stem}{ext}.index.json").write_text(json.dumps(index))
    return shards


@pytest.mark.parametrize("bin_shards", [False, True], ids=["safetensors", "bin"])
def test_sharded_hf_dir(tmp_path: Path, bin_shards: bool) -> None:
    sd = make_sd()
    write_sharded(tmp_path, sd, bin_shards=bin_shards)
    got = load_state_dict(tmp_path)
    assert list(got) == list(sd)  # index order
    assert_bit_equal(got, sd)


def test_index_file_can_be_passed_directly(tmp_path: Path) -> None:
    sd = make_sd()
    write_sharded(tmp_path, sd)
    assert_bit_equal(load_state_dict(tmp_path / "model.safetensors.index.json"), sd)


def test_string_paths_accepted(tmp_path: Path) -> None:
    sd = make_sd()
    save_file(sd, tmp_path / "m.safetensors")
    assert_bit_equal(load_state_dict(str(tmp_path / "m.safetensors")), sd)


# --- lazy sources -------------------------------------------------------------------------------


class _SpyHandle:
    """Wraps a safe_open handle, recording which tensors were materialised."""

    def __init__(self, handle, log: list[str]) -> None:
        self._handle, self._log = handle, log

    def get_tensor(self, key: str) -> torch.Tensor:
        self._log.append(key)
        return self._handle.get_tensor(key)

    def __getattr__(self, name: str):
        return getattr(self._handle, name)


@pytest.fixture
def spy(monkeypatch: pytest.MonkeyPatch) -> dict[str, list[str]]:
    """Record every safetensors file opened and every tensor read through permerge.io.read."""
    record: dict[str, list[str]] = {"opened": [], "read": []}
    real = read_mod.safe_open

    def spying_open(path, **kwargs):
        record["opened"].append(Path(path).name)
        return _SpyHandle(real(path, **kwargs), record["read"])

    monkeypatch.setattr(read_mod, "safe_open", spying_open)
    return record


def test_lazy_safetensors_reads_only_what_is_asked(tmp_path: Path, spy) -> None:
    sd = make_sd()
    save_file(sd, tmp_path / "m.safetensors")
    with open_checkpoint(tmp_path / "m.safetensors") as src:
        assert set(src.keys()) == set(sd)
        assert len(src) == len(sd)
        for k in src.keys():
            assert src.shape(k) == sd[k].shape
            assert src.dtype(k) == sd[k].dtype
        assert spy["read"] == []  # metadata came from the header alone
        assert torch.equal(src.get("fc1.weight"), sd["fc1.weight"])
        assert spy["read"] == ["fc1.weight"]
        assert "fc1.weight" in src
        assert "nope" not in src


def test_sharded_source_opens_shards_lazily(tmp_path: Path, spy) -> None:
    sd = make_sd()
    first, second = write_sharded(tmp_path, sd)
    with open_checkpoint(tmp_path) as src:
        assert list(src.keys()) == list(sd)
        assert spy["opened"] == []  # only the index has been read
        first_key, last_key = list(sd)[0], list(sd)[-1]
        assert src.shape(first_key) == sd[first_key].shape
        assert src.dtype(first_key) == sd[first_key].dtype
        assert spy["opened"] == [first.name]
        assert spy["read"] == []
        assert torch.equal(src.get(last_key), sd[last_key])
        assert spy["opened"] == [first.name, second.name]
        assert spy["read"] == [last_key]
        src.get(list(sd)[1])
        assert spy["opened"] == [first.name, second.name]  # shard handles are reused


def test_torch_source_metadata(tmp_path: Path) -> None:
    sd = make_sd()
    torch.save(sd, tmp_path / "m.pt")
    with open_checkpoint(tmp_path / "m.pt") as src:
        assert src.keys() == tuple(sd)
        assert {k: (src.shape(k), src.dtype(k)) for k in src.keys()} == {k: (v.shape, v.dtype) for k, v in sd.items()}


@pytest.mark.parametrize("kind", ["safetensors", "pt", "sharded"])
def test_closed_source_refuses_reads(tmp_path: Path, kind: str) -> None:
    sd = make_sd()
    if kind == "safetensors":
        save_file(sd, tmp_path / "m.safetensors")
        path = tmp_path / "m.safetensors"
    elif kind == "pt":
        torch.save(sd, tmp_path / "m.pt")
        path = tmp_path / "m.pt"
    else:
        write_sharded(tmp_path, sd)
        path = tmp_path
    src = open_checkpoint(path)
    src.get("fc1.weight")
    src.close()
    src.close()  # idempotent
    assert "closed" in repr(src)
    with pytest.raises(PermergeIOError, match=r"closed; open it again"):
        src.get("fc1.weight")


def test_unknown_key_names_it_and_suggests(tmp_path: Path) -> None:
    save_file(make_sd(), tmp_path / "m.safetensors")
    with open_checkpoint(tmp_path / "m.safetensors") as src:
        with pytest.raises(PermergeIOError, match=r"no tensor named 'fc1.weigth'.*did you mean 'fc1.weight'"):
            src.get("fc1.weigth")
        with pytest.raises(PermergeIOError, match=r"no tensor named 'zzz' \(7 tensors\)$"):
            src.shape("zzz")


# --- inputs are never modified ------------------------------------------------------------------


@pytest.mark.parametrize("name", ["m.safetensors", "m.pt"])
def test_reading_and_mutating_results_leaves_file_intact(tmp_path: Path, name: str) -> None:
    path = tmp_path / name
    sd = make_sd()
    save_file(sd, path) if name.endswith(".safetensors") else torch.save(sd, path)
    before = sha(path)
    for t in load_state_dict(path).values():
        t.zero_()
    with open_checkpoint(path) as src:
        src.get("fc1.weight").add_(1)
    assert sha(path) == before
    assert_bit_equal(load_state_dict(path), sd)


# --- errors -------------------------------------------------------------------------------------


def test_error_types() -> None:
    assert issubclass(PermergeIOError, PermergeError)
    assert issubclass(PermergeIOError, OSError)


def test_missing_file(tmp_path: Path) -> None:
    with pytest.raises(PermergeIOError, match=r"checkpoint not found: .*nope\.safetensors"):
        load_state_dict(tmp_path / "nope.safetensors")
    with pytest.raises(PermergeIOError, match=r"checkpoint not found: .*nope\.safetensors"):
        checkpoint_hashes(tmp_path / "nope.safetensors")
    with pytest.raises(PermergeIOError, match=r"cannot hash .*nope\.bin"):
        file_sha256(tmp_path / "nope.bin")


def test_unknown_extension_lists_supported(tmp_path: Path) -> None:
    (tmp_path / "w.npz").write_bytes(b"x")
    with pytest.raises(
        PermergeIOError, match=r"w\.npz: unknown checkpoint extension '\.npz'; supported: \.safetensors, \.pt"
    ):
        open_checkpoint(tmp_path / "w.npz")


def test_empty_safetensors(tmp_path: Path) -> None:
    save_file({}, tmp_path / "empty.safetensors")
    with pytest.raises(PermergeIOError, match=r"empty\.safetensors holds no tensors"):
        load_state_dict(tmp_path / "empty.safetensors")


@pytest.mark.parametrize(
    ("obj", "pattern"),
    [
        ({"w": torch.zeros(2), "step": 3}, r"key 'step' holds a int, not a tensor"),
        ({"model": {"w": torch.zeros(2), "cfg": "x"}}, r"key 'cfg' \(under 'model'\) holds a str"),
        (
            {"state_dict": {"w": torch.zeros(2), "sub": {"x": torch.zeros(1)}}},
            r"key 'sub' \(under 'state_dict'\) holds a dict",
        ),
        ({0: torch.zeros(2)}, r"key 0 is a int; state dict keys must be str"),
        ([torch.zeros(2)], r"holds a list, not a state dict"),
        ({}, r"holds no tensors"),
        ({"state_dict": {}}, r"holds no tensors"),
    ],
    ids=["extra-int", "nested-str", "nested-dict", "int-key", "list", "empty", "empty-wrapped"],
)
def test_torch_checkpoint_without_tensors(tmp_path: Path, obj, pattern: str) -> None:
    torch.save(obj, tmp_path / "bad.pt")
    with pytest.raises(PermergeIOError, match=r"bad\.pt.*" + pattern):
        load_state_dict(tmp_path / "bad.pt")


def test_corrupt_safetensors_wraps_cause(tmp_path: Path) -> None:
    (tmp_path / "garbage.safetensors").write_bytes(b"not a safetensors file at all")
    save_file(make_sd(), tmp_path / "good.safetensors")
    data = (tmp_path / "good.safetensors").read_bytes()
    (tmp_path / "truncated.safetensors").write_bytes(data[:-16])
    for name in ("garbage.safetensors", "truncated.safetensors"):
        with pytest.raises(PermergeIOError, match=rf"cannot read .*{name} as safetensors .*re-download") as info:
            load_state_dict(tmp_path / name)
        assert isinstance(info.value.__cause__, SafetensorError)


def test_corrupt_torch_file_wraps_cause(tmp_path: Path) -> None:
    torch.save(make_sd(), tmp_path / "good.pt")
    data = (tmp_path / "good.pt").read_bytes()
    (tmp_path / "truncated.pt").write_bytes(data[: len(data) // 2])
    (tmp_path / "garbage.bin").write_bytes(b"\x00garbage")
    for name in ("truncated.pt", "garbage.bin"):
        with pytest.raises(PermergeIOError, match=rf"cannot read .*{name} as a torch checkpoint") as info:
            load_state_dict(tmp_path / name)
        assert info.value.__cause__ is not None


class _Exploit:
    """Unpickling this would create a file: weights_only loading must refuse it."""

    def __init__(self, target: Path) -> None:
        self.target = target

    def __reduce__(self):
        return (pathlib.Path.touch, (self.target,))


def test_pickled_code_is_never_run(tmp_path: Path) -> None:
    sentinel = tmp_path / "pwned"
    torch.save({"w": torch.zeros(1), "x": _Exploit(sentinel)}, tmp_path / "evil.pt")
    with pytest.raises(PermergeIOError, match=r"evil\.pt as a torch checkpoint.*weights_only"):
        load_state_dict(tmp_path / "evil.pt")
    assert not sentinel.exists()


def test_dir_without_weights(tmp_path: Path) -> None:
    (tmp_path / "config.json").write_text("{}")
    with pytest.raises(PermergeIOError, match=r"not a Hugging Face model directory: it has none of model\.safetensors"):
        open_checkpoint(tmp_path)
    torch.save({"w": torch.zeros(1)}, tmp_path / "weights.pt")
    with pytest.raises(PermergeIOError, match=r"it has weights\.pt: pass one of those files instead"):
        open_checkpoint(tmp_path)


def test_index_with_missing_shard_names_it(tmp_path: Path) -> None:
    _, second = write_sharded(tmp_path, make_sd())
    second.unlink()
    with pytest.raises(PermergeIOError, match=rf"names shards missing from .*: {second.name}; download them"):
        open_checkpoint(tmp_path)


def test_index_pointing_at_wrong_shard(tmp_path: Path) -> None:
    sd = make_sd()
    first, _ = write_sharded(tmp_path, sd)
    index_path = tmp_path / "model.safetensors.index.json"
    index = json.loads(index_path.read_text())
    last = list(sd)[-1]
    index["weight_map"][last] = first.name
    index_path.write_text(json.dumps(index))
    with open_checkpoint(tmp_path) as src:
        with pytest.raises(PermergeIOError, match=rf"maps '{last}' to shard {first.name}, which holds no such tensor"):
            src.get(last)


@pytest.mark.parametrize(
    "content",
    ["{not json", json.dumps({"metadata": {}}), json.dumps({"weight_map": {"w": 3}})],
    ids=["json", "no-map", "bad-map"],
)
def test_bad_index(tmp_path: Path, content: str) -> None:
    (tmp_path / "model.safetensors.index.json").write_text(content)
    with pytest.raises(PermergeIOError, match=r"model\.safetensors\.index\.json"):
        open_checkpoint(tmp_path)


# --- hashes -------------------------------------------------------------------------------------


def test_file_sha256_streams_large_files(tmp_path: Path) -> None:
    data = os.urandom(5 * (1 << 20) // 2)  # 2.5 MiB: several chunks and a partial one
    (tmp_path / "blob.bin").write_bytes(data)
    assert file_sha256(tmp_path / "blob.bin") == hashlib.sha256(data).hexdigest()


def test_checkpoint_hashes_of_file_and_dir(tmp_path: Path) -> None:
    shards = write_sharded(tmp_path, make_sd())
    (tmp_path / "config.json").write_text('{"hidden_size": 8}')
    (tmp_path / "README.md").write_text("not hashed")
    (tmp_path / ".model.safetensors.1234.tmp").write_text("hidden temp file")
    (tmp_path / "sub").mkdir()
    hashes = checkpoint_hashes(tmp_path)
    expected = sorted(["config.json", "model.safetensors.index.json", *(s.name for s in shards)])
    assert list(hashes) == expected
    assert all(hashes[name] == sha(tmp_path / name) for name in expected)
    assert checkpoint_hashes(shards[0]) == {shards[0].name: sha(shards[0])}


def test_checkpoint_hashes_of_dir_without_weights(tmp_path: Path) -> None:
    (tmp_path / "notes.txt").write_text("x")
    with pytest.raises(PermergeIOError, match=r"holds no weight or config files to hash"):
        checkpoint_hashes(tmp_path)
