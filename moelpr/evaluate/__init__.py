"""Evaluation: per-language perplexity / bits per byte, routing statistics, lm-eval integration, reports.

- `evaluate_corpora` (perplexity.py): held-out perplexity, bits per byte and routing per language.
- `RoutingSums` / `routing_counts` (routing.py): statistics of the routing the MoE blocks applied.
- `moelpr.evaluate.harness`: `run_benchmark` (stock lm-eval `hf` with remote code) and the papers' task suites
  (needs `moelpr[eval]`).
- `render_report` (report.py): Markdown table and PNG figures from results files.
"""

from __future__ import annotations

import os
from pathlib import Path

from moelpr.errors import UserError

_LAZY = {  # imported when first used (PEP 562): `moe-lpr benchmark --help` and `report` stay free of torch
    "context_length": "perplexity",
    "evaluate_corpora": "perplexity",
    "evaluate_texts": "perplexity",
    "prefix_token_id": "perplexity",
    "rolling_windows": "perplexity",
    "RoutingSums": "routing",
    "routing_counts": "routing",
}

__all__ = [
    "RoutingSums",
    "context_length",
    "evaluate_corpora",
    "evaluate_texts",
    "load_model_and_tokenizer",
    "prefix_token_id",
    "resolve_device",
    "resolve_dtype",
    "rolling_windows",
    "routing_counts",
]

_DTYPES = ("auto", "float32", "bfloat16", "float16")


def __getattr__(name: str):
    if name not in _LAZY:
        raise AttributeError(f"module 'moelpr.evaluate' has no attribute {name!r}")
    import importlib

    return getattr(importlib.import_module(f"{__name__}.{_LAZY[name]}"), name)


def resolve_dtype(name: str | None):
    """'auto'/None → None (the checkpoint's dtype), else the torch dtype of that name."""
    import torch

    if name in (None, "auto"):
        return None
    if name not in _DTYPES:
        raise UserError(f"unknown dtype {name!r}; choose one of {', '.join(_DTYPES)}")
    return getattr(torch, name)


def resolve_device(name: str | None) -> str:
    """None → 'cuda' when available, else 'cpu'; 'cuda…' without a GPU is a UserError."""
    import torch

    if name is None:
        return "cuda" if torch.cuda.is_available() else "cpu"
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise UserError(f"--device {name} was asked for but no CUDA device is available; use --device cpu")
    return name


def load_model_and_tokenizer(
    model_dir: str | os.PathLike, *, dtype: str | None = None, device: str | None = None, base_model: str | None = None
):
    """Load a dense or MoE-LPR model directory (`moelpr.load_model`) and its tokenizer, in eval mode.

    The tokenizer comes from `model_dir`, else (a small delta checkpoint saved without one) from the
    base model directory recorded in its config. `base_model` is the dense base of a delta checkpoint
    whose base has moved since saving.
    """
    from transformers import AutoTokenizer

    from moelpr.checkpoint import load_model

    path = Path(model_dir)
    if not path.is_dir():
        raise UserError(f"model directory {path} does not exist; pass --model DIR written by save_pretrained")
    model = load_model(path, dtype=resolve_dtype(dtype), device=resolve_device(device), base_model=base_model).eval()
    candidates = [path, base_model, getattr(model.config, "base_model_path", None)]
    for candidate in [c for c in candidates if c]:
        try:
            return model, AutoTokenizer.from_pretrained(candidate)
        except (OSError, ValueError):
            continue
    raise UserError(f"no tokenizer found in {path}; save the tokenizer next to the model (tokenizer.save_pretrained)")
