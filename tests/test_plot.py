"""plot_curves: PNG and SVG files, atomic, with clear errors."""

from __future__ import annotations

import sys

import pytest

from permerge.errors import PermergeError
from permerge.evaluate import Curve

pytest.importorskip("matplotlib")

from permerge.plot import plot_curves  # noqa: E402

ALPHAS = (0.0, 0.5, 1.0)


def _curves():
    return {
        "naive": Curve(ALPHAS, {"test": {"loss": (0.3, 2.0, 0.35), "accuracy": (0.9, 0.2, 0.88)}}),
        "aligned": Curve(ALPHAS, {"test": {"loss": (0.3, 0.5, 0.35), "accuracy": (0.9, 0.85, 0.88)}}),
        "aligned+REPAIR": Curve(ALPHAS, {"test": {"loss": (0.3, 0.32, 0.35), "accuracy": (0.9, 0.9, 0.88)},
                                         "train": {"loss": (0.1, 0.12, 0.1), "accuracy": (1.0, 1.0, 1.0)}}),
    }  # fmt: skip


def test_png_is_written_with_png_magic(tmp_path):
    path = plot_curves(_curves(), tmp_path / "barrier.png", title="test")
    data = path.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) > 5000
    assert sorted(p.name for p in tmp_path.iterdir()) == ["barrier.png"]  # no temporary left behind


def test_svg_by_suffix_and_png_by_format(tmp_path):
    svg = plot_curves(_curves(), tmp_path / "barrier.SVG", metrics=("loss",)).read_text()
    assert "<svg" in svg and "naive: barrier 1.68" in svg  # legend carries the barrier: 2.0 - 0.325
    raw = plot_curves(_curves(), tmp_path / "figure.bin", format="png").read_bytes()
    assert raw.startswith(b"\x89PNG")


def test_errors_name_the_problem(tmp_path):
    with pytest.raises(PermergeError, match=r"\.png or \.svg"):
        plot_curves(_curves(), tmp_path / "barrier.jpg")
    with pytest.raises(PermergeError, match="no \\['f1'\\]"):
        plot_curves(_curves(), tmp_path / "barrier.png", metrics=("f1",))
    with pytest.raises(PermergeError, match="at least one curve"):
        plot_curves({}, tmp_path / "barrier.png")
    assert list(tmp_path.iterdir()) == []


def test_missing_matplotlib_gives_the_install_hint(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "matplotlib.figure", None)  # import of it raises ImportError
    with pytest.raises(PermergeError, match=r"pip install 'permerge\[plot\]'"):
        plot_curves(_curves(), tmp_path / "barrier.png")
