"""The LibreOffice-help corpus (`moe-lpr demo --corpus libreoffice`, the default): the papers' six languages.

Debian ships the LibreOffice 7.4 help as HTML in en-US, es, zh-CN, el, hu and tr (`HELP_SOURCES`): the same
2,561 pages in every language, translated. `scripts/install_corpora.sh` fetches the six packages with `apt-get
download` and unpacks them with `dpkg-deb -x` into a cache directory (`help_root`); nothing is installed and
nothing is downloaded when the corpus is built.

A page (one HTML file, named by its path under the language's directory: the same name in every language) is
one document. Its prose paragraphs are the `<p>` elements of the page's display area, with the markup stripped,
without headings, code, menu-path boxes and the hidden platform variants (the macOS text of a "Tools - Options"
switch), filtered as prose (`moelpr.demo.corpus.is_prose`) and by language identification among the six
languages: strings left untranslated (English inside the Hungarian pages) are dropped.

**Split by page across languages**: a page and all its translations fall in the same split (train, validation
or test), sized by the page's characters summed over the languages. Paragraphs repeated across pages (help
sections embedded in several pages) are kept at their first occurrence with the test pages visited first, then
the validation pages, then the training pages, and the repeat is detected before the filters: no paragraph of
a test page, in any language, reaches training, neither as itself nor through its translation.
"""

from __future__ import annotations

import concurrent.futures
import os
from html.parser import HTMLParser
from pathlib import Path
from typing import Any

from moelpr.demo.corpus import (
    STAT_KEYS,
    assign_splits,
    check_fractions,
    check_languages,
    clean,
    is_prose,
    language_identifier,
    paragraph_key,
    unit_hash,
    write_corpus,
)
from moelpr.errors import UserError

HELP_SOURCES: dict[str, tuple[str, str]] = {
    "en": ("libreoffice-help-en-us", "en-US"),
    "es": ("libreoffice-help-es", "es"),
    "zh": ("libreoffice-help-zh-cn", "zh-CN"),
    "el": ("libreoffice-help-el", "el"),
    "hu": ("libreoffice-help-hu", "hu"),
    "tr": ("libreoffice-help-tr", "tr"),
}
"""Language code → (Debian package, directory of its pages under the help root)."""
DEFAULT_OLD = ("en", "es", "zh")
DEFAULT_NEW = ("el", "hu", "tr")
ROOT_ENV = "MOELPR_LIBREOFFICE_HELP"
SYSTEM_ROOT = Path("/usr/share/libreoffice/help")  # where an installed LibreOffice keeps its help
INSTALL_HINT = "run: bash scripts/install_corpora.sh (it unpacks the libreoffice-help-* packages into the cache)"

_VOID = frozenset({"area", "base", "br", "col", "embed", "hr", "img", "input", "link", "meta", "source", "wbr"})
_SKIPPED_TAGS = frozenset({"pre", "script", "style", "h1", "h2", "h3", "h4", "h5", "h6"})
_SKIPPED_CLASSES = frozenset(
    {
        "code",  # Basic / Python code and formulas
        "codeintable",
        "smathcode",
        "example",  # command lines
        "howtoget",  # "To access this command...": menu paths
        "howtogetheader",
        "bascode",
        "pycode",
        "related",  # "Related Topics"
        "image",
        "imageintable",
    }
)


def help_root(root: str | os.PathLike | None = None) -> Path:
    """The directory holding `<lang dir>/text/...`: `root`, else $MOELPR_LIBREOFFICE_HELP, else the install
    script's cache (`$XDG_CACHE_HOME/moelpr/libreoffice-help`, ~/.cache by default), else an installed
    LibreOffice's help (/usr/share/libreoffice/help)."""
    if root is not None:
        return Path(root)
    if os.environ.get(ROOT_ENV):
        return Path(os.environ[ROOT_ENV])
    cache = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "moelpr" / "libreoffice-help"
    if cache.is_dir() or not SYSTEM_ROOT.is_dir():
        return cache
    return SYSTEM_ROOT


def list_pages(language: str, root: Path) -> dict[str, Path]:
    """The help pages of `language` under `root`: page name (path under the language's directory) → file."""
    base = root / HELP_SOURCES[language][1]
    pages = {str(p.relative_to(base)): p for p in sorted((base / "text").rglob("*.html")) if p.is_file()}
    if not pages:
        package = HELP_SOURCES[language][0]
        raise UserError(f"no LibreOffice help pages for language {language!r} under {base} ({package}); {INSTALL_HINT}")
    return pages


class _HelpPage(HTMLParser):
    """The text of each `<p>` of the page's display area, skipping the elements of the module docstring."""

    def __init__(self) -> None:
        super().__init__(convert_charrefs=True)
        self.paragraphs: list[str] = []
        self._stack: list[str] = []
        self._area: int | None = None  # depth of <div id="DisplayArea">
        self._skip: int | None = None  # depth of the skipped element the parser is in
        self._para: int | None = None  # depth of the open paragraph
        self._text: list[str] = []

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        if tag in _VOID:
            if tag == "br" and self._para is not None:
                self._text.append(" ")
            return
        self._stack.append(tag)
        depth, attr = len(self._stack), dict(attrs)
        if self._area is None:
            if tag == "div" and attr.get("id") == "DisplayArea":
                self._area = depth
            return
        if self._skip is not None:
            return
        classes = set((attr.get("class") or "").split())
        hidden_variant = "hidden" in attr and bool(classes)  # MAC, WRITER, ...; the default variant has no class
        if hidden_variant or tag in _SKIPPED_TAGS or classes & _SKIPPED_CLASSES:
            self._skip = depth
        elif tag == "p" and self._para is None:
            self._para, self._text = depth, []

    def handle_endtag(self, tag: str) -> None:
        if tag in _VOID or tag not in self._stack:
            return
        while self._stack:  # close what the page left open inside `tag`
            depth = len(self._stack)
            opened = self._stack.pop()
            if self._skip == depth:
                self._skip = None
            if self._para == depth:
                self._para = None
                self.paragraphs.append("".join(self._text))
            if self._area == depth:
                self._area = None
            if opened == tag:
                break

    def handle_data(self, data: str) -> None:
        if self._para is not None and self._skip is None:
            self._text.append(data)


def page_paragraphs(html: str) -> list[str]:
    """The paragraphs of one help page as text (single spaces), empty ones dropped, in page order."""
    parser = _HelpPage()
    start = html.find('<div id="DisplayArea"')  # what precedes it is the page's head and navigation
    parser.feed(html[start:] if start >= 0 else html)
    parser.close()
    return [text for text in (clean(p) for p in parser.paragraphs) if text]


def _read_page(language: str, path: Path, min_chars: int) -> list[tuple[bytes, str | None, str]]:
    """Per paragraph of one page: its dedup key, its text if kept, and the verdict (kept, short_or_code,
    wrong_language)."""
    identifier = language_identifier(tuple(HELP_SOURCES))
    out = []
    for paragraph in page_paragraphs(path.read_text(encoding="utf-8", errors="replace")):
        if not is_prose(paragraph, min_chars):
            out.append((paragraph_key(paragraph), None, "short_or_code"))
        elif identifier.classify(paragraph)[0] != language:
            out.append((paragraph_key(paragraph), None, "wrong_language"))
        else:
            out.append((paragraph_key(paragraph), paragraph, "kept"))
    return out


def _read_all(
    langs: list[str], paths: list[Path], min_chars: int, workers: int
) -> list[list[tuple[bytes, str | None, str]]]:
    if workers <= 1:
        return [_read_page(lang, path, min_chars) for lang, path in zip(langs, paths)]
    with concurrent.futures.ProcessPoolExecutor(workers) as pool:
        return list(pool.map(_read_page, langs, paths, [min_chars] * len(paths), chunksize=16))


def build_libreoffice_corpus(
    out_dir: str | os.PathLike,
    *,
    languages_old: tuple[str, ...] = DEFAULT_OLD,
    languages_new: tuple[str, ...] = DEFAULT_NEW,
    heldout_fraction: float = 0.1,
    validation_fraction: float = 0.1,
    max_pages: int | None = None,
    seed: int = 0,
    min_chars: int = 40,
    root: str | os.PathLike | None = None,
    workers: int | None = None,
    overwrite: bool = False,
) -> Path:
    """Build the corpus from the unpacked LibreOffice help and return the path of `corpora.yaml`.

    Args:
        out_dir: output directory, written atomically (layout: `moelpr.demo.corpus`).
        languages_old / languages_new: codes from `HELP_SOURCES` (roles "old" and "new").
        heldout_fraction / validation_fraction: shares of the characters (all languages together) whose pages go
            to the test and the validation split; 0 validation writes no validation split.
        max_pages: read at most this many pages (a seeded hash sample, the same pages in every language).
        seed: seeds the page sample and the split.
        min_chars: narrower paragraphs are dropped (display columns: a CJK character counts 2).
        root: the help directory to read (default: `help_root()`).
        workers: parsing processes; default: all CPU cores.
        overwrite: replace an existing non-empty `out_dir`.
    """
    old, new = tuple(languages_old), tuple(languages_new)
    check_languages(old, new, tuple(HELP_SOURCES))
    check_fractions(heldout_fraction, validation_fraction)
    base = help_root(root)
    pages = {lang: list_pages(lang, base) for lang in (*old, *new)}
    names = sorted({name for by_name in pages.values() for name in by_name})
    if max_pages is not None:
        names = sorted(sorted(names, key=lambda n: unit_hash(f"sample:{seed}:{n}"))[:max_pages])
    jobs = [(lang, name) for lang in pages for name in names if name in pages[lang]]
    paths = [pages[lang][name] for lang, name in jobs]
    by_page = dict(zip(jobs, _read_all([j[0] for j in jobs], paths, min_chars, workers or os.cpu_count() or 1)))

    size = {name: sum(len(t or "") for lang in pages for _, t, _ in by_page.get((lang, name), [])) for name in names}
    order = assign_splits([(n, s) for n, s in size.items() if s > 0], heldout_fraction, validation_fraction, seed)
    stats: dict[str, dict[str, Any]] = {
        lang: {"package": HELP_SOURCES[lang][0], **dict.fromkeys(STAT_KEYS, 0)} for lang in pages
    }
    docs: dict[str, dict[str, list[str]]] = {lang: {split: [] for split in order} for lang in pages}
    seen: set[bytes] = set()
    for split in ("heldout", "validation", "train"):  # a repeat is kept where it is first met: in the test pages
        for name in order[split]:
            for lang in pages:
                paragraphs = by_page.get((lang, name))
                if paragraphs is None:
                    continue
                s, kept = stats[lang], []
                s["pages"] += 1
                for key, text, verdict in paragraphs:
                    repeat = key in seen  # decided before the filters: an untranslated repeat counts too
                    seen.add(key)
                    if text is not None and repeat:
                        verdict = "duplicate"
                    s[f"paragraphs_{verdict}"] += 1
                    if verdict == "kept":
                        kept.append(text)
                if kept:
                    docs[lang][split].append("\n\n".join(kept))
    for lang, splits in docs.items():
        if not splits["train"]:
            raise UserError(f"no usable {lang!r} text in the LibreOffice help under {base}; {INSTALL_HINT}")
    summary = {
        "source": "libreoffice",
        "root": str(base),
        "seed": seed,
        "heldout_fraction": heldout_fraction,
        "validation_fraction": validation_fraction,
        "pages": {split: len(order[split]) for split in order},
    }
    version = base / "packages.txt"  # written by scripts/install_corpora.sh
    if version.is_file():
        summary["packages"] = version.read_text().split()
    return write_corpus(
        out_dir,
        docs,
        old=old,
        prefix="libreoffice",
        stats=stats,
        summary=summary,
        with_validation=validation_fraction > 0,
        overwrite=overwrite,
    )
