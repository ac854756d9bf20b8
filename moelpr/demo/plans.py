"""What the demo trains: the rows, the recipe keys of every run (`plans`), and MoE-LPR's γ rule (`choose_gamma`).

Every compared method is trained through `moelpr.train.train` (the real tool) on the same new-language text and
the same number of optimiser steps × blocks:

    base               the dense model pretrained here, English-centric: the old languages plus a small share of
                         new-language pages that no later run sees (no further training); or the user's model
    full / lora /      baselines: stage1_steps + stage2_steps on the stage-1 text plus the old-language replay
    llama_pro /          (the paper trains its baselines on the same data plus the replay set);
    moe_one_stage /      moe_one_stage is the paper's "MoE" (upcycled, every parameter trained in one stage),
    loramoe              loramoe LoRAMoE (LoRA experts with a router on every MLP linear, all active)
    moe_stage1         MoE-LPR stage 1 only (the paper's "w/o Review")
    moe_review_no_lpr  stage 1 + stage 2 with lpr_loss_coef 0 (the paper's "w/o LPR")
    moe_lpr_no_copy    stage 1 with randomly initialised new experts + the MoE-LPR stage 2 ("w/o Expert-Copy")
    moe_lpr            stage 1 + stage 2 with the LPR loss (MoE-LPR), γ chosen on validation from the γ grid
    layermoe           LayerMoE: similarity on the base -> per-layer allocation -> stage 1 -> stage 2 with LPR and
                         a language-group classifier on the most similar layer(s); MoE-LPR's data, steps and rates

The γ grid and the review curve are stage-2 sweeps from the same stage-1 model, on validation; the rows with
MoE-LPR's stage 2 take the γ that `choose_gamma` picks from the grid's validation numbers. Two more validation
runs split full fine-tuning's gain between the embeddings + LM head and the rest (`EMBEDDING_RUNS`).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from moelpr.demo.settings import DemoSizes

METHODS = (
    "base",
    "full",
    "lora",
    "llama_pro",
    "moe_one_stage",
    "loramoe",
    "moe_stage1",
    "moe_review_no_lpr",
    "moe_lpr_no_copy",
    "moe_lpr",
    "layermoe",
)
PREREQUISITES = {"moe_lpr_no_copy": ("moe_lpr_no_copy_stage1",), "layermoe": ("layermoe_stage1",)}
"""Runs trained (and timed under the row) before a row: their stage 1."""
SPLITS = ("validation", "test")


def blocks_per_step(sizes: DemoSizes) -> int:
    """Training blocks (sequences) per optimiser step: micro-batch × gradient accumulation."""
    return sizes.batch_size * sizes.gradient_accumulation


def stage2_steps(review_tokens: int, sizes: DemoSizes) -> int:
    """Optimiser steps of `stage2_epochs` passes over a review mix of `review_tokens` tokens."""
    block = sizes.stage2_cutoff_len or sizes.cutoff_len
    return max(1, round(sizes.stage2_epochs * review_tokens / (blocks_per_step(sizes) * block)))


def training_args(sizes: DemoSizes, *, lr: float, steps: int, seed: int, precision: str, progress: bool) -> dict:
    """The `transformers.TrainingArguments` keys every demo run shares (a plan may override the schedule)."""
    return {
        "learning_rate": lr,
        "max_steps": steps,
        "per_device_train_batch_size": sizes.batch_size,
        "gradient_accumulation_steps": sizes.gradient_accumulation,
        "lr_scheduler_type": "cosine",
        "warmup_steps": max(1, steps // 20),
        "weight_decay": 0.0,
        "max_grad_norm": 1.0,
        "seed": seed,
        "bf16": precision == "bf16",
        "logging_steps": max(1, steps // 4),
        "save_strategy": "no",
        "report_to": "none",
        "dataloader_num_workers": 0,
        "disable_tqdm": not progress,
        **({"gradient_checkpointing": True} if sizes.gradient_checkpointing else {}),
    }


def plans(
    out: Path, sizes: DemoSizes, mix: dict[str, Any], gamma: float | None, *, base: Path | None = None
) -> dict[str, dict[str, Any]]:
    """Recipe keys of each trained run: the rows (the base's included) and the validation sweeps.

    Args:
        gamma: the LPR coefficient of MoE-LPR's stage 2 (None before it is chosen: those runs must not be
            trained yet).
        base: the user's pretrained model (`--base`): the base row is that model, not trained here.
    """
    from moelpr.demo.data import review_name

    data, models = out / "data", out / "models"
    base_model = str(base if base is not None else models / "base")
    s2_steps = stage2_steps(mix["review_tokens"], sizes)
    baseline = {
        "corpora": str(data / "baselines.yaml"),
        "model": base_model,
        "steps": sizes.stage1_steps + s2_steps,
        "lr": sizes.lr,
    }
    review = {
        "method": "moe",
        "stage": 2,
        "model": str(models / "moe_stage1"),
        "corpora": str(data / "review.yaml"),
        "steps": s2_steps,
        "lr": sizes.stage2_lr,
        "lpr_loss_coef": gamma,
        "lpr_loss_reduction": sizes.lpr_loss_reduction,
        **({"cutoff_len": sizes.stage2_cutoff_len} if sizes.stage2_cutoff_len else {}),
    }
    stage1 = {
        "method": "moe",
        "stage": 1,
        "model": base_model,
        "corpora": str(data / "stage1.yaml"),
        "num_experts": sizes.num_experts,
        "top_k": sizes.top_k,
        "steps": sizes.stage1_steps,
        "lr": sizes.lr,
    }
    runs = {
        "full": {"method": "full", **baseline},
        "lora": {"method": "lora", "lora_rank": sizes.lora_rank, "lora_alpha": 2 * sizes.lora_rank, **baseline},
        "llama_pro": {"method": "llama_pro", "llama_pro_blocks": sizes.llama_pro_blocks, **baseline},
        "moe_one_stage": {
            "method": "moe_one_stage",
            "num_experts": sizes.num_experts,
            "top_k": sizes.top_k,
            **baseline,
        },
        "loramoe": {
            "method": "loramoe",
            "loramoe_experts": sizes.loramoe_experts,
            "lora_rank": sizes.loramoe_rank,
            "lora_alpha": 2 * sizes.loramoe_rank,
            **baseline,
        },
        "moe_stage1": stage1,
        "moe_review_no_lpr": {**review, "lpr_loss_coef": 0.0},
        "moe_lpr_no_copy_stage1": {**stage1, "expert_init": "random"},
        "moe_lpr_no_copy": {**review, "model": str(models / "moe_lpr_no_copy_stage1")},
        "moe_lpr": review,
        "layermoe_stage1": {**stage1, "num_experts": str(out / "layermoe" / "allocation.json")},
        "layermoe": {
            **review,
            "model": str(models / "layermoe_stage1"),
            "similarity": str(out / "layermoe" / "similarity.json"),
            "classifier_top_k": sizes.classifier_top_k,
        },
    }
    if base is None:
        pretrain = {"method": "full", "corpora": str(data / "base.yaml"), "lr": sizes.base_lr}
        if sizes.base_plateau is None:
            runs["base"] = {**pretrain, "model": str(models / "base_init"), "steps": sizes.base_steps}
        else:  # trained until its validation bpb plateaus at a constant rate, then the rate decays (maturity.py)
            runs["base_stable"] = {
                **pretrain,
                "model": str(models / "base_init"),
                "steps": sizes.base_steps,
                "lr_scheduler_type": "constant_with_warmup",
                "save_strategy": "steps",  # a checkpoint at every evaluation: a killed run continues
                "save_steps": sizes.base_eval_every,
                "save_total_limit": 1,
                "overwrite": False,
            }
            runs["base"] = {
                **pretrain,
                "model": str(models / "base_stable"),
                "steps": None,  # a share of the stable phase's steps, known once it has stopped
                "lr_scheduler_type": "linear",
            }
    for part, run in EMBEDDING_RUNS.items():  # where full fine-tuning's gain comes from (reading (c))
        runs[run] = {**runs["full"], "freeze": part}
    for g in sizes.gamma_grid:
        runs[gamma_run(g)] = {**review, "lpr_loss_coef": g}
    for scale in sizes.review_scales:
        if scale != 1:
            tokens = mix["reviews"][review_name(scale)]["tokens"]
            runs[review_run(scale)] = {
                **review,
                "corpora": str(data / f"{review_name(scale)}.yaml"),
                "steps": stage2_steps(tokens, sizes),
            }
    return runs


EMBEDDING_RUNS = {"embeddings": "sweeps/full_frozen_embeddings", "rest": "sweeps/full_embeddings_only"}
"""Full fine-tuning with a part frozen (`moelpr.demo.steps.Freeze`), on validation: the embeddings and the LM head
frozen, or they alone trained."""


def gamma_run(gamma: float) -> str:
    """The run name of one point of the γ grid (γ = 0 is the row moe_review_no_lpr)."""
    return f"sweeps/gamma_{gamma:g}"


def review_run(scale: float) -> str:
    """The run name of one point of the review curve (scale 1 is the row moe_lpr, 0 the row moe_stage1)."""
    return f"sweeps/review_x{scale:g}"


def choose_gamma(old_ppl: dict[float, float], base_old_ppl: float, tolerance: float) -> tuple[float, str]:
    """MoE-LPR's γ from the grid's validation mean old-language perplexities: the smallest γ within `tolerance`
    of the base's (it keeps the most new-language gain under claim 3), else the γ that forgets least. Returns
    (γ, the reason in words)."""
    ratios = {g: old_ppl[g] / base_old_ppl for g in sorted(old_ppl)}
    listed = ", ".join(f"γ {g:g}: {r - 1:+.1%}" for g, r in ratios.items())
    within = [g for g, r in ratios.items() if r <= 1 + tolerance]
    if within:
        return within[0], (
            f"the smallest γ whose validation old-language ppl is within {tolerance:.0%} of the base's ({listed})"
        )
    best = min(ratios, key=ratios.get)
    return best, (
        f"no γ keeps the validation old-language ppl within {tolerance:.0%} of the base's; the one that "
        f"forgets least ({listed})"
    )
