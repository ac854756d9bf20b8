"""The training losses as pure functions of explicit tensors (docs/method.md has each equation and its source),
and `step_loss`, the one place where they are weighted into the loss that trains.

Routing comes as a sequence with one `Routing` per MoE layer (`layer.py`: the applied experts and weights, and
the float32 router logits `(N, E_l)`, N = B·S tokens, column 0 = the frozen original expert). Token masks are
`(B, S)` or `(N,)`.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Callable, Mapping, Sequence

import torch
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

from .options import check_choice

if TYPE_CHECKING:
    from .layer import Routing

COEFFICIENT_OF = {"aux_loss": "aux_loss_coef", "lpr_loss": "lpr_loss_coef", "cls_loss": "cls_loss_coef"}
"""Each weighted term and the config field holding its coefficient; `lm_loss` has weight 1."""


def step_loss(
    terms: Mapping[str, torch.Tensor | None],
    config,
    *,
    global_terms: frozenset[str] = frozenset(),
    split: tuple[int, int] = (1, 1),
) -> tuple[torch.Tensor | None, dict[str, torch.Tensor]]:
    """The loss that trains: lm + α·aux + γ·lpr + β·cls over the terms present whose coefficient is not 0.

    Each term is scaled to its share of one optimizer step whose batch is split over `split = (processes,
    micro_batches)`, so a step gets the same loss however its batch is split (gradient accumulation, processes):
    a term in `global_terms` is a sum normalised by a count over the whole step (LM: its target tokens; LPR: its
    target or old-language tokens), so ×processes undoes the data-parallel gradient averaging; any other term is a
    mean over one forward pass (balance, classifier; the official code's), so ÷micro_batches, and the averaging
    over processes makes it the mean over the step's forwards.

    Returns:
        The loss (None when no term is present) and the scaled terms that entered it (before their coefficients).
    """
    processes, micro_batches = split
    scaled: dict[str, torch.Tensor] = {}
    loss = None
    for name, term in terms.items():
        coef = 1.0 if name == "lm_loss" else getattr(config, COEFFICIENT_OF[name])
        if term is None or not coef:
            continue
        scaled[name] = term * processes if name in global_terms else term / micro_batches
        loss = coef * scaled[name] if loss is None else loss + coef * scaled[name]
    return loss, scaled


def load_balancing_loss(
    routing: Sequence[Routing], token_mask: torch.Tensor | None = None, form: str = "mixtral"
) -> torch.Tensor:
    """Switch/Mixtral balance loss per MoE layer, averaged over layers, padding excluded.

    Per layer: E · Σ_e f_e · P_e with f_e = share of tokens whose output takes expert e (its top-k picks, Σ f = k;
    a pick a LayerMoE classifier disallowed does not count) and P_e = mean router probability of e. That is the
    official code's value (≈ k when balanced). `form="paper"` divides by k: the paper's L_balance with
    f_i = E/(K·T)·Σ_t 1{t selects i} (≈ 1 when balanced).
    """
    check_choice("balance_loss_form", form)
    if not routing:
        raise ValueError("load_balancing_loss needs the routing of at least one MoE layer")
    weight = None if token_mask is None else token_mask.reshape(-1, 1).to(torch.float32)  # (N, 1)
    per_layer = []
    for layer in routing:
        probs = layer.logits.float().softmax(dim=-1)  # (N, E)
        chosen = layer.chosen()  # (N, E) 0/1
        if weight is None:
            share, mean_prob = chosen.mean(0), probs.mean(0)  # (E,)
        else:
            count = weight.sum().clamp(min=1.0)
            share, mean_prob = (chosen * weight).sum(0) / count, (probs * weight).sum(0) / count  # (E,)
        loss = probs.shape[-1] * (share * mean_prob).sum()
        per_layer.append(loss / layer.experts.shape[-1] if form == "paper" else loss)
    return torch.stack(per_layer).mean()


def lpr_loss(
    router_logits: Sequence[torch.Tensor],
    lang_mask: torch.Tensor,
    form: str = "paper",
    reduction: str = "mean",
    num_tokens: int | torch.Tensor | None = None,
) -> torch.Tensor:
    """Language Priors Routing loss (MoE-LPR §3.2): push original-language tokens to expert 0.

    form:
        paper:    ℓ_l(t) = −log G_0(t), G = softmax of layer l's router logits.
        official: the official code's CrossEntropyLoss applied to the softmax *probabilities* as if they were
                  logits (a double softmax, bounded below by log(1 + (E−1)/e)).
    reduction (both divide Σ_l Σ_{t old} ℓ_l(t) by a count; `num_tokens` replaces the batch's own count, e.g. by
    the count over a whole optimizer step):
        mean: by L · (old tokens): the mean over (MoE layer, old token) pairs (official code).
        sum:  by the LM's target tokens (default: the tokens in `lang_mask`): the paper's
              L_LPR = −Σ_{t∈B} F(t) log G_0(t) summed over the batch's old tokens and over the L routers, each of
              which the paper's loss trains, on the scale of an NTP loss that is a mean over target tokens — so γ
              weighs LPR against NTP per token as the paper's sum-over-sum objective does (L × the mean form).
    A batch without original-language tokens gives 0, never NaN.
    """
    check_choice("lpr_loss_form", form)
    check_choice("lpr_loss_reduction", reduction)
    if not router_logits:
        raise ValueError("lpr_loss needs the router logits of at least one MoE layer")
    old = lang_mask.reshape(-1).to(torch.float32)  # (N,)
    total = router_logits[0].new_zeros((), dtype=torch.float32)
    for logits in router_logits:
        scores = logits.float()
        if form == "official":
            scores = scores.softmax(dim=-1)  # probabilities fed to CE as logits
        nll_expert0 = -scores.log_softmax(dim=-1)[:, 0]  # (N,)
        total = total + (nll_expert0 * old.to(nll_expert0.device)).sum()
    if num_tokens is None:
        num_tokens = old.sum() if reduction == "mean" else old.numel()
    if reduction == "mean":
        num_tokens = num_tokens * len(router_logits)
    if isinstance(num_tokens, torch.Tensor):
        return total / num_tokens.to(total.device, torch.float32).clamp(min=1.0)
    return total / max(float(num_tokens), 1.0)


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
    """Next-token cross-entropy from final hidden states, computed in chunks of `chunk_size` positions.

    Each chunk's logits are recomputed in the backward pass (activation checkpointing), so the full
    `(B·S, vocab)` float32 logits never exist at once. Same value as the standard shifted mean CE over
    labels ≠ −100, or the summed CE divided by `num_items_in_batch` when the Trainer passes it. Positions
    without a target stay in their chunk (ignore_index) rather than being selected out: the chunks follow
    from the shapes alone, so nothing is read back to the host.
    """
    h = hidden[:, :-1].reshape(-1, hidden.shape[-1])  # (B·(S−1), H)
    targets = labels[:, 1:].reshape(-1).to(h.device)  # (B·(S−1),), −100 = no target

    def chunk_ce(h_chunk: torch.Tensor, t_chunk: torch.Tensor) -> torch.Tensor:
        return F.cross_entropy(logits_fn(h_chunk).float(), t_chunk, ignore_index=-100, reduction="sum")

    total = hidden.new_zeros((), dtype=torch.float32) + 0.0 * hidden.sum()  # keeps the graph for empty batches
    for start in range(0, targets.shape[0], chunk_size):
        h_chunk, t_chunk = h[start : start + chunk_size], targets[start : start + chunk_size]
        total = total + (
            checkpoint(chunk_ce, h_chunk, t_chunk, use_reentrant=False)
            if h.requires_grad
            else chunk_ce(h_chunk, t_chunk)
        )
    denom = num_items_in_batch if num_items_in_batch is not None else (targets != -100).sum()
    if isinstance(denom, torch.Tensor):
        denom = denom.to(total.device)
    return total / max(denom, 1) if not isinstance(denom, torch.Tensor) else total / denom.clamp(min=1)
