"""Collect each MoE layer's routing during forward passes, without global state.

`capture_routing(model)` points every `MoEBlock.sink` at one list for the duration of the block; blocks append
their `Routing` (the weights and experts they applied, the router and classifier logits) as they run, i.e. in
layer order. `capture_router_logits` is the same capture keeping only each layer's float32 `(N, E)` logits.
"""

from __future__ import annotations

import contextlib
from typing import Iterator

import torch
from torch import nn

from .layer import MoEBlock, Routing


def moe_blocks(model: nn.Module) -> list[MoEBlock]:
    """The model's MoE blocks in layer order."""
    return [module for module in model.modules() if isinstance(module, MoEBlock)]


class _LogitsOnly(list):
    """A sink that keeps each received routing's router logits."""

    def append(self, routing: Routing) -> None:
        super().append(routing.logits)


@contextlib.contextmanager
def _capture(model: nn.Module, sink: list, enabled: bool) -> Iterator[list]:
    blocks = moe_blocks(model) if enabled else []
    for block in blocks:
        block.sink = sink
    try:
        yield sink
    finally:
        for block in blocks:
            block.sink = None


def capture_routing(model: nn.Module, enabled: bool = True) -> contextlib.AbstractContextManager[list[Routing]]:
    """Yield a list that receives each MoE layer's `Routing` for the forward passes run inside."""
    return _capture(model, [], enabled)


def capture_router_logits(
    model: nn.Module, enabled: bool = True
) -> contextlib.AbstractContextManager[list[torch.Tensor]]:
    """Yield a list that receives each MoE layer's float32 `(N, E)` router logits for the forward passes run inside."""
    return _capture(model, _LogitsOnly(), enabled)
