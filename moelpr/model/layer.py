"""The MoE-LPR block: expert 0 is the original (frozen) MLP, new experts are stacked, a router picks top-k.

Routing follows MoE-LPR Eq. 1–3 (method.md §1.1): G(x) = softmax(x·W_r) over all E experts in float32,
top-k, weights renormalised over the chosen k when k > 1 (with k = 1 the raw probability scales the output,
as the official code does, so the router keeps a gradient), y = Σ_{i∈T} w_i·E_i(x).

Dispatch groups token–expert pairs by expert with one stable sort and adds the weighted results back with
`index_add_`. Training on accelerators runs all experts (expert 0 included) in one grouped matmul per
projection; otherwise expert 0 (the original module) runs on its rows and each new-expert group through
`StackedExperts.forward` (grouped matmul on accelerators, the per-expert loop of `looped.py` on CPU).
Nothing of shape (tokens × experts × hidden) is materialised.

Shapes: N = tokens, H = hidden, I = intermediate, E = experts of this layer, k = top-k, P = N·k pairs.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from .arch import activation, gate_up_down
from .classifier import LanguageClassifier
from .grouped import compute_dtype, grouped_mlps, use_grouped_mm
from .looped import add_looped


class StackedExperts(nn.Module):
    """`num_experts` gated MLPs with stacked weights: gate_up `(E, 2I, H)` rows [gate; up], down `(E, H, I)`."""

    def __init__(
        self,
        *,
        num_experts: int,
        hidden_size: int,
        intermediate_size: int,
        act_fn: nn.Module,
        bias: bool = False,
        dtype: torch.dtype | None = None,
        device: torch.device | str | None = None,
        init_std: float | None = 0.02,
    ):
        super().__init__()
        kw = {"dtype": dtype, "device": device}
        self.num_experts = num_experts
        self.gate_up_proj = nn.Parameter(torch.empty(num_experts, 2 * intermediate_size, hidden_size, **kw))
        self.down_proj = nn.Parameter(torch.empty(num_experts, hidden_size, intermediate_size, **kw))
        self.gate_up_bias = nn.Parameter(torch.zeros(num_experts, 2 * intermediate_size, **kw)) if bias else None
        self.down_bias = nn.Parameter(torch.zeros(num_experts, hidden_size, **kw)) if bias else None
        self.act_fn = act_fn
        if init_std is not None:  # None: the caller fills the weights (copies, or a checkpoint)
            nn.init.normal_(self.gate_up_proj, std=init_std)
            nn.init.normal_(self.down_proj, std=init_std)

    @classmethod
    def like(cls, mlp: nn.Module, num_experts: int, *, init_std: float | None = 0.02) -> "StackedExperts":
        """`num_experts` experts with the shapes, dtype and biases of the dense gated MLP `mlp`, normal(`init_std`)."""
        _, down, gate_up_bias, down_bias = gate_up_down(mlp)
        return cls(
            num_experts=num_experts,
            hidden_size=down.shape[0],
            intermediate_size=down.shape[1],
            act_fn=activation(mlp),
            bias=gate_up_bias is not None or down_bias is not None,
            dtype=down.dtype,
            device=down.device,
            init_std=init_std,
        )

    @classmethod
    def copies_of(cls, mlp: nn.Module, num_experts: int) -> "StackedExperts":
        """`num_experts` exact copies of a dense gated MLP ("Expert-Copy" initialisation)."""
        gate_up, down, gate_up_bias, down_bias = gate_up_down(mlp)
        experts = cls.like(mlp, num_experts, init_std=None)
        with torch.no_grad():
            experts.gate_up_proj.copy_(gate_up.expand_as(experts.gate_up_proj))
            experts.down_proj.copy_(down.expand_as(experts.down_proj))
            if gate_up_bias is not None:
                experts.gate_up_bias.copy_(gate_up_bias.expand_as(experts.gate_up_bias))
            if down_bias is not None:
                experts.down_bias.copy_(down_bias.expand_as(experts.down_bias))
        return experts

    def forward(
        self, out: torch.Tensor, x: torch.Tensor, token: torch.Tensor, weight: torch.Tensor, counts: list[int]
    ) -> torch.Tensor:
        """Add `weight[p] · expert_e(x[token[p]])` into `out` `(N, H)`, pairs p sorted by expert, `counts[e]` each."""
        if token.shape[0] == 0:
            if torch.is_grad_enabled() and self.gate_up_proj.requires_grad:
                # Keep the weights in the graph so DDP never sees them as unused when no token chose them.
                out = out + 0.0 * sum(p.sum() for p in self.parameters())
            return out
        params = (self.gate_up_proj, self.down_proj, self.gate_up_bias, self.down_bias, self.act_fn)
        if use_grouped_mm(x, self.gate_up_proj) and use_grouped_mm(x, self.down_proj):
            ys = grouped_mlps(x.index_select(0, token), counts, *params)  # (M, H)
            return out.index_add_(0, token, ys * weight.unsqueeze(-1))
        return add_looped(out, x, token, weight, counts, *params)


class MoEBlock(nn.Module):
    """Drop-in replacement for a decoder layer's `mlp`.

    Expert 0 is `original`, the dense MLP itself (same module, same weights). `experts[g]` holds the new
    experts of expansion group g (one group per language-expansion step; lifelong expansion adds groups),
    and `routers[g]` their router rows; `routers[0]` also has the row of expert 0. Router logits are the
    concatenation, so column 0 is always the original expert.

    `classifier` (LayerMoE, optional) turns the MLP input into a per-token expert limit: token t may only
    use experts `< limit[t]`, and a limit of 1 sends it to expert 0 alone, at weight 1.
    `sink` / `classifier_sink`, when set (see `moelpr.model.capture`), receive this layer's float32 router
    logits `(N, E)` and classifier logits.
    """

    def __init__(self, *, original: nn.Module, experts: list[StackedExperts], routers: list[nn.Linear], top_k: int):
        super().__init__()
        self.original = original
        self.experts = nn.ModuleList(experts)
        self.routers = nn.ModuleList(routers)
        self.top_k = top_k
        self.classifier: LanguageClassifier | None = None
        self.sink: list[torch.Tensor] | None = None
        self.classifier_sink: list[torch.Tensor] | None = None

    @property
    def num_experts(self) -> int:
        return 1 + sum(group.num_experts for group in self.experts)

    def router_logits(self, x: torch.Tensor) -> torch.Tensor:
        """`(N, H)` → float32 `(N, E)`; column 0 scores the original expert."""
        return torch.cat([router(x) for router in self.routers], dim=-1).float()

    def route(self, logits: torch.Tensor, limit: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """Top-k experts and their weights `(N, k)` from float32 router logits `(N, E)` and optional limits `(N,)`."""
        probs = logits.softmax(dim=-1)  # (N, E)
        if limit is not None:
            allowed = torch.arange(probs.shape[-1], device=probs.device) < limit[:, None]  # (N, E)
            probs = probs.masked_fill(~allowed, 0.0)
        k = min(self.top_k, probs.shape[-1])
        weights, experts = probs.topk(k, dim=-1)  # (N, k)
        if k > 1:
            weights = weights / weights.sum(dim=-1, keepdim=True)
        if limit is not None:
            # Tokens confined to expert 0 use it alone, at weight 1 (their other picks got weight 0).
            alone = (limit == 1)[:, None]  # (N, 1)
            weights = torch.where(alone, (experts == 0).to(weights.dtype), weights)
        return weights, experts

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        shape = hidden_states.shape
        x = hidden_states.reshape(-1, shape[-1])  # (N, H)
        logits = self.router_logits(x)  # (N, E)
        if self.sink is not None:
            self.sink.append(logits)
        limit = None
        if self.classifier is not None:
            limit, classifier_logits = self.classifier(hidden_states)  # (N,), (B or N, G)
            if self.classifier_sink is not None:
                self.classifier_sink.append(classifier_logits)
        weights, experts = self.route(logits, limit)  # (N, k)
        return self.dispatch(x, weights, experts, limit is not None).view(shape)

    def dispatch(
        self, x: torch.Tensor, weights: torch.Tensor, experts: torch.Tensor, limited: bool = False
    ) -> torch.Tensor:
        """Σ_j weights[t, j] · E_{experts[t, j]}(x[t]) for every token t, experts grouped by one sort."""
        k = experts.shape[-1]
        pair_expert = experts.reshape(-1)  # (P,)
        pair_weight = weights.reshape(-1)  # (P,)
        if limited:
            keep = pair_weight > 0  # drop the zero-weight picks of confined tokens
            pair_token = torch.arange(x.shape[0], device=x.device).repeat_interleave(k)[keep]
            pair_expert, pair_weight = pair_expert[keep], pair_weight[keep]
        else:
            pair_token = None
        order = pair_expert.argsort(stable=True)  # (P,) pairs sorted by expert
        token = order // k if pair_token is None else pair_token[order]  # (P,) token of each sorted pair
        weight = pair_weight.index_select(0, order).to(x.dtype)  # (P,)
        out = torch.zeros_like(x)  # (N, H)
        if self._single_grouped_call(x):
            ys = self._all_experts_grouped(x.index_select(0, token), pair_expert)  # (P, H)
            return out.index_add_(0, token, ys * weight.unsqueeze(-1))
        counts = torch.bincount(pair_expert, minlength=self.num_experts).tolist()
        if counts[0]:  # expert 0: the original module on its rows
            rows = token[: counts[0]]
            out.index_add_(0, rows, self.original(x.index_select(0, rows)) * weight[: counts[0], None])
        row, first = counts[0], 1
        for group in self.experts:
            group_counts = counts[first : first + group.num_experts]
            end = row + sum(group_counts)
            if end > row or torch.is_grad_enabled():  # an idle group is skipped when nothing needs its gradient
                out = group(out, x, token[row:end], weight[row:end], group_counts)
            row, first = end, first + group.num_experts
        return out

    def _single_grouped_call(self, x: torch.Tensor) -> bool:
        """Training on accelerators: all experts (expert 0 included) in one grouped matmul, no host sync.

        Not on CPU (`use_grouped_mm`: the per-expert loop is faster there, and the discarded expert-0 weight
        gradient would cost real time) and not for inference, where concatenating every expert's weights per
        call would read them all; decoding then touches only the experts its tokens chose.
        """
        if not torch.is_grad_enabled() or any(g.gate_up_bias is not None for g in self.experts):
            return False
        return use_grouped_mm(x, self.experts[0].down_proj) and use_grouped_mm(x, self.experts[0].gate_up_proj)

    def _all_experts_grouped(self, xs: torch.Tensor, pair_expert: torch.Tensor) -> torch.Tensor:
        """Rows sorted by expert → outputs, all experts in one `grouped_mm` per projection, offsets on device.

        Expert 0's weights are concatenated in front of the stacked new experts (a copy of one MLP per call);
        with trainable new experts the backward also forms expert 0's weight gradient, which is discarded.
        Under autocast the float32 master weights are cast to autocast's dtype, as `F.linear` would.
        """
        dtype = compute_dtype(xs)
        gate_up0, down0, _, _ = gate_up_down(self.original)
        gate_up = torch.cat([gate_up0[None], *(g.gate_up_proj for g in self.experts)]).to(dtype)  # (E, 2I, H)
        down = torch.cat([down0[None], *(g.down_proj for g in self.experts)]).to(dtype)  # (E, H, I)
        counts = torch.zeros(self.num_experts, dtype=torch.int32, device=xs.device)
        counts.scatter_add_(0, pair_expert.to(torch.int64), torch.ones_like(pair_expert, dtype=torch.int32))  # (E,)
        offsets = counts.cumsum(0, dtype=torch.int32)  # no host sync (bincount would read the max back)
        xs = xs.to(dtype)
        gate, up = F.grouped_mm(xs, gate_up.transpose(-2, -1), offs=offsets).chunk(2, dim=-1)  # (P, I) each
        return F.grouped_mm(self.experts[0].act_fn(gate) * up, down.transpose(-2, -1), offs=offsets)  # (P, H)


def new_router(hidden_size: int, rows: int, *, like: torch.Tensor) -> nn.Linear:
    """A bias-free router with `rows` outputs, xavier-normal initialised as in the official code."""
    router = nn.Linear(hidden_size, rows, bias=False, dtype=like.dtype, device=like.device)
    with torch.no_grad():
        weight = torch.empty(rows, hidden_size, dtype=torch.float32, device=like.device)
        nn.init.xavier_normal_(weight)
        router.weight.copy_(weight)
    return router
