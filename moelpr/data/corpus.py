"""Corpora: which files hold which language's documents, and reading those documents in a fixed order.

A corpora spec is a YAML file (a list of entries, or `{corpora: [...]}`), an inline list of dicts, or the
official MoE-LPR / LLaMA-Factory `dataset_info.json`. Each entry has `name`, `path` (a file, a directory, a
glob, or a list of them), `language`, `role` ("old" = an original language, gets the LPR loss; "new" = an
added one) and optionally `text_field`, `group` and `max_docs`.

Supported files: `.jsonl`; `.json` (one JSON array of objects, or JSON lines); `.parquet`; `.txt`, read as
one document per non-blank line (like LLaMA-Factory's "text" loader); all but parquet may be gzipped (`.gz`).
"""

from __future__ import annotations

import difflib
import glob
import gzip
import json
import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any, Iterator, Literal

from moelpr.errors import UserError

ROLES = ("old", "new")
BAD_RECORD_POLICIES = ("error", "skip")
BadRecordPolicy = Literal["error", "skip"]
FORMATS = (".jsonl", ".json", ".parquet", ".txt")
MAX_GROUP = 127  # lang_group is stored as int8
_GLOB_CHARS = re.compile(r"[*?[]")

_ENTRY_KEYS = ("name", "path", "paths", "text_field", "language", "role", "group", "max_docs")
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
        paths: data files, read in this order (globs and directories are expanded by `load_corpora`).
        language: language code, e.g. "en" or "el".
        role: "old" (an original language: its tokens get `lang_mask` = 1) or "new".
        text_field: record field (JSON) or column (parquet) holding the text; unused for .txt.
        group: `lang_group` of its tokens: 0 for old; ≥ 1 for new (default 1; 2, 3 … for lifelong steps).
        max_docs: keep only the first `max_docs` documents (like the official `--max_samples`).
    """

    name: str
    paths: list[str]
    language: str
    role: Literal["old", "new"]
    text_field: str = "text"
    group: int | None = None
    max_docs: int | None = None

    def __post_init__(self) -> None:
        where = f"corpus {self.name!r}"
        if not isinstance(self.name, str) or not self.name:
            raise UserError(f"corpus name must be a non-empty string, got {self.name!r}")
        if isinstance(self.paths, (str, os.PathLike)):
            self.paths = [self.paths]
        if not self.paths:
            raise UserError(f"{where}: no data files given; set path: to a file, directory or glob")
        self.paths = [os.fspath(p) for p in self.paths]
        for path in self.paths:
            file_format(path)
        if isinstance(self.language, bool):  # YAML 1.1 reads `no` (Norwegian) as false
            raise UserError(f"{where}: language is the YAML boolean {self.language}; quote it, e.g. language: 'no'")
        if not isinstance(self.language, str) or not self.language:
            raise UserError(f"{where}: language must be a language code string such as 'en', got {self.language!r}")
        if self.role not in ROLES:
            raise UserError(f"{where}: unknown role {self.role!r}; valid roles: {', '.join(ROLES)}")
        if not isinstance(self.text_field, str) or not self.text_field:
            raise UserError(f"{where}: text_field must be a non-empty string, got {self.text_field!r}")
        self._check_group(where)
        if self.max_docs is not None and (not _is_int(self.max_docs) or self.max_docs < 1):
            raise UserError(f"{where}: max_docs must be a positive integer or null, got {self.max_docs!r}")

    def _check_group(self, where: str) -> None:
        if self.group is None:
            self.group = 0 if self.role == "old" else 1
        if not _is_int(self.group):
            raise UserError(f"{where}: group must be an integer, got {self.group!r}")
        if self.role == "old" and self.group != 0:
            raise UserError(f"{where}: an old-language corpus is group 0, not {self.group}; drop group or make it new")
        if self.role == "new" and not 1 <= self.group <= MAX_GROUP:
            raise UserError(f"{where}: a new-language corpus needs 1 <= group <= {MAX_GROUP}, got {self.group}")


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def file_format(path: str | os.PathLike) -> tuple[str, bool]:
    """The format (one of `FORMATS`) and whether it is gzipped, from the file name; `UserError` if unsupported."""
    name = os.fspath(path).lower()
    gz = name.endswith(".gz")
    stem = name[:-3] if gz else name
    for ext in FORMATS:
        if stem.endswith(ext) and not (gz and ext == ".parquet"):
            return ext, gz
    supported = ", ".join(FORMATS) + " (each but .parquet optionally .gz)"
    raise UserError(f"unsupported data file {os.fspath(path)!r}; supported: {supported}")


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
    return corpora


def check_unique_names(corpora: list[Corpus]) -> None:
    """`UserError` unless every corpus name is unique (names key stats and caches)."""
    seen: set[str] = set()
    for corpus in corpora:
        if corpus.name in seen:
            raise UserError(f"duplicate corpus name {corpus.name!r}; give every corpus a unique name")
        seen.add(corpus.name)


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
        "text_field": columns.get("prompt", "text"),
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
    if "path" in entry and "paths" in entry:
        raise UserError(f"{where}: give either path or paths, not both")
    fields = dict(entry)
    if "paths" in fields:
        fields["path"] = fields.pop("paths")
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
            matches = [Path(p) for p in sorted(glob.glob(pattern, recursive=True)) if os.path.isfile(p)]
            if not matches:
                raise UserError(f"{where}: path {os.fspath(item)!r} matches no file (looked in {path.parent})")
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


def _supported(path: Path) -> bool:
    try:
        file_format(path)
    except UserError:
        return False
    return True


# -------------------------------------------------------------------------------------------------- reading


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
    if on_bad_record not in BAD_RECORD_POLICIES:
        raise UserError(f"unknown on_bad_record {on_bad_record!r}; valid: {', '.join(BAD_RECORD_POLICIES)}")
    stats = {} if stats is None else stats
    stats.setdefault("docs", 0)
    stats.setdefault("skipped", 0)
    docs = skipped = 0
    for path in corpus.paths:
        for location, text, problem in _read_file(path, corpus.text_field):
            if problem is not None:
                if on_bad_record == "error":
                    raise UserError(f"corpus {corpus.name!r}: {location}: {problem}")
                skipped += 1
                stats["skipped"] += 1
                continue
            if not text:
                continue
            docs += 1
            stats["docs"] += 1
            yield text
            if corpus.max_docs is not None and docs >= corpus.max_docs:
                return
    if docs == 0:
        shown = ", ".join(corpus.paths[:3]) + (f" (+{len(corpus.paths) - 3} more)" if len(corpus.paths) > 3 else "")
        note = f" ({skipped} bad records skipped)" if skipped else ""
        raise UserError(f"corpus {corpus.name!r} has no documents in {shown}{note}; check the files and text_field")


Record = tuple[str, str, str | None]  # (location, text, problem): problem is None for a good record
_FIX = "fix the record or pass on_bad_record=skip"


def _read_file(path: str, text_field: str) -> Iterator[Record]:
    """Records of one file; file-level failures (unreadable, not UTF-8, broken gzip) become `UserError`."""
    fmt, gz = file_format(path)
    try:
        if fmt == ".parquet":
            yield from _read_parquet(path, text_field)
            return
        with gzip.open(path, "rt", encoding="utf-8-sig") if gz else open(path, encoding="utf-8-sig") as f:
            if fmt == ".txt":
                for lineno, line in enumerate(f, 1):
                    yield f"{path}:{lineno}", line.rstrip("\r\n") if line.strip() else "", None
            elif fmt == ".json" and _starts_with(f, "["):
                yield from _read_json_array(f, path, text_field)
            else:
                yield from _read_json_lines(f, path, text_field)
    except UnicodeDecodeError as e:
        raise UserError(f"{path}: not valid UTF-8 ({e.reason}); convert the file to UTF-8") from None
    except (OSError, EOFError) as e:
        raise UserError(f"{path}: cannot read the file ({e})") from None


def _starts_with(f: IO[str], char: str) -> bool:
    """Whether the first non-whitespace character is `char`; rewinds the file."""
    while (c := f.read(1)) and c.isspace():
        pass
    f.seek(0)
    return c == char


def _text_of(record: Any, text_field: str) -> tuple[str, str | None]:
    """(text, problem) for one parsed record."""
    if not isinstance(record, dict):
        return "", f"expected a JSON object, got {type(record).__name__}; {_FIX}"
    if text_field not in record:
        keys = ", ".join(map(str, list(record)[:8])) or "none"
        return "", f"record has no field {text_field!r} (fields: {keys}); set text_field: to the field holding the text"
    text = record[text_field]
    if not isinstance(text, str):
        return "", f"field {text_field!r} is {'null' if text is None else type(text).__name__}, not a string; {_FIX}"
    return text, None


def _read_json_lines(f: IO[str], path: str, text_field: str) -> Iterator[Record]:
    for lineno, line in enumerate(f, 1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError as e:
            yield f"{path}:{lineno}", "", f"malformed JSON ({e.msg} at column {e.colno}); {_FIX}"
            continue
        text, problem = _text_of(record, text_field)
        yield f"{path}:{lineno}", text, problem


def _read_json_array(f: IO[str], path: str, text_field: str) -> Iterator[Record]:
    try:
        records = json.load(f)  # a JSON array is read whole; use .jsonl for very large files
    except json.JSONDecodeError as e:
        raise UserError(f"{path}:{e.lineno}: malformed JSON ({e.msg} at column {e.colno}); fix the file") from None
    for i, record in enumerate(records):
        text, problem = _text_of(record, text_field)
        yield f"{path}: record {i}", text, problem


def _read_parquet(path: str, text_field: str) -> Iterator[Record]:
    import pyarrow as pa
    import pyarrow.parquet as pq

    try:
        pf = pq.ParquetFile(path)
    except pa.ArrowException as e:
        raise UserError(f"{path}: cannot read parquet ({e})") from None
    schema = pf.schema_arrow
    if text_field not in schema.names:
        cols = ", ".join(schema.names[:8])
        raise UserError(f"{path}: no column {text_field!r} (columns: {cols}); set text_field: to the text column")
    kind = schema.field(text_field).type
    if not (pa.types.is_string(kind) or pa.types.is_large_string(kind)):
        raise UserError(f"{path}: column {text_field!r} is {kind}, not string; set text_field: to the text column")
    row = 0
    for batch in pf.iter_batches(columns=[text_field], batch_size=1024):
        for text in batch.column(0).to_pylist():
            problem = None if text is not None else f"field {text_field!r} is null; {_FIX}"
            yield f"{path}: row {row}", text or "", problem
            row += 1
