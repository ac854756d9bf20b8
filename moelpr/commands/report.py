"""`moe-lpr report`: render results files as a Markdown table and PNG figures.

    moe-lpr report results/base.json results/moe-lpr.json --output report/
    moe-lpr report demo_out/results.json --output demo_out/report/

Accepts `moe-lpr eval` results (method = the `"method"` key, else the file stem) and the demo's combined
results.json. See moelpr/evaluate/report.py for what is drawn.
"""

from __future__ import annotations

import argparse

EXAMPLE = "moe-lpr report runs/eval_base.json runs/eval_stage2.json --output runs/report"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("results", nargs="+", metavar="RESULTS.json", help="results files, base first")
    parser.add_argument("--output", required=True, metavar="DIR", help="directory for results.md and the PNGs")


def run(args: argparse.Namespace) -> int:
    from moelpr.evaluate.report import render_report

    for path in render_report(args.results, args.output):
        print(f"wrote {path}")
    return 0
