"""`MoELPRConfig` and `MoELPRForCausalLM`: an upcycled HF causal LM with the MoE-LPR losses.

The model wraps the stock (upcycled) causal LM as `.lm`, so attention, caches, generation and the weight
layout stay the base family's; only `layer.mlp` is replaced (see `moelpr.moe.upcycle`). The embedded base
config is `text_config`, which makes transformers' generation utilities find it.
"""

from __future__ import annotations

from dataclasses import dataclass
import torch
import torch.nn.functional as F
from transformers import AutoConfig, AutoModelForCausalLM, GenerationMixin, PreTrainedConfig, PreTrainedModel
from transformers.configuration_utils import SubConfigSpec
from transformers.modeling_outputs import MoeCausalLMOutputWithPast

from moelpr import losses
from moelpr.errors import UserError
from moelpr.moe.capture import capture_classifier_logits, capture_router_logits, moe_blocks
from moelpr.moe.classifier import group_labels
from moelpr.moe.upcycle import convert_layers


class MoELPRConfig(PreTrainedConfig):
    """Configuration of an MoE-LPR model: the base model's config plus the expert layout and loss settings.

    Attributes:
        text_config: the dense base model's config.
        experts_per_layer: experts per decoder layer, counting the original expert 0 (1 = layer stays dense).
        expert_groups: new experts per expansion group and layer, `[[g0_l0, g0_l1, ...], [g1_l0, ...]]`;
            lifelong expansion appends groups. Default: one group with `experts_per_layer[l] − 1`.
        num_experts_per_tok: experts per token, top-k (capped at a layer's expert count).
        aux_loss_coef / lpr_loss_coef / cls_loss_coef: weights of the balance, LPR and classifier losses.
        balance_loss_form: "mixtral" (official code, ≈ k when balanced) or "paper" (÷ k).
        lpr_loss_form: "paper" (−log G_0) or "official" (CE on the softmax probabilities).
        classifier_layers: LayerMoE layers with a language-group classifier in front of the router.
        classifier_groups: classes of that classifier (2 for one expansion, 3 after G0 → G1 → G2).
        classifier_pooling: "sequence" (sum over the sequence, official code) or "token".
        base_model_path / base_fingerprint: where the dense base came from (the small checkpoint format).
        lm_loss_chunk_size: target tokens per chunk of the memory-lean LM loss.
        completed_stage: the last training stage finished (0 = just upcycled, 1, 2); lifelong expansion needs 2.
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
    lm_loss_chunk_size: int = 1024
    completed_stage: int = 0
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
            raise UserError(f"experts_per_layer {self.experts_per_layer} does not match the model's {layers} layers "
                            f"and expert_groups {self.expert_groups}")
        if self.balance_loss_form not in ("mixtral", "paper"):
            raise UserError(f"balance_loss_form must be 'mixtral' or 'paper', got {self.balance_loss_form!r}")
        if self.lpr_loss_form not in ("paper", "official"):
            raise UserError(f"lpr_loss_form must be 'paper' or 'official', got {self.lpr_loss_form!r}")
        if self.classifier_pooling not in ("sequence", "token"):
            raise UserError(f"classifier_pooling must be 'sequence' or 'token', got {self.classifier_pooling!r}")

    @property
    def moe_layers(self) -> list[int]:
        """Indices of the layers that are MoE blocks (at least one new expert)."""
        return [i for i, n in enumerate(self.experts_per_layer) if n > 1]


@dataclass
class MoELPROutput(MoeCausalLMOutputWithPast):
    """Causal-LM output with each loss term reported separately (`loss` is their weighted sum)."""

    lm_loss: torch.FloatTensor | None = None
    lpr_loss: torch.FloatTensor | None = None
    cls_loss: torch.FloatTensor | None = None


class MoELPRForCausalLM(PreTrainedModel, GenerationMixin):
    """An upcycled causal LM (`self.lm`) whose forward adds router logits and the MoE-LPR losses."""

    config_class = MoELPRConfig
    base_model_prefix = "lm"
    main_input_name = "input_ids"
    supports_gradient_checkpointing = True
    _supports_sdpa = True
    _supports_flash_attn = True
    _supports_flex_attn = True
    _supports_attention_backend = True
    _can_compile_fullgraph = False

    def __init__(self, config: MoELPRConfig, lm: PreTrainedModel | None = None):
        super().__init__(config)
        if lm is None:
            lm = AutoModelForCausalLM.from_config(config.text_config)
            convert_from_config(lm, config)
        self.lm = lm
        self.post_init()

    @classmethod
    def from_pretrained(cls, pretrained_model_name_or_path, *args, **kwargs):
        """Like `PreTrainedModel.from_pretrained`, and also reads the small (delta) checkpoint format."""
        from moelpr.checkpoint import is_delta_dir, load_model

        if is_delta_dir(pretrained_model_name_or_path):
            return load_model(pretrained_model_name_or_path, dtype=kwargs.get("dtype"))
        return super().from_pretrained(pretrained_model_name_or_path, *args, **kwargs)

    # -- delegation to the wrapped LM ---------------------------------------------------------------
    def get_input_embeddings(self):
        return self.lm.get_input_embeddings()

    def set_input_embeddings(self, value):
        self.lm.set_input_embeddings(value)

    def get_output_embeddings(self):
        return self.lm.get_output_embeddings()

    def set_output_embeddings(self, value):
        self.lm.set_output_embeddings(value)

    def get_decoder(self):
        return self.lm.get_decoder()

    def _init_weights(self, module):
        self.lm._init_weights(module)

    # -- forward --------------------------------------------------------------------------------------
    def forward(
        self,
        input_ids: torch.LongTensor | None = None,
        attention_mask: torch.Tensor | None = None,
        position_ids: torch.LongTensor | None = None,
        past_key_values=None,
        inputs_embeds: torch.FloatTensor | None = None,
        labels: torch.LongTensor | None = None,
        use_cache: bool | None = None,
        lang_mask: torch.Tensor | None = None,
        lang_group: torch.Tensor | None = None,
        output_router_logits: bool | None = None,
        num_items_in_batch: int | torch.Tensor | None = None,
        compute_logits: bool = True,
        logits_to_keep: int | torch.Tensor = 0,
        **kwargs,
    ) -> MoELPROutput:
        cfg = self.config
        need_router = bool(output_router_logits) or labels is not None or lang_mask is not None
        lm_kwargs = dict(attention_mask=attention_mask, position_ids=position_ids, past_key_values=past_key_values,
                         inputs_embeds=inputs_embeds, use_cache=use_cache, **kwargs)
        chunked = labels is not None and not compute_logits
        sequence_classifiers = self._reuse_prompt_decisions(past_key_values)
        with capture_router_logits(self, enabled=need_router) as router_logits, \
                capture_classifier_logits(self, enabled=lang_group is not None) as classifier_logits:
            try:
                if chunked:
                    out = self.lm.get_decoder()(input_ids=input_ids, **lm_kwargs)
                else:
                    out = self.lm(input_ids=input_ids, logits_to_keep=logits_to_keep, **lm_kwargs)
            finally:
                for classifier in sequence_classifiers:
                    classifier.forced = None
        cache = getattr(out, "past_key_values", None)
        if sequence_classifiers and cache is not None and getattr(cache, "moelpr_groups", None) is None:
            cache.moelpr_groups = [c.decided for c in sequence_classifiers]  # decided on the prompt

        logits, lm_loss = (None, None) if chunked else (out.logits, None)
        if labels is not None:
            if chunked:
                lm_loss = losses.causal_lm_loss(out.last_hidden_state, labels, self._logits_from_hidden,
                                                num_items_in_batch=num_items_in_batch, chunk_size=cfg.lm_loss_chunk_size)
            else:
                lm_loss = _causal_lm_loss_from_logits(logits, labels, num_items_in_batch)

        router_logits = tuple(router_logits)
        aux_loss = lpr_loss = None
        if router_logits and (labels is not None or output_router_logits):
            seq_len = router_logits[0].shape[0] // (input_ids if input_ids is not None else inputs_embeds).shape[0]
            token_mask = attention_mask[:, -seq_len:] if attention_mask is not None and attention_mask.dim() == 2 else None
            aux_loss = losses.load_balancing_loss(router_logits, cfg.num_experts_per_tok, token_mask, form=cfg.balance_loss_form)
        if router_logits and lang_mask is not None:
            lpr_loss = losses.lpr_loss(router_logits, lang_mask, form=cfg.lpr_loss_form)
        cls_loss = None
        if classifier_logits:
            targets = group_labels(lang_group, attention_mask if attention_mask is not None and attention_mask.dim() == 2
                                   else None, cfg.classifier_groups, cfg.classifier_pooling)
            cls_loss = losses.classifier_loss(classifier_logits, [targets] * len(classifier_logits))

        weighted = [(lm_loss, 1.0), (lpr_loss, cfg.lpr_loss_coef), (cls_loss, cfg.cls_loss_coef)]
        if labels is not None:  # as in Mixtral, the balance loss joins the loss when training on labels
            weighted.append((aux_loss, cfg.aux_loss_coef))
        terms = [coef * term for term, coef in weighted if term is not None and coef]
        loss = sum(terms[1:], terms[0]) if terms else None
        return MoELPROutput(
            loss=loss, lm_loss=lm_loss, aux_loss=aux_loss, lpr_loss=lpr_loss, cls_loss=cls_loss, logits=logits,
            past_key_values=getattr(out, "past_key_values", None), hidden_states=getattr(out, "hidden_states", None),
            attentions=getattr(out, "attentions", None), router_logits=router_logits if output_router_logits else None,
        )

    def _reuse_prompt_decisions(self, past_key_values) -> list:
        """Sequence-pooled classifiers decide on the prompt; while decoding with a cache, reuse that decision."""
        classifiers = [b.classifier for b in moe_blocks(self) if b.classifier is not None
                       and b.classifier.pooling == "sequence"]
        stored = getattr(past_key_values, "moelpr_groups", None)
        if stored is not None and past_key_values.get_seq_length() > 0:
            for classifier, group in zip(classifiers, stored):
                classifier.forced = group
        return classifiers

    def _logits_from_hidden(self, hidden: torch.Tensor) -> torch.Tensor:
        logits = self.lm.get_output_embeddings()(hidden)
        cap = getattr(self.config.text_config, "final_logit_softcapping", None)
        return torch.tanh(logits / cap) * cap if cap else logits  # Gemma-2 soft-capping, as its LM head does


def _causal_lm_loss_from_logits(logits: torch.Tensor, labels: torch.Tensor,
                                num_items_in_batch: int | torch.Tensor | None) -> torch.Tensor:
    """Standard shifted CE over labels ≠ −100 (mean, or sum / num_items_in_batch)."""
    shift_logits = logits[:, :-1].reshape(-1, logits.shape[-1]).float()  # (B·(S−1), V)
    shift_labels = labels[:, 1:].reshape(-1).to(logits.device)
    if num_items_in_batch is None:
        return F.cross_entropy(shift_logits, shift_labels, ignore_index=-100)
    total = F.cross_entropy(shift_logits, shift_labels, ignore_index=-100, reduction="sum")
    return total / num_items_in_batch


def convert_from_config(lm: PreTrainedModel, config: MoELPRConfig) -> None:
    """Give a stock LM the MoE layers (and classifiers) that `config` describes."""
    convert_layers(lm, config.expert_groups, config.num_experts_per_tok, config.classifier_layers or (),
                   config.classifier_groups, config.classifier_pooling)


def register() -> None:
    """Make `AutoConfig` / `AutoModelForCausalLM` know `model_type: moelpr` (idempotent)."""
    try:
        AutoConfig.register("moelpr", MoELPRConfig)
    except ValueError:
        pass  # already registered
    try:
        AutoModelForCausalLM.register(MoELPRConfig, MoELPRForCausalLM)
    except ValueError:
        pass

