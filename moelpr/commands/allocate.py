"""`moe-lpr allocate`: experts per layer from LayerMoE similarities (docs/method.md §4).

moe-lpr allocate --similarity similarity.json --budget 70 --output allocation.json [--model DIR]
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from moelpr.errors import UserError

EXAMPLE = "moe-lpr allocate --similarity runs/similarity.json --budget 72 --output runs/allocation.json"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    from moelpr.layermoe.allocation import NONPOSITIVE  # light: no torch, no matplotlib at import

    parser.add_argument("--similarity", required=True, help="similarity.json from `moe-lpr similarity`")
    parser.add_argument("--budget", type=float, required=True, help="δ, the pre-ceiling scale (≥ 2 × layers)")
    parser.add_argument("--output", required=True, help="allocation.json to write")
    parser.add_argument("--model", default=None, help="model directory whose layer count must match")
    parser.add_argument("--plot", default=None, help="PNG to write (default: <output stem>.png next to the output)")
    parser.add_argument("--min-experts", type=int, default=2, help="floor per layer, expert 0 included (default 2)")
    parser.add_argument(
        "--nonpositive",
        choices=NONPOSITIVE,
        default="error",
        help="a layer whose S_l ≤ 0 (1/S_l undefined): an error (default), or scored as the least similar layer "
        "with a positive S_l, so it gets the most experts (our extension; the paper's scores are all > 0)",
    )


def _num_layers(model_dir: Path) -> int:
    """Decoder layer count from `config.json` (top level, or a nested sub-config such as the base LM's)."""
    config_path = model_dir / "config.json"
    if not config_path.is_file():
        raise UserError(f"model directory {model_dir} does not exist or has no config.json; fix --model")
    config = json.loads(config_path.read_text(encoding="utf-8"))
    candidates = [config] + [v for v in config.values() if isinstance(v, dict)]
    for candidate in candidates:
        if isinstance(candidate.get("num_hidden_layers"), int):
            return candidate["num_hidden_layers"]
    raise UserError(f"{config_path} has no num_hidden_layers; cannot check the layer count")


def run(args: argparse.Namespace) -> int:
    from moelpr.layermoe.allocation import (
        allocate_experts,
        check_against_model,
        load_similarity,
        plot_allocation,
        scores_from_similarity,
    )
    from moelpr.utils.atomic import atomic_write_bytes, atomic_write_json

    similarity = load_similarity(args.similarity)
    if args.model is not None:
        check_against_model(similarity, _num_layers(Path(args.model)))
    scores = scores_from_similarity(similarity, args.similarity)
    experts = allocate_experts(scores, args.budget, min_experts=args.min_experts, nonpositive=args.nonpositive)
    budget = int(args.budget) if float(args.budget).is_integer() else args.budget
    total = sum(experts)
    allocation = {
        "experts_per_layer": experts,
        "budget": budget,
        "total_experts": total,
        "new_experts": total - len(experts),
        "scores": scores,
        "source": str(args.similarity),
    }
    floored = [layer for layer, score in enumerate(scores) if score <= 0]
    if floored:  # only reached with --nonpositive least-similar
        allocation["scored_as_least_similar"] = floored
    output = Path(args.output)
    plot = Path(args.plot) if args.plot else output.with_suffix(".png")
    png = plot_allocation(scores, experts, title=f"LayerMoE allocation, δ={budget}")  # before writing anything
    atomic_write_json(output, allocation)
    atomic_write_bytes(plot, png)

    print(f"{'layer':>5}  {'S_l':>8}  {'experts':>7}")
    for layer, (score, n) in enumerate(zip(scores, experts)):
        print(f"{layer:>5}  {score:>8.4f}  {n:>7}")
    print(f"total {total} experts ({total - len(experts)} new) for δ={budget}; wrote {output} and {plot}")
    return 0
