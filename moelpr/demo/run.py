"""`run_demo`: the miniature MoE-LPR reproduction (corpus, tokenizer, base, eight methods, evaluation, report).

Every compared method is trained through `moelpr.train.train` (the real tool) on the same new-language text and
the same number of optimiser steps × blocks:

    base               the dense model pretrained here on the old languages only (no further training)
    full / lora /      baselines: stage1_steps + stage2_steps on the stage-1 text plus the old-language replay
    llama_pro            (method.md §1.3: the paper trains its baselines on the same data plus the replay set)
    moe_stage1         MoE-LPR stage 1 only (the paper's "w/o Review")
    moe_review_no_lpr  stage 1 + stage 2 with lpr_loss_coef 0 (the paper's "w/o LPR")
    moe_lpr            stage 1 + stage 2 with the LPR loss (MoE-LPR)
    layermoe           LayerMoE: similarity on the base -> per-layer allocation -> stage 1 -> stage 2 with LPR and
                         a language-group classifier on the most similar layer(s); MoE-LPR's data, steps and rates

Output directory::

    demo_settings.json   the settings of the run (a rerun with other settings is refused)
    corpus/ tokenizer/   the man-page corpus and the tokenizer (reused by reruns)
    data/                the training mixes (see moelpr/demo/data.py)
    models/<method>/     trained models (reused by reruns); models/base_init/ is the random initialisation,
                         models/layermoe_stage1/ LayerMoE's stage 1
    layermoe/            similarity.json, allocation.json and allocation.png of the LayerMoE row
    eval/<method>.json   held-out evaluation of each method (reused by reruns)
    results.json results.md old_vs_new.png router_expert0.png timing.json
"""

from __future__ import annotations

import json
import os
import time
from pathlib import Path
from typing import Any, Callable

from moelpr.demo.settings import FULL, QUICK, DemoSizes, check_or_write_settings, resolve_precision, settings_record
from moelpr.errors import UserError

METHODS = ("base", "full", "lora", "llama_pro", "moe_stage1", "moe_review_no_lpr", "moe_lpr", "layermoe")
DEFAULT_OLD = ("en", "es", "zh")
DEFAULT_NEW = ("tr", "hu", "uk")


# ---- setup: languages, corpus, tokenizer, training mixes -------------------------------------------------------

def _user_languages(corpora_file: str, heldout_file: str) -> dict[str, list[str]]:
    """Old/new languages of user corpora files, checked: both roles present, held-out text for each language."""
    from moelpr.data.corpus import load_corpora

    for flag, path in (("--corpora", corpora_file), ("--heldout", heldout_file)):
        if not Path(path).is_file():
            raise UserError(f"{flag} file {path} does not exist")
    train, held = load_corpora(corpora_file), load_corpora(heldout_file)
    langs = {role: list(dict.fromkeys(c.language for c in train if c.role == role)) for role in ("old", "new")}
    if not langs["old"] or not langs["new"]:
        raise UserError(f"{corpora_file} needs corpora of both roles, old and new (has old={langs['old']}, "
                        f"new={langs['new']})")
    missing = sorted({*langs["old"], *langs["new"]} - {c.language for c in held})
    if missing:
        raise UserError(f"{heldout_file} has no held-out corpus for language(s) {', '.join(missing)}")
    return langs


def _corpus(out: Path, sizes: DemoSizes, langs: dict[str, list[str]], seed: int) -> tuple[Path, Path]:
    from moelpr.demo.corpus import build_manpage_corpus

    corpora_yaml, heldout_yaml = out / "corpus" / "corpora.yaml", out / "corpus" / "heldout.yaml"
    if not (corpora_yaml.is_file() and heldout_yaml.is_file()):
        build_manpage_corpus(out / "corpus", languages_old=tuple(langs["old"]), languages_new=tuple(langs["new"]),
                             max_docs_per_language=sizes.max_pages_per_language, seed=seed, overwrite=True)
    return corpora_yaml, heldout_yaml


def _tokenizer(out: Path, corpora_yaml: Path, sizes: DemoSizes):
    from transformers import PreTrainedTokenizerFast

    from moelpr.demo.tokenizer import train_tokenizer

    path = out / "tokenizer"
    if (path / "tokenizer.json").is_file():
        return PreTrainedTokenizerFast.from_pretrained(path)
    return train_tokenizer(corpora_yaml, path, vocab_size=sizes.vocab_size, overwrite=True)


def _mixes(out: Path, corpora_yaml: Path, tokenizer, sizes: DemoSizes) -> dict[str, Any]:
    """The training mixes and their token counts; the replay is `replay_fraction` of the stage-1 tokens."""
    from moelpr.data.corpus import load_corpora
    from moelpr.demo.data import build_mixes

    data = out / "data"
    if not (data / "mix_stats.json").is_file():
        corpora = load_corpora(corpora_yaml)
        n_old = len({c.language for c in corpora if c.role == "old"})
        replay = max(1, int(sizes.replay_fraction * sizes.stage1_steps * sizes.batch_size * sizes.cutoff_len / n_old))
        build_mixes(corpora, tokenizer, data, new_tokens=sizes.new_tokens_per_language, replay_tokens=replay)
    return json.loads((data / "mix_stats.json").read_text())


# ---- training ----------------------------------------------------------------------------------------------------

def _training_args(sizes: DemoSizes, *, lr: float, steps: int, seed: int, precision: str, progress: bool) -> dict:
    return {
        "learning_rate": lr, "max_steps": steps, "per_device_train_batch_size": sizes.batch_size,
        "gradient_accumulation_steps": 1, "lr_scheduler_type": "cosine", "warmup_steps": max(1, steps // 20),
        "weight_decay": 0.0, "max_grad_norm": 1.0, "seed": seed, "bf16": precision == "bf16",
        "logging_steps": max(1, steps // 4), "save_strategy": "no", "report_to": "none",
        "dataloader_num_workers": 0, "disable_tqdm": not progress,
    }


def _init_base(out: Path, tokenizer, sizes: DemoSizes, seed: int) -> Path:
    """A randomly initialised Llama-style model saved with the tokenizer: the start of the base pretraining."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    path = out / "models" / "base_init"
    if (path / "config.json").is_file():
        return path
    config = LlamaConfig(vocab_size=len(tokenizer), hidden_size=sizes.hidden_size, num_hidden_layers=sizes.num_layers,
                         intermediate_size=sizes.intermediate_size, num_attention_heads=sizes.num_heads,
                         num_key_value_heads=sizes.num_heads, max_position_embeddings=sizes.cutoff_len,
                         bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
                         pad_token_id=tokenizer.pad_token_id, tie_word_embeddings=False)
    torch.manual_seed(seed)
    model = LlamaForCausalLM(config)
    from moelpr.utils.atomic import atomic_output_dir

    with atomic_output_dir(path, overwrite=True) as tmp:
        model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
    return path


def _plans(out: Path, sizes: DemoSizes, stage2_steps: int) -> dict[str, dict[str, Any]]:
    """Recipe keys of each trained method (the base's included)."""
    data, models = out / "data", out / "models"
    baseline_steps = sizes.stage1_steps + stage2_steps
    baseline = {"corpora": str(data / "baselines.yaml"), "model": str(models / "base"), "steps": baseline_steps,
                "lr": sizes.lr}
    review = {"method": "moe", "stage": 2, "model": str(models / "moe_stage1"), "corpora": str(data / "review.yaml"),
              "steps": stage2_steps, "lr": sizes.stage2_lr}
    plans_stage1 = {"method": "moe", "stage": 1, "model": str(models / "base"), "corpora": str(data / "stage1.yaml"),
                    "num_experts": sizes.num_experts, "top_k": sizes.top_k, "steps": sizes.stage1_steps,
                    "lr": sizes.lr}
    return {
        "base": {"method": "full", "model": str(models / "base_init"), "corpora": str(data / "base.yaml"),
                 "steps": sizes.base_steps, "lr": sizes.base_lr},
        "full": {"method": "full", **baseline},
        "lora": {"method": "lora", "lora_rank": sizes.lora_rank, "lora_alpha": 2 * sizes.lora_rank, **baseline},
        "llama_pro": {"method": "llama_pro", "llama_pro_blocks": sizes.llama_pro_blocks, **baseline},
        "moe_stage1": plans_stage1,
        "moe_review_no_lpr": {**review, "lpr_loss_coef": 0.0},
        "moe_lpr": {**review, "lpr_loss_coef": sizes.lpr_loss_coef},
        "layermoe_stage1": {**plans_stage1, "num_experts": str(out / "layermoe" / "allocation.json")},
        "layermoe": {**review, "model": str(models / "layermoe_stage1"), "lpr_loss_coef": sizes.lpr_loss_coef,
                     "similarity": str(out / "layermoe" / "similarity.json"),
                     "classifier_top_k": sizes.classifier_top_k},
    }


def _train(name: str, plan: dict[str, Any], out: Path, sizes: DemoSizes, *, seed: int, precision: str,
           progress: bool) -> Path:
    from moelpr.train import load_recipe, train

    path = out / "models" / name
    if (path / "config.json").is_file():
        return path
    keys = {k: v for k, v in plan.items() if k not in ("steps", "lr")}
    recipe = load_recipe({**keys, "cutoff_len": sizes.cutoff_len, "cache_dir": str(out / "cache"),
                          "output_dir": str(path), "overwrite": True,
                          **_training_args(sizes, lr=plan["lr"], steps=plan["steps"], seed=seed, precision=precision,
                                           progress=progress)})
    return train(recipe)


def _layermoe_allocation(out: Path, sizes: DemoSizes) -> Path:
    """`moe-lpr similarity` on the base over the review mix, then `moe-lpr allocate` (the real commands)."""
    from moelpr.cli import run_verb

    folder = out / "layermoe"
    if (folder / "allocation.json").is_file():
        return folder
    folder.mkdir(parents=True, exist_ok=True)
    run_verb("similarity", ["--model", str(out / "models" / "base"), "--corpora", str(out / "data" / "review.yaml"),
                            "--tokens", str(sizes.similarity_tokens), "--max-length", str(sizes.cutoff_len),
                            "--device", "cpu", "--output", str(folder / "similarity.json")])
    run_verb("allocate", ["--similarity", str(folder / "similarity.json"), "--budget", str(sizes.layermoe_budget),
                          "--output", str(folder / "allocation.json")])
    return folder


def _expert_budget(model_dir: Path) -> dict[str, Any]:
    """Experts per layer of a saved MoE model and its new experts' count and parameters (every group)."""
    import moelpr
    from moelpr.model.capture import moe_blocks

    model = moelpr.load_model(model_dir)
    blocks = moe_blocks(model)
    return {"experts_per_layer": list(model.config.experts_per_layer),
            "new_experts": sum(block.num_experts - 1 for block in blocks),
            "new_expert_params": sum(p.numel() for block in blocks for p in block.experts.parameters())}


# ---- evaluation and report ---------------------------------------------------------------------------------------

def _evaluate(name: str, model_dir: Path, heldout_yaml: Path, out: Path, sizes: DemoSizes, *, precision: str,
              progress: bool) -> dict:
    from moelpr.data.corpus import load_corpora
    from moelpr.evaluate import load_model_and_tokenizer
    from moelpr.evaluate.perplexity import evaluate_corpora
    from moelpr.utils.atomic import atomic_write_json

    path = out / "eval" / f"{name}.json"
    if path.is_file():
        return json.loads(path.read_text())
    model, tokenizer = load_model_and_tokenizer(model_dir, dtype="float32", device="cpu")
    results = evaluate_corpora(model, tokenizer, load_corpora(heldout_yaml), batch_size=sizes.eval_batch_size,
                               max_tokens=sizes.eval_tokens_per_language, context_len=sizes.cutoff_len,
                               progress=progress, precision=precision)
    results = {"method": name, "model": str(model_dir), **results}
    atomic_write_json(path, results)
    return results


def _line(name: str, res: dict, base: dict | None, seconds: float) -> str:
    def part(role: str) -> str:
        value = res["avg"][role]["ppl"]
        ref = base["avg"][role]["ppl"] if base else None
        change = f" ({100 * (value - ref) / ref:+.1f}%)" if ref and name != "base" else ""
        return f"{role} ppl {value:8.2f}{change}"
    return f"[demo] {name:<18} {part('old')}   {part('new')}   {seconds:6.1f}s"


def _experts_markdown(experts: dict[str, dict[str, Any]]) -> str:
    lines = ["## New-expert budget", "", "| method | experts per layer (expert 0 included) | new experts | "
             "new-expert parameters |", "|---|---|---|---|"]
    lines += [f"| {name} | {e['experts_per_layer']} | {e['new_experts']} | {e['new_expert_params']:,} |"
              for name, e in experts.items()]
    lpr, layer = experts["moe_lpr"]["new_expert_params"], experts["layermoe"]["new_expert_params"]
    lines += ["", f"LayerMoE trains {layer / lpr:.0%} of MoE-LPR's new-expert parameters "
              "(allocation in layermoe/allocation.png).", ""]
    return "\n".join(lines)


def _report(out: Path, results: dict, settings: dict, mix: dict, timing: dict) -> None:
    from moelpr.demo.claims import check_claims, claims_markdown
    from moelpr.evaluate.report import render_report
    from moelpr.utils.atomic import atomic_write_json, atomic_write_text

    results["claims"] = check_claims(results)
    atomic_write_json(out / "results.json", results)
    render_report([out / "results.json"], out)
    body = (out / "results.md").read_text().split("\n", 1)[1]  # drop the report's own title
    sizes = settings["sizes"]
    total = sum(v for step in timing.values() for v in step.values())
    intro = [
        "# MoE-LPR demo: results", "",
        f"Old languages: {', '.join(results['languages']['old'])}; new languages: "
        f"{', '.join(results['languages']['new'])}. Base: Llama-style, {sizes['num_layers']} layers × "
        f"{sizes['hidden_size']} wide, vocabulary {sizes['vocab_size']}, context {sizes['cutoff_len']}; "
        f"precision {settings['precision']} (training and evaluation); seed {settings['seed']}"
        f"{'; --quick' if settings['quick'] else ''}.",
        f"Stage 1 / baselines: {mix['stage1_tokens']:,} new-language tokens; replay {mix['replay_tokens']:,} "
        f"old-language tokens ({100 * mix['replay_tokens'] / max(1, mix['stage1_tokens']):.1f}% of stage 1). "
        f"Evaluation: the first {sizes['eval_tokens_per_language']:,} held-out tokens per language. "
        f"Time: {total:.0f} s for the steps run in this invocation or earlier ones (timing.json).", "",
        claims_markdown(results["claims"]),
        _experts_markdown(results["experts"]),
    ]
    atomic_write_text(out / "results.md", "\n".join(intro) + body)


# ---- the pipeline ------------------------------------------------------------------------------------------------

def run_demo(output_dir: str | os.PathLike, *, quick: bool = False, corpora: str | None = None,
             heldout: str | None = None, seed: int = 0, languages_old: tuple[str, ...] = DEFAULT_OLD,
             languages_new: tuple[str, ...] = DEFAULT_NEW, precision: str = "auto", overwrite: bool = False,
             progress: bool = True, sizes: DemoSizes | None = None, log: Callable[[str], None] = print) -> dict:
    """Run the demo into `output_dir` and return the combined results (also written as results.json).

    Args:
        output_dir: where everything goes; corpus, tokenizer, models and evaluations already there are reused.
        quick: the CI-sized run (`QUICK`) instead of the full one (`FULL`).
        corpora / heldout: the user's train and held-out corpora files instead of the man pages (both or neither).
        seed: seeds the corpus split, initialisation, data order and routers.
        languages_old / languages_new: man-page languages (ignored with `corpora`, which carries its own).
        precision: "auto" (bf16 only on CPUs with native bf16 matmuls), "fp32" or "bf16", for training (bf16
            mixed precision) and evaluation (bf16 autocast) alike.
        overwrite: start again in an `output_dir` that holds a demo run made with other settings.
        progress: progress bars.
        sizes: override the size preset (tests).
    """
    out = Path(output_dir)
    if (corpora is None) != (heldout is None):
        raise UserError("--corpora and --heldout go together: give the train and the held-out corpora files")
    if corpora is None:
        from moelpr.demo.corpus import check_languages

        check_languages(tuple(languages_old), tuple(languages_new))
        langs = {"old": list(languages_old), "new": list(languages_new)}
    else:
        langs = _user_languages(corpora, heldout)
    sizes = sizes or (QUICK if quick else FULL)
    settings = settings_record(sizes, quick=quick, seed=seed, precision=resolve_precision(precision),
                               languages=langs, corpora=corpora, heldout=heldout)
    check_or_write_settings(out, settings, overwrite=overwrite)
    timing_file = out / "timing.json"
    timing: dict[str, dict[str, float]] = json.loads(timing_file.read_text()) if timing_file.is_file() else {}

    def timed(step: str, what: str, fn: Callable[[], Any]) -> Any:
        start = time.monotonic()
        value = fn()
        timing.setdefault(step, {}).setdefault(what, round(time.monotonic() - start, 1))
        from moelpr.utils.atomic import atomic_write_json

        atomic_write_json(out / "timing.json", timing)
        return value

    if corpora is None:
        log(f"[demo] corpus: Debian man pages, old {langs['old']}, new {langs['new']}")
        corpora_yaml, heldout_yaml = timed("setup", "corpus", lambda: _corpus(out, sizes, langs, seed))
    else:
        corpora_yaml, heldout_yaml = Path(corpora), Path(heldout)
    tokenizer = timed("setup", "tokenizer", lambda: _tokenizer(out, corpora_yaml, sizes))
    mix = timed("setup", "data", lambda: _mixes(out, corpora_yaml, tokenizer, sizes))
    steps_per_epoch = max(1, mix["review_tokens"] // (sizes.batch_size * sizes.cutoff_len))
    stage2_steps = steps_per_epoch * sizes.stage2_epochs
    log(f"[demo] data: stage 1 {mix['stage1_tokens']:,} new-language tokens; review {mix['review_tokens']:,} tokens "
        f"(replay {mix['replay_tokens']:,} old); stage 2 = {stage2_steps} steps; baselines = "
        f"{sizes.stage1_steps + stage2_steps} steps")
    timed("setup", "base_init", lambda: _init_base(out, tokenizer, sizes, seed))

    plans = _plans(out, sizes, stage2_steps)
    evals: dict[str, dict] = {}
    for name in METHODS:
        if name == "layermoe":
            timed(name, "allocate", lambda: _layermoe_allocation(out, sizes))
            timed(name, "train_stage1", lambda: _train("layermoe_stage1", plans["layermoe_stage1"], out, sizes,
                                                       seed=seed, precision=settings["precision"], progress=progress))
        model_dir = timed(name, "train", lambda: _train(name, plans[name], out, sizes, seed=seed,
                                                         precision=settings["precision"], progress=progress))
        evals[name] = timed(name, "eval", lambda: _evaluate(name, model_dir, heldout_yaml, out, sizes,
                                                             precision=settings["precision"], progress=progress))
        log(_line(name, evals[name], evals.get("base"), sum(timing[name].values())))

    experts = {name: _expert_budget(out / "models" / name) for name in ("moe_lpr", "layermoe")}
    results = {"languages": langs, "methods": evals, "experts": experts, "settings": settings, "data": mix,
               "timing": timing}
    _report(out, results, settings, mix, timing)
    for claim in results["claims"]:
        verdict = "reproduced" if claim["reproduced"] else "NOT reproduced"
        log(f"[demo] {verdict}: {claim['claim']} — {claim['evidence']}")
    log(f"[demo] wrote {out / 'results.json'}, {out / 'results.md'} and figures")
    return results
