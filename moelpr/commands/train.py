"""`moe-lpr train RECIPE.yaml [--key value ...]`: run a training recipe; the overrides win over the file."""

from __future__ import annotations

import argparse


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("recipe", help="recipe YAML (see recipes/)")
    # Everything after the recipe is `--key value` overrides of recipe or TrainingArguments keys. The CLI
    # calls parse_args, so REMAINDER collects them (what parse_known_args would leave over).
    parser.add_argument(
        "overrides",
        nargs=argparse.REMAINDER,
        metavar="--key value",
        help="override any recipe or TrainingArguments key, e.g. --learning_rate 1e-4 --max_steps 10 "
        "(values are YAML: numbers, true/false, [lists])",
    )


def run(args: argparse.Namespace) -> None:
    from moelpr.train import load_recipe, train

    recipe = load_recipe(args.recipe, list(args.overrides or []))
    out = train(recipe)
    print(f"trained model written to {out}")
