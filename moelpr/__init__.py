"""moelpr: teach an existing LLM new languages without forgetting (MoE-LPR, LayerMoE).

Public API: `upcycle`, `loramoe`, `load_model`, `save_model`, `MoELPRConfig`, `MoELPRForCausalLM`, `MoEBlock`,
`set_trainable`, `parameter_summary`, `capture_routing`, `capture_router_logits`, `add_classifiers`,
`add_expert_group`, `register` and the loss functions in `moelpr.losses` (= `moelpr.model.losses`). The model
itself is defined in `moelpr.model`, the modules every checkpoint carries.

Names are imported when first used (PEP 562), so `import moelpr` and the command line's help stay free of torch.
Using any model name registers `model_type: moelpr` with transformers' Auto classes (`register`).
"""

from __future__ import annotations

import importlib
from typing import Any

_EXPORTS = {
    "MoEBlock": "moelpr.model",
    "MoELPRConfig": "moelpr.model",
    "MoELPRForCausalLM": "moelpr.model",
    "MoELPROutput": "moelpr.model",
    "StackedExperts": "moelpr.model",
    "UserError": "moelpr.errors",
    "register": "moelpr.model",
    "capture_routing": "moelpr.model.capture",
    "capture_router_logits": "moelpr.model.capture",
    "moe_blocks": "moelpr.model.capture",
    "load_model": "moelpr.checkpoint",
    "save_model": "moelpr.checkpoint",
    "loramoe": "moelpr.baselines",
    "upcycle": "moelpr.upcycling.upcycle",
    "add_classifiers": "moelpr.upcycling.expand",
    "add_expert_group": "moelpr.upcycling.expand",
    "parameter_counts": "moelpr.upcycling.freeze",
    "parameter_summary": "moelpr.upcycling.freeze",
    "set_trainable": "moelpr.upcycling.freeze",
}
__all__ = ["__version__", *_EXPORTS]


def __getattr__(name: str) -> Any:
    if name == "__version__":
        from importlib.metadata import PackageNotFoundError, version

        try:
            return version("moelpr")
        except PackageNotFoundError:  # run from a source tree that was never installed
            return "0+unknown"
    if name == "losses":
        return importlib.import_module("moelpr.model.losses")
    if name not in _EXPORTS:
        raise AttributeError(f"module 'moelpr' has no attribute {name!r}")
    value = getattr(importlib.import_module(_EXPORTS[name]), name)
    if _EXPORTS[name] != "moelpr.errors":
        importlib.import_module("moelpr.model").register()
    globals()[name] = value  # later lookups skip __getattr__
    return value


def __dir__() -> list[str]:
    return sorted(__all__)
