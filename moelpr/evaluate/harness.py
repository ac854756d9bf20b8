"""lm-evaluation-harness integration: the lm-eval model `moelpr` and the papers' benchmark suites.

The model `moelpr` is lm-eval's `HFLM` on a model loaded with `moelpr.load_model` (dense, MoE-LPR full or
delta checkpoint), with one fix: rolling loglikelihood (perplexity tasks) tokenises without special tokens,
so a tokenizer that adds BOS by itself does not get BOS→BOS scored (ecosystem.md §5, pitfall 1). Its
perplexity then equals `moe-lpr eval`'s on the same text.

lm-eval 0.4.13 finds models only in its own registry (no entry points), so the stock `lm_eval` command
cannot see `moelpr`. Three ways to run it:

    moe-lpr benchmark --model DIR --suite moelpr-paper --output results.json      # supported path
    python -m moelpr.evaluate.harness run --model moelpr --model_args pretrained=DIR --tasks moelpr_paper
    lm_eval run --model hf --model_args pretrained=EXPORTED_DIR,trust_remote_code=True --tasks ...  # exports

The suites (YAML groups in `moelpr/evaluate/tasks/`, see `PAPER_BENCHMARKS`) follow method.md §1.4/§2.9:
ARC-Challenge 25-shot, HellaSwag 10-shot, MMLU 5-shot and Belebele 5-shot for en/zh/es (old) and
el/hu/tr (new), using the Okapi translations lm-eval ships. lm-eval has no Okapi task for ARC el/tr,
HellaSwag zh/el/tr and MMLU el/tr; `moelpr_substitutes` offers other translations for some of them.
FLORES: lm-eval 0.4.13 has no FLORES task for en↔zh/el/hu/tr and no COMET metric (the papers' 8-shot
FLORES-101 scored with COMET), so translation is not part of the suites.
"""

from __future__ import annotations

import json
import math
import os
import sys
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from moelpr.errors import UserError

TASKS_DIR = Path(__file__).parent / "tasks"
OLD_LANGUAGES = ("en", "zh", "es")
NEW_LANGUAGES = ("el", "hu", "tr")

PAPER_BENCHMARKS: dict[str, dict[str, Any]] = {
    "arc": {"num_fewshot": 25, "metric": "acc_norm",
            "tasks": {"en": "arc_challenge", "zh": "arc_zh", "es": "arc_es", "hu": "arc_hu"}},
    "hellaswag": {"num_fewshot": 10, "metric": "acc_norm",
                  "tasks": {"en": "hellaswag", "es": "hellaswag_es", "hu": "hellaswag_hu"}},
    "mmlu": {"num_fewshot": 5, "metric": "acc",
             "tasks": {"en": "mmlu", "zh": "m_mmlu_zh", "es": "m_mmlu_es", "hu": "m_mmlu_hu"}},
    "belebele": {"num_fewshot": 5, "metric": "acc",
                 "tasks": {"en": "belebele_eng_Latn", "zh": "belebele_zho_Hans", "es": "belebele_spa_Latn",
                           "el": "belebele_ell_Grek", "hu": "belebele_hun_Latn", "tr": "belebele_tur_Latn"}},
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


_MODEL_CLASS: type | None = None


def model_class() -> type:
    """The lm-eval model class `MoELPRLM`, registered as `moelpr` on first call."""
    global _MODEL_CLASS
    if _MODEL_CLASS is not None:
        return _MODEL_CLASS
    require_lm_eval()
    from lm_eval.api.registry import model_registry, register_model
    from lm_eval.models.huggingface import HFLM

    class MoELPRLM(HFLM):
        """lm-eval's HFLM on `moelpr.load_model`, scoring rolling loglikelihood without a duplicated BOS.

        Model args: `pretrained` (a model directory or an already loaded model), `tokenizer`, `dtype`
        (auto|float32|bfloat16|float16), `device`, `base_model` (for a delta checkpoint whose base moved),
        and HFLM's `batch_size`, `max_length`, ...
        """

        _rolling = False

        def __init__(self, pretrained, tokenizer=None, dtype: str | None = "auto", device: str | None = None,
                     base_model: str | None = None, **kwargs):
            import torch

            from moelpr.evaluate import load_model_and_tokenizer

            self._model_path = None
            if device and device.startswith("cuda") and not torch.cuda.is_available():
                device = None  # lm-eval's CLI defaults to cuda:0; fall back to the CPU as its HFLM does
            if isinstance(pretrained, (str, os.PathLike)):
                self._model_path = str(pretrained)
                pretrained, loaded_tokenizer = load_model_and_tokenizer(pretrained, dtype=dtype, device=device,
                                                                        base_model=base_model)
                tokenizer = tokenizer or loaded_tokenizer
            kwargs.pop("trust_remote_code", None)  # our classes are registered in-process
            kwargs.setdefault("backend", "causal")
            super().__init__(pretrained=pretrained, tokenizer=tokenizer, **kwargs)

        def loglikelihood_rolling(self, requests, disable_tqdm: bool = False):
            self._rolling = True
            try:
                return super().loglikelihood_rolling(requests, disable_tqdm=disable_tqdm)
            finally:
                self._rolling = False

        def tok_encode(self, string: str, add_special_tokens: bool | None = None, left_truncate_len: int | None = None,
                       **kwargs) -> list[int]:
            # Rolling windows prepend `prefix_token_id` (BOS) themselves; a BOS from the tokenizer would be
            # scored as the first token (lm-eval #3333 family). Contexts of other request types keep BOS.
            if self._rolling:
                add_special_tokens = False
            return super().tok_encode(string, add_special_tokens=add_special_tokens,
                                      left_truncate_len=left_truncate_len, **kwargs)

        def get_model_info(self) -> dict:
            # HFLM's asks the Hub for a revision hash; a local directory has none (and we may be offline).
            return {"model_num_parameters": sum(p.numel() for p in self._model.parameters()),
                    "model_dtype": str(getattr(self._model, "dtype", "")), "model_path": self._model_path}

    MoELPRLM.__module__ = __name__
    existing = model_registry.get("moelpr", None)
    if existing is None:
        register_model("moelpr")(MoELPRLM)
    else:  # a re-imported module: keep the class lm-eval already knows
        MoELPRLM = existing
    _MODEL_CLASS = MoELPRLM
    return MoELPRLM


def __getattr__(name: str):
    if name == "MoELPRLM":
        return model_class()
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


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


def summarize(results: Mapping[str, Mapping[str, Any]]) -> dict:
    """The papers' view of lm-eval `results["results"]`: score per benchmark and language, old/new averages.

    Scores are the metric of `PAPER_BENCHMARKS` (accuracy in [0, 1]). `avg[role][benchmark]` is the mean over
    that role's languages present in `results`; `avg[role]["all"]` the mean of those benchmark means (the
    papers' "Original"/"Expanded" columns, here over the languages lm-eval covers).
    """
    def table(mapping: Mapping[str, Mapping[str, str]]) -> dict[str, dict[str, float]]:
        out: dict[str, dict[str, float]] = {}
        for bench, by_lang in mapping.items():
            metric = PAPER_BENCHMARKS[bench]["metric"]
            for lang, task in by_lang.items():
                value = results.get(task, {}).get(f"{metric},none")
                if isinstance(value, (int, float)) and not math.isnan(value):
                    out.setdefault(bench, {})[lang] = float(value)
        return out

    scores = table({b: spec["tasks"] for b, spec in PAPER_BENCHMARKS.items()})
    avg: dict[str, dict[str, float]] = {}
    for role, langs in (("old", OLD_LANGUAGES), ("new", NEW_LANGUAGES)):
        means = {}
        for bench, by_lang in scores.items():
            values = [by_lang[lang] for lang in langs if lang in by_lang]
            if values:
                means[bench] = sum(values) / len(values)
        if means:
            means["all"] = sum(means.values()) / len(means)
        avg[role] = means
    return {"scores": scores, "avg": avg, "substitutes": table(SUBSTITUTES),
            "metrics": {b: spec["metric"] for b, spec in PAPER_BENCHMARKS.items()}}


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
    base_model: str | None = None,
    include_defaults: bool = True,
    log_samples: bool = False,
    bootstrap_iters: int = 100000,
) -> dict:
    """Run lm-eval `tasks` (task or group names) on the model in `model_dir` with the `moelpr` model.

    Args:
        include_paths: extra task directories (our suites' directory is always included).
        limit: examples per task (a float < 1 is a fraction), for smoke tests.
        num_fewshot: override every task's shots (the suites set the papers' shots themselves).
        include_defaults: index lm-eval's built-in tasks (False only for self-contained local tasks).
        bootstrap_iters: resamples for lm-eval's standard errors (0: none).

    Returns:
        JSON-ready: `model`, `tasks`, lm-eval's `results`, `groups`, `n-shot`, `versions`, `config`, and
        `summary` (see `summarize`); with `log_samples`, also `samples`.
    """
    require_lm_eval()
    from lm_eval import simple_evaluate
    from lm_eval.tasks import TaskManager
    from lm_eval.utils import handle_non_serializable

    if not Path(model_dir).is_dir():
        raise UserError(f"model directory {model_dir} does not exist; pass --model DIR written by save_pretrained")
    for path in include_paths:
        if not Path(path).is_dir():
            raise UserError(f"--include-path {path} is not a directory of task YAML files")
    manager = TaskManager(include_path=[str(TASKS_DIR), *map(str, include_paths)], include_defaults=include_defaults)
    unknown = [t for t in tasks if t not in manager.all_tasks]
    if unknown:
        raise UserError(f"unknown lm-eval task(s) {', '.join(unknown)}; list them with `lm_eval ls tasks` "
                        "or add their YAML directory with --include-path")
    lm = model_class()(pretrained=str(model_dir), dtype=dtype, device=device, base_model=base_model,
                       batch_size=batch_size)
    out = simple_evaluate(model=lm, tasks=list(tasks), task_manager=manager, limit=limit, num_fewshot=num_fewshot,
                          log_samples=log_samples, bootstrap_iters=bootstrap_iters)
    record = {
        "model": str(model_dir),
        "tasks": list(tasks),
        "limit": limit,
        "num_fewshot": num_fewshot,
        **{key: out[key] for key in ("results", "groups", "group_subtasks", "n-shot", "versions", "config", "samples")
           if key in out},
        "summary": summarize(out["results"]),
    }
    return json.loads(json.dumps(record, default=handle_non_serializable))


def main(argv: Sequence[str] | None = None) -> None:
    """`python -m moelpr.evaluate.harness ...`: lm-eval's own CLI with `--model moelpr` available.

    Our suites' directory is passed as `--include_path` unless the command line gives one.
    """
    try:
        model_class()
    except UserError as err:
        sys.exit(f"error: {err}")
    from lm_eval.__main__ import cli_evaluate

    args = list(sys.argv[1:] if argv is None else argv)
    if args and not {"-h", "--help"} & set(args) and not any(a.split("=")[0] == "--include_path" for a in args):
        args += ["--include_path", str(TASKS_DIR)]
    sys.argv = ["lm-eval", *args]
    cli_evaluate()


if __name__ == "__main__":
    main()
