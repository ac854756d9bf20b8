"""LayerMoE in the training recipes (docs/method.md §4): stage-2 classifiers and lifelong expansion.

Stage 2: a recipe with `classifier_layers`, or `similarity` (+ `classifier_top_k`, default 7), puts a
language-group classifier in front of the router of those MoE layers (the K of highest S_l); it trains with
the routers under NTP + γ·LPR + 0.1·CE. Classes default to the corpora's groups (largest `group` + 1).

Lifelong stage 1 (`expand: true`): a model that finished stage 2 gets one more expansion group (copies of
expert 0 and new router rows); only that group trains, on the corpora whose `group` is its number (the first
expansion is group 1, so the n-th expansion step trains `group: n` corpora). Existing classifiers stay frozen
(their last class is widened to the new experts); the following stage 2 rebuilds them for the new number of
groups.
"""

from __future__ import annotations

import os
from pathlib import Path

from moelpr.errors import UserError
from moelpr.train.recipe import DEFAULT_CLASSIFIER_TOP_K, Recipe

# ---- lifelong expansion (stage 1) ---------------------------------------------------------------------------


def new_experts(recipe: Recipe, num_layers: int) -> list[int]:
    """The added group's new experts per layer: the list as given, or an allocation.json's N_l − 1."""
    counts = recipe.experts_per_layer()
    from_file = isinstance(recipe.num_experts, (str, os.PathLike))
    if not isinstance(counts, list) or len(counts) != num_layers:
        size = len(counts) if isinstance(counts, list) else "no list of"
        raise UserError(f"num_experts gives {size} counts but the model has {num_layers} layers; give one per layer")
    if any(isinstance(n, bool) or not isinstance(n, int) or n < (1 if from_file else 0) for n in counts):
        raise UserError(f"new experts per layer must be integers ≥ 0 (an allocation.json: ≥ 1), got {counts}")
    return [n - 1 for n in counts] if from_file else counts


def next_group(model_dir: str | os.PathLike) -> int:
    """The corpus group the next expansion of the finished stage-2 model in `model_dir` trains (read from its
    config.json, before any model is built)."""
    import json

    path = Path(model_dir) / "config.json"
    try:
        config = json.loads(path.read_text())
    except (OSError, ValueError):
        config = {}
    if config.get("model_type") != "moelpr":
        _not_finished(model_dir, "a dense model" if config else "no MoE-LPR model")
    if config.get("completed_stage", 0) != 2:
        _not_finished(model_dir, f"completed_stage {config.get('completed_stage', 0)}")
    return len(config.get("expert_groups") or [[]]) + 1


def _not_finished(model_dir: str | os.PathLike, found: str) -> None:
    raise UserError(
        f"lifelong expansion needs a model that finished stage 2; {model_dir} is {found} "
        "(run stage 2 first and pass its output_dir as model)"
    )


def expanded_model(recipe: Recipe, moelpr) -> tuple[object, int]:
    """The finished stage-2 model with one more expansion group; returns (model, the group's corpus number)."""
    from moelpr.upcycling.expand import expand

    model = moelpr.load_model(recipe.model)
    finished = getattr(getattr(model, "config", None), "completed_stage", 0)
    if not isinstance(model, moelpr.MoELPRForCausalLM) or finished != 2:
        _not_finished(
            recipe.model,
            "a dense model" if not isinstance(model, moelpr.MoELPRForCausalLM) else f"completed_stage {finished}",
        )
    group = expand(model, new_experts(recipe, len(model.config.experts_per_layer)))
    cfg = model.config
    cfg.aux_loss_coef, cfg.lpr_loss_coef, cfg.cls_loss_coef = recipe.aux_loss_coef, 0.0, 0.0  # classifiers frozen
    cfg.balance_loss_form = recipe.balance_loss_form
    return model, group + 1


# ---- classifiers (stage 2) ----------------------------------------------------------------------------------


def classifier_layers_from_similarity(path: str | os.PathLike, config, k: int) -> list[int]:
    """The `k` MoE layers of highest S_l in a similarity.json (ties: the earlier layer), in layer order."""
    from moelpr.layermoe.allocation import check_against_model, load_similarity, scores_from_similarity

    similarity = load_similarity(Path(path))
    check_against_model(similarity, len(config.experts_per_layer))
    scores = scores_from_similarity(similarity, str(path))
    moe_layers = config.moe_layers
    if k > len(moe_layers):
        raise UserError(
            f"classifier_top_k {k} is larger than the model's {len(moe_layers)} MoE layers; "
            f"choose classifier_top_k ≤ {len(moe_layers)}"
        )
    return sorted(sorted(moe_layers, key=lambda layer: -scores[layer])[:k])


def setup_classifiers(model, recipe: Recipe, corpora: list) -> None:
    """Add (or rebuild) the stage-2 classifiers the recipe asks for, or that an earlier step left with too few classes."""
    import moelpr
    from moelpr.model.capture import moe_blocks

    cfg = model.config
    groups = recipe.classifier_groups or max(2, max(c.group for c in corpora) + 1)
    pooling = recipe.classifier_pooling
    if recipe.classifier_layers is not None:
        layers = list(recipe.classifier_layers)
    elif recipe.similarity is not None:
        layers = classifier_layers_from_similarity(
            recipe.similarity, cfg, recipe.classifier_top_k or DEFAULT_CLASSIFIER_TOP_K
        )
    elif cfg.classifier_layers and cfg.classifier_groups != groups:
        layers, pooling = list(cfg.classifier_layers), cfg.classifier_pooling  # e.g. G2's stage 2: 2 → 3 classes
    else:
        return  # none asked for, or the existing ones already fit the groups: keep (and train) them
    for block in moe_blocks(model):
        block.classifier = None
    cfg.classifier_layers = None
    moelpr.add_classifiers(model, layers, num_classes=groups, pooling=pooling)
