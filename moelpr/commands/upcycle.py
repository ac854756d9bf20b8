"""`moe-lpr upcycle`: dense model directory → MoE-LPR model directory."""

from __future__ import annotations

import argparse

from moelpr.errors import UserError


def _layers(text: str) -> list[int]:
    try:
        return [int(part) for part in text.split(",") if part.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"--layers takes comma-separated layer indices like 0,1,5, got {text!r}") from None


def _num_experts(text: str) -> int | list[int]:
    try:
        values = [int(part) for part in text.split(",")]
    except ValueError:
        raise argparse.ArgumentTypeError(f"--num-experts takes a count or one count per layer like 2,3,3,2, got {text!r}") from None
    return values[0] if len(values) == 1 else values


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--model", required=True, help="dense model directory (save_pretrained format)")
    parser.add_argument("--num-experts", type=_num_experts, default=4,
                        help="experts per layer counting the original one, or one count per layer (default 4)")
    parser.add_argument("--top-k", type=int, default=2, help="experts per token (default 2)")
    parser.add_argument("--layers", type=_layers, default=None, help="layers to upcycle, e.g. 0,1,5 (default: all)")
    parser.add_argument("--format", choices=("full", "delta"), default="full",
                        help="full checkpoint, or only the new weights plus a path to the base (default full)")
    parser.add_argument("--output", required=True, help="output directory (must not exist or be empty)")
    parser.add_argument("--overwrite", action="store_true", help="replace a non-empty output directory")


def run(args: argparse.Namespace) -> None:
    from pathlib import Path

    from transformers import AutoTokenizer

    import moelpr

    model = moelpr.load_model(args.model)
    if isinstance(model, moelpr.MoELPRForCausalLM):
        raise UserError(f"{args.model} is already an MoE-LPR model; upcycle a dense model")
    moe = moelpr.upcycle(model, num_experts=args.num_experts, top_k=args.top_k, layers=args.layers)
    moe.config.base_model_path = str(Path(args.model).resolve())
    tokenizer = None
    if any((Path(args.model) / name).is_file() for name in ("tokenizer.json", "tokenizer_config.json")):
        tokenizer = AutoTokenizer.from_pretrained(args.model)
    moelpr.save_model(moe, args.output, format=args.format, tokenizer=tokenizer, overwrite=args.overwrite)
    print(f"upcycled {args.model} -> {args.output}: experts per layer {moe.config.experts_per_layer}, "
          f"top-{moe.config.num_experts_per_tok}")
    print(moelpr.parameter_summary(moe))
