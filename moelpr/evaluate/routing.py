"""Routing statistics, derived from the routing the MoE blocks applied (`moelpr.model.layer.Routing`).

One mechanism serves `moe-lpr eval` (per language) and the training monitor (per language role): for each
group of tokens (a row of a mask) and each MoE layer, `routing_counts` sums on the device the token count,
how many tokens' outputs take expert 0, expert 0's weight in their output mix (1 = the original FFN alone;
a token a LayerMoE classifier confined to expert 0 counts 1) and each expert's router probability. Sums
add across batches without leaving the device; `RoutingSums.summary` turns them into means.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch

from moelpr.model.layer import Routing

STATS = ("tokens", "expert0_in_topk", "expert0_weight")
"""The per-layer scalar sums, in the order they lead each layer's block of `routing_counts` (then the E_l
router-probability sums)."""


def sum_dtype(device: torch.device) -> torch.dtype:
    """float64 for sums over millions of tokens, float32 where the device has no float64 (MPS)."""
    return torch.float32 if device.type == "mps" else torch.float64


def routing_counts(routing: Sequence[Routing], masks: torch.Tensor) -> torch.Tensor:
    """Sums per token group and MoE layer, `(R, Σ_l (3 + E_l))`, on the routing's device.

    Args:
        routing: one `Routing` per MoE layer over the same N tokens.
        masks: `(R, N)` or `(R, B, S)` bool, which tokens each of R groups counts.
    """
    device = routing[0].logits.device
    dtype = sum_dtype(device)
    m = masks.reshape(masks.shape[0], -1).to(device, dtype)  # (R, N)
    blocks = []
    for layer in routing:
        if layer.logits.shape[0] != m.shape[1]:
            raise ValueError(f"the routing covers {layer.logits.shape[0]} tokens but the masks have {m.shape[1]}")
        chosen0 = layer.chosen()[:, 0]  # (N,) expert 0 among the applied picks
        per_token = torch.stack([chosen0, layer.expert0_weight()], dim=1).to(dtype)  # (N, 2)
        probs = layer.logits.softmax(dim=-1).to(dtype)  # (N, E)
        blocks.append(torch.cat([m.sum(dim=1, keepdim=True), m @ per_token, m @ probs], dim=1))  # (R, 3 + E)
    return torch.cat(blocks, dim=1)


@dataclass
class RoutingSums:
    """`routing_counts` of one token group, added up over batches; `summary()` averages them.

    Attributes:
        counts: `(Σ_l (3 + E_l),)` sums (see `routing_counts`), None before the first batch.
        experts: E_l per MoE layer.
    """

    counts: torch.Tensor | None = None
    experts: tuple[int, ...] = ()

    @classmethod
    def of(cls, routing: Sequence[Routing], mask: torch.Tensor) -> RoutingSums:
        """The sums over the tokens where `mask` (`(B, S)` or `(N,)`) is true."""
        return cls(routing_counts(routing, mask[None])[0], tuple(r.logits.shape[-1] for r in routing))

    def __add__(self, other: RoutingSums) -> RoutingSums:
        if self.counts is None:
            return other
        if other.counts is None:
            return self
        if self.experts != other.experts:
            raise ValueError("cannot add routing sums of models with different expert layouts")
        return RoutingSums(self.counts + other.counts.to(self.counts.device), self.experts)

    def per_layer(self) -> list[dict[str, float | list[float]]]:
        """Per MoE layer: `tokens`, `expert0_in_topk`, `expert0_weight` and `prob` (each expert's) sums (host)."""
        return split_counts(self.counts.cpu().tolist(), self.experts) if self.counts is not None else []

    def summary(self, layers: Sequence[int] | None = None) -> dict:
        """JSON-ready means: `mean_prob` `[[per expert] per layer]`, `top_k_has_expert0` and `expert0_weight`
        `[per layer]` (shares of the tokens, mean mix weight), `layers` (the model's MoE layer indices, default
        0, 1, ...) and `tokens`."""
        rows = self.per_layer()
        tokens = int(rows[0]["tokens"]) if rows else 0
        n = max(tokens, 1)
        return {
            "mean_prob": [[p / n for p in row["prob"]] for row in rows],
            "top_k_has_expert0": [row["expert0_in_topk"] / n for row in rows],
            "expert0_weight": [row["expert0_weight"] / n for row in rows],
            "layers": list(layers) if layers is not None else list(range(len(rows))),
            "tokens": tokens,
        }


def split_counts(flat: Sequence[float], experts: Sequence[int]) -> list[dict[str, float | list[float]]]:
    """One group's flat `routing_counts` row → per MoE layer `{tokens, expert0_in_topk, expert0_weight, prob}`."""
    rows, start = [], 0
    for e in experts:
        block = flat[start : start + len(STATS) + e]
        rows.append({**dict(zip(STATS, block[: len(STATS)])), "prob": list(block[len(STATS) :])})
        start += len(STATS) + e
    return rows
