"""Collect router (and classifier) logits during one forward pass, without global state.

`capture_router_logits(model)` points every `MoEBlock.sink` at one list for the duration of the block;
blocks append their float32 `(N, E)` logits as they run, i.e. in layer order. `capture_classifier_logits`
does the same for LayerMoE classifiers.
"""

from __future__ import annotations

import contextlib
from typing import Iterator

import torch
from torch import nn

from .layer import MoEBlock


def moe_blocks(model: nn.Module) -> list[MoEBlock]:
    """The model's MoE blocks in layer order."""
    return [module for module in model.modules() if isinstance(module, MoEBlock)]


@contextlib.contextmanager
def _capture(blocks: list[MoEBlock], attribute: str) -> Iterator[list[torch.Tensor]]:
    collected: list[torch.Tensor] = []
    for block in blocks:
        setattr(block, attribute, collected)
    try:
        yield collected
    finally:
        for block in blocks:
            setattr(block, attribute, None)


def capture_router_logits(
    model: nn.Module, enabled: bool = True
) -> contextlib.AbstractContextManager[list[torch.Tensor]]:
    """Yield a list that receives each MoE layer's router logits for the forward passes run inside."""
    return _capture(moe_blocks(model) if enabled else [], "sink")


def capture_classifier_logits(
    model: nn.Module, enabled: bool = True
) -> contextlib.AbstractContextManager[list[torch.Tensor]]:
    """Yield a list that receives each classifier layer's logits for the forward passes run inside."""
    blocks = [b for b in moe_blocks(model) if b.classifier is not None] if enabled else []
    return _capture(blocks, "classifier_sink")
