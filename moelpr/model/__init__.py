"""The model definition that ships with every checkpoint.

`save_pretrained` copies `configuration_moelpr.py`, `modeling_moelpr.py` and every module they import
(relatively, from this directory) beside config.json and writes its `auto_map`, so stock transformers loads
any full checkpoint with `trust_remote_code=True` where moelpr is not installed. These modules import only
torch, transformers and each other; the package uses exactly them (nothing else defines the model).
This `__init__` is package glue and is not shipped; it imports its names when first used (PEP 562), so
`moelpr.model.errors` and `moelpr.model.options` stay free of torch.
"""

from __future__ import annotations

import importlib
from typing import Any

_EXPORTS = {
    "MoELPRConfig": "configuration_moelpr",
    "UserError": "errors",
    "MoEBlock": "layer",
    "Routing": "layer",
    "StackedExperts": "layer",
    "CACHE_ARG": "modeling_moelpr",
    "DELTA_META": "modeling_moelpr",
    "MoELPRForCausalLM": "modeling_moelpr",
    "MoELPROutput": "modeling_moelpr",
}
__all__ = [*_EXPORTS, "register"]


def register() -> None:
    """Make `AutoConfig` / `AutoModelForCausalLM` know `model_type: moelpr` in this process (idempotent)."""
    from transformers import AutoConfig, AutoModelForCausalLM

    from .configuration_moelpr import MoELPRConfig
    from .modeling_moelpr import MoELPRForCausalLM

    try:
        AutoConfig.register("moelpr", MoELPRConfig)
    except ValueError:
        pass  # already registered
    try:
        AutoModelForCausalLM.register(MoELPRConfig, MoELPRForCausalLM)
    except ValueError:
        pass


def __getattr__(name: str) -> Any:
    if name not in _EXPORTS:
        raise AttributeError(f"module 'moelpr.model' has no attribute {name!r}")
    value = getattr(importlib.import_module(f"{__name__}.{_EXPORTS[name]}"), name)
    globals()[name] = value
    return value
