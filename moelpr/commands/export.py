"""`moe-lpr export`: MoE-LPR model directory → portable full checkpoint (remote code), Mixtral or Qwen-MoE checkpoint."""

from __future__ import annotations

import argparse

EXAMPLE = "moe-lpr export --model runs/stage2 --format hf --output runs/stage2-hf"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--model", required=True, help="MoE-LPR model directory (full or delta)")
    parser.add_argument(
        "--format",
        default="hf",
        help="hf (the full checkpoint with its model code, e.g. from a delta one; any base), mixtral (Llama/Mistral bases), "
        "qwen3_moe (Qwen3 bases) or qwen2_moe (Qwen2 bases); default hf",
    )
    parser.add_argument("--output", required=True, help="output directory (must not exist or be empty)")
    parser.add_argument("--overwrite", action="store_true", help="replace a non-empty output directory")
    parser.add_argument("--base-model", default=None, help="dense base directory of a delta checkpoint, if it moved")
    parser.add_argument(
        "--no-verify",
        action="store_true",
        help="skip comparing the converted model's logits with ours (native formats)",
    )


def run(args: argparse.Namespace) -> None:
    from pathlib import Path

    import moelpr
    from moelpr.errors import UserError
    from moelpr.export import FORMATS, export_model

    if args.format not in FORMATS:  # before loading the model
        raise UserError(f"unknown export format {args.format!r}; choose one of: {', '.join(FORMATS)}")
    model = moelpr.load_model(args.model, base_model=args.base_model)
    source = Path(args.model)
    if not any(source.glob("tokenizer*")) and getattr(model.config, "base_model_path", None):
        source = Path(model.config.base_model_path)  # delta checkpoint saved without its tokenizer
    export_model(
        model, args.output, format=args.format, overwrite=args.overwrite, source_dir=source, verify=not args.no_verify
    )
    how = (
        "AutoModelForCausalLM.from_pretrained(OUT, trust_remote_code=True)"
        if args.format == "hf"
        else "AutoModelForCausalLM.from_pretrained(OUT)"
    )
    print(f"exported {args.model} -> {args.output} ({args.format}); load with {how}")
