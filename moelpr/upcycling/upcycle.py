"""Upcycling: turn the MLPs of a stock HF causal LM into MoE-LPR blocks, in place.

Expert 0 of every converted layer is the original MLP module itself; new experts start as exact copies
("Expert-Copy", docs/method.md §1); each router is `Linear(H, E, bias=False)` with xavier-normal init.
With k ≥ 2 the upcycled model therefore computes exactly what the dense model computes.
"""

from __future__ import annotations

from typing import Sequence

from torch import nn

from moelpr.model.arch import check_supported, decoder_layers
from moelpr.model.capture import moe_blocks
from moelpr.model.convert import convert_layers
from moelpr.model.errors import UserError


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


def upcycle_config(lm: nn.Module, num_experts, top_k: int, layers: Sequence[int] | None, **fields):
    """The `MoELPRConfig` of `lm` upcycled to `num_experts` (one count or one per layer) and `top_k`, checked
    (both upcycles build their model from it)."""
    from moelpr.model import MoELPRConfig

    check_supported(lm)
    counts = experts_per_layer_from(num_experts, len(decoder_layers(lm)), layers)
    check_top_k(top_k, counts)
    return MoELPRConfig(text_config=lm.config, experts_per_layer=counts, num_experts_per_tok=top_k, **fields)


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
    from moelpr.model import MoELPRForCausalLM
    from moelpr.upcycling.freeze import set_trainable

    if isinstance(model, MoELPRForCausalLM) or moe_blocks(model):
        raise UserError(
            f"{type(model).__name__} is already upcycled; add languages to it with lifelong expansion instead"
        )
    config = upcycle_config(
        model,
        num_experts,
        top_k,
        layers,
        base_model_path=getattr(model, "name_or_path", None) or None,
        base_fingerprint=base_fingerprint(model.state_dict()),
        expert_init=expert_init,
        **settings,
    )
    # Wrap first, convert second: the wrapper's post_init initialises every module it has not seen initialised,
    # which would redraw the xavier-normal routers with the base model's normal(initializer_range).
    moe = MoELPRForCausalLM(config, lm=model)
    convert_layers(model, config.expert_groups, top_k, expert_init=expert_init, dispatch=config.moe_dispatch)
    set_trainable(moe, "stage1")
    return moe
