"""Configuration of an MoE-LPR model (standalone copy written by `moe-lpr export --format hf`).

This file must stay self-contained: it is copied next to exported weights and loaded by stock
transformers with `trust_remote_code=True`, where the `moelpr` package may not be installed.
Imports: transformers only.
"""

from __future__ import annotations

from transformers import AutoConfig, PreTrainedConfig
from transformers.configuration_utils import SubConfigSpec


class MoELPRConfig(PreTrainedConfig):
    """The dense base config (`text_config`) plus the expert layout.

    Attributes:
        text_config: the dense base model's config.
        experts_per_layer: experts per decoder layer, counting the original expert 0 (1 = dense layer).
        expert_groups: new experts per expansion group and layer, `[[g0_l0, g0_l1, ...], ...]`.
        num_experts_per_tok: top-k (capped at a layer's expert count).
    """

    model_type = "moelpr"
    sub_configs_defaults = {"text_config": SubConfigSpec(config_class=AutoConfig, model_type="llama")}

    text_config: dict | PreTrainedConfig | None = None
    experts_per_layer: list[int] | None = None
    expert_groups: list[list[int]] | None = None
    num_experts_per_tok: int = 2
    aux_loss_coef: float = 0.01
    lpr_loss_coef: float = 0.0
    cls_loss_coef: float = 0.0
    balance_loss_form: str = "mixtral"
    lpr_loss_form: str = "paper"
    classifier_layers: list[int] | None = None
    classifier_groups: int = 2
    classifier_pooling: str = "sequence"
    base_model_path: str | None = None
    base_fingerprint: str | None = None
    lm_loss_chunk_size: int = 4096
    tie_word_embeddings: bool = False

    def __post_init__(self, **kwargs):
        base_attn = getattr(self.text_config, "_attn_implementation", None)
        super().__post_init__(**kwargs)
        if base_attn is not None and self._attn_implementation is None:
            self._attn_implementation = base_attn
        self.tie_word_embeddings = bool(getattr(self.text_config, "tie_word_embeddings", False))
        layers = self.text_config.num_hidden_layers
        if self.experts_per_layer is None:
            self.experts_per_layer = [1] * layers
        if self.expert_groups is None:
            self.expert_groups = [[n - 1 for n in self.experts_per_layer]]
        totals = [1 + sum(group[i] for group in self.expert_groups) for i in range(layers)]
        if len(self.experts_per_layer) != layers or totals != list(self.experts_per_layer):
            raise ValueError(f"experts_per_layer {self.experts_per_layer} does not match the model's {layers} layers "
                             f"and expert_groups {self.expert_groups}")
