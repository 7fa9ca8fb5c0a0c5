"""Progress bars: only on a terminal, only for phases longer than the delay, with honest totals, never
under -q; -q also silences the libraries permerge drives; barrier and demo claim OUT before work."""

from __future__ import annotations

import io
import sys
import textwrap
import time

import pytest
import torch
from safetensors.torch import save_file

import permerge.progress as progress_mod
from permerge.cli import main
from permerge.io.outputs import OutputDir
from permerge.io.write import safetensors_writer
from permerge.models import MLP


class _Tty(io.StringIO):
    def isatty(self) -> bool:
        return True


class _Recorder:
    """Stands in for permerge.progress.progress: records every bar's totals and counts."""

    def __init__(self):
        self.bars = []

    def __call__(self, iterable=None, *, quiet, **kwargs):
        bar = progress_mod.tqdm(iterable, disable=True, **kwargs)  # a disabled bar counts nothing: we do
        record = {"kwargs": kwargs, "totals": [kwargs.get("total")], "ends": [], "n": 0}
        reset, close = bar.reset, bar.close

        def on_update(n=1):
            record["n"] += n
            bar.n = record["n"]

        def on_reset(total=None):
            record["ends"].append(record["n"])
            record["totals"].append(total)
            record["n"] = 0
            reset(total)

        def on_close():
            record["ends"].append(record["n"])
            close()

        bar.update, bar.reset, bar.close = on_update, on_reset, on_close
        self.bars.append(record)
        return bar


def test_bars_only_on_a_terminal_after_the_delay_and_never_quiet(monkeypatch):
    monkeypatch.setattr(progress_mod, "DELAY_S", 0.2)
    for tty, quiet, seconds, shown in [(True, False, 0.6, True), (True, False, 0.02, False), (True, True, 0.6, False),
                                       (False, False, 0.6, False)]:  # fmt: skip
        err = _Tty() if tty else io.StringIO()
        monkeypatch.setattr(sys, "stderr", err)
        with progress_mod.phase("tracing", quiet=quiet, interval=0.05):
            time.sleep(seconds)
        with progress_mod.progress(total=4, desc="writing", unit="B", quiet=quiet) as bar:
            for _ in range(4):
                time.sleep(seconds / 4)
                bar.update(1)
        text = err.getvalue()
        assert ("tracing: 00:00" in text and "writing: 100%" in text) == shown, (tty, quiet, seconds, text)
        assert (text == "") == (not shown), (tty, quiet, seconds, text)


def test_weight_matching_bar_counts_groups_per_sweep_not_max_sweeps(monkeypatch):
    import permerge as pm

    recorder = _Recorder()
    monkeypatch.setattr("permerge.match.weight.progress", recorder)
    torch.manual_seed(0)
    a, b = MLP(in_features=20, hidden=(16, 16, 16)), MLP(in_features=20, hidden=(16, 16, 16))
    spec = pm.trace(a, torch.randn(2, 20))
    res = pm.weight_matching(spec, a.state_dict(), b.state_dict(), max_sweeps=100)
    assert len(recorder.bars) == res.sweeps < 100  # a bar per sweep; 100 appears nowhere
    for i, bar in enumerate(recorder.bars, 1):
        assert bar["kwargs"]["unit"] == "group" and bar["kwargs"]["desc"].endswith(f"sweep {i}")
        assert bar["totals"] == [len(spec.groups)] and bar["ends"] == [len(spec.groups)]  # each reaches its total


def test_writing_and_hashing_bars_total_the_bytes(tmp_path, monkeypatch):
    writing, hashing = _Recorder(), _Recorder()
    monkeypatch.setattr("permerge.io.outputs.progress", writing)
    monkeypatch.setattr("permerge.io.write.progress", hashing)
    tensors = {"w": torch.zeros(1000), "b": torch.zeros(24, dtype=torch.float16)}
    save_file(tensors, tmp_path / "in.safetensors")
    with OutputDir(tmp_path / "out", force=False, inputs={"a": tmp_path / "in.safetensors"}) as od:
        od.commit({"model.safetensors": safetensors_writer(tensors)}, command="x", config={}, report={})
    (write_bar,) = writing.bars
    assert write_bar["totals"] == [4000 + 48] and write_bar["ends"] == [4048] and write_bar["kwargs"]["unit"] == "B"
    (hash_bar,) = hashing.bars
    size = (tmp_path / "in.safetensors").stat().st_size
    assert hash_bar["totals"] == [size] and hash_bar["ends"] == [size]


NOISY = """
import logging
import warnings

import torch
from torch import nn


class Noisy(nn.Linear):
    def forward(self, x):
        warnings.warn("a library's UserWarning")
        logging.getLogger("transformers.modeling_noisy").warning("a transformers warning")
        logging.getLogger("torch.noisy").warning("a torch warning")
        return super().forward(x)


def make():
    return nn.Sequential(Noisy(4, 8), nn.ReLU(), nn.Linear(8, 2))


def example_inputs():
    return torch.randn(2, 4)
"""


def test_quiet_silences_third_party_loggers_and_warnings(tmp_path, monkeypatch, capsys):
    import logging
    import warnings

    from permerge.graph import cache as graph_cache

    (tmp_path / "pm_noisy.py").write_text(textwrap.dedent(NOISY))
    monkeypatch.syspath_prepend(str(tmp_path))
    heard: list[str] = []

    class Ear(logging.Handler):
        def emit(self, record):
            heard.append(record.getMessage())

    ear = Ear()
    for name in ("transformers.modeling_noisy", "torch.noisy"):
        logging.getLogger(name).addHandler(ear)
        monkeypatch.setattr(logging.getLogger(name), "propagate", False)

    def run(*flags):
        graph_cache.clear()  # the model must really be traced (its forward run) each time
        heard.clear()
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            assert main([*flags, "inspect", "pm_noisy:make"]) == 0
        return {*heard, *(str(w.message) for w in caught)}, capsys.readouterr()

    everything = {"a library's UserWarning", "a transformers warning", "a torch warning"}
    loud, loud_io = run()
    assert loud == everything
    quiet, quiet_io = run("-q")
    assert quiet == set() and quiet_io.err == "" and quiet_io.out == loud_io.out  # the result itself is still printed
    assert run()[0] == everything  # levels and filters are restored after a quiet run


def test_quiet_hugging_face_alignment_prints_nothing_but_the_result(tmp_path, capfd):
    pytest.importorskip("transformers")
    from hf_zoo import write

    a, b = write("llama", 0, tmp_path / "a"), write("llama", 1, tmp_path / "b")
    capfd.readouterr()
    assert main(["-q", "align", str(a), str(b), "-o", str(tmp_path / "out")]) == 0
    captured = capfd.readouterr()
    assert captured.err == "" and captured.out.startswith("aligned ") and captured.out.count("\n") == 1


def test_barrier_and_demo_claim_their_output_before_any_work(tmp_path, monkeypatch, capsys):
    def no_work(*args, **kwargs):
        raise AssertionError("worked before claiming the output directory")

    monkeypatch.setattr("permerge.cli.barrier.load_model", no_work)
    monkeypatch.setattr("permerge.demo.digits", no_work)
    save_file(MLP(hidden=(8,)).state_dict(), tmp_path / "m.safetensors")
    m = str(tmp_path / "m.safetensors")
    out = tmp_path / "out"
    runs = [["barrier", "--model", "mlp", m, m, "--test-data", "x:y", "-o", str(out)], ["demo", "--quick", "-o", str(out)]]
    with OutputDir(out, force=False, inputs={}):  # another run holds OUT
        for argv in runs:
            assert main(argv) == 2
            assert "another permerge run is writing" in capsys.readouterr().err
    for argv in runs:  # OUT inside an input, or not empty: refused the same way, before any work
        assert main([*argv[:-1], str(tmp_path / "m.safetensors" / "out")]) == 2
        assert "error" in capsys.readouterr().err
    assert not out.exists()
