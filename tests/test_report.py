"""The HTML report: every section rendered from a result directory, self-contained, and drawn by a
real browser (headless Chromium: screenshot pixels and the parsed DOM)."""

from __future__ import annotations

import html
import json
import re
from html.parser import HTMLParser

import pytest
import torch
from browser import MISSING, chromium, dump_dom, screenshot

import permerge as pm
from permerge.errors import PermergeIOError
from permerge.evaluate import Curve
from permerge.io.outputs import write_files
from permerge.io.write import text_writer
from permerge.models import MLP
from permerge.report import REPORT_NAME, render_report, write_report

pytest.importorskip("matplotlib")

ALPHAS = (0.0, 0.25, 0.5, 0.75, 1.0)
HIB = {"accuracy": True}
# matplotlib's first three colours: the naive, aligned and repaired curves
COLOURS = {"C0": (31, 119, 180), "C1": (255, 127, 14), "C2": (44, 160, 44)}


def _curve(peak: float, drop: float) -> Curve:
    bump = (0.0, 0.5, 1.0, 0.5, 0.0)
    test = {"loss": tuple(0.3 + 0.05 * a + peak * b for a, b in zip(ALPHAS, bump)), "accuracy": tuple(0.9 - drop * b for b in bump)}
    train = {"loss": tuple(v - 0.1 for v in test["loss"]), "accuracy": tuple(min(1.0, v + 0.05) for v in test["accuracy"])}
    return Curve(ALPHAS, {"train": train, "test": test}, HIB, seconds=0.25)


@pytest.fixture(scope="module")
def result_dir(tmp_path_factory):
    """A barrier-style result directory written through the API: curves (one pair identical), spec, align report."""
    root = tmp_path_factory.mktemp("report")
    torch.manual_seed(0)
    a = MLP(in_features=12, hidden=(16, 16), num_classes=3)
    torch.manual_seed(1)
    b = MLP(in_features=12, hidden=(16, 16), num_classes=3)
    ckpt = root / "a.pt"
    torch.save(a.state_dict(), ckpt)
    res = pm.align(a, b, torch.randn(2, 12))
    curves = {"naive": _curve(1.5, 0.6), "aligned": _curve(0.4, 0.2), "aligned+BN reset": _curve(0.1, 0.05),
              "aligned+REPAIR": _curve(0.1, 0.05)}  # fmt: skip
    files = {
        "curves.json": text_writer(json.dumps({k: c.to_dict() for k, c in curves.items()})),
        "spec.json": text_writer(res.spec.to_json()),
    }
    report = {"barriers": {k: c.summary() for k, c in curves.items()}, "align": res.report, "timing_s": {"curves": 1.0}}
    out = write_files(root / "out", files, force=False, inputs={"a": ckpt}, command=["permerge", "barrier", "x"],
                      config={"alphas": 5}, report=report)  # fmt: skip
    write_report(out, title="test report")
    return out, curves, res


class _Tags(HTMLParser):
    def __init__(self):
        super().__init__()
        self.tags: list[tuple[str, dict]] = []
        self.stack: list[str] = []

    def handle_starttag(self, tag, attrs):
        self.tags.append((tag, dict(attrs)))


def test_report_renders_every_section_from_the_directory(result_dir):
    out, curves, res = result_dir
    page = (out / REPORT_NAME).read_text()
    assert page == render_report(out, title="test report")  # a pure view of the files
    parser = _Tags()
    parser.feed(page)
    headings = re.findall(r"<h2>(.*?)</h2>", page)
    assert headings == ["Barriers", "Curves", "Alignment", "Timings", "Provenance"]
    assert "Entezari et al. 2022" in page and "Git Re-Basin" in page and "½·(L(θ_A) + L(θ_B))" in page
    # every curve's barriers on both datasets, both definitions, as the Curve computes them
    for c in curves.values():
        for ds in ("train", "test"):
            for m in ("loss", "accuracy"):
                for d in ("line", "mean"):
                    assert f">{c.barrier(m, ds, d):.4g}<" in page
    assert "<th>curve (on train)</th>" in page and "<th>curve (on test)</th>" in page and "<th>accuracy (mean)</th>" in page
    # groups with the objective before/after matching, frozen spaces with reasons, timings, provenance
    for g, before in res.report["objective_before"].items():
        assert f"<td>{g}</td>" in page and f">{before:.4g}<" in page and f">{res.report['objective_after'][g]:.4g}<" in page
    assert all(html.escape(f.reason) in page for f in res.spec.frozen) and "model_output" in page  # the frozen kind, from spec.json
    prov = json.loads((out / "provenance.json").read_text())
    assert prov["inputs"]["a"]["sha256"]["a.pt"] in page and "permerge barrier x" in page
    assert "curve aligned+REPAIR" in page  # per-curve timing
    # self-contained: no scripts, no external stylesheets, images or links to fetch
    assert not [t for t, _ in parser.tags if t in ("script", "link", "img", "iframe")]
    assert not [a for _, attrs in parser.tags for k, a in attrs.items() if k in ("src", "href") and a and "://" in a]
    assert page.count("<svg") == 1 and "(= aligned+BN reset)" in page  # identical curves named in the legend


def test_report_of_an_align_only_directory(tmp_path):
    torch.manual_seed(0)
    a, b = MLP(in_features=12, hidden=(16,), num_classes=3), MLP(in_features=12, hidden=(16,), num_classes=3)
    res = pm.align(a, b, torch.randn(2, 12))
    out = write_files(tmp_path / "out", {"spec.json": text_writer(res.spec.to_json())}, force=False, inputs={},
                      command=["permerge", "-q", "align"], config={}, report=res.report)  # fmt: skip
    page = (write_report(out)).read_text()
    assert re.findall(r"<h2>(.*?)</h2>", page) == ["Alignment", "Timings", "Provenance"]
    assert "<title>permerge align report</title>" in page and "net.1.weight:0" in page and "<th>tensors</th>" in page
    assert "<td>align: match</td>" in page


def test_report_of_a_merge_directory_shows_its_result_and_each_alignment(tmp_path):
    torch.manual_seed(0)
    models = [MLP(in_features=12, hidden=(16,), num_classes=3) for _ in range(3)]
    from permerge.merge.combine import merge_models

    res = merge_models(models, (torch.randn(2, 12),), method="weight")
    out = write_files(tmp_path / "out", {"spec.json": text_writer(res.spec.to_json())}, force=False, inputs={},
                      command=["permerge", "merge"], config={}, report=res.report)  # fmt: skip
    page = write_report(out).read_text()
    assert re.findall(r"<h2>(.*?)</h2>", page) == ["Result", "Alignment", "Timings", "Provenance"]
    assert "<tr><th>method</th><td>weight</td></tr>" in page and "<tr><th>models</th><td class=\"n\">3</td></tr>" in page
    assert re.findall(r"<h3>(model \d aligned to model 0)</h3>", page) == ["model 1 aligned to model 0", "model 2 aligned to model 0"]


def test_report_needs_a_result_directory_and_writes_nothing_otherwise(tmp_path):
    (tmp_path / "curves.json").write_text("{}")
    with pytest.raises(PermergeIOError, match="has no provenance.json: not a permerge result directory"):
        write_report(tmp_path)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["curves.json"]


def _mask(img, rgb, tol=12):
    """Where the screenshot ``img`` (H × W × 3) has colour ``rgb``, within ``tol`` per channel."""
    return (abs(img.astype(int) - rgb) <= tol).all(-1)


@pytest.mark.skipif(chromium() is None, reason=MISSING)
def test_report_renders_in_headless_chromium_with_its_figures(result_dir, tmp_path):
    out, _, _ = result_dir
    page = out / REPORT_NAME
    dom = dump_dom(page)
    # the browser parsed one inline SVG figure with the curves drawn as paths, and the tables
    assert dom.count("<svg") == 1 and '<figure id="figure-0">' in dom
    svg = dom[dom.index("<svg") : dom.index("</svg>")]
    assert svg.count("<path") > 50 and "loss on test (lower is better)" in svg
    assert dom.count("<table") >= 5 and "Entezari et al. 2022" in dom
    import numpy as np
    from PIL import Image

    png = screenshot(page, tmp_path / "report.png", width=1280, height=2400)
    img = np.asarray(Image.open(png).convert("RGB"))
    assert img.shape == (2400, 1280, 3)
    # the page is drawn: dark heading text at the top, a white page
    assert _mask(img[:80], (29, 29, 31), tol=40).sum() > 100 and _mask(img, (255, 255, 255)).mean() > 0.5
    # the figure is drawn below the heading and the barrier tables: every curve's colour is painted there
    rows = np.flatnonzero(_mask(img, COLOURS["C0"]).sum(1) > 3)
    assert rows.size and rows[0] > 300
    figure = img[rows[0] :]
    for name, rgb in COLOURS.items():
        assert _mask(figure, rgb).sum() > 150, f"no {name} pixels: a curve is missing from the screenshot"
    assert _mask(figure, (214, 39, 40)).sum() > 50  # C3: the curve identical to C2 is visible too
