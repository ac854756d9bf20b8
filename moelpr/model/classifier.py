"""LayerMoE's language-group classifier in front of the router (docs/method.md §4, §3 decision 6).

Class c confines a token to the experts of expansion groups < c (class 0: the original expert alone, at
weight 1); the last class may use every expert. So with one expansion, class 0 = old languages → expert 0,
class 1 = new languages → normal top-k; after G0 → G1 → G2 with three classes, G1 tokens use expert 0 and
the G1 experts, G2 tokens use all. The decision is hard (argmax): no gradient flows through the gating,
the classifier learns only from its own cross-entropy loss.

Pooling "sequence" (official code): logits = W_c · Σ_t h_t over the whole sequence (padding included),
one decision per sequence; during cached generation the decision made on the prompt is kept. Pooling
"token": one decision per token.
"""

from __future__ import annotations

import torch
from torch import nn


class LanguageClassifier(nn.Module):
    """`Linear(H, G, bias=False)` (xavier-normal) that turns MLP inputs into per-token expert limits."""

    def __init__(self, *, hidden_size: int, expert_limits: list[int], pooling: str, like: torch.Tensor):
        super().__init__()
        self.linear = nn.Linear(hidden_size, len(expert_limits), bias=False, dtype=like.dtype, device=like.device)
        with torch.no_grad():
            weight = torch.empty(len(expert_limits), hidden_size, device=like.device)
            nn.init.xavier_normal_(weight)
            self.linear.weight.copy_(weight)
        # A plain list, not a buffer: a non-persistent buffer is not in the checkpoint, and transformers 5 builds
        # models on the meta device, so after from_pretrained it would hold garbage.
        self.limits = expert_limits
        self.pooling = pooling
        self.forced: torch.Tensor | None = None  # (B,) groups decided on the prompt, reused while decoding
        self.decided: torch.Tensor | None = None  # (B,) the last per-sequence decision

    @property
    def limits(self) -> list[int]:
        """Experts usable by each class (`expert_limits`)."""
        return self._limits

    @limits.setter
    def limits(self, limits: list[int]) -> None:
        self._limits = list(limits)
        self._on_device: dict[torch.device, torch.Tensor] = {}  # copied to a device once, not every forward

    def forward(self, hidden_states: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """`(B, S, H)` → expert limit per token `(B·S,)` and classifier logits (`(B, G)` or `(B·S, G)`)."""
        batch, seq, hidden = hidden_states.shape
        if self.pooling == "sequence":
            logits = self.linear(hidden_states.sum(dim=1)).float()  # (B, G)
            group = logits.argmax(dim=-1) if self.forced is None else self.forced  # (B,)
            self.decided = group
            group = group[:, None].expand(batch, seq).reshape(-1)  # (N,)
        else:
            logits = self.linear(hidden_states.reshape(-1, hidden)).float()  # (N, G)
            group = logits.argmax(dim=-1)  # (N,)
        if group.device not in self._on_device:
            self._on_device[group.device] = torch.tensor(self._limits, device=group.device)
        return self._on_device[group.device][group], logits


def expert_limits(group_sizes: list[int], num_classes: int) -> list[int]:
    """Experts usable by each class: 1 for class 0, 1 + Σ_{g<c} n_g for class c, all for the last class."""
    total = 1 + sum(group_sizes)
    limits = [min(total, 1 + sum(group_sizes[:c])) for c in range(num_classes)]
    limits[-1] = total
    return limits


def group_labels(
    lang_group: torch.Tensor, attention_mask: torch.Tensor | None, num_classes: int, pooling: str
) -> torch.Tensor:
    """Classifier targets from per-token language groups `(B, S)`: groups ≥ the last class fold into it.

    Sequence pooling takes each sequence's most frequent group among its real tokens; token pooling
    labels each token, −100 at padding.
    """
    groups = lang_group.long().clamp(max=num_classes - 1)  # (B, S)
    valid = torch.ones_like(groups, dtype=torch.bool) if attention_mask is None else attention_mask.bool()
    if pooling == "token":
        return groups.masked_fill(~valid, -100).reshape(-1)  # (N,)
    counts = torch.zeros(groups.shape[0], num_classes, device=groups.device)  # (B, G)
    counts.scatter_add_(1, groups, valid.float())
    return counts.argmax(dim=-1)  # (B,)
