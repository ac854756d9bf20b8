"""Decoding reads only the experts the router chose (`MoEBlock`, the block every checkpoint carries).

A `TorchFunctionMode` watches every torch call of one decoding step and records which experts' weights
enter a computation: `grouped_mm` reads the groups its `offs` give rows; any other op on a weight (or a
slice of a stacked weight) reads the experts it covers. Views and calls on empty inputs read nothing.
"""

from __future__ import annotations

import copy

import pytest
import torch
from tiny import tiny_ids, trained_moe
from torch.overrides import TorchFunctionMode

from moelpr.model import CACHE_ARG
from moelpr.model.capture import moe_blocks
from moelpr.upcycling.expand import add_expert_group

_VIEWS = {
    "__getitem__",
    "transpose",
    "t",
    "view",
    "reshape",
    "expand",
    "expand_as",
    "chunk",
    "split",
    "narrow",
    "select",
    "unbind",
    "detach",
    "__get__",
    "size",
    "dim",
    "data_ptr",
    "element_size",
    "stride",
    "storage_offset",
    "is_contiguous",
    "numel",
    "__len__",
    "__format__",
    "__repr__",
}


def _byte_range(t: torch.Tensor) -> tuple[int, int]:
    extent = sum((n - 1) * s for n, s in zip(t.shape, t.stride()) if n > 0) + 1
    return t.data_ptr(), t.data_ptr() + extent * t.element_size()


class ExpertReads(TorchFunctionMode):
    """Records (layer, expert) pairs whose weights a computation reads."""

    def __init__(self, regions):
        super().__init__()
        self.regions = regions  # list of (start, end, per-expert bytes or None, layer, first expert)
        self.read: set[tuple[int, int]] = set()

    def _experts_in(self, t: torch.Tensor):
        lo, hi = _byte_range(t)
        for start, end, step, layer, first in self.regions:
            if lo < end and hi > start:
                if step is None:
                    yield layer, first
                else:
                    yield from ((layer, first + e) for e in range((lo - start) // step, (hi - 1 - start) // step + 1))

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        name = getattr(func, "__name__", "")
        flat = [b for a in (*args, *kwargs.values()) for b in (a if isinstance(a, (list, tuple)) else (a,))]
        tensors = [a for a in flat if isinstance(a, torch.Tensor)]
        if name not in _VIEWS and tensors and all(t.numel() > 0 for t in tensors):
            if "grouped_mm" in name:  # reads the groups that `offs` gives rows
                offs = kwargs["offs"].cpu()
                counts = torch.diff(offs, prepend=offs.new_zeros(1)).tolist()
                lo = _byte_range(tensors[1])[0]
                for start, end, step, layer, first in self.regions:
                    if step is not None and start <= lo < end:
                        self.read.update((layer, first + g) for g, n in enumerate(counts) if n)
            else:
                for t in tensors:
                    self.read.update(self._experts_in(t))
        return func(*args, **kwargs)


def regions_of(blocks):
    """Weight byte ranges of each block's experts: (start, end, bytes per expert or None, layer, first expert)."""
    regions = []
    for layer, block in enumerate(blocks):
        for p in block.original.parameters():
            regions.append((*_byte_range(p), None, layer, 0))
        first = 1
        for group in block.experts:
            for p in (group.gate_up_proj, group.down_proj):
                if p.numel():
                    regions.append((*_byte_range(p), p.stride(0) * p.element_size(), layer, first))
            first += group.num_experts
    return regions


def chosen_experts(model, step_ids, past):
    """Per MoE layer, the top-k experts the router picks for the single decoding token."""
    from moelpr.model.capture import capture_routing

    with torch.no_grad(), capture_routing(model) as routing:
        model(input_ids=step_ids, cache=past, use_cache=True)
    return [set(r.experts[0].tolist()) for r in routing]


def decode_step_reads(model, blocks, prompt, step_ids):
    with torch.no_grad():
        past = getattr(model(input_ids=prompt, use_cache=True), CACHE_ARG)
        chosen = chosen_experts(model, step_ids, copy.deepcopy(past))
        spy = ExpertReads(regions_of(blocks))
        with spy:
            model(input_ids=step_ids, cache=past, use_cache=True)
    return spy.read, chosen


def check_only_chosen(model, blocks, top_k):
    prompt = tiny_ids(batch=1, seq=6, seed=2)
    for token in range(4, 12):  # several decoding tokens, so both expert 0 and new experts get chosen
        step = torch.tensor([[token]])
        read, chosen = decode_step_reads(model, blocks, prompt, step)
        for layer, experts in enumerate(chosen):
            assert len(experts) == top_k
            assert {e for l, e in read if l == layer} == experts, (token, layer, read, chosen)


def test_core_decode_step_reads_only_top_k_experts():
    """Decoding takes the loop on every device (auto's rule: tests/model/test_layer.py), which reads only the
    experts the token chose."""
    model = trained_moe(num_experts=4, top_k=2)
    check_only_chosen(model, moe_blocks(model), top_k=2)


@pytest.mark.parametrize("setup", ["top1", "two_groups"])
def test_core_decode_step_skips_unchosen_groups(setup):
    if setup == "top1":
        model = trained_moe(num_experts=4, top_k=1)
    else:
        model = trained_moe(num_experts=3, top_k=2)
        add_expert_group(model.lm, [2, 2, 2])
        torch.manual_seed(0)
        with torch.no_grad():
            for block in moe_blocks(model):
                block.experts[1].gate_up_proj.add_(torch.randn_like(block.experts[1].gate_up_proj) * 0.05)
    check_only_chosen(model, moe_blocks(model), top_k=model.config.num_experts_per_tok)
