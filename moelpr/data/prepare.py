"""`prepare`: read, tokenise and pack corpora once, in parallel processes, into a sharded on-disk dataset.

Each corpus is cut into shards (`moelpr.data.read.split_source`: files, byte ranges of big line-based files,
row groups of parquet, rows of Arrow data; a corpus with `max_docs` is one shard, read in order). A shard's
documents are tokenised (EOS after each), concatenated and cut into `cutoff_len` blocks; its final partial
block is dropped, so a block never mixes corpora and its language, role and group are those of its corpus.

Layout of the output directory:
    shards/CCC-SSSSS.bin   token ids of shard S of corpus C, flat (uint16 when the vocabulary fits, else int32)
    shards/CCC-SSSSS.json  the shard's completion record: its key, blocks, tokens, documents, checksum
    moelpr_prepared.json   the manifest, written last: the dataset's key, tokenizer, cutoff_len, corpora, shards

Every file is written to a temporary name and renamed, the manifest last, so a half-written shard or dataset
is never picked up. A shard whose completion record holds its key is done: a killed run started again redoes
only the unfinished shards, and a finished dataset is recognised by its key and reused. Peak memory is one
document batch per process, whatever the corpus size.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from moelpr.data.corpus import (
    BAD_RECORD_POLICIES,
    SAVE_TO_DISK,
    BadRecordPolicy,
    Corpus,
    check_unique_names,
    no_documents,
)
from moelpr.data.corpus import file_format as _file_format
from moelpr.data.encode import Encoder
from moelpr.data.read import Piece, split_source
from moelpr.data.shards import ShardWriter, file_checksum, write_shards
from moelpr.errors import UserError
from moelpr.utils.atomic import atomic_write_json

logger = logging.getLogger(__name__)

FORMAT_VERSION = 3  # part of every key: bump when tokenisation or the layout changes
MANIFEST = "moelpr_prepared.json"
SHARDS = "shards"
SHARD_BYTES = 256 << 20  # input bytes per shard (parallelism and resumption granularity)
_EDGE = 1 << 16  # files are hashed whole up to 2 edges; bigger ones: size + mtime + their first and last 64 KiB
_POLL_S = 0.5


@dataclass(frozen=True)
class Shard:
    """Pieces of one corpus that one process tokenises into one shard file."""

    corpus: int
    index: int
    pieces: tuple[Piece, ...]
    max_docs: int | None = None

    @property
    def name(self) -> str:
        return f"{self.corpus:03d}-{self.index:05d}"

    @property
    def size(self) -> int:
        return sum(p.size for p in self.pieces)


def prepare(
    corpora: list[Corpus],
    tokenizer: Any,
    output: str | os.PathLike | None = None,
    *,
    cutoff_len: int,
    cache_dir: str | os.PathLike | None = None,
    num_proc: int = 1,
    on_bad_record: BadRecordPolicy = "error",
    shard_bytes: int = SHARD_BYTES,
    overwrite: bool = False,
    progress: bool = True,
    verify: bool = False,
    rank: int = 0,
    world: int = 1,
) -> Path:
    """Prepare `corpora` into `output` (see the module docstring) and return the dataset's directory.

    Args:
        corpora: the corpora (`moelpr.data.load_corpora`).
        tokenizer: a Hugging Face tokenizer with an `eos_token_id`.
        output: the dataset directory; an existing one is reused when complete with the same key, continued
            when partial, and refused when it holds something else (unless `overwrite`).
        cutoff_len: tokens per block.
        cache_dir: instead of `output`: prepare into `cache_dir/prepared-<key>` (training from raw corpora).
        num_proc: tokenising processes.
        on_bad_record: "error" or "skip" malformed records.
        shard_bytes: input bytes per shard.
        overwrite: replace a directory that holds another prepared dataset.
        progress: show a progress bar (documents, tokens, tokens/s, ETA) on stderr.
        verify: for a finished dataset, check every shard's size and checksum and prepare again those that
            fail (reads all of it; training checks sizes only).
        rank, world: this process' share when several processes prepare the same directory together (each
            does the shards whose number is `rank` modulo `world`, then waits for the others' files).
    """
    _check_args(corpora, cutoff_len, num_proc, on_bad_record, shard_bytes, rank, world)
    encoder = Encoder(tokenizer)
    fingerprints = {p: source_fingerprint(p) for c in corpora for p in c.paths}
    key = dataset_key(corpora, encoder.fingerprint, fingerprints, cutoff_len, on_bad_record, shard_bytes)
    if (output is None) == (cache_dir is None):
        raise ValueError("give prepare() either output or cache_dir")
    root = Path(output) if output is not None else Path(cache_dir) / f"prepared-{key[:24]}"
    existing = _read_json(root / MANIFEST)
    if existing is not None and existing.get("key") == key:
        if not verify or not _drop_corrupt(root, existing):
            _refresh_mix(root, existing, corpora)
            return root
        existing = None  # corrupt shards were removed: they are prepared again below
    wanted = {
        "tokenizer": encoder.fingerprint,
        "cutoff_len": cutoff_len,
        "shard_bytes": shard_bytes,
        "on_bad_record": on_bad_record,
        "corpora": [[c.name, c.language, c.role, c.group] for c in corpora],
    }
    _claim(root, existing, wanted, overwrite)
    shards = plan(corpora, shard_bytes)
    dtype = "uint16" if encoder.vocab_size <= 1 << 16 else "int32"
    settings = [encoder.fingerprint, cutoff_len, on_bad_record, dtype]
    keys = {s.name: shard_key(s, corpora[s.corpus], settings, fingerprints) for s in shards}
    mine = [s for i, s in enumerate(shards) if i % world == rank and not _done(root, s, keys[s.name])]
    if mine:
        writer = ShardWriter(
            root / SHARDS, corpora, encoder, cutoff_len=cutoff_len, dtype=dtype, on_bad_record=on_bad_record, keys=keys
        )
        write_shards(writer, mine, num_proc, progress)
    records = _wait_for(root, shards, keys)
    manifest = _manifest(root, key, corpora, shards, records, encoder, cutoff_len, dtype, on_bad_record)
    manifest["shard_bytes"] = shard_bytes
    atomic_write_json(root / MANIFEST, manifest)  # last: its presence marks a complete dataset
    return root


def _check_args(corpora: Any, cutoff_len: Any, num_proc: Any, on_bad_record: Any, shard_bytes: Any, rank, world):
    if not isinstance(corpora, (list, tuple)) or not corpora or not all(isinstance(c, Corpus) for c in corpora):
        raise UserError("corpora must be a non-empty list of Corpus (see moelpr.data.load_corpora)")
    check_unique_names(list(corpora))
    for name, value in (("cutoff_len", cutoff_len), ("num_proc", num_proc), ("shard_bytes", shard_bytes)):
        if not isinstance(value, int) or isinstance(value, bool) or value < 1:
            raise UserError(f"{name} must be a positive integer, got {value!r}")
    if on_bad_record not in BAD_RECORD_POLICIES:
        raise UserError(f"unknown on_bad_record {on_bad_record!r}; valid: {', '.join(BAD_RECORD_POLICIES)}")
    if not 0 <= rank < world:
        raise ValueError(f"rank {rank} outside world {world}")


def plan(corpora: list[Corpus], shard_bytes: int) -> list[Shard]:
    """The shards of every corpus, in corpus order (deterministic: files, sizes and `shard_bytes` decide it)."""
    shards = []
    for ci, corpus in enumerate(corpora):
        if corpus.max_docs is not None:  # the first max_docs documents: one shard reads the files in order
            pieces = tuple(Piece(p, size=split_source(p, 1 << 62)[0].size) for p in corpus.paths)
            shards.append(Shard(ci, 0, pieces, corpus.max_docs))
            continue
        pieces = [piece for path in corpus.paths for piece in split_source(path, shard_bytes)]
        shards += [Shard(ci, i, (piece,)) for i, piece in enumerate(pieces)]
    return shards


# ------------------------------------------------------------------------------------------------- keys


def dataset_key(
    corpora: list[Corpus], tokenizer: str, fingerprints: dict, cutoff_len: int, on_bad_record: str, shard_bytes: int
) -> str:
    """SHA-256 over everything that decides the shards (the mixing settings do not: they apply when read)."""
    payload = {
        "format": FORMAT_VERSION,
        "tokenizer": tokenizer,
        "cutoff_len": cutoff_len,
        "on_bad_record": on_bad_record,
        "shard_bytes": shard_bytes,
        "corpora": [
            [c.name, c.language, c.role, c.group, c.text_column, c.max_docs, [fingerprints[p] for p in c.paths]]
            for c in corpora
        ],
    }
    return hashlib.sha256(json.dumps(payload, sort_keys=True).encode()).hexdigest()


def shard_key(shard: Shard, corpus: Corpus, settings: list, fingerprints: dict) -> str:
    """What decides one shard's file, so a shard stays valid when only other files change."""
    pieces = [[p.path, p.start, p.stop, fingerprints[p.path]] for p in shard.pieces]
    payload = [FORMAT_VERSION, settings, corpus.text_column, shard.max_docs, pieces]
    return hashlib.sha256(json.dumps(payload).encode()).hexdigest()


def source_fingerprint(path: str | os.PathLike) -> str:
    """Content hash of a small file; of a bigger one its size, mtime and first and last 64 KiB (which notices
    appends, truncation and any rewrite, cheaply at any size); a save_to_disk folder: that of each file."""
    try:
        if _file_format(path)[0] == SAVE_TO_DISK:
            parts = [f"{f.name}={_file_fingerprint(f.path)}" for f in sorted(os.scandir(path), key=lambda f: f.name)]
            return hashlib.sha256("\n".join(parts).encode()).hexdigest()
        return _file_fingerprint(path)
    except OSError as e:
        raise UserError(f"cannot read data file {os.fspath(path)!r} ({e.strerror or e})") from None


def _file_fingerprint(path: str | os.PathLike) -> str:
    size = os.stat(path).st_size
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        if size <= 2 * _EDGE:
            for chunk in iter(lambda: f.read(_EDGE), b""):
                digest.update(chunk)
            return f"sha256:{digest.hexdigest()}"
        digest.update(f.read(_EDGE))
        f.seek(size - _EDGE)
        digest.update(f.read(_EDGE))
    return f"edges:{size}:{os.stat(path).st_mtime_ns}:{digest.hexdigest()}"


# ----------------------------------------------------------------------------------------- the directory


def _read_json(path: Path) -> dict | None:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return None


def _claim(root: Path, existing: dict | None, wanted: dict, overwrite: bool) -> None:
    """Make `root` a prepared-dataset directory: new, partial (continued), or replaced when `overwrite`."""
    if root.exists() and not root.is_dir():
        raise UserError(f"output path {root} exists and is not a directory; choose another --output")
    if existing is not None and not overwrite:
        raise UserError(
            f"{root} holds a dataset prepared otherwise ({_difference(existing, wanted)}); pass --overwrite to "
            "replace it or choose another --output"
        )
    if existing is not None:  # replaced: its shards whose keys still hold are kept, the others redone
        (root / MANIFEST).unlink()
    if root.is_dir() and any(root.iterdir()) and not (root / SHARDS).is_dir():
        raise UserError(f"{root} exists and is not a prepared dataset; choose another --output or empty it")
    (root / SHARDS).mkdir(parents=True, exist_ok=True)


def _difference(existing: dict, wanted: dict) -> str:
    """What differs between a finished dataset and the one asked for, in words."""
    labels = {
        "tokenizer": "another tokenizer",
        "shard_bytes": "another shard size",
        "on_bad_record": "another on_bad_record",
    }
    for key in ("cutoff_len", "tokenizer", "shard_bytes", "on_bad_record"):
        if existing.get(key) != wanted[key]:
            return labels.get(key, f"{key} {existing.get(key)}")
    corpora = [[e["name"], e["language"], e["role"], e["group"]] for e in existing.get("corpora", [])]
    return "other corpora" if corpora != wanted["corpora"] else "the data files have changed since"


def _done(root: Path, shard: Shard, key: str) -> bool:
    record = _read_json(root / SHARDS / f"{shard.name}.json")
    return record is not None and record.get("key") == key and (root / SHARDS / f"{shard.name}.bin").is_file()


def _wait_for(root: Path, shards: list[Shard], keys: dict[str, str]) -> dict[str, dict]:
    """The completion records of all shards, polling for those other processes are preparing (no timeout: a
    launcher such as torchrun ends every process when one fails)."""
    records: dict[str, dict] = {}
    waited = 0.0
    while True:
        for s in shards:
            if s.name not in records and _done(root, s, keys[s.name]):
                records[s.name] = _read_json(root / SHARDS / f"{s.name}.json")
        missing = len(shards) - len(records)
        if not missing:
            return records
        if waited % 300 == 0:
            logger.warning("waiting for %d shards prepared by other processes in %s", missing, root)
        time.sleep(_POLL_S)
        waited += _POLL_S


def _drop_corrupt(root: Path, manifest: dict) -> bool:
    """Remove the manifest and every shard whose file is missing, truncated or fails its checksum; say which."""
    itemsize = 2 if manifest["dtype"] == "uint16" else 4
    bad = []
    for entry in manifest["corpora"]:
        for shard in entry["shards"]:
            path = root / shard["file"]
            expected = shard["blocks"] * manifest["cutoff_len"] * itemsize
            if not path.is_file() or path.stat().st_size != expected or file_checksum(path) != shard["checksum"]:
                bad.append(path)
    for path in bad:
        logger.warning("prepared shard %s is missing or corrupt; preparing it again", path)
        path.with_suffix(".json").unlink(missing_ok=True)
        path.unlink(missing_ok=True)
    if bad:
        (root / MANIFEST).unlink()
    return bool(bad)


def _refresh_mix(root: Path, manifest: dict, corpora: list[Corpus]) -> None:
    """A finished dataset with the same key is kept; it records the spec's current mixing settings."""
    mixes = {c.name: c.mix for c in corpora}
    if any(entry["mix"] != mixes[entry["name"]] for entry in manifest["corpora"]):
        manifest = {**manifest, "corpora": [{**e, "mix": mixes[e["name"]]} for e in manifest["corpora"]]}
        atomic_write_json(root / MANIFEST, manifest)
    logger.info("reusing the prepared dataset in %s", root)


def _manifest(root, key, corpora, shards, records, encoder, cutoff_len, dtype, on_bad_record) -> dict[str, Any]:
    entries = []
    for ci, corpus in enumerate(corpora):
        own = [(s, records[s.name]) for s in shards if s.corpus == ci]
        totals = {
            k: sum(r[k] for _, r in own) for k in ("docs", "skipped", "tokens", "blocks", "dropped", "text_bytes")
        }
        if totals["docs"] == 0:
            raise no_documents(corpus, totals["skipped"])
        if totals["blocks"] == 0:
            raise UserError(
                f"corpus {corpus.name!r} holds {totals['dropped']} tokens, fewer than one block in each of its "
                f"shards (cutoff_len={cutoff_len}); add data or lower cutoff_len"
            )
        if totals["skipped"]:
            logger.warning("corpus %s: skipped %d bad records", corpus.name, totals["skipped"])
        entries.append(
            {
                "name": corpus.name,
                "language": corpus.language,
                "role": corpus.role,
                "group": corpus.group,
                "mix": corpus.mix,
                "paths": corpus.paths,
                **totals,
                "shards": [
                    {"file": f"{SHARDS}/{s.name}.bin", "blocks": r["blocks"], "checksum": r["checksum"]}
                    for s, r in own
                    if r["blocks"]
                ],
            }
        )
    names = {s.name for s in shards}
    for stale in (root / SHARDS).iterdir():  # shards of an earlier, different plan
        if stale.name.split(".")[0] not in names and not stale.name.startswith("."):
            stale.unlink(missing_ok=True)
    files = list((root / SHARDS).iterdir())
    return {
        "format": FORMAT_VERSION,
        "key": key,
        "tokenizer": encoder.fingerprint,
        "vocab_size": encoder.vocab_size,
        "eos_id": encoder.eos_id,
        "cutoff_len": cutoff_len,
        "dtype": dtype,
        "on_bad_record": on_bad_record,
        "bytes": sum(f.stat().st_size for f in files),
        "corpora": entries,
    }


def summary(manifest: dict[str, Any]) -> str:
    """Tokens and blocks per language and role, bytes on disk (what `moe-lpr prepare` prints at the end)."""
    rows: dict[tuple[str, str], list[int]] = {}
    for entry in manifest["corpora"]:
        row = rows.setdefault((entry["language"], entry["role"]), [0, 0, 0])
        row[0] += entry["docs"]
        row[1] += entry["tokens"]
        row[2] += entry["blocks"]
    lines = [f"{'language':<10} {'role':<5} {'documents':>13} {'tokens':>16} {'blocks':>12}"]
    lines += [f"{lang:<10} {role:<5} {d:>13,} {t:>16,} {b:>12,}" for (lang, role), (d, t, b) in rows.items()]
    tokens = sum(r[1] for r in rows.values())
    blocks = sum(r[2] for r in rows.values())
    lines.append(f"{'total':<16} {sum(r[0] for r in rows.values()):>13,} {tokens:>16,} {blocks:>12,}")
    dropped = sum(e["dropped"] for e in manifest["corpora"])
    skipped = sum(e["skipped"] for e in manifest["corpora"])
    lines.append(
        f"{manifest['bytes']:,} bytes on disk ({manifest['bytes'] / max(1, tokens):.2f} per token, {manifest['dtype']}); "
        f"{manifest['cutoff_len']}-token blocks; {dropped:,} tokens dropped at shard ends; {skipped:,} bad records skipped"
    )
    return "\n".join(lines)
