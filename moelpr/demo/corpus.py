"""The demo's corpora: what the LibreOffice-help and the man-page builders share.

Two sources of the same kind (`CORPORA`): pages of documentation translated into several languages, each page
one document. `moelpr.demo.libreoffice` reads the LibreOffice help (the papers' six languages, the same pages in
every language); `moelpr.demo.manpages` the Debian manual pages. Both keep prose paragraphs (`is_prose`), drop
those that language identification assigns to another language (`language_identifier`), drop repeated
paragraphs (`paragraph_key`), split whole pages (`assign_splits`) and write (`write_corpus`)::

    train/<lang>.jsonl  validation/<lang>.jsonl  heldout/<lang>.jsonl   {"text": ...} per line, one line per page
    corpora.yaml  validation.yaml  heldout.yaml   corpora files (see docs/design.md, "Corpora"); heldout = test
    corpus_stats.json                             per-language counts
"""

from __future__ import annotations

import functools
import hashlib
import json
import os
import re
import unicodedata
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import yaml

from moelpr.errors import UserError
from moelpr.utils.atomic import atomic_output_dir

CORPORA = ("libreoffice", "manpages")
"""`moe-lpr demo --corpus` choices; the first is the default."""
SPLITS = ("train", "validation", "heldout")
STAT_KEYS = (
    "pages",
    "paragraphs_kept",
    "paragraphs_short_or_code",
    "paragraphs_wrong_language",
    "paragraphs_duplicate",
)

_COLUMN_GAP = re.compile(r"\S {3,}\S")  # table columns (renderers put at most 2 spaces after a sentence)
_CODE = re.compile(r"[{}]|;$|==|&&|\|\||->|^#\s*(?:include|define)\b")  # C, shell and Perl snippets
_CJK = "\u2e80-\u9fff\uf900-\ufaff\uff00-\uffef"
_CJK_GAP = re.compile(f"(?<=[{_CJK}]) (?=[{_CJK}])")  # line breaks inside CJK text become spaces


def corpus_languages(corpus: str) -> tuple[tuple[str, ...], tuple[str, ...], tuple[str, ...]]:
    """(supported languages, default old, default new) of a built-in corpus; a `UserError` for another name."""
    if corpus == "libreoffice":
        from moelpr.demo.libreoffice import DEFAULT_NEW, DEFAULT_OLD, HELP_SOURCES

        return tuple(HELP_SOURCES), DEFAULT_OLD, DEFAULT_NEW
    if corpus == "manpages":
        from moelpr.demo.manpages import DEFAULT_NEW, DEFAULT_OLD, MANPAGE_SOURCES

        return tuple(MANPAGE_SOURCES), DEFAULT_OLD, DEFAULT_NEW
    raise UserError(f"unknown --corpus {corpus!r}; choose one of {', '.join(CORPORA)}")


def check_languages(old: tuple[str, ...], new: tuple[str, ...], supported: Sequence[str]) -> None:
    """Refuse unknown languages, an empty role, or a language given twice (one-line `UserError`)."""
    listed = ", ".join(supported)
    for lang in (*old, *new):
        if lang not in supported:
            raise UserError(f"unknown demo language {lang!r}; supported: {listed}")
    if not old or not new:
        raise UserError(f"the demo needs at least one old and one new language; supported: {listed}")
    if set(old) & set(new) or len({*old, *new}) != len(old) + len(new):
        raise UserError(f"languages must appear once, as old or new (got old={list(old)}, new={list(new)})")


def check_fractions(heldout_fraction: float, validation_fraction: float) -> None:
    for name, fraction in (("heldout_fraction", heldout_fraction), ("validation_fraction", validation_fraction)):
        if not 0 <= fraction < 1:
            raise UserError(f"{name} must be in [0, 1), got {fraction}")
    if heldout_fraction + validation_fraction >= 1:
        raise UserError("heldout_fraction + validation_fraction must leave training text (sum below 1)")


# --------------------------------------------------------------------------- paragraphs


def display_width(line: str) -> int:
    return sum(2 if unicodedata.east_asian_width(c) in "WF" else 1 for c in line)


def clean(paragraph: str) -> str:
    """Single spaces, none between two CJK characters (roff and HTML turn CJK line breaks into spaces)."""
    return _CJK_GAP.sub("", " ".join(paragraph.split()))


def is_prose(paragraph: str, min_chars: int = 40) -> bool:
    """Long enough and mostly letters, not a table row: drops synopses, option lists, code, tables."""
    text = clean(paragraph)
    if len(text) < min_chars and display_width(text) < min_chars:  # a CJK character counts 2
        return False
    table_row = len(paragraph) < 200 and _COLUMN_GAP.search(paragraph)  # long prose may hold odd gaps
    if "\ufffd" in paragraph or table_row or _CODE.search(paragraph):
        return False
    visible = paragraph.replace(" ", "")
    return sum(c.isalpha() for c in visible) >= 0.7 * len(visible)


@functools.lru_cache(maxsize=2)  # one per worker process and corpus
def language_identifier(languages: tuple[str, ...]) -> Any:
    """py3langid restricted to `languages` (only the corpus's languages compete)."""
    from py3langid.langid import MODEL_FILE, LanguageIdentifier

    identifier = LanguageIdentifier.from_model_file(MODEL_FILE)
    identifier.set_languages(sorted(languages))
    return identifier


def paragraph_key(paragraph: str) -> bytes:
    """The identity of a paragraph for deduplication: its NFKC, case-folded, space-normalised text."""
    normal = " ".join(unicodedata.normalize("NFKC", paragraph).casefold().split())
    return hashlib.sha1(normal.encode()).digest()


# --------------------------------------------------------------------------- splits


def unit_hash(text: str) -> float:
    """A deterministic number in [0, 1) from `text`."""
    return int(hashlib.sha256(text.encode()).hexdigest()[:15], 16) / 16**15


def assign_splits(
    sizes: Sequence[tuple[str, int]], heldout_fraction: float, validation_fraction: float, seed: int
) -> dict[str, list[str]]:
    """Page names by split ("heldout" = test, "validation", "train"), from (page name, size) pairs.

    Pages are visited in the order of a seeded hash of their name. The test split takes them while they fit in
    `heldout_fraction` of the total size, then the validation split while they fit in `validation_fraction`, so
    a few huge pages cannot unbalance a split and the test pages do not depend on `validation_fraction`. Every
    requested split gets at least one page when there are enough, and train keeps at least one. Each split
    lists its pages in that hashed order.
    """
    ranked = sorted(sizes, key=lambda d: unit_hash(f"split:{seed}:{d[0]}"))
    size = dict(sizes)
    total = sum(size.values())
    splits: dict[str, list[str]] = {"heldout": [], "validation": [], "train": []}
    rest = [name for name, _ in ranked]
    for split, fraction in (("heldout", heldout_fraction), ("validation", validation_fraction)):
        budget, left = fraction * total, []
        for name in rest:
            fits = size[name] <= budget
            (splits[split] if fits else left).append(name)
            budget -= size[name] if fits else 0
        if fraction > 0 and not splits[split] and len(left) >= 2:
            splits[split].append(left.pop(0))
        rest = left
    splits["train"] = rest
    for split in ("validation", "heldout"):
        if not splits["train"] and len(splits[split]) >= 2:
            splits["train"].append(splits[split].pop())
    return splits


def cap(texts: list[str], max_chars: int | None) -> list[str]:
    """The first documents up to `max_chars` characters, the last one cut at a paragraph boundary."""
    if max_chars is None:
        return texts
    kept, total = [], 0
    for text in texts:
        if total + len(text) > max_chars:
            head = text[: max_chars - total].rpartition("\n\n")[0]
            return kept + ([head] if head else [])
        kept.append(text)
        total += len(text)
    return kept


# --------------------------------------------------------------------------- output


def write_jsonl(path: Path, texts: list[str]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w", encoding="utf-8") as f:
        f.writelines(json.dumps({"text": t}, ensure_ascii=False) + "\n" for t in texts)


def write_corpus(
    out_dir: str | os.PathLike,
    docs: dict[str, dict[str, list[str]]],
    *,
    old: Sequence[str],
    prefix: str,
    stats: dict[str, dict[str, Any]],
    summary: dict[str, Any],
    with_validation: bool,
    overwrite: bool,
) -> Path:
    """Write the corpus directory of the module docstring (atomically) and return the path of `corpora.yaml`.

    Args:
        docs: language → split → the documents' texts, in order; every language needs training text.
        old: the languages of role "old" (the others are "new").
        prefix: the corpora entries' name prefix (the source).
        stats: per-language counts; the documents and characters of each split are added (and of all of them,
            unless given).
        summary: written to corpus_stats.json beside `languages` (the stats).
        with_validation: write validation.yaml.
    """
    entries: dict[str, list[dict]] = {split: [] for split in SPLITS}
    final = Path(out_dir)
    with atomic_output_dir(final, overwrite=overwrite) as tmp:
        for lang, splits in docs.items():
            s = stats[lang]
            s.setdefault("docs", sum(len(texts) for texts in splits.values()))
            s.setdefault("chars", sum(len(t) for texts in splits.values() for t in texts))
            for split in SPLITS:
                texts = splits.get(split, [])
                s[f"{split}_docs"], s[f"{split}_chars"] = len(texts), sum(map(len, texts))
                if texts:  # validation and held-out entries only where there is such text
                    write_jsonl(tmp / split / f"{lang}.jsonl", texts)
                    suffix = "" if split == "train" else f"_{split}"
                    entries[split].append(
                        {  # relative paths resolve against the corpora file's directory: the output can move
                            "name": f"{prefix}_{lang}{suffix}",
                            "path": f"{split}/{lang}.jsonl",
                            "language": lang,
                            "role": "old" if lang in old else "new",
                            "text_column": "text",
                        }
                    )
        files = [("train", "corpora.yaml"), ("heldout", "heldout.yaml")]
        files += [("validation", "validation.yaml")] if with_validation else []
        for split, file in files:
            (tmp / file).write_text(yaml.safe_dump(entries[split], sort_keys=False, allow_unicode=True))
        record = {**summary, "languages": stats}
        (tmp / "corpus_stats.json").write_text(json.dumps(record, indent=2, ensure_ascii=False) + "\n")
    return final / "corpora.yaml"
