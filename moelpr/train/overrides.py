"""Recipes on the command line: `--key value` overrides read as the key expects, and `moe-lpr train --help`'s list
of recipe keys."""

from __future__ import annotations

import dataclasses
from typing import Any

from moelpr.errors import UserError
from moelpr.train.recipe import Recipe, yaml_key


def recipe_help() -> str:
    """Every moelpr recipe key with its type, default and the first line of its description (`train --help`)."""
    import ast
    import inspect

    tree = ast.parse(inspect.getsource(Recipe))
    body = tree.body[0].body
    docs = {
        node.target.id: " ".join(nxt.value.value.split()).split(". ")[0].rstrip(".")
        for node, nxt in zip(body, body[1:])
        if isinstance(node, ast.AnnAssign) and isinstance(nxt, ast.Expr) and isinstance(nxt.value, ast.Constant)
    }
    lines = ["recipe keys (any transformers.TrainingArguments field is a key too):"]
    for f in dataclasses.fields(Recipe):
        if f.name == "training_args":
            continue
        default = "required" if f.default is dataclasses.MISSING else f"default {f.default!r}"
        lines.append(f"  {yaml_key(f.name)} ({f.type}; {default}): {docs.get(f.name, '')}")
    return "\n".join(lines)


def parse_overrides(overrides: list[str]) -> dict[str, str | bool]:
    """`["--key", "value", "--flag", "--k2=v2"]` → `{"key": "value", "flag": True, "k2": "v2"}` (text, typed later)."""
    parsed: dict[str, str | bool] = {}
    i = 0
    while i < len(overrides):
        token = overrides[i]
        if not token.startswith("--") or len(token) <= 2:
            raise UserError(f"unexpected argument {token!r}; overrides look like --key value")
        key, eq, text = token[2:].partition("=")
        if not eq:
            if i + 1 < len(overrides) and not overrides[i + 1].startswith("--"):
                text = overrides[i + 1]
                i += 1
            else:
                text = True  # a bare flag
        parsed[key.replace("-", "_")] = text
        i += 1
    return parsed


def typed(text: str | bool, type_text: str) -> Any:
    """A command-line value read as YAML (numbers, true/false, [lists]), unless the key expects text that YAML
    would turn into something else: `--save_strategy no` stays "no", `--run_name 123` stays "123"."""
    import yaml

    if not isinstance(text, str) or text == "":
        return text
    try:
        value = yaml.safe_load(text)
    except yaml.YAMLError:
        return text
    kind = {bool: "bool", int: "int", float: "float", list: "list", dict: "dict", type(None): "None"}.get(type(value))
    accepted = kind is None or kind in type_text or (kind == "int" and "float" in type_text)
    if kind is not None and "str" in type_text and not accepted:
        return text
    return value
