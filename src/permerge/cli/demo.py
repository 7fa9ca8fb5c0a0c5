"""Train two small models on scikit-learn's bundled digits, align them, and show the barriers.

Trains two seeds of a small MLP and a small CNN without normalisation (about half a minute on
2 CPU cores), aligns each pair by weight matching, and prints the test loss / accuracy barrier of
naive averaging, of the weight-matched pair, and of the weight-matched pair with REPAIR. Writes
OUT/mlp.png and OUT/cnn.png (loss and accuracy vs α, train and test), OUT/curves.json,
OUT/curves.csv, OUT/barriers.md, OUT/provenance.json and OUT/report.html (self-contained: open
it in a browser, no network needed). Nothing is downloaded. OUT must be new or empty unless
--force.
"""

from __future__ import annotations

import argparse
import sys

from permerge.demo import DEMO_MODELS, format_table, run_demo

HELP = "train, align and merge two small models on bundled data; print the barriers"
EPILOG = """examples:
  permerge demo
  permerge demo -o my-demo --models mlp --force
"""


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("-o", "--out", default="permerge-demo", help="output directory (default: permerge-demo/)")
    p.add_argument("--models", nargs="+", default=list(DEMO_MODELS), choices=list(DEMO_MODELS), help="which demo models")
    p.add_argument("--seed", type=int, default=0, help="model A's seed; B uses seed + 1")
    p.add_argument("--quick", action="store_true", help="a few epochs only (for tests; barriers are not meaningful)")
    p.add_argument("--force", action="store_true", help="write into a non-empty OUT (replacing our files only)")


def run(args: argparse.Namespace) -> int:
    res = run_demo(args.out, models=args.models, quick=args.quick, seed=args.seed, force=args.force,
                   quiet=args.quiet, command=sys.argv)  # fmt: skip
    sys.stdout.write(
        "Test loss / accuracy barriers on the line (1-α)·A + α·B between two seeds (digits; lower is better;\n"
        '"line" definition: the worst gap to the endpoints\' line; report.html has both definitions, train and test):\n\n'
        f"{format_table(res.rows)}\n\n"
        f"wrote {', '.join(sorted(p.name for p in res.out.iterdir()))} to {res.out}/ in {res.seconds:.0f} s\n"
    )
    return 0
