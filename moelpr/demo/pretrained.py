"""`moe-lpr demo --base DIR`: the whole comparison from a local pretrained model instead of the base trained here.

The base row is the given Hugging Face causal LM (evaluated, not trained); every other row starts from it, with
its tokenizer, on the built-in corpora or the user's. `PAPER` (`--sizes paper`) carries the papers' settings for
real models (docs/method.md §3): learning rate 5e-5 for stage 1, stage 2 and every baseline, cosine, 1 epoch;
1,024-token blocks in stage 1 and the baselines, 512 in stage 2; 6 experts (5 new), top-2; a replay of 0.575 % of
the stage-1 tokens (the paper's 0.138 B original-language tokens against 24 B) with twice as many new-language
tokens in the review (old:new = 1:2), one epoch: stage 2 takes about 3.4 % of stage 1's steps, as in the paper.
The token budget `--tokens N` (stage-1 tokens, all new languages together) sets stage 1's length; the baselines
train stage 1 + stage 2 steps on the same text plus the replay. The batch is 64 blocks (8 × 8 accumulation), an
eighth of the paper's 512, so that a budget of tens of millions of tokens still gives hundreds of steps.

`PAPER` is defined in moelpr.demo.settings with the other presets. `fit_sizes` fits a preset to the model: its layers and widths (recorded, and used by the diagnosis), LLaMA-Pro's
added blocks (half the layers, as 12 on 24), LoRAMoE's rank (180/2,048 of the width), LayerMoE's budget (40 % of
MoE-LPR's new experts, as 48 of 120 on Qwen1.5-1.8B) and classifier layers (7 of 24).
"""

from __future__ import annotations

import dataclasses
import json
import math
from pathlib import Path

from moelpr.demo.settings import PAPER, DemoSizes
from moelpr.errors import UserError


def check_base(path: Path) -> None:
    """A local dense Hugging Face causal LM directory with its tokenizer, or a one-line `UserError`."""
    if not (path / "config.json").is_file():
        raise UserError(f"--base {path} is not a model directory (no config.json); give a local pretrained model")
    config = json.loads((path / "config.json").read_text())
    if "moelpr" in str(config.get("model_type", "")) or "experts_per_layer" in config:
        raise UserError(f"--base {path} is an MoE-LPR model; give the dense model it was upcycled from")
    if not any((path / name).is_file() for name in ("tokenizer.json", "tokenizer_config.json", "tokenizer.model")):
        raise UserError(f"--base {path} has no tokenizer; save it beside the model (tokenizer.save_pretrained)")


def fit_sizes(sizes: DemoSizes, base: Path, tokens: int | None, n_new: int) -> DemoSizes:
    """`sizes` fitted to the model in `base` and scaled by the stage-1 token budget `tokens` (see the module
    docstring); the paper preset needs `tokens`, a smaller preset keeps its own budget without it."""
    from transformers import AutoConfig

    config = AutoConfig.from_pretrained(base)
    config = getattr(config, "text_config", None) or config
    layers, hidden = config.num_hidden_layers, config.hidden_size
    paper = sizes is PAPER  # the paper preset scales with the model; a smaller one (quick) keeps its own values
    context = getattr(config, "max_position_embeddings", None) or sizes.cutoff_len
    cutoff = min(sizes.cutoff_len, context)
    fitted = dataclasses.replace(
        sizes,
        hidden_size=hidden,
        num_layers=layers,
        intermediate_size=config.intermediate_size,
        num_heads=config.num_attention_heads,
        cutoff_len=cutoff,
        stage2_cutoff_len=None if sizes.stage2_cutoff_len is None else min(sizes.stage2_cutoff_len, cutoff),
        base_new_share=0.0,
        llama_pro_blocks=max(1, layers // 2) if paper else min(sizes.llama_pro_blocks, layers),
        loramoe_rank=max(1, round(hidden * 180 / 2048)) if paper else sizes.loramoe_rank,
        layermoe_budget=layers + math.ceil(0.4 * (sizes.num_experts - 1) * layers)
        if paper
        else max(sizes.layermoe_budget, 2 * layers),
        classifier_top_k=max(1, round(layers * 7 / 24)) if paper else sizes.classifier_top_k,
    )
    if tokens is None:
        if sizes.stage1_steps <= 0:
            raise UserError("--sizes paper scales with a token budget: give --tokens N (stage-1 tokens in all)")
        return fitted
    if tokens <= 0:
        raise UserError(f"--tokens must be a positive number of stage-1 tokens, got {tokens}")
    per_step = fitted.batch_size * fitted.gradient_accumulation * cutoff
    return dataclasses.replace(
        fitted, new_tokens_per_language=max(1, tokens // n_new), stage1_steps=max(1, math.ceil(tokens / per_step))
    )


def embedding_share(base: Path) -> float:
    """The token embeddings' and the LM head's share of the parameters of the safetensors checkpoint in `base`
    (a tied head counted once), read from the files' headers without loading the weights."""
    from safetensors import safe_open

    total = embeddings = 0
    for path in sorted(base.glob("*.safetensors")):
        with safe_open(str(path), framework="pt") as f:
            for name in f.keys():
                numel = math.prod(f.get_slice(name).get_shape())
                total += numel
                embeddings += numel if name.endswith(("embed_tokens.weight", "lm_head.weight")) else 0
    if not total:
        raise UserError(f"--base {base} has no safetensors weights; re-save it with save_pretrained")
    return embeddings / total
