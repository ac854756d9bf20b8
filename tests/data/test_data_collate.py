"""Batching prepared blocks into the tensors `MoELPRForCausalLM.forward` takes."""

from __future__ import annotations

import pickle

import pytest
import torch

from moelpr.data import BlockCollator, Corpus, PreparedDataset, collate_blocks
from moelpr.data.prepare import prepare
from moelpr.errors import UserError

EOS = 1


@pytest.fixture
def rows(tokenizer, tmp_path, jsonl) -> list[dict]:
    """One block each of old `en`, new `el` (group 1) and new `bn` (group 2), cutoff_len 4."""
    corpora = [
        Corpus(name="en", paths=[str(jsonl(tmp_path / "en.jsonl", ["a b", "c"]))], language="en", role="old"),
        Corpus(name="el", paths=[str(jsonl(tmp_path / "el.jsonl", ["d e f"]))], language="el", role="new"),
        Corpus(name="bn", paths=[str(jsonl(tmp_path / "bn.jsonl", ["g h i"]))], language="bn", role="new", group=2),
    ]
    ds = PreparedDataset(prepare(corpora, tokenizer, tmp_path / "out", cutoff_len=4, progress=False))
    return sorted((ds[i] for i in range(len(ds))), key=lambda r: ["en", "el", "bn"].index(r["language"]))


def test_collate_blocks_builds_model_batches(tokenizer, rows):
    a, b, c, d, e, f, g, h, i = (tokenizer(w, add_special_tokens=False)["input_ids"][0] for w in "abcdefghi")
    batch = collate_blocks(rows, pad_token_id=EOS)  # pad = eos, like Qwen1.5: EOS is never a target
    assert set(batch) == {"input_ids", "attention_mask", "labels", "lang_mask", "lang_group"}
    assert all(t.shape == (3, 4) and t.dtype == torch.long for t in batch.values())
    assert batch["input_ids"].tolist() == [[a, b, EOS, c], [d, e, f, EOS], [g, h, i, EOS]]
    assert batch["attention_mask"].eq(1).all()
    assert batch["labels"].tolist() == [[a, b, -100, c], [d, e, f, -100], [g, h, i, -100]]
    assert batch["lang_mask"].tolist() == [[1] * 4, [0] * 4, [0] * 4]
    assert batch["lang_group"].tolist() == [[0] * 4, [1] * 4, [2] * 4]
    kept = collate_blocks(rows, pad_token_id=EOS, mask_pad_in_labels=False)
    assert kept["labels"].equal(kept["input_ids"])
    assert collate_blocks(rows)["labels"].equal(batch["input_ids"])  # no pad id: nothing masked


def test_collator_errors_and_dataloader(tokenizer, rows):
    with pytest.raises(UserError, match="mask_pad_in_labels needs a pad_token_id"):
        collate_blocks(rows, mask_pad_in_labels=True)
    with pytest.raises(UserError, match="blocks differ in input_ids length"):
        collate_blocks([rows[0], {**rows[1], "input_ids": rows[1]["input_ids"][:3]}])
    with pytest.raises(UserError, match="empty batch"):
        collate_blocks([])
    collator = pickle.loads(pickle.dumps(BlockCollator(pad_token_id=tokenizer.pad_token_id)))
    loader = torch.utils.data.DataLoader(rows, batch_size=2, collate_fn=collator)
    assert [b["input_ids"].shape for b in loader] == [(2, 4), (1, 4)]
