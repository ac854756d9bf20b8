"""MoE-LPR losses as pure functions of explicit tensors (method.md §1.2, §3).

Router logits come as a sequence with one float tensor `(N, E_l)` per MoE layer (N = B·S tokens, column 0
= the frozen original expert). Token masks are `(B, S)` or `(N,)`.
"""

from __future__ import annotations

from typing import Callable, Literal, Sequence

import torch
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint


def load_balancing_loss(
    router_logits: Sequence[torch.Tensor],
    top_k: int,
    token_mask: torch.Tensor | None = None,
    form: Literal["mixtral", "paper"] = "mixtral",
) -> torch.Tensor:
    """Switch/Mixtral balance loss per MoE layer, averaged over layers, padding excluded.

    Per layer: E · Σ_e f_e · P_e with f_e = share of tokens having e among their top-k (Σ f = k) and
    P_e = mean router probability of e. That is the official code's value (≈ k when balanced).
    `form="paper"` divides by k: the paper's L_balance with f_i = E/(K·T)·Σ_t 1{t selects i} (≈ 1 when balanced).
    """
    if not router_logits:
        raise ValueError("load_balancing_loss needs the router logits of at least one MoE layer")
    weight = None if token_mask is None else token_mask.reshape(-1, 1).to(torch.float32)  # (N, 1)
    per_layer = []
    for logits in router_logits:
        probs = logits.float().softmax(dim=-1)  # (N, E)
        num_experts = probs.shape[-1]
        k = min(top_k, num_experts)
        chosen = torch.zeros_like(probs).scatter_(1, probs.topk(k, dim=-1).indices, 1.0)  # (N, E) 0/1
        if weight is None:
            share, mean_prob = chosen.mean(0), probs.mean(0)  # (E,)
        else:
            count = weight.sum().clamp(min=1.0)
            share, mean_prob = (chosen * weight).sum(0) / count, (probs * weight).sum(0) / count  # (E,)
        loss = num_experts * (share * mean_prob).sum()
        per_layer.append(loss / k if form == "paper" else loss)
    return torch.stack(per_layer).mean()


def lpr_loss(
    router_logits: Sequence[torch.Tensor],
    lang_mask: torch.Tensor,
    form: Literal["paper", "official"] = "paper",
    reduction: Literal["mean", "sum"] = "mean",
    num_tokens: int | torch.Tensor | None = None,
) -> torch.Tensor:
    """Language Priors Routing loss (MoE-LPR §3.2): push original-language tokens to expert 0.

    form:
        paper:    ℓ_l(t) = −log G_0(t), G = softmax of layer l's router logits.
        official: the official code's CrossEntropyLoss applied to the softmax *probabilities* as if they were
                  logits (a double softmax, bounded below by log(1 + (E−1)/e)).
    reduction:
        mean: Σ_l Σ_{t old} ℓ_l(t) / (L · n_old), the mean over (MoE layer, old token) pairs (official code).
        sum:  Σ_l Σ_{t old} ℓ_l(t) / `num_tokens`: the paper's L_LPR = −Σ_{t∈B} F(t) log G_0(t) summed over the
              batch's old tokens (and over the L routers, each of which the paper's loss trains), on the scale of
              an NTP loss that is a mean over `num_tokens` target tokens — so γ weighs LPR against NTP per token
              exactly as the paper's sum-over-sum objective does. `num_tokens` defaults to the tokens in `lang_mask`.
    A batch without original-language tokens gives 0, never NaN.
    """
    if not router_logits:
        raise ValueError("lpr_loss needs the router logits of at least one MoE layer")
    if reduction not in ("mean", "sum"):
        raise ValueError(f"reduction must be 'mean' or 'sum', got {reduction!r}")
    old = lang_mask.reshape(-1).to(torch.float32)  # (N,)
    total = router_logits[0].new_zeros((), dtype=torch.float32)
    for logits in router_logits:
        scores = logits.float()
        if form == "official":
            scores = scores.softmax(dim=-1)  # probabilities fed to CE as logits
        nll_expert0 = -scores.log_softmax(dim=-1)[:, 0]  # (N,)
        total = total + (nll_expert0 * old.to(nll_expert0.device)).sum()
    if reduction == "mean":
        return total / (old.sum() * len(router_logits)).clamp(min=1.0)
    denom = old.numel() if num_tokens is None else num_tokens
    if isinstance(denom, torch.Tensor):
        return total / denom.to(total.device, torch.float32).clamp(min=1.0)
    return total / max(float(denom), 1.0)


def classifier_loss(classifier_logits: Sequence[torch.Tensor], labels: Sequence[torch.Tensor]) -> torch.Tensor:
    """LayerMoE classifier loss: cross-entropy between each classifier layer's logits and the language group.

    `classifier_logits[i]` is `(M_i, G)` (M = sequences or tokens, by pooling), `labels[i]` is `(M_i,)` with
    −100 for rows to ignore; the mean over classifier layers of each layer's mean CE.
    """
    if not classifier_logits:
        raise ValueError("classifier_loss needs the logits of at least one classifier layer")
    per_layer = []
    for logits, target in zip(classifier_logits, labels):
        valid = (target != -100).to(torch.float32)
        ce = F.cross_entropy(logits.float(), target.clamp(min=0), reduction="none")  # (M,)
        per_layer.append((ce * valid).sum() / valid.sum().clamp(min=1.0))
    return torch.stack(per_layer).mean()


def causal_lm_loss(
    hidden: torch.Tensor,
    labels: torch.Tensor,
    logits_fn: Callable[[torch.Tensor], torch.Tensor],
    *,
    num_items_in_batch: int | torch.Tensor | None = None,
    chunk_size: int = 4096,
) -> torch.Tensor:
    """Next-token cross-entropy from final hidden states, computed in chunks of `chunk_size` target tokens.

    Each chunk's logits are recomputed in the backward pass (activation checkpointing), so the full
    `(B·S, vocab)` float32 logits never exist at once. Same value as the standard shifted mean CE over
    labels ≠ −100, or the summed CE divided by `num_items_in_batch` when the Trainer passes it.
    """
    targets = labels[:, 1:].reshape(-1)  # (B·(S−1),)
    keep = targets != -100
    h = hidden[:, :-1].reshape(-1, hidden.shape[-1])[keep]  # (M, H) only positions with a target
    targets = targets[keep]  # (M,)

    def chunk_ce(h_chunk: torch.Tensor, t_chunk: torch.Tensor) -> torch.Tensor:
        return F.cross_entropy(logits_fn(h_chunk).float(), t_chunk, reduction="sum")

    total = hidden.new_zeros((), dtype=torch.float32) + 0.0 * hidden.sum()  # keeps the graph for empty batches
    for start in range(0, targets.shape[0], chunk_size):
        h_chunk, t_chunk = h[start : start + chunk_size], targets[start : start + chunk_size]
        total = total + (
            checkpoint(chunk_ce, h_chunk, t_chunk, use_reentrant=False)
            if h.requires_grad
            else chunk_ce(h_chunk, t_chunk)
        )
    denom = num_items_in_batch if num_items_in_batch is not None else targets.shape[0]
    if isinstance(denom, torch.Tensor):
        denom = denom.to(total.device)
    return total / max(denom, 1) if not isinstance(denom, torch.Tensor) else total / denom.clamp(min=1)
