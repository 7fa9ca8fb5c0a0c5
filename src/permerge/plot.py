"""Figures of interpolation curves (the Git Re-Basin barrier plot); matplotlib is an optional extra.

One panel per (metric, dataset): metrics in rows, datasets (train, test) in columns with a shared
y axis per row, so train and test read side by side. Every curve stays visible: each has its own
colour, marker and line style; a curve equal to one drawn before it is drawn on top with hollow,
larger markers and says so in its legend entry ("= naive+BN reset"); legends sit below their
panel, never over a peak. Each curve's endpoint line (the straight line between its values at
A and B) is drawn dotted, and its barrier ("line" definition: the largest gap between the curve
and that line) is marked by a vertical segment at the α where it occurs. A label given several
curves (seeds) is drawn as their mean with a min–max band.

matplotlib is imported only when a figure is drawn, and through its object-oriented API
(``Figure`` + the Agg canvas), so plotting never touches pyplot's global state or the user's
backend.
"""

from __future__ import annotations

import io
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from permerge.errors import PermergeError
from permerge.evaluate import BARRIERS, Curve
from permerge.io.write import atomic_write

__all__ = ["curves_figure", "figure_svg", "plot_curves"]

_FORMATS = {".png": "png", ".svg": "svg"}
_MARKERS = ("o", "s", "^", "D", "v", "P", "X", "*")
_LINESTYLES = ("-", "--", "-.", (0, (5, 1, 1, 1, 1, 1)))
Curves = Mapping[str, "Curve | Sequence[Curve]"]


def _matplotlib() -> tuple[Any, Any, Any]:
    try:
        import matplotlib
        from matplotlib.backends.backend_agg import FigureCanvasAgg
        from matplotlib.figure import Figure
    except ImportError as e:
        raise PermergeError("plotting needs matplotlib: pip install 'permerge[plot]'") from e
    return Figure, FigureCanvasAgg, matplotlib.rc_context


def _runs(curves: Curves) -> dict[str, list[Curve]]:
    runs = {label: [c] if isinstance(c, Curve) else list(c) for label, c in curves.items()}
    if not runs:
        raise PermergeError("plotting needs at least one curve")
    for label, cs in runs.items():
        if not cs or not all(isinstance(c, Curve) for c in cs):
            raise PermergeError(f"curve {label!r} must be a Curve or a non-empty sequence of Curves (one per seed)")
        if any(c.alphas != cs[0].alphas for c in cs):
            raise PermergeError(f"the runs of curve {label!r} have different α grids")
    return runs


def _check(runs: Mapping[str, list[Curve]], metrics: Sequence[str], datasets: Sequence[str]) -> None:
    for label, cs in runs.items():
        for c in cs:
            for ds in datasets:
                missing = [m for m in metrics if m not in c.values.get(ds, {})]
                if ds not in c.values or missing:
                    have = {d: sorted(v) for d, v in c.values.items()}
                    raise PermergeError(f"curve {label!r} has no {missing or list(metrics)} for dataset {ds!r}; it has {have}")
            for m in metrics:
                c.direction(m)  # an unknown direction is an error naming the fix, before drawing


def curves_figure(
    curves: Curves,
    metrics: Sequence[str] | None = None,
    *,
    datasets: Sequence[str] | None = None,
    title: str | None = None,
) -> Any:
    """A matplotlib ``Figure`` of ``metrics`` vs α for every curve: one row per metric, one column per dataset.

    Args:
        curves: label → :class:`~permerge.evaluate.Curve`, or label → several curves (seeds: drawn
            as mean and min–max band), in drawing order (e.g. naive, aligned, +BN reset, +REPAIR).
        metrics: rows; default: every metric of the first curve, in its order.
        datasets: columns; default: every dataset of the first curve.
        title: figure title.
    """
    runs = _runs(curves)
    first = next(iter(runs.values()))[0]
    datasets = list(datasets or first.values)
    metrics = list(metrics or next(iter(first.values.values())))
    _check(runs, metrics, datasets)
    Figure, Canvas, _ = _matplotlib()
    legend_lines = len(runs) + 1
    fig = Figure(figsize=(4.6 * len(datasets) + 0.4, (3.0 + 0.19 * legend_lines) * len(metrics) + 0.3), layout="constrained")
    Canvas(fig)
    axes = fig.subplots(len(metrics), len(datasets), squeeze=False, sharey="row")
    for r, metric in enumerate(metrics):
        for c, ds in enumerate(datasets):
            _panel(axes[r][c], runs, metric, ds)
    if title:
        fig.suptitle(title)
    return fig


def _panel(ax: Any, runs: Mapping[str, list[Curve]], metric: str, ds: str) -> None:
    import numpy as np

    drawn: list[tuple[str, Any]] = []
    for i, (label, cs) in enumerate(runs.items()):
        alphas = np.asarray(cs[0].alphas)
        ys = np.asarray([c.series(metric, ds) for c in cs])
        mean = ys.mean(0)
        same = next((other for other, m in drawn if np.allclose(m, mean, rtol=1e-6, atol=1e-9)), None)
        drawn.append((label, mean))
        color, marker, style = f"C{i % 10}", _MARKERS[i % len(_MARKERS)], _LINESTYLES[i % len(_LINESTYLES)]
        hib = cs[0].direction(metric)
        barriers = [c.barrier(metric, ds, d) for c in cs for d in ("line", "mean")]
        line_b, mean_b = (float(np.mean(barriers[k::2])) for k in (0, 1))
        name = label + (f" (= {same})" if same else "") + (f", mean of {len(cs)} runs" if len(cs) > 1 else "")
        style_kw: dict[str, Any] = {"markersize": 4}
        if same:  # on top, hollow and larger: the curve it equals shows through
            style_kw = {"markersize": 7, "markerfacecolor": "none", "markeredgewidth": 1.2}
        ax.plot(alphas, mean, color=color, marker=marker, linestyle=style, linewidth=1.4, zorder=3 + i,
                label=f"{name}: barrier {line_b:#.3g} (line) / {mean_b:#.3g} (mean)", **style_kw)  # fmt: skip
        if len(cs) > 1:
            ax.fill_between(alphas, ys.min(0), ys.max(0), color=color, alpha=0.15, linewidth=0, zorder=1)
        ends = np.asarray(BARRIERS["line"].reference(list(mean), list(alphas)))
        ax.plot([alphas[0], alphas[-1]], [ends[0], ends[-1]], color=color, linestyle=":", linewidth=1, alpha=0.7, zorder=2)
        gap = (ends - mean) if hib else (mean - ends)
        k = int(np.argmax(gap))
        if gap[k] > 0:
            x = alphas[k] + 0.006 * (i - (len(runs) - 1) / 2)  # side by side where barriers share an α
            ax.plot([x, x], [ends[k], mean[k]], color=color, linewidth=2.2, alpha=0.55, zorder=2,
                    solid_capstyle="butt", marker="_", markersize=8)  # fmt: skip
    ax.plot([], [], color="0.4", linestyle=":", linewidth=1, label="endpoint line; vertical bar: barrier (line)")
    ax.set_xlabel("α  (0 = model A, 1 = model B)")
    if ax.get_subplotspec().is_first_col():
        ax.set_ylabel(metric)
    better = "higher" if next(iter(runs.values()))[0].direction(metric) else "lower"
    ax.set_title(f"{metric} on {ds} ({better} is better)", fontsize=10)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7, loc="upper center", bbox_to_anchor=(0.5, -0.2), frameon=False, borderaxespad=0)


def figure_svg(fig: Any, salt: str = "permerge") -> str:
    """``fig`` as an SVG document (no XML prolog) to inline in HTML: text stays text, and element
    ids are derived from ``salt`` so several figures on one page do not collide and output is stable."""
    _, _, rc_context = _matplotlib()
    buf = io.StringIO()
    with rc_context({"svg.fonttype": "none", "svg.hashsalt": salt}):
        fig.savefig(buf, format="svg", metadata={"Date": None})
    text = buf.getvalue()
    return text[text.index("<svg") :]


def plot_curves(
    curves: Curves,
    path: str | Path,
    metrics: Sequence[str] | None = None,
    *,
    title: str | None = None,
    dataset: str | None = None,
    format: str | None = None,
) -> Path:
    """Draw :func:`curves_figure` and save it atomically; ``.png`` or ``.svg`` (or ``format``) decides the format.

    ``dataset`` draws that dataset only (default: every dataset, one column each). The directory
    of ``path`` must exist. Returns ``path``.

    Example:
        >>> plot_curves({"naive": naive, "aligned": aligned}, "barrier.png")  # doctest: +SKIP
    """
    path = Path(path)
    fmt = _FORMATS.get(path.suffix.lower()) if format is None else format.lower()
    if fmt not in _FORMATS.values():
        raise PermergeError(f"cannot plot to {path}: use a .png or .svg file name (or format='png'/'svg')")
    fig = curves_figure(curves, metrics, datasets=[dataset] if dataset else None, title=title)
    _, _, rc_context = _matplotlib()
    with rc_context({"svg.fonttype": "none", "svg.hashsalt": path.name}):  # SVG text stays text: searchable and editable
        atomic_write(path, lambda tmp: fig.savefig(tmp, format=fmt, dpi=120))
    return path
