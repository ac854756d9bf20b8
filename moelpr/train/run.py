"""`train(recipe)`: one training run, setup → train → save, the same for every method.

The method (MoE-LPR stage 1 or 2, lifelong expansion, the one-stage "MoE" row, the baselines) is declared in
`moelpr.train.methods`: how it builds its model, which corpora and parameters it trains, how it saves. The
saved config's `completed_stage` records a finished MoE-LPR stage.

Output directory: Trainer checkpoints go to `output_dir/checkpoints/`; the final model (loadable with
`moelpr.load_model`), its tokenizer and `train_metrics.json` appear in `output_dir` in one atomic swap at
the end, so a failed run never leaves a half-written model there.
"""

from __future__ import annotations

import dataclasses
import logging
import os
from pathlib import Path
from typing import Any

from moelpr.errors import UserError
from moelpr.train.recipe import Recipe

logger = logging.getLogger(__name__)

CHECKPOINTS = "checkpoints"
METRICS_FILE = "train_metrics.json"


def train(recipe: Recipe, *, callbacks: list | None = None) -> Path:
    """Run `recipe` and return the output directory holding the trained model.

    Args:
        recipe: a validated `Recipe` (see `moelpr.train.load_recipe`).
        callbacks: extra `transformers.TrainerCallback`s.
    """
    from transformers import AutoTokenizer, TrainingArguments, set_seed

    import moelpr
    from moelpr.data import BlockCollator, load_corpora, prepared_corpora, training_dataset
    from moelpr.train.methods import method_of
    from moelpr.train.trainer import MoETrainer
    from moelpr.train.watch import JsonLog

    # ---- setup: output directory, data (before any model is built: its errors come first), model ------------
    out_dir = recipe.output_dir
    resume = _resume_point(recipe, out_dir)
    tokenizer = _load_tokenizer(recipe.model, AutoTokenizer)
    method = method_of(recipe)
    corpora = method.select(
        recipe, prepared_corpora(recipe.prepared) if recipe.prepared else load_corpora(recipe.corpora)
    )
    corpora = [
        c if c.max_docs is not None or recipe.max_docs is None else dataclasses.replace(c, max_docs=recipe.max_docs)
        for c in corpora
    ]
    seed = recipe.training_args.get("seed", TrainingArguments.seed)
    dataset = training_dataset(  # raw corpora: prepared on every process at once, no barrier
        corpora,
        tokenizer,
        cutoff_len=recipe.cutoff_len,
        prepared=recipe.prepared,
        cache_dir=recipe.cache_dir,
        streaming=recipe.streaming,
        seed=seed,
        num_proc=recipe.num_proc,
        on_bad_record=recipe.on_bad_record,
        weights=recipe.weights,
        num_shards=max(1, recipe.training_args.get("dataloader_num_workers", 0)),
    )  # the Trainer shuffles map-style data
    validation = _validation(recipe, tokenizer)

    set_seed(seed)  # router (and LoRA / LLaMA-Pro) init is random
    model = method.build(recipe, corpora)
    if method.stage is not None:  # an MoE-LPR model
        model.config.completed_stage = method.stage - 1  # checkpoints taken during this run are unfinished
        model.set_moe_dispatch(recipe.moe_dispatch)
    # After the model: with a ZeRO-3 config, TrainingArguments switch on deepspeed.zero.Init for every later
    # from_pretrained, which would hand the upcycle empty partitions; DeepSpeed partitions the full model itself.
    args = _training_arguments(recipe, out_dir / CHECKPOINTS)
    _zero3_whole_moe_blocks(model)

    # ---- train ------------------------------------------------------------------------------------------
    batch = args.per_device_train_batch_size * args.gradient_accumulation_steps * args.world_size
    trainer = MoETrainer(
        model=model,
        args=args,
        train_dataset=dataset,
        processing_class=tokenizer,
        data_collator=BlockCollator(pad_token_id=tokenizer.pad_token_id),
        callbacks=[JsonLog(), *(callbacks or [])],
        tokens_per_step=batch * recipe.cutoff_len,
        validation=validation,
    )
    _watch(trainer, recipe, method, dataset, moelpr.parameter_summary(model))
    result = trainer.train(resume_from_checkpoint=resume)

    # ---- save (main process only; the others wait) ------------------------------------------------------
    if method.stage is not None:
        model.config.completed_stage = method.stage  # lifelong expansion starts only from a finished stage 2
    convergence = trainer.router_convergence(recipe.router_warning_threshold)  # collective: every process
    state_dict = _gathered_state_dict(trainer)  # collective: every process takes part
    if trainer.is_world_process_zero():
        metrics = {
            "metrics": result.metrics,
            "final": _last_logged(trainer.state.log_history),
            "log_history": trainer.state.log_history,
            "recipe": recipe.to_dict(),
        }
        if convergence is not None:
            metrics["router_convergence"] = convergence
            if method.stage == 2 and convergence["unconverged_layers"]:
                logger.warning(_convergence_warning(convergence))
        _save(method, trainer.model, tokenizer, recipe, out_dir, metrics, state_dict=state_dict)
    trainer.accelerator.wait_for_everyone()
    return out_dir


# ---- setup helpers ------------------------------------------------------------------------------------------


def _validation(recipe: Recipe, tokenizer) -> dict | None:
    """Language → its validation set (`MoETrainer(validation=...)`), from the recipe's `validation:`, or None.

    A metric_for_best_model the evaluation will not produce is refused here, before any model is built."""
    if recipe.validation is None:
        return None
    from moelpr.data import validation_datasets
    from moelpr.train.trainer import ValidationLanguage

    datasets = validation_datasets(
        recipe.validation,
        tokenizer,
        cutoff_len=recipe.cutoff_len,
        cache_dir=recipe.cache_dir,
        num_proc=recipe.num_proc,
        on_bad_record=recipe.on_bad_record,
    )
    validation = {}
    for lang, dataset in datasets.items():
        roles = {entry["role"] for entry in dataset.entries}
        if len(roles) > 1:
            raise UserError(
                f"validation language {lang!r} is both old and new in {recipe.validation}; give it one role"
            )
        validation[lang] = ValidationLanguage(dataset, roles.pop(), dataset.bytes_per_token)
    metric = recipe.training_args.get("metric_for_best_model")
    if metric is not None:
        names = {"loss"} | {f"{x}_{s}" for x in [*validation, "old", "new"] for s in ("loss", "bpb")}
        if metric.removeprefix("eval_") not in names and not metric.removeprefix("eval_").startswith("router/"):
            raise UserError(
                f"metric_for_best_model {metric!r} is not one the validation reports; use loss, old_bpb, new_bpb, "
                f"old_loss, new_loss or LANG_bpb / LANG_loss for a validation language ({', '.join(validation)})"
            )
    return validation


def _watch(trainer, recipe: Recipe, method, dataset, parameters: str) -> None:
    """What a long run shows (`moelpr.train.watch`): the summary before step 1, one compact console line per log
    instead of the Trainer's full printout, and, in stage 2, the convergence warning while training."""
    from transformers.trainer_callback import PrinterCallback, ProgressCallback

    from moelpr.train.watch import CompactPrinter, CompactProgress, ConvergenceWatch, RunSummary

    threshold = recipe.router_warning_threshold
    trainer.remove_callback(ProgressCallback)
    trainer.remove_callback(PrinterCallback)
    trainer.add_callback(CompactPrinter(threshold) if trainer.args.disable_tqdm else CompactProgress(threshold))
    trainer.add_callback(RunSummary(dataset, recipe.cutoff_len, parameters))
    if method.stage == 2:
        trainer.add_callback(ConvergenceWatch(threshold))


def _load_tokenizer(model_dir: str, auto_tokenizer):
    """The tokenizer saved next to the model (a stage-1 delta directory carries its own copy)."""
    path = Path(model_dir)
    if not any((path / n).is_file() for n in ("tokenizer.json", "tokenizer_config.json", "tokenizer.model")):
        raise UserError(f"no tokenizer in {model_dir}; save the tokenizer with the model (tokenizer.save_pretrained)")
    tokenizer = auto_tokenizer.from_pretrained(path)
    if tokenizer.eos_token_id is None:
        raise UserError(f"the tokenizer in {model_dir} has no eos_token; set one (it ends every packed document)")
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token  # as Qwen1.5: pad = eos, so EOS is never a target
    return tokenizer


def _resume_point(recipe: Recipe, out_dir: Path) -> str | None:
    """The checkpoint to resume from, or None (see `moelpr.train.resume.resume_point`)."""
    from moelpr.train.resume import resume_point

    finished = (out_dir / "config.json").is_file() or (out_dir / METRICS_FILE).is_file()
    return resume_point(
        recipe.training_args,
        out_dir,
        out_dir / CHECKPOINTS,
        overwrite=recipe.overwrite,
        finished=finished,
        main_process=int(os.environ.get("LOCAL_RANK", "0")) == 0,
    )  # torchrun


def _training_arguments(recipe: Recipe, checkpoint_dir: Path):
    """`TrainingArguments` from the recipe, with the settings this trainer relies on.

    Without an accelerator, `use_cpu` defaults to true: accelerate runs several processes on CPU only then;
    otherwise each torchrun process trains alone (DDP), or DeepSpeed's batch check fails (its process group
    has the real world size, accelerate counts one process).
    """
    from transformers import TrainingArguments
    from transformers.integrations import is_deepspeed_zero3_enabled

    kwargs: dict[str, Any] = dict(recipe.training_args)
    kwargs.pop("resume_from_checkpoint", None)  # passed to trainer.train()
    kwargs["output_dir"] = str(checkpoint_dir)
    kwargs["remove_unused_columns"] = False  # keep lang_mask / lang_group for the collator and the LPR loss
    kwargs.setdefault("ddp_find_unused_parameters", False)  # fused experts: every parameter is used
    kwargs.setdefault("report_to", "none")
    # Its isnan/isinf check of every step's loss reads the loss back on the host: a sync per step.
    kwargs.setdefault("logging_nan_inf_filter", False)
    if str(kwargs.get("metric_for_best_model", "")).endswith("bpb"):
        kwargs.setdefault("greater_is_better", False)  # the Trainer's default is "lower is better" for *loss only
    if not _has_accelerator():
        if kwargs.get("use_cpu") is False and int(os.environ.get("WORLD_SIZE", "1")) > 1:
            raise UserError(
                "use_cpu: false but this machine has no GPU; several processes train together on CPU "
                "only with use_cpu: true (drop the setting)"
            )
        kwargs.setdefault("use_cpu", True)  # bf16 on CPU needs it (autocast, float32 master weights); DDP/DeepSpeed too
    if kwargs.get("deepspeed"):
        _require_deepspeed()
    try:
        args = TrainingArguments(**kwargs)
    except (TypeError, ValueError) as err:
        first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise UserError(f"invalid training arguments: {first}") from None
    if is_deepspeed_zero3_enabled():
        _check_zero3(recipe)
    return args


def _check_zero3(recipe: Recipe) -> None:
    """The final model is saved from ZeRO-3's gathered weights, which DeepSpeed gives only when asked to."""
    from transformers.integrations import deepspeed_config

    if recipe.method in ("lora", "llama_pro"):
        raise UserError(
            f"method: {recipe.method} cannot save from DeepSpeed ZeRO-3 shards; use "
            "recipes/deepspeed/zero2.json (the baselines' parameters fit on every GPU)"
        )
    if not deepspeed_config()["zero_optimization"].get("stage3_gather_16bit_weights_on_model_save"):
        raise UserError(
            "DeepSpeed ZeRO-3 saves the final model from gathered weights; set "
            '"stage3_gather_16bit_weights_on_model_save": true under zero_optimization (as '
            "recipes/deepspeed/zero3.json)"
        )


def _zero3_whole_moe_blocks(model) -> None:
    """Under DeepSpeed ZeRO-3, gather each MoE block's parameters as one unit (a ZeRO-3 leaf module).

    ZeRO-3 otherwise all-gathers each submodule's parameters when that submodule runs, and which experts run
    depends on the routing: a rank that sends no token to expert 0 skips its MLP while another rank gathers
    it, the two ranks' collectives no longer match, and training stops (docs/scaling.md, Engines). As a leaf,
    the whole block is gathered on entry on every rank, whatever the routing (as LLaMA-Factory does for Mixtral).
    ZeRO-3 reduces a leaf's gradients in a backward hook on the block, which fires once the gradient of the
    block's input is formed, or, when the input needs none (the first MoE layer above frozen layers), as soon
    as the output's arrives, before the experts' gradients exist: so the input is made to need one.
    """
    from transformers.integrations import is_deepspeed_zero3_enabled

    if not is_deepspeed_zero3_enabled():
        return
    from deepspeed.utils import set_z3_leaf_modules

    from moelpr.model.layer import MoEBlock

    for block in set_z3_leaf_modules(model, [MoEBlock], raise_if_not_found=False):  # dense baselines have none
        block.register_forward_pre_hook(_input_needs_grad)


def _input_needs_grad(block, args: tuple) -> tuple:
    """A forward pre-hook: the block's input, as a tensor that needs a gradient when a backward can follow."""
    import torch

    (hidden_states,) = args
    if hidden_states.requires_grad or not torch.is_grad_enabled():
        return args
    return (hidden_states.detach().requires_grad_(True),)  # (B, S, H); nothing before it trains


def _require_deepspeed() -> None:
    """DeepSpeed is the optional `deepspeed` extra: say how to install it when a recipe asks for it."""
    import importlib.util

    if importlib.util.find_spec("deepspeed") is None:
        raise UserError(
            "the recipe sets deepspeed but DeepSpeed is not installed; "
            "pip install 'moelpr[deepspeed]' (or drop the deepspeed setting)"
        )


def _has_accelerator() -> bool:
    """Whether torch sees any accelerator (CUDA, ROCm, MPS, XPU, HPU, NPU, ...) or a TPU."""
    import torch
    from transformers.utils import is_torch_xla_available

    return torch.accelerator.is_available() or is_torch_xla_available()


def _convergence_warning(convergence: dict) -> str:
    """One line naming the layers whose old-language tokens still take their output from other experts."""
    weights = dict(zip(convergence["layers"], convergence["old"]["expert0_weight"]))
    shown = ", ".join(f"{layer} ({weights[layer]:.2f})" for layer in convergence["unconverged_layers"])
    return (
        f"router convergence: old-language tokens still take more than {convergence['threshold']:.0%} of their "
        f"output from new experts in MoE layer(s) {shown} (expert 0's weight in the mix); more review steps, "
        "a larger lpr_loss_coef or lpr_loss_reduction: sum push them back (train_metrics.json: router_convergence)"
    )


# ---- save ---------------------------------------------------------------------------------------------------


def _last_logged(history: list[dict]) -> dict:
    """The last training log entry (the one with `loss`) merged with the end-of-training summary."""
    final: dict = {}
    for entry in history:
        if "loss" in entry:
            final = dict(entry)
    for entry in history[-1:]:
        final.update({k: v for k, v in entry.items() if k.startswith("train_")})
    return final


def _gathered_state_dict(trainer) -> dict | None:
    """The full weights (on the main process) when the parameters are shards (DeepSpeed ZeRO-3, FSDP), else None.

    Collective: every process must call it. ZeRO-3 needs `stage3_gather_16bit_weights_on_model_save: true`.
    """
    from transformers.integrations import is_deepspeed_zero3_enabled

    if not (is_deepspeed_zero3_enabled() or trainer.is_fsdp_enabled):
        return None
    return trainer.accelerator.get_state_dict(trainer.model_wrapped)


def _save(
    method, model, tokenizer, recipe: Recipe, out_dir: Path, metrics: dict, *, state_dict: dict | None = None
) -> None:
    """Write the final model, tokenizer and metrics; keep the checkpoints; swap into `out_dir` atomically.

    `state_dict`: the weights to write instead of the model's own (gathered from ZeRO-3 / FSDP shards).
    """
    from moelpr.train.methods import save
    from moelpr.utils.atomic import atomic_output_dir, atomic_write_json

    with atomic_output_dir(out_dir, overwrite=True) as staging:
        save(method, model, staging, recipe, tokenizer, state_dict)
        atomic_write_json(staging / METRICS_FILE, metrics)
        checkpoints = out_dir / CHECKPOINTS
        if checkpoints.is_dir() and not any(checkpoints.iterdir()):
            checkpoints.rmdir()  # the Trainer creates it even when it saves nothing
        elif checkpoints.is_dir():
            os.replace(checkpoints, staging / CHECKPOINTS)  # last step inside the block: nothing can fail after it
