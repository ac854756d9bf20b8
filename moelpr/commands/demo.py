"""`moe-lpr demo`: the miniature end-to-end reproduction of MoE-LPR on CPU (see docs/demo.md).

    moe-lpr demo --output demo_out [--sizes default|mature|large|quick] [--quick] [--corpus manpages] [--seed 0]
    moe-lpr demo --output demo_out --corpora my.yaml --validation my_val.yaml --heldout my_test.yaml
    moe-lpr demo --output qwen_out --base models/Qwen2.5-0.5B --sizes paper --tokens 20000000 [--benchmark tasks/]

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
        help="size preset: default (about 15 minutes on 2 cores), mature (the default comparison from a base "
        "pretrained until its validation loss plateaus; about an hour), large (a 4x larger model; for CPUs with "
        "native bf16 or a GPU), quick (the CI smoke run); with --base: paper (default there) or quick",
    )
    parser.add_argument("--quick", action="store_true", help="the CI-sized run (= --sizes quick, about 20 seconds)")
    parser.add_argument(
        "--corpus",
        choices=("libreoffice", "manpages"),
        default="libreoffice",
        help="built-in corpus: the LibreOffice help in the papers' languages (default) or Debian man pages",
    )
    parser.add_argument(
        "--corpora", default=None, metavar="FILE", help="your train corpora file instead of a built-in corpus"
    )
    parser.add_argument(
        "--validation",
        default=None,
        metavar="FILE",
        help="your validation corpora file (with --corpora): where settings are compared",
    )
    parser.add_argument("--heldout", default=None, metavar="FILE", help="your test corpora file (with --corpora)")
    parser.add_argument(
        "--base",
        default=None,
        metavar="DIR",
        help="start from this local pretrained Hugging Face causal LM and its tokenizer instead of the base "
        "pretrained here",
    )
    parser.add_argument(
        "--tokens",
        type=int,
        default=None,
        metavar="N",
        help="with --base: stage-1 token budget (all new languages together) that scales the paper preset",
    )
    parser.add_argument(
        "--benchmark",
        default=None,
        metavar="DIR",
        help="directory of lm-eval task YAMLs named <task>_<lang> run on every row (needs moelpr[eval])",
    )
    parser.add_argument("--seed", type=int, default=0, help="random seed (default 0)")
    parser.add_argument(
        "--old",
        type=_codes,
        default=None,
        metavar="CODES",
        help="original languages of the built-in corpus, comma-separated (libreoffice: en,es,zh; manpages: "
        "en,es,zh; either: any of its six)",
    )
    parser.add_argument(
        "--new",
        type=_codes,
        default=None,
        metavar="CODES",
        help="languages to add, comma-separated (libreoffice: el,hu,tr; manpages: tr,hu,uk)",
    )
    parser.add_argument(
        "--precision",
        choices=("auto", "fp32", "bf16"),
        default="auto",
        help="training and evaluation precision; auto = float32, except bf16 for --sizes large and paper on "
        "a GPU with bf16 or a CPU with native bf16 matmuls (default auto; docs/demo.md has the measurements)",
    )
    parser.add_argument("--overwrite", action="store_true", help="replace a demo run made with other settings")
    parser.add_argument("--no-progress", action="store_true", help="no progress bars")


def run(args: argparse.Namespace) -> int:
    from moelpr.demo.run import run_demo
    from moelpr.errors import UserError

    if args.quick and args.sizes not in (None, "quick"):
        raise UserError(f"--quick is --sizes quick; it contradicts --sizes {args.sizes}: give one of them")
    sizes = "quick" if args.quick else args.sizes or ("paper" if args.base else "default")
    run_demo(
        args.output,
        sizes=sizes,
        corpus=args.corpus,
        corpora=args.corpora,
        base=args.base,
        tokens=args.tokens,
        benchmark=args.benchmark,
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
