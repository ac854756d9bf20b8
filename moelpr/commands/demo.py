"""`moe-lpr demo`: the miniature end-to-end reproduction of MoE-LPR on CPU (see docs/demo.md).

    moe-lpr demo --output demo_out [--sizes default|large|quick] [--quick] [--seed 0]
    moe-lpr demo --output demo_out --corpora my.yaml --validation my_val.yaml --heldout my_test.yaml

Rerunning with the same settings reuses the corpus, tokenizer, models and evaluations already in the directory.
"""

from __future__ import annotations

import argparse


def _codes(text: str) -> tuple[str, ...]:
    return tuple(part.strip() for part in text.split(",") if part.strip())


EXAMPLE = "moe-lpr demo --output runs/demo"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--output", required=True, metavar="DIR", help="output directory (reused by reruns)")
    parser.add_argument(
        "--sizes",
        default=None,
        metavar="PRESET",
        help="size preset: default (about 10 minutes on 2 cores), large (a 4x larger model; for "
        "CPUs with native bf16 or a GPU) or quick (the CI smoke run)",
    )
    parser.add_argument("--quick", action="store_true", help="the CI-sized run (= --sizes quick, about 20 seconds)")
    parser.add_argument("--corpora", default=None, metavar="FILE", help="your train corpora file instead of man pages")
    parser.add_argument(
        "--validation",
        default=None,
        metavar="FILE",
        help="your validation corpora file (with --corpora): where settings are compared",
    )
    parser.add_argument("--heldout", default=None, metavar="FILE", help="your test corpora file (with --corpora)")
    parser.add_argument("--seed", type=int, default=0, help="random seed (default 0)")
    parser.add_argument(
        "--old",
        type=_codes,
        default=("en", "es", "zh"),
        metavar="CODES",
        help="original man-page languages, comma-separated (default en,es,zh)",
    )
    parser.add_argument(
        "--new",
        type=_codes,
        default=("tr", "hu", "uk"),
        metavar="CODES",
        help="man-page languages to add, comma-separated (default tr,hu,uk)",
    )
    parser.add_argument(
        "--precision",
        choices=("auto", "fp32", "bf16"),
        default="auto",
        help="training and evaluation precision; auto = float32, except bf16 for --sizes large on CPUs "
        "with native bf16 matmuls (default auto; docs/demo.md has the measurements)",
    )
    parser.add_argument("--overwrite", action="store_true", help="replace a demo run made with other settings")
    parser.add_argument("--no-progress", action="store_true", help="no progress bars")


def run(args: argparse.Namespace) -> int:
    from moelpr.demo.run import run_demo
    from moelpr.errors import UserError

    if args.quick and args.sizes not in (None, "quick"):
        raise UserError(f"--quick is --sizes quick; it contradicts --sizes {args.sizes}: give one of them")
    sizes = "quick" if args.quick else args.sizes or "default"
    run_demo(
        args.output,
        sizes=sizes,
        corpora=args.corpora,
        validation=args.validation,
        heldout=args.heldout,
        seed=args.seed,
        languages_old=args.old,
        languages_new=args.new,
        precision=args.precision,
        overwrite=args.overwrite,
        progress=not args.no_progress,
    )
    return 0
