"""Tokenising and packing: exact per-token mask at document boundaries, cache reuse, streaming, collation."""

from __future__ import annotations

import pickle
import random
from pathlib import Path

import pytest
import torch

import moelpr.data.pack as pack
from moelpr.data import BlockCollator, Corpus, collate_blocks, tokenize_and_pack
from moelpr.errors import UserError

EOS = 1


def _corpus(name: str, path: Path, role: str, language: str | None = None, **kw) -> Corpus:
    return Corpus(name=name, paths=[str(path)], language=language or name, role=role, **kw)


def _ids(tokenizer, text: str) -> list[int]:
    return tokenizer(text, add_special_tokens=False)["input_ids"]


@pytest.fixture
def mixed(tmp_path, jsonl):
    """Old `en` (2 docs, 5 tokens with EOS), new `el` (group 1) and new `bn` (group 2)."""
    return [
        _corpus("en", jsonl(tmp_path / "en.jsonl", ["a b", "c"]), "old"),
        _corpus("el", jsonl(tmp_path / "el.jsonl", ["d e f"]), "new"),
        _corpus("bn", jsonl(tmp_path / "bn.jsonl", ["g h i j k"]), "new", group=2),
    ]


def test_mask_and_group_survive_packing_at_document_boundaries(tokenizer, mixed):
    a, b, c, d, e, f, g, h, i, j, k = (_ids(tokenizer, w)[0] for w in "a b c d e f g h i j k".split())
    ds = tokenize_and_pack(mixed, tokenizer, cutoff_len=4)
    # stream: a b </s> c </s> | d e f </s> | g h i j k </s>  = 15 tokens -> 3 blocks, 3 dropped
    assert ds["input_ids"] == [[a, b, EOS, c], [EOS, d, e, f], [EOS, g, h, i]]
    assert ds["lang_mask"] == [[1, 1, 1, 1], [1, 0, 0, 0], [0, 0, 0, 0]]  # en's EOS is an old-language token
    assert ds["lang_group"] == [[0, 0, 0, 0], [0, 1, 1, 1], [1, 2, 2, 2]]
    assert ds["language"] == ["en", "el", "bn"]  # the language with most tokens in the block
    assert {k: str(v.feature.dtype) for k, v in ds.features.items() if k != "language"} == {
        "input_ids": "int32",
        "lang_mask": "int8",
        "lang_group": "int8",
    }


def test_dominant_language_tie_goes_to_the_first_corpus(tokenizer, tmp_path, jsonl):
    corpora = [
        _corpus("en", jsonl(tmp_path / "en.jsonl", ["a"]), "old"),
        _corpus("el", jsonl(tmp_path / "el.jsonl", ["b"]), "new"),
    ]
    ds = tokenize_and_pack(corpora, tokenizer, cutoff_len=4)
    assert (ds["lang_mask"], ds["language"]) == ([[1, 1, 0, 0]], ["en"])


def test_max_docs_limits_each_corpus(tokenizer, tmp_path, jsonl):
    corpora = [
        _corpus("en", jsonl(tmp_path / "en.jsonl", ["a", "b", "c", "d"]), "old", max_docs=2),
        _corpus("el", jsonl(tmp_path / "el.jsonl", ["e", "f"]), "new"),
    ]
    ds = tokenize_and_pack(corpora, tokenizer, cutoff_len=2)
    assert [row[0] for row in ds["input_ids"]] == [_ids(tokenizer, w)[0] for w in "a b e f".split()]


def _random_corpora(tmp_path: Path, jsonl) -> list[Corpus]:
    rng = random.Random(0)
    words = "a b c d e f g h i j k l m n o p".split()

    def docs(n: int) -> list[str]:
        return [" ".join(rng.choices(words, k=rng.randint(1, 12))) for _ in range(n)]

    return [
        _corpus("en", jsonl(tmp_path / "en.jsonl", docs(40)), "old"),
        _corpus("el", jsonl(tmp_path / "el.jsonl.gz", docs(30), gz=True), "new"),
        Corpus(
            name="hu",
            paths=[str(jsonl(tmp_path / f"hu{i}.jsonl", docs(n))) for i, n in ((1, 7), (2, 9))],
            language="hu",
            role="new",
            group=2,
        ),
    ]


def test_streaming_equals_non_streaming(tokenizer, tmp_path, jsonl, monkeypatch):
    monkeypatch.setattr(pack, "DOC_BATCH", 7)  # many batches, so blocks straddle batch boundaries
    corpora = _random_corpora(tmp_path, jsonl)
    ds = tokenize_and_pack(corpora, tokenizer, cutoff_len=16)
    stream = tokenize_and_pack(corpora, tokenizer, cutoff_len=16, streaming=True)
    assert type(stream).__name__ == "IterableDataset"
    assert list(stream) == list(ds)
    assert len(ds) > 10 and set(ds["language"]) == {"en", "el", "hu"}
    expected = [t for c in corpora for p in c.paths for t in _doc_tokens(tokenizer, p)]
    assert [t for row in ds["input_ids"] for t in row] == expected[: len(ds) * 16]  # plain concatenation


def _doc_tokens(tokenizer, path: str) -> list[int]:
    from moelpr.data import iter_documents

    corpus = Corpus(name="x", paths=[path], language="x", role="new")
    return [t for doc in iter_documents(corpus) for t in _ids(tokenizer, doc) + [EOS]]


def test_multiprocess_tokenisation_and_seeded_shuffle(tokenizer, tmp_path, jsonl):
    corpora = _random_corpora(tmp_path, jsonl)
    ds = tokenize_and_pack(corpora, tokenizer, cutoff_len=16)
    assert list(tokenize_and_pack(corpora, tokenizer, cutoff_len=16, num_proc=2)) == list(ds)
    shuffled = tokenize_and_pack(corpora, tokenizer, cutoff_len=16, seed=22)
    again = tokenize_and_pack(corpora, tokenizer, cutoff_len=16, seed=22)
    assert list(shuffled) == list(again) != list(ds)
    assert sorted(shuffled["input_ids"]) == sorted(ds["input_ids"])


def test_cache_is_reused_and_keyed_on_file_content(tokenizer, tmp_path, jsonl, monkeypatch):
    corpora = _random_corpora(tmp_path, jsonl)
    cache = tmp_path / "cache"
    first = tokenize_and_pack(corpora, tokenizer, cutoff_len=16, cache_dir=cache)
    (entry,) = cache.iterdir()  # one entry, no leftover work directory
    assert (entry / pack.META_FILE).is_file()
    assert all(Path(f["filename"]).parent == entry for f in first.cache_files)  # memory-mapped from the cache

    def no_rebuild(*args, **kwargs):
        raise AssertionError("re-tokenised although the cache is valid")

    with monkeypatch.context() as m:
        m.setattr(pack, "_build", no_rebuild)
        second = tokenize_and_pack(corpora, tokenizer, cutoff_len=16, cache_dir=cache, seed=None)
    assert list(second) == list(first)

    calls = []
    real_build = pack._build
    monkeypatch.setattr(pack, "_build", lambda *a, **k: calls.append(1) or real_build(*a, **k))
    tokenize_and_pack(corpora, tokenizer, cutoff_len=8, cache_dir=cache)  # another cutoff_len: new entry
    jsonl(tmp_path / "en.jsonl", ["a b c"] * 20)  # changed content: new entry
    tokenize_and_pack(corpora, tokenizer, cutoff_len=16, cache_dir=cache)
    assert len(calls) == 2 and len(list(cache.iterdir())) == 3


def test_failed_build_leaves_no_cache_entry(tokenizer, tmp_path, jsonl):
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"text": "a b c d"}\n{oops\n{"text": "e f g h"}\n')
    corpora = [_corpus("en", bad, "old")]
    cache = tmp_path / "cache"
    with pytest.raises(UserError, match=r"bad\.jsonl:2: malformed JSON"):
        tokenize_and_pack(corpora, tokenizer, cutoff_len=4, cache_dir=cache)
    assert list(cache.iterdir()) == []
    ds = tokenize_and_pack(corpora, tokenizer, cutoff_len=5, cache_dir=cache, on_bad_record="skip")
    assert len(ds) == 2 and len(list(cache.iterdir())) == 1


def test_bad_arguments(tokenizer, tmp_path, jsonl, mixed):
    with pytest.raises(UserError, match="fewer than cutoff_len=100"):
        tokenize_and_pack(mixed, tokenizer, cutoff_len=100)
    with pytest.raises(UserError, match="fewer than cutoff_len=100"):
        list(tokenize_and_pack(mixed, tokenizer, cutoff_len=100, streaming=True))
    with pytest.raises(UserError, match="cutoff_len must be a positive integer"):
        tokenize_and_pack(mixed, tokenizer, cutoff_len=0)
    with pytest.raises(UserError, match="num_proc must be a positive integer"):
        tokenize_and_pack(mixed, tokenizer, cutoff_len=4, num_proc=0)
    with pytest.raises(UserError, match="unknown on_bad_record"):
        tokenize_and_pack(mixed, tokenizer, cutoff_len=4, on_bad_record="warn")
    with pytest.raises(UserError, match="duplicate corpus name 'en'"):
        tokenize_and_pack([mixed[0], mixed[0]], tokenizer, cutoff_len=4)
    with pytest.raises(UserError, match="non-empty list of Corpus"):
        tokenize_and_pack([], tokenizer, cutoff_len=4)
    no_eos = tokenizer.__class__(tokenizer_object=tokenizer.backend_tokenizer)
    with pytest.raises(UserError, match="tokenizer has no eos_token"):
        tokenize_and_pack(mixed, no_eos, cutoff_len=4)


# --------------------------------------------------------------------------------------------- collation


def test_collate_blocks_builds_model_batches(tokenizer, mixed):
    rows = list(tokenize_and_pack(mixed, tokenizer, cutoff_len=4))
    batch = collate_blocks(rows, pad_token_id=EOS)  # pad = eos, like Qwen1.5: EOS is never a target
    assert set(batch) == {"input_ids", "attention_mask", "labels", "lang_mask", "lang_group"}
    assert all(t.shape == (3, 4) and t.dtype == torch.long for t in batch.values())
    assert batch["input_ids"].tolist() == [r["input_ids"] for r in rows]
    assert batch["attention_mask"].eq(1).all()
    assert batch["labels"].tolist() == [[t if t != EOS else -100 for t in r["input_ids"]] for r in rows]
    assert batch["lang_mask"].tolist() == [[1, 1, 1, 1], [1, 0, 0, 0], [0, 0, 0, 0]]
    assert batch["lang_group"][2].tolist() == [1, 2, 2, 2]
    kept = collate_blocks(rows, pad_token_id=EOS, mask_pad_in_labels=False)
    assert kept["labels"].equal(kept["input_ids"])
    assert collate_blocks(rows)["labels"].equal(batch["input_ids"])  # no pad id: nothing masked


def test_collator_errors_and_dataloader(tokenizer, mixed):
    ds = tokenize_and_pack(mixed, tokenizer, cutoff_len=4)
    with pytest.raises(UserError, match="mask_pad_in_labels needs a pad_token_id"):
        collate_blocks(list(ds), mask_pad_in_labels=True)
    with pytest.raises(UserError, match="blocks differ in input_ids length"):
        collate_blocks([ds[0], {**ds[1], "input_ids": ds[1]["input_ids"][:3]}])
    with pytest.raises(UserError, match="empty batch"):
        collate_blocks([])
    collator = pickle.loads(pickle.dumps(BlockCollator(pad_token_id=tokenizer.pad_token_id)))
    loader = torch.utils.data.DataLoader(ds, batch_size=2, collate_fn=collator)
    assert [b["input_ids"].shape for b in loader] == [(2, 4), (1, 4)]
