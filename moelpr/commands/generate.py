"""`moe-lpr generate`: continue a prompt with a (dense or MoE-LPR) model, streaming the text."""

from __future__ import annotations

import argparse

EXAMPLE = "moe-lpr generate --model runs/stage2 --prompt 'Καλημέρα' --max-new-tokens 32 --greedy"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--model", required=True, help="model directory (dense, full or delta MoE-LPR)")
    parser.add_argument("--prompt", required=True, help="text to continue")
    parser.add_argument("--max-new-tokens", type=int, default=64, help="tokens to generate at most (default 64)")
    parser.add_argument("--temperature", type=float, default=1.0, help="sampling temperature (default 1.0; 0 = greedy)")
    parser.add_argument("--top-p", type=float, default=None, help="nucleus sampling threshold (default: off)")
    parser.add_argument("--greedy", action="store_true", help="greedy decoding (ignores --temperature)")
    parser.add_argument("--seed", type=int, default=0, help="random seed for sampling (default 0)")
    parser.add_argument("--base-model", default=None, help="dense base directory of a delta checkpoint, if it moved")
    parser.add_argument("--device", default=None, help="e.g. cpu, cuda (default: cuda when available)")


def _tokenizer_dir(args: argparse.Namespace, model) -> str:
    """The model directory if it holds a tokenizer, else (delta checkpoints) the base model's."""
    from pathlib import Path

    from moelpr.errors import UserError

    candidates = [args.model, args.base_model, getattr(model.config, "base_model_path", None)]
    for path in candidates:
        if path and any((Path(path) / name).is_file() for name in ("tokenizer.json", "tokenizer_config.json")):
            return str(path)
    raise UserError(f"no tokenizer in {args.model} (or its base model); save one there with tokenizer.save_pretrained")


def run(args: argparse.Namespace) -> None:
    import sys

    import torch
    from transformers import AutoTokenizer, TextStreamer

    import moelpr
    from moelpr.generation import generate_ids, generation_kwargs

    kwargs = generation_kwargs(
        max_new_tokens=args.max_new_tokens, temperature=args.temperature, greedy=args.greedy, top_p=args.top_p
    )
    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    model = moelpr.load_model(args.model, base_model=args.base_model, device=device)
    tokenizer = AutoTokenizer.from_pretrained(_tokenizer_dir(args, model))
    torch.manual_seed(args.seed)
    streamer = TextStreamer(tokenizer, skip_prompt=False, skip_special_tokens=True)  # prints the prompt too
    generate_ids(model, tokenizer, args.prompt, streamer=streamer, **kwargs)
    sys.stdout.flush()
