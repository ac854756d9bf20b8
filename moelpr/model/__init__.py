"""The model definition that ships with every checkpoint.

`save_pretrained` copies `configuration_moelpr.py`, `modeling_moelpr.py` and every module they import
(relatively, from this directory) beside config.json and writes its `auto_map`, so stock transformers loads
any full checkpoint with `trust_remote_code=True` where moelpr is not installed. These modules import only
torch, transformers and each other; the package uses exactly them (nothing else defines the model).
This `__init__` is package glue and is not shipped.
"""

from moelpr.model.configuration_moelpr import MoELPRConfig
from moelpr.model.errors import UserError
from moelpr.model.layer import MoEBlock, StackedExperts
from moelpr.model.modeling_moelpr import CACHE_ARG, DELTA_META, MoELPRForCausalLM, MoELPROutput


def register() -> None:
    """Make `AutoConfig` / `AutoModelForCausalLM` know `model_type: moelpr` in this process (idempotent)."""
    from transformers import AutoConfig, AutoModelForCausalLM

    try:
        AutoConfig.register("moelpr", MoELPRConfig)
    except ValueError:
        pass  # already registered
    try:
        AutoModelForCausalLM.register(MoELPRConfig, MoELPRForCausalLM)
    except ValueError:
        pass


__all__ = [
    "CACHE_ARG",
    "DELTA_META",
    "MoEBlock",
    "MoELPRConfig",
    "MoELPRForCausalLM",
    "MoELPROutput",
    "StackedExperts",
    "UserError",
    "register",
]
