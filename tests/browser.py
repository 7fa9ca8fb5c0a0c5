"""Headless Chromium for the report tests: a screenshot and the parsed DOM of a local page.

Chromium is the Debian package ``chromium`` (``apt-get install -y chromium``); :func:`chromium`
returns None where it is not installed, and the tests skip with that reason. Run as a script to
make the README's screenshot of a report (the top HEIGHT pixels of a 1280-pixel-wide window)::

    python tests/browser.py permerge-demo/report.html docs/report.png [HEIGHT]
"""

from __future__ import annotations

import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

FLAGS = (
    "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
    "--disable-background-networking", "--disable-component-update", "--disable-sync", "--hide-scrollbars",
)  # fmt: skip
MISSING = "headless Chromium is not installed (Debian: apt-get install -y chromium)"


def chromium() -> str | None:
    """The Chromium executable, or None."""
    return shutil.which("chromium") or shutil.which("chromium-browser")


def _run(page: Path, *args: str, timeout: float = 120) -> subprocess.CompletedProcess:
    exe = chromium()
    if exe is None:
        raise RuntimeError(MISSING)
    with tempfile.TemporaryDirectory(prefix="permerge-chromium-") as profile:
        cmd = [exe, *FLAGS, f"--user-data-dir={profile}", *args, page.resolve().as_uri()]
        return subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, check=True)


def screenshot(page: Path, png: Path, width: int = 1280, height: int = 2000) -> Path:
    """Render ``page`` in a ``width`` × ``height`` window and save the screenshot as ``png``."""
    _run(page, f"--window-size={width},{height}", f"--screenshot={Path(png).resolve()}")
    if not Path(png).is_file():
        raise RuntimeError(f"Chromium wrote no screenshot for {page}")
    return Path(png)


def dump_dom(page: Path) -> str:
    """The DOM Chromium built from ``page``, serialised (what the browser parsed, not the file's text)."""
    return _run(page, "--dump-dom").stdout


if __name__ == "__main__":
    if len(sys.argv) not in (3, 4):
        raise SystemExit("usage: python tests/browser.py REPORT.html OUT.png [HEIGHT]")
    screenshot(Path(sys.argv[1]), Path(sys.argv[2]), height=int(sys.argv[3]) if len(sys.argv) == 4 else 2000)
