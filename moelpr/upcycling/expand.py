"""Grow an upcycled model: LayerMoE's lifelong expansion (one more expert group) and language-group classifiers.

Both are surgery on a `MoELPRForCausalLM` in place, recorded in its config, built with the one block construction
of `moelpr.model.convert`. docs/method.md §4.
"""

from __future__ import annotations

from typing import Sequence

from torch import nn

from moelpr.model.arch import decoder_layers
from moelpr.model.capture import moe_blocks
from moelpr.model.classifier import expert_limits
from moelpr.model.convert import attach_classifiers, build_block, new_experts
from moelpr.model.errors import UserError
from moelpr.model.layer import MoEBlock, new_router
from moelpr.model.options import check_choice


def add_expert_group(lm: nn.Module, new_experts_per_layer: Sequence[int]) -> None:
    """Lifelong expansion: append one expansion group (copies of expert 0 and new router rows) to every layer.

    Layers that are still dense become MoE blocks (with empty earlier groups), so group indices stay aligned.
    """
    layers = decoder_layers(lm)
    if len(new_experts_per_layer) != len(layers):
        raise UserError(
            f"the new group lists {len(new_experts_per_layer)} counts but the model has {len(layers)} layers"
        )
    blocks = [layer.mlp for layer in layers if isinstance(layer.mlp, MoEBlock)]
    prior, top_k, dispatch = len(blocks[0].experts), blocks[0].top_k, blocks[0].dispatch
    for layer, n in zip(layers, new_experts_per_layer):
        if isinstance(layer.mlp, MoEBlock):
            block = layer.mlp
            block.experts.append(new_experts(block.original, n, "copy", 0.0))
            like = block.original.down_proj.weight
            block.routers.append(new_router(like.shape[0], n, like=like))
        elif n:
            layer.mlp = build_block(layer.mlp, [0] * prior + [n], top_k=top_k, dispatch=dispatch)


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
    check_choice("classifier_pooling", pooling)
    attach_classifiers(model.lm, layers, num_classes, pooling)
    model.config.classifier_layers = sorted(layers)
    model.config.classifier_groups = num_classes
    model.config.classifier_pooling = pooling
