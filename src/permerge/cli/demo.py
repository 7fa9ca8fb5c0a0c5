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

from permerge.cli._common import Outcome, config_of, result_outcome
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
    p.add_argument("--force", action="store_true", help="replace a non-empty OUT, all of it")


def run(args: argparse.Namespace) -> Outcome:
    res = run_demo(args.out, models=args.models, quick=args.quick, seed=args.seed, force=args.force,
                   quiet=args.quiet, command=sys.argv, config=config_of(args))  # fmt: skip
    text = (
        "Test loss / accuracy barriers on the line (1-α)·A + α·B between two seeds (digits; lower is better;\n"
        '"line" definition: the worst gap to the endpoints\' line; report.html has both definitions, train and test):\n\n'
        f"{format_table(res.rows)}\n\n"
        f"wrote {', '.join(sorted(p.name for p in res.out.iterdir()))} to {res.out}/ in {res.seconds:.0f} s"
    )
    rows = [{"model": r.model, "description": r.description, "accuracy_a": r.accuracy_a, "accuracy_b": r.accuracy_b,
             "barriers": {k: {"loss": v[0], "accuracy": v[1]} for k, v in r.barriers.items()}} for r in res.rows]  # fmt: skip
    return result_outcome("demo", res.out, text, {"barriers_test_line": rows}, seconds=res.seconds)
