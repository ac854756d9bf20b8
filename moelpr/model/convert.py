"""Model surgery shared by upcycling and loading: stock decoder MLPs → `MoEBlock`s (+ LayerMoE classifiers).

`convert_layers` is what both `moelpr.upcycle` (on a dense model) and `MoELPRForCausalLM.__init__` (rebuilding
the layout a config describes, before the saved weights are loaded) run, so the two can never disagree.
"""

from __future__ import annotations

from typing import Sequence

from torch import nn

from .arch import check_supported, decoder_layers
from .classifier import LanguageClassifier, expert_limits
from .errors import UserError
from .layer import MoEBlock, StackedExperts, new_router

EXPERT_INITS = ("copy", "random")
"""How new experts start: "copy" = exact copies of the original FFN (the paper's Expert-Copy), "random" =
freshly initialised (Table 2's "w/o Expert-Copy" ablation)."""


def convert_layers(
    lm: nn.Module,
    expert_groups: Sequence[Sequence[int]],
    top_k: int,
    classifier_layers: Sequence[int] = (),
    classifier_groups: int = 2,
    classifier_pooling: str = "sequence",
    expert_init: str = "copy",
) -> None:
    """Replace `layer.mlp` by an `MoEBlock` wherever a layer gets new experts.

    Args:
        lm: a stock HF causal LM (modified in place).
        expert_groups: `expert_groups[g][l]` = new experts of expansion group g in layer l.
        top_k: experts per token (capped at each layer's expert count, as LayerMoE does).
        classifier_layers / classifier_groups / classifier_pooling: LayerMoE classifiers to attach.
        expert_init: one of `EXPERT_INITS`.
    """
    if expert_init not in EXPERT_INITS:
        raise UserError(f"expert_init must be one of {', '.join(EXPERT_INITS)}, got {expert_init!r}")
    check_supported(lm)
    std = getattr(getattr(lm, "config", None), "initializer_range", 0.02)
    for idx, layer in enumerate(decoder_layers(lm)):
        new_counts = [group[idx] for group in expert_groups]
        if sum(new_counts) == 0:
            continue
        mlp = layer.mlp
        like = mlp.down_proj.weight
        if expert_init == "copy":
            experts = [StackedExperts.copies_of(mlp, n) for n in new_counts]
        else:
            experts = [StackedExperts.like(mlp, n, init_std=std) for n in new_counts]
        routers = [new_router(like.shape[0], n + (1 if g == 0 else 0), like=like) for g, n in enumerate(new_counts)]
        layer.mlp = MoEBlock(original=mlp, experts=experts, routers=routers, top_k=top_k)
    if classifier_layers:
        attach_classifiers(lm, classifier_layers, classifier_groups, classifier_pooling)


def attach_classifiers(lm: nn.Module, layers: Sequence[int], num_classes: int, pooling: str) -> None:
    """Put a LayerMoE language-group classifier in front of the router of each listed layer (in place)."""
    blocks = decoder_layers(lm)
    for idx in layers:
        block = blocks[idx].mlp
        like = block.routers[0].weight
        limits = expert_limits([group.num_experts for group in block.experts], num_classes)
        block.classifier = LanguageClassifier(
            hidden_size=like.shape[1], expert_limits=limits, pooling=pooling, like=like
        )
