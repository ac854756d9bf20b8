"""`moe-lpr eval`: per-language perplexity, bits per byte and routing statistics on held-out corpora.

    moe-lpr eval --model runs/stage2 --corpora heldout.yaml --output results/stage2.json \
        [--max-docs N] [--max-tokens N] [--batch-size 8] [--dtype float32|bfloat16] [--precision fp32|bf16] \
        [--device cpu|cuda]

Documents are scored one by one exactly as `lm_eval --model moelpr` scores a `loglikelihood_rolling` task
(see moelpr/evaluate/perplexity.py), so both agree on the same text. `--dtype` is the weights' dtype;
`--precision bf16` runs the forward pass under bf16 autocast over them, as bf16 mixed-precision training does.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from moelpr.errors import UserError

EXAMPLE = "moe-lpr eval --model runs/stage2 --corpora recipes/corpora/heldout.yaml --output runs/eval.json"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--model", required=True, help="model directory (dense, MoE-LPR full or delta checkpoint)")
    parser.add_argument("--corpora", required=True, help="corpora file (YAML or dataset_info.json) of held-out text")
    parser.add_argument("--output", required=True, help="results JSON file to write")
    parser.add_argument("--max-docs", type=int, default=None, help="at most N documents per language")
    parser.add_argument("--max-tokens", type=int, default=None, help="at most N scored tokens per language")
    parser.add_argument("--batch-size", type=int, default=8, help="windows per forward pass (default 8)")
    parser.add_argument(
        "--context-len",
        type=int,
        default=None,
        help="window length (default: the model's context, as lm-eval resolves it)",
    )
    parser.add_argument(
        "--dtype",
        choices=("auto", "float32", "bfloat16", "float16"),
        default="float32",
        help="weights dtype (default float32)",
    )
    parser.add_argument(
        "--precision",
        choices=("fp32", "bf16"),
        default="fp32",
        help="fp32, or bf16 autocast over the weights as bf16 mixed-precision training (default fp32)",
    )
    parser.add_argument("--device", default=None, help="cpu or cuda[:N] (default: cuda when available)")
    parser.add_argument("--method", default=None, help="name stored as results['method'] (default: the file stem)")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")


def run(args: argparse.Namespace) -> int:
    from moelpr.evaluate import load_model_and_tokenizer, resolve_device
    from moelpr.evaluate.perplexity import evaluate_corpora
    from moelpr.utils.atomic import atomic_write_json

    for flag, value in (
        ("--max-docs", args.max_docs),
        ("--max-tokens", args.max_tokens),
        ("--batch-size", args.batch_size),
        ("--context-len", args.context_len),
    ):
        if value is not None and value < 1:
            raise UserError(f"{flag} must be at least 1, got {value}")
    if not Path(args.model).is_dir():
        raise UserError(f"model directory {args.model} does not exist; pass --model DIR written by save_pretrained")
    if not Path(args.corpora).is_file():
        raise UserError(f"corpora file {args.corpora} does not exist; pass --corpora FILE (YAML or dataset_info.json)")
    device = resolve_device(args.device)

    from moelpr.data.corpus import load_corpora

    corpora = load_corpora(args.corpora)
    model, tokenizer = load_model_and_tokenizer(args.model, dtype=args.dtype, device=device)
    results = evaluate_corpora(
        model,
        tokenizer,
        corpora,
        batch_size=args.batch_size,
        max_docs=args.max_docs,
        max_tokens=args.max_tokens,
        context_len=args.context_len,
        progress=not args.no_progress,
        precision=args.precision,
    )
    results = {"method": args.method or Path(args.output).stem, "model": str(args.model), **results}
    atomic_write_json(args.output, results)
    avg = results["avg"]
    summary = ", ".join(
        f"{role} ppl {v['ppl']:.3f} bpb {v['bpb']:.4f}" for role, v in avg.items() if v["ppl"] is not None
    )
    print(f"wrote {args.output}: {summary}")
    return 0
