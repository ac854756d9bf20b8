"""Upcycling: turn the MLPs of a stock HF causal LM into MoE-LPR blocks, in place.

Expert 0 of every converted layer is the original MLP module itself; new experts start as exact copies
("Expert-Copy", method.md §1.1); each router is `Linear(H, E, bias=False)` with xavier-normal init.
With k ≥ 2 the upcycled model therefore computes exactly what the dense model computes.
"""

from __future__ import annotations

from typing import Sequence

from torch import nn

from moelpr.model.arch import check_supported, decoder_layers
from moelpr.model.capture import moe_blocks
from moelpr.model.classifier import expert_limits
from moelpr.model.convert import attach_classifiers, convert_layers
from moelpr.model.errors import UserError
from moelpr.model.layer import MoEBlock, StackedExperts, new_router


def experts_per_layer_from(
    num_experts: int | Sequence[int], num_layers: int, layers: Sequence[int] | None = None
) -> list[int]:
    """Normalise `num_experts` (one count, or one per layer) and `layers` into a per-layer list (1 = dense)."""
    if layers is not None:
        bad = [i for i in layers if not isinstance(i, int) or not 0 <= i < num_layers]
        if bad:
            raise UserError(f"unknown layer index {bad[0]}: the model has {num_layers} layers (0..{num_layers - 1})")
    if isinstance(num_experts, int) and not isinstance(num_experts, bool):
        if num_experts < 2:
            raise UserError(f"num_experts must be at least 2 (the original expert plus a new one), got {num_experts}")
        chosen = set(range(num_layers) if layers is None else layers)
        return [num_experts if i in chosen else 1 for i in range(num_layers)]
    counts = list(num_experts)
    if len(counts) != num_layers:
        raise UserError(
            f"num_experts lists {len(counts)} counts but the model has {num_layers} layers; give one per layer"
        )
    if any(not isinstance(n, int) or isinstance(n, bool) or n < 1 for n in counts):
        raise UserError(f"per-layer expert counts must be integers ≥ 1 (1 = layer stays dense), got {counts}")
    if layers is not None:
        raise UserError("give either a per-layer num_experts list or `layers`, not both")
    if max(counts) < 2:
        raise UserError("every layer has 1 expert: nothing to upcycle; use counts ≥ 2 for the layers to expand")
    return counts


def check_top_k(top_k: int, experts_per_layer: Sequence[int]) -> None:
    most = max(experts_per_layer)
    if not isinstance(top_k, int) or top_k < 1 or top_k > most:
        raise UserError(f"top_k must be between 1 and the number of experts ({most}), got {top_k}")


def add_expert_group(lm: nn.Module, new_experts_per_layer: Sequence[int]) -> None:
    """Lifelong expansion: append one expansion group (copies of expert 0 and new router rows) to every layer.

    Layers that are still dense become MoE blocks (with empty earlier groups), so group indices stay aligned.
    """
    layers = decoder_layers(lm)
    if len(new_experts_per_layer) != len(layers):
        raise UserError(
            f"the new group lists {len(new_experts_per_layer)} counts but the model has {len(layers)} layers"
        )
    prior = next((len(l.mlp.experts) for l in layers if isinstance(l.mlp, MoEBlock)), 0)
    for layer, n in zip(layers, new_experts_per_layer):
        if not isinstance(layer.mlp, MoEBlock):
            if n == 0:
                continue
            mlp = layer.mlp
            like, hidden = mlp.down_proj.weight, mlp.down_proj.weight.shape[0]
            empties = [StackedExperts.copies_of(mlp, 0) for _ in range(prior)]
            routers = [new_router(hidden, 1 if g == 0 else 0, like=like) for g in range(prior)]
            top_k = next(l.mlp.top_k for l in layers if isinstance(l.mlp, MoEBlock))
            layer.mlp = MoEBlock(original=mlp, experts=empties, routers=routers, top_k=top_k)
        block = layer.mlp
        like = block.original.down_proj.weight
        block.experts.append(StackedExperts.copies_of(block.original, n))
        first = len(block.routers) == 0  # group 0's router also scores expert 0
        block.routers.append(new_router(like.shape[0], n + int(first), like=like))


def expand(model, new_experts_per_layer: Sequence[int]) -> int:
    """Lifelong expansion of a `MoELPRForCausalLM`: add one expansion group and record it in the config.

    Args:
        model: the MoE-LPR model (changed in place).
        new_experts_per_layer: new experts per decoder layer for the new group (0 = none in that layer).

    Returns:
        The new group's index in `config.expert_groups` (its corpora have `group:` index + 1).
    """
    config = model.config
    counts = list(new_experts_per_layer)
    if any(not isinstance(n, int) or isinstance(n, bool) or n < 0 for n in counts) or sum(counts) == 0:
        raise UserError(f"new experts per layer must be integers ≥ 0 with at least one > 0, got {counts}")
    add_expert_group(model.lm, counts)  # checks the layer count
    config.expert_groups = [list(group) for group in config.expert_groups] + [counts]
    config.experts_per_layer = [n + new for n, new in zip(config.experts_per_layer, counts)]
    for block in moe_blocks(model):  # the last class of an existing classifier may now use the new experts
        if block.classifier is not None:
            block.classifier.limits = expert_limits(
                [group.num_experts for group in block.experts], len(block.classifier.limits)
            )
    return len(config.expert_groups) - 1


def upcycle(
    model: nn.Module,
    num_experts: int | Sequence[int] = 4,
    top_k: int = 2,
    layers: Sequence[int] | None = None,
    expert_init: str = "copy",
    **settings,
):
    """Turn a loaded dense `AutoModelForCausalLM` into an MoE-LPR model (`MoELPRForCausalLM`).

    Args:
        model: the dense causal LM; its layers are converted in place and it becomes `result.lm`.
        num_experts: experts per MoE layer counting the original one, or one count per layer (1 = dense).
        top_k: experts per token.
        layers: which layers to upcycle (default: all); only with a single `num_experts`.
        expert_init: "copy" (new experts = copies of the original FFN, the paper's Expert-Copy) or "random"
            (freshly initialised: the "w/o Expert-Copy" ablation; the model then no longer equals the dense one).
        **settings: further `MoELPRConfig` fields (loss coefficients and forms, ...).

    Returns:
        The MoE-LPR model, with the stage-1 trainable set (new experts + routers; the rest frozen).
    """
    from moelpr.checkpoint import base_fingerprint
    from moelpr.model import MoELPRConfig, MoELPRForCausalLM
    from moelpr.moe.freeze import set_trainable

    if isinstance(model, MoELPRForCausalLM) or moe_blocks(model):
        raise UserError(
            f"{type(model).__name__} is already upcycled; add languages to it with lifelong expansion instead"
        )
    check_supported(model)
    counts = experts_per_layer_from(num_experts, len(decoder_layers(model)), layers)
    check_top_k(top_k, counts)
    config = MoELPRConfig(
        text_config=model.config,
        experts_per_layer=counts,
        num_experts_per_tok=top_k,
        base_model_path=getattr(model, "name_or_path", None) or None,
        base_fingerprint=base_fingerprint(model.state_dict()),
        expert_init=expert_init,
        **settings,
    )
    # Wrap first, convert second: the wrapper's post_init initialises every module it has not seen initialised,
    # which would redraw the xavier-normal routers with the base model's normal(initializer_range).
    moe = MoELPRForCausalLM(config, lm=model)
    convert_layers(model, config.expert_groups, top_k, expert_init=expert_init)
    set_trainable(moe, "stage1")
    return moe


def loramoe(model: nn.Module, *, num_experts: int = 8, rank: int = 180, alpha: float = 360.0):
    """The LoRAMoE baseline (method.md §1.3): LoRA experts with a router on every MLP linear of a dense LM.

    Args:
        model: the dense causal LM; its MLP linears are wrapped in place and it becomes `result.lm`.
        num_experts / rank / alpha: LoRA experts per linear, their rank and scaling numerator (paper: 8, 180).

    Returns:
        A `MoELPRForCausalLM` whose LoRA experts and routers are trainable (everything else frozen).
    """
    from moelpr.model import MoELPRConfig, MoELPRForCausalLM
    from moelpr.model.loramoe import add_loramoe
    from moelpr.moe.freeze import set_trainable

    if isinstance(model, MoELPRForCausalLM) or moe_blocks(model):
        raise UserError(f"{type(model).__name__} is upcycled; LoRAMoE is a baseline on the dense model")
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


def add_classifiers(model, layers: Sequence[int], num_classes: int = 2, pooling: str = "sequence") -> None:
    """LayerMoE stage 2: add classifiers to an MoE-LPR model's `layers` and record them in its config.

    Args:
        model: a `MoELPRForCausalLM`.
        layers: MoE layer indices (LayerMoE picks the K layers of highest cross-lingual similarity).
        num_classes: language groups (2 after one expansion; 3 after G0 → G1 → G2).
        pooling: "sequence" (official code) or "token".
    """
    moe_layers = model.config.moe_layers
    if len(layers) > len(moe_layers):
        raise UserError(
            f"{len(layers)} classifier layers requested but the model has only {len(moe_layers)} MoE layers"
        )
    bad = [i for i in layers if i not in moe_layers]
    if bad:
        raise UserError(f"classifier layer {bad[0]} is not an MoE layer; choose among {moe_layers}")
    if num_classes < 2:
        raise UserError(f"a classifier needs at least 2 language groups, got {num_classes}")
    if pooling not in ("sequence", "token"):
        raise UserError(f"classifier pooling must be 'sequence' or 'token', got {pooling!r}")
    attach_classifiers(model.lm, layers, num_classes, pooling)
    model.config.classifier_layers = sorted(layers)
    model.config.classifier_groups = num_classes
    model.config.classifier_pooling = pooling
