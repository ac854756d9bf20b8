"""`moe-lpr <verb>`: a thin verb → module table.

Each verb lives in `moelpr.commands.<module>`, which defines `add_arguments(parser)`, `run(args)` and `EXAMPLE`
(the command line that ends its help). A verb module imports nothing heavy at the top, so `moe-lpr --help`,
`moe-lpr VERB --help`, `--version` and argument errors never import torch. Bad input raises `UserError`; it is
printed as one line and the process exits with status 2.
"""

from __future__ import annotations

import argparse
import importlib
import sys

from moelpr.errors import UserError

VERBS: dict[str, tuple[str, str]] = {
    "upcycle": ("upcycle", "upcycle a dense model into an MoE-LPR model"),
    "info": ("info", "show experts per layer, parameter counts and trainable sets of a model"),
    "prepare": ("prepare", "tokenise and pack corpora once into a dataset that training memory-maps"),
    "train": ("train", "run a training recipe (MoE stage 1/2 or a baseline)"),
    "eval": ("eval", "per-language perplexity, bits per byte and routing statistics"),
    "benchmark": ("benchmark", "run lm-evaluation-harness task suites on a model (accuracy benchmarks)"),
    "report": ("report", "render results files as a Markdown table and PNG figures"),
    "similarity": ("similarity", "per-layer cross-lingual similarity of MLP inputs (LayerMoE)"),
    "allocate": ("allocate", "per-layer expert counts from similarities (LayerMoE)"),
    "export": ("export", "write a portable full, Mixtral or Qwen-MoE checkpoint"),
    "generate": ("generate", "generate text from a prompt"),
    "demo": ("demo", "the miniature end-to-end reproduction on CPU"),
}


def _version() -> str:
    import moelpr

    return f"moe-lpr {moelpr.__version__}"


def _top_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="moe-lpr",
        description="MoE-LPR: add languages to an LLM without forgetting.",
        epilog="example:\n  moe-lpr train recipes/moe_lpr/qwen1.5-1.8b_stage1.yaml\n\n"
        "moe-lpr VERB --help describes each verb.",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--version", action="version", version=_version())
    sub = parser.add_subparsers(dest="verb", metavar="VERB")
    for verb, (_, help_text) in VERBS.items():
        sub.add_parser(verb, help=help_text, add_help=False)
    return parser


def verb_parser(verb: str):
    """The verb's module and its argument parser (help ends with the verb's example)."""
    module = importlib.import_module(f"moelpr.commands.{VERBS[verb][0]}")
    parser = argparse.ArgumentParser(
        prog=f"moe-lpr {verb}",
        description=VERBS[verb][1],
        epilog=f"example:\n  {module.EXAMPLE}",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    module.add_arguments(parser)
    return module, parser


def _quiet_transformers() -> None:
    """Keep transformers' weight-loading bars and advisories off the terminal; our own output stays."""
    import os

    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    from transformers.utils import logging

    logging.disable_progress_bar()


def run_verb(verb: str, argv: list[str]) -> int:
    """Parse `argv` for `verb` and run it; a `UserError` propagates (`main` turns it into exit status 2)."""
    module, parser = verb_parser(verb)
    args = parser.parse_args(argv)  # --help and argument errors exit here, before anything heavy is imported
    _quiet_transformers()
    return int(module.run(args) or 0)


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] not in VERBS:
        parser = _top_parser()
        if argv and argv[0] not in ("-h", "--help", "--version"):
            parser.print_usage(sys.stderr)
            print(f"moe-lpr: error: unknown verb {argv[0]!r}; choose one of: {', '.join(VERBS)}", file=sys.stderr)
            return 2
        if argv and argv[0] == "--version":
            print(_version())
            return 0
        parser.print_help()
        return 0 if argv else 2
    verb, rest = argv[0], argv[1:]
    try:
        return run_verb(verb, rest)
    except UserError as err:
        print(f"moe-lpr {verb}: error: {err}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"moe-lpr {verb}: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
