"""The MoE-LPR block: expert 0 is the original (frozen) MLP, new experts are stacked, a router picks top-k.

Routing follows MoE-LPR Eq. 1–3 (docs/method.md): G(x) = softmax(x·W_r) over all E experts in float32, top-k,
weights renormalised over the chosen k when k > 1 (with k = 1 the raw probability scales the output, as the
official code does, so the router keeps a gradient), y = Σ_{i∈T} w_i·E_i(x). A LayerMoE classifier, where
present, limits which experts a token may use before the top-k (a token confined to expert 0 uses it alone,
at weight 1).

`MoEBlock.route` computes that routing once per forward and returns it as a `Routing`: the weights and experts
that are applied. Everything that reports or penalises routing (the losses, the training monitor, `moe-lpr
eval`) reads these records, through `capture.capture_routing`. How the experts then run is the block's
`dispatch` setting (`dispatch.py`: "auto" or a named path); `dispatch.reference` is the definition every path
is tested against.

Shapes: N = tokens, H = hidden, I = intermediate, E = experts of this layer, k = top-k.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch
import torch.nn.functional as F
from torch import nn

from .arch import activation, gate_up_down
from .classifier import LanguageClassifier
from .dispatch import keep_in_graph, run_experts
from .looped import add_looped
from .options import DEFAULTS, check_choice


@dataclass
class Routing:
    """One MoE layer's routing of N tokens, as applied.

    Attributes:
        logits: `(N, E)` float32 router logits; column 0 scores the original expert.
        experts: `(N, k)` the experts each token uses.
        weights: `(N, k)` their weights in the token's output (0 for a pick the classifier disallowed).
        allowed: `(N, k)` bool, which picks the classifier allowed; None without a classifier (all are).
        classifier_logits: the LayerMoE classifier's logits, `(B, G)` or `(N, G)` by pooling; None without one.
    """

    logits: torch.Tensor
    experts: torch.Tensor
    weights: torch.Tensor
    allowed: torch.Tensor | None = None
    classifier_logits: torch.Tensor | None = None

    def chosen(self) -> torch.Tensor:
        """`(N, E)` float 0/1: the experts each token's output takes (its allowed top-k picks)."""
        picks = torch.ones_like(self.weights) if self.allowed is None else self.allowed.to(self.weights.dtype)
        return torch.zeros_like(self.logits).scatter_(1, self.experts, picks)  # (N, E)

    def expert0_weight(self) -> torch.Tensor:
        """`(N,)` expert 0's weight in each token's output (1 = the original FFN alone)."""
        return (self.weights * (self.experts == 0)).sum(dim=-1)


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
    def like(cls, mlp: nn.Module, num_experts: int, *, init_std: float | None = 0.02) -> StackedExperts:
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
    def copies_of(cls, mlp: nn.Module, num_experts: int) -> StackedExperts:
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

    @property
    def has_bias(self) -> bool:
        return self.gate_up_bias is not None or self.down_bias is not None

    def expert(self, i: int) -> Callable[[torch.Tensor], torch.Tensor]:
        """Expert `i` of the stack as a function `(n, H) → (n, H)`."""

        def mlp(x: torch.Tensor) -> torch.Tensor:
            gate, up = F.linear(x, self.gate_up_proj[i], _row(self.gate_up_bias, i)).chunk(2, dim=-1)  # (n, I)
            return F.linear(self.act_fn(gate) * up, self.down_proj[i], _row(self.down_bias, i))  # (n, H)

        return mlp

    def forward(
        self, out: torch.Tensor, x: torch.Tensor, token: torch.Tensor, weight: torch.Tensor, counts: list[int]
    ) -> torch.Tensor:
        """Add `weight[p] · expert_e(x[token[p]])` into `out` `(N, H)`, pairs p sorted by expert, `counts[e]` each."""
        if token.shape[0] == 0:
            return keep_in_graph(out, self)
        params = (self.gate_up_proj, self.down_proj, self.gate_up_bias, self.down_bias, self.act_fn)
        return add_looped(out, x, token, weight, counts, *params)


class MoEBlock(nn.Module):
    """Drop-in replacement for a decoder layer's `mlp`.

    Expert 0 is `original`, the dense MLP itself (same module, same weights). `experts[g]` holds the new
    experts of expansion group g (one group per language-expansion step; lifelong expansion adds groups),
    and `routers[g]` their router rows; `routers[0]` also has the row of expert 0. Router logits are the
    concatenation, so column 0 is always the original expert.

    `classifier` (LayerMoE, optional) turns the MLP input into a per-token expert limit: token t may only
    use experts `< limit[t]`, and a limit of 1 sends it to expert 0 alone, at weight 1.
    `dispatch` chooses how the experts run (`dispatch.py`): "auto" (by device and grad mode) or a named path.
    `sink`, when set (see `capture.py`), receives this layer's `Routing` of every forward.
    """

    def __init__(
        self,
        *,
        original: nn.Module,
        experts: list[StackedExperts],
        routers: list[nn.Linear],
        top_k: int,
        dispatch: str = DEFAULTS["moe_dispatch"],
    ):
        super().__init__()
        self.original = original
        self.experts = nn.ModuleList(experts)
        self.routers = nn.ModuleList(routers)
        self.top_k = top_k
        self.dispatch = dispatch
        self.classifier: LanguageClassifier | None = None
        self.sink: list | None = None

    @property
    def dispatch(self) -> str:
        """How the experts run: "auto", "reference", "loop", "grouped" or "triton" (see `dispatch.py`)."""
        return self._dispatch

    @dispatch.setter
    def dispatch(self, path: str) -> None:
        check_choice("moe_dispatch", path)
        self._dispatch = path

    @property
    def num_experts(self) -> int:
        return 1 + sum(group.num_experts for group in self.experts)

    def expert(self, e: int) -> Callable[[torch.Tensor], torch.Tensor]:
        """Expert `e` of this layer (0 = the original MLP) as a function `(n, H) → (n, H)`."""
        if e == 0:
            return self.original
        for group in self.experts:
            if e <= group.num_experts:
                return group.expert(e - 1)
            e -= group.num_experts
        raise IndexError(f"this layer has {self.num_experts} experts")

    def router_logits(self, x: torch.Tensor) -> torch.Tensor:
        """`(N, H)` → float32 `(N, E)`; column 0 scores the original expert."""
        return torch.cat([router(x) for router in self.routers], dim=-1).float()

    def route(self, hidden_states: torch.Tensor) -> Routing:
        """The routing this block applies to `hidden_states` `(B, S, H)` (or `(N, H)`, one sequence)."""
        x = hidden_states.reshape(-1, hidden_states.shape[-1])  # (N, H)
        logits = self.router_logits(x)  # (N, E)
        probs = logits.softmax(dim=-1)  # (N, E)
        limit = classifier_logits = None
        if self.classifier is not None:
            sequences = hidden_states if hidden_states.dim() == 3 else hidden_states[None]  # (B, S, H)
            limit, classifier_logits = self.classifier(sequences)  # (N,), (B or N, G)
            usable = torch.arange(probs.shape[-1], device=probs.device) < limit[:, None]  # (N, E)
            probs = probs.masked_fill(~usable, 0.0)
        k = min(self.top_k, probs.shape[-1])
        weights, experts = probs.topk(k, dim=-1)  # (N, k)
        if k > 1:
            weights = weights / weights.sum(dim=-1, keepdim=True)
        allowed = None
        if limit is not None:
            allowed = experts < limit[:, None]  # (N, k)
            # Tokens confined to expert 0 use it alone, at weight 1 (their other picks get weight 0).
            alone = (limit == 1)[:, None]  # (N, 1)
            weights = torch.where(alone, (experts == 0).to(weights.dtype), weights * allowed)
        return Routing(logits, experts, weights, allowed, classifier_logits)

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        shape = hidden_states.shape
        routing = self.route(hidden_states)
        if self.sink is not None:
            self.sink.append(routing)
        return run_experts(self, hidden_states.reshape(-1, shape[-1]), routing).view(shape)


def _row(bias: torch.Tensor | None, i: int) -> torch.Tensor | None:
    return None if bias is None else bias[i]


def new_router(hidden_size: int, rows: int, *, like: torch.Tensor) -> nn.Linear:
    """A bias-free router with `rows` outputs, xavier-normal initialised as in the official code."""
    router = nn.Linear(hidden_size, rows, bias=False, dtype=like.dtype, device=like.device)
    with torch.no_grad():
        weight = torch.empty(rows, hidden_size, dtype=torch.float32, device=like.device)
        nn.init.xavier_normal_(weight)
        router.weight.copy_(weight)
    return router
