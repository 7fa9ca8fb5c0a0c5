"""Result directories: claimed before work, written all or nothing, replaced whole with force, locked,
cleaned after dead runs, and every OS error one line."""

from __future__ import annotations

import errno
import logging
import os
from collections import namedtuple
from pathlib import Path

import pytest

import permerge.io.outputs as outputs
from permerge.errors import PermergeIOError
from permerge.io.outputs import OutputDir, write_files
from permerge.io.write import text_writer

Usage = namedtuple("Usage", "total used free")


def _files(**texts: str):
    return {name: text_writer(text) for name, text in texts.items()}


def _commit(od: OutputDir, **texts: str) -> Path:
    return od.commit(_files(**texts), command=["test"], config={}, report={})


def _hidden(root: Path) -> list[str]:
    return sorted(p.name for p in root.iterdir() if p.name.startswith("."))


def test_new_directory_has_exactly_the_files_and_no_leftovers(tmp_path):
    out = tmp_path / "deep" / "out"
    with OutputDir(out, force=False, inputs={}) as od:
        assert not out.exists()  # nothing visible until the commit
        _commit(od, **{"a.txt": "A", "b.json": "{}"})
    assert sorted(p.name for p in out.iterdir()) == ["a.txt", "b.json", "provenance.json"]
    assert _hidden(out.parent) == []  # partial directory renamed, lock file removed


def test_failure_before_commit_leaves_nothing_not_even_parents(tmp_path):
    out = tmp_path / "new" / "deeper" / "out"
    with pytest.raises(KeyboardInterrupt), OutputDir(out, force=False, inputs={}) as od:
        assert od.out.parent.is_dir()
        raise KeyboardInterrupt
    assert list(tmp_path.iterdir()) == []


def test_failing_writer_leaves_the_old_output_untouched(tmp_path):
    out = tmp_path / "out"
    write_files(out, _files(**{"old.txt": "old"}), force=False, inputs={}, command=[], config={}, report={})

    def broken(path):
        path.write_text("half")
        raise RuntimeError("writer failed")

    with pytest.raises(RuntimeError), OutputDir(out, force=True, inputs={}) as od:
        od.commit({"new.txt": broken}, command=[], config={}, report={})
    assert sorted(p.name for p in out.iterdir()) == ["old.txt", "provenance.json"]
    assert _hidden(tmp_path) == []


def test_force_replaces_the_whole_directory(tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    for name in ("model-00001-of-00002.safetensors", "model-00002-of-00002.safetensors", "model.safetensors.index.json"):
        (out / name).write_text("stale")
    (out / "sub").mkdir()
    with pytest.raises(PermergeIOError, match="not empty"):
        OutputDir(out, force=False, inputs={}).__enter__()
    write_files(out, _files(**{"model.safetensors": "new"}), force=True, inputs={}, command=[], config={}, report={})
    assert sorted(p.name for p in out.iterdir()) == ["model.safetensors", "provenance.json"]
    assert _hidden(tmp_path) == []


def test_a_second_claim_on_one_output_fails_cleanly(tmp_path):
    out = tmp_path / "out"
    with OutputDir(out, force=True, inputs={}) as first:
        with pytest.raises(PermergeIOError, match="another permerge run is writing .*out"):
            OutputDir(out, force=True, inputs={}).__enter__()
        _commit(first, **{"x.txt": "1"})
    with OutputDir(out, force=True, inputs={}) as again:  # released: the next run proceeds
        _commit(again, **{"y.txt": "2"})
    assert sorted(p.name for p in out.iterdir()) == ["provenance.json", "y.txt"]


def test_dead_runs_partials_are_removed_and_a_dead_swap_is_undone(tmp_path, caplog):
    out = tmp_path / "out"
    (tmp_path / ".out.dead0001.partial").mkdir()
    (tmp_path / ".out.dead0001.partial" / "model.safetensors").write_text("half")
    (tmp_path / ".out.dead0002.old").mkdir()  # a run killed between moving out aside and moving its result in
    (tmp_path / ".out.dead0002.old" / "model.safetensors").write_text("previous result")
    with caplog.at_level(logging.WARNING, logger="permerge.io.outputs"), pytest.raises(PermergeIOError, match="not empty"):
        OutputDir(out, force=False, inputs={}).__enter__()  # the restored output is not empty
    assert (out / "model.safetensors").read_text() == "previous result"
    with caplog.at_level(logging.WARNING, logger="permerge.io.outputs"), OutputDir(out, force=True, inputs={}) as od:
        _commit(od, **{"new.txt": "n"})
    assert "restoring" in caplog.text and "removed 1 unfinished output(s) of interrupted runs: .out.dead0001.partial" in caplog.text
    assert _hidden(tmp_path) == []


def test_paths_refused_before_work(tmp_path):
    inp = tmp_path / "in"
    inp.mkdir()
    (inp / "w.safetensors").write_text("x")
    for out, relation in ((inp, "is"), (inp / "sub", "is inside"), (tmp_path, "contains")):
        with pytest.raises(PermergeIOError, match=f"{relation} input"):
            OutputDir(out, force=True, inputs={"a": inp}).__enter__()
    link = tmp_path / "link"
    link.symlink_to(tmp_path / "missing")
    with pytest.raises(PermergeIOError, match="dangling symbolic link"):
        OutputDir(link, force=True, inputs={}).__enter__()
    (tmp_path / "file").write_text("x")
    with pytest.raises(PermergeIOError, match="not a directory"):
        OutputDir(tmp_path / "file", force=True, inputs={}).__enter__()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["file", "in", "link"]


def test_symlinked_output_directory_is_replaced_at_its_target(tmp_path):
    target = tmp_path / "real"
    target.mkdir()
    (target / "old.txt").write_text("old")
    link = tmp_path / "link"
    link.symlink_to(target)
    write_files(link, _files(**{"new.txt": "n"}), force=True, inputs={}, command=[], config={}, report={})
    assert link.is_symlink() and sorted(p.name for p in link.iterdir()) == ["new.txt", "provenance.json"]


@pytest.mark.parametrize(
    ("code", "text"),
    [(errno.EROFS, "read-only"), (errno.EACCES, "permissions"), (errno.ENOSPC, "free some space")],
)
def test_os_errors_are_one_line_and_leave_nothing(tmp_path, monkeypatch, code, text):
    """The tests run as root, where chmod does not deny anything: the OS error is injected where
    the directory is created (at claim) and where a file is written (at commit)."""
    real_mkdir = Path.mkdir

    def failing_mkdir(self, *args, **kwargs):
        if self.name.endswith(".partial"):
            raise OSError(code, os.strerror(code), str(self))
        return real_mkdir(self, *args, **kwargs)

    monkeypatch.setattr(Path, "mkdir", failing_mkdir)
    with pytest.raises(PermergeIOError, match=text) as info:
        OutputDir(tmp_path / "out", force=False, inputs={}).__enter__()
    assert "\n" not in str(info.value) and os.strerror(code) in str(info.value)
    monkeypatch.setattr(Path, "mkdir", real_mkdir)
    assert list(tmp_path.iterdir()) == []

    def full(path):
        raise OSError(code, os.strerror(code), str(path))

    with pytest.raises(PermergeIOError, match=f"nothing was written.*{text}") as info, OutputDir(tmp_path / "out", force=False, inputs={}) as od:
        od.commit({"model.safetensors": full}, command=[], config={}, report={})
    assert "\n" not in str(info.value)
    assert list(tmp_path.iterdir()) == []


def test_free_space_is_checked_at_claim(tmp_path, monkeypatch):
    monkeypatch.setattr(outputs.shutil, "disk_usage", lambda p: Usage(10**12, 10**12 - 10**6, 10**6))
    with pytest.raises(PermergeIOError, match=r"not enough free space .* 2.04 GB needed, 1.00 MB free"):
        OutputDir(tmp_path / "out", force=False, inputs={}, expected_bytes=2e9).__enter__()
    assert list(tmp_path.iterdir()) == []
    with OutputDir(tmp_path / "out", force=False, inputs={}, expected_bytes=1e5) as od:
        _commit(od, **{"a": "b"})
