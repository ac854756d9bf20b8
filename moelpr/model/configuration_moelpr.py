"""`MoELPRConfig`: a dense causal LM's config plus the MoE-LPR expert layout and loss settings.

Part of the model definition that ships with every checkpoint (see `moelpr/model/__init__.py`): imports only
transformers and its sibling modules.
"""

from __future__ import annotations

from transformers import AutoConfig, PreTrainedConfig
from transformers.configuration_utils import SubConfigSpec

from .errors import UserError
from .options import DEFAULTS, check_positive_int, check_settings


class MoELPRConfig(PreTrainedConfig):
    """Configuration of an MoE-LPR model: the base model's config plus the expert layout and loss settings.

    Attributes:
        text_config: the dense base model's config.
        experts_per_layer: experts per decoder layer, counting the original expert 0 (1 = layer stays dense).
        expert_groups: new experts per expansion group and layer, `[[g0_l0, g0_l1, ...], [g1_l0, ...]]`;
            lifelong expansion appends groups. Default: one group with `experts_per_layer[l] − 1`.
        num_experts_per_tok: experts per token, top-k (capped at a layer's expert count).
        aux_loss_coef / lpr_loss_coef / cls_loss_coef: weights of the balance, LPR and classifier losses (the
            papers' 0.01 / 0.1 / 0.1 by default; a training stage sets the ones it does not use to 0).
        balance_loss_form: "mixtral" (official code, ≈ k when balanced) or "paper" (÷ k).
        lpr_loss_form: "paper" (−log G_0) or "official" (CE on the softmax probabilities).
        lpr_loss_reduction: "mean" over (MoE layer, old token) pairs (official code, docs/method.md §2.3) or "sum" over
            layers and old tokens per LM target token (the paper's Σ_{t∈B}, on the NTP loss's scale).
        classifier_layers: LayerMoE layers with a language-group classifier in front of the router.
        classifier_groups: classes of that classifier (2 for one expansion, 3 after G0 → G1 → G2).
        classifier_pooling: "sequence" (sum over the sequence, official code) or "token".
        base_model_path / base_fingerprint: where the dense base came from (the small checkpoint format).
        lm_loss_chunk_size: target tokens per chunk of the memory-lean LM loss.
        completed_stage: the last training stage finished (0 = just upcycled, 1, 2); lifelong expansion needs 2.
        expert_init: how the first group's new experts started ("copy" of expert 0, or "random"); provenance.
        moe_dispatch: how MoE blocks run their experts ("auto" picks by device; see `dispatch.py`).
        loramoe: the LoRAMoE baseline instead of upcycled experts: `{"experts": E, "rank": r, "alpha": α}`
            LoRA experts with a softmax router on every MLP linear (`loramoe.py`); every layer stays dense.
    """

    model_type = "moelpr"
    sub_configs_defaults = {"text_config": SubConfigSpec(config_class=AutoConfig, model_type="llama")}

    text_config: dict | PreTrainedConfig | None = None
    experts_per_layer: list[int] | None = None
    expert_groups: list[list[int]] | None = None
    num_experts_per_tok: int = DEFAULTS["num_experts_per_tok"]
    aux_loss_coef: float = DEFAULTS["aux_loss_coef"]
    lpr_loss_coef: float = DEFAULTS["lpr_loss_coef"]
    cls_loss_coef: float = DEFAULTS["cls_loss_coef"]
    balance_loss_form: str = DEFAULTS["balance_loss_form"]
    lpr_loss_form: str = DEFAULTS["lpr_loss_form"]
    lpr_loss_reduction: str = DEFAULTS["lpr_loss_reduction"]
    classifier_layers: list[int] | None = None
    classifier_groups: int = 2
    classifier_pooling: str = DEFAULTS["classifier_pooling"]
    base_model_path: str | None = None
    base_fingerprint: str | None = None
    lm_loss_chunk_size: int = 1024
    completed_stage: int = 0
    expert_init: str = DEFAULTS["expert_init"]
    moe_dispatch: str = DEFAULTS["moe_dispatch"]
    loramoe: dict | None = None
    tie_word_embeddings: bool = False

    def __post_init__(self, **kwargs):
        # The composite-config machinery pushes our (unset) attention implementation down to text_config;
        # keep the one the wrapped model already resolved.
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
            raise UserError(
                f"experts_per_layer {self.experts_per_layer} does not match the model's {layers} layers "
                f"and expert_groups {self.expert_groups}"
            )
        check_settings(self)
        check_positive_int("num_experts_per_tok", self.num_experts_per_tok)
        check_positive_int("lm_loss_chunk_size", self.lm_loss_chunk_size)

        if self.loramoe is not None:
            spec = self.loramoe
            if set(spec) != {"experts", "rank", "alpha"} or any(
                isinstance(spec[k], bool) or not isinstance(spec[k], (int, float)) or spec[k] <= 0 for k in spec
            ):
                raise UserError(
                    f"loramoe must be {{experts: E, rank: r, alpha: a}} with positive numbers, got {spec!r}"
                )
            if self.moe_layers:
                raise UserError("loramoe is a baseline on the dense layers; it does not combine with upcycled experts")

    @property
    def moe_layers(self) -> list[int]:
        """Indices of the layers that are MoE blocks (at least one new expert)."""
        return [i for i, n in enumerate(self.experts_per_layer) if n > 1]


MoELPRConfig.register_for_auto_class()  # save_pretrained writes this module and `auto_map` beside config.json
