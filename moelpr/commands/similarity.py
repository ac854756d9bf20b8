"""`moe-lpr similarity`: per-layer cross-lingual similarity of MLP inputs (LayerMoE, docs/method.md §4).

moe-lpr similarity --model DIR --corpora corpora.yaml --output similarity.json [--tokens 100000]
"""

from __future__ import annotations

import argparse
import itertools
import sys
from pathlib import Path
from typing import Any, Iterator

from moelpr.errors import UserError

EXAMPLE = "moe-lpr similarity --model Qwen1.5-1.8B --corpora recipes/corpora/review_en_zh_es_el_hu_tr.yaml --output runs/similarity.json"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--model", required=True, help="model directory (dense HF model or moelpr model)")
    parser.add_argument("--corpora", required=True, help="corpora YAML (or dataset_info.json) with language and role")
    parser.add_argument("--output", required=True, help="similarity.json to write")
    parser.add_argument("--tokens", type=int, default=100_000, help="tokens per language (default 100000)")
    parser.add_argument("--batch-size", type=int, default=8, help="documents per forward pass (default 8)")
    parser.add_argument("--max-length", type=int, default=10_000, help="truncate each document to this many tokens")
    parser.add_argument(
        "--new",
        default=None,
        help="comma-separated languages to treat as new, all others old (default: the corpora's roles); "
        "e.g. lifelong step 2 measures bn,hi,ne against en,es,zh,el,hu,tr",
    )
    parser.add_argument("--device", default=None, help="torch device (default: cuda if available, else cpu)")


def _chain_documents(corpora: list[Any]) -> Iterator[str]:
    from moelpr.data.corpus import iter_documents

    return itertools.chain.from_iterable(iter_documents(corpus) for corpus in corpora)


def group_by_language(corpora: list[Any]) -> tuple[dict[str, Iterator[str]], dict[str, str]]:
    """Lazy document streams and roles per language; corpora of one language are read in listed order."""
    by_language: dict[str, list[Any]] = {}
    roles: dict[str, str] = {}
    for corpus in corpora:
        if roles.setdefault(corpus.language, corpus.role) != corpus.role:
            raise UserError(f"language {corpus.language!r} is listed both as 'old' and 'new'; give it one role")
        by_language.setdefault(corpus.language, []).append(corpus)
    return {lang: _chain_documents(group) for lang, group in by_language.items()}, roles


def _nonempty_or_fail(lang: str, docs: Iterator[str]) -> Iterator[str]:
    """`docs` unchanged, after checking that it holds at least one non-empty document."""
    skipped: list[str] = []
    for doc in docs:
        skipped.append(doc)
        if doc:
            return itertools.chain(skipped, docs)
    raise UserError(f"language {lang!r} has no text in its corpora; check their paths and text_column")


def run(args: argparse.Namespace) -> int:
    import torch
    from transformers import AutoTokenizer

    from moelpr.checkpoint import load_model
    from moelpr.data.corpus import load_corpora
    from moelpr.layermoe.similarity import compute_similarity
    from moelpr.utils.atomic import atomic_write_json

    model_dir = Path(args.model)
    if not (model_dir / "config.json").is_file():
        raise UserError(f"model directory {model_dir} does not exist or has no config.json; pass --model DIR")
    if not Path(args.corpora).is_file():
        raise UserError(f"corpora file {args.corpora} does not exist; pass --corpora corpora.yaml")
    if args.tokens < 1 or args.batch_size < 1 or args.max_length < 1:
        raise UserError("--tokens, --batch-size and --max-length must be positive")
    texts, roles = group_by_language(load_corpora(args.corpora))
    if args.new is not None:
        new = {lang.strip() for lang in args.new.split(",") if lang.strip()}
        unknown = sorted(new - set(roles))
        if unknown:
            raise UserError(f"--new names language(s) {unknown} not in {args.corpora}; choose from {sorted(roles)}")
        roles = {lang: "new" if lang in new else "old" for lang in roles}
    if "new" not in roles.values():
        raise UserError(f"{args.corpora} has no corpus with role 'new'; the similarity needs a new language")
    if "old" not in roles.values():
        raise UserError(f"{args.corpora} has no corpus with role 'old'; the similarity needs an original language")

    texts = {lang: _nonempty_or_fail(lang, docs) for lang, docs in texts.items()}  # before the slow model load

    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    model = load_model(model_dir, device=device)
    tokenizer = AutoTokenizer.from_pretrained(str(model_dir))
    result = compute_similarity(
        model,
        tokenizer,
        texts,
        roles,
        tokens=args.tokens,
        batch_size=args.batch_size,
        max_length=args.max_length,
        model_name=str(model_dir),
    )
    for lang, count in result["tokens"].items():
        if count < args.tokens:
            print(f"warning: only {count} tokens of {lang!r} (asked for {args.tokens})", file=sys.stderr)
    atomic_write_json(args.output, result)
    print(f"{'layer':>5}  {'S_l':>8}")
    for entry in result["per_layer"]:
        print(f"{entry['layer']:>5}  {entry['score']:>8.4f}")
    print(f"wrote {args.output}")
    return 0
