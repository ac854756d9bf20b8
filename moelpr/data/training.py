"""The datasets a training run reads: `training_dataset` (what `moelpr.train` calls) and `validation_datasets`.

Raw corpora go through the same preparation as `moe-lpr prepare`, into a cache directory keyed by their
content (`cache_dir`, by default a `moelpr` folder in the `datasets` cache), and are memory-mapped from there.
Under a multi-process launch every process of a machine prepares its share of the shards at once and then
waits for the others' shard files (a file poll, not a collective that can time out); a dataset prepared
beforehand (`prepared:`) is only opened.
"""

from __future__ import annotations

import dataclasses
import os
import sys
from pathlib import Path
from typing import Any

from moelpr.data.corpus import BadRecordPolicy, Corpus, check_mixing, load_corpora
from moelpr.data.prepare import prepare
from moelpr.data.prepared import PreparedDataset, prepared_corpora
from moelpr.errors import UserError


def default_cache_dir() -> Path:
    """Where prepared data for raw corpora goes without `cache_dir`: `<datasets cache>/moelpr`."""
    import datasets

    return Path(datasets.config.HF_DATASETS_CACHE) / "moelpr"


def launch_share() -> tuple[int, int]:
    """(this process' rank, processes) among those a launcher (torchrun, accelerate, deepspeed) started on this
    machine; (0, 1) when run alone."""
    env = os.environ
    if "LOCAL_WORLD_SIZE" in env:
        return int(env.get("LOCAL_RANK", 0)), int(env["LOCAL_WORLD_SIZE"])
    return int(env.get("RANK", 0)), int(env.get("WORLD_SIZE", 1))  # one machine, or a shared filesystem


def training_dataset(
    corpora: list[Corpus],
    tokenizer: Any,
    *,
    cutoff_len: int,
    prepared: str | os.PathLike | None = None,
    cache_dir: str | os.PathLike | None = None,
    streaming: bool = False,
    seed: int = 0,
    num_proc: int = 1,
    on_bad_record: BadRecordPolicy = "error",
    weights: dict[str, float] | None = None,
    num_shards: int = 1,
) -> Any:
    """The training data: a map-style `PreparedDataset` (memory-mapped, one epoch mixed by weight; the Trainer
    shuffles it) or, with `streaming`, a `datasets.IterableDataset` with `num_shards` shards.

    Args:
        corpora: the corpora to train on (from the corpora spec, or `prepared_corpora(prepared)`, after the
            stage's selection).
        tokenizer: the model's tokenizer.
        cutoff_len: tokens per block.
        prepared: a directory made by `moe-lpr prepare` holding `corpora` (then nothing is tokenised).
        cache_dir: where raw corpora are prepared (default `default_cache_dir()`).
        streaming: read, tokenise and pack on the fly instead (raw corpora only).
        seed: the stream's shuffle buffers.
        num_proc: tokenising processes (shared by the processes of a multi-process launch).
        on_bad_record: "error" or "skip" malformed records.
        weights: corpus name → weight, replacing the corpora's own mixing settings.
        num_shards: the stream's shards (at least the dataloader workers).
    """
    if weights is not None:
        corpora = _weighted(corpora, weights)
    if prepared is not None:
        if streaming:
            raise UserError("prepared data is memory-mapped, not streamed; drop streaming: true or prepared:")
        mix = {c.name: c.mix for c in corpora}
        return PreparedDataset(prepared, corpora=list(mix), mix=mix, tokenizer=tokenizer, cutoff_len=cutoff_len)
    if streaming:
        from moelpr.data.stream import stream_dataset

        return stream_dataset(
            corpora, tokenizer, cutoff_len=cutoff_len, num_shards=num_shards, seed=seed, on_bad_record=on_bad_record
        )
    root = _prepared_in_cache(corpora, tokenizer, cutoff_len, cache_dir, num_proc, on_bad_record, progress=True)
    mix = {c.name: c.mix for c in corpora}
    return PreparedDataset(root, corpora=list(mix), mix=mix)


def _prepared_in_cache(
    corpora: list[Corpus],
    tokenizer: Any,
    cutoff_len: int,
    cache_dir: str | os.PathLike | None,
    num_proc: int,
    on_bad_record: BadRecordPolicy,
    *,
    progress: bool,
) -> Path:
    """Raw corpora prepared into the cache (`cache_dir`, else `default_cache_dir()`), this process taking its share
    of the shards of a multi-process launch; the progress bar on the first process of a terminal."""
    rank, world = launch_share()
    return prepare(
        corpora,
        tokenizer,
        cache_dir=cache_dir if cache_dir is not None else default_cache_dir(),
        cutoff_len=cutoff_len,
        num_proc=max(1, num_proc // world),
        on_bad_record=on_bad_record,
        progress=progress and rank == 0 and sys.stderr.isatty(),
        rank=rank,
        world=world,
    )


def _weighted(corpora: list[Corpus], weights: Any) -> list[Corpus]:
    """The corpora with `weights` (name → weight) as their only mixing setting."""
    if not isinstance(weights, dict) or not weights:
        raise UserError(f"weights must map corpus names to numbers, e.g. {{el: 1, hu: 1, tr: 2}}; got {weights!r}")
    names = {c.name for c in corpora}
    missing = [n for n in names if n not in weights]
    if missing:
        raise UserError(f"weights gives no weight for corpus {sorted(missing)[0]!r}; weigh every corpus trained on")
    out = [dataclasses.replace(c, weight=weights[c.name], tokens=None, epochs=None) for c in corpora]
    check_mixing(out)
    return out


def validation_datasets(
    source: str | os.PathLike | list[Corpus],
    tokenizer: Any,
    *,
    cutoff_len: int,
    cache_dir: str | os.PathLike | None = None,
    num_proc: int = 1,
    on_bad_record: BadRecordPolicy = "error",
) -> dict[str, PreparedDataset]:
    """Language → its validation blocks (each block once, in order), from a corpora spec, a list of corpora
    or a prepared directory; raw corpora are prepared into the cache as training data is."""
    if isinstance(source, (str, os.PathLike)) and Path(source).is_dir():
        root, corpora = Path(source), prepared_corpora(source)
        check = {"tokenizer": tokenizer, "cutoff_len": cutoff_len}
    else:
        corpora = source if isinstance(source, list) else load_corpora(source)
        root = _prepared_in_cache(corpora, tokenizer, cutoff_len, cache_dir, num_proc, on_bad_record, progress=False)
        check = {}
    languages = dict.fromkeys(c.language for c in corpora)
    return {
        lang: PreparedDataset(
            root, corpora=[c.name for c in corpora if c.language == lang], mix={c.name: {} for c in corpora}, **check
        )
        for lang in languages
    }
