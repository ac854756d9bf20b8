"""`moe-lpr demo`: the miniature end-to-end reproduction of MoE-LPR on CPU (see docs/demo.md).

    moe-lpr demo --output demo_out [--quick] [--seed 0]
    moe-lpr demo --output demo_out --corpora my.yaml --heldout my_heldout.yaml

Rerunning with the same settings reuses the corpus, tokenizer, models and evaluations already in the directory.
"""

from __future__ import annotations

import argparse


def _codes(text: str) -> tuple[str, ...]:
    return tuple(part.strip() for part in text.split(",") if part.strip())


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--output", required=True, metavar="DIR", help="output directory (reused by reruns)")
    parser.add_argument("--quick", action="store_true", help="the CI-sized run (about 2 minutes)")
    parser.add_argument("--corpora", default=None, metavar="FILE", help="your train corpora file instead of man pages")
    parser.add_argument("--heldout", default=None, metavar="FILE", help="your held-out corpora file (with --corpora)")
    parser.add_argument("--seed", type=int, default=0, help="random seed (default 0)")
    parser.add_argument("--old", type=_codes, default=("en", "es", "zh"), metavar="CODES",
                        help="original man-page languages, comma-separated (default en,es,zh)")
    parser.add_argument("--new", type=_codes, default=("tr", "hu", "uk"), metavar="CODES",
                        help="man-page languages to add, comma-separated (default tr,hu,uk)")
    parser.add_argument("--precision", choices=("auto", "fp32", "bf16"), default="auto",
                        help="training and evaluation precision; auto = bf16 only on CPUs with native bf16 matmuls "
                             "(default auto)")
    parser.add_argument("--overwrite", action="store_true", help="replace a demo run made with other settings")
    parser.add_argument("--no-progress", action="store_true", help="no progress bars")


def run(args: argparse.Namespace) -> int:
    from moelpr.demo.run import run_demo

    run_demo(args.output, quick=args.quick, corpora=args.corpora, heldout=args.heldout, seed=args.seed,
             languages_old=args.old, languages_new=args.new, precision=args.precision, overwrite=args.overwrite,
             progress=not args.no_progress)
    return 0
