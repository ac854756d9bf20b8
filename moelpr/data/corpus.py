"""Corpora: which files hold which language's documents, its role, and its share of the training mixture.

A corpora spec is a YAML file (a list of entries, or `{corpora: [...]}`), an inline list of dicts, or the
official MoE-LPR / LLaMA-Factory `dataset_info.json`. Each entry has `name`, `path` (a file, a directory, a
glob, or a list of them), `language`, `role` ("old" = an original language, gets the LPR loss; "new" = an
added one) and optionally `text_column` (old name: `text_field`), `group`, `max_docs`, and one of `weight`,
`tokens` or `epochs` (its share of the mixture, see `moelpr.data.mix`).

Sources: `.jsonl`; `.json` (a JSON array of objects, or JSON lines); `.parquet`; `.arrow` (a `datasets` Arrow
file); `.csv`; `.txt` (one document per non-blank line, like LLaMA-Factory's "text" loader); each but parquet
and arrow optionally compressed (`.gz`, `.zst`, `.bz2`, `.xz`); and `Dataset.save_to_disk` folders. Reading
is in `moelpr.data.read`.
"""

from __future__ import annotations

import difflib
import glob
import json
import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator, Literal

from moelpr.errors import UserError

ROLES = ("old", "new")
BAD_RECORD_POLICIES = ("error", "skip")
BadRecordPolicy = Literal["error", "skip"]
FORMATS = (".jsonl", ".json", ".parquet", ".arrow", ".csv", ".txt")
COMPRESSIONS = {".gz": "gzip", ".zst": "zstd", ".bz2": "bz2", ".xz": "xz"}  # suffix -> fsspec codec
SAVE_TO_DISK = "save_to_disk"  # the format of a `Dataset.save_to_disk` folder
MAX_GROUP = 127  # lang_group is stored as int8
MIX_KEYS = ("weight", "tokens", "epochs")
_SEEKABLE = (".parquet", ".arrow")  # read by offset: never compressed
_GLOB_CHARS = re.compile(r"[*?[]")

_ENTRY_KEYS = ("name", "path", "paths", "text_column", "text_field", "language", "role", "group", "max_docs", *MIX_KEYS)
_REQUIRED = ("name", "path", "language", "role")
# dataset_info.json keys: the ones read, the ones meaningless for local pretraining text, the unsupported ones
_INFO_READ = ("file_name", "columns", "language", "group_tag")
_INFO_IGNORED = ("formatting", "ranking", "split", "tags", "subset", "folder")
_INFO_UNSUPPORTED = ("hf_hub_url", "ms_hub_url", "om_hub_url", "script_url", "cloud_file_name", "num_samples")


@dataclass(kw_only=True)
class Corpus:
    """One source of documents in a single language.

    Attributes:
        name: unique name (used in logs, stats and the cache key).
        paths: data files or `save_to_disk` folders, read in this order (`load_corpora` expands globs and
            directories).
        language: language code, e.g. "en" or "el".
        role: "old" (an original language: its tokens get `lang_mask` = 1) or "new".
        text_column: record field (JSON) or column (parquet, arrow, csv) holding the text; unused for .txt.
        group: `lang_group` of its tokens: 0 for old; ≥ 1 for new (default 1; 2, 3 … for lifelong steps).
        max_docs: keep only the first `max_docs` documents (like the official `--max_samples`).
        weight: share of the mixture's tokens, normalised over the corpora (all corpora or none set it).
        tokens: token budget in the mixture (repeats or subsamples the corpus' blocks).
        epochs: passes over the corpus in the mixture (0.5 = half of its blocks, 2 = each block twice).
    """

    name: str
    paths: list[str]
    language: str
    role: Literal["old", "new"]
    text_column: str = "text"
    group: int | None = None
    max_docs: int | None = None
    weight: float | None = None
    tokens: int | None = None
    epochs: float | None = None

    def __post_init__(self) -> None:
        where = f"corpus {self.name!r}"
        if not isinstance(self.name, str) or not self.name:
            raise UserError(f"corpus name must be a non-empty string, got {self.name!r}")
        if isinstance(self.paths, (str, os.PathLike)):
            self.paths = [self.paths]
        if not self.paths:
            raise UserError(f"{where}: no data files given; set path: to a file, directory or glob")
        self.paths = [os.fspath(p) for p in self.paths]
        if isinstance(self.language, bool):  # YAML 1.1 reads `no` (Norwegian) as false
            raise UserError(f"{where}: language is the YAML boolean {self.language}; quote it, e.g. language: 'no'")
        if not isinstance(self.language, str) or not self.language:
            raise UserError(f"{where}: language must be a language code string such as 'en', got {self.language!r}")
        if self.role not in ROLES:
            raise UserError(f"{where}: unknown role {self.role!r}; valid roles: {', '.join(ROLES)}")
        if not isinstance(self.text_column, str) or not self.text_column:
            raise UserError(f"{where}: text_column must be a non-empty string, got {self.text_column!r}")
        self._check_group(where)
        if self.max_docs is not None and (not _is_int(self.max_docs) or self.max_docs < 1):
            raise UserError(f"{where}: max_docs must be a positive integer or null, got {self.max_docs!r}")
        self._check_mix(where)

    def _check_group(self, where: str) -> None:
        if self.group is None:
            self.group = 0 if self.role == "old" else 1
        if not _is_int(self.group):
            raise UserError(f"{where}: group must be an integer, got {self.group!r}")
        if self.role == "old" and self.group != 0:
            raise UserError(f"{where}: an old-language corpus is group 0, not {self.group}; drop group or make it new")
        if self.role == "new" and not 1 <= self.group <= MAX_GROUP:
            raise UserError(f"{where}: a new-language corpus needs 1 <= group <= {MAX_GROUP}, got {self.group}")

    def _check_mix(self, where: str) -> None:
        given = [key for key in MIX_KEYS if getattr(self, key) is not None]
        if len(given) > 1:
            raise UserError(f"{where}: give one of weight, tokens or epochs, not {' and '.join(given)}")
        for key in ("weight", "epochs"):
            value = getattr(self, key)
            if value is not None and (isinstance(value, bool) or not isinstance(value, (int, float)) or value <= 0):
                raise UserError(f"{where}: {key} must be a number > 0, got {value!r}")
        if self.tokens is not None and (not _is_int(self.tokens) or self.tokens < 1):
            raise UserError(f"{where}: tokens must be a positive integer (a token budget), got {self.tokens!r}")

    @property
    def mix(self) -> dict[str, float]:
        """The mixing setting given (`{"weight": 3}`, `{"tokens": 10**9}`, ...), empty when none."""
        return {key: getattr(self, key) for key in MIX_KEYS if getattr(self, key) is not None}


def iter_documents(
    corpus: Corpus, *, on_bad_record: BadRecordPolicy = "error", stats: dict[str, int] | None = None
) -> Iterator[str]:
    """Yield the corpus' document texts in file order, empty ones left out, stopping at `max_docs`.

    Args:
        corpus: the corpus to read.
        on_bad_record: "error" raises `UserError` (file and line) on a malformed record; "skip" counts it in
            `stats["skipped"]` and goes on.
        stats: if given, `stats["docs"]` and `stats["skipped"]` are kept up to date while reading.
    """
    from moelpr.data.read import Piece, read_piece  # reading lives there; it imports this module

    stats = {} if stats is None else stats
    stats.setdefault("docs", 0)
    stats.setdefault("skipped", 0)
    docs = skipped = 0
    for path in corpus.paths:
        seen: dict[str, int] = {}
        for text in read_piece(Piece(path), corpus.text_column, on_bad_record=on_bad_record, stats=seen):
            docs += 1
            stats["docs"] += 1
            yield text
            if corpus.max_docs is not None and docs >= corpus.max_docs:
                stats["skipped"] += seen["skipped"]
                return
        skipped += seen.get("skipped", 0)
        stats["skipped"] += seen.get("skipped", 0)
    if docs == 0:
        raise no_documents(corpus, skipped)


def no_documents(corpus: Corpus, skipped: int) -> UserError:
    shown = ", ".join(corpus.paths[:3]) + (f" (+{len(corpus.paths) - 3} more)" if len(corpus.paths) > 3 else "")
    note = f" ({skipped} bad records skipped)" if skipped else ""
    return UserError(f"corpus {corpus.name!r} has no documents in {shown}{note}; check the files and text_column")


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def file_format(path: str | os.PathLike) -> tuple[str, str | None]:
    """(format, compression codec or None) of a source; `UserError` if unsupported.

    The format comes from the file name (one of `FORMATS`), or is `SAVE_TO_DISK` for a folder written by
    `Dataset.save_to_disk`.
    """
    if os.path.isdir(path):
        _check_save_to_disk(Path(path))
        return SAVE_TO_DISK, None
    name = os.fspath(path).lower()
    suffix = os.path.splitext(name)[1]
    codec = COMPRESSIONS.get(suffix)
    stem = name[: -len(suffix)] if codec else name
    for ext in FORMATS:
        if stem.endswith(ext) and not (codec and ext in _SEEKABLE):
            return ext, codec
    supported = ", ".join(FORMATS) + f" (all but {'/'.join(_SEEKABLE)} optionally {'/'.join(COMPRESSIONS)})"
    raise UserError(f"unsupported data file {os.fspath(path)!r}; supported: {supported} and save_to_disk folders")


def _check_save_to_disk(path: Path) -> None:
    """`UserError` unless `path` is a `Dataset.save_to_disk` folder (a `DatasetDict` one names its splits)."""
    if (path / "dataset_dict.json").is_file():
        splits = sorted(p.name for p in path.iterdir() if (p / "state.json").is_file())
        example = path / (splits[0] if splits else "train")
        raise UserError(
            f"{path} is a DatasetDict folder (splits: {', '.join(splits) or 'none'}); point path to one split, "
            f"e.g. {example}"
        )
    if not (path / "state.json").is_file():
        raise UserError(f"{path} is a folder but not a Dataset.save_to_disk folder (no state.json)")


# ---------------------------------------------------------------------------------------------------- specs


def load_corpora(
    spec: str | os.PathLike | list[dict[str, Any]] | dict[str, Any], *, base_dir: str | os.PathLike | None = None
) -> list[Corpus]:
    """Read a corpora spec into validated `Corpus` objects, with every path resolved to existing files.

    Args:
        spec: path to a YAML corpora file or an official `dataset_info.json`, or the parsed content of either
            (a list of entries, `{"corpora": [...]}`, or a dataset_info mapping).
        base_dir: directory that relative paths resolve against; defaults to the spec file's directory
            (or the working directory for an inline spec).
    """
    source = "corpora spec"
    if isinstance(spec, (str, os.PathLike)):
        path = Path(spec)
        if not path.is_file():
            raise UserError(f"corpora file {os.fspath(spec)!r} does not exist")
        source = path.name
        base = Path(base_dir) if base_dir is not None else path.resolve().parent
        spec = _read_spec_file(path)
    else:
        base = Path(base_dir) if base_dir is not None else Path.cwd()
    entries = _entries(spec, source)
    corpora: list[Corpus] = []
    for i, entry in enumerate(entries):
        corpora.append(_corpus_from_entry(entry, f"{source} entry {i}", base))
    check_unique_names(corpora)
    check_mixing(corpora)
    return corpora


def check_unique_names(corpora: list[Corpus]) -> None:
    """`UserError` unless every corpus name is unique (names key stats and caches)."""
    seen: set[str] = set()
    for corpus in corpora:
        if corpus.name in seen:
            raise UserError(f"duplicate corpus name {corpus.name!r}; give every corpus a unique name")
        seen.add(corpus.name)


def check_mixing(corpora: list[Corpus]) -> None:
    """`UserError` unless weights are given to every corpus or to none (`moelpr.data.mix.check_weights`)."""
    from moelpr.data.mix import check_weights

    check_weights([c.name for c in corpora], [c.mix for c in corpora])


def _read_spec_file(path: Path) -> Any:
    import yaml

    try:
        text = path.read_text(encoding="utf-8-sig")
        return json.loads(text) if path.suffix.lower() == ".json" else yaml.safe_load(text)
    except (yaml.YAMLError, json.JSONDecodeError, UnicodeDecodeError) as e:
        detail = " ".join(str(e).split())
        raise UserError(f"cannot parse corpora file {os.fspath(path)!r}: {detail}") from None


def _entries(spec: Any, source: str) -> list[dict[str, Any]]:
    """Normalise the three spec shapes to a list of moelpr entries."""
    if isinstance(spec, dict) and "corpora" in spec:
        extra = sorted(set(spec) - {"corpora"})
        if extra:
            raise UserError(f"{source}: unknown top-level key {extra[0]!r}; a corpora file holds only corpora:")
        spec = spec["corpora"]
    elif isinstance(spec, dict) and spec and all(isinstance(v, dict) for v in spec.values()):
        return [_entry_from_dataset_info(name, info, source) for name, info in spec.items()]
    if not isinstance(spec, list) or not spec:
        raise UserError(
            f"{source}: expected a non-empty list of corpora, {{corpora: [...]}}, or a dataset_info.json mapping"
        )
    return spec


def _entry_from_dataset_info(name: str, info: dict[str, Any], source: str) -> dict[str, Any]:
    """Translate one LLaMA-Factory dataset_info entry: `language` is the role, the entry name the language."""
    where = f"{source} entry {name!r}"
    for key in info:
        if key in _INFO_UNSUPPORTED:
            raise UserError(f"{where}: {key!r} is not supported; use a local file_name (and max_docs in a YAML)")
        if key not in _INFO_READ + _INFO_IGNORED:
            raise UserError(f"{where}: unknown key {key!r}{_did_you_mean(key, _INFO_READ + _INFO_IGNORED)}")
    if "file_name" not in info:
        raise UserError(f"{where}: missing 'file_name'; give the data file relative to dataset_info.json")
    role = info.get("language")
    if role not in ROLES:
        got = "missing 'language'" if role is None else f"'language' is {role!r}"
        raise UserError(f'{where}: {got}; set it to "old" or "new" (the entry name is the language code)')
    columns = info.get("columns") or {}
    if not isinstance(columns, dict):
        raise UserError(f'{where}: \'columns\' must be a mapping such as {{"prompt": "text"}}')
    entry = {
        "name": name,
        "path": info["file_name"],
        "language": name,
        "role": role,
        "text_column": columns.get("prompt", "text"),
    }
    if "group_tag" in info:
        entry["group"] = _parse_group_tag(info["group_tag"], where)
    return entry


def _parse_group_tag(tag: Any, where: str) -> int:
    match = re.fullmatch(r"g(\d+)", str(tag))
    if not match:
        raise UserError(f"{where}: group_tag must look like 'g0', 'g1', …, got {tag!r}")
    return int(match.group(1))


def _did_you_mean(key: str, valid: tuple[str, ...]) -> str:
    close = difflib.get_close_matches(str(key), valid, n=1)
    return f"; did you mean {close[0]!r}?" if close else f"; valid keys: {', '.join(valid)}"


def _corpus_from_entry(entry: Any, where: str, base: Path) -> Corpus:
    if not isinstance(entry, dict):
        raise UserError(f"{where}: expected a mapping with name, path, language and role, got {entry!r}")
    if isinstance(entry.get("name"), str):
        where = f"{where} ({entry['name']!r})"
    for key in entry:
        if key not in _ENTRY_KEYS:
            raise UserError(f"{where}: unknown key {key!r}{_did_you_mean(key, _ENTRY_KEYS)}")
    for new, old in (("path", "paths"), ("text_column", "text_field")):
        if new in entry and old in entry:
            raise UserError(f"{where}: give either {new} or {old}, not both")
    fields = dict(entry)
    if "paths" in fields:
        fields["path"] = fields.pop("paths")
    if "text_field" in fields:  # the old name
        fields["text_column"] = fields.pop("text_field")
    for key in _REQUIRED:
        if fields.get(key) is None:
            raise UserError(f"{where}: missing {key!r}{_REQUIRED_HINT[key]}")
    fields["paths"] = resolve_paths(fields.pop("path"), base, where)
    return Corpus(**fields)


_REQUIRED_HINT = {
    "name": "; give the corpus a unique name",
    "path": "; set path: to a file, a directory, a glob or a list of them",
    "language": "; set language: to a code such as 'en'",
    "role": "; set role: old (an original language) or new (a language being added)",
}


def resolve_paths(raw: Any, base: Path, where: str) -> list[str]:
    """Expand files, directories (their supported files) and globs, relative to `base`, in a stable order."""
    items = [raw] if isinstance(raw, (str, os.PathLike)) else raw
    if not isinstance(items, list) or not items or not all(isinstance(p, (str, os.PathLike)) for p in items):
        raise UserError(f"{where}: path must be a string or a non-empty list of strings, got {raw!r}")
    files: dict[str, None] = {}  # ordered set
    for item in items:
        given = os.path.expanduser(os.fspath(item))
        path = Path(os.path.abspath(os.path.join(base, given)))  # abspath collapses ".."; join keeps absolute paths
        if _GLOB_CHARS.search(given):
            pattern = given if os.path.isabs(given) else os.path.join(glob.escape(os.path.abspath(base)), given)
            matches = [Path(p) for p in sorted(glob.glob(pattern, recursive=True)) if _is_source(Path(p))]
            if not matches:
                raise UserError(f"{where}: path {os.fspath(item)!r} matches no file (looked in {path.parent})")
        elif path.is_dir() and ((path / "state.json").is_file() or (path / "dataset_dict.json").is_file()):
            matches = [path]  # a save_to_disk folder (file_format checks it is one Dataset)
        elif path.is_dir():
            matches = sorted(p for p in path.iterdir() if p.is_file() and not p.name.startswith(".") and _supported(p))
            if not matches:
                raise UserError(f"{where}: directory {os.fspath(path)!r} holds no {'/'.join(FORMATS)} files")
        elif path.is_file():
            matches = [path]
        else:
            raise UserError(f"{where}: file {os.fspath(path)!r} does not exist")
        for match in matches:
            try:
                file_format(match)
            except UserError as e:
                raise UserError(f"{where}: {e}") from None
            files.setdefault(os.path.abspath(match))
    return list(files)


def _is_source(path: Path) -> bool:
    """A file, or a save_to_disk folder (what a glob may match)."""
    return path.is_file() or (path / "state.json").is_file()


def _supported(path: Path) -> bool:
    try:
        file_format(path)
    except UserError:
        return False
    return True
