"""Mixing by weight: exact proportions over a prepared epoch (interleaved, O(#corpora) index), token budgets and
epochs, and a streamed mixture read by 2 dataloader workers where every 1,000-block window holds the weights."""

from __future__ import annotations

import random
from collections import Counter

import pytest
import torch

from moelpr.data import BlockCollator, Corpus, PreparedDataset, training_dataset
from moelpr.data.mix import Mixture, apportion
from moelpr.data.prepare import prepare
from moelpr.errors import UserError

WORDS = "a b c d e f g h i j k l m n o p".split()


def _docs(n: int, seed: int) -> list[str]:
    rng = random.Random(seed)
    return [" ".join(rng.choices(WORDS, k=rng.randint(3, 12))) for _ in range(n)]


@pytest.fixture
def two(tmp_path, jsonl):
    """Old `en` (about twice the size) and new `el`, as two corpora (by lang_mask: 1 = en)."""
    return [
        Corpus(name="en", paths=[str(jsonl(tmp_path / "en.jsonl", _docs(2400, 0)))], language="en", role="old"),
        Corpus(name="el", paths=[str(jsonl(tmp_path / "el.jsonl", _docs(1200, 1)))], language="el", role="new"),
    ]


def test_mixture_is_a_bijection_spread_evenly():
    rng = random.Random(0)
    for _ in range(50):
        counts = [rng.randint(1, 300) for _ in range(rng.randint(1, 5))]
        mixture = Mixture(counts, [max(1, c // 2) for c in counts])
        order = [mixture.locate(i)[0] for i in range(len(mixture))]
        assert Counter(order) == dict(enumerate(counts))
        for start in range(0, len(order) - 100, 37):  # any window is within a few blocks of the shares
            window = Counter(order[start : start + 100])
            for c, n in enumerate(counts):
                assert abs(window[c] - 100 * n / len(order)) <= len(counts) + 1
    assert apportion(10, [1, 3]) == [3, 7] and sum(apportion(1001, [1, 1, 1])) == 1001


def _shares(ds) -> tuple[int, int]:
    old = sum(int(ds[i]["lang_mask"][0]) for i in range(len(ds)))
    return old, len(ds) - old


def test_prepared_epoch_matches_the_weights_exactly(tokenizer, two, tmp_path):
    root = prepare(two, tokenizer, tmp_path / "out", cutoff_len=8, progress=False)
    natural = PreparedDataset(root)
    blocks = dict(zip(["en", "el"], natural.mixture.blocks))
    assert natural.corpus_blocks == blocks and blocks["en"] > 1.5 * blocks["el"]  # without weights: by size
    total = sum(blocks.values())
    weighted = PreparedDataset(root, mix={"en": {"weight": 1}, "el": {"weight": 3}})
    assert len(weighted) == total and _shares(weighted) == tuple(apportion(total, [1, 3]))
    window = [int(weighted[i]["lang_mask"][0]) for i in range(400)]
    assert all(abs(sum(window[s : s + 100]) - 25) <= 2 for s in range(300))  # interleaved
    ids = [weighted[i]["input_ids"].tolist() for i in range(len(weighted)) if weighted[i]["language"] == "en"]
    assert len({tuple(x) for x in ids}) == len(ids)  # en is subsampled: distinct blocks, none repeated
    budget = PreparedDataset(root, mix={"en": {"tokens": 80}, "el": {"epochs": 2}})
    assert _shares(budget) == (10, 2 * blocks["el"])
    with pytest.raises(UserError, match=r"corpus 'en' gets no block of 8 tokens in the mixture"):
        PreparedDataset(root, mix={"en": {"tokens": 7}, "el": {}})


def test_weights_come_from_the_corpora_or_the_recipe(tokenizer, two, tmp_path):
    en, el = two
    weighted = [Corpus(**{**en.__dict__, "weight": 1}), Corpus(**{**el.__dict__, "weight": 3})]
    ds = training_dataset(weighted, tokenizer, cutoff_len=8, cache_dir=tmp_path / "cache")
    assert _shares(ds) == tuple(apportion(len(ds), [1, 3]))
    again = training_dataset(two, tokenizer, cutoff_len=8, cache_dir=tmp_path / "cache", weights={"en": 3, "el": 1})
    assert len(list((tmp_path / "cache").iterdir())) == 1  # the weights do not change the prepared data
    assert _shares(again) == tuple(apportion(len(again), [3, 1]))
    with pytest.raises(UserError, match=r"weights gives no weight for corpus 'el'"):
        training_dataset(two, tokenizer, cutoff_len=8, cache_dir=tmp_path / "cache", weights={"en": 1})
    with pytest.raises(UserError, match=r"corpus 'el' has no weight but 'en' has one"):
        training_dataset([weighted[0], el], tokenizer, cutoff_len=8, cache_dir=tmp_path / "cache")


def test_stream_read_by_two_workers_holds_the_weights_in_every_window(tokenizer, two):
    en, el = two
    weighted = [Corpus(**{**en.__dict__, "weight": 1}), Corpus(**{**el.__dict__, "weight": 3})]
    stream = training_dataset(weighted, tokenizer, cutoff_len=8, streaming=True, num_shards=2, seed=3)
    assert stream.n_shards == 2  # ≥ the workers: no "Too many dataloader workers" (each worker mixes its own)
    loader = torch.utils.data.DataLoader(stream, batch_size=10, num_workers=2, collate_fn=BlockCollator(), timeout=120)
    old = []
    for batch in loader:
        old += batch["lang_mask"][:, 0].tolist()
        if len(old) >= 5000:
            break
    assert len(old) == 5000
    shares = [sum(old[s : s + 1000]) / 1000 for s in range(0, 4001, 10)]
    assert max(abs(x - 0.25) for x in shares) <= 0.01, (min(shares), max(shares))
    unweighted = training_dataset(two, tokenizer, cutoff_len=8, streaming=True, num_shards=2)
    first = [row["lang_mask"][0] for _, row in zip(range(600), unweighted)]
    assert abs(sum(first) / 600 - 2 / 3) < 0.05  # by size (en has twice the bytes), interleaved from the start
    with pytest.raises(UserError, match=r"tokens: and epochs: need a prepared dataset"):
        training_dataset([Corpus(**{**en.__dict__, "epochs": 2})], tokenizer, cutoff_len=8, streaming=True)
