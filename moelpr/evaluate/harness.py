"""lm-evaluation-harness integration: `moe-lpr benchmark` and the papers' benchmark suites.

Every full checkpoint moelpr writes carries its model code (`moelpr.model`), so lm-eval's stock `hf` model
loads it with `trust_remote_code=True`, exactly as the papers evaluate with stock lm-eval:

    lm_eval run --model hf --model_args pretrained=DIR,trust_remote_code=True --tasks moelpr_paper \
        --include_path $(python -c "import moelpr.evaluate.harness as h; print(h.TASKS_DIR)")
    moe-lpr benchmark --model DIR --suite moelpr-paper --output results.json   # the same run, plus a summary

`run_benchmark` is a thin wrapper over that command: `simple_evaluate(model="hf", model_args="pretrained=DIR,
trust_remote_code=True,...")`, which is what lm-eval's CLI calls, with our suites' directory included. A delta
checkpoint needs moelpr to find its base: write a full one first (`moe-lpr export --format hf`).

Perplexity tasks: lm-eval's rolling loglikelihood prepends BOS itself, so with a tokenizer that also adds BOS it
scores BOS→BOS once per document (lm-eval #3333 family), for dense and MoE models alike; `moe-lpr eval` scores
documents without that duplicate. The papers' suites are multiple-choice tasks, which this does not affect.

The suites (YAML groups in `moelpr/evaluate/tasks/`, see `PAPER_BENCHMARKS`) follow docs/method.md §5:
ARC-Challenge 25-shot, HellaSwag 10-shot, MMLU 5-shot and Belebele 5-shot for en/zh/es (old) and
el/hu/tr (new), using the Okapi translations lm-eval ships. The summary's old and new averages are over the
run's own languages (`moe-lpr benchmark --old/--new`, the papers' by default), so a Turkish + Hungarian run's
"new" average does not include Greek. lm-eval has no Okapi task for ARC el/tr,
HellaSwag zh/el/tr and MMLU el/tr; `moelpr_substitutes` offers other translations for some of them.
FLORES: lm-eval 0.4.13 has no FLORES task for en↔zh/el/hu/tr and no COMET metric (the papers' 8-shot
FLORES-101 scored with COMET), so translation is not part of the suites.
"""

from __future__ import annotations

import json
import math
import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from moelpr.errors import UserError
from moelpr.evaluate import resolve_device

TASKS_DIR = Path(__file__).parent / "tasks"
OLD_LANGUAGES = ("en", "zh", "es")
NEW_LANGUAGES = ("el", "hu", "tr")

PAPER_BENCHMARKS: dict[str, dict[str, Any]] = {
    "arc": {
        "num_fewshot": 25,
        "metric": "acc_norm",
        "tasks": {"en": "arc_challenge", "zh": "arc_zh", "es": "arc_es", "hu": "arc_hu"},
    },
    "hellaswag": {
        "num_fewshot": 10,
        "metric": "acc_norm",
        "tasks": {"en": "hellaswag", "es": "hellaswag_es", "hu": "hellaswag_hu"},
    },
    "mmlu": {
        "num_fewshot": 5,
        "metric": "acc",
        "tasks": {"en": "mmlu", "zh": "m_mmlu_zh", "es": "m_mmlu_es", "hu": "m_mmlu_hu"},
    },
    "belebele": {
        "num_fewshot": 5,
        "metric": "acc",
        "tasks": {
            "en": "belebele_eng_Latn",
            "zh": "belebele_zho_Hans",
            "es": "belebele_spa_Latn",
            "el": "belebele_ell_Grek",
            "hu": "belebele_hun_Latn",
            "tr": "belebele_tur_Latn",
        },
    },
}
"""Benchmark → shots, the metric the papers report, and language → lm-eval task (Okapi where translated).
Mirrored by the group YAMLs `moelpr_<benchmark>_{old,new}.yaml`."""

SUBSTITUTES: dict[str, dict[str, str]] = {
    "arc": {"el": "arc_challenge_mt_el"},
    "mmlu": {"el": "global_mmlu_full_el", "tr": "global_mmlu_full_tr"},
}
"""Non-Okapi translations for languages lm-eval has no Okapi task for (group `moelpr_substitutes`)."""

SUITES: dict[str, list[str]] = {
    "moelpr-paper": ["moelpr_paper"],
    "moelpr-paper-old": ["moelpr_paper_old"],
    "moelpr-paper-new": ["moelpr_paper_new"],
    "moelpr-substitutes": ["moelpr_substitutes"],
}
"""`moe-lpr benchmark --suite NAME` → lm-eval group names defined in `TASKS_DIR`."""

_INSTALL_HINT = "lm-evaluation-harness is not installed; pip install 'moelpr[eval]'"


def require_lm_eval():
    """Import lm_eval, or raise a UserError telling how to install it."""
    try:
        import lm_eval
        import lm_eval.models.huggingface  # noqa: F401  (HFLM, the base of our model)
    except ImportError:
        raise UserError(_INSTALL_HINT) from None
    return lm_eval


def suite_tasks(suites: Sequence[str] = (), tasks: Sequence[str] = ()) -> list[str]:
    """The lm-eval task/group names for `--suite` names plus extra `--tasks`, in order, without repeats."""
    names: list[str] = []
    for suite in suites:
        if suite not in SUITES:
            raise UserError(f"unknown suite {suite!r}; choose one of {', '.join(SUITES)}")
        names += SUITES[suite]
    names += list(tasks)
    if not names:
        raise UserError(f"nothing to run; pass --suite ({', '.join(SUITES)}) and/or --tasks NAME ...")
    return list(dict.fromkeys(names))


METRICS = ("acc_norm", "acc", "exact_match", "f1", "bits_per_byte")
"""The metric read from a task whose benchmark names none: the first of these lm-eval reports for it."""


def summarize(
    results: Mapping[str, Mapping[str, Any]],
    *,
    old: Sequence[str] = OLD_LANGUAGES,
    new: Sequence[str] = NEW_LANGUAGES,
    benchmarks: Mapping[str, Mapping[str, Any]] | None = None,
) -> dict:
    """The papers' view of lm-eval `results["results"]`: score per benchmark and language, old/new averages.

    Args:
        results: lm-eval's per-task results.
        old / new: the run's languages; a role's averages are over these only (default: the papers').
        benchmarks: benchmark → {"metric": name or None, "tasks": {language: task}} (default `PAPER_BENCHMARKS`);
            a None metric is the first of `METRICS` the task reports.

    Scores are in the metric's units (accuracy in [0, 1]). `avg[role][benchmark]` is the mean over that role's
    languages present in `results`; `avg[role]["all"]` the mean of those benchmark means (the papers'
    "Original"/"Expanded" columns, here over the languages lm-eval covers).
    """
    specs = PAPER_BENCHMARKS if benchmarks is None else benchmarks

    def score(task: str, metric: str | None) -> float | None:
        found = results.get(task, {})
        names = [metric] if metric else [m for m in METRICS if f"{m},none" in found][:1]
        value = found.get(f"{names[0]},none") if names else None
        return float(value) if isinstance(value, (int, float)) and not math.isnan(value) else None

    def table(mapping: Mapping[str, Mapping[str, str]]) -> dict[str, dict[str, float]]:
        out: dict[str, dict[str, float]] = {}
        for bench, by_lang in mapping.items():
            for lang, task in by_lang.items():
                value = score(task, specs.get(bench, PAPER_BENCHMARKS.get(bench, {})).get("metric"))
                if value is not None:
                    out.setdefault(bench, {})[lang] = value
        return out

    scores = table({b: spec["tasks"] for b, spec in specs.items()})
    avg: dict[str, dict[str, float]] = {}
    for role, langs in (("old", old), ("new", new)):
        means = {}
        for bench, by_lang in scores.items():
            values = [by_lang[lang] for lang in langs if lang in by_lang]
            if values:
                means[bench] = sum(values) / len(values)
        if means:
            means["all"] = sum(means.values()) / len(means)
        avg[role] = means
    return {
        "languages": {"old": list(old), "new": list(new)},
        "scores": scores,
        "avg": avg,
        "substitutes": table(SUBSTITUTES) if benchmarks is None else {},
        "metrics": {b: spec.get("metric") for b, spec in specs.items()},
    }


def language_benchmarks(tasks: Sequence[str], languages: Sequence[str]) -> dict[str, dict[str, Any]]:
    """Benchmarks of tasks named `<benchmark>_<language>` for the given languages (other names are left out):
    {"metric": None, "tasks": {language: task}} per benchmark, for `summarize`."""
    out: dict[str, dict[str, Any]] = {}
    for task in tasks:
        bench, _, lang = task.rpartition("_")
        if bench and lang in languages:
            out.setdefault(bench, {"metric": None, "tasks": {}})["tasks"][lang] = task
    return out


def run_benchmark(
    model_dir: str | os.PathLike,
    tasks: Sequence[str],
    *,
    include_paths: Sequence[str | os.PathLike] = (),
    limit: int | float | None = None,
    num_fewshot: int | None = None,
    batch_size: int | str = 8,
    device: str | None = None,
    dtype: str = "auto",
    include_defaults: bool = True,
    log_samples: bool = False,
    bootstrap_iters: int = 100000,
    old: Sequence[str] = OLD_LANGUAGES,
    new: Sequence[str] = NEW_LANGUAGES,
    benchmarks: Mapping[str, Mapping[str, Any]] | None = None,
) -> dict:
    """Run lm-eval `tasks` (task or group names) on the model in `model_dir` with lm-eval's stock `hf` model.

    Args:
        include_paths: extra task directories (our suites' directory is always included).
        limit: examples per task (a float < 1 is a fraction), for smoke tests.
        num_fewshot: override every task's shots (the suites set the papers' shots themselves).
        include_defaults: index lm-eval's built-in tasks (False only for self-contained local tasks).
        bootstrap_iters: resamples for lm-eval's standard errors (0: none).
        old / new / benchmarks: the run's languages and benchmarks for the summary (see `summarize`).
        device / dtype / batch_size: lm-eval's `hf` model arguments (device default: cuda when available).

    Returns:
        JSON-ready: `model`, `tasks`, lm-eval's `results`, `groups`, `n-shot`, `versions`, `config`, and
        `summary` (see `summarize`); with `log_samples`, also `samples`.
    """
    require_lm_eval()
    from lm_eval import simple_evaluate
    from lm_eval.tasks import TaskManager
    from lm_eval.utils import handle_non_serializable

    from moelpr.model.modeling_moelpr import DELTA_META

    if not Path(model_dir).is_dir():
        raise UserError(f"model directory {model_dir} does not exist; pass --model DIR written by save_pretrained")
    if (Path(model_dir) / DELTA_META).is_file():
        raise UserError(
            f"{model_dir} is a delta checkpoint, which stock lm-eval cannot load (it needs moelpr to find "
            "its base); write a full one with `moe-lpr export --model DIR --format hf --output FULL`"
        )
    for path in include_paths:
        if not Path(path).is_dir():
            raise UserError(f"--include-path {path} is not a directory of task YAML files")
    manager = TaskManager(include_path=[str(TASKS_DIR), *map(str, include_paths)], include_defaults=include_defaults)
    unknown = [t for t in tasks if t not in manager.all_tasks]
    if unknown:
        raise UserError(
            f"unknown lm-eval task(s) {', '.join(unknown)}; list them with `lm_eval ls tasks` "
            "or add their YAML directory with --include-path"
        )
    model_args = {"pretrained": str(Path(model_dir).resolve()), "trust_remote_code": True, "dtype": dtype}
    out = simple_evaluate(
        model="hf",
        model_args=model_args,
        tasks=list(tasks),
        task_manager=manager,
        limit=limit,
        num_fewshot=num_fewshot,
        batch_size=batch_size,
        device=resolve_device(device),
        log_samples=log_samples,
        bootstrap_iters=bootstrap_iters,
    )
    record = {
        "model": str(model_dir),
        "tasks": list(tasks),
        "limit": limit,
        "num_fewshot": num_fewshot,
        **{
            key: out[key]
            for key in ("results", "groups", "group_subtasks", "n-shot", "versions", "config", "samples")
            if key in out
        },
        "summary": summarize(out["results"], old=old, new=new, benchmarks=benchmarks),
    }
    return json.loads(json.dumps(record, default=handle_non_serializable))
