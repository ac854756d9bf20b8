"""Model surgery shared by upcycling and loading: stock decoder MLPs → `MoEBlock`s (+ LayerMoE classifiers).

`build_block` is the one construction of an MoE block (new experts, routers) from a dense MLP; `convert_layers`
applies it to every layer that gets experts. Both upcycles (`moelpr.upcycle` in memory, `moe-lpr upcycle`
streamed, which runs it on the meta device and draws only the routers for real), lifelong expansion and
`MoELPRForCausalLM.__init__` (rebuilding the layout a config describes, before the saved weights are loaded)
go through it, so none of them can disagree.
"""

from __future__ import annotations

from typing import Sequence

import torch
from torch import nn

from .arch import check_supported, decoder_layers
from .classifier import LanguageClassifier, expert_limits
from .layer import MoEBlock, StackedExperts, new_router
from .options import DEFAULTS, check_choice


def new_experts(mlp: nn.Module, count: int, expert_init: str, init_std: float) -> StackedExperts:
    """`count` new experts for the dense MLP `mlp`: its exact copies ("copy", the paper's Expert-Copy) or freshly
    initialised normal(`init_std`) ("random", Table 2's "w/o Expert-Copy" ablation)."""
    check_choice("expert_init", expert_init)
    if expert_init == "copy":
        return StackedExperts.copies_of(mlp, count)
    return StackedExperts.like(mlp, count, init_std=init_std)


def build_block(
    mlp: nn.Module,
    new_counts: Sequence[int],
    *,
    top_k: int,
    expert_init: str = DEFAULTS["expert_init"],
    init_std: float = 0.02,
    dispatch: str = DEFAULTS["moe_dispatch"],
    router_device: torch.device | str | None = None,
) -> MoEBlock:
    """An MoE block around the dense MLP `mlp` (expert 0) with `new_counts[g]` new experts in expansion group g.

    Routers are xavier-normal, drawn in group order, on `router_device` (default: the MLP's device; the streamed
    upcycle builds a meta skeleton with real CPU routers, so it draws exactly the routers a real model draws).
    """
    like = mlp.down_proj.weight
    router_like = like if router_device is None else torch.empty(0, dtype=like.dtype, device=router_device)
    experts = [new_experts(mlp, n, expert_init, init_std) for n in new_counts]
    routers = [new_router(like.shape[0], n + (g == 0), like=router_like) for g, n in enumerate(new_counts)]
    return MoEBlock(original=mlp, experts=experts, routers=routers, top_k=top_k, dispatch=dispatch)


def convert_layers(
    lm: nn.Module,
    expert_groups: Sequence[Sequence[int]],
    top_k: int,
    classifier_layers: Sequence[int] = (),
    classifier_groups: int = 2,
    classifier_pooling: str = DEFAULTS["classifier_pooling"],
    expert_init: str = DEFAULTS["expert_init"],
    dispatch: str = DEFAULTS["moe_dispatch"],
    router_device: torch.device | str | None = None,
) -> None:
    """Replace `layer.mlp` by `build_block(...)` wherever a layer gets new experts, in layer order.

    Args:
        lm: a stock HF causal LM (modified in place).
        expert_groups: `expert_groups[g][l]` = new experts of expansion group g in layer l.
        top_k: experts per token (capped at each layer's expert count, as LayerMoE does).
        classifier_layers / classifier_groups / classifier_pooling: LayerMoE classifiers to attach.
        expert_init: "copy" or "random" (`new_experts`).
        dispatch: the blocks' `MoEBlock.dispatch`.
        router_device: where routers are created (`build_block`).
    """
    check_choice("expert_init", expert_init)
    check_supported(lm)
    std = getattr(getattr(lm, "config", None), "initializer_range", 0.02)
    for idx, layer in enumerate(decoder_layers(lm)):
        new_counts = [group[idx] for group in expert_groups]
        if sum(new_counts) > 0:
            layer.mlp = build_block(
                layer.mlp,
                new_counts,
                top_k=top_k,
                expert_init=expert_init,
                init_std=std,
                dispatch=dispatch,
                router_device=router_device,
            )
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
