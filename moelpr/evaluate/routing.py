"""Routing statistics from router logits: pure functions of tensors, summed across batches.

The model contract (docs/design.md): `router_logits` is a tuple with one float32 `(N, E_l)` tensor per MoE
layer, N = B·S tokens in row-major order, column 0 = the frozen original expert. The router probability is
the softmax over all of a layer's experts (method.md §1.1), top-k is taken on it with k capped at E_l.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Sequence

import torch


@dataclass
class RoutingSums:
    """Per-MoE-layer sums over the counted tokens; add two to merge batches, `summary()` to average.

    Attributes:
        prob_sum: per layer, the sum over tokens of the router probability of each expert, `(E_l,)` float64.
        top_k_has_expert0: per layer, how many tokens had expert 0 among their top-k.
        expert0_weight_sum: per layer, the sum of expert 0's weight in the tokens' output mix (its renormalised
            top-k weight; with k = 1 its raw probability, as `MoEBlock.route`); 1 = the original FFN alone.
        tokens: how many tokens were counted (the same for every layer).
    """

    prob_sum: list[torch.Tensor] = field(default_factory=list)
    top_k_has_expert0: list[int] = field(default_factory=list)
    expert0_weight_sum: list[float] = field(default_factory=list)
    tokens: int = 0

    def __add__(self, other: RoutingSums) -> RoutingSums:
        if not self.prob_sum:
            return other
        if not other.prob_sum:
            return self
        if [p.numel() for p in self.prob_sum] != [p.numel() for p in other.prob_sum]:
            raise ValueError("cannot add routing sums of models with different expert layouts")
        return RoutingSums(
            prob_sum=[a + b for a, b in zip(self.prob_sum, other.prob_sum)],
            top_k_has_expert0=[a + b for a, b in zip(self.top_k_has_expert0, other.top_k_has_expert0)],
            expert0_weight_sum=[a + b for a, b in zip(self.expert0_weight_sum, other.expert0_weight_sum)],
            tokens=self.tokens + other.tokens,
        )

    def summary(self, layers: Sequence[int] | None = None) -> dict:
        """JSON-ready means: `mean_prob` `[[per expert] per layer]`, `top_k_has_expert0` and `expert0_weight`
        `[per layer]` (shares of the tokens, mean mix weight).

        Args:
            layers: the model's indices of the MoE layers (default 0, 1, ...), stored under `layers`.
        """
        n = max(self.tokens, 1)
        return {
            "mean_prob": [[float(v) / n for v in p.tolist()] for p in self.prob_sum],
            "top_k_has_expert0": [c / n for c in self.top_k_has_expert0],
            "expert0_weight": [w / n for w in self.expert0_weight_sum],
            "layers": list(layers) if layers is not None else list(range(len(self.prob_sum))),
            "tokens": self.tokens,
        }


def routing_sums(router_logits: Sequence[torch.Tensor], token_mask: torch.Tensor, top_k: int) -> RoutingSums:
    """Sum router probabilities and expert-0-in-top-k counts over the tokens where `token_mask` is true.

    Args:
        router_logits: one `(N, E_l)` tensor per MoE layer, N = B·S.
        token_mask: `(B, S)` or `(N,)`, true for the tokens to count (e.g. not padding).
        top_k: experts per token (capped at each layer's expert count).
    """
    mask = token_mask.reshape(-1).bool()  # (N,)
    sums = RoutingSums(tokens=int(mask.sum()))
    for logits in router_logits:
        if logits.shape[0] != mask.shape[0]:
            raise ValueError(f"router logits cover {logits.shape[0]} tokens but the mask has {mask.shape[0]}")
        kept = logits[mask.to(logits.device)].float()  # (n, E)
        probs = kept.softmax(dim=-1)  # (n, E)
        k = min(top_k, probs.shape[-1])
        top, chosen = probs.topk(k, dim=-1)  # (n, k)
        weights = top / top.sum(dim=-1, keepdim=True) if k > 1 else top  # (n, k) the output mix
        sums.prob_sum.append(probs.sum(dim=0).double().cpu())  # (E,)
        sums.top_k_has_expert0.append(int((chosen == 0).any(dim=-1).sum()))
        sums.expert0_weight_sum.append(float((weights * (chosen == 0)).sum()))
    return sums
