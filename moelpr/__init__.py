"""moelpr: teach an existing LLM new languages without forgetting (MoE-LPR, LayerMoE).

Public API: `upcycle`, `loramoe`, `load_model`, `save_model`, `MoELPRConfig`, `MoELPRForCausalLM`, `set_trainable`,
`parameter_summary`, `capture_router_logits` and the loss functions in `moelpr.losses`. The model itself
is defined in `moelpr.model`, the modules every checkpoint carries.
"""

from moelpr.checkpoint import load_model, save_model
from moelpr.model import MoEBlock, MoELPRConfig, MoELPRForCausalLM, MoELPROutput, StackedExperts, UserError, register
from moelpr.model.capture import capture_router_logits, moe_blocks
from moelpr.moe.freeze import parameter_counts, parameter_summary, set_trainable
from moelpr.moe.upcycle import add_classifiers, add_expert_group, loramoe, upcycle

register()

__all__ = [
    "MoEBlock",
    "MoELPRConfig",
    "add_classifiers",
    "MoELPRForCausalLM",
    "MoELPROutput",
    "StackedExperts",
    "UserError",
    "add_expert_group",
    "capture_router_logits",
    "load_model",
    "loramoe",
    "moe_blocks",
    "parameter_counts",
    "parameter_summary",
    "save_model",
    "set_trainable",
    "upcycle",
]
