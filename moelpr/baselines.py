"""The paper's baselines as surgery on a dense HF causal LM: LoRA, LLaMA-Pro block expansion, LoRAMoE.

docs/method.md: the baselines train on the same data as MoE-LPR (full fine-tuning needs no surgery).
- LoRA of rank 8 (alpha 16) on all linear layers except the LM head (peft's "all-linear"); saved merged into the
  weights, so evaluation reads it as a plain dense model.
- LLaMA-Pro (Wu et al., 2024) block expansion, 12 added blocks for Qwen1.5-1.8B. The L layers are split into
  groups; after each group a copy of the group's last decoder layer is inserted, with its output projections
  (`self_attn.o_proj`, `mlp.down_proj`) set to zero, so the block adds nothing to the residual stream and the
  expanded model computes exactly what the dense one does. Only the inserted blocks train.
- LoRAMoE: LoRA experts with a softmax router on every MLP linear (`moelpr.model.loramoe`), all active; the
  paper's 8 experts of rank 180.

`moelpr.train.methods` declares how each is trained and saved.
"""

from __future__ import annotations

import copy
import os
from typing import Sequence

import torch
from torch import nn

from moelpr.errors import UserError
from moelpr.model.arch import decoder_layers
from moelpr.model.capture import moe_blocks
from moelpr.utils.atomic import atomic_output_dir

# Sub-modules of a decoder layer that write into the residual stream; zeroed in an inserted block.
OUTPUT_PROJECTIONS = ("self_attn.o_proj", "mlp.down_proj")
# Config attributes holding one entry per decoder layer (expanded together with the layers).
PER_LAYER_CONFIG_KEYS = ("layer_types", "no_rope_layers")
ADAPTER_DIR = "adapter"


def add_llama_pro_blocks(model: nn.Module, *, blocks: int | None = None, every: int | None = None) -> nn.Module:
    """LLaMA-Pro: insert identity blocks (`blocks` spread evenly, or one after every `every` layers) in place; only
    they train."""
    _check_dense(model)
    after = llama_pro_positions(len(decoder_layers(model)), blocks=blocks, every=every)
    added = expand_blocks(model, after)
    model.requires_grad_(False)
    for idx in added:
        decoder_layers(model)[idx].requires_grad_(True)
    return model


def add_lora(model: nn.Module, rank: int = 8, alpha: int = 16, target: str | Sequence[str] = "all-linear") -> nn.Module:
    """A peft LoRA model of rank `rank` on `target` ("all-linear": every linear layer but the LM head, or module
    names as a list or a comma-separated string); only the LoRA weights train."""
    from peft import LoraConfig, get_peft_model

    _check_dense(model)
    if not isinstance(rank, int) or isinstance(rank, bool) or rank < 1:
        raise UserError(f"lora_rank must be a positive integer, got {rank!r}")
    if not isinstance(alpha, (int, float)) or isinstance(alpha, bool) or alpha <= 0:
        raise UserError(f"lora_alpha must be a positive number, got {alpha!r}")
    if isinstance(target, str):
        modules = target if target == "all-linear" else [t.strip() for t in target.split(",") if t.strip()]
    else:
        modules = [str(t) for t in target]
    if not modules:
        raise UserError("lora_target is empty; use 'all-linear' or module names such as q_proj,v_proj")
    config = LoraConfig(r=rank, lora_alpha=alpha, target_modules=modules, lora_dropout=0.0, task_type="CAUSAL_LM")
    try:
        return get_peft_model(model, config)
    except ValueError as err:
        raise UserError(
            f"lora_target {target!r} does not fit {type(model).__name__}: {str(err).splitlines()[0]}"
        ) from None


def save_merged_lora(model: nn.Module, output_dir: str | os.PathLike, tokenizer=None, *, overwrite: bool = False):
    """Write a trained LoRA model atomically as a plain dense HF model (safetensors): the adapter unmerged under
    `output_dir/adapter/` for reference, then merged into the weights (`merge_and_unload`, in place: the PeftModel
    is consumed).

    Returns:
        The merged plain model (use it instead of the PeftModel).
    """
    if not (hasattr(model, "merge_and_unload") and hasattr(model, "peft_config")):
        raise UserError(f"save_merged_lora needs a peft LoRA model from add_lora, got {type(model).__name__}")
    with atomic_output_dir(output_dir, overwrite=overwrite) as tmp:
        model.save_pretrained(tmp / ADAPTER_DIR, safe_serialization=True)
        model = model.merge_and_unload()
        model.save_pretrained(tmp)
        if tokenizer is not None:
            tokenizer.save_pretrained(tmp)
    return model


def loramoe(model: nn.Module, *, num_experts: int = 8, rank: int = 180, alpha: float = 360.0):
    """The LoRAMoE baseline (docs/method.md): LoRA experts with a router on every MLP linear of a dense LM.

    Args:
        model: the dense causal LM; its MLP linears are wrapped in place and it becomes `result.lm`.
        num_experts / rank / alpha: LoRA experts per linear, their rank and scaling numerator (paper: 8, 180).

    Returns:
        A `MoELPRForCausalLM` whose LoRA experts and routers are trainable (everything else frozen).
    """
    from moelpr.model import MoELPRConfig, MoELPRForCausalLM
    from moelpr.model.loramoe import add_loramoe
    from moelpr.upcycling.freeze import set_trainable

    _check_dense(model)
    for key, value in (("loramoe_experts", num_experts), ("lora_rank", rank)):
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise UserError(f"{key} must be a positive integer, got {value!r}")
    if isinstance(alpha, bool) or not isinstance(alpha, (int, float)) or alpha <= 0:
        raise UserError(f"lora_alpha must be a positive number, got {alpha!r}")
    config = MoELPRConfig(
        text_config=model.config,
        loramoe={"experts": num_experts, "rank": rank, "alpha": alpha},
        base_model_path=getattr(model, "name_or_path", None) or None,
    )
    moe = MoELPRForCausalLM(config, lm=model)  # before the surgery, as in `upcycle`
    add_loramoe(model, num_experts=num_experts, rank=rank, alpha=alpha)
    set_trainable(moe, "loramoe")
    return moe


def llama_pro_positions(num_layers: int, *, blocks: int | None = None, every: int | None = None) -> list[int]:
    """Original layer indices after which a block is inserted.

    `every=k`: after layers k−1, 2k−1, … (one block per full group of k layers). `blocks=n`: after
    layer ⌊(i+1)·L/n⌋ − 1 for i < n, i.e. n groups as equal as possible (L=24, n=12 → every 2 layers).
    """
    if (blocks is None) == (every is None):
        raise UserError(
            "llama_pro needs exactly one of llama_pro_blocks (blocks to add) or llama_pro_every "
            "(add one after every N layers)"
        )
    value, key = (blocks, "llama_pro_blocks") if blocks is not None else (every, "llama_pro_every")
    if not isinstance(value, int) or isinstance(value, bool) or not 1 <= value <= num_layers:
        raise UserError(f"{key} must be an integer between 1 and the model's {num_layers} layers, got {value!r}")
    if every is not None:
        return list(range(every - 1, num_layers, every))
    return [(i + 1) * num_layers // blocks - 1 for i in range(blocks)]


def expand_blocks(model: nn.Module, after: Sequence[int]) -> list[int]:
    """Insert an identity copy of layer `i` after each original layer index in `after` (in place).

    Fixes every layer's `layer_idx` (KV-cache slot) and the config's layer count and per-layer lists.

    Returns:
        The indices of the inserted layers in the expanded model.
    """
    layers = decoder_layers(model)
    config = model.config
    old_count = len(layers)
    for name in OUTPUT_PROJECTIONS:
        if not isinstance(_submodule(layers[0], name), nn.Linear):
            raise UserError(
                f"llama_pro does not support {type(model).__name__}: its decoder layers have no "
                f"linear `{name}` to zero-initialise"
            )
    chosen = set(after)
    new_layers: list[nn.Module] = []
    order: list[int] = []  # original index each new layer comes from
    added: list[int] = []
    for idx, layer in enumerate(layers):
        new_layers.append(layer)
        order.append(idx)
        if idx in chosen:
            block = copy.deepcopy(layer)
            with torch.no_grad():
                for name in OUTPUT_PROJECTIONS:
                    proj = block.get_submodule(name)
                    proj.weight.zero_()
                    if proj.bias is not None:
                        proj.bias.zero_()
            added.append(len(new_layers))
            new_layers.append(block)
            order.append(idx)
    for new_idx, layer in enumerate(new_layers):
        for module in (layer, getattr(layer, "self_attn", None)):
            if module is not None and hasattr(module, "layer_idx"):
                module.layer_idx = new_idx
    decoder = model.get_decoder()
    decoder.layers = nn.ModuleList(new_layers)
    for key in PER_LAYER_CONFIG_KEYS:
        values = getattr(config, key, None)
        if isinstance(values, (list, tuple)) and len(values) == old_count:
            setattr(config, key, [values[i] for i in order])
    config.num_hidden_layers = len(new_layers)
    config.llama_pro_added_layers = added  # provenance; serialised with the config, ignored by transformers
    return added


def _check_dense(model: nn.Module) -> None:
    if hasattr(model, "peft_config"):
        raise UserError(
            f"the model already carries a peft adapter ({type(model).__name__}); start from the dense model"
        )
    if moe_blocks(model) or getattr(getattr(model, "config", None), "model_type", None) == "moelpr":
        raise UserError("baselines start from the dense model, but this one is upcycled (MoE-LPR); load the dense base")
    decoder_layers(model)


def _submodule(module: nn.Module, name: str) -> nn.Module | None:
    try:
        return module.get_submodule(name)
    except AttributeError:
        return None
