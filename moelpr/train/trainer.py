"""`MoETrainer`: transformers' `Trainer` training on the model's own loss, with the MoE-LPR metrics logged.

The stock Trainer adds an MoE model's auxiliary loss once per micro-batch, so it grows ×GA and ×world_size
(docs/method.md). Here the model computes the loss itself (`moelpr.model.losses.step_loss`, the one place
where the terms are weighted): the trainer passes the whole optimizer step's target and old-language token
counts and how the step's batch is split (processes, micro-batches), so one step sees the same loss whether
its global batch is split into gradient-accumulation micro-batches or over processes.

Metrics accumulate on the device and cross to the host once per logging step (no host sync in the training
step otherwise): the loss terms (`lm_loss`, `aux_loss`, `lpr_loss`, `cls_loss`, the mean per step), the
LayerMoE classifiers' accuracy `cls_acc`, and the routing monitor (`moelpr.evaluate.routing`): per MoE layer and
language role (old = `lang_mask`, new = the other real tokens), expert 0's mean router probability, the share of
tokens whose output takes expert 0 and expert 0's mean weight in that output, logged as
`router/layer_{i}/{role}/{expert0_prob,expert0_in_topk,expert0_weight}`, plus `router_prob/expert_{e}` and
`router_prob0_old` (means over layers). `router_convergence()` gives the last window's per-layer values and names
the layers whose old tokens still take more than a threshold of their output from the new experts.
"""

from __future__ import annotations

import torch
from transformers import Trainer

from moelpr.evaluate.routing import routing_counts, split_counts, sum_dtype

ROLES = ("old", "new")
LOSS_TERMS = ("lm_loss", "aux_loss", "lpr_loss", "cls_loss")


class MoETrainer(Trainer):
    """Trainer for `MoELPRForCausalLM` (stages 1 and 2) and for dense baselines (plain LM loss)."""

    loss_is_scaled_for_ga = True  # the model's loss is already this micro-batch's share of the step

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self._sums: dict[str, torch.Tensor] = {}  # metric name -> running sum on the device
        self._steps = 0.0  # optimizer steps since the last log (Σ 1/GA over micro-batches)
        self._routing: torch.Tensor | None = None  # (roles, F) routing_counts since the last log
        self._experts: tuple[int, ...] = ()  # E_l per MoE layer
        self._last_routing: dict[str, dict] | None = None  # role -> per-layer means of the last logged window
        self._old_tokens_in_batch: torch.Tensor | None = None

    # -- batch-level counts -------------------------------------------------------------------------------
    def _get_num_items_in_batch(self, batch_samples, device):
        """Also count the old-language tokens of the whole optimizer step (the LPR mean's denominator)."""
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

        training = model.training
        ga = self.current_gradient_accumulation_steps if training else 1
        # Counts over all processes: a term normalised by one is ×processes to undo DDP's gradient averaging.
        processes = self.accelerator.num_processes if self.args.average_tokens_across_devices else 1
        # the model itself, also when `torch_compile: true` hands its compiled wrapper
        moe = isinstance(self.accelerator.unwrap_model(model, keep_torch_compile=False), MoELPRForCausalLM)
        if not moe:  # dense (or PEFT) baselines
            inputs = {k: v for k, v in inputs.items() if k not in ("lang_mask", "lang_group")}
            if num_items_in_batch is not None:
                inputs["num_items_in_batch"] = num_items_in_batch
            out = model(**inputs)
            loss = out.loss * processes if num_items_in_batch is not None else out.loss / ga
            if training:
                self._add("lm_loss", loss.detach(), ga)
            return (loss, out) if return_outputs else loss

        out = model(
            **inputs,
            num_items_in_batch=num_items_in_batch,
            num_old_items_in_batch=self._old_tokens_in_batch if training else None,
            loss_split=(processes, ga),
            output_router_logits=True,
            compute_logits=not training,
        )
        if training:
            for name, value in out.loss_terms.items():
                self._add(name, value.detach(), ga)
            self._add_routing(out.routing, inputs)
        return (out.loss, out) if return_outputs else out.loss

    # -- metrics (device side) ----------------------------------------------------------------------------------
    def _add(self, name: str, value: torch.Tensor, ga: int) -> None:
        self._sums[name] = self._sums[name] + value if name in self._sums else value.to(sum_dtype(value.device))
        if name == "lm_loss":
            self._steps += 1.0 / ga

    @torch.no_grad()
    def _add_routing(self, routing, inputs) -> None:
        """Routing sums per role of this micro-batch, and the classifiers' hits against the language groups."""
        if not routing:
            return
        real = inputs.get("attention_mask")
        old = inputs.get("lang_mask")
        old = torch.zeros_like(inputs["input_ids"], dtype=torch.bool) if old is None else old.bool()
        real = torch.ones_like(old) if real is None else real.bool()
        counts = routing_counts(routing, torch.stack([old & real, ~old & real]))  # (roles, F)
        self._routing = counts if self._routing is None else self._routing + counts
        self._experts = tuple(r.logits.shape[-1] for r in routing)
        classifier_logits = [r.classifier_logits for r in routing if r.classifier_logits is not None]
        if classifier_logits and inputs.get("lang_group") is not None:
            from moelpr.model.classifier import group_labels

            cfg = self.accelerator.unwrap_model(self.model).config
            mask = inputs.get("attention_mask")
            targets = group_labels(
                inputs["lang_group"],
                mask if mask is not None and mask.dim() == 2 else None,
                cfg.classifier_groups,
                cfg.classifier_pooling,
            )  # (B,) or (N,), −100 = padding
            valid = targets != -100
            for logits in classifier_logits:
                hits = (logits.argmax(dim=-1) == targets) & valid
                self._add("_cls_hits", hits.sum(), 1)
                self._add("_cls_n", valid.sum(), 1)

    def _flush(self) -> tuple[dict[str, float], dict[str, dict] | None]:
        """Every metric since the last log, summed over processes in one reduction and read back once.

        Returns the loss-term means per step and process (plus cls_acc), and the routing window per role
        (None when nothing was routed). Every process must call it at the same point (it all-reduces).
        """
        names = sorted(self._sums)
        parts = [self._sums[n].reshape(1) for n in names]
        device = self.args.device
        parts.append(torch.tensor([self._steps], dtype=torch.float64, device=device))
        has_routing = torch.tensor([0.0 if self._routing is None else 1.0], dtype=torch.float64, device=device)
        parts.append(has_routing)
        if self._routing is not None:
            parts.append(self._routing.reshape(-1))
        flat = torch.cat([p.to(device, torch.float64) for p in parts])
        if self.accelerator.num_processes > 1:
            flat = self.accelerator.reduce(flat, "sum")
        values = flat.cpu().tolist()  # the one host sync of the logging step
        self._sums, self._steps, self._routing = {}, 0.0, None
        sums = dict(zip(names, values[: len(names)]))
        steps = values[len(names)] or 1.0  # optimizer steps × processes (summed like the terms)
        logs = {name: round(sums[name] / steps, 6) for name in LOSS_TERMS if name in sums}
        if sums.get("_cls_n"):
            logs["cls_acc"] = round(sums["_cls_hits"] / sums["_cls_n"], 6)
        if not values[len(names) + 1]:
            return logs, None
        routing = values[len(names) + 2 :]
        width = len(routing) // len(ROLES)
        window = {}
        for r, role in enumerate(ROLES):
            layers = split_counts(routing[r * width : (r + 1) * width], self._experts)
            n = layers[0]["tokens"] if layers else 0
            if n:  # a role with no token in the window (e.g. no old text in stage 1) reports nothing
                window[role] = {
                    "tokens": int(n),
                    "expert0_prob": [row["prob"][0] / n for row in layers],
                    "expert0_in_topk": [row["expert0_in_topk"] / n for row in layers],
                    "expert0_weight": [row["expert0_weight"] / n for row in layers],
                    "_prob": [row["prob"] for row in layers],
                }
        return logs, window

    def router_convergence(self, threshold: float) -> dict | None:
        """Per MoE layer and role, expert 0's routing in the steps since the last log (else the last logged
        window), and the layers where old tokens take more than `threshold` of their output mix from other
        experts. Every process must call it (it all-reduces)."""
        _, window = self._flush()
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
        public = {role: {k: v for k, v in stats.items() if not k.startswith("_")} for role, stats in window.items()}
        return {"layers": layers, "threshold": threshold, "unconverged_layers": unconverged, **public}

    def _moe_layers(self) -> list[int]:
        return list(getattr(self.accelerator.unwrap_model(self.model).config, "moe_layers", []))

    def log(self, logs: dict[str, float], start_time: float | None = None) -> None:
        """Add the accumulated loss terms and routing statistics to a training log (reduced over processes)."""
        if "loss" in logs and (self._sums or self._routing is not None):
            terms, window = self._flush()
            logs.update(terms)
            if window:
                self._last_routing = window
                logs.update(_router_logs(window, self._moe_layers()))
        super().log(logs, start_time)


def _router_logs(window: dict[str, dict], layers: list[int]) -> dict[str, float]:
    """The routing window as log entries: per layer and role, and the means over layers."""
    logs: dict[str, float] = {}
    probs = [row for stats in window.values() for row in stats["_prob"]]  # per role and layer: (E_l,) sums
    for e in range(max(len(p) for p in probs)):
        total = sum(p[e] for p in probs if len(p) > e)
        count = sum(stats["tokens"] for stats in window.values() for p in stats["_prob"] if len(p) > e)
        logs[f"router_prob/expert_{e}"] = round(total / max(count, 1), 6)
    if "old" in window:
        old = window["old"]
        logs["router_prob0_old"] = round(sum(old["expert0_prob"]) / len(old["expert0_prob"]), 6)
    for role, stats in window.items():
        for stat in ("expert0_prob", "expert0_in_topk", "expert0_weight"):
            for layer, value in zip(layers, stats[stat]):
                logs[f"router/layer_{layer}/{role}/{stat}"] = round(value, 6)
    return logs
