"""A self-contained HTML report of a result directory: curves, barriers, groups, timings, provenance.

The report is a view of what a command wrote — ``provenance.json`` always, ``curves.json`` and
``spec.json`` where the command wrote them — rendered once the directory is complete, so it shows
exactly what the files say and can be re-rendered at any time with :func:`write_report`. The page
needs no network and runs no script: figures are inline SVG (text stays text), the style is
inline CSS.

Example:
    >>> from permerge.report import write_report
    >>> write_report("barrier-out/")  # doctest: +SKIP
    PosixPath('barrier-out/report.html')
"""

from __future__ import annotations

import html
import json
import logging
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

from permerge.errors import PermergeError, PermergeIOError
from permerge.evaluate import BARRIERS, Curve
from permerge.io.read import StrPath
from permerge.io.write import PROVENANCE_NAME, atomic_write
from permerge.spec import PermutationSpec

LOG = logging.getLogger(__name__)

__all__ = ["REPORT_NAME", "render_report", "write_report"]

REPORT_NAME = "report.html"
_COLLAPSE_ROWS = 40  # longer tables start folded

_CSS = """
body{font:14px/1.45 system-ui,-apple-system,"Segoe UI",Roboto,sans-serif;color:#1d1d1f;background:#fff;
  max-width:1180px;margin:0 auto;padding:24px}
h1{font-size:22px;margin:0 0 4px}h2{font-size:18px;margin:28px 0 8px;border-bottom:1px solid #ddd;padding-bottom:4px}
h3{font-size:15px;margin:18px 0 6px}.sub{color:#555;margin:0 0 16px}
table{border-collapse:collapse;margin:6px 0 12px;font-size:13px;display:block;overflow-x:auto;max-width:100%}
th,td{border:1px solid #d7d7d7;padding:3px 8px;text-align:left;vertical-align:top}
th{background:#f3f4f6}td.n{text-align:right;font-variant-numeric:tabular-nums}
code,pre{font:12px/1.4 ui-monospace,Menlo,Consolas,monospace;background:#f6f8fa}
pre{padding:8px;overflow-x:auto;white-space:pre-wrap}
figure{margin:10px 0 22px}figure svg{width:100%;max-width:1000px;height:auto;display:block}
figcaption{color:#555;font-size:13px}.note{color:#555;font-size:13px}
"""


def _esc(x: Any) -> str:
    return html.escape(str(x), quote=True)


def _num(x: Any) -> str:
    if isinstance(x, bool) or x is None:
        return "—" if x is None else str(x)
    if isinstance(x, float):
        return f"{x:.4g}"
    return _esc(x)


def _table(head: Sequence[str], rows: Sequence[Sequence[Any]], *, cls: str = "", numeric_from: int = 1) -> str:
    if not rows:
        return ""
    th = "".join(f"<th>{_esc(h)}</th>" for h in head)
    body = "".join(
        "<tr>" + "".join(f'<td class="n">{_num(v)}</td>' if i >= numeric_from and not isinstance(v, str)
                         else f"<td>{_esc(v)}</td>" for i, v in enumerate(r)) + "</tr>"  # fmt: skip
        for r in rows
    )
    table = f'<table class="{cls}"><thead><tr>{th}</tr></thead><tbody>{body}</tbody></table>'
    if len(rows) > _COLLAPSE_ROWS:
        return f"<details><summary>{len(rows)} rows</summary>{table}</details>"
    return table


def _kv(rows: Sequence[Sequence[Any]]) -> str:
    """A two-column key → value table without a header."""
    body = "".join(f"<tr><th>{_esc(k)}</th>" + (f'<td class="n">{_num(v)}</td>' if not isinstance(v, str) else f"<td>{_esc(v)}</td>")
                   + "</tr>" for k, v in rows)  # fmt: skip
    return f"<table><tbody>{body}</tbody></table>" if rows else ""


def _read_json(path: Path) -> Any:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError) as e:
        raise PermergeIOError(f"cannot read {path} for the report: {e}") from e


def _curve_sets(data: Any) -> dict[str, dict[str, Curve]]:
    """``curves.json`` as ``{set name: {label: Curve}}``: one unnamed set (``barrier``) or one per model (``demo``)."""
    if not isinstance(data, Mapping) or not data:
        raise PermergeError("curves.json holds no curves")
    if all(isinstance(v, Mapping) and "alphas" in v for v in data.values()):
        return {"": {label: Curve.from_dict(c) for label, c in data.items()}}
    return {name: {label: Curve.from_dict(c) for label, c in cs.items()} for name, cs in data.items()}


def _align_reports(report: Mapping[str, Any]) -> Iterator[tuple[str, Mapping[str, Any]]]:
    """The alignment reports inside a provenance report: ``align`` writes one at the top level,
    ``barrier`` one under ``align``, ``demo`` one per model under ``align``, ``merge`` a list under ``alignments``."""
    if "group_sizes" in report:
        yield "", report
    inner = report.get("align")
    if isinstance(inner, Mapping):
        if "group_sizes" in inner:
            yield "", inner
        else:
            yield from ((str(k), v) for k, v in inner.items() if isinstance(v, Mapping) and "group_sizes" in v)
    for i, r in enumerate(report.get("alignments") or []):
        if isinstance(r, Mapping) and "group_sizes" in r:
            yield f"model {i + 1} aligned to model 0", r


def _result_section(report: Mapping[str, Any]) -> str:
    """The report's own scalar entries (a merge's method, model count, rounds, parameters, …); an
    alignment report's are shown with its groups instead."""
    if "group_sizes" in report:
        return ""
    rows = [[k.replace("_", " "), v] for k, v in report.items()
            if isinstance(v, (int, float, bool)) or (isinstance(v, str) and len(v) <= 120)]  # fmt: skip
    return "<h2>Result</h2>" + _kv(rows) if rows else ""


def _barrier_section(sets: Mapping[str, Mapping[str, Curve]]) -> str:
    parts = ["<h2>Barriers</h2>", '<p class="note">On the line θ<sub>α</sub> = (1−α)·θ<sub>A</sub> + α·θ<sub>B</sub>; '
             "for a higher-is-better metric the sign flips (the worst deficit). Two definitions are in use:</p><ul>"]  # fmt: skip
    parts += [f"<li><b>{_esc(k)}</b>: <code>{_esc(d.formula)}</code> — {_esc(d.citation)}</li>" for k, d in BARRIERS.items()]
    parts.append("</ul>")
    for name, curves in sets.items():
        if name:
            parts.append(f"<h3>{_esc(name)}</h3>")
        first = next(iter(curves.values()))
        for ds, ms in first.values.items():
            metrics = [m for m in ms if m in first.higher_is_better]
            head = [f"curve (on {ds})"] + [f"{m} ({d})" for m in metrics for d in BARRIERS]
            rows = [[label, *(c.barrier(m, ds, d) if m in c.values.get(ds, {}) else None for m in metrics for d in BARRIERS)]
                    for label, c in curves.items()]  # fmt: skip
            parts.append(_table(head, rows))
            ends = [[label, *(c.values[ds][m][k] for m in metrics for k in (0, -1))] for label, c in curves.items()]
            parts.append(f"<details><summary>values at the endpoints on {_esc(ds)} (α = 0: A, α = 1: B)</summary>"
                         + _table(["curve"] + [f"{m} at {e}" for m in metrics for e in ("A", "B")], ends) + "</details>")  # fmt: skip
    return "".join(parts)


def _figure_section(sets: Mapping[str, Mapping[str, Curve]], title: str) -> str:
    from permerge.plot import curves_figure, figure_svg

    parts = ["<h2>Curves</h2>"]
    for i, (name, curves) in enumerate(sets.items()):
        fig = curves_figure(curves, title=name or None)
        caption = (f"{_esc(name) + ': ' if name else ''}every metric along the line, one column per dataset; dotted: each "
                   "curve's endpoint line; vertical bar: where its (line) barrier occurs.")  # fmt: skip
        parts.append(f'<figure id="figure-{i}">{figure_svg(fig, salt=f"{title}-{i}")}<figcaption>{caption}</figcaption></figure>')
    return "".join(parts)


def _groups_section(reports: Sequence[tuple[str, Mapping[str, Any]]], spec: PermutationSpec | None) -> str:
    parts = ["<h2>Alignment</h2>"]
    for name, r in reports:
        if name:
            parts.append(f"<h3>{_esc(name)}</h3>")
        summary = [(k, r[k]) for k in ("method", "groups", "changed_groups", "function_preservation_error", "sweeps",
                                       "converged", "backend", "total_before", "total_after", "seconds") if k in r]  # fmt: skip
        parts.append(_kv([[k.replace("_", " "), v] for k, v in summary]))
        before, after, what = r.get("objective_before"), r.get("objective_after"), "objective Σ⟨A, P·B⟩"
        if before is None:
            before, after, what = r.get("correlation_before"), r.get("correlation_after"), "mean matched correlation"
        sizes = r.get("group_sizes") or {}
        tensors = {g.name: len(g.keys) for g in spec.groups} if spec else {}
        head = ["group", "size", *(["tensors"] if tensors else []), *([f"{what} before", "after", "change"] if before else [])]
        rows = []
        for g, size in sizes.items():
            row: list[Any] = [g, size, *([tensors.get(g)] if tensors else [])]
            if isinstance(before, Mapping):
                b, a = before.get(g), (after or {}).get(g)
                row += [b, a, (a - b) if isinstance(a, (int, float)) and isinstance(b, (int, float)) else None]
            rows.append(row)
        parts.append(f"<p>{len(sizes)} groups (permuted unit sets)" + (f"; per group the {_esc(what)} before and after matching" if before else "") + ".</p>")
        parts.append(_table(head, rows))
        parts.append(_frozen(r, spec))
    return "".join(parts)


def _frozen(report: Mapping[str, Any], spec: PermutationSpec | None) -> str:
    if spec is not None:
        rows = [[f.size, f.kind.value, "yes" if f.boundary else "no", f.reason] for f in spec.frozen]
    else:
        rows = [[f.get("size"), f.get("kind", ""), "yes" if f.get("boundary") else "no", f.get("reason", "")]
                for f in report.get("frozen") or [] if isinstance(f, Mapping)]  # fmt: skip
    if not rows:
        return "<p>No frozen spaces.</p>"
    hidden = sum(r[2] == "no" for r in rows)
    note = (f"<p>{len(rows)} frozen spaces (never permuted): boundary spaces are fixed by the task (model inputs, outputs, "
            f"token rows); the other {hidden} are hidden symmetries left unused, with the reason.</p>")  # fmt: skip
    if not any(r[1] for r in rows):  # reports written before frozen spaces carried a kind
        return note + _table(["size", "boundary", "reason"], [[r[0], *r[2:]] for r in rows], numeric_from=0)
    return note + _table(["size", "kind", "boundary", "reason"], rows, numeric_from=0)


def _timings(report: Mapping[str, Any], reports: Sequence[tuple[str, Mapping[str, Any]]],
             sets: Mapping[str, Mapping[str, Curve]]) -> str:  # fmt: skip
    rows: list[list[Any]] = [[k, v] for k, v in (report.get("timing_s") or {}).items()]
    for name, r in reports:
        rows += [[f"{name + ': ' if name else ''}align: {k}", v] for k, v in (r.get("timing_s") or {}).items()]
    for name, curves in sets.items():
        rows += [[f"{name + ': ' if name else ''}curve {label}", c.seconds] for label, c in curves.items() if c.seconds is not None]
    if "seconds" in report and not isinstance(report["seconds"], Mapping):
        rows.append(["total", report["seconds"]])
    if not rows:
        return ""
    return '<h2>Timings</h2><p class="note">Wall-clock seconds, as measured by the run.</p>' + _table(["phase", "seconds"], rows)


def _provenance(prov: Mapping[str, Any]) -> str:
    cmd = prov.get("command")
    cmd = " ".join(cmd) if isinstance(cmd, list) else cmd
    parts = ["<h2>Provenance</h2>", _kv([["command", cmd or "—"], ["created (UTC)", prov.get("created_utc", "—")],
                                         ["platform", prov.get("platform", "—")]])]  # fmt: skip
    versions = prov.get("versions") or {}
    parts.append("<h3>Software</h3>" + _table(["package", "version"], [[k, v if v is not None else "—"] for k, v in versions.items()]))
    inputs = prov.get("inputs") or {}
    rows = [[name, info.get("path", ""), f, digest] for name, info in inputs.items() for f, digest in (info.get("sha256") or {}).items()]
    if rows:
        parts.append("<h3>Inputs</h3>" + _table(["input", "path", "file", "SHA-256"], rows, numeric_from=9))
    config = prov.get("config") or {}
    if config:
        parts.append("<h3>Configuration</h3>" + _table(["option", "value"], [[k, json.dumps(v)] for k, v in config.items()]))
    return "".join(parts)


def render_report(out_dir: StrPath, *, title: str | None = None) -> str:
    """The HTML report of the result directory ``out_dir`` (see the module docstring) as a string.

    Reads ``provenance.json`` (required), ``curves.json`` and ``spec.json`` (if present). Sections:
    barriers (both definitions, per dataset and metric), curves (inline SVG figures; needs
    matplotlib), alignment (per-group objective before/after, frozen spaces with reasons), timings
    and provenance (command, software, input hashes, configuration).
    """
    out = Path(out_dir)
    prov_path = out / PROVENANCE_NAME
    if not prov_path.is_file():
        raise PermergeIOError(f"{out} has no {PROVENANCE_NAME}: not a permerge result directory (write the result first)")
    prov = _read_json(prov_path)
    report = prov.get("report") or {}
    sets = _curve_sets(_read_json(out / "curves.json")) if (out / "curves.json").is_file() else {}
    spec = PermutationSpec.from_json((out / "spec.json").read_text(encoding="utf-8")) if (out / "spec.json").is_file() else None
    reports = list(_align_reports(report))
    cmd = prov.get("command") or []
    sub = next((c for c in cmd[1:] if not str(c).startswith("-")), "") if isinstance(cmd, list) else ""
    title = title or " ".join(filter(None, ["permerge", sub, "report"]))
    version = (prov.get("versions") or {}).get("permerge", "?")
    body = [
        f"<h1>{_esc(title)}</h1>",
        f'<p class="sub">{_esc(out)} · created {_esc(prov.get("created_utc", "?"))} · permerge {_esc(version)}</p>',
    ]
    body.append(_result_section(report))
    if sets:
        body += [_barrier_section(sets), _figure_section(sets, title)]
    if reports:
        body.append(_groups_section(reports, spec))
    elif spec is not None:
        body.append(_groups_section([("", {"group_sizes": {g.name: g.size for g in spec.groups}})], spec))
    body += [_timings(report, reports, sets), _provenance(prov)]
    body.append(f'<p class="note">Rendered from the files in this directory; re-render with '
                f"<code>python -c \"from permerge.report import write_report; write_report('{_esc(out)}')\"</code>.</p>")  # fmt: skip
    return (
        '<!DOCTYPE html>\n<html lang="en"><head><meta charset="utf-8">'
        '<meta name="viewport" content="width=device-width, initial-scale=1">'
        f"<title>{_esc(title)}</title><style>{_CSS}</style></head><body>" + "\n".join(body) + "</body></html>\n"
    )


def write_report(out_dir: StrPath, *, title: str | None = None) -> Path:
    """Write :func:`render_report` to ``out_dir/report.html`` atomically; returns its path.

    Call it after the directory's other files are written (``align``, ``merge``, ``barrier`` and
    ``demo`` do); the report renders what those files say.
    """
    text = render_report(out_dir, title=title)
    path = Path(out_dir) / REPORT_NAME
    LOG.info("writing %s", path)
    return atomic_write(path, lambda tmp: tmp.write_text(text, encoding="utf-8"))
