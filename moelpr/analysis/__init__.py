"""LayerMoE analysis: per-layer cross-lingual similarity and expert allocation.

Names are resolved lazily so that `moelpr.analysis.allocation` (used by `moe-lpr allocate`) does not
import torch.
"""

from __future__ import annotations

import importlib
from typing import Any

_EXPORTS = {
    "mean_pairwise_cosine": "similarity",
    "compute_similarity": "similarity",
    "collect_token_ids": "similarity",
    "unit_vector_sums": "similarity",
    "layer_scores": "similarity",
    "decoder_layers": "similarity",
    "allocate_experts": "allocation",
    "scores_from_similarity": "allocation",
    "load_similarity": "allocation",
    "check_against_model": "allocation",
    "plot_allocation": "allocation",
}

__all__ = list(_EXPORTS)


def __getattr__(name: str) -> Any:
    if name not in _EXPORTS:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    return getattr(importlib.import_module(f"{__name__}.{_EXPORTS[name]}"), name)
