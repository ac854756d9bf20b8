"""Helpers for the export / generation tests: tiny trained-like MoE-LPR models and a word tokenizer."""

from __future__ import annotations

import torch
from tiny import VOCAB, tiny_model

import moelpr


def word_tokenizer():
    """Word-level fast tokenizer with ids < VOCAB: `<pad>` 0, `<unk>` 1, `<s>` 2, `</s>` 3, then w4 … w127."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {"<pad>": 0, "<unk>": 1, "<s>": 2, "</s>": 3}
    vocab.update({f"w{i}": i for i in range(4, VOCAB)})
    backend = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    backend.decoder = decoders.WordPiece(prefix="##")  # joins words with spaces
    return PreTrainedTokenizerFast(tokenizer_object=backend, unk_token="<unk>", pad_token="<pad>",
                                   bos_token="<s>", eos_token="</s>")


def trained_moe(arch: str = "llama", num_experts=4, top_k: int = 2, seed: int = 0, **overrides):
    """An upcycled tiny model whose new experts and routers are perturbed (as training would), in eval mode."""
    moe = moelpr.upcycle(tiny_model(arch, seed=seed, **overrides), num_experts=num_experts, top_k=top_k)
    gen = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():
        for p in moe.parameters():
            if p.requires_grad:
                p.add_(torch.randn(p.shape, generator=gen) * 0.05)
    return moe.eval()
