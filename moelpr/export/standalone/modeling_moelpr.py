"""MoE-LPR causal LM (standalone copy written by `moe-lpr export --format hf`).

Self-contained (torch + transformers only), loaded with `trust_remote_code=True`. The dense base is
built with `AutoModelForCausalLM.from_config(config.text_config)`, so attention, caches and generation
are the base family's own; each upcycled layer's `mlp` becomes an `MoELPRBlock`:

- expert 0 is `original`, the base MLP module itself; new experts are stacked per expansion group g:
  `experts.{g}.gate_up_proj (E_g, 2I, H)` rows [gate; up], `experts.{g}.down_proj (E_g, H, I)`;
- router logits = concatenation of `routers.{g}` (column 0 scores expert 0), softmax in float32, top-k,
  renormalised over the chosen k when k > 1 (k = 1: the raw probability scales the output).

Dispatch sorts the token–expert pairs by expert and runs each expert that was chosen on its slice only,
so a decoding step reads the weights of the chosen experts and no others.
Shapes: N = tokens, H = hidden, I = intermediate, E = experts of the layer, k = top-k, P = N·k pairs.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn
from transformers import AutoModelForCausalLM, GenerationMixin, PreTrainedModel

from .configuration_moelpr import MoELPRConfig

_ACTIVATION_NAMES = ("act_fn", "activation_fn")


def _activation(mlp: nn.Module) -> nn.Module:
    for name in _ACTIVATION_NAMES:
        if hasattr(mlp, name):
            return getattr(mlp, name)
    raise ValueError(f"{type(mlp).__name__} has no activation module ({' / '.join(_ACTIVATION_NAMES)})")


def _has_bias(mlp: nn.Module) -> bool:
    return any(isinstance(m, nn.Linear) and m.bias is not None for m in mlp.children())


class StackedExperts(nn.Module):
    """`num_experts` gated MLPs with stacked weights (same parameter names as moelpr's)."""

    def __init__(self, num_experts: int, hidden_size: int, intermediate_size: int, act_fn: nn.Module, bias: bool):
        super().__init__()
        self.num_experts = num_experts
        self.gate_up_proj = nn.Parameter(torch.zeros(num_experts, 2 * intermediate_size, hidden_size))
        self.down_proj = nn.Parameter(torch.zeros(num_experts, hidden_size, intermediate_size))
        self.gate_up_bias = nn.Parameter(torch.zeros(num_experts, 2 * intermediate_size)) if bias else None
        self.down_bias = nn.Parameter(torch.zeros(num_experts, hidden_size)) if bias else None
        self.act_fn = act_fn

    def expert(self, j: int, x: torch.Tensor) -> torch.Tensor:
        """Expert j of this group on rows `x` `(n, H)` → `(n, H)`."""
        bias = None if self.gate_up_bias is None else self.gate_up_bias[j]
        gate, up = F.linear(x, self.gate_up_proj[j], bias).chunk(2, dim=-1)  # (n, I) each
        bias = None if self.down_bias is None else self.down_bias[j]
        return F.linear(self.act_fn(gate) * up, self.down_proj[j], bias)  # (n, H)


class MoELPRBlock(nn.Module):
    """Replacement for a decoder layer's `mlp`: the original MLP (expert 0) plus new experts and routers."""

    def __init__(self, original: nn.Module, new_experts: list[int], top_k: int):
        super().__init__()
        down = original.down_proj.weight  # (H, I)
        hidden, inter = down.shape
        act, bias = _activation(original), _has_bias(original)
        self.original = original
        self.experts = nn.ModuleList(StackedExperts(n, hidden, inter, act, bias) for n in new_experts)
        self.routers = nn.ModuleList(
            nn.Linear(hidden, n + (1 if g == 0 else 0), bias=False) for g, n in enumerate(new_experts))
        self.top_k = top_k
        # global expert index e ≥ 1 -> (group, index inside the group)
        self._where = [(g, j) for g, n in enumerate(new_experts) for j in range(n)]

    @property
    def num_experts(self) -> int:
        return 1 + len(self._where)

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        shape = hidden_states.shape
        x = hidden_states.reshape(-1, shape[-1])  # (N, H)
        logits = torch.cat([router(x) for router in self.routers], dim=-1).float()  # (N, E)
        probs = logits.softmax(dim=-1)  # (N, E)
        k = min(self.top_k, probs.shape[-1])
        weights, chosen = probs.topk(k, dim=-1)  # (N, k)
        if k > 1:
            weights = weights / weights.sum(dim=-1, keepdim=True)
        pair_expert = chosen.reshape(-1)  # (P,)
        order = pair_expert.argsort(stable=True)  # (P,) pairs grouped by expert
        token = order // k  # (P,)
        pair_weight = weights.reshape(-1)[order].to(x.dtype)  # (P,)
        counts = torch.bincount(pair_expert, minlength=self.num_experts).tolist()
        xs = x[token]  # (P, H)
        out = torch.zeros_like(x)  # (N, H)
        start = 0
        for e, n in enumerate(counts):
            if n == 0:
                continue  # an expert nobody chose is never read
            rows = slice(start, start + n)
            if e == 0:
                y = self.original(xs[rows])  # (n, H)
            else:
                g, j = self._where[e - 1]
                y = self.experts[g].expert(j, xs[rows])  # (n, H)
            out.index_add_(0, token[rows], y * pair_weight[rows, None])
            start += n
        return out.view(shape)


class MoELPRForCausalLM(PreTrainedModel, GenerationMixin):
    """The upcycled causal LM `self.lm`; forward and generation are the base model's."""

    config_class = MoELPRConfig
    base_model_prefix = "lm"
    main_input_name = "input_ids"
    supports_gradient_checkpointing = True
    _supports_sdpa = True
    _supports_flash_attn = True
    _supports_flex_attn = True
    _supports_attention_backend = True
    _can_compile_fullgraph = False

    def __init__(self, config: MoELPRConfig):
        super().__init__(config)
        self.lm = AutoModelForCausalLM.from_config(config.text_config)
        layers = self.lm.get_decoder().layers
        for idx, layer in enumerate(layers):
            new_experts = [group[idx] for group in config.expert_groups]
            if sum(new_experts):
                layer.mlp = MoELPRBlock(layer.mlp, new_experts, config.num_experts_per_tok)
        self.post_init()

    def get_input_embeddings(self):
        return self.lm.get_input_embeddings()

    def set_input_embeddings(self, value):
        self.lm.set_input_embeddings(value)

    def get_output_embeddings(self):
        return self.lm.get_output_embeddings()

    def set_output_embeddings(self, value):
        self.lm.set_output_embeddings(value)

    def get_decoder(self):
        return self.lm.get_decoder()

    def _init_weights(self, module):
        self.lm._init_weights(module)

    def forward(self, input_ids=None, attention_mask=None, position_ids=None, past_key_values=None,
                inputs_embeds=None, labels=None, use_cache=None, logits_to_keep=0, **kwargs):
        return self.lm(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids,
                       past_key_values=past_key_values, inputs_embeds=inputs_embeds, labels=labels,
                       use_cache=use_cache, logits_to_keep=logits_to_keep, **kwargs)
