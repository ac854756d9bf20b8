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
from typing import Iterator

import torch
import torch.nn.functional as F
from transformers import AutoModelForCausalLM, GenerationMixin, PreTrainedModel
from transformers.modeling_outputs import MoeCausalLMOutputWithPast

from .capture import capture_routing, moe_blocks
from .classifier import LanguageClassifier, group_labels
from .configuration_moelpr import MoELPRConfig
from .convert import convert_layers
from .errors import UserError
from .layer import Routing
from .loramoe import add_loramoe
from .losses import causal_lm_loss, classifier_loss, load_balancing_loss, lpr_loss, step_loss
from .options import check_choice

CACHE_ARG = "cache" if "cache" in {f.name for f in dataclasses.fields(MoeCausalLMOutputWithPast)} else "past_key_values"
"""The KV cache's name in forward arguments and outputs: `cache` from transformers 5.24, `past_key_values` before."""
DELTA_META = "moelpr_delta.json"
"""Marks a delta checkpoint (only the new weights plus the dense base's path): read by `moelpr.load_model`."""


@dataclass
class MoELPROutput(MoeCausalLMOutputWithPast):
    """Causal-LM output with each loss term reported separately (`loss` is their weighted sum, `losses.step_loss`).

    `routing` (with `output_router_logits=True`): one `Routing` per MoE layer, the experts and weights applied;
    `loss_terms`: the terms as they entered `loss` (scaled to the optimizer step's split, before coefficients).
    """

    lm_loss: torch.FloatTensor | None = None
    lpr_loss: torch.FloatTensor | None = None
    cls_loss: torch.FloatTensor | None = None
    routing: tuple[Routing, ...] | None = None
    loss_terms: dict[str, torch.Tensor] | None = None


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
            try:  # a delta checkpoint needs moelpr itself, which knows how to find and check its base
                from moelpr.checkpoint import load_model
            except ImportError:
                raise UserError(
                    f"{path} is a moelpr delta checkpoint (the new weights plus the path of its dense "
                    "base): load it with `import moelpr; moelpr.load_model(DIR)` (pip install moelpr), "
                    "or write a full checkpoint with `moe-lpr export --format hf`"
                ) from None
            return load_model(path, dtype=kwargs.get("dtype"))
        return super().from_pretrained(pretrained_model_name_or_path, *args, **kwargs)

    def set_moe_dispatch(self, path: str) -> None:
        """How every MoE block runs its experts ("auto" or a named path of `dispatch.py`); kept in the config."""
        check_choice("moe_dispatch", path)
        self.config.moe_dispatch = path
        for block in moe_blocks(self):
            block.dispatch = path

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
        num_old_items_in_batch: int | torch.Tensor | None = None,
        loss_split: tuple[int, int] = (1, 1),
        compute_logits: bool = True,
        logits_to_keep: int | torch.Tensor = 0,
        past_key_values=None,
        **kwargs,
    ) -> MoELPROutput:
        """The causal-LM forward plus the MoE-LPR inputs (docs/design.md, "Model").

        `cache` (transformers ≥ 5.24's name) and `past_key_values` (earlier 5.x) are the same KV cache.
        `num_items_in_batch` / `num_old_items_in_batch`: the target / old-language tokens of the whole optimizer
        step, when the caller (the Trainer) counts them; `loss_split`: (processes, micro-batches) the step's batch is
        split over, so `loss` is this forward's share of the step's loss (`losses.step_loss`).
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
            capture_routing(self, enabled=need_router) as routing,
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

        routing = tuple(routing)
        aux = lpr = cls = None
        token_mask = attention_mask[:, -rows[1] :] if attention_mask is not None and attention_mask.dim() == 2 else None
        if routing and (labels is not None or output_router_logits):
            aux = load_balancing_loss(routing, token_mask, form=cfg.balance_loss_form)
        lpr_count = num_items_in_batch if cfg.lpr_loss_reduction == "sum" else num_old_items_in_batch
        if routing and lang_mask is not None:
            lpr = lpr_loss(
                [r.logits for r in routing],
                lang_mask,
                form=cfg.lpr_loss_form,
                reduction=cfg.lpr_loss_reduction,
                num_tokens=lpr_count if lpr_count is not None else _lpr_tokens(cfg, labels, token_mask),
            )
        classifier_logits = [r.classifier_logits for r in routing if r.classifier_logits is not None]
        if classifier_logits and lang_group is not None:
            targets = group_labels(lang_group, token_mask, cfg.classifier_groups, cfg.classifier_pooling)
            cls = classifier_loss(classifier_logits, [targets] * len(classifier_logits))

        # As in Mixtral, the balance loss joins the loss when training on labels.
        terms = {"lm_loss": lm_loss, "aux_loss": aux if labels is not None else None, "lpr_loss": lpr, "cls_loss": cls}
        counted = {"lm_loss": num_items_in_batch, "lpr_loss": lpr_count}  # normalised by a count over the whole step
        loss, loss_terms = step_loss(
            terms, cfg, global_terms=frozenset(k for k, n in counted.items() if n is not None), split=loss_split
        )
        return MoELPROutput(
            loss=loss,
            lm_loss=lm_loss,
            aux_loss=aux,
            lpr_loss=lpr,
            cls_loss=cls,
            logits=logits,
            hidden_states=getattr(out, "hidden_states", None),
            attentions=getattr(out, "attentions", None),
            router_logits=tuple(r.logits for r in routing) if output_router_logits else None,
            routing=routing if output_router_logits else None,
            loss_terms=loss_terms,
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


def _lpr_tokens(cfg: MoELPRConfig, labels: torch.Tensor | None, token_mask: torch.Tensor | None) -> torch.Tensor | None:
    """The batch's own LPR count: its old tokens (mean reduction, None = from lang_mask), else what the LM loss is a
    mean over (its targets, or its real tokens without labels)."""
    if cfg.lpr_loss_reduction == "mean":
        return None
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
        dispatch=config.moe_dispatch,
    )


MoELPRForCausalLM.register_for_auto_class("AutoModelForCausalLM")  # save_pretrained ships these modules
