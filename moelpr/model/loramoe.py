"""LoRAMoE (Dou et al., 2023), the MoE-LPR paper's baseline (docs/method.md §3): LoRA experts on the FFN.

Each linear of a decoder layer's MLP (gate/up/down, or Phi-3's fused gate_up/down) keeps its frozen weight
W0 and gets E LoRA experts B_e·A_e mixed by a softmax router over all of them (every expert active):

    y = W0·x + (α/r) · Σ_e G_e(x) · B_e A_e x,   G(x) = softmax(W_g·x) in float32.

The paper's run uses E = 8, r = 180. LoRAMoE's localized balancing constraint needs a task-type label per
example and is not part of this baseline. B starts at zero (as peft's LoRA), so the model equals the dense
one until it trains. Shapes: N = tokens, D_in / D_out = the linear's sizes, E experts, r rank.
"""

from __future__ import annotations

import math

import torch
from torch import nn

from .arch import MLP_LAYOUTS, check_supported, decoder_layers, mlp_layout


class LoRAMoELinear(nn.Module):
    """A frozen `nn.Linear` (`base`) plus `num_experts` LoRA experts and their router."""

    def __init__(self, base: nn.Linear, *, num_experts: int, rank: int, alpha: float):
        super().__init__()
        kw = {"dtype": base.weight.dtype, "device": base.weight.device}
        out_features, in_features = base.weight.shape
        self.base = base
        self.num_experts, self.rank, self.scaling = num_experts, rank, alpha / rank
        self.lora_A = nn.Parameter(torch.empty(num_experts * rank, in_features, **kw))  # (E·r, D_in), experts stacked
        self.lora_B = nn.Parameter(torch.zeros(out_features, num_experts * rank, **kw))  # (D_out, E·r)
        self.lora_router = nn.Linear(in_features, num_experts, bias=False, **kw)
        with torch.no_grad():
            for e in range(num_experts):  # peft's LoRA init per expert: kaiming-uniform A, zero B
                nn.init.kaiming_uniform_(self.lora_A[e * rank : (e + 1) * rank], a=math.sqrt(5))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        gates = self.lora_router(x).float().softmax(dim=-1).to(x.dtype)  # (..., E)
        h = x @ self.lora_A.t()  # (..., E·r)
        h = h * gates.repeat_interleave(self.rank, dim=-1)  # each expert's r rows scaled by its gate
        return self.base(x) + self.scaling * (h @ self.lora_B.t())  # (..., D_out)


def add_loramoe(lm: nn.Module, *, num_experts: int, rank: int, alpha: float) -> None:
    """Wrap every MLP linear of every decoder layer of a stock HF causal LM in a `LoRAMoELinear` (in place)."""
    check_supported(lm)
    for layer in decoder_layers(lm):
        mlp = layer.mlp
        for name in MLP_LAYOUTS[mlp_layout(mlp)].values():
            setattr(mlp, name, LoRAMoELinear(getattr(mlp, name), num_experts=num_experts, rank=rank, alpha=alpha))
