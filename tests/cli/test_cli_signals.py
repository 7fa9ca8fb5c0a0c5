"""Real processes: a run interrupted by SIGINT, SIGTERM or SIGKILL leaves no output (a killed one
leaves a hidden partial directory the next run removes), and a clean rerun succeeds; two concurrent
``--force`` runs on one output: one fails cleanly, the other writes."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

pytestmark = pytest.mark.slow

SLOW_MODEL = '''
import os, time, torch
from permerge.models import MLP

class SlowMLP(MLP):
    def forward(self, x):
        time.sleep(float(os.environ.get("PERMERGE_TEST_DELAY", "0")))
        return super().forward(x)

def make():
    return SlowMLP(in_features=8, hidden=(8,), num_classes=3)

def example_inputs():
    return torch.randn(2, 8)
'''


@pytest.fixture
def setup(tmp_path):
    (tmp_path / "slowmodel.py").write_text(SLOW_MODEL)
    sys.path.insert(0, str(tmp_path))
    try:
        from permerge.models import MLP

        for name, seed in (("a", 0), ("b", 1)):
            torch.manual_seed(seed)
            save_file(MLP(in_features=8, hidden=(8,), num_classes=3).state_dict(), tmp_path / f"{name}.safetensors")
    finally:
        sys.path.remove(str(tmp_path))
    return tmp_path


def _start(root: Path, out: Path, delay: float, *extra: str) -> subprocess.Popen:
    env = {**os.environ, "PERMERGE_TEST_DELAY": str(delay), "PYTHONPATH": os.pathsep.join([str(root), *sys.path])}
    argv = [sys.executable, "-m", "permerge", "align", "--model", "slowmodel:make", str(root / "a.safetensors"),
            str(root / "b.safetensors"), "-o", str(out), *extra]  # fmt: skip
    # a shell starts background jobs with SIGINT ignored, and children inherit that: give the run Python's default
    return subprocess.Popen(argv, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))  # fmt: skip


def _wait_for(predicate, timeout: float = 60.0) -> None:
    end = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > end:
            raise AssertionError("timed out")
        time.sleep(0.05)


def _partials(root: Path) -> list[str]:
    return sorted(p.name for p in root.glob(".out.*.partial"))


@pytest.mark.parametrize(("sig", "code"), [(signal.SIGINT, 130), (signal.SIGTERM, 143), (signal.SIGKILL, -9)])
def test_interrupted_run_then_clean_rerun(setup, sig, code):
    out = setup / "out"
    proc = _start(setup, out, delay=30)
    _wait_for(lambda: _partials(setup))  # the output is claimed: the run is under way
    time.sleep(0.5)
    proc.send_signal(sig)
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == code, err
    assert not out.exists()
    if sig == signal.SIGKILL:
        assert len(_partials(setup)) == 1  # nothing ran to clean up: the next run does
    else:
        assert err.strip().splitlines()[-1].endswith("nothing written") and len(err.strip().splitlines()) == 1, err
        assert _partials(setup) == [] and not (setup / ".out.lock").exists()
    rerun = _start(setup, out, delay=0)
    _, err = rerun.communicate(timeout=120)
    assert rerun.returncode == 0, err
    assert sorted(p.name for p in out.iterdir()) == ["model.safetensors", "permutation.safetensors", "provenance.json", "report.html", "spec.json"]
    assert _partials(setup) == []
    if sig == signal.SIGKILL:
        assert "removed 1 unfinished output(s) of interrupted runs" in err


def test_two_concurrent_force_runs_one_fails_cleanly(setup):
    out = setup / "out"
    out.mkdir()
    (out / "old.txt").write_text("old")
    first = _start(setup, out, 1.0, "--force")  # holds the output for ~8 s: 8 forwards of 1 s
    _wait_for(lambda: _partials(setup))
    second = _start(setup, out, 0, "--force")
    _, err2 = second.communicate(timeout=120)
    _, err1 = first.communicate(timeout=120)
    assert first.returncode == 0, err1
    assert second.returncode == 2 and "another permerge run is writing" in err2 and len(err2.strip().splitlines()) == 1
    assert sorted(p.name for p in out.iterdir()) == ["model.safetensors", "permutation.safetensors", "provenance.json", "report.html", "spec.json"]
    assert [p.name for p in setup.iterdir() if p.name.startswith(".")] == []
