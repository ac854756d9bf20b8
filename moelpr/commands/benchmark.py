"""`moe-lpr benchmark`: run lm-evaluation-harness suites on a model and write one results file.

    moe-lpr benchmark --model runs/stage2 --suite moelpr-paper --output results/stage2_bench.json
    moe-lpr benchmark --model runs/stage2 --tasks belebele_hun_Latn arc_hu --limit 50 --output smoke.json
    moe-lpr benchmark --model runs/stage2 --tasks my_task --include-path my_tasks/ --output mine.json
    moe-lpr benchmark --model runs/tr_hu --suite moelpr-paper --old en --new tr,hu --output tr_hu.json

A thin wrapper over stock `lm_eval run --model hf --model_args pretrained=DIR,trust_remote_code=True` with the
papers' suites included (moelpr/evaluate/harness.py); needs `pip install 'moelpr[eval]'`.
"""

from __future__ import annotations

import argparse

from moelpr.errors import UserError


def _limit(text: str) -> int | float:
    value = float(text)
    if value <= 0:
        raise argparse.ArgumentTypeError(f"must be positive, got {text}")
    return int(value) if value >= 1 and value.is_integer() else value


EXAMPLE = "moe-lpr benchmark --model runs/stage2 --suite moelpr-paper --output runs/stage2_bench.json"


def _codes(text: str) -> tuple[str, ...]:
    return tuple(part.strip() for part in text.split(",") if part.strip())


def add_arguments(parser: argparse.ArgumentParser) -> None:
    from moelpr.evaluate.harness import NEW_LANGUAGES, OLD_LANGUAGES, SUITES

    parser.add_argument("--model", required=True, help="model directory (dense, or a full MoE-LPR checkpoint)")
    parser.add_argument(
        "--suite",
        action="append",
        default=[],
        choices=list(SUITES),
        help="benchmark suite (repeatable): the papers' ARC/HellaSwag/MMLU/Belebele groups",
    )
    parser.add_argument("--tasks", nargs="+", default=[], help="further lm-eval task or group names")
    parser.add_argument(
        "--include-path",
        action="append",
        default=[],
        metavar="DIR",
        help="extra directory of lm-eval task YAML files (repeatable)",
    )
    parser.add_argument(
        "--limit",
        type=_limit,
        default=None,
        help="examples per task (a number below 1 is a fraction); for smoke tests only",
    )
    parser.add_argument(
        "--num-fewshot",
        type=int,
        default=None,
        help="override every task's shots (the suites already set the papers' shots)",
    )
    parser.add_argument("--batch-size", default="8", help="batch size or 'auto' (default 8)")
    parser.add_argument(
        "--dtype",
        choices=("auto", "float32", "bfloat16", "float16"),
        default="auto",
        help="weights dtype (default: the checkpoint's)",
    )
    parser.add_argument("--device", default=None, help="cpu or cuda[:N] (default: cuda when available)")
    parser.add_argument("--log-samples", action="store_true", help="also store every request and response")
    parser.add_argument(
        "--old",
        type=_codes,
        default=OLD_LANGUAGES,
        metavar="CODES",
        help=f"the model's original languages, averaged as 'old' in the summary (default {','.join(OLD_LANGUAGES)})",
    )
    parser.add_argument(
        "--new",
        type=_codes,
        default=NEW_LANGUAGES,
        metavar="CODES",
        help=f"the languages added, averaged as 'new' in the summary (default {','.join(NEW_LANGUAGES)})",
    )
    parser.add_argument("--output", required=True, help="results JSON file to write")


def run(args: argparse.Namespace) -> int:
    from moelpr.evaluate.harness import require_lm_eval, run_benchmark, suite_tasks
    from moelpr.utils.atomic import atomic_write_json

    require_lm_eval()
    tasks = suite_tasks(args.suite, args.tasks)
    batch_size = args.batch_size if str(args.batch_size).startswith("auto") else _positive_int(args.batch_size)
    record = run_benchmark(
        args.model,
        tasks,
        include_paths=args.include_path,
        limit=args.limit,
        num_fewshot=args.num_fewshot,
        batch_size=batch_size,
        device=args.device,
        dtype=args.dtype,
        log_samples=args.log_samples,
        old=args.old,
        new=args.new,
    )
    record["suite"] = args.suite
    atomic_write_json(args.output, record)
    avg = record["summary"]["avg"]
    parts = [f"{role} {v['all']:.4f}" for role, v in avg.items() if "all" in v]
    print(f"wrote {args.output}" + (f": paper average {', '.join(parts)}" if parts else ""))
    return 0


def _positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise UserError(f"--batch-size must be a positive integer or 'auto', got {text!r}") from None
    if value < 1:
        raise UserError(f"--batch-size must be a positive integer or 'auto', got {text!r}")
    return value
