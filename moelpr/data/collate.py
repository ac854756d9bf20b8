"""Batch packed blocks into the tensors `MoELPRForCausalLM.forward` takes."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Mapping, Sequence

import torch

from moelpr.errors import UserError

IGNORE_INDEX = -100  # labels with this value are not targets (torch cross-entropy's ignore_index)
_COLUMNS = ("input_ids", "lang_mask", "lang_group")


def collate_blocks(
    features: Sequence[Mapping[str, Any]], *, pad_token_id: int | None = None, mask_pad_in_labels: bool | None = None
) -> dict[str, torch.Tensor]:
    """Stack packed blocks into `input_ids`, `attention_mask`, `labels`, `lang_mask`, `lang_group`, all `(B, S)`.

    Blocks are full, so `attention_mask` is all ones. `labels` equal `input_ids` (the model shifts them), except
    that with `mask_pad_in_labels` tokens equal to `pad_token_id` become -100, as the official collator
    (`DataCollatorForLanguageModeling(mlm=False)`) does; when pad = eos this means EOS is never a target.

    Args:
        features: rows of a packed dataset (extra columns such as `language` are ignored).
        pad_token_id: the tokenizer's pad id.
        mask_pad_in_labels: default: True when `pad_token_id` is given.
    """
    if not features:
        raise UserError("cannot collate an empty batch")
    if mask_pad_in_labels is None:
        mask_pad_in_labels = pad_token_id is not None
    if mask_pad_in_labels and pad_token_id is None:
        raise UserError("mask_pad_in_labels needs a pad_token_id; pass the tokenizer's pad id or set it False")
    batch = {}
    for name in _COLUMNS:
        rows = [torch.as_tensor(f[name], dtype=torch.long) for f in features]  # each (S,)
        if len({r.shape for r in rows}) != 1 or rows[0].dim() != 1:
            raise UserError(f"blocks differ in {name} length; collate_blocks needs packed blocks of one cutoff_len")
        batch[name] = torch.stack(rows)  # (B, S)
    if batch["input_ids"].shape != batch["lang_mask"].shape or batch["input_ids"].shape != batch["lang_group"].shape:
        raise UserError("input_ids, lang_mask and lang_group differ in length; re-pack the data")
    labels = batch["input_ids"].clone()  # (B, S)
    if mask_pad_in_labels:
        labels[labels == pad_token_id] = IGNORE_INDEX
    return {
        "input_ids": batch["input_ids"],
        "attention_mask": torch.ones_like(batch["input_ids"]),
        "labels": labels,
        "lang_mask": batch["lang_mask"],
        "lang_group": batch["lang_group"],
    }


@dataclass(frozen=True)
class BlockCollator:
    """`collate_blocks` with its options bound: a picklable `data_collator` for Trainer / DataLoader workers."""

    pad_token_id: int | None = None
    mask_pad_in_labels: bool | None = None

    def __call__(self, features: Sequence[Mapping[str, Any]]) -> dict[str, torch.Tensor]:
        return collate_blocks(features, pad_token_id=self.pad_token_id, mask_pad_in_labels=self.mask_pad_in_labels)
