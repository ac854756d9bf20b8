"""`--format mixtral | qwen3_moe | qwen2_moe`: a stock transformers MoE checkpoint, no remote code.

Only exact conversions are written. Our routing is softmax(float32) → top-k → renormalise when k > 1, with
expert 0 = the original MLP and router rows = the concatenated group routers; the native blocks compute
the same when:
- Mixtral: every layer has the same E and k ≥ 2 (Mixtral always renormalises; our k = 1 uses the raw prob);
- Qwen3MoE / Qwen2MoE: all MoE layers share E; dense layers go to `mlp_only_layers` (they use
  `intermediate_size`); `norm_topk_prob = k > 1`. Qwen2MoE always adds `sigmoid(gate(x)) · shared(x)`, so
  the shared expert is sized 0 (its output is exactly 0) and its gate is zero.
Every check is collected, so one error lists all the reasons; after the conversion, the logits of both
models on a few tokens are compared, and nothing is written if they differ.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass, field

import torch

from moelpr.model.arch import decoder_layers, gate_up_down
from moelpr.model.layer import MoEBlock

# fields copied verbatim from the base config when present (rope, eps, sliding window, tying, special ids)
COMMON_FIELDS = (
    "vocab_size",
    "hidden_size",
    "num_hidden_layers",
    "num_attention_heads",
    "num_key_value_heads",
    "head_dim",
    "hidden_act",
    "max_position_embeddings",
    "rms_norm_eps",
    "rope_parameters",
    "attention_dropout",
    "initializer_range",
    "tie_word_embeddings",
    "bos_token_id",
    "eos_token_id",
    "pad_token_id",
    "use_cache",
)


@dataclass(frozen=True)
class NativeFormat:
    """What one stock MoE family can express."""

    config_class: str
    model_class: str
    bases: tuple[str, ...]  # base model_types with identical attention/norm/embedding weights
    dense_layers: bool  # can a layer stay a plain MLP (`mlp_only_layers`)
    always_renormalises: bool  # Mixtral: yes; Qwen: `norm_topk_prob`
    shared_expert: bool  # Qwen2MoE's always-on shared expert (exported with size 0)
    extra_fields: tuple[str, ...] = field(default=())  # further base fields to copy


FORMATS: dict[str, NativeFormat] = {
    "mixtral": NativeFormat(
        "MixtralConfig",
        "MixtralForCausalLM",
        ("llama", "mistral"),
        dense_layers=False,
        always_renormalises=True,
        shared_expert=False,
        extra_fields=("sliding_window",),
    ),
    "qwen3_moe": NativeFormat(
        "Qwen3MoeConfig",
        "Qwen3MoeForCausalLM",
        ("qwen3",),
        dense_layers=True,
        always_renormalises=False,
        shared_expert=False,
        extra_fields=("attention_bias",),
    ),
    "qwen2_moe": NativeFormat(
        "Qwen2MoeConfig",
        "Qwen2MoeForCausalLM",
        ("qwen2",),
        dense_layers=True,
        always_renormalises=False,
        shared_expert=True,
        extra_fields=("use_sliding_window", "sliding_window", "max_window_layers", "layer_types"),
    ),
}


def _expert_sizes(model) -> tuple[list[int], list[int]]:
    """Per-layer expert counts and per-layer MLP intermediate sizes."""
    counts, inter = [], []
    for layer in decoder_layers(model.lm):
        mlp = layer.mlp
        counts.append(mlp.num_experts if isinstance(mlp, MoEBlock) else 1)
        dense = mlp.original if isinstance(mlp, MoEBlock) else mlp
        inter.append(gate_up_down(dense)[1].shape[1])
    return counts, inter


def _describe_counts(counts: dict[int, int]) -> str:
    """'layers 0-2 have 4 experts, layer 3 has 2' from {layer: experts}, grouped by count."""
    by_count: dict[int, list[int]] = {}
    for layer, n in counts.items():
        by_count.setdefault(n, []).append(layer)
    parts = []
    for n, layers in by_count.items():
        runs, start = [], layers[0]
        for prev, cur in zip(layers, layers[1:] + [None]):
            if cur != prev + 1:
                runs.append(str(start) if start == prev else f"{start}-{prev}")
                start = cur
        many = len(layers) > 1
        parts.append(
            f"layer{'s' if many else ''} {', '.join(runs)} ha{'ve' if many else 's'} {n} expert{'s' if n != 1 else ''}"
        )
    return ", ".join(parts)


def unsupported_reasons(model, fmt: str) -> list[str]:
    """Every reason why `model` cannot be written exactly in `fmt` (empty when it can)."""
    spec, cfg = FORMATS[fmt], model.config
    base = cfg.text_config
    reasons = []
    if cfg.classifier_layers:
        reasons.append(f"LayerMoE classifiers in layers {list(cfg.classifier_layers)} have no {fmt} equivalent")
    if base.model_type not in spec.bases:
        reasons.append(f"base model_type {base.model_type!r} is not {' or '.join(spec.bases)}")
    else:
        if getattr(base, "mlp_bias", False):
            reasons.append("the base MLP has biases (mlp_bias=True)")
        if fmt == "mixtral" and getattr(base, "attention_bias", False):
            reasons.append("the base attention has biases (attention_bias=True); Mixtral has none")
        if fmt == "qwen3_moe" and getattr(base, "use_sliding_window", False):
            types = set(getattr(base, "layer_types", None) or [])
            if types != {"sliding_attention"}:
                reasons.append(
                    "the base mixes sliding-window and full-attention layers; Qwen3MoE applies one window to all"
                )
    counts, inter = _expert_sizes(model)
    moe_counts = {i: n for i, n in enumerate(counts) if n > 1}
    if spec.dense_layers:
        if len(set(moe_counts.values())) > 1:
            reasons.append(f"MoE layers must share one expert count ({_describe_counts(moe_counts)})")
    elif len(set(counts)) > 1:
        reasons.append(f"every layer must have the same expert count ({_describe_counts(dict(enumerate(counts)))})")
    if len(set(inter)) > 1:
        reasons.append(f"MLP intermediate sizes differ across layers ({inter})")
    k = cfg.num_experts_per_tok
    if spec.always_renormalises and k == 1:
        reasons.append(
            f"top_k=1 ({spec.model_class.removesuffix('ForCausalLM')} renormalises the top-k weights; "
            "ours scale by the raw probability)"
        )
    return reasons


def native_config(model, fmt: str):
    """The stock config of `fmt` for `model` (call only when `unsupported_reasons` is empty)."""
    import transformers

    spec, cfg = FORMATS[fmt], model.config
    base = cfg.text_config
    counts, inter = _expert_sizes(model)
    experts, k = max(counts), cfg.num_experts_per_tok
    fields = {name: getattr(base, name) for name in COMMON_FIELDS + spec.extra_fields if hasattr(base, name)}
    fields.update(num_experts_per_tok=k, router_aux_loss_coef=cfg.aux_loss_coef, output_router_logits=False)
    if fmt == "mixtral":
        fields.update(intermediate_size=inter[0], num_local_experts=experts, router_jitter_noise=0.0)
        fields.setdefault("sliding_window", None)  # Llama has none
    else:
        fields.update(
            intermediate_size=inter[0],
            moe_intermediate_size=inter[0],
            num_experts=experts,
            decoder_sparse_step=1,
            norm_topk_prob=k > 1,
            mlp_only_layers=[i for i, n in enumerate(counts) if n == 1],
        )
    if fmt == "qwen3_moe":
        window = getattr(base, "sliding_window", None) if getattr(base, "use_sliding_window", False) else None
        fields.update(use_sliding_window=window is not None, sliding_window=window)
    if fmt == "qwen2_moe":
        fields.update(shared_expert_intermediate_size=0, qkv_bias=True)  # Qwen2 attention always has q/k/v biases
    fields["dtype"] = model.dtype
    return getattr(transformers, spec.config_class)(**fields)


def native_state_dict(model, fmt: str) -> dict[str, torch.Tensor]:
    """Our weights under the stock family's (fused, in-memory) parameter names."""
    spec = FORMATS[fmt]
    state = {}
    mlp_prefixes = []
    for idx, layer in enumerate(decoder_layers(model.lm)):
        block = layer.mlp
        if not isinstance(block, MoEBlock):
            continue
        prefix = f"model.layers.{idx}.mlp."
        mlp_prefixes.append(prefix)
        gate_up, down, _, _ = gate_up_down(block.original)  # (2I, H) rows [gate; up], (H, I)
        stacks_gate_up = [gate_up[None]] + [group.gate_up_proj for group in block.experts]
        stacks_down = [down[None]] + [group.down_proj for group in block.experts]
        state[prefix + "gate.weight"] = torch.cat([r.weight for r in block.routers]).detach()  # (E, H)
        state[prefix + "experts.gate_up_proj"] = torch.cat(stacks_gate_up).detach()  # (E, 2I, H)
        state[prefix + "experts.down_proj"] = torch.cat(stacks_down).detach()  # (E, H, I)
        if spec.shared_expert:
            hidden = down.shape[0]
            zeros = dict(dtype=down.dtype, device=down.device)
            state[prefix + "shared_expert.gate_proj.weight"] = torch.zeros(0, hidden, **zeros)
            state[prefix + "shared_expert.up_proj.weight"] = torch.zeros(0, hidden, **zeros)
            state[prefix + "shared_expert.down_proj.weight"] = torch.zeros(hidden, 0, **zeros)
            state[prefix + "shared_expert_gate.weight"] = torch.zeros(1, hidden, **zeros)
    for name, tensor in model.lm.state_dict().items():
        if not any(name.startswith(p) for p in mlp_prefixes):
            state[name] = tensor.detach()
    return state


def build_native(model, fmt: str):
    """A stock `fmt` model holding `model`'s weights (a new module; weights are copied)."""
    import transformers

    config = native_config(model, fmt)
    with warnings.catch_warnings():  # Qwen2MoE's size-0 shared expert: "Initializing zero-element tensors is a no-op"
        warnings.filterwarnings("ignore", message="Initializing zero-element tensors")
        target = getattr(transformers, FORMATS[fmt].model_class)(config)
    target = target.to(dtype=model.dtype, device=model.device)
    target.load_state_dict(native_state_dict(model, fmt), strict=True)
    target.generation_config = model.generation_config
    return target.eval()


@torch.no_grad()
def max_logit_difference(ours, theirs, *, tokens: int = 16, seed: int = 0) -> float:
    """Max |Δlogits| of the two models on two random sequences (a check that the conversion is exact)."""
    vocab = ours.config.text_config.vocab_size
    ids = torch.randint(0, vocab, (2, tokens), generator=torch.Generator().manual_seed(seed)).to(ours.device)
    was_training = ours.training
    ours.eval()
    try:
        diff = (ours(input_ids=ids).logits.float() - theirs(input_ids=ids).logits.float()).abs().max()
    finally:
        ours.train(was_training)
    return float(diff)
