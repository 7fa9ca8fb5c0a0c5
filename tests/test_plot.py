"""Figures that keep every curve visible: legends below the axes, identical curves told apart,
train-vs-test panels, endpoint lines, barrier marks, seeds as mean + band; files atomic, errors clear."""

from __future__ import annotations

import sys

import pytest

from permerge.errors import PermergeError
from permerge.evaluate import Curve

pytest.importorskip("matplotlib")

from permerge.plot import curves_figure, figure_svg, plot_curves  # noqa: E402

ALPHAS = (0.0, 0.5, 1.0)
HIB = {"accuracy": True}


def _curves():
    return {
        "naive": Curve(ALPHAS, {"test": {"loss": (0.3, 2.0, 0.35), "accuracy": (0.9, 0.2, 0.88)}}, HIB),
        "aligned": Curve(ALPHAS, {"test": {"loss": (0.3, 0.5, 0.35), "accuracy": (0.9, 0.85, 0.88)}}, HIB),
        "aligned+REPAIR": Curve(ALPHAS, {"test": {"loss": (0.3, 0.32, 0.35), "accuracy": (0.9, 0.9, 0.88)}}, HIB),
    }


def _train_test(peak, seed_shift=0.0):
    return Curve(ALPHAS, {"train": {"loss": (0.1, peak - 0.2 + seed_shift, 0.1), "accuracy": (1.0, 0.7, 1.0)},
                          "test": {"loss": (0.3, peak + seed_shift, 0.35), "accuracy": (0.9, 0.6, 0.88)}}, HIB)  # fmt: skip


def test_png_is_written_with_png_magic(tmp_path):
    path = plot_curves(_curves(), tmp_path / "barrier.png", title="test")
    data = path.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) > 5000
    assert sorted(p.name for p in tmp_path.iterdir()) == ["barrier.png"]  # no temporary left behind


def test_svg_by_suffix_and_png_by_format(tmp_path):
    svg = plot_curves(_curves(), tmp_path / "barrier.SVG", metrics=("loss",)).read_text()
    # the legend carries both barriers: 2.0 - (0.3 + 0.35) / 2 = 1.675 for either definition at α = ½
    assert "<svg" in svg and "naive: barrier 1.68 (line) / 1.68 (mean)" in svg
    raw = plot_curves(_curves(), tmp_path / "figure.bin", format="png").read_bytes()
    assert raw.startswith(b"\x89PNG")


def test_legends_sit_below_their_axes_so_no_peak_is_hidden():
    fig = curves_figure(_curves())
    fig.canvas.draw()
    axes = fig.axes
    assert len(axes) == 2  # loss and accuracy rows, one dataset column
    for ax in axes:
        box, legend = ax.get_window_extent(), ax.get_legend().get_window_extent()
        assert legend.y1 <= box.y0 + 1e-6  # entirely below the plotting area
    assert fig.get_figwidth() > 0 and axes[0].get_title() == "loss on test (lower is better)"
    assert axes[1].get_title() == "accuracy on test (higher is better)"


def test_identical_curves_are_told_apart():
    curves = _curves()
    curves["aligned+BN reset"] = curves["aligned"]  # e.g. BN reset = REPAIR on an all-BN net
    fig = curves_figure(curves, ("loss",))
    ax = fig.axes[0]
    texts = [t.get_text() for t in ax.get_legend().get_texts()]
    assert texts[3].startswith("aligned+BN reset (= aligned): barrier")
    mains = [ln for ln in ax.get_lines() if len(ln.get_xdata()) == len(ALPHAS) and ln.get_label()[:1] != "_"]
    aligned, copy = mains[1], mains[3]
    assert list(aligned.get_ydata()) == list(copy.get_ydata())
    # drawn on top, hollow and larger, with its own marker and colour: both stay visible
    assert copy.get_zorder() > aligned.get_zorder()
    assert copy.get_markerfacecolor() == "none" and copy.get_markersize() > aligned.get_markersize()
    assert copy.get_marker() != aligned.get_marker() and copy.get_color() != aligned.get_color()


def test_train_and_test_panels_endpoint_lines_and_barrier_marks():
    curves = {"naive": _train_test(2.0), "aligned": _train_test(0.5)}
    fig = curves_figure(curves)
    assert [ax.get_title() for ax in fig.axes] == [
        "loss on train (lower is better)", "loss on test (lower is better)",
        "accuracy on train (higher is better)", "accuracy on test (higher is better)",
    ]  # fmt: skip
    ax = fig.axes[1]  # loss on test
    assert ax.get_shared_y_axes().joined(fig.axes[0], fig.axes[1])  # train and test on one scale
    lines = ax.get_lines()
    ends = [ln for ln in lines if ln.get_linestyle() == ":" and len(ln.get_xdata()) == 2 and ln.get_label()[:1] == "_"]
    assert sorted(tuple(ln.get_ydata()) for ln in ends) == [(0.3, 0.35)] * 2  # each curve's endpoint line
    marks = [ln for ln in lines if len(ln.get_xdata()) == 2 and ln.get_xdata()[0] == ln.get_xdata()[1]]
    # the naive barrier's vertical mark spans from the endpoint line (0.325) to the peak (2.0) near α = ½
    spans = sorted((min(ln.get_ydata()), max(ln.get_ydata())) for ln in marks)
    assert spans[-1] == pytest.approx((0.325, 2.0)) and abs(marks[0].get_xdata()[0] - 0.5) < 0.02


def test_seeds_are_drawn_as_mean_and_band():
    runs = [_train_test(1.0, s) for s in (-0.1, 0.0, 0.4)]
    fig = curves_figure({"aligned": runs, "naive": _train_test(2.0)}, ("loss",), datasets=("test",))
    ax = fig.axes[0]
    label = ax.get_legend().get_texts()[0].get_text()
    # barriers per run: 1.0 - 0.325 + shift → mean 0.675 + 0.1
    assert label == "aligned, mean of 3 runs: barrier 0.775 (line) / 0.775 (mean)"
    mean = next(ln for ln in ax.get_lines() if ln.get_label().startswith("aligned"))
    assert list(mean.get_ydata()) == pytest.approx([0.3, 1.1, 0.35])
    (band,) = ax.collections
    ys = band.get_paths()[0].vertices[:, 1]
    assert min(ys) == pytest.approx(0.3) and max(ys) == pytest.approx(1.4)


def test_figure_svg_is_inlineable_and_ids_follow_the_salt():
    def svg(salt):
        return figure_svg(curves_figure(_curves(), ("loss",)), salt=salt)

    one = svg("a")
    assert one.startswith("<svg") and "<?xml" not in one
    assert one == svg("a") and one != svg("b")  # stable per salt (no date, no random ids), distinct across figures


def test_errors_name_the_problem(tmp_path):
    with pytest.raises(PermergeError, match=r"\.png or \.svg"):
        plot_curves(_curves(), tmp_path / "barrier.jpg")
    with pytest.raises(PermergeError, match="no \\['f1'\\]"):
        plot_curves(_curves(), tmp_path / "barrier.png", metrics=("f1",))
    with pytest.raises(PermergeError, match="at least one curve"):
        plot_curves({}, tmp_path / "barrier.png")
    unstated = {"x": Curve(ALPHAS, {"test": {"loss": (1, 2, 1), "top1": (1, 0, 1)}})}
    with pytest.raises(PermergeError, match="does not state whether 'top1'"):
        plot_curves(unstated, tmp_path / "barrier.png")
    with pytest.raises(PermergeError, match="different α grids"):
        plot_curves({"x": [_curves()["naive"], Curve((0.0, 1.0), {"test": {"loss": (1, 1)}})]}, tmp_path / "b.png")
    assert list(tmp_path.iterdir()) == []


def test_missing_matplotlib_gives_the_install_hint(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "matplotlib.figure", None)  # import of it raises ImportError
    with pytest.raises(PermergeError, match=r"pip install 'permerge\[plot\]'"):
        plot_curves(_curves(), tmp_path / "barrier.png")
