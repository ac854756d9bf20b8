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


class Encoder:
    """Text batches → one flat id array with EOS after every document, and the documents' lengths."""

    def __init__(self, tokenizer: Any):
        eos_id = getattr(tokenizer, "eos_token_id", None)
        if eos_id is None:
            raise UserError("the tokenizer has no eos_token; set tokenizer.eos_token (it ends every packed document)")
        self.eos_id = int(eos_id)
        self.vocab_size = len(tokenizer)
        self._backend = _plain_backend(tokenizer)
        self._definition = self._backend.to_str() if self._backend is not None else None
        self.fingerprint = tokenizer_fingerprint(tokenizer, self._definition)
        self._split_special = bool(getattr(tokenizer, "split_special_tokens", False))
        self._slow = tokenizer if self._backend is None else None
        if self._backend is not None:
            self._backend.encode_special_tokens = self._split_special

    def __getstate__(self) -> dict[str, Any]:
        return {**self.__dict__, "_backend": None}  # the Rust object is rebuilt from its JSON in each process

    def _ids(self, texts: list[str]) -> list[list[int]]:
        if self._slow is not None:
            return self._slow(texts, add_special_tokens=False, return_attention_mask=False, verbose=False)["input_ids"]
        if self._backend is None:
            from tokenizers import Tokenizer

            self._backend = Tokenizer.from_str(self._definition)
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


def _plain_backend(tokenizer: Any) -> Any:
    """A copy of the backend without padding and truncation (which do not change these ids); None for a Python one."""
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is None:
        return None
    from tokenizers import Tokenizer

    plain = Tokenizer.from_str(backend.to_str())
    plain.no_truncation()
    plain.no_padding()
    return plain


def tokenizer_fingerprint(tokenizer: Any, definition: str | None = None) -> str:
    """Hash of what decides the ids: the backend definition (fast tokenizers; else class and vocabulary), EOS id."""
    if definition is None and (plain := _plain_backend(tokenizer)) is not None:
        definition = plain.to_str()
    if definition is None:  # a Python tokenizer: its class is part of what it does
        definition = type(tokenizer).__name__ + json.dumps(sorted(tokenizer.get_vocab().items()))
    extra = f"{tokenizer.eos_token_id}:{getattr(tokenizer, 'split_special_tokens', False)}"
    return hashlib.sha256(definition.encode() + extra.encode()).hexdigest()
