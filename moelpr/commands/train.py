"""`moe-lpr train RECIPE.yaml [--key value ...]`: run a training recipe; the overrides win over the file."""

from __future__ import annotations

import argparse

EXAMPLE = "moe-lpr train recipes/moe_lpr/qwen1.5-1.8b_stage1.yaml --max_steps 10 --output_dir runs/try"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    from moelpr.train.overrides import recipe_help

    parser.epilog = f"{recipe_help()}\n\n{parser.epilog or ''}"
    parser.add_argument("recipe", nargs="?", help="recipe YAML (see recipes/)")
    # Everything after the recipe is `--key value` overrides of recipe or TrainingArguments keys. The CLI
    # calls parse_args, so REMAINDER collects them (what parse_known_args would leave over).
    parser.add_argument(
        "overrides",
        nargs=argparse.REMAINDER,
        metavar="--key value",
        help="override any recipe or TrainingArguments key, e.g. --learning_rate 1e-4 --max_steps 10 "
        "(values are YAML: numbers, true/false, [lists]; text where the key expects text: --save_strategy no)",
    )


def run(args: argparse.Namespace) -> None:
    from moelpr.errors import UserError
    from moelpr.train import load_recipe, train

    if args.recipe is None or args.recipe.startswith("--"):
        raise UserError(f"no recipe given; pass a recipe YAML first, e.g. {EXAMPLE}")
    recipe = load_recipe(args.recipe, list(args.overrides or []))
    out = train(recipe)
    print(f"trained model written to {out}")
