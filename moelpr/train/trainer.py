"""`MoETrainer`: transformers' `Trainer` with the MoE-LPR loss terms scaled right, and their metrics logged.

The stock Trainer adds an MoE model's auxiliary loss once per micro-batch, so it grows ×GA and ×world_size
(ecosystem.md §3). Here every term is scaled so that one optimizer step sees the same loss whether its
global batch is split into gradient-accumulation micro-batches or over processes:

- LM: summed CE / `num_items_in_batch` (label tokens over all micro-batches and processes), ×world_size to
  undo DDP's gradient averaging;
- LPR, `lpr_loss_reduction: mean`: each micro-batch's mean over (layer, old token) pairs, weighted by its
  share of the old tokens of the whole global batch (same ×world_size), i.e. exactly the mean over the global
  batch (method.md §3.1); `sum`: a sum over the global batch's target count, so scaled exactly like the LM term;
- balance (and LayerMoE classifier): defined per forward pass, as in the official code, so ÷GA; DDP's
  averaging then gives the mean over processes.

With LayerMoE classifiers it also logs `cls_acc`, the share of classifier decisions (over classifier layers
and sequences, or tokens) that match the batch's language groups; forward hooks read the logits.

Router convergence (the instrument for stage 2): per MoE layer and language role (old = `lang_mask`, new = the
other real tokens), expert 0's mean router probability, the share of tokens with expert 0 in their top-k and
expert 0's mean weight in the output mix, logged as `router/layer_{i}/{role}/{expert0_prob,expert0_in_topk,
expert0_weight}`; `router_convergence()` gives the last window's values for train_metrics.json and names the
layers whose old tokens still take more than a threshold of their output from the new experts.
"""

from __future__ import annotations

from collections import defaultdict

import torch
from transformers import Trainer

from moelpr.evaluate.routing import RoutingSums, routing_sums

ROLES = ("old", "new")


class MoETrainer(Trainer):
    """Trainer for `MoELPRForCausalLM` (stages 1 and 2) and for dense baselines (plain LM loss)."""

    loss_is_scaled_for_ga = True  # compute_loss returns the already GA- and world-size-scaled loss

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self._metric_sums: dict[str, torch.Tensor] = defaultdict(lambda: torch.zeros((), dtype=torch.float64))
        self._old_tokens_in_batch: torch.Tensor | None = None
        self._classifier_logits: list[torch.Tensor] = []
        self._routing: dict[str, RoutingSums] = {}  # role -> sums since the last log
        self._last_routing: dict[str, dict] | None = None  # role -> summary of the last logged window
        from moelpr.model.classifier import LanguageClassifier

        for module in self.model.modules():
            if isinstance(module, LanguageClassifier):
                module.register_forward_hook(self._keep_classifier_logits)

    def _keep_classifier_logits(self, module, args, output) -> None:
        self._classifier_logits.append(output[1].detach())  # (B, G) or (N, G)

    # -- batch-level counts -------------------------------------------------------------------------------
    def _get_num_items_in_batch(self, batch_samples, device):
        """Also count the old-language tokens of the whole global batch (for the LPR weighting)."""
        num_items = super()._get_num_items_in_batch(batch_samples, device)
        old = None
        if batch_samples and "lang_mask" in batch_samples[0]:
            old = sum(b["lang_mask"].sum() for b in batch_samples).to(device)
            if self.args.average_tokens_across_devices and self.accelerator.num_processes > 1:
                old = self.accelerator.gather(old).sum()
        self._old_tokens_in_batch = old
        return num_items

    # -- loss -------------------------------------------------------------------------------------------------
    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        from moelpr.model import MoELPRForCausalLM

        unwrapped = self.accelerator.unwrap_model(model)
        training = model.training
        ga = self.current_gradient_accumulation_steps if training else 1
        # With a global token count, the LM term is a sum / global count: ×world_size undoes DDP's averaging.
        world = (
            self.accelerator.num_processes
            if (num_items_in_batch is not None and self.args.average_tokens_across_devices)
            else 1
        )

        if not isinstance(unwrapped, MoELPRForCausalLM):  # baselines: a dense (or PEFT-wrapped) causal LM
            inputs = {k: v for k, v in inputs.items() if k not in ("lang_mask", "lang_group")}
            if num_items_in_batch is not None:
                inputs["num_items_in_batch"] = num_items_in_batch
            out = model(**inputs)
            lm = out.loss * world if num_items_in_batch is not None else out.loss / ga
            if training:
                self._add_metric("lm_loss", lm.detach(), ga)
            return (lm, out) if return_outputs else lm

        cfg = unwrapped.config
        self._classifier_logits.clear()  # (a gradient-checkpointing recompute may have added some)
        out = model(
            **inputs, num_items_in_batch=num_items_in_batch, output_router_logits=True, compute_logits=not training
        )
        lm = out.lm_loss * world if num_items_in_batch is not None else out.lm_loss / ga
        loss = lm
        terms = {"lm_loss": lm}
        if out.aux_loss is not None and cfg.aux_loss_coef:
            terms["aux_loss"] = out.aux_loss / ga
            loss = loss + cfg.aux_loss_coef * terms["aux_loss"]
        if out.lpr_loss is not None and cfg.lpr_loss_coef:
            if cfg.lpr_loss_reduction == "sum":  # a sum / the LM's target count: scaled like the LM term
                terms["lpr_loss"] = out.lpr_loss * world if num_items_in_batch is not None else out.lpr_loss / ga
            else:
                terms["lpr_loss"] = self._lpr_share(out.lpr_loss, inputs["lang_mask"], ga, world, training)
            loss = loss + cfg.lpr_loss_coef * terms["lpr_loss"]
        if out.cls_loss is not None and cfg.cls_loss_coef:
            terms["cls_loss"] = out.cls_loss / ga
            loss = loss + cfg.cls_loss_coef * terms["cls_loss"]
        if training:
            for name, value in terms.items():
                self._add_metric(name, value.detach(), ga)
            self._add_router_metrics(out.router_logits, inputs.get("lang_mask"))
            self._add_routing_by_role(out.router_logits, inputs, cfg.num_experts_per_tok)
            self._add_classifier_metrics(cfg, inputs)
        return (loss, out) if return_outputs else loss

    def _lpr_share(
        self, lpr: torch.Tensor, lang_mask: torch.Tensor, ga: int, world: int, training: bool
    ) -> torch.Tensor:
        """This micro-batch's part of the global-batch LPR mean (its old tokens / all old tokens)."""
        total = self._old_tokens_in_batch if training else None
        if total is None:
            return lpr / ga
        mine = lang_mask.sum().to(lpr.dtype)
        return lpr * mine / total.clamp(min=1).to(lpr.dtype) * world

    # -- metrics ----------------------------------------------------------------------------------------------
    def _add_metric(self, name: str, value: torch.Tensor, ga: int) -> None:
        self._metric_sums[name] = self._metric_sums[name] + value.double().cpu()
        if name == "lm_loss":
            self._metric_sums["_steps"] = self._metric_sums["_steps"] + 1.0 / ga

    @torch.no_grad()
    def _add_router_metrics(self, router_logits, lang_mask) -> None:
        """Sums for the mean router probability per expert (over MoE layers) and of expert 0 on old tokens."""
        if not router_logits:
            return
        old = lang_mask.reshape(-1).bool() if lang_mask is not None else None  # (N,)
        sums = self._metric_sums
        for logits in router_logits:  # (N, E_l) per MoE layer
            probs = logits.float().softmax(-1).double()  # (N, E_l)
            for e in range(probs.shape[1]):
                sums[f"_p{e}_sum"] = sums[f"_p{e}_sum"] + probs[:, e].sum().cpu()
                sums[f"_p{e}_n"] = sums[f"_p{e}_n"] + probs.shape[0]
            if old is not None and old.any():
                sums["_p0old_sum"] = sums["_p0old_sum"] + probs[old.to(probs.device), 0].sum().cpu()
                sums["_p0old_n"] = sums["_p0old_n"] + old.sum().cpu().double()

    @torch.no_grad()
    def _add_routing_by_role(self, router_logits, inputs, top_k: int) -> None:
        """Per-layer routing sums of the old-language and the new-language tokens of this micro-batch."""
        if not router_logits:
            return
        real = inputs["attention_mask"].bool() if inputs.get("attention_mask") is not None else None
        old = inputs.get("lang_mask")
        old = torch.zeros_like(inputs["input_ids"], dtype=torch.bool) if old is None else old.bool()
        real = torch.ones_like(old) if real is None else real
        for role, mask in (("old", old & real), ("new", ~old & real)):
            sums = routing_sums(router_logits, mask, top_k)
            self._routing[role] = self._routing[role] + sums if role in self._routing else sums

    def _routing_window(self) -> dict[str, dict] | None:
        """The routing sums since the last log, summed over processes, as per-layer means per role.

        Every process must call it at the same point (it all-reduces)."""
        if not self._routing:
            return None
        roles = [r for r in ROLES if r in self._routing]
        parts = [
            torch.tensor(
                [
                    float(self._routing[r].tokens),
                    *map(float, self._routing[r].top_k_has_expert0),
                    *self._routing[r].expert0_weight_sum,
                ],
                dtype=torch.float64,
            )
            for r in roles
        ]
        parts += [torch.stack([p[0] for p in self._routing[r].prob_sum]) for r in roles]  # expert 0's prob sums
        flat = torch.cat(parts)
        if self.accelerator.num_processes > 1:
            flat = self.accelerator.reduce(flat.to(self.args.device), "sum").cpu()
        layers = len(self._routing[roles[0]].prob_sum)
        self._routing = {}
        counts = flat[: len(roles) * (1 + 2 * layers)].view(len(roles), 1 + 2 * layers)  # (roles, 1 + 2L)
        probs = flat[len(roles) * (1 + 2 * layers) :].view(len(roles), layers)  # (roles, L)
        out = {}
        for r, row, prob in zip(roles, counts, probs):
            n = row[0].item()
            if n:  # a role with no token in the window (e.g. no old text in stage 1) reports nothing
                out[r] = {
                    "tokens": int(n),
                    "expert0_prob": (prob / n).tolist(),
                    "expert0_in_topk": (row[1 : 1 + layers] / n).tolist(),
                    "expert0_weight": (row[1 + layers :] / n).tolist(),
                }
        return out

    def router_convergence(self, threshold: float) -> dict | None:
        """Per MoE layer and role, expert 0's routing in the steps since the last log (else the last logged
        window), and the layers where old tokens take more than `threshold` of their output mix from other
        experts. Every process must call it (it all-reduces)."""
        window = self._routing_window()
        window = window if window else self._last_routing
        if not window:
            return None
        self._last_routing = window
        layers = self._moe_layers()
        unconverged = (
            [layer for layer, w in zip(layers, window["old"]["expert0_weight"]) if 1.0 - w > threshold]
            if "old" in window
            else []
        )
        return {"layers": layers, "threshold": threshold, "unconverged_layers": unconverged, **window}

    def _moe_layers(self) -> list[int]:
        return list(getattr(self.accelerator.unwrap_model(self.model).config, "moe_layers", []))

    @torch.no_grad()
    def _add_classifier_metrics(self, cfg, inputs) -> None:
        """Sums for the classifier accuracy against the batch's language groups."""
        if not self._classifier_logits or inputs.get("lang_group") is None:
            return
        from moelpr.model.classifier import group_labels

        mask = inputs.get("attention_mask")
        targets = group_labels(
            inputs["lang_group"],
            mask if mask is not None and mask.dim() == 2 else None,
            cfg.classifier_groups,
            cfg.classifier_pooling,
        )  # (B,) or (N,), −100 = padding
        valid = targets != -100
        for logits in self._classifier_logits:
            hits = (logits.argmax(dim=-1) == targets.to(logits.device)) & valid.to(logits.device)
            self._metric_sums["_cls_hits"] = self._metric_sums["_cls_hits"] + hits.sum().cpu().double()
            self._metric_sums["_cls_n"] = self._metric_sums["_cls_n"] + valid.sum().cpu().double()
        self._classifier_logits.clear()

    def log(self, logs: dict[str, float], start_time: float | None = None) -> None:
        """Add the accumulated loss terms and router statistics to a training log (reduced over processes)."""
        if "loss" in logs and self._metric_sums:
            names = sorted(self._metric_sums)
            local = torch.stack([self._metric_sums[n] for n in names]).to(self.args.device)
            total = self.accelerator.reduce(local, "sum") if self.accelerator.num_processes > 1 else local
            values = dict(zip(names, total.tolist()))
            steps = values.pop("_steps", 0.0) or 1.0  # optimizer steps × processes (summed like the terms)
            for name in ("lm_loss", "aux_loss", "lpr_loss", "cls_loss"):
                if name in values:  # summed over micro-batches and processes: the mean per step and process
                    logs[name] = round(values[name] / steps, 6)
            experts = sorted(
                int(n[2:-4]) for n in values if n.startswith("_p") and n.endswith("_sum") and n[2:-4].isdigit()
            )
            for e in experts:
                logs[f"router_prob/expert_{e}"] = round(values[f"_p{e}_sum"] / max(values[f"_p{e}_n"], 1.0), 6)
            if values.get("_cls_n"):
                logs["cls_acc"] = round(values["_cls_hits"] / values["_cls_n"], 6)
            if values.get("_p0old_n"):
                logs["router_prob0_old"] = round(values["_p0old_sum"] / values["_p0old_n"], 6)
            self._metric_sums.clear()
            window = self._routing_window()
            if window:
                self._last_routing = window
                layers = self._moe_layers()
                for role, stats in window.items():
                    for stat in ("expert0_prob", "expert0_in_topk", "expert0_weight"):
                        for layer, value in zip(layers, stats[stat]):
                            logs[f"router/layer_{layer}/{role}/{stat}"] = round(value, 6)
        super().log(logs, start_time)
