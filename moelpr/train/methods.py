"""Every training method in one place: how it builds its model, which corpora and parameters it trains, how it saves.

    moe stage 1      upcycle the dense model (or `continue:` an upcycled one); new experts + routers train on the
                     new languages with NTP + α·balance (docs/method.md)
    moe stage 2      the stage-1 model; routers (and LayerMoE classifiers) train on the new languages plus the
                     old-language replay with NTP + γ·LPR (+ classifier CE)
    lifelong         LayerMoE expansion (`expand: true`): a finished stage-2 model gets one more expert group;
                     only that group trains, on its group's corpora, with NTP + α·balance
    moe_one_stage    the paper's "MoE" row: upcycled, every parameter trains in one stage on all corpora
    full / lora /    the paper's baselines on the dense model, on all corpora: every parameter; LoRA on all
    llama_pro /      linear layers (saved merged); LLaMA-Pro's added blocks; LoRAMoE's LoRA experts and routers
    loramoe

`method_of(recipe)` picks one; `moelpr.train.run` runs whichever it is the same way: select its corpora, prepare
the data, build the model, train, save.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Callable

from torch import nn

from moelpr.data.corpus import Corpus
from moelpr.errors import UserError
from moelpr.train.recipe import Recipe


@dataclass(frozen=True)
class Method:
    """One training method.

    Attributes:
        build: (recipe, the corpora it trains on) → the model with its trainable set and loss settings.
        select: (recipe, corpora) → the corpora it trains on, checked (before any model is built); default: all.
        stage: the MoE-LPR stage `config.completed_stage` records when it finishes (None: a dense baseline).
        save: writes the trained model into a directory (default: `moelpr.save_model` in the recipe's format).
    """

    build: Callable[[Recipe, list[Corpus]], nn.Module]
    select: Callable[[Recipe, list[Corpus]], list[Corpus]] = lambda recipe, corpora: corpora
    stage: int | None = None
    save: Callable[..., None] | None = None


def method_of(recipe: Recipe) -> Method:
    """The method a (validated) recipe runs."""
    if recipe.method == "moe":
        return LIFELONG if recipe.expand else MOE_STAGE_1 if recipe.stage == 1 else MOE_STAGE_2
    return BASELINES[recipe.method]


def save(method: Method, model: nn.Module, directory: Path, recipe: Recipe, tokenizer, state_dict: dict | None) -> None:
    """Write `model` trained by `method` into `directory` (`state_dict`: gathered ZeRO-3 / FSDP weights)."""
    import moelpr

    if method.save is not None:
        method.save(model, directory, tokenizer)
    else:
        moelpr.save_model(
            model, directory, format=recipe.save_format, tokenizer=tokenizer, overwrite=True, state_dict=state_dict
        )


# ---- MoE-LPR ------------------------------------------------------------------------------------------------


def _new_languages(recipe: Recipe, corpora: list[Corpus]) -> list[Corpus]:
    corpora = [c for c in corpora if c.role == "new"]
    if not corpora:
        raise UserError("stage 1 trains on the new languages but no corpus has role: new; add one")
    return corpora


def _stage_1(recipe: Recipe, corpora: list[Corpus]) -> nn.Module:
    import moelpr

    model = _upcycled(recipe)
    moelpr.set_trainable(model, "stage1")
    return model


def _with_replay(recipe: Recipe, corpora: list[Corpus]) -> list[Corpus]:
    if not any(c.role == "old" for c in corpora):
        raise UserError(
            "stage 2 needs old-language replay data but no corpus has role: old; add one "
            "(max_docs limits how many documents are replayed)"
        )
    return corpora


def _stage_2(recipe: Recipe, corpora: list[Corpus]) -> nn.Module:
    """The stage-1 model with the stage-2 losses: NTP + γ·LPR (+ the LayerMoE classifiers' CE), no balance loss."""
    import moelpr
    from moelpr.layermoe import training as layermoe

    model = moelpr.load_model(recipe.model)
    if not isinstance(model, moelpr.MoELPRForCausalLM):
        raise UserError(
            f"stage 2 needs a stage-1 MoE-LPR model; got a dense model at {recipe.model} "
            "(run stage 1 first and pass its output_dir as model)"
        )
    cfg = model.config
    cfg.lpr_loss_coef, cfg.lpr_loss_form, cfg.lpr_loss_reduction = (
        recipe.lpr_loss_coef,
        recipe.lpr_loss_form,
        recipe.lpr_loss_reduction,
    )
    cfg.aux_loss_coef, cfg.cls_loss_coef = 0.0, recipe.cls_loss_coef
    layermoe.setup_classifiers(model, recipe, corpora)  # LayerMoE: classifiers train with the routers
    moelpr.set_trainable(model, "stage2")
    return model


def _expansion_group(recipe: Recipe, corpora: list[Corpus]) -> list[Corpus]:
    from moelpr.layermoe.training import next_group

    group = next_group(recipe.model)
    corpora = [c for c in corpora if c.group == group]
    if not corpora:
        raise UserError(
            f"lifelong expansion trains expansion group {group} on corpora with group: {group}, "
            "but none has it; set group on the new languages' corpora"
        )
    return corpora


def _lifelong(recipe: Recipe, corpora: list[Corpus]) -> nn.Module:
    import moelpr
    from moelpr.layermoe import training as layermoe

    model, group = layermoe.expanded_model(recipe, moelpr)
    moelpr.set_trainable(model, "stage1", groups=[group - 1])
    return model


def _any_new(recipe: Recipe, corpora: list[Corpus]) -> list[Corpus]:
    if not any(c.role == "new" for c in corpora):
        raise UserError("moe_one_stage trains on the new languages (plus any replay) but no corpus has role: new")
    return corpora


def _one_stage(recipe: Recipe, corpora: list[Corpus]) -> nn.Module:
    import moelpr

    model = _upcycled(recipe)
    moelpr.set_trainable(model, "all")
    return model


def _upcycled(recipe: Recipe) -> nn.Module:
    """The dense model upcycled with stage 1's losses (or, with `continue: true`, an MoE-LPR model to keep training)."""
    import moelpr

    model = moelpr.load_model(recipe.model)
    if isinstance(model, moelpr.MoELPRForCausalLM):
        if not recipe.continue_:
            raise UserError(
                f"{recipe.model} is already an MoE-LPR model; stage 1 upcycles a dense model "
                "(set continue: true to keep training this one)"
            )
        model.config.aux_loss_coef = recipe.aux_loss_coef
        model.config.lpr_loss_coef = model.config.cls_loss_coef = 0.0  # classifiers (if any) are frozen in stage 1
        return model
    model = moelpr.upcycle(
        model,
        num_experts=recipe.experts_per_layer(),
        top_k=recipe.top_k,
        layers=recipe.layers,
        expert_init=recipe.expert_init,
        aux_loss_coef=recipe.aux_loss_coef,
        lpr_loss_coef=0.0,
        cls_loss_coef=0.0,
        balance_loss_form=recipe.balance_loss_form,
        lpr_loss_form=recipe.lpr_loss_form,
        lpr_loss_reduction=recipe.lpr_loss_reduction,
    )
    model.config.base_model_path = str(Path(recipe.model).resolve())  # the delta format points here
    return model


MOE_STAGE_1 = Method(build=_stage_1, select=_new_languages, stage=1)
MOE_STAGE_2 = Method(build=_stage_2, select=_with_replay, stage=2)
LIFELONG = Method(build=_lifelong, select=_expansion_group, stage=1)


# ---- the baselines on the dense model -----------------------------------------------------------------------


def _dense(recipe: Recipe) -> nn.Module:
    import moelpr

    model = moelpr.load_model(recipe.model)
    if isinstance(model, moelpr.MoELPRForCausalLM):
        raise UserError(f"method: {recipe.method} is a baseline on the dense model; {recipe.model} is an MoE-LPR model")
    return model


def _full(recipe: Recipe, corpora: list[Corpus]) -> nn.Module:
    model = _dense(recipe)
    model.requires_grad_(True)
    return model


def _lora(recipe: Recipe, corpora: list[Corpus]) -> nn.Module:
    from moelpr.baselines import add_lora

    return add_lora(_dense(recipe), recipe.lora_rank, recipe.lora_alpha, recipe.lora_target)


def _llama_pro(recipe: Recipe, corpora: list[Corpus]) -> nn.Module:
    from moelpr.baselines import add_llama_pro_blocks

    return add_llama_pro_blocks(_dense(recipe), blocks=recipe.llama_pro_blocks, every=recipe.llama_pro_every)


def _loramoe(recipe: Recipe, corpora: list[Corpus]) -> nn.Module:
    from moelpr.baselines import loramoe

    model = loramoe(_dense(recipe), num_experts=recipe.loramoe_experts, rank=recipe.lora_rank, alpha=recipe.lora_alpha)
    model.config.base_model_path = str(Path(recipe.model).resolve())
    return model


def _save_merged_lora(model: nn.Module, directory: Path, tokenizer) -> None:
    from moelpr.baselines import save_merged_lora

    save_merged_lora(model, directory, tokenizer, overwrite=True)


def _save_dense(model: nn.Module, directory: Path, tokenizer) -> None:
    model.save_pretrained(directory)
    if tokenizer is not None:
        tokenizer.save_pretrained(directory)


BASELINES = {
    "moe_one_stage": Method(build=_one_stage, select=_any_new, stage=1),
    "full": Method(build=_full),
    "lora": Method(build=_lora, save=_save_merged_lora),
    "llama_pro": Method(build=_llama_pro, save=_save_dense),
    "loramoe": Method(build=_loramoe),
}
