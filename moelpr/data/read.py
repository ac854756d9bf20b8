"""Reading documents: a source is cut into pieces that processes read on their own, each yielding its texts.

A piece is a byte range of an uncompressed line-based file (.jsonl, JSON-lines .json, .txt; it holds the lines
that start inside it), a run of row groups of a parquet file, a run of rows of an Arrow file or
`save_to_disk` folder, or a whole file (compressed files, CSV, JSON arrays). Arrow files and save_to_disk
folders are memory-mapped by `datasets` (`Dataset.from_file`, `load_from_disk`), CSV is read by its
`load_dataset("csv", streaming=True)` builder, compressed files are opened with the codecs of fsspec (the
file layer under `datasets`). Line-based files are parsed here, line by line, because a bad record must be
named by file and line and, with `on_bad_record: skip`, left out while the rest of the file is read.
"""

from __future__ import annotations

import io
import json
import lzma
import os
import zlib
from dataclasses import dataclass
from typing import Any, Iterator

from moelpr.data.corpus import BAD_RECORD_POLICIES, SAVE_TO_DISK, BadRecordPolicy, file_format
from moelpr.errors import UserError

_FIX = "fix the record or pass on_bad_record=skip"
_BATCH = 1024  # rows per Arrow / parquet batch


@dataclass(frozen=True)
class Piece:
    """A part of one source: `[start, stop)` in bytes (line files), row groups (parquet) or rows (Arrow);
    `stop=None` reads to the end. `size` is the input bytes it covers (progress and ETA)."""

    path: str
    start: int = 0
    stop: int | None = None
    size: int = 0


def split_source(path: str, target_bytes: int) -> list[Piece]:
    """Cut one source into pieces of about `target_bytes` input bytes (whole when it cannot be cut)."""
    fmt, codec = file_format(path)
    size = _source_bytes(path, fmt)
    parts = max(1, -(-size // max(1, target_bytes)))
    if fmt == ".parquet":
        return _parquet_pieces(path, target_bytes)
    if fmt in (".arrow", SAVE_TO_DISK):
        rows = len(_arrow_dataset(path, fmt))
        step = max(1, -(-rows // parts))
        return [
            Piece(path, a, min(a + step, rows), size * min(step, rows - a) // max(1, rows))
            for a in range(0, rows, step)
        ] or [Piece(path, 0, 0, size)]
    if codec or fmt == ".csv" or parts == 1 or (fmt == ".json" and _is_json_array(path, codec)):
        return [Piece(path, 0, None, size)]
    step = -(-size // parts)
    return [Piece(path, a, min(a + step, size), min(step, size - a)) for a in range(0, size, step)]


def _source_bytes(path: str, fmt: str) -> int:
    if fmt == SAVE_TO_DISK:
        return sum(f.stat().st_size for f in os.scandir(path) if f.name.endswith(".arrow"))
    return os.stat(path).st_size


def read_piece(
    piece: Piece,
    text_column: str,
    *,
    on_bad_record: BadRecordPolicy = "error",
    stats: dict[str, int] | None = None,
    corpus: str | None = None,
) -> Iterator[str]:
    """Yield the non-empty texts of `piece` in order; `stats` keeps `docs`, `skipped` and `bytes` (read so far).

    A malformed record raises `UserError` naming the file and line (or row), or with `on_bad_record="skip"` is
    counted in `stats["skipped"]`; file-level failures (unreadable, not UTF-8, broken compression) always raise.
    """
    if on_bad_record not in BAD_RECORD_POLICIES:
        raise UserError(f"unknown on_bad_record {on_bad_record!r}; valid: {', '.join(BAD_RECORD_POLICIES)}")
    stats = {} if stats is None else stats
    for key in ("docs", "skipped", "bytes"):
        stats.setdefault(key, 0)
    prefix = f"corpus {corpus!r}: " if corpus else ""
    fmt, codec = file_format(piece.path)
    try:
        if fmt in (".jsonl", ".json", ".txt"):
            records = _line_records(piece, fmt, codec, text_column, stats)
        elif fmt == ".parquet":
            records = _parquet_records(piece, text_column, stats)
        elif fmt == ".csv":
            records = _csv_records(piece, text_column, stats)
        else:
            records = _arrow_records(piece, fmt, text_column, stats)
        for text, problem in records:
            if problem is not None:
                if on_bad_record == "error":
                    raise UserError(f"{prefix}{problem}")
                stats["skipped"] += 1
            elif text:
                stats["docs"] += 1
                yield text
    except UnicodeDecodeError as e:
        raise UserError(f"{prefix}{piece.path}: not valid UTF-8 ({e.reason}); convert the file to UTF-8") from None
    except _read_errors() as e:
        raise UserError(f"{prefix}{piece.path}: cannot read the file ({e})") from None


def _read_errors() -> tuple[type[BaseException], ...]:
    """What an unreadable file or broken compressed stream raises."""
    from zstandard import ZstdError

    return (OSError, EOFError, zlib.error, lzma.LZMAError, ZstdError)


# ---------------------------------------------------------------------------------------------- line files

Record = tuple[str, str | None]  # (text, problem): problem is None for a good record, else "where: what"


def _open(path: str, codec: str | None) -> tuple[Any, Any]:
    """(raw file, byte stream): the stream decompresses with fsspec's codec when the name says so."""
    raw = open(path, "rb")
    if codec is None:
        return raw, raw
    from fsspec.compression import compr

    return raw, io.BufferedReader(compr[codec](raw, mode="rb"), 1 << 20)


def _is_json_array(path: str, codec: str | None) -> bool:
    """Whether a .json file is one JSON array (read whole) rather than JSON lines."""
    raw, stream = _open(path, codec)
    with raw:
        head = stream.read(4096).lstrip(b"\xef\xbb\xbf \t\r\n")
    return head.startswith(b"[")


def _line_records(piece: Piece, fmt: str, codec: str | None, text_column: str, stats: dict) -> Iterator[Record]:
    path = piece.path
    if fmt == ".json" and _is_json_array(path, codec):
        yield from _json_array_records(path, codec, text_column, stats)
        return
    raw, stream = _open(path, codec)
    with raw:
        pos = piece.start
        if pos > 0:  # the piece holds the lines that start at or after `start`
            raw.seek(pos - 1)
            pos += len(raw.readline()) - 1
        first = pos
        for lineno, line in enumerate(stream, 1):
            if piece.stop is not None and pos >= piece.stop:
                break
            pos += len(line)
            if lineno % 256 == 0:
                stats["bytes"] = (raw.tell() if codec else pos) - piece.start
            if pos == len(line) and line.startswith(b"\xef\xbb\xbf"):
                line = line[3:]
            if fmt == ".txt":
                text = line.decode("utf-8").rstrip("\r\n")
                yield (text if text.strip() else ""), None
                continue
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError as e:
                where = _line_where(path, first, lineno)
                yield "", f"{where}: malformed JSON ({e.msg} at column {e.colno}); {_FIX}"
                continue
            text, problem = _text_of(record, text_column)
            yield text, (None if problem is None else f"{_line_where(path, first, lineno)}: {problem}")
        stats["bytes"] = (raw.tell() if codec else pos) - piece.start


def _line_where(path: str, first: int, lineno: int) -> str:
    """`path:LINE` of the `lineno`-th line of a piece whose first line starts at byte `first` (counted on error)."""
    before = 0
    if first:
        with open(path, "rb") as f:
            left = first
            while left and (chunk := f.read(min(left, 1 << 24))):
                before += chunk.count(b"\n")
                left -= len(chunk)
    return f"{path}:{before + lineno}"


def _json_array_records(path: str, codec: str | None, text_column: str, stats: dict) -> Iterator[Record]:
    raw, stream = _open(path, codec)
    with raw:
        try:
            records = json.loads(stream.read())  # a JSON array is read whole; use JSON lines for large files
        except json.JSONDecodeError as e:
            raise UserError(f"{path}:{e.lineno}: malformed JSON ({e.msg} at column {e.colno}); fix the file") from None
        stats["bytes"] = raw.tell()
    for i, record in enumerate(records):
        text, problem = _text_of(record, text_column)
        yield text, (None if problem is None else f"{path}: record {i}: {problem}")


def _text_of(record: Any, text_column: str) -> tuple[str, str | None]:
    """(text, problem) for one parsed record."""
    if not isinstance(record, dict):
        return "", f"expected a JSON object, got {type(record).__name__}; {_FIX}"
    if text_column not in record:
        keys = ", ".join(map(str, list(record)[:8])) or "none"
        return (
            "",
            f"record has no field {text_column!r} (fields: {keys}); set text_column: to the field holding the text",
        )
    text = record[text_column]
    if not isinstance(text, str):
        kind = "null" if text is None else type(text).__name__
        return "", f"field {text_column!r} is {kind}, not a string; {_FIX}"
    return text, None


# ------------------------------------------------------------------------------------------ columnar files


def _check_column(path: str, names: list[str], kind: Any, text_column: str) -> None:
    import pyarrow as pa

    if text_column not in names:
        cols = ", ".join(names[:8])
        raise UserError(f"{path}: no column {text_column!r} (columns: {cols}); set text_column: to the text column")
    if not (pa.types.is_string(kind) or pa.types.is_large_string(kind) or pa.types.is_string_view(kind)):
        raise UserError(f"{path}: column {text_column!r} is {kind}, not string; set text_column: to the text column")


def _column_records(path: str, texts: list, first_row: int, text_column: str) -> Iterator[Record]:
    for i, text in enumerate(texts):
        if text is None:
            yield "", f"{path}: row {first_row + i}: field {text_column!r} is null; {_FIX}"
        else:
            yield text, None


def _parquet_file(path: str) -> Any:
    import pyarrow as pa
    import pyarrow.parquet as pq

    try:
        return pq.ParquetFile(path)
    except pa.ArrowException as e:
        raise UserError(f"{path}: cannot read parquet ({e})") from None


def _parquet_pieces(path: str, target_bytes: int) -> list[Piece]:
    """Runs of whole row groups of about `target_bytes` compressed bytes each."""
    meta = _parquet_file(path).metadata
    pieces, start, size = [], 0, 0
    for g in range(meta.num_row_groups):
        group = meta.row_group(g)
        size += sum(group.column(c).total_compressed_size for c in range(group.num_columns))
        if size >= target_bytes or g == meta.num_row_groups - 1:
            pieces.append(Piece(path, start, g + 1, size))
            start, size = g + 1, 0
    return pieces or [Piece(path, 0, 0, 0)]


def _parquet_records(piece: Piece, text_column: str, stats: dict) -> Iterator[Record]:
    pf = _parquet_file(piece.path)
    schema = pf.schema_arrow
    _check_column(
        piece.path, schema.names, schema.field(text_column).type if text_column in schema.names else None, text_column
    )
    meta = pf.metadata
    stop = meta.num_row_groups if piece.stop is None else piece.stop
    row = sum(meta.row_group(g).num_rows for g in range(piece.start))
    done = 0
    for g in range(piece.start, stop):
        for batch in pf.iter_batches(row_groups=[g], columns=[text_column], batch_size=_BATCH):
            yield from _column_records(piece.path, batch.column(0).to_pylist(), row, text_column)
            row += batch.num_rows
        group = meta.row_group(g)
        done += sum(group.column(c).total_compressed_size for c in range(group.num_columns))
        stats["bytes"] = done


def _arrow_dataset(path: str, fmt: str) -> Any:
    """The `datasets.Dataset` of an Arrow file or save_to_disk folder, memory-mapped."""
    from datasets import Dataset, load_from_disk

    try:
        return load_from_disk(path) if fmt == SAVE_TO_DISK else Dataset.from_file(path)
    except Exception as e:  # pyarrow / datasets raise several types for a broken file
        raise UserError(
            f"{path}: cannot read it as a datasets Arrow {'folder' if fmt == SAVE_TO_DISK else 'file'} ({type(e).__name__}: {e})".splitlines()[
                0
            ]
        ) from None


def _arrow_records(piece: Piece, fmt: str, text_column: str, stats: dict) -> Iterator[Record]:
    ds = _arrow_dataset(piece.path, fmt)
    kind = ds.data.schema.field(text_column).type if text_column in ds.column_names else None
    _check_column(piece.path, ds.column_names, kind, text_column)
    stop = len(ds) if piece.stop is None else piece.stop
    rows = ds.select_columns([text_column]).select(range(piece.start, stop)).with_format("arrow")
    row = piece.start
    for batch in rows.iter(batch_size=_BATCH):
        yield from _column_records(piece.path, batch.column(0).to_pylist(), row, text_column)
        row += batch.num_rows
        stats["bytes"] = piece.size * (row - piece.start) // max(1, stop - piece.start)


def _csv_records(piece: Piece, text_column: str, stats: dict) -> Iterator[Record]:
    from datasets import load_dataset

    try:
        rows = load_dataset("csv", data_files=[piece.path], split="train", streaming=True)
        row = 0
        for batch in rows.iter(batch_size=_BATCH):
            if row == 0 and text_column not in batch:
                cols = ", ".join(list(batch)[:8])
                raise UserError(
                    f"{piece.path}: no column {text_column!r} (columns: {cols}); set text_column: to the text column"
                )
            texts = [t if t is None or isinstance(t, str) else str(t) for t in batch[text_column]]
            yield from _column_records(piece.path, texts, row, text_column)
            row += len(texts)
    except UserError:
        raise
    except Exception as e:  # pandas' parser errors come wrapped by datasets
        cause = e.__cause__ or e
        detail = " ".join(str(cause).split())[:200]
        raise UserError(f"{piece.path}: cannot read CSV ({type(cause).__name__}: {detail}); fix the file") from None
    stats["bytes"] = piece.size
