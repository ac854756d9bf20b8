"""`run_demo`: the miniature MoE-LPR reproduction (corpus, tokenizer, base, the compared rows, evaluation, report).

Every compared method is trained through `moelpr.train.train` (the real tool) on the same new-language text and
the same number of optimiser steps × blocks:

    base               the dense model pretrained here, English-centric: the old languages plus a small share of
                         new-language pages that no later run sees (no further training)
    full / lora /      baselines: stage1_steps + stage2_steps on the stage-1 text plus the old-language replay
    llama_pro /          (docs/method.md §3: the paper trains its baselines on the same data plus the replay set);
    moe_one_stage /      moe_one_stage is the paper's "MoE" (upcycled, every parameter trained in one stage),
    loramoe              loramoe LoRAMoE (LoRA experts with a router on every MLP linear, all active)
    moe_stage1         MoE-LPR stage 1 only (the paper's "w/o Review")
    moe_review_no_lpr  stage 1 + stage 2 with lpr_loss_coef 0 (the paper's "w/o LPR")
    moe_lpr_no_copy    stage 1 with randomly initialised new experts + the MoE-LPR stage 2 ("w/o Expert-Copy")
    moe_lpr            stage 1 + stage 2 with the LPR loss (MoE-LPR), γ chosen on validation from the γ grid
    layermoe           LayerMoE: similarity on the base -> per-layer allocation -> stage 1 -> stage 2 with LPR and
                         a language-group classifier on the most similar layer(s); MoE-LPR's data, steps and rates

Every row is evaluated on the validation pages (where the settings were chosen) and on the test pages (the
report). The γ grid and the review curve are stage-2 sweeps from the same stage-1 model, on validation; the
rows with MoE-LPR's stage 2 take the γ that `choose_gamma` picks from the grid's validation numbers.

Output directory::

    demo_settings.json   the settings of the run (a rerun with other settings is refused)
    corpus/ pretrain/    the man-page corpus (train / validation / test pages) and the base's pretraining mix
    tokenizer/ data/     the tokenizer and the training mixes (see moelpr/demo/data.py)
    models/<method>/     trained models (reused by reruns); models/base_init/ is the random initialisation,
                         models/layermoe_stage1/ LayerMoE's stage 1, models/sweeps/ the γ and review sweeps
    layermoe/            similarity.json, allocation.json and allocation.png of the LayerMoE row
    eval/<split>/<run>.json  evaluation of each run on validation and test (reused by reruns)
    results.json results.md timing.json and the figures (moelpr.demo.figures)
"""

from __future__ import annotations

import json
import os
import time
from pathlib import Path
from typing import Any, Callable

from moelpr.demo.claims import OLD_TOLERANCE
from moelpr.demo.settings import DemoSizes, check_or_write_settings, preset_sizes, resolve_precision, settings_record
from moelpr.errors import UserError

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
DEFAULT_OLD = ("en", "es", "zh")
DEFAULT_NEW = ("tr", "hu", "uk")
SPLITS = ("validation", "test")


# ---- setup: languages, corpus, tokenizer, training mixes -------------------------------------------------------


def _user_languages(files: dict[str, str]) -> dict[str, list[str]]:
    """Old/new languages of user corpora files, checked: both roles present, evaluation text for each language."""
    from moelpr.data.corpus import load_corpora

    for split, path in files.items():
        if not Path(path).is_file():
            raise UserError(f"--{split if split != 'train' else 'corpora'} file {path} does not exist")
    train = load_corpora(files["train"])
    langs = {role: list(dict.fromkeys(c.language for c in train if c.role == role)) for role in ("old", "new")}
    if not langs["old"] or not langs["new"]:
        raise UserError(
            f"{files['train']} needs corpora of both roles, old and new (has old={langs['old']}, new={langs['new']})"
        )
    for split in ("validation", "heldout"):
        missing = sorted({*langs["old"], *langs["new"]} - {c.language for c in load_corpora(files[split])})
        if missing:
            raise UserError(f"{files[split]} has no {split} corpus for language(s) {', '.join(missing)}")
    return langs


def _corpus(out: Path, sizes: DemoSizes, langs: dict[str, list[str]], seed: int) -> dict[str, Path]:
    from moelpr.demo.corpus import build_manpage_corpus

    files = {
        "train": out / "corpus" / "corpora.yaml",
        "validation": out / "corpus" / "validation.yaml",
        "heldout": out / "corpus" / "heldout.yaml",
    }
    if not all(p.is_file() for p in files.values()):
        build_manpage_corpus(
            out / "corpus",
            languages_old=tuple(langs["old"]),
            languages_new=tuple(langs["new"]),
            heldout_fraction=sizes.heldout_fraction,
            validation_fraction=sizes.validation_fraction,
            max_docs_per_language=sizes.max_pages_per_language,
            seed=seed,
            overwrite=True,
        )
    return files


def _pretraining_mix(out: Path, corpora_yaml: Path, sizes: DemoSizes) -> Path:
    from moelpr.data.corpus import load_corpora
    from moelpr.demo.data import PRETRAIN_STATS, build_pretraining_mix

    folder = out / "pretrain"
    if not (folder / PRETRAIN_STATS).is_file():
        build_pretraining_mix(load_corpora(corpora_yaml), folder, new_share=sizes.base_new_share)
    return folder


def _tokenizer(out: Path, base_yaml: Path, langs: dict[str, list[str]], sizes: DemoSizes):
    """The tokenizer, trained on the base's pretraining mix (every language in it, as the base sees them)."""
    from transformers import PreTrainedTokenizerFast

    from moelpr.demo.tokenizer import train_tokenizer

    path = out / "tokenizer"
    if (path / "tokenizer.json").is_file():
        return PreTrainedTokenizerFast.from_pretrained(path)
    return train_tokenizer(
        base_yaml, path, vocab_size=sizes.vocab_size, languages=[*langs["old"], *langs["new"]], overwrite=True
    )


def _mixes(out: Path, pretrain: Path, tokenizer, sizes: DemoSizes) -> dict[str, Any]:
    """The training mixes and their token counts; the replay is `replay_fraction` of the stage-1 tokens."""
    from moelpr.data.corpus import load_corpora
    from moelpr.demo.data import build_mixes

    data = out / "data"
    if not (data / "mix_stats.json").is_file():
        pool = load_corpora(pretrain / "pool.yaml")
        n_old = len({c.language for c in pool if c.role == "old"})
        replay = max(1, int(sizes.replay_fraction * sizes.stage1_steps * sizes.batch_size * sizes.cutoff_len / n_old))
        build_mixes(
            pool,
            load_corpora(pretrain / "base.yaml"),
            tokenizer,
            data,
            new_tokens=sizes.new_tokens_per_language,
            replay_tokens=replay,
            review_scales=sizes.review_scales,
        )
    return json.loads((data / "mix_stats.json").read_text())


# ---- training ----------------------------------------------------------------------------------------------------


def _training_args(sizes: DemoSizes, *, lr: float, steps: int, seed: int, precision: str, progress: bool) -> dict:
    return {
        "learning_rate": lr,
        "max_steps": steps,
        "per_device_train_batch_size": sizes.batch_size,
        "gradient_accumulation_steps": 1,
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
    }


def _init_base(out: Path, tokenizer, sizes: DemoSizes, seed: int) -> Path:
    """A randomly initialised Llama-style model saved with the tokenizer: the start of the base pretraining."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    from moelpr.utils.atomic import atomic_output_dir

    path = out / "models" / "base_init"
    if (path / "config.json").is_file():
        return path
    config = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=sizes.hidden_size,
        num_hidden_layers=sizes.num_layers,
        intermediate_size=sizes.intermediate_size,
        num_attention_heads=sizes.num_heads,
        num_key_value_heads=sizes.num_heads,
        max_position_embeddings=sizes.cutoff_len,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        tie_word_embeddings=False,
    )
    torch.manual_seed(seed)
    model = LlamaForCausalLM(config)
    with atomic_output_dir(path, overwrite=True) as tmp:
        model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
    return path


def stage2_steps(review_tokens: int, sizes: DemoSizes) -> int:
    """Optimiser steps of `stage2_epochs` passes over a review mix of `review_tokens` tokens."""
    return max(1, round(sizes.stage2_epochs * review_tokens / (sizes.batch_size * sizes.cutoff_len)))


def _plans(out: Path, sizes: DemoSizes, mix: dict[str, Any], gamma: float | None) -> dict[str, dict[str, Any]]:
    """Recipe keys of each trained run: the rows (the base's included) and the validation sweeps; `gamma` is the
    LPR coefficient of MoE-LPR's stage 2 (None before it is chosen: those runs must not be trained yet)."""
    from moelpr.demo.data import review_name

    data, models = out / "data", out / "models"
    s2_steps = stage2_steps(mix["review_tokens"], sizes)
    baseline = {
        "corpora": str(data / "baselines.yaml"),
        "model": str(models / "base"),
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
    }
    stage1 = {
        "method": "moe",
        "stage": 1,
        "model": str(models / "base"),
        "corpora": str(data / "stage1.yaml"),
        "num_experts": sizes.num_experts,
        "top_k": sizes.top_k,
        "steps": sizes.stage1_steps,
        "lr": sizes.lr,
    }
    plans = {
        "base": {
            "method": "full",
            "model": str(models / "base_init"),
            "corpora": str(data / "base.yaml"),
            "steps": sizes.base_steps,
            "lr": sizes.base_lr,
        },
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
    for g in sizes.gamma_grid:
        plans[gamma_run(g)] = {**review, "lpr_loss_coef": g}
    for scale in sizes.review_scales:
        if scale != 1:
            tokens = mix["reviews"][review_name(scale)]["tokens"]
            plans[review_run(scale)] = {
                **review,
                "corpora": str(data / f"{review_name(scale)}.yaml"),
                "steps": stage2_steps(tokens, sizes),
            }
    return plans


def gamma_run(gamma: float) -> str:
    """The run name of one point of the γ grid (γ = 0 is the row moe_review_no_lpr)."""
    return f"sweeps/gamma_{gamma:g}"


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


def review_run(scale: float) -> str:
    """The run name of one point of the review curve (scale 1 is the row moe_lpr, 0 the row moe_stage1)."""
    return f"sweeps/review_x{scale:g}"


def _train(
    name: str, plan: dict[str, Any], out: Path, sizes: DemoSizes, *, seed: int, precision: str, progress: bool
) -> Path:
    from moelpr.train import load_recipe, train

    path = out / "models" / name
    if (path / "config.json").is_file():
        return path
    keys = {k: v for k, v in plan.items() if k not in ("steps", "lr")}
    recipe = load_recipe(
        {
            **keys,
            "cutoff_len": sizes.cutoff_len,
            "cache_dir": str(out / "cache"),
            "output_dir": str(path),
            "overwrite": True,
            **_training_args(
                sizes, lr=plan["lr"], steps=plan["steps"], seed=seed, precision=precision, progress=progress
            ),
        }
    )
    return train(recipe)


def _copy_model(source: Path, target: Path) -> None:
    """A trained model directory copied whole (atomically), unless `target` holds one already."""
    import shutil

    from moelpr.utils.atomic import atomic_output_dir

    if (target / "config.json").is_file():
        return
    with atomic_output_dir(target, overwrite=True) as tmp:
        shutil.copytree(source, tmp, dirs_exist_ok=True)


def _layermoe_allocation(out: Path, sizes: DemoSizes) -> Path:
    """`moe-lpr similarity` on the base, then `moe-lpr allocate` (the real commands).

    The similarity reads the first `similarity_tokens` tokens per language of the training pool (the replay's
    and stage 1's text come first there): the review mix is too small for it since the review is ~1 % of stage 1.
    """
    from moelpr.cli import run_verb

    folder = out / "layermoe"
    if (folder / "allocation.json").is_file():
        return folder
    folder.mkdir(parents=True, exist_ok=True)
    run_verb(
        "similarity",
        [
            "--model",
            str(out / "models" / "base"),
            "--corpora",
            str(out / "pretrain" / "pool.yaml"),
            "--tokens",
            str(sizes.similarity_tokens),
            "--max-length",
            str(sizes.cutoff_len),
            "--device",
            "cpu",
            "--output",
            str(folder / "similarity.json"),
        ],
    )
    run_verb(
        "allocate",
        [
            "--similarity",
            str(folder / "similarity.json"),
            "--budget",
            str(sizes.layermoe_budget),
            "--output",
            str(folder / "allocation.json"),
        ],
    )
    return folder


def _expert_budget(model_dir: Path) -> dict[str, Any]:
    """Experts per layer of a saved MoE model and its new experts' count and parameters (every group)."""
    import moelpr
    from moelpr.model.capture import moe_blocks

    model = moelpr.load_model(model_dir)
    blocks = moe_blocks(model)
    return {
        "experts_per_layer": list(model.config.experts_per_layer),
        "new_experts": sum(block.num_experts - 1 for block in blocks),
        "new_expert_params": sum(p.numel() for block in blocks for p in block.experts.parameters()),
    }


# ---- evaluation and report ---------------------------------------------------------------------------------------


def _evaluate(
    name: str,
    model_dir: Path,
    split: str,
    split_yaml: Path,
    out: Path,
    sizes: DemoSizes,
    *,
    precision: str,
    progress: bool,
) -> dict:
    from moelpr.data.corpus import load_corpora
    from moelpr.evaluate import load_model_and_tokenizer
    from moelpr.evaluate.perplexity import evaluate_corpora
    from moelpr.utils.atomic import atomic_write_json

    path = out / "eval" / split / f"{name}.json"
    if path.is_file():
        return json.loads(path.read_text())
    model, tokenizer = load_model_and_tokenizer(model_dir, dtype="float32", device="cpu")
    results = evaluate_corpora(
        model,
        tokenizer,
        load_corpora(split_yaml),
        batch_size=sizes.eval_batch_size,
        max_tokens=sizes.eval_tokens_per_language,
        context_len=sizes.cutoff_len,
        progress=progress,
        precision=precision,
    )
    results = {"method": name, "split": split, "model": str(model_dir), **results}
    atomic_write_json(path, results)
    return results


def _probes(name: str, out: Path, split_yaml: Path, sizes: DemoSizes) -> list[dict]:
    """`moelpr.demo.probes.router_probes` of one MoE row on the validation pages (reused by reruns)."""
    from moelpr.data.corpus import iter_documents, load_corpora
    from moelpr.demo.probes import router_probes
    from moelpr.evaluate import load_model_and_tokenizer
    from moelpr.utils.atomic import atomic_write_json

    path = out / "eval" / "validation" / f"probes_{name}.json"
    if path.is_file():
        return json.loads(path.read_text())
    model, tokenizer = load_model_and_tokenizer(out / "models" / name, dtype="float32", device="cpu")
    corpora = load_corpora(split_yaml)
    texts = {c.language: list(iter_documents(c)) for c in corpora}
    results = router_probes(
        model,
        tokenizer,
        texts,
        {c.language: c.role for c in corpora},
        max_tokens=sizes.eval_tokens_per_language,
        context_len=sizes.cutoff_len,
        num_experts=sizes.num_experts,
    )
    atomic_write_json(path, results)
    return results


def _dense_layer_effects(name: str, out: Path, split_yaml: Path, sizes: DemoSizes, precision: str) -> list[dict]:
    """Where the remaining forgetting sits: the row re-evaluated on validation with one MoE layer at a time
    replaced by its expert 0 (the original FFN, as if every token were routed there alone)."""
    from moelpr.data.corpus import load_corpora
    from moelpr.evaluate import load_model_and_tokenizer
    from moelpr.evaluate.perplexity import evaluate_corpora
    from moelpr.model.arch import decoder_layers
    from moelpr.utils.atomic import atomic_write_json

    path = out / "eval" / "validation" / f"dense_layer_{name}.json"
    if path.is_file():
        return json.loads(path.read_text())
    model, tokenizer = load_model_and_tokenizer(out / "models" / name, dtype="float32", device="cpu")
    corpora = load_corpora(split_yaml)
    effects = []
    for layer in list(model.config.moe_layers):
        mlp = decoder_layers(model.lm)[layer].mlp
        decoder_layers(model.lm)[layer].mlp = mlp.original
        res = evaluate_corpora(
            model,
            tokenizer,
            corpora,
            batch_size=sizes.eval_batch_size,
            max_tokens=sizes.eval_tokens_per_language,
            context_len=sizes.cutoff_len,
            progress=False,
            precision=precision,
        )
        decoder_layers(model.lm)[layer].mlp = mlp
        effects.append({"layer": layer, "avg": res["avg"], "ppl": res["ppl"], "bpb": res["bpb"]})
    atomic_write_json(path, effects)
    return effects


def _change(value: float, ref: float | None) -> str:
    return f" ({100 * (value - ref) / ref:+.1f}%)" if ref else ""


def _line(name: str, res: dict, base: dict | None, seconds: float) -> str:
    """One printed line per finished row: test ppl (change against the base), validation in brackets."""

    def part(role: str) -> str:
        value, val = res["avg"][role]["ppl"], res["validation"]["avg"][role]["ppl"]
        ref = None if base is None or name == "base" else base["avg"][role]["ppl"]
        ref_val = None if base is None or name == "base" else base["validation"]["avg"][role]["ppl"]
        return f"{role} ppl {value:8.2f}{_change(value, ref)} [val {val:.2f}{_change(val, ref_val)}]"

    return f"[demo] {name:<18} {part('old')}   {part('new')}   {seconds:6.1f}s"


def _experts_markdown(experts: dict[str, dict[str, Any]]) -> str:
    lines = [
        "## New-expert budget",
        "",
        "| method | experts per layer (expert 0 included) | new experts | new-expert parameters |",
        "|---|---|---|---|",
    ]
    lines += [
        f"| {name} | {e['experts_per_layer']} | {e['new_experts']} | {e['new_expert_params']:,} |"
        for name, e in experts.items()
    ]
    lpr, layer = experts["moe_lpr"]["new_expert_params"], experts["layermoe"]["new_expert_params"]
    lines += [
        "",
        f"LayerMoE trains {layer / lpr:.0%} of MoE-LPR's new-expert parameters "
        "(allocation in layermoe/allocation.png).",
        "",
    ]
    return "\n".join(lines)


ROUTER_ROWS = ("moe_stage1", "moe_review_no_lpr", "moe_lpr", "layermoe")
"""The rows of router_expert0_layers.png (the paper's Figure 3 compares stage 1, w/o LPR and MoE-LPR)."""


def _figures(out: Path, results: dict) -> list[str]:
    """The validation figures: routing per layer and language, the review curve and the γ trade-off."""
    from moelpr.demo.claims import OLD_TOLERANCE
    from moelpr.evaluate.report import (
        SweepPoint,
        figure_gamma_tradeoff,
        figure_review_curve,
        figure_router_layers,
        load_results,
    )
    from moelpr.utils.atomic import atomic_write_bytes

    methods = {m.name: m for m in load_results(out / "results.json")}
    for m in methods.values():  # the same rows, with their validation figures
        val = results["methods"][m.name]["validation"]
        m.ppl, m.bpb, m.routing = val["ppl"], val["bpb"], val.get("routing") or {}

    def avg(res: dict) -> tuple[float, float]:
        return res["avg"]["old"]["ppl"], res["avg"]["new"]["bpb"]

    refs = {name: avg(results["methods"][name]["validation"]) for name in ("base", "full")}
    sweeps = results["sweeps"]
    gamma = [
        SweepPoint(p["gamma"], f"γ={p['gamma']:g}", *avg(p["validation"]), default=p["gamma"] == sweeps["chosen_gamma"])
        for p in sweeps["gamma"]
    ]
    review = [
        SweepPoint(p["review_tokens"], f"{p['review_tokens']:,}", *avg(p["validation"]), default=p["run"] == "moe_lpr")
        for p in sweeps["review"]
    ]
    ceilings = {
        name: [layer["lpr_only"]["mean_p0_old"] for layer in probes] for name, probes in results["probes"].items()
    }
    from moelpr.demo.diagnosis import TRAINS_EMBEDDINGS
    from moelpr.evaluate.report import figure_old_vs_new

    test_rows = load_results(out / "results.json")
    groups = {
        m.name: "base"
        if m.name == "base"
        else "trains embeddings + LM head"
        if m.name in TRAINS_EMBEDDINGS
        else "embeddings + LM head frozen"
        for m in test_rows
    }
    atomic_write_bytes(out / "old_vs_new.png", figure_old_vs_new(test_rows, groups=groups))  # test pages
    drawn = {
        "router_expert0_layers.png": figure_router_layers(
            [methods[n] for n in ROUTER_ROWS if n in methods], ceilings=ceilings
        ),
        "review_curve.png": figure_review_curve(review, refs),
        "gamma_tradeoff.png": figure_gamma_tradeoff(gamma, refs, tolerance=OLD_TOLERANCE),
    }
    for name, png in drawn.items():
        if png is not None:
            atomic_write_bytes(out / name, png)
    return [name for name, png in drawn.items() if png is not None]


def _report(out: Path, results: dict, settings: dict, mix: dict, pretrain: dict, timing: dict) -> None:
    from moelpr.demo.claims import check_claims, claims_markdown
    from moelpr.demo.diagnosis import diagnosis_markdown
    from moelpr.evaluate.report import render_report
    from moelpr.utils.atomic import atomic_write_json, atomic_write_text

    results["claims"] = check_claims(results)
    atomic_write_json(out / "results.json", results)
    render_report([out / "results.json"], out)
    body = (out / "results.md").read_text().split("\n", 1)[1]  # drop the report's own title
    figures = _figures(out, results)
    sizes = settings["sizes"]
    total = sum(v for step in timing.values() for v in step.values())
    intro = [
        "# MoE-LPR demo: results",
        "",
        f"Old languages: {', '.join(results['languages']['old'])}; new languages: "
        f"{', '.join(results['languages']['new'])}. Base: Llama-style, {sizes['num_layers']} layers × "
        f"{sizes['hidden_size']} wide, vocabulary {sizes['vocab_size']}, context {sizes['cutoff_len']}, pretrained on "
        f"the old languages plus {100 * pretrain['new_share']:.1f}% new-language bytes "
        f"({100 * mix['base_new_token_share']:.1f}% of its tokens) from pages no later run sees; precision "
        f"{settings['precision']} (training and evaluation); seed {settings['seed']}; sizes {settings['preset']}.",
        f"Stage 1 / baselines: {mix['stage1_tokens']:,} new-language tokens; replay {mix['replay_tokens']:,} "
        f"old-language tokens ({100 * mix['replay_tokens'] / max(1, mix['stage1_tokens']):.1f}% of stage 1); review "
        f"{mix['review_tokens']:,} tokens. Evaluation: the first {sizes['eval_tokens_per_language']:,} tokens per "
        "language of the test pages (the tables below) and of the validation pages (where the settings were chosen; "
        "`results.json` → `methods.<m>.validation`, the sweeps). "
        f"Time: {total:.0f} s for the steps run in this invocation or earlier ones (timing.json).",
        "",
        f"MoE-LPR's LPR coefficient (also LayerMoE's and the w/o-Expert-Copy row's): γ = "
        f"{results['sweeps']['chosen_gamma']:g}, {results['sweeps']['gamma_reason']}.",
        "",
        claims_markdown(results["claims"]),
        diagnosis_markdown(results),
        _experts_markdown(results["experts"]),
        "## Validation figures",
        "",
        *[f"![{name}]({name})" for name in figures],
        "",
    ]
    atomic_write_text(out / "results.md", "\n".join(intro) + body)


# ---- the pipeline ------------------------------------------------------------------------------------------------


def _sweep_points(
    sizes: DemoSizes, mix: dict, evals: dict[str, dict], sweep_evals: dict[str, dict], gamma_choice: tuple[float, str]
) -> dict:
    """The γ trade-off and the review curve on validation, each point with the run it comes from."""
    from moelpr.demo.data import review_name

    def val(name: str) -> dict:
        res = evals[name]["validation"] if name in evals else sweep_evals[name]
        return {k: res[k] for k in ("ppl", "bpb", "avg", "routing") if k in res}

    gamma = [
        {"gamma": g, "run": "moe_review_no_lpr" if g == 0 else gamma_run(g)} for g in sorted({0.0, *sizes.gamma_grid})
    ]
    review = [{"scale": 0.0, "review_tokens": 0, "replay_tokens": 0, "steps": 0, "run": "moe_stage1"}]
    for scale in sorted(sizes.review_scales):
        stats = mix["reviews"][review_name(scale)]
        review.append(
            {
                "scale": scale,
                "review_tokens": stats["tokens"],
                "replay_tokens": stats["replay_tokens"],
                "steps": stage2_steps(stats["tokens"], sizes),
                "run": "moe_lpr" if scale == 1 else review_run(scale),
            }
        )
    for point in gamma + review:
        point["validation"] = val(point["run"])
    return {"gamma": gamma, "review": review, "chosen_gamma": gamma_choice[0], "gamma_reason": gamma_choice[1]}


def run_demo(
    output_dir: str | os.PathLike,
    *,
    sizes: str = "default",
    corpora: str | None = None,
    validation: str | None = None,
    heldout: str | None = None,
    seed: int = 0,
    languages_old: tuple[str, ...] = DEFAULT_OLD,
    languages_new: tuple[str, ...] = DEFAULT_NEW,
    precision: str = "auto",
    overwrite: bool = False,
    progress: bool = True,
    custom_sizes: DemoSizes | None = None,
    log: Callable[[str], None] = print,
) -> dict:
    """Run the demo into `output_dir` and return the combined results (also written as results.json).

    Args:
        output_dir: where everything goes; corpus, tokenizer, models and evaluations already there are reused.
        sizes: the size preset, "default", "large" or "quick" (the CI smoke run); see moelpr.demo.settings.
        corpora / validation / heldout: the user's train, validation and test corpora files instead of the man
            pages (all three or none).
        seed: seeds the corpus split, initialisation, data order and routers.
        languages_old / languages_new: man-page languages (ignored with `corpora`, which carries its own).
        precision: "auto" (bf16 only on CPUs with native bf16 matmuls), "fp32" or "bf16", for training (bf16
            mixed precision) and evaluation (bf16 autocast) alike.
        overwrite: start again in an `output_dir` that holds a demo run made with other settings.
        progress: progress bars.
        custom_sizes: sizes to use instead of the preset's (experiments and tests; recorded as preset "custom").
    """
    out = Path(output_dir)
    user_files = {"train": corpora, "validation": validation, "heldout": heldout}
    if any(p is not None for p in user_files.values()) and not all(p is not None for p in user_files.values()):
        raise UserError(
            "--corpora, --validation and --heldout go together: give the train, validation and test corpora files"
        )
    if corpora is None:
        from moelpr.demo.corpus import check_languages

        check_languages(tuple(languages_old), tuple(languages_new))
        langs = {"old": list(languages_old), "new": list(languages_new)}
    else:
        langs = _user_languages(user_files)
    preset = "custom" if custom_sizes is not None else sizes
    sizes_ = custom_sizes or preset_sizes(sizes)
    settings = settings_record(
        sizes_,
        preset=preset,
        seed=seed,
        precision=resolve_precision(precision, sizes_),
        languages=langs,
        corpora=None if corpora is None else user_files,
    )
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
        files = timed("setup", "corpus", lambda: _corpus(out, sizes_, langs, seed))
    else:
        files = {split: Path(p) for split, p in user_files.items()}
    split_files = {"validation": files["validation"], "test": files["heldout"]}
    pretrain = timed("setup", "pretrain_mix", lambda: _pretraining_mix(out, files["train"], sizes_))
    pretrain_stats = json.loads((pretrain / "pretrain_stats.json").read_text())
    tokenizer = timed("setup", "tokenizer", lambda: _tokenizer(out, pretrain / "base.yaml", langs, sizes_))
    mix = timed("setup", "data", lambda: _mixes(out, pretrain, tokenizer, sizes_))
    plans = _plans(out, sizes_, mix, gamma=None)
    log(
        f"[demo] data: base {100 * mix['base_new_token_share']:.1f}% new-language tokens; stage 1 "
        f"{mix['stage1_tokens']:,} new-language tokens; review {mix['review_tokens']:,} tokens (replay "
        f"{mix['replay_tokens']:,} old); stage 2 = {plans['moe_lpr']['steps']} steps; baselines = "
        f"{plans['full']['steps']} steps"
    )
    timed("setup", "base_init", lambda: _init_base(out, tokenizer, sizes_, seed))

    def run(name: str, step: str, splits: tuple[str, ...]) -> dict[str, dict]:
        model_dir = timed(
            step,
            "train",
            lambda: _train(
                name, plans[name], out, sizes_, seed=seed, precision=settings["precision"], progress=progress
            ),
        )
        return {
            split: timed(
                step,
                f"eval_{split}",
                lambda split=split: _evaluate(
                    name,
                    model_dir,
                    split,
                    split_files[split],
                    out,
                    sizes_,
                    precision=settings["precision"],
                    progress=progress,
                ),
            )
            for split in splits
        }

    def sweep(name: str) -> None:
        sweep_evals[name] = run(name, name, ("validation",))["validation"]
        log(
            f"[demo] {name:<18} validation old ppl {sweep_evals[name]['avg']['old']['ppl']:8.2f}   "
            f"new ppl {sweep_evals[name]['avg']['new']['ppl']:8.2f}   {sum(timing[name].values()):6.1f}s"
        )

    evals: dict[str, dict] = {}
    sweep_evals: dict[str, dict] = {}
    gamma_choice: tuple[float, str] | None = None
    for name in METHODS:
        if plans[name].get("lpr_loss_coef", 0.0) is None:  # the first row with MoE-LPR's stage 2: choose its γ
            for g in sizes_.gamma_grid:
                sweep(gamma_run(g))
            grid = {g: sweep_evals[gamma_run(g)]["avg"]["old"]["ppl"] for g in sizes_.gamma_grid}
            gamma_choice = choose_gamma(grid, evals["base"]["validation"]["avg"]["old"]["ppl"], OLD_TOLERANCE)
            log(f"[demo] γ = {gamma_choice[0]:g} for MoE-LPR's stage 2: {gamma_choice[1]}")
            plans = _plans(out, sizes_, mix, gamma=gamma_choice[0])
        if name == "layermoe":
            timed(name, "allocate", lambda: _layermoe_allocation(out, sizes_))
        for first in PREREQUISITES.get(name, ()):
            timed(
                name,
                "train_stage1",
                lambda first=first, plans=plans: _train(
                    first, plans[first], out, sizes_, seed=seed, precision=settings["precision"], progress=progress
                ),
            )
        if name == "moe_lpr":  # the chosen point of the γ grid is the row: the same model, not trained again
            _copy_model(out / "models" / gamma_run(gamma_choice[0]), out / "models" / name)
        split_results = run(name, name, SPLITS)
        evals[name] = {**split_results["test"], "validation": split_results["validation"]}
        log(_line(name, evals[name], evals.get("base"), sum(timing[name].values())))

    for name in [n for n in plans if n.startswith("sweeps/") and n not in sweep_evals]:
        sweep(name)

    probes = {"moe_lpr": timed("moe_lpr", "probes", lambda: _probes("moe_lpr", out, split_files["validation"], sizes_))}
    dense_layer = {
        "moe_lpr": timed(
            "moe_lpr",
            "dense_layer",
            lambda: _dense_layer_effects("moe_lpr", out, split_files["validation"], sizes_, settings["precision"]),
        )
    }
    experts = {name: _expert_budget(out / "models" / name) for name in ("moe_lpr", "layermoe")}
    results = {
        "languages": langs,
        "methods": evals,
        "experts": experts,
        "probes": probes,
        "dense_layer": dense_layer,
        "sweeps": _sweep_points(sizes_, mix, evals, sweep_evals, gamma_choice),
        "settings": settings,
        "data": mix,
        "pretrain": pretrain_stats,
        "timing": timing,
    }
    _report(out, results, settings, mix, pretrain_stats, timing)
    for claim in results["claims"]:
        verdict = "reproduced" if claim["reproduced"] else "NOT reproduced"
        log(f"[demo] {verdict}: {claim['claim']} — {claim['evidence']}")
    log(f"[demo] wrote {out / 'results.json'}, {out / 'results.md'} and figures")
    return results
