"""`moe-lpr prepare`: read, tokenise and pack corpora once, in parallel, into a dataset training memory-maps.

A recipe then names the output directory as `prepared: DIR` instead of `corpora:`. Running the command again
reuses a finished dataset (after checking its shards), continues a killed one where it stopped, and prepares
again only the shards whose inputs changed (`moelpr.data.prepare`).
"""

from __future__ import annotations

import argparse
import os
from pathlib import Path

from moelpr.errors import UserError

_TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "tokenizer.model")


EXAMPLE = "moe-lpr prepare recipes/corpora/walkthrough_culturax_el_hu_tr.yaml --tokenizer models/Qwen1.5-1.8B --cutoff-len 1024 --output data/prepared/stage1"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("corpora", help="corpora file (YAML, or LLaMA-Factory's dataset_info.json)")
    parser.add_argument("--tokenizer", required=True, help="the model's directory (or one holding its tokenizer)")
    parser.add_argument("--cutoff-len", type=int, required=True, help="tokens per block (the recipe's cutoff_len)")
    parser.add_argument("--output", required=True, help="dataset directory (a recipe's prepared:)")
    parser.add_argument(
        "--num-proc", type=int, default=os.cpu_count() or 1, help="tokenising processes (default: all cores)"
    )
    parser.add_argument(
        "--on-bad-record",
        choices=("error", "skip"),
        default="error",
        help="a malformed record stops with its file and line (error, default) or is left out (skip)",
    )
    parser.add_argument(
        "--shard-mb",
        type=int,
        default=256,
        help="input MiB per shard: the unit of parallel work and of resumption (default 256)",
    )
    parser.add_argument("--overwrite", action="store_true", help="replace a directory that holds another dataset")
    parser.add_argument("--quiet", action="store_true", help="no progress bar")


def run(args: argparse.Namespace) -> None:
    from moelpr.data import load_corpora, read_manifest
    from moelpr.data.prepare import prepare, summary

    for flag in ("cutoff_len", "num_proc", "shard_mb"):
        if getattr(args, flag) < 1:
            raise UserError(f"--{flag.replace('_', '-')} must be a positive integer, got {getattr(args, flag)}")
    corpora = load_corpora(args.corpora)
    tokenizer = load_tokenizer(args.tokenizer)
    root = prepare(
        corpora,
        tokenizer,
        args.output,
        cutoff_len=args.cutoff_len,
        num_proc=args.num_proc,
        on_bad_record=args.on_bad_record,
        shard_bytes=args.shard_mb << 20,
        overwrite=args.overwrite,
        progress=not args.quiet,
        verify=True,
    )
    print(summary(read_manifest(root)))
    print(f"prepared: {root}")


def load_tokenizer(path: str):
    """The tokenizer in `path`; `UserError` when there is none or it has no EOS (it ends every document)."""
    from transformers import AutoTokenizer

    folder = Path(path)
    if not any((folder / name).is_file() for name in _TOKENIZER_FILES):
        raise UserError(f"no tokenizer in {path}; give the model's directory (it holds tokenizer.json)")
    tokenizer = AutoTokenizer.from_pretrained(folder)
    if tokenizer.eos_token_id is None:
        raise UserError(f"the tokenizer in {path} has no eos_token; set one (it ends every packed document)")
    return tokenizer
