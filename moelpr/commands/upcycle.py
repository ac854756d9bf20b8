"""`moe-lpr upcycle`: dense model directory → MoE-LPR model directory, streamed tensor by tensor.

The dense safetensors checkpoint is read lazily and the MoE checkpoint written shard by shard
(`moelpr.upcycling.stream`), so the peak memory is about one output shard plus one layer, not the model.
"""

from __future__ import annotations

import argparse


def _layers(text: str) -> list[int]:
    try:
        return [int(part) for part in text.split(",") if part.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"--layers takes comma-separated layer indices like 0,1,5, got {text!r}"
        ) from None


def _num_experts(text: str) -> int | list[int]:
    try:
        values = [int(part) for part in text.split(",")]
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"--num-experts takes a count or one count per layer like 2,3,3,2, got {text!r}"
        ) from None
    return values[0] if len(values) == 1 else values


EXAMPLE = "moe-lpr upcycle --model Qwen1.5-1.8B --num-experts 6 --top-k 2 --output Qwen1.5-1.8B-moe"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--model", required=True, help="dense model directory (save_pretrained format, safetensors)")
    parser.add_argument(
        "--num-experts",
        type=_num_experts,
        default=4,
        help="experts per layer counting the original one, or one count per layer (default 4)",
    )
    parser.add_argument("--top-k", type=int, default=2, help="experts per token (default 2)")
    parser.add_argument("--layers", type=_layers, default=None, help="layers to upcycle, e.g. 0,1,5 (default: all)")
    parser.add_argument(
        "--format",
        choices=("full", "delta"),
        default="full",
        help="full checkpoint, or only the new weights plus a path to the base (default full)",
    )
    parser.add_argument(
        "--seed",
        type=int,
        default=0,
        help="seed of the router initialisation (moelpr.upcycle after torch.manual_seed(SEED) "
        "draws the same routers; default 0)",
    )
    parser.add_argument(
        "--max-shard-size",
        default="2GB",
        help="largest output weights file, e.g. 2GB or 500MB; the peak memory is about one shard "
        "plus one layer's experts (default 2GB, as save_pretrained)",
    )
    parser.add_argument("--output", required=True, help="output directory (must not exist or be empty)")
    parser.add_argument("--overwrite", action="store_true", help="replace a non-empty output directory")


def run(args: argparse.Namespace) -> None:
    from moelpr.upcycling.freeze import parameter_summary
    from moelpr.upcycling.stream import stream_upcycle

    moe = stream_upcycle(
        args.model,
        args.output,
        num_experts=args.num_experts,
        top_k=args.top_k,
        layers=args.layers,
        format=args.format,
        seed=args.seed,
        max_shard_size=args.max_shard_size,
        overwrite=args.overwrite,
    )
    print(
        f"upcycled {args.model} -> {args.output}: experts per layer {moe.config.experts_per_layer}, "
        f"top-{moe.config.num_experts_per_tok}"
    )
    print(parameter_summary(moe))
