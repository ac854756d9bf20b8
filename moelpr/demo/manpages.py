"""The man-page corpus (`moe-lpr demo --corpus manpages`): Debian manual pages rendered to prose paragraphs.

Each language comes from one Debian package (`MANPAGE_SOURCES`). A page is rendered with mandoc (or
man-db as a fallback), split into paragraphs, filtered (length, code-likeness, language ID restricted
to the six man-page languages) and deduplicated across the whole corpus. Each page is one document, kept
whole in train, validation or held-out; pages are visited in the order of a seeded hash of their name, the
same order in every language, and split by each language's own characters (the languages' page sets differ).
The output directory is `moelpr.demo.corpus`'s.
"""

from __future__ import annotations

import concurrent.futures
import dataclasses
import gzip
import logging
import os
import re
import shutil
import subprocess
from pathlib import Path

from moelpr.demo.corpus import (
    STAT_KEYS,
    assign_splits,
    cap,
    check_fractions,
    check_languages,
    clean,
    display_width,
    is_prose,
    language_identifier,
    paragraph_key,
    unit_hash,
    write_corpus,
)
from moelpr.errors import UserError

logger = logging.getLogger(__name__)

MANPAGE_SOURCES: dict[str, tuple[str, str]] = {
    "en": ("manpages", ""),  # English pages sit directly in /usr/share/man/man*/
    "es": ("manpages-es", "es"),
    "zh": ("manpages-zh", "zh_CN"),  # simplified; the package also ships zh_TW
    "tr": ("manpages-tr", "tr"),
    "hu": ("manpages-hu", "hu"),
    "uk": ("manpages-uk", "uk"),
}
"""Language code → (Debian package, subdirectory of the man root holding its `man<N>/` sections)."""
DEFAULT_OLD = ("en", "es", "zh")
DEFAULT_NEW = ("tr", "hu", "uk")

SYSTEM_MAN_ROOT = Path("/usr/share/man")
RENDER_WIDTH = 1000  # mandoc's maximum; wide enough that few paragraphs wrap
_WRAP_SLACK = 200  # a line this close to RENDER_WIDTH that is followed by text was wrapped
_INSTALL_HINT = (
    "run: bash scripts/install_corpora.sh (or: apt-get install manpages manpages-es manpages-zh "
    "manpages-tr manpages-hu manpages-uk mandoc), or give your own text with --corpora and --heldout"
)

_OVERSTRIKE = re.compile(".\b")  # bold/underline as "x\bx" / "_\bx"
# The tag of a tagged paragraph: "-c, --count   Text" → "Text" (not a sentence: "Done.  Next").
_TAG = re.compile(r"^\S{1,30}(?:,? \S{1,30})?(?<![.!?;。])\s{2,}(?=\S)")


@dataclasses.dataclass(frozen=True)
class ManPage:
    """One man page source file of one language."""

    language: str
    name: str  # "man1/bash.1": the same for every translation of the page
    path: Path


@dataclasses.dataclass
class PageResult:
    """Paragraphs kept from one page and why the others were dropped."""

    page: ManPage
    paragraphs: list[str]
    stub: bool = False  # a ".so" redirect, not a page
    short_or_code: int = 0
    wrong_language: int = 0


# --------------------------------------------------------------------------- listing


def list_manpages(language: str, man_root: str | os.PathLike | None = None) -> list[ManPage]:
    """The man pages of `language`, sorted by name.

    Args:
        language: a key of `MANPAGE_SOURCES`.
        man_root: a directory laid out like /usr/share/man to walk instead; by default the files come
            from `dpkg -L <package>`, so English pages are those of `manpages` only.
    """
    package, subdir = MANPAGE_SOURCES[language]
    if man_root is not None:
        base = Path(man_root) / subdir
        files = [p for p in base.glob("man*/*") if p.is_file()]
    else:
        base = SYSTEM_MAN_ROOT / subdir
        files = [Path(line) for line in _dpkg_files(package)]
    pages = {}
    for path in files:
        rel = path.relative_to(base) if path.is_relative_to(base) else None
        # Only base/man<N>/<page>: no other language's tree, no symlinked aliases.
        if rel is None or len(rel.parts) != 2 or not rel.parts[0].startswith("man") or path.is_symlink():
            continue
        if path.is_file():
            name = f"{rel.parts[0]}/{rel.name.removesuffix('.gz')}"
            pages[name] = ManPage(language, name, path)
    if not pages:
        where = f"under {base}" if man_root is not None else f"(package {package} not installed?)"
        raise UserError(f"no man pages found for language {language!r} {where}; {_INSTALL_HINT}")
    return [pages[name] for name in sorted(pages)]


def _dpkg_files(package: str) -> list[str]:
    if shutil.which("dpkg") is None:
        raise UserError(f"dpkg not found, so the files of {package} cannot be listed; pass man_root= instead")
    proc = subprocess.run(["dpkg", "-L", package], capture_output=True, text=True)
    return proc.stdout.splitlines() if proc.returncode == 0 else []


# --------------------------------------------------------------------------- rendering


def find_renderer(renderer: str | None = None) -> str:
    """Pick "mandoc" (fast, no hyphenation or justification) or else "man" (man-db + groff)."""
    available = [r for r in ("mandoc", "man") if shutil.which(r)]
    if renderer is None and available:
        return available[0]
    if renderer in available:
        return renderer
    if renderer not in (None, "mandoc", "man"):
        raise UserError(f"unknown renderer {renderer!r}; choose mandoc or man")
    raise UserError(f"man page renderer {renderer or 'mandoc/man'} not found; {_INSTALL_HINT}")


def render(source: bytes, renderer: str) -> str:
    """Render roff man-page source to plain UTF-8 text, one filled paragraph per line where possible."""
    if renderer == "mandoc":
        cmd, env = ["mandoc", "-Tutf8", f"-Owidth={RENDER_WIDTH}"], None
    else:  # man-db honours MANWIDTH only in its nroff mode, so no -T here
        cmd = ["man", "-l", "--no-hyphenation", "--no-justification", "-"]
        env = {**os.environ, "LC_ALL": "C.UTF-8", "MANWIDTH": str(RENDER_WIDTH), "MAN_DISABLE_SECCOMP": "1"}
        env.pop("MAN_KEEP_FORMATTING", None)
    try:
        proc = subprocess.run(cmd, input=source, capture_output=True, env=env, timeout=120)
    except subprocess.TimeoutExpired:
        logger.warning("%s timed out on a page; skipping it", renderer)
        return ""
    return _OVERSTRIKE.sub("", proc.stdout.decode("utf-8", errors="replace"))


def extract_paragraphs(rendered: str) -> list[str]:
    """Paragraphs of rendered text: wrapped lines joined; headings, page header and footer dropped.

    Inner spacing is kept (table columns show as wide gaps); `clean` normalises it.
    """
    lines = [line.rstrip() for line in rendered.splitlines()]
    text_rows = [i for i, line in enumerate(lines) if line]
    if len(text_rows) < 3:
        return []
    paragraphs: list[str] = []
    current: list[str] = []
    wrapped = False
    for line in lines[text_rows[0] + 1 : text_rows[-1]]:  # without the page header and footer
        if not wrapped and current:
            paragraphs.append(" ".join(current))
            current = []
        if not line or not line[0].isspace():  # blank, or a section heading
            wrapped = False
            continue
        current.append(line.strip() if current else _TAG.sub("", line.strip()))
        near_full = 2 * len(line) >= RENDER_WIDTH - _WRAP_SLACK  # cheap bound: width <= 2 * len
        wrapped = near_full and display_width(line) >= RENDER_WIDTH - _WRAP_SLACK
    if current:
        paragraphs.append(" ".join(current))
    return paragraphs


# --------------------------------------------------------------------------- one page (worker)


def process_page(page: ManPage, renderer: str, min_chars: int = 40) -> PageResult:
    """Render one page and keep its prose paragraphs that language ID assigns to the page's language."""
    raw = page.path.read_bytes()
    source = gzip.decompress(raw) if raw[:2] == b"\x1f\x8b" else raw
    if source.lstrip().startswith(b".so "):
        return PageResult(page, [], stub=True)
    result = PageResult(page, [])
    identifier = language_identifier(tuple(MANPAGE_SOURCES))
    for paragraph in extract_paragraphs(render(source, renderer)):
        if not is_prose(paragraph, min_chars):
            result.short_or_code += 1
            continue
        paragraph = clean(paragraph)
        if identifier.classify(paragraph)[0] != page.language:
            result.wrong_language += 1
        else:
            result.paragraphs.append(paragraph)
    return result


def _process_all(pages: list[ManPage], renderer: str, min_chars: int, workers: int) -> list[PageResult]:
    if workers <= 1:
        return [process_page(p, renderer, min_chars) for p in pages]
    with concurrent.futures.ProcessPoolExecutor(workers) as pool:
        return list(pool.map(process_page, pages, [renderer] * len(pages), [min_chars] * len(pages), chunksize=4))


# --------------------------------------------------------------------------- corpus


def _dedup_into_docs(results: list[PageResult]) -> tuple[dict[str, list[tuple[str, str]]], dict[str, dict]]:
    """(page name, text) documents per language, each paragraph kept at its first occurrence only."""
    seen: set[bytes] = set()
    docs: dict[str, list[tuple[str, str]]] = {}
    stats: dict[str, dict] = {}
    for r in results:  # languages as given, pages by name: first occurrences are deterministic
        lang = r.page.language
        s = stats.setdefault(lang, {"package": MANPAGE_SOURCES[lang][0], **dict.fromkeys(STAT_KEYS, 0)})
        s["pages"] += not r.stub
        s["paragraphs_short_or_code"] += r.short_or_code
        s["paragraphs_wrong_language"] += r.wrong_language
        kept = []
        for paragraph in r.paragraphs:
            key = paragraph_key(paragraph)
            if key not in seen:
                seen.add(key)
                kept.append(paragraph)
        s["paragraphs_duplicate"] += len(r.paragraphs) - len(kept)
        s["paragraphs_kept"] += len(kept)
        docs.setdefault(lang, [])
        if kept:
            docs[lang].append((r.page.name, "\n\n".join(kept)))
    return docs, stats


def build_manpage_corpus(
    out_dir: str | os.PathLike,
    *,
    languages_old: tuple[str, ...] = DEFAULT_OLD,
    languages_new: tuple[str, ...] = DEFAULT_NEW,
    heldout_fraction: float = 0.1,
    validation_fraction: float = 0.0,
    max_docs_per_language: int | None = None,
    max_chars_per_language: int | None = None,
    seed: int = 0,
    min_chars: int = 40,
    man_root: str | os.PathLike | None = None,
    renderer: str | None = None,
    workers: int | None = None,
    overwrite: bool = False,
) -> Path:
    """Build the demo corpus from installed Debian man pages and return the path of `corpora.yaml`.

    Args:
        out_dir: output directory, written atomically.
        languages_old: the original languages (role "old"); codes from `MANPAGE_SOURCES`.
        languages_new: the languages to add (role "new").
        heldout_fraction: share of the characters held out for the test evaluation, as whole pages.
        validation_fraction: share of the characters held out for validation (where settings are chosen),
            as whole pages disjoint from the test pages; 0 writes no validation split.
        max_docs_per_language: render at most this many pages per language (a seeded hash sample).
        max_chars_per_language: cap on training characters per language (held-out and validation: this ×
            their ratio to train); None keeps everything.
        seed: seeds the page sample and the train/held-out split.
        min_chars: narrower paragraphs are dropped (display columns: a CJK character counts 2).
        man_root: a tree laid out like /usr/share/man to read instead of the installed packages.
        renderer: "mandoc" or "man"; default: mandoc when installed.
        workers: rendering processes; default: all CPU cores.
        overwrite: replace an existing non-empty `out_dir`.
    """
    old, new = tuple(languages_old), tuple(languages_new)
    check_languages(old, new, tuple(MANPAGE_SOURCES))
    check_fractions(heldout_fraction, validation_fraction)
    renderer = find_renderer(renderer)
    pages: list[ManPage] = []
    for lang in (*old, *new):
        found = list_manpages(lang, man_root)
        if max_docs_per_language is not None:
            found = sorted(found, key=lambda p: unit_hash(f"sample:{seed}:{p.name}"))[:max_docs_per_language]
        pages += sorted(found, key=lambda p: p.name)
    logger.info("rendering %d man pages with %s", len(pages), renderer)
    results = _process_all(pages, renderer, min_chars, workers or os.cpu_count() or 1)
    docs, stats = _dedup_into_docs(results)

    limit = max_chars_per_language
    train_fraction = 1 - heldout_fraction - validation_fraction
    caps = {
        "train": limit,
        "validation": None if limit is None else int(limit * validation_fraction / train_fraction),
        "heldout": None if limit is None else int(limit * heldout_fraction / train_fraction),
    }
    by_split: dict[str, dict[str, list[str]]] = {}
    for lang, lang_docs in docs.items():
        if not lang_docs:
            raise UserError(f"no usable text in the {lang!r} man pages; reinstall {MANPAGE_SOURCES[lang][0]}")
        text = dict(lang_docs)
        names = assign_splits([(n, len(t)) for n, t in lang_docs], heldout_fraction, validation_fraction, seed)
        by_split[lang] = {split: cap([text[n] for n in names[split]], caps[split]) for split in names}
        if not by_split[lang]["train"]:
            raise UserError(f"max_chars_per_language={limit} leaves no {lang!r} text; raise it")
        stats[lang]["docs"], stats[lang]["chars"] = len(lang_docs), sum(len(t) for _, t in lang_docs)
    summary = {
        "source": "manpages",
        "renderer": renderer,
        "seed": seed,
        "heldout_fraction": heldout_fraction,
        "validation_fraction": validation_fraction,
    }
    return write_corpus(
        out_dir,
        by_split,
        old=old,
        prefix="manpages",
        stats=stats,
        summary=summary,
        with_validation=validation_fraction > 0,
        overwrite=overwrite,
    )
