"""`moe-lpr info DIR`: experts per layer, parameter counts and the trainable set of each stage."""

from __future__ import annotations

import argparse

EXAMPLE = "moe-lpr info runs/stage1"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("model", help="model directory (dense, full or delta MoE-LPR)")


def run(args: argparse.Namespace) -> None:
    import moelpr
    from moelpr.checkpoint import is_delta_dir
    from moelpr.upcycling.freeze import parameter_counts

    model = moelpr.load_model(args.model)
    if not isinstance(model, moelpr.MoELPRForCausalLM):
        counts = parameter_counts(model)
        print(f"{args.model}: dense {type(model).__name__}, {counts['total']:,} parameters")
        return
    cfg = model.config
    kind = f"delta on {cfg.base_model_path}" if is_delta_dir(args.model) else "full checkpoint"
    print(f"{args.model}: MoE-LPR ({kind}), base {cfg.text_config.model_type}, top-{cfg.num_experts_per_tok}")
    print(f"experts per layer (incl. original): {cfg.experts_per_layer}")
    if len(cfg.expert_groups) > 1:
        print(f"expansion groups (new experts per layer): {cfg.expert_groups}")
    if cfg.classifier_layers:
        print(
            f"classifier layers: {cfg.classifier_layers} ({cfg.classifier_groups} groups, {cfg.classifier_pooling} pooling)"
        )
    print(f"losses: aux {cfg.aux_loss_coef} ({cfg.balance_loss_form}), lpr {cfg.lpr_loss_coef} ({cfg.lpr_loss_form})")
    for stage in ("stage1", "stage2", "all"):
        moelpr.set_trainable(model, stage)
        print(f"{stage:>6}: {moelpr.parameter_summary(model)}")
