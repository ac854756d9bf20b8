"""`moe-lpr <verb>`: a thin verb → module table.

Each verb lives in `moelpr.commands.<module>`, which defines `add_arguments(parser)` and `run(args)`.
Modules are imported only when their verb runs, so `moe-lpr --help` stays fast. Bad input raises
`UserError`; it is printed as one line and the process exits with status 2.
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
    "benchmark": ("benchmark", "run lm-evaluation-harness task suites on a model"),
    "report": ("report", "render results files as a Markdown table and PNG figures"),
    "similarity": ("similarity", "per-layer cross-lingual similarity of MLP inputs (LayerMoE)"),
    "allocate": ("allocate", "per-layer expert counts from similarities (LayerMoE)"),
    "export": ("export", "write a portable full, Mixtral or Qwen-MoE checkpoint"),
    "generate": ("generate", "generate text from a prompt"),
    "demo": ("demo", "the miniature end-to-end reproduction on CPU"),
}


def _top_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="moe-lpr", description="MoE-LPR: add languages to an LLM without forgetting.")
    sub = parser.add_subparsers(dest="verb", metavar="VERB")
    for verb, (_, help_text) in VERBS.items():
        sub.add_parser(verb, help=help_text, add_help=False)
    return parser


def _quiet_transformers() -> None:
    """Keep transformers' weight-loading bars and advisories off the terminal; our own output stays."""
    import os

    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    from transformers.utils import logging

    logging.disable_progress_bar()


def run_verb(verb: str, argv: list[str]) -> int:
    """Parse `argv` for `verb` and run it; a `UserError` propagates (`main` turns it into exit status 2)."""
    module = importlib.import_module(f"moelpr.commands.{VERBS[verb][0]}")
    parser = argparse.ArgumentParser(prog=f"moe-lpr {verb}", description=VERBS[verb][1])
    module.add_arguments(parser)
    return int(module.run(parser.parse_args(argv)) or 0)


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help") or argv[0] not in VERBS:
        parser = _top_parser()
        if argv and argv[0] not in ("-h", "--help"):
            parser.print_usage(sys.stderr)
            print(f"moe-lpr: error: unknown verb {argv[0]!r}; choose one of: {', '.join(VERBS)}", file=sys.stderr)
            return 2
        parser.print_help()
        return 0 if argv else 2
    verb, rest = argv[0], argv[1:]
    _quiet_transformers()
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
