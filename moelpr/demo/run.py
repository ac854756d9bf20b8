"""`run_demo`: the miniature MoE-LPR reproduction, end to end (the rows are listed in moelpr.demo.plans).

The run: setup (`moelpr.demo.prepare`: corpus, the base's pretraining mix, tokenizer, training mixes), the base
(pretrained here, to maturity with `--sizes mature` (moelpr.demo.maturity), or the user's model with `--base`),
every row and sweep trained and evaluated on validation and test (`moelpr.demo.steps`), MoE-LPR's γ chosen on
validation before the rows that use it, the router probes, optional lm-eval rows (`moelpr.demo.benchmark`), and
the report (`moelpr.demo.report`).

Output directory::

    demo_settings.json   the settings of the run (a rerun with other settings is refused)
    corpus/ pretrain/    the corpus (train / validation / test pages) and the base's pretraining mix
    tokenizer/ data/     the tokenizer and the training mixes (see moelpr/demo/data.py)
    models/<method>/     trained models (reused by reruns); models/base_init/ is the random initialisation,
                         models/layermoe_stage1/ LayerMoE's stage 1, models/sweeps/ the γ and review sweeps
    layermoe/            similarity.json, allocation.json and allocation.png of the LayerMoE row
    eval/<split>/<run>.json  evaluation of each run on validation and test (reused by reruns)
    results.json results.md timing.json and the figures
"""

from __future__ import annotations

import json
import os
import time
from pathlib import Path
from typing import Any, Callable

from moelpr.demo import prepare, steps
from moelpr.demo.claims import OLD_TOLERANCE
from moelpr.demo.plans import METHODS, PREREQUISITES, SPLITS, choose_gamma, gamma_run, plans
from moelpr.demo.settings import DemoSizes, check_or_write_settings, preset_sizes, resolve_precision, settings_record
from moelpr.errors import UserError

__all__ = ["METHODS", "choose_gamma", "run_demo"]


def _languages(corpus: str, old: tuple[str, ...] | None, new: tuple[str, ...] | None) -> dict[str, list[str]]:
    from moelpr.demo.corpus import check_languages, corpus_languages

    supported, default_old, default_new = corpus_languages(corpus)
    old, new = tuple(old or default_old), tuple(new or default_new)
    check_languages(old, new, supported)
    return {"old": list(old), "new": list(new)}


def run_demo(
    output_dir: str | os.PathLike,
    *,
    sizes: str = "default",
    corpus: str = "libreoffice",
    corpora: str | None = None,
    validation: str | None = None,
    heldout: str | None = None,
    base: str | os.PathLike | None = None,
    tokens: int | None = None,
    benchmark: str | os.PathLike | None = None,
    seed: int = 0,
    languages_old: tuple[str, ...] | None = None,
    languages_new: tuple[str, ...] | None = None,
    precision: str = "auto",
    overwrite: bool = False,
    progress: bool = True,
    custom_sizes: DemoSizes | None = None,
    log: Callable[[str], None] = print,
) -> dict:
    """Run the demo into `output_dir` and return the combined results (also written as results.json).

    Args:
        output_dir: where everything goes; corpus, tokenizer, models and evaluations already there are reused.
        sizes: the size preset, "default", "mature", "large", "quick" (the CI smoke run) or, with `base`, "paper";
            see moelpr.demo.settings.
        corpus: the built-in corpus, "libreoffice" (the papers' six languages) or "manpages".
        corpora / validation / heldout: the user's train, validation and test corpora files instead of a built-in
            corpus (all three or none).
        base: a local pretrained Hugging Face causal LM (with its tokenizer) to start from instead of the base
            pretrained here.
        tokens: with the "paper" preset, the stage-1 token budget (all new languages together).
        benchmark: a directory of lm-eval task YAMLs run on every row (moelpr.demo.benchmark).
        seed: seeds the corpus split, initialisation, data order and routers.
        languages_old / languages_new: languages of the built-in corpus (default: the corpus's own; ignored with
            `corpora`, which carries its own).
        precision: "auto", "fp32" or "bf16", for training (bf16 mixed precision) and evaluation (bf16 autocast).
        overwrite: start again in an `output_dir` that holds a demo run made with other settings.
        progress: progress bars.
        custom_sizes: sizes to use instead of the preset's (experiments and tests; recorded as preset "custom").
    """
    from moelpr.demo.report import row_line, sweep_points, write_report

    out = Path(output_dir)
    user_files = {"train": corpora, "validation": validation, "heldout": heldout}
    if any(p is not None for p in user_files.values()) and not all(p is not None for p in user_files.values()):
        raise UserError(
            "--corpora, --validation and --heldout go together: give the train, validation and test corpora files"
        )
    langs = _languages(corpus, languages_old, languages_new) if corpora is None else prepare.user_languages(user_files)
    base_dir = None if base is None else Path(base)
    preset = "custom" if custom_sizes is not None else sizes
    if base_dir is not None:
        from moelpr.demo.pretrained import check_base, fit_sizes

        check_base(base_dir)
        sizes_ = fit_sizes(custom_sizes or preset_sizes(sizes), base_dir, tokens, len(langs["new"]))
    else:
        if tokens is not None or (sizes == "paper" and custom_sizes is None):
            raise UserError("--tokens and --sizes paper are for a pretrained model's run; give --base DIR")
        sizes_ = custom_sizes or preset_sizes(sizes)
    settings = settings_record(
        sizes_,
        preset=preset,
        seed=seed,
        precision=resolve_precision(precision, sizes_),
        languages=langs,
        corpora=None if corpora is None else user_files,
        corpus=corpus if corpora is None else None,
        base=base_dir,
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
        log(f"[demo] corpus: {corpus}, old {langs['old']}, new {langs['new']}")
        files = timed("setup", "corpus", lambda: prepare.build_corpus(out, corpus, sizes_, langs, seed))
    else:
        files = {split: Path(p) for split, p in user_files.items()}
    split_files = {"validation": files["validation"], "test": files["heldout"]}
    new_share = sizes_.base_new_share if base_dir is None else 0.0  # a given base pretrains on nothing here
    pretrain = timed("setup", "pretrain_mix", lambda: prepare.pretraining_mix(out, files["train"], new_share))
    pretrain_stats = json.loads((pretrain / "pretrain_stats.json").read_text())
    tokenizer = timed(
        "setup", "tokenizer", lambda: prepare.tokenizer(out, pretrain / "base.yaml", langs, sizes_, base_dir)
    )
    mix = timed("setup", "data", lambda: prepare.mixes(out, pretrain, tokenizer, sizes_))
    runs = plans(out, sizes_, mix, gamma=None, base=base_dir)
    log(
        f"[demo] data: base {100 * mix['base_new_token_share']:.1f}% new-language tokens; stage 1 "
        f"{mix['stage1_tokens']:,} new-language tokens; review {mix['review_tokens']:,} tokens (replay "
        f"{mix['replay_tokens']:,} old); stage 2 = {runs['moe_lpr']['steps']} steps; baselines = "
        f"{runs['full']['steps']} steps"
    )
    if base_dir is None:
        timed("setup", "base_init", lambda: prepare.init_base(out, tokenizer, sizes_, seed))
    base_model = base_dir or out / "models" / "base"

    def train(name: str, plan: dict[str, Any], callbacks: list | None = None) -> Path:
        return steps.train_run(
            name, plan, out, sizes_, seed=seed, precision=settings["precision"], progress=progress, callbacks=callbacks
        )

    def run(name: str, step: str, splits: tuple[str, ...]) -> dict[str, dict]:
        model_dir = base_dir if name == "base" and base_dir else timed(step, "train", lambda: train(name, runs[name]))
        return {
            split: timed(
                step,
                f"eval_{split}",
                lambda split=split: steps.evaluate_run(
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
    maturity = None
    for name in METHODS:
        if name == "base" and "base_stable" in runs:  # --sizes mature: the stable phase first, then the decay
            from moelpr.demo.maturity import train_mature_base

            maturity = timed(
                "base",
                "train_stable",
                lambda runs=runs: train_mature_base(
                    out, runs, sizes_, split_files["validation"], train, settings["precision"], log
                ),
            )
            runs["base"]["steps"] = maturity["decay_steps"]
        if runs.get(name, {}).get("lpr_loss_coef", 0.0) is None:  # the first row with MoE-LPR's stage 2: its γ
            for g in sizes_.gamma_grid:
                sweep(gamma_run(g))
            grid = {g: sweep_evals[gamma_run(g)]["avg"]["old"]["ppl"] for g in sizes_.gamma_grid}
            gamma_choice = choose_gamma(grid, evals["base"]["validation"]["avg"]["old"]["ppl"], OLD_TOLERANCE)
            log(f"[demo] γ = {gamma_choice[0]:g} for MoE-LPR's stage 2: {gamma_choice[1]}")
            runs = plans(out, sizes_, mix, gamma=gamma_choice[0], base=base_dir)
        if name == "layermoe":
            timed(name, "allocate", lambda: steps.layermoe_allocation(out, base_model, sizes_))
        for first in PREREQUISITES.get(name, ()):
            timed(name, "train_stage1", lambda first=first, runs=runs: train(first, runs[first]))
        if name == "moe_lpr":  # the chosen point of the γ grid is the row: the same model, not trained again
            steps.copy_model(out / "models" / gamma_run(gamma_choice[0]), out / "models" / name)
        split_results = run(name, name, SPLITS)
        evals[name] = {**split_results["test"], "validation": split_results["validation"]}
        log(row_line(name, evals[name], evals.get("base"), sum(timing[name].values())))

    for name in [n for n in runs if n.startswith("sweeps/") and n not in sweep_evals]:
        sweep(name)

    val = split_files["validation"]
    probes = {"moe_lpr": timed("moe_lpr", "probes", lambda: steps.probes("moe_lpr", out, val, sizes_))}
    dense_layer = {
        "moe_lpr": timed(
            "moe_lpr",
            "dense_layer",
            lambda: steps.dense_layer_effects("moe_lpr", out, val, sizes_, settings["precision"]),
        )
    }
    if base_dir is not None:
        from moelpr.demo.pretrained import embedding_share

        pretrain_stats["embedding_share"] = embedding_share(base_dir)
    if maturity is not None:
        from moelpr.demo.maturity import maturity_record

        base_tokens = sum(mix["base_tokens"].values())
        record = maturity_record(maturity, sizes_, base_tokens, out / "models" / "base", evals["base"]["validation"])
        pretrain_stats["maturity"] = record
    results = {
        "languages": langs,
        "methods": evals,
        "experts": {name: steps.expert_budget(out / "models" / name) for name in ("moe_lpr", "layermoe")},
        "probes": probes,
        "dense_layer": dense_layer,
        "sweeps": sweep_points(sizes_, mix, evals, sweep_evals, gamma_choice),
        "settings": settings,
        "data": mix,
        "pretrain": pretrain_stats,
        "timing": timing,
    }
    if benchmark is not None:
        from moelpr.demo.benchmark import benchmark_rows

        results["benchmark"] = timed(
            "benchmark", "lm_eval", lambda: benchmark_rows(out, Path(benchmark), langs, base_model, log)
        )
    write_report(out, results, settings, mix, pretrain_stats, timing)
    for claim in results["claims"]:
        verdict = "reproduced" if claim["reproduced"] else "NOT reproduced"
        log(f"[demo] {verdict}: {claim['claim']} — {claim['evidence']}")
    log(f"[demo] wrote {out / 'results.json'}, {out / 'results.md'} and figures")
    return results
