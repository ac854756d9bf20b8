"""Fixtures for the evaluation tests: a byte-level BPE tokenizer that adds BOS itself, tiny saved models.

The tokenizer adds `<s>` through its post-processor, like Llama's: exactly the case of lm-eval's double-BOS
pitfall in rolling loglikelihood (the tokenizer's BOS kept and the window's prefix token prepended: BOS→BOS
scored; the lm-eval #3333 family), so the agreement tests would catch it.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

SENTENCES = {
    "en": [
        "The cat sat on the mat and looked at the birds.",
        "A quick brown fox jumps over the lazy dog.",
        "Rivers flow to the sea; the sea gives rain back to the hills.",
    ],
    "es": ["El gato se sentó en la alfombra y miró a los pájaros.", "Mañana lloverá en la montaña del norte."],
    "el": ["Η γάτα κάθισε στο χαλί και κοίταξε τα πουλιά.", "Αύριο θα βρέξει στο βουνό του βορρά."],
    "hu": ["A macska leült a szőnyegre és nézte a madarakat.", "Holnap esni fog az északi hegyen."],
}


@pytest.fixture(scope="session")
def tokenizer():
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    backend = Tokenizer(models.BPE(unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    backend.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=400,
        special_tokens=["<s>", "</s>", "<pad>", "<unk>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
    )
    backend.train_from_iterator([s for texts in SENTENCES.values() for s in texts], trainer)
    backend.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", 0)])
    tok = PreTrainedTokenizerFast(
        tokenizer_object=backend, bos_token="<s>", eos_token="</s>", pad_token="<pad>", unk_token="<unk>"
    )
    assert tok("hi")["input_ids"][0] == tok.bos_token_id == 0  # the tokenizer adds BOS by itself
    return tok


def _dense(tokenizer, seed: int = 0, context: int = 24):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    config = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=context,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    return LlamaForCausalLM(config).eval()


@pytest.fixture(scope="session")
def dense_model(tokenizer):
    """A tiny Llama with a 24-token context, so a sentence or two already needs several rolling windows."""
    return _dense(tokenizer)


@pytest.fixture(scope="session")
def moe_model(tokenizer):
    """A tiny MoE-LPR model (3 experts, top-2) whose new experts differ from the original one."""
    import moelpr

    moe = moelpr.upcycle(_dense(tokenizer), num_experts=3, top_k=2)
    torch.manual_seed(1)
    with torch.no_grad():
        for p in moe.parameters():
            if p.requires_grad:
                p.add_(torch.randn_like(p) * 0.5)
    return moe.eval()


@pytest.fixture(scope="session")
def dense_dir(tmp_path_factory, dense_model, tokenizer) -> Path:
    path = tmp_path_factory.mktemp("models") / "dense"
    dense_model.save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path


@pytest.fixture(scope="session")
def moe_dir(tmp_path_factory, moe_model, tokenizer) -> Path:
    import moelpr

    path = tmp_path_factory.mktemp("models") / "moe"
    moelpr.save_model(moe_model, path, format="full", tokenizer=tokenizer)
    return path


def _documents() -> dict[str, list[str]]:
    return {
        "en": [SENTENCES["en"][0], " ".join(SENTENCES["en"]) * 2, "Birds sing."],
        "es": [" ".join(SENTENCES["es"]) * 2, SENTENCES["es"][1]],
        "el": [SENTENCES["el"][0], " ".join(SENTENCES["el"])],
        "hu": [" ".join(SENTENCES["hu"])],
    }


ROLES = {"en": "old", "es": "old", "el": "new", "hu": "new"}


@pytest.fixture()
def texts() -> dict[str, list[str]]:
    """Held-out documents per language: short ones and long ones (several windows of 24 tokens)."""
    return _documents()


@pytest.fixture()
def roles() -> dict[str, str]:
    return dict(ROLES)


@pytest.fixture()
def corpora_file(tmp_path) -> Path:
    """A corpora YAML with one JSONL file per language (en, es old; el, hu new)."""
    import yaml

    entries = []
    for lang, docs in _documents().items():
        path = tmp_path / "heldout" / f"{lang}.jsonl"
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text("".join(json.dumps({"text": d}, ensure_ascii=False) + "\n" for d in docs), encoding="utf-8")
        entries.append({"name": f"{lang}-heldout", "path": str(path), "language": lang, "role": ROLES[lang]})
    spec = tmp_path / "heldout.yaml"
    spec.write_text(yaml.safe_dump(entries, allow_unicode=True), encoding="utf-8")
    return spec
