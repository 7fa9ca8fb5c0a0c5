"""Figures of interpolation curves (the Git Re-Basin barrier plot); matplotlib is an optional extra.

matplotlib is imported only when a figure is drawn, and through its object-oriented API
(``Figure`` + the Agg canvas), so plotting never touches pyplot's global state or the user's
backend.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from permerge.errors import PermergeError
from permerge.evaluate import HIGHER_IS_BETTER, Curve
from permerge.io.write import atomic_write

__all__ = ["plot_curves"]

_FORMATS = {".png": "png", ".svg": "svg"}
_LABELS = {"loss": "loss", "accuracy": "accuracy"}


def _matplotlib() -> tuple[Any, Any, Any]:
    try:
        import matplotlib
        from matplotlib.backends.backend_agg import FigureCanvasAgg
        from matplotlib.figure import Figure
    except ImportError as e:
        raise PermergeError("plotting needs matplotlib: pip install 'permerge[plot]'") from e
    return Figure, FigureCanvasAgg, matplotlib.rc_context


def plot_curves(
    curves: Mapping[str, Curve],
    path: str | Path,
    metrics: Sequence[str] = ("loss", "accuracy"),
    *,
    title: str | None = None,
    dataset: str | None = None,
    format: str | None = None,
) -> Path:
    """Draw ``metric`` vs α for every curve, one panel per metric, and save it atomically.

    Each legend entry carries the curve's barrier for that metric, so the figure reads on its own.
    With several datasets in a curve (e.g. train and test) each is drawn, dashed after the first,
    unless ``dataset`` picks one.

    Args:
        curves: label → :class:`~permerge.evaluate.Curve`, drawn in this order (e.g. naive,
            aligned, aligned+BN reset, aligned+REPAIR).
        path: where to save; ``.png`` or ``.svg`` decides the format. Its directory must exist.
        metrics: one panel per metric; each must be in every curve.
        title: figure title.
        dataset: draw only this dataset.
        format: ``"png"`` or ``"svg"`` regardless of ``path``'s suffix.

    Returns:
        ``path``.

    Example:
        >>> plot_curves({"naive": naive, "aligned": aligned}, "barrier.png")  # doctest: +SKIP
    """
    path = Path(path)
    fmt = _FORMATS.get(path.suffix.lower()) if format is None else format.lower()
    if fmt not in _FORMATS.values():
        raise PermergeError(f"cannot plot to {path}: use a .png or .svg file name (or format='png'/'svg')")
    if not curves:
        raise PermergeError("plot_curves needs at least one curve")
    for label, curve in curves.items():
        for ds in [dataset] if dataset else curve.values:
            missing = [m for m in metrics if m not in curve.values.get(ds, {})]
            if ds not in curve.values or missing:
                have = {d: sorted(v) for d, v in curve.values.items()}
                raise PermergeError(f"curve {label!r} has no {missing or metrics} for dataset {ds!r}; it has {have}")
    Figure, Canvas, rc_context = _matplotlib()
    fig = Figure(figsize=(5.2 * len(metrics), 4.0), layout="constrained")
    Canvas(fig)
    axes = fig.subplots(1, len(metrics), squeeze=False)[0]
    for ax, metric in zip(axes, metrics):
        for i, (label, curve) in enumerate(curves.items()):
            names = [dataset] if dataset else list(curve.values)
            for j, ds in enumerate(names):
                values = curve.values[ds][metric]
                scale = 100.0 if metric == "accuracy" else 1.0
                b = curve.barrier(metric, ds) * scale
                name = label if len(names) == 1 else f"{label} ({ds})"
                unit = " pt" if metric == "accuracy" else ""
                ax.plot(
                    curve.alphas, [v * scale for v in values], marker="o", markersize=3,
                    color=f"C{i}", linestyle="-" if j == 0 else "--", label=f"{name}: barrier {b:.3g}{unit}",
                )  # fmt: skip
        ax.set_xlabel("α  (0 = model A, 1 = model B)")
        ax.set_ylabel(_LABELS.get(metric, metric) + (" (%)" if metric == "accuracy" else ""))
        better = "higher" if metric in HIGHER_IS_BETTER else "lower"
        ax.set_title(f"{metric} along (1-α)·A + α·B ({better} is better)", fontsize=10)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    if title:
        fig.suptitle(title)
    with rc_context({"svg.fonttype": "none"}):  # SVG text stays text: searchable and editable
        atomic_write(path, lambda tmp: fig.savefig(tmp, format=fmt, dpi=120))
    return path
