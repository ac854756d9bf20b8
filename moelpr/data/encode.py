"""Tokenising documents as packing needs them: no special tokens, EOS appended, one flat id array per batch.

`Encoder` carries a fast tokenizer as its `tokenizers` JSON definition, so it crosses into worker processes
without transformers and encodes with the backend's `encode_batch_fast` (what `tokenizer(texts)` runs,
minus the offsets and Python-side conversion). Tokenizers without a Rust backend are called as they are.
"""

from __future__ import annotations

import hashlib
import itertools
import json
from typing import Any

import numpy as np

from moelpr.errors import UserError

# Settings of a backend tokenizer that do not change the ids of `encode(text, add_special_tokens=False)`.
_NOT_IDS = ("padding", "truncation")


class Encoder:
    """Text batches → one flat id array with EOS after every document, and the documents' lengths."""

    def __init__(self, tokenizer: Any):
        eos_id = getattr(tokenizer, "eos_token_id", None)
        if eos_id is None:
            raise UserError("the tokenizer has no eos_token; set tokenizer.eos_token (it ends every packed document)")
        self.eos_id = int(eos_id)
        self.vocab_size = len(tokenizer)
        self.fingerprint = tokenizer_fingerprint(tokenizer)
        backend = getattr(tokenizer, "backend_tokenizer", None)
        self._definition = backend.to_str() if backend is not None else None
        self._split_special = bool(getattr(tokenizer, "split_special_tokens", False))
        self._slow = tokenizer if backend is None else None
        self._backend = None

    def __getstate__(self) -> dict[str, Any]:
        return {**self.__dict__, "_backend": None}  # the Rust object is rebuilt from its JSON in each process

    def _ids(self, texts: list[str]) -> list[list[int]]:
        if self._slow is not None:
            return self._slow(texts, add_special_tokens=False, return_attention_mask=False, verbose=False)["input_ids"]
        if self._backend is None:
            from tokenizers import Tokenizer

            self._backend = Tokenizer.from_str(self._definition)
            self._backend.no_truncation()
            self._backend.no_padding()
            self._backend.encode_special_tokens = self._split_special
        return [e.ids for e in self._backend.encode_batch_fast(texts, add_special_tokens=False)]

    def encode(self, texts: list[str]) -> tuple[np.ndarray, np.ndarray]:
        """(ids `(T,)` int64 with EOS after each document, document lengths `(D,)` counting their EOS)."""
        ids = self._ids(texts)
        lengths = np.fromiter((len(x) + 1 for x in ids), np.int64, count=len(ids))  # (D,)
        eos = (self.eos_id,)
        flat = np.fromiter(
            itertools.chain.from_iterable(itertools.chain(x, eos) for x in ids), np.int64, count=int(lengths.sum())
        )  # (T,)
        return flat, lengths


def tokenizer_fingerprint(tokenizer: Any) -> str:
    """Hash of what decides the ids: the backend definition (fast tokenizers; else class and vocabulary), EOS id."""
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is not None:
        definition = json.loads(backend.to_str())
        definition = json.dumps({k: v for k, v in definition.items() if k not in _NOT_IDS}, sort_keys=True)
    else:  # a Python tokenizer: its class is part of what it does
        definition = type(tokenizer).__name__ + json.dumps(sorted(tokenizer.get_vocab().items()))
    extra = f"{tokenizer.eos_token_id}:{getattr(tokenizer, 'split_special_tokens', False)}"
    return hashlib.sha256(definition.encode() + extra.encode()).hexdigest()
