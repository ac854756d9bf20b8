"""`MoELPRForCausalLM`: an upcycled HF causal LM whose forward adds router logits and the MoE-LPR losses.

The model wraps the stock (upcycled) causal LM as `.lm`, so attention, caches, generation and the weight
layout stay the base family's; only `layer.mlp` is replaced (see `convert.py`). The embedded base config is
`text_config`, which makes transformers' generation utilities find it.

This module and its siblings are the model definition that ships with every checkpoint (`save_pretrained`
copies them beside config.json): they import only torch, transformers and each other.
"""

from __future__ import annotations

import contextlib
import dataclasses
import os
from dataclasses import dataclass
from typing import Callable, ClassVar, Iterator

import torch
import torch.nn.functional as F
from transformers import AutoModelForCausalLM, GenerationMixin, PreTrainedModel
from transformers.modeling_outputs import MoeCausalLMOutputWithPast

from .capture import capture_classifier_logits, capture_router_logits, moe_blocks
from .classifier import LanguageClassifier, group_labels
from .configuration_moelpr import MoELPRConfig
from .convert import convert_layers
from .errors import UserError
from .loramoe import add_loramoe
from .losses import causal_lm_loss, classifier_loss, load_balancing_loss, lpr_loss

CACHE_ARG = "cache" if "cache" in {f.name for f in dataclasses.fields(MoeCausalLMOutputWithPast)} else "past_key_values"
"""The KV cache's name in forward arguments and outputs: `cache` from transformers 5.24, `past_key_values` before."""
DELTA_META = "moelpr_delta.json"
"""Marks a delta checkpoint (only the new weights plus the dense base's path): read by `moelpr.load_model`."""


@dataclass
class MoELPROutput(MoeCausalLMOutputWithPast):
    """Causal-LM output with each loss term reported separately (`loss` is their weighted sum)."""

    lm_loss: torch.FloatTensor | None = None
    lpr_loss: torch.FloatTensor | None = None
    cls_loss: torch.FloatTensor | None = None


@dataclass
class PromptDecision:
    """The language groups the sequence-pooled classifiers chose on a prompt, reused while it is continued.

    Kept by the model itself (not on the cache, whose class transformers may copy or rebuild): a forward whose
    cache already holds `prompt_length ≤ past ≤ length` tokens of `batch` rows continues this prompt.
    """

    groups: list[torch.Tensor]  # one (B,) per sequence-pooled classifier, in layer order
    prompt_length: int
    length: int

    def continues(self, batch: int, past: int) -> bool:
        return self.groups[0].shape[0] == batch and self.prompt_length <= past <= self.length


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

    delta_loader: ClassVar[Callable | None] = None
    """Reads the delta format; `moelpr.checkpoint` sets it (a delta checkpoint needs moelpr to find its base)."""

    def __init__(self, config: MoELPRConfig, lm: PreTrainedModel | None = None):
        super().__init__(config)
        if lm is None:
            lm = AutoModelForCausalLM.from_config(config.text_config)
            convert_from_config(lm, config)
        self.lm = lm
        self.prompt_decision: PromptDecision | None = None
        self.post_init()

    @classmethod
    def from_pretrained(cls, pretrained_model_name_or_path, *args, **kwargs):
        """Like `PreTrainedModel.from_pretrained`; a delta checkpoint goes to `moelpr.load_model`."""
        path = os.fspath(pretrained_model_name_or_path)
        if os.path.isfile(os.path.join(path, DELTA_META)):
            if cls.delta_loader is None:
                raise UserError(
                    f"{path} is a moelpr delta checkpoint (the new weights plus the path of its dense "
                    "base): load it with `import moelpr; moelpr.load_model(DIR)` (pip install moelpr), "
                    "or write a full checkpoint with `moe-lpr export --format hf`"
                )
            return cls.delta_loader(path, dtype=kwargs.get("dtype"))
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
        cache=None,
        inputs_embeds: torch.FloatTensor | None = None,
        labels: torch.LongTensor | None = None,
        use_cache: bool | None = None,
        lang_mask: torch.Tensor | None = None,
        lang_group: torch.Tensor | None = None,
        output_router_logits: bool | None = None,
        num_items_in_batch: int | torch.Tensor | None = None,
        compute_logits: bool = True,
        logits_to_keep: int | torch.Tensor = 0,
        past_key_values=None,
        **kwargs,
    ) -> MoELPROutput:
        """The causal-LM forward plus the MoE-LPR inputs (docs/design.md, "Model").

        `cache` (transformers ≥ 5.24's name) and `past_key_values` (earlier 5.x) are the same KV cache.
        """
        cfg = self.config
        cache = cache if cache is not None else past_key_values
        rows = (input_ids if input_ids is not None else inputs_embeds).shape[:2]  # (B, S) of this call
        need_router = bool(output_router_logits) or labels is not None or lang_mask is not None
        lm_kwargs = {
            "attention_mask": attention_mask,
            "position_ids": position_ids,
            CACHE_ARG: cache,
            "inputs_embeds": inputs_embeds,
            "use_cache": use_cache,
            **kwargs,
        }
        chunked = labels is not None and not compute_logits
        classifiers = [
            b.classifier for b in moe_blocks(self) if b.classifier is not None and b.classifier.pooling == "sequence"
        ]
        past = cache.get_seq_length() if cache is not None and classifiers else 0
        continuing = past > 0 and self.prompt_decision is not None and self.prompt_decision.continues(rows[0], past)
        with (
            capture_router_logits(self, enabled=need_router) as router_logits,
            capture_classifier_logits(self, enabled=lang_group is not None) as classifier_logits,
            _forced_groups(classifiers, self.prompt_decision.groups if continuing else None),
        ):
            if chunked:
                out = self.lm.get_decoder()(input_ids=input_ids, **lm_kwargs)
            else:
                out = self.lm(input_ids=input_ids, logits_to_keep=logits_to_keep, **lm_kwargs)
        out_cache = getattr(out, CACHE_ARG, None)
        if continuing:
            self.prompt_decision.length = past + rows[1]
        elif classifiers and past == 0 and out_cache is not None:  # a prompt: its decision holds while it is continued
            self.prompt_decision = PromptDecision([c.decided for c in classifiers], rows[1], rows[1])

        logits, lm_loss = (None, None) if chunked else (out.logits, None)
        if labels is not None:
            if chunked:
                lm_loss = causal_lm_loss(
                    out.last_hidden_state,
                    labels,
                    self._logits_from_hidden,
                    num_items_in_batch=num_items_in_batch,
                    chunk_size=cfg.lm_loss_chunk_size,
                )
            else:
                lm_loss = _causal_lm_loss_from_logits(logits, labels, num_items_in_batch)

        router_logits = tuple(router_logits)
        aux = lpr = cls = None
        token_mask = attention_mask[:, -rows[1] :] if attention_mask is not None and attention_mask.dim() == 2 else None
        if router_logits and (labels is not None or output_router_logits):
            aux = load_balancing_loss(router_logits, cfg.num_experts_per_tok, token_mask, form=cfg.balance_loss_form)
        if router_logits and lang_mask is not None:
            lpr = lpr_loss(
                router_logits,
                lang_mask,
                form=cfg.lpr_loss_form,
                reduction=cfg.lpr_loss_reduction,
                num_tokens=_target_tokens(labels, num_items_in_batch, token_mask),
            )
        if classifier_logits:
            targets = group_labels(lang_group, token_mask, cfg.classifier_groups, cfg.classifier_pooling)
            cls = classifier_loss(classifier_logits, [targets] * len(classifier_logits))

        weighted = [(lm_loss, 1.0), (lpr, cfg.lpr_loss_coef), (cls, cfg.cls_loss_coef)]
        if labels is not None:  # as in Mixtral, the balance loss joins the loss when training on labels
            weighted.append((aux, cfg.aux_loss_coef))
        terms = [coef * term for term, coef in weighted if term is not None and coef]
        loss = sum(terms[1:], terms[0]) if terms else None
        return MoELPROutput(
            loss=loss,
            lm_loss=lm_loss,
            aux_loss=aux,
            lpr_loss=lpr,
            cls_loss=cls,
            logits=logits,
            hidden_states=getattr(out, "hidden_states", None),
            attentions=getattr(out, "attentions", None),
            router_logits=router_logits if output_router_logits else None,
            **{CACHE_ARG: out_cache},
        )

    def _logits_from_hidden(self, hidden: torch.Tensor) -> torch.Tensor:
        logits = self.lm.get_output_embeddings()(hidden)
        cap = getattr(self.config.text_config, "final_logit_softcapping", None)
        return torch.tanh(logits / cap) * cap if cap else logits  # Gemma-2 soft-capping, as its LM head does


@contextlib.contextmanager
def _forced_groups(classifiers: list[LanguageClassifier], groups: list[torch.Tensor] | None) -> Iterator[None]:
    """Sequence classifiers use `groups` (the prompt's decision) instead of deciding, for one forward."""
    pairs = list(zip(classifiers, groups)) if groups is not None else []
    for classifier, group in pairs:
        classifier.forced = group
    try:
        yield
    finally:
        for classifier, _ in pairs:
            classifier.forced = None


def _target_tokens(
    labels: torch.Tensor | None, num_items_in_batch: int | torch.Tensor | None, token_mask: torch.Tensor | None
) -> int | torch.Tensor | None:
    """What the LM loss is a mean over: the Trainer's global target count, else this batch's targets or tokens."""
    if num_items_in_batch is not None:
        return num_items_in_batch
    if labels is not None:
        return (labels[:, 1:] != -100).sum()
    return token_mask.sum() if token_mask is not None else None


def _causal_lm_loss_from_logits(
    logits: torch.Tensor, labels: torch.Tensor, num_items_in_batch: int | torch.Tensor | None
) -> torch.Tensor:
    """Standard shifted CE over labels ≠ −100 (mean, or sum / num_items_in_batch)."""
    shift_logits = logits[:, :-1].reshape(-1, logits.shape[-1]).float()  # (B·(S−1), V)
    shift_labels = labels[:, 1:].reshape(-1).to(logits.device)
    if num_items_in_batch is None:
        return F.cross_entropy(shift_logits, shift_labels, ignore_index=-100)
    total = F.cross_entropy(shift_logits, shift_labels, ignore_index=-100, reduction="sum")
    return total / num_items_in_batch


def convert_from_config(lm: PreTrainedModel, config: MoELPRConfig) -> None:
    """Give a stock LM the MoE layers (and classifiers), or the LoRAMoE linears, that `config` describes."""
    if config.loramoe is not None:
        spec = config.loramoe
        add_loramoe(lm, num_experts=int(spec["experts"]), rank=int(spec["rank"]), alpha=float(spec["alpha"]))
        return
    convert_layers(
        lm,
        config.expert_groups,
        config.num_experts_per_tok,
        config.classifier_layers or (),
        config.classifier_groups,
        config.classifier_pooling,
        expert_init=config.expert_init,
    )


MoELPRForCausalLM.register_for_auto_class("AutoModelForCausalLM")  # save_pretrained ships these modules
