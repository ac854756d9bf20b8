"""What each stage trains, and a one-line parameter summary.

stage1: the new experts and the routers (docs/method.md §1); with `groups`, only those expansion groups'
        experts and router rows (lifelong expansion freezes everything trained before).
stage2: the routers and the LayerMoE classifiers only.
loramoe: the LoRA experts and their routers of the LoRAMoE baseline.
all:    every parameter (the "MoE" baseline); none: nothing.
Everything else gets `requires_grad=False`.
"""

from __future__ import annotations

import re
from typing import Iterable, Literal

from torch import nn

from moelpr.model.capture import moe_blocks

Stage = Literal["stage1", "stage2", "loramoe", "all", "none"]
_LORAMOE = re.compile(r"\.(lora_A|lora_B|lora_router\.weight)$")


def _trainable(name: str, stage: Stage, groups: set[int] | None) -> bool:
    if stage == "all":
        return True
    if stage == "stage2":
        return ".routers." in name or ".classifier." in name
    if stage == "loramoe":
        return _LORAMOE.search(name) is not None
    if stage == "stage1":
        found = re.search(r"\.mlp\.(experts|routers)\.(\d+)\.", name)
        return found is not None and (groups is None or int(found.group(2)) in groups)
    return False


def set_trainable(model: nn.Module, stage: Stage, groups: Iterable[int] | None = None) -> None:
    """Set `requires_grad` on every parameter for `stage` (see the module docstring)."""
    if stage not in ("stage1", "stage2", "loramoe", "all", "none"):
        raise ValueError(f"unknown stage {stage!r}; expected stage1, stage2, loramoe, all or none")
    chosen = None if groups is None else set(groups)
    for name, param in model.named_parameters():
        param.requires_grad_(_trainable(name, stage, chosen))


def parameter_counts(model: nn.Module) -> dict[str, int]:
    """Trainable, total and active-per-token parameter counts (an unused expert is not active)."""
    total = sum(p.numel() for p in model.parameters())
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    inactive = 0
    for block in moe_blocks(model):
        per_expert = sum(p.numel() for p in block.original.parameters())
        inactive += (block.num_experts - min(block.top_k, block.num_experts)) * per_expert
    return {"trainable": trainable, "total": total, "active": total - inactive}


def parameter_summary(model: nn.Module) -> str:
    """One line: trainable / total / active-per-token parameters."""
    c = parameter_counts(model)
    share = 100.0 * c["trainable"] / max(c["total"], 1)
    return (
        f"trainable params: {c['trainable']:,} || all params: {c['total']:,} || trainable%: {share:.4f} "
        f"|| active params per token: {c['active']:,}"
    )
