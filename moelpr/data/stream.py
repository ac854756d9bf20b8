"""The streaming path (`streaming: true`): read, tokenise and pack on the fly, the corpora mixed by weight.

The stream has `num_shards` shards (`datasets.IterableDataset.n_shards`), one per dataloader worker: each
holds a disjoint part of every corpus (its pieces, or every n-th document of a piece when a corpus has fewer
pieces than shards) and mixes them itself, so every worker's output, and so the dataloader's, holds each
corpus at its weight in any window: a smooth weighted round robin (`moelpr.data.mix.weighted_order`) picks
the corpus of each block. Without weights the shares follow the corpora's sizes on disk. A corpus part that
runs out starts again; a shard ends once each of its parts has run out at least once. Blocks never mix
corpora (as prepared data); within a corpus they pass through a small shuffle buffer.
"""

from __future__ import annotations

import random
from dataclasses import dataclass
from typing import Any, Iterator

import numpy as np

from moelpr.data.corpus import BadRecordPolicy, Corpus
from moelpr.data.encode import Encoder
from moelpr.data.mix import weighted_order
from moelpr.data.prepare import SHARD_BYTES
from moelpr.data.read import Piece, read_piece, split_source
from moelpr.data.shards import DOC_BATCH
from moelpr.errors import UserError

BUFFER = 256  # blocks per corpus in the shuffle buffer


@dataclass(frozen=True)
class Part:
    """What one stream shard reads of one corpus: `pieces` in order, keeping every `stride`-th document from
    the `offset`-th, stopping at the corpus' `max_docs`-th document (counted over all shards)."""

    pieces: tuple[Piece, ...]
    stride: int = 1
    offset: int = 0
    max_docs: int | None = None


def stream_dataset(
    corpora: list[Corpus],
    tokenizer: Any,
    *,
    cutoff_len: int,
    num_shards: int = 1,
    seed: int = 0,
    on_bad_record: BadRecordPolicy = "error",
    shard_bytes: int = SHARD_BYTES,
) -> Any:
    """A `datasets.IterableDataset` of packed blocks with `num_shards` shards (see the module docstring)."""
    from datasets import IterableDataset

    if any(c.tokens is not None or c.epochs is not None for c in corpora):
        raise UserError(
            "a stream mixes corpora by weight: (or by size); tokens: and epochs: need a prepared dataset "
            "(drop streaming: true, or give weights)"
        )
    encoder = Encoder(tokenizer)
    sizes, parts = [], []
    for corpus in corpora:
        pieces = [piece for path in corpus.paths for piece in split_source(path, shard_bytes)]
        sizes.append(sum(p.size for p in pieces))
        parts.append(_parts(corpus, pieces, num_shards))
    shares = [c.weight for c in corpora] if corpora[0].weight is not None else [max(1, s) for s in sizes]
    shards = [tuple(p[s] for p in parts) for s in range(num_shards)]
    gen_kwargs = {
        "shards": shards,  # a list: datasets gives each worker its own shards
        "corpora": tuple(corpora),
        "shares": tuple(shares),
        "encoder": encoder,
        "cutoff_len": cutoff_len,
        "on_bad_record": on_bad_record,
        "seed": seed,
    }
    return IterableDataset.from_generator(_generate, features=block_features(), gen_kwargs=gen_kwargs)


def block_features() -> Any:
    """The `datasets.Features` of a stream's rows (the rows `PreparedDataset` gives, as lists)."""
    from datasets import Features, List, Value

    return Features(
        {
            "input_ids": List(Value("int32")),
            "lang_mask": List(Value("int8")),
            "lang_group": List(Value("int8")),
            "language": Value("string"),
        }
    )


def _parts(corpus: Corpus, pieces: list[Piece], n: int) -> list[Part]:
    """Corpus → one disjoint `Part` per stream shard."""
    if corpus.max_docs is not None:  # the first max_docs documents: every shard reads the files, each n-th doc
        whole = tuple(Piece(p) for p in corpus.paths)
        return [Part(whole, n, s, corpus.max_docs) for s in range(n)]
    if len(pieces) >= n:
        return [Part(tuple(pieces[s::n])) for s in range(n)]
    sharing = [sum(1 for t in range(n) if t % len(pieces) == s % len(pieces)) for s in range(n)]
    return [Part((pieces[s % len(pieces)],), sharing[s], s // len(pieces)) for s in range(n)]


def _generate(
    shards: list[tuple[Part, ...]],
    corpora: tuple[Corpus, ...],
    shares: tuple[float, ...],
    encoder: Encoder,
    cutoff_len: int,
    on_bad_record: BadRecordPolicy,
    seed: int,
) -> Iterator[dict[str, Any]]:
    for parts in shards:
        rng = random.Random(f"{seed}-{parts}")
        sources = [
            _shuffled(_blocks(part, corpus, encoder, cutoff_len, on_bad_record), rng)
            for part, corpus in zip(parts, corpora)
        ]
        live = list(range(len(corpora)))
        ended: set[int] = set()
        order = weighted_order([shares[c] for c in live])
        while live:
            c = live[next(order)]
            block = next(sources[c], None)
            if block is None:
                ended.add(c)
                sources[c] = _shuffled(_blocks(parts[c], corpora[c], encoder, cutoff_len, on_bad_record), rng)
                block = next(sources[c], None)
                if block is None:  # no block of this corpus in this shard: the others share its turns
                    live.remove(c)
                    order = weighted_order([shares[i] for i in live])
                    continue
                if ended.issuperset(live):
                    break
            corpus = corpora[c]
            yield {
                "input_ids": block.tolist(),
                "lang_mask": [int(corpus.role == "old")] * cutoff_len,
                "lang_group": [corpus.group] * cutoff_len,
                "language": corpus.language,
            }


def _documents(part: Part, corpus: Corpus, on_bad_record: BadRecordPolicy) -> Iterator[str]:
    index = 0
    for piece in part.pieces:
        for text in read_piece(piece, corpus.text_column, on_bad_record=on_bad_record, corpus=corpus.name):
            if part.max_docs is not None and index >= part.max_docs:
                return
            if index % part.stride == part.offset:
                yield text
            index += 1


def _blocks(
    part: Part, corpus: Corpus, encoder: Encoder, cutoff_len: int, on_bad_record: BadRecordPolicy
) -> Iterator[np.ndarray]:
    """`(S,)` blocks of one corpus part: documents with EOS, concatenated, cut (the last partial one dropped)."""
    carry = np.empty(0, dtype=np.int64)
    texts: list[str] = []
    for text in _documents(part, corpus, on_bad_record):
        texts.append(text)
        if len(texts) == DOC_BATCH // 4:  # smaller batches: the stream starts sooner
            carry = yield from _cut(np.concatenate([carry, encoder.encode(texts)[0]]), cutoff_len)
            texts = []
    if texts:
        yield from _cut(np.concatenate([carry, encoder.encode(texts)[0]]), cutoff_len)


def _cut(ids: np.ndarray, cutoff_len: int) -> Iterator[np.ndarray]:
    """Yield the full blocks of `ids`; return the remainder."""
    n = len(ids) // cutoff_len
    yield from ids[: n * cutoff_len].reshape(n, cutoff_len)
    return ids[n * cutoff_len :]


def _shuffled(blocks: Iterator[np.ndarray], rng: random.Random) -> Iterator[np.ndarray]:
    buffer: list[np.ndarray] = []
    for block in blocks:
        if len(buffer) < BUFFER:
            buffer.append(block)
            continue
        i = rng.randrange(BUFFER)
        yield buffer[i]
        buffer[i] = block
    rng.shuffle(buffer)
    yield from buffer
