"""Streamed weight matching and the tensor-by-tensor writer: same answers as in memory, bounded reads."""

from __future__ import annotations

import pytest
import torch
from hf_zoo import KINDS, spec_of, write
from safetensors import safe_open
from safetensors.torch import load_file, save_file

import permerge as pm
from permerge.errors import PermergeIOError, StateDictMismatchError
from permerge.io.read import load_state_dict, open_checkpoint
from permerge.io.write import parse_size, permuted_producer, plan_write, shard_index, write_shard
from permerge.match import weight_matching
from permerge.match.stream import stream_weight_matching
from permerge.permutation import is_identity


@pytest.fixture(scope="session")
def pairs(tmp_path_factory):
    """kind → (A dir, B dir): float32 checkpoints of unrelated random inits."""
    root = tmp_path_factory.mktemp("stream")
    return {k: (write(k, 1, root / f"{k}_a"), write(k, 2, root / f"{k}_b")) for k in KINDS}


def _same(p, q):
    return sorted(p) == sorted(q) and all(torch.equal(p[k], q[k]) for k in p)


@pytest.mark.parametrize("kind", KINDS)
def test_streamed_equals_in_memory(pairs, kind):
    a, b = pairs[kind]
    spec = spec_of(kind, str(b))
    mem = weight_matching(spec, load_state_dict(a), load_state_dict(b), seed=3, quiet=True)
    with open_checkpoint(a, mmap=False) as sa, open_checkpoint(b, mmap=False) as sb:
        st = stream_weight_matching(spec, sa, sb, seed=3, quiet=True)
    assert not is_identity(st.permutation)
    assert _same(st.permutation, mem.permutation)
    assert (st.sweeps, st.converged) == (mem.sweeps, mem.converged)
    # equal up to float rounding: a dot product's summation order depends on the buffer's alignment
    assert st.total_before == pytest.approx(mem.total_before, rel=1e-6)
    assert st.total_after == pytest.approx(mem.total_after, rel=1e-6)
    assert st.total_after > st.total_before


def test_workers_give_the_same_result(pairs):
    a, b = pairs["llama"]
    spec = spec_of("llama", str(b))
    with open_checkpoint(a, mmap=False) as sa, open_checkpoint(b, mmap=False) as sb:
        one = stream_weight_matching(spec, sa, sb, seed=5, quiet=True, workers=1)
        many = stream_weight_matching(spec, sa, sb, seed=5, quiet=True, workers=3)
    assert _same(one.permutation, many.permutation)
    assert (one.sweeps, one.total_after) == (many.sweeps, many.total_after)


def test_max_sweeps_and_init_match_in_memory(pairs):
    a, b = pairs["gpt2"]
    spec = spec_of("gpt2", str(b))
    init = pm.random_permutation(spec, seed=9)
    mem = weight_matching(spec, load_state_dict(a), load_state_dict(b), max_sweeps=1, init=init, quiet=True)
    with open_checkpoint(a, mmap=False) as sa, open_checkpoint(b, mmap=False) as sb:
        st = stream_weight_matching(spec, sa, sb, max_sweeps=1, init=init, quiet=True)
    assert st.sweeps == 1 and _same(st.permutation, mem.permutation)


def test_bf16_streamed_equals_in_memory_and_recovers_planted(tmp_path):
    a = write("llama", 1, tmp_path / "a", torch.bfloat16)
    spec = spec_of("llama", str(a))
    sd_a = load_state_dict(a)
    planted = pm.random_permutation(spec, seed=4)
    sd_b = pm.apply_permutation(spec, planted, sd_a)
    (tmp_path / "b").mkdir()
    save_file({k: v.contiguous() for k, v in sd_b.items()}, tmp_path / "b" / "model.safetensors", metadata={"format": "pt"})
    mem = weight_matching(spec, sd_a, sd_b, quiet=True)
    with open_checkpoint(a, mmap=False) as sa, open_checkpoint(tmp_path / "b", mmap=False) as sb:
        assert sb.dtype("model.embed_tokens.weight") == torch.bfloat16
        st = stream_weight_matching(spec, sa, sb, quiet=True)
    assert _same(st.permutation, mem.permutation)
    aligned = pm.apply_permutation(spec, st.permutation, sd_b)
    assert all(torch.equal(aligned[k], sd_a[k]) for k in sd_a)  # the planted permutation, undone exactly


def test_refuses_mismatched_or_non_finite_checkpoints(pairs, tmp_path):
    a, b = pairs["llama"]
    spec = spec_of("llama", str(b))
    other = pairs["gpt2"][1]
    with open_checkpoint(a, mmap=False) as sa, open_checkpoint(other, mmap=False) as so, pytest.raises(StateDictMismatchError, match="different keys"):
        stream_weight_matching(spec, sa, so, quiet=True)
    sd = load_state_dict(b)
    sd["model.layers.0.mlp.up_proj.weight"][0, 0] = float("nan")
    save_file(sd, tmp_path / "nan.safetensors")
    with open_checkpoint(a, mmap=False) as sa, open_checkpoint(tmp_path / "nan.safetensors", mmap=False) as sn, pytest.raises(
        StateDictMismatchError, match="non-finite"
    ):
        stream_weight_matching(spec, sa, sn, quiet=True)


def test_unmapped_reads_what_safetensors_reads(tmp_path):
    d = write("gpt2", 1, tmp_path / "m", torch.bfloat16, shard="20KB")
    assert (d / "model.safetensors.index.json").is_file()
    with open_checkpoint(d, mmap=False) as un, open_checkpoint(d) as mm:
        assert un.keys() == mm.keys()
        for k in mm.keys():  # noqa: SIM118
            t = un.get(k)
            assert t.dtype == mm.dtype(k) == un.dtype(k) and t.shape == mm.shape(k) == un.shape(k)
            assert torch.equal(t, mm.get(k))
    single = tmp_path / "one.safetensors"
    save_file({"x": torch.arange(6.0).reshape(2, 3), "b": torch.tensor([True, False]), "s": torch.tensor(3.0)}, single)
    with open_checkpoint(single, mmap=False) as src:
        assert src.keys() == ("b", "s", "x")
        assert torch.equal(src.get("x"), torch.arange(6.0).reshape(2, 3)) and src.get("s").shape == ()
        assert torch.equal(src.get("b"), torch.tensor([True, False]))
    (tmp_path / "bad.safetensors").write_bytes(b"\x10\x00")
    with pytest.raises(PermergeIOError, match="corrupt"):
        open_checkpoint(tmp_path / "bad.safetensors", mmap=False)


def test_planned_writer_is_bit_exact_and_sharded(pairs, tmp_path):
    a, b = pairs["llama"]
    spec = spec_of("llama", str(b))
    perm = pm.random_permutation(spec, seed=2)
    expected = pm.apply_permutation(spec, perm, load_state_dict(b))
    with open_checkpoint(b, mmap=False) as src:
        shards = plan_write(src, spec, max_shard_size="30KB")
        assert len(shards) > 2 and all(s.nbytes <= 30_000 or len(s.jobs) == 1 for s in shards)
        assert sorted(shard_index(shards)["weight_map"]) == sorted(src.keys())
        for s in shards:
            write_shard(tmp_path / s.name, s, permuted_producer(src, perm))
    got = {}
    for s in shards:
        with safe_open(tmp_path / s.name, "pt") as f:
            assert f.metadata() == {"format": "pt"}
        got |= load_file(tmp_path / s.name)
    assert _same(got, expected)


def test_parse_size():
    assert parse_size("5GB") == 5 * 10**9 and parse_size("2GiB") == 2 * 2**30 and parse_size("500kb") == 500_000
    assert parse_size(123) == 123 and parse_size("1.5MB") == 1_500_000
    with pytest.raises(PermergeIOError, match="cannot read size"):
        parse_size("lots")
