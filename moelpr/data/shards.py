"""Writing shard files in worker processes, with progress, and checking them afterwards.

`ShardWriter` tokenises one shard's documents batch by batch into a temporary file, cuts it to whole blocks,
checksums it and renames it into place, then writes the shard's completion record: at any moment a shard is
either absent, a temporary file (never read), or complete. `write_shards` runs it in `num_proc` processes
(forked: the writer and its tokenizer are inherited, not sent) and shows one progress bar.
"""

from __future__ import annotations

import multiprocessing
import os
import queue
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, Callable, Iterator

import numpy as np

from moelpr.data.corpus import BadRecordPolicy, Corpus
from moelpr.data.encode import Encoder
from moelpr.data.read import read_piece
from moelpr.utils.atomic import atomic_write_json

DOC_BATCH = 1000  # documents per tokeniser call
_CHUNK = 16 << 20

Report = Callable[[str, int, int, int], None]  # (shard name, documents, tokens, input bytes) so far


class ShardWriter:
    """Writes shards of one preparation into `shard_dir`; picklable (the tokenizer travels as its JSON)."""

    def __init__(
        self,
        shard_dir: Path,
        corpora: list[Corpus],
        encoder: Encoder,
        *,
        cutoff_len: int,
        dtype: str,
        on_bad_record: BadRecordPolicy,
        keys: dict[str, str],
    ):
        self.shard_dir = shard_dir
        self.corpora = corpora
        self.encoder = encoder
        self.cutoff_len = cutoff_len
        self.dtype = np.dtype(dtype)
        self.on_bad_record = on_bad_record
        self.keys = keys

    def __call__(self, shard: Any, report: Report | None = None) -> dict[str, Any]:
        """Write `shard` (a `moelpr.data.prepare.Shard`) and its completion record; returns the record."""
        final = self.shard_dir / f"{shard.name}.bin"
        fd, tmp = tempfile.mkstemp(prefix=f".{shard.name}.tmp-", dir=self.shard_dir)
        stats = {"docs": 0, "skipped": 0, "bytes": 0}
        tokens = text_bytes = 0
        try:
            with os.fdopen(fd, "wb") as f:
                for texts in self._batches(shard, stats):
                    text_bytes += sum(len(t.encode("utf-8")) for t in texts)  # what bits per byte divide by
                    ids, _ = self.encoder.encode(texts)  # (T,)
                    f.write(ids.astype(self.dtype).tobytes())
                    tokens += len(ids)
                    if report is not None:
                        report(shard.name, stats["docs"], tokens, stats["bytes"])
            blocks = tokens // self.cutoff_len
            os.truncate(tmp, blocks * self.cutoff_len * self.dtype.itemsize)  # the final partial block goes
            checksum = file_checksum(Path(tmp))
            os.chmod(tmp, 0o666 & ~_umask())
            os.replace(tmp, final)
        except BaseException:
            Path(tmp).unlink(missing_ok=True)
            raise
        record = {
            "key": self.keys[shard.name],
            "docs": stats["docs"],
            "skipped": stats["skipped"],
            "tokens": blocks * self.cutoff_len,
            "dropped": tokens - blocks * self.cutoff_len,
            "text_bytes": text_bytes,
            "blocks": blocks,
            "checksum": checksum,
        }
        atomic_write_json(self.shard_dir / f"{shard.name}.json", record)  # after the file: marks the shard done
        if report is not None:
            report(shard.name, stats["docs"], tokens, shard.size)
        return record

    def _batches(self, shard: Any, stats: dict[str, int]) -> Iterator[list[str]]:
        """The shard's documents in batches of `DOC_BATCH`, at most `shard.max_docs` of them; `stats` follows."""
        corpus = self.corpora[shard.corpus]
        texts: list[str] = []
        docs = done = skipped = 0
        for piece in shard.pieces:
            seen: dict[str, int] = {}
            for text in read_piece(
                piece, corpus.text_column, on_bad_record=self.on_bad_record, stats=seen, corpus=corpus.name
            ):
                texts.append(text)
                docs += 1
                last = docs == shard.max_docs
                if len(texts) == DOC_BATCH or last:
                    stats.update(docs=docs, skipped=skipped + seen["skipped"], bytes=done + seen["bytes"])
                    yield texts
                    texts = []
                if last:
                    return
            done += piece.size
            skipped += seen.get("skipped", 0)
        stats.update(docs=docs, skipped=skipped, bytes=done)
        if texts:
            yield texts


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def file_checksum(path: Path) -> str:
    import xxhash  # a dependency of datasets

    digest = xxhash.xxh3_64()
    with open(path, "rb") as f:
        while chunk := f.read(_CHUNK):
            digest.update(chunk)
    return f"xxh3_64:{digest.hexdigest()}"


def remove_temporaries(shard_dir: Path, names: list[str]) -> None:
    """Delete temporary files of these shards left by a killed or failed run: the ids (`.NAME.tmp-*`) and the
    completion record's (`.NAME.json.tmp-*`, a kill between writing it and its rename)."""
    for name in names:
        for tmp in shard_dir.glob(f".{name}.*tmp-*"):
            tmp.unlink(missing_ok=True)


# ------------------------------------------------------------------------------------------- processes


def write_shards(writer: ShardWriter, shards: list[Any], num_proc: int, progress: bool) -> None:
    """Write `shards` with `num_proc` processes (in this one when 1), showing progress; the first error stops all."""
    remove_temporaries(writer.shard_dir, [s.name for s in shards])
    bar = Progress(sum(s.size for s in shards), enabled=progress)
    try:
        if num_proc == 1 or len(shards) == 1:
            for shard in shards:
                writer(shard, bar.update)
            return
        _in_pool(writer, shards, min(num_proc, len(shards)), bar)
    except BaseException:
        remove_temporaries(writer.shard_dir, [s.name for s in shards])  # those of terminated workers
        raise
    finally:
        bar.close()


_WORKER: dict[str, Any] = {}


def _init_worker(writer: ShardWriter, reports: Any) -> None:
    os.environ["TOKENIZERS_PARALLELISM"] = "false"  # one core per process
    _WORKER.update(writer=writer, reports=reports)


def _work(shard: Any) -> dict[str, Any]:
    return _WORKER["writer"](shard, lambda *report: _WORKER["reports"].put(report))


def _in_pool(writer: ShardWriter, shards: list[Any], processes: int, bar: Progress) -> None:
    method = "fork" if "fork" in multiprocessing.get_all_start_methods() else "spawn"
    ctx = multiprocessing.get_context(method)
    reports = ctx.Queue()
    with ctx.Pool(processes, initializer=_init_worker, initargs=(writer, reports)) as pool:
        pending = [pool.apply_async(_work, (shard,)) for shard in shards]
        while pending:
            try:
                bar.update(*reports.get(timeout=0.2))
                while True:
                    bar.update(*reports.get_nowait())
            except queue.Empty:
                pass
            for result in [r for r in pending if r.ready()]:
                result.get()  # re-raises a worker's error here; leaving the block terminates the others
                pending.remove(result)


class Progress:
    """One tqdm bar over input bytes (rate and ETA), with documents, tokens and tokens/s after it."""

    def __init__(self, total_bytes: int, *, enabled: bool):
        from tqdm.auto import tqdm

        self.bar = tqdm(
            total=total_bytes,
            unit="B",
            unit_scale=True,
            unit_divisor=1024,
            desc="prepare",
            disable=not enabled,
            mininterval=0.1 if sys.stderr.isatty() else 30,  # a log file gets a line every 30 s
        )
        self.seen: dict[str, tuple[int, int, int]] = {}
        self.docs = self.tokens = 0
        self.start = time.perf_counter()

    def update(self, name: str, docs: int, tokens: int, nbytes: int) -> None:
        d0, t0, b0 = self.seen.get(name, (0, 0, 0))
        self.seen[name] = (docs, tokens, max(b0, nbytes))
        self.docs += docs - d0
        self.tokens += tokens - t0
        rate = self.tokens / max(1e-9, time.perf_counter() - self.start)
        self.bar.set_postfix_str(f"{self.docs:,} docs, {self.tokens:,} tokens, {rate:,.0f} tokens/s", refresh=False)
        self.bar.update(max(0, nbytes - b0))

    def close(self) -> None:
        self.bar.close()
