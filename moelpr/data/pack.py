"""Tokenise corpora and pack them into fixed-length blocks carrying a per-token language-role mask.

Like the official MoE-LPR / LLaMA-Factory pretraining data path: each document is tokenised without special
tokens, EOS is appended, the documents are concatenated (corpus order, then document order) and cut into
`cutoff_len` blocks. Differences: the remainder is dropped once at the very end (LLaMA-Factory drops one per
1000-document map batch), and the doc-level role is carried per token, so a block that straddles two corpora
has the right `lang_mask` / `lang_group` on each side of the boundary.

Columns of the packed dataset:
    input_ids  list[int32] of exactly `cutoff_len` tokens;
    lang_mask  list[int8]: 1 = token of an "old"-role corpus (its EOS included), 0 otherwise;
    lang_group list[int8]: the corpus' group (0 old, ≥ 1 new);
    language   str: the language holding most of the block's tokens (ties: the one whose corpus comes first);
               blocks only mix languages at corpus boundaries, so this is exact for all but a few blocks.
"""

from __future__ import annotations

import hashlib
import itertools
import json
import logging
import os
import shutil
import tempfile
from pathlib import Path
from typing import TYPE_CHECKING, Any, Iterator

import numpy as np

from moelpr.data.corpus import BAD_RECORD_POLICIES, BadRecordPolicy, Corpus, check_unique_names, iter_documents
from moelpr.errors import UserError
from moelpr.utils.atomic import atomic_output_dir, atomic_write_json

if TYPE_CHECKING:
    from datasets import Dataset, Features, IterableDataset

logger = logging.getLogger(__name__)

FORMAT_VERSION = 1  # part of the cache key: bump when tokenisation or the packed layout changes
DOC_BATCH = 1000  # documents per tokeniser call / map batch
META_FILE = "moelpr_pack.json"
_FULL_HASH_LIMIT = 64 << 20  # files up to this size are hashed whole
_EDGE = 1 << 20  # bigger files: size + mtime + hash of the first and last MiB


def tokenize_and_pack(
    corpora: list[Corpus],
    tokenizer: Any,
    *,
    cutoff_len: int,
    cache_dir: str | os.PathLike | None = None,
    num_proc: int = 1,
    streaming: bool = False,
    on_bad_record: BadRecordPolicy = "error",
    seed: int | None = None,
) -> Dataset | IterableDataset:
    """Tokenise `corpora` with `tokenizer` and pack them into `cutoff_len`-token blocks.

    Args:
        corpora: the corpora, in the order their documents are concatenated.
        tokenizer: a Hugging Face tokenizer with an `eos_token_id` (appended after every document).
        cutoff_len: tokens per block; the final partial block is dropped.
        cache_dir: save the packed dataset here (Arrow), keyed by tokenizer, file contents, corpus settings
            and `cutoff_len`; a later call with the same inputs memory-maps it instead of re-tokenising.
            Ignored when streaming.
        num_proc: tokenisation processes (`datasets.map`).
        streaming: return an `IterableDataset` that reads, tokenises and packs on the fly; it yields the same
            blocks as the non-streaming path.
        on_bad_record: "error" or "skip" malformed records (see `iter_documents`).
        seed: shuffle the blocks with this seed (the official code shuffles with 22 after packing); when
            streaming, the shuffle is approximate (a 10,000-block buffer). None keeps the packing order.
    """
    eos_id = _check_args(corpora, tokenizer, cutoff_len, num_proc, on_bad_record, seed)
    if streaming:
        from datasets import IterableDataset

        gen_kwargs = {
            "corpora": tuple(corpora),
            "tokenizer": tokenizer,
            "eos_id": eos_id,
            "cutoff_len": cutoff_len,
            "on_bad_record": on_bad_record,
        }  # a tuple: datasets shards lists
        stream = IterableDataset.from_generator(_stream_blocks, features=block_features(), gen_kwargs=gen_kwargs)
        return stream if seed is None else stream.shuffle(seed=seed, buffer_size=10_000)
    key = cache_key(corpora, tokenizer, cutoff_len=cutoff_len, on_bad_record=on_bad_record)
    ds = _load_or_build(corpora, tokenizer, eos_id, key, cutoff_len, cache_dir, num_proc, on_bad_record)
    return ds if seed is None else ds.shuffle(seed=seed, keep_in_memory=True)


def block_features() -> Features:
    """The `datasets.Features` of a packed dataset."""
    from datasets import Features, List, Value

    return Features(
        {
            "input_ids": List(Value("int32")),
            "lang_mask": List(Value("int8")),
            "lang_group": List(Value("int8")),
            "language": Value("string"),
        }
    )


def _check_args(corpora: Any, tokenizer: Any, cutoff_len: Any, num_proc: Any, on_bad_record: Any, seed: Any) -> int:
    """Validate the arguments of `tokenize_and_pack`; returns the EOS id."""
    if not isinstance(corpora, (list, tuple)) or not corpora or not all(isinstance(c, Corpus) for c in corpora):
        raise UserError("corpora must be a non-empty list of Corpus (see moelpr.data.load_corpora)")
    check_unique_names(list(corpora))
    for name, value in (("cutoff_len", cutoff_len), ("num_proc", num_proc)):
        if not isinstance(value, int) or isinstance(value, bool) or value < 1:
            raise UserError(f"{name} must be a positive integer, got {value!r}")
    if on_bad_record not in BAD_RECORD_POLICIES:
        raise UserError(f"unknown on_bad_record {on_bad_record!r}; valid: {', '.join(BAD_RECORD_POLICIES)}")
    if seed is not None and (not isinstance(seed, int) or isinstance(seed, bool)):
        raise UserError(f"seed must be an integer or None, got {seed!r}")
    eos_id = getattr(tokenizer, "eos_token_id", None)
    if eos_id is None:
        raise UserError("the tokenizer has no eos_token; set tokenizer.eos_token (it ends every packed document)")
    return int(eos_id)


# ---------------------------------------------------------------------------------------------- cache key


def cache_key(
    corpora: list[Corpus], tokenizer: Any, *, cutoff_len: int, on_bad_record: BadRecordPolicy = "error"
) -> str:
    """SHA-256 over everything that determines the packed blocks (see `tokenize_and_pack`)."""
    payload = {
        "format": FORMAT_VERSION,
        "tokenizer": tokenizer_fingerprint(tokenizer),
        "cutoff_len": cutoff_len,
        "on_bad_record": on_bad_record,
        "corpora": [
            {
                "name": c.name,
                "language": c.language,
                "role": c.role,
                "group": c.group,
                "text_field": c.text_field,
                "max_docs": c.max_docs,
                "files": [file_fingerprint(p) for p in c.paths],
            }
            for c in corpora
        ],
    }
    return hashlib.sha256(json.dumps(payload, sort_keys=True).encode()).hexdigest()


def tokenizer_fingerprint(tokenizer: Any) -> str:
    """Hash of the tokenizer's full definition (fast tokenizers) or vocabulary (others), class and EOS id."""
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is not None:
        definition = backend.to_str()
    else:
        definition = json.dumps(sorted(tokenizer.get_vocab().items()))
    extra = f"{type(tokenizer).__name__}:{tokenizer.eos_token_id}"
    return hashlib.sha256(definition.encode() + extra.encode()).hexdigest()


def file_fingerprint(path: str | os.PathLike) -> str:
    """A content hash for files up to 64 MiB; above that, size + mtime + hashes of the first and last MiB.

    The cheap form for big files still notices appends, truncation and any rewrite (which changes the mtime).
    """
    try:
        return _fingerprint(path)
    except OSError as e:
        raise UserError(f"cannot read data file {os.fspath(path)!r} ({e.strerror or e})") from None


def _fingerprint(path: str | os.PathLike) -> str:
    size = os.stat(path).st_size
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        if size <= _FULL_HASH_LIMIT:
            for chunk in iter(lambda: f.read(_EDGE), b""):
                digest.update(chunk)
            return f"sha256:{digest.hexdigest()}"
        digest.update(f.read(_EDGE))
        f.seek(size - _EDGE)
        digest.update(f.read(_EDGE))
    return f"edges:{size}:{os.stat(path).st_mtime_ns}:{digest.hexdigest()}"


# ------------------------------------------------------------------------------------------------ packing


class Packer:
    """Concatenates runs of tokens and cuts full `cutoff_len` blocks, carrying the remainder to the next call.

    Each token travels with the index of its corpus, from which `lang_mask`, `lang_group` and `language` follow.
    """

    def __init__(self, corpora: list[Corpus] | tuple[Corpus, ...], cutoff_len: int):
        self.cutoff_len = cutoff_len
        self.languages = list(dict.fromkeys(c.language for c in corpora))  # corpus order
        self._old = np.array([c.role == "old" for c in corpora], dtype=np.int8)  # (C,)
        self._group = np.array([c.group for c in corpora], dtype=np.int8)  # (C,)
        self._lang = np.array([self.languages.index(c.language) for c in corpora], dtype=np.int16)  # (C,)
        self._ids = np.empty(0, dtype=np.int32)  # carried tokens, fewer than cutoff_len
        self._src = np.empty(0, dtype=np.int16)  # their corpus indices

    @property
    def carried(self) -> int:
        """Tokens waiting for the next block (dropped if no more come)."""
        return len(self._ids)

    def add(self, ids: np.ndarray, src: np.ndarray) -> dict[str, np.ndarray]:
        """Append tokens `ids` (T,) from corpora `src` (T,); return the completed blocks, `(n, cutoff_len)` each."""
        ids = np.concatenate([self._ids, ids.astype(np.int32, copy=False)])  # (T',)
        src = np.concatenate([self._src, src.astype(np.int16, copy=False)])  # (T',)
        n = len(ids) // self.cutoff_len
        cut = n * self.cutoff_len
        self._ids, self._src = ids[cut:].copy(), src[cut:].copy()
        block_src = src[:cut].reshape(n, self.cutoff_len)  # (n, S) corpus index per token
        lang = self._lang[block_src]  # (n, S)
        counts = np.stack([(lang == i).sum(axis=1) for i in range(len(self.languages))], axis=1)  # (n, L)
        return {
            "input_ids": ids[:cut].reshape(n, self.cutoff_len),
            "lang_mask": self._old[block_src],
            "lang_group": self._group[block_src],
            "language": np.array(self.languages, dtype=object)[counts.argmax(axis=1)] if n else np.empty(0, object),
        }


def _encode(texts: list[str], tokenizer: Any, eos_id: int) -> list[list[int]]:
    """Token ids of each text, no special tokens, EOS appended (as LLaMA-Factory pretraining does)."""
    enc = tokenizer(texts, add_special_tokens=False, return_attention_mask=False, verbose=False)["input_ids"]
    return [list(ids) + [eos_id] for ids in enc]


def _encode_batch(batch: dict[str, list], tokenizer: Any, eos_id: int) -> dict[str, list]:
    """`datasets.map` function: text → input_ids (the corpus column passes through)."""
    return {"input_ids": _encode(batch["text"], tokenizer, eos_id)}


def _doc_batches(
    corpora: list[Corpus] | tuple[Corpus, ...],
    on_bad_record: BadRecordPolicy,
    stats: list[dict[str, int]] | None = None,
) -> Iterator[tuple[list[str], list[int]]]:
    """Batches of (texts, corpus indices) over all corpora, in concatenation order."""
    texts: list[str] = []
    src: list[int] = []
    for i, corpus in enumerate(corpora):
        corpus_stats = stats[i] if stats is not None else None
        for text in iter_documents(corpus, on_bad_record=on_bad_record, stats=corpus_stats):
            texts.append(text)
            src.append(i)
            if len(texts) == DOC_BATCH:
                yield texts, src
                texts, src = [], []
    if texts:
        yield texts, src


def _rows(blocks: dict[str, np.ndarray]) -> Iterator[dict[str, Any]]:
    for i in range(len(blocks["input_ids"])):
        yield {k: (v[i] if k == "language" else v[i].tolist()) for k, v in blocks.items()}


def _too_short(total: int, cutoff_len: int) -> UserError:
    return UserError(f"the corpora hold {total} tokens, fewer than cutoff_len={cutoff_len}; add data or lower it")


def _stream_blocks(
    corpora: tuple[Corpus, ...], tokenizer: Any, eos_id: int, cutoff_len: int, on_bad_record: BadRecordPolicy
) -> Iterator[dict[str, Any]]:
    """The streaming path: read, tokenise and pack on the fly, one document batch at a time."""
    packer = Packer(corpora, cutoff_len)
    blocks = tokens = 0
    for texts, src in _doc_batches(corpora, on_bad_record):
        ids = _encode(texts, tokenizer, eos_id)
        lengths = [len(x) for x in ids]
        tokens += sum(lengths)
        flat = np.fromiter(itertools.chain.from_iterable(ids), np.int32, count=sum(lengths))  # (T,)
        out = packer.add(flat, np.repeat(np.array(src, np.int16), lengths))
        blocks += len(out["input_ids"])
        yield from _rows(out)
    if blocks == 0:
        raise _too_short(tokens, cutoff_len)


# -------------------------------------------------------------------------------------- build and cache


def _load_or_build(
    corpora: list[Corpus],
    tokenizer: Any,
    eos_id: int,
    key: str,
    cutoff_len: int,
    cache_dir: str | os.PathLike | None,
    num_proc: int,
    on_bad_record: BadRecordPolicy,
) -> Dataset:
    """The packed dataset: memory-mapped from `cache_dir` when present, else built (and cached if asked)."""
    from datasets import Dataset, load_from_disk

    if cache_dir is None:
        with tempfile.TemporaryDirectory(prefix="moelpr-pack-") as work:
            blocks_file, _ = _build(corpora, tokenizer, eos_id, key, cutoff_len, num_proc, on_bad_record, Path(work))
            return Dataset.from_file(str(blocks_file), in_memory=True)
    final = Path(cache_dir) / f"packed-{key[:24]}"
    if (final / META_FILE).is_file():
        logger.info("reusing packed data %s", final)
        return load_from_disk(str(final))
    Path(cache_dir).mkdir(parents=True, exist_ok=True)
    work = Path(tempfile.mkdtemp(prefix=".work-", dir=cache_dir))  # same filesystem as the cache
    try:
        blocks_file, meta = _build(corpora, tokenizer, eos_id, key, cutoff_len, num_proc, on_bad_record, work)
        with atomic_output_dir(final, overwrite=True) as tmp:
            Dataset.from_file(str(blocks_file)).save_to_disk(str(tmp))
            atomic_write_json(tmp / META_FILE, meta)  # written last: its presence marks a complete cache entry
    finally:
        shutil.rmtree(work, ignore_errors=True)
    logger.info("packed data cached in %s", final)
    return load_from_disk(str(final))


def _build(
    corpora: list[Corpus],
    tokenizer: Any,
    eos_id: int,
    key: str,
    cutoff_len: int,
    num_proc: int,
    on_bad_record: BadRecordPolicy,
    work: Path,
) -> tuple[Path, dict[str, Any]]:
    """Documents → Arrow → tokenised (`datasets.map`, `num_proc` workers) → packed blocks Arrow file in `work`."""
    import pyarrow as pa
    import pyarrow.compute as pc
    from datasets import Dataset, Features, List, Value

    stats = [{"docs": 0, "skipped": 0} for _ in corpora]
    docs_file = work / "docs.arrow"
    doc_features = Features({"text": Value("string"), "corpus": Value("int16")})
    with pa.OSFile(str(docs_file), "wb") as sink, pa.ipc.new_stream(sink, doc_features.arrow_schema) as writer:
        for texts, src in _doc_batches(corpora, on_bad_record, stats):
            writer.write_table(
                pa.table({"text": texts, "corpus": pa.array(src, pa.int16())}, schema=doc_features.arrow_schema)
            )
    for corpus, s in zip(corpora, stats):
        if s["skipped"]:
            logger.warning("corpus %s: skipped %d bad records", corpus.name, s["skipped"])

    tokenized = Dataset.from_file(str(docs_file)).map(
        _encode_batch,
        batched=True,
        batch_size=DOC_BATCH,
        num_proc=num_proc if num_proc > 1 else None,
        remove_columns=["text"],
        fn_kwargs={"tokenizer": tokenizer, "eos_id": eos_id},
        features=Features({"corpus": Value("int16"), "input_ids": List(Value("int32"))}),
        cache_file_name=str(work / "tokens.arrow"),
        new_fingerprint=key[:32],
        desc="Tokenising",
    )

    packer = Packer(corpora, cutoff_len)
    tokens = np.zeros(len(corpora), dtype=np.int64)
    num_blocks = 0
    blocks_file = work / "blocks.arrow"
    schema = block_features().arrow_schema
    with pa.OSFile(str(blocks_file), "wb") as sink, pa.ipc.new_stream(sink, schema) as writer:
        for table in tokenized.with_format("arrow").iter(batch_size=DOC_BATCH):
            ids = table["input_ids"].combine_chunks()
            lengths = pc.list_value_length(ids).to_numpy()  # (D,)
            src = np.repeat(table["corpus"].to_numpy(), lengths)  # (T,)
            tokens += np.bincount(src, minlength=len(corpora))
            out = packer.add(ids.flatten().to_numpy(), src)
            if len(out["input_ids"]):
                num_blocks += len(out["input_ids"])
                writer.write_batch(_record_batch(out, schema))
    if num_blocks == 0:
        raise _too_short(int(tokens.sum()), cutoff_len)
    meta = {
        "key": key,
        "cutoff_len": cutoff_len,
        "num_blocks": num_blocks,
        "dropped_tokens": packer.carried,
        "corpora": {c.name: {**s, "tokens": int(t)} for c, s, t in zip(corpora, stats, tokens)},
    }
    logger.info("packed %d blocks of %d tokens (%d trailing tokens dropped)", num_blocks, cutoff_len, packer.carried)
    return blocks_file, meta


def _record_batch(blocks: dict[str, np.ndarray], schema: Any) -> Any:
    """Arrow record batch of packed blocks, list columns built zero-copy from the (n, S) arrays."""
    import pyarrow as pa

    n, width = blocks["input_ids"].shape
    offsets = pa.array(np.arange(0, (n + 1) * width, width, dtype=np.int32))

    def as_list(a: np.ndarray) -> pa.Array:
        return pa.ListArray.from_arrays(offsets, pa.array(a.reshape(-1)))

    columns = [
        as_list(blocks["input_ids"]),
        as_list(blocks["lang_mask"]),
        as_list(blocks["lang_group"]),
        pa.array(blocks["language"].tolist(), pa.string()),
    ]
    return pa.RecordBatch.from_arrays(columns, schema=schema)
