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

import math
import time
from dataclasses import dataclass
from typing import Any

import torch
from transformers import Trainer, TrainerCallback

from moelpr.evaluate.routing import routing_counts, split_counts, sum_dtype

ROLES = ("old", "new")
LOSS_TERMS = ("lm_loss", "aux_loss", "lpr_loss", "cls_loss")


@dataclass
class ValidationLanguage:
    """One language's validation blocks, its role and its text's UTF-8 bytes per token (for bits per byte)."""

    dataset: Any
    role: str
    bytes_per_token: float


class MoETrainer(Trainer):
    """Trainer for `MoELPRForCausalLM` (stages 1 and 2) and for dense baselines (plain LM loss)."""

    loss_is_scaled_for_ga = True  # the model's loss is already this micro-batch's share of the step

    def __init__(
        self,
        *args,
        validation: dict[str, ValidationLanguage] | None = None,
        tokens_per_step: int | None = None,
        **kwargs,
    ):
        """`validation`: language → its validation set, evaluated per language and role at every evaluation
        (`eval_strategy`); `tokens_per_step`: tokens of one optimizer step over all processes (for `tokens_per_s`)."""
        if validation:
            kwargs.setdefault("eval_dataset", {lang: part.dataset for lang, part in validation.items()})
        super().__init__(*args, **kwargs)
        self.validation = validation or {}
        self.tokens_per_step = tokens_per_step
        self._log_clock: tuple[float, int] | None = None  # (time, global step) of the last log
        self._eval_routing: torch.Tensor | None = None  # routing_counts of the validation tokens being evaluated
        self.add_callback(_StartClock(self))
        self._sums: dict[str, torch.Tensor] = {}  # metric name -> running sum on the device
        self._steps = 0.0  # optimizer steps since the last log (Σ 1/GA over micro-batches)
        self._routing: torch.Tensor | None = None  # (roles, F) routing_counts since the last log
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
        elif self.validation and out.routing:
            counts = routing_counts(out.routing, _role_masks(inputs))
            self._eval_routing = counts if self._eval_routing is None else self._eval_routing + counts
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
        counts = routing_counts(routing, _role_masks(inputs))  # (roles, F)
        self._routing = counts if self._routing is None else self._routing + counts
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

    def _experts_per_layer(self) -> tuple[int, ...]:
        """E_l per MoE layer of the model (empty for a dense baseline)."""
        cfg = self.accelerator.unwrap_model(self.model).config
        return tuple(cfg.experts_per_layer[i] for i in getattr(cfg, "moe_layers", []))

    def _reduce(self, parts: list[torch.Tensor | None], sizes: list[int]) -> list[list[float]]:
        """Sum each part over processes in one reduction and read them back at once (a missing part counts 0).

        Every process must call it at the same point with the same `sizes`."""
        device = self.args.device
        flat = torch.cat(
            [
                torch.zeros(n, dtype=torch.float64, device=device)
                if p is None
                else p.reshape(-1).to(device, torch.float64)
                for p, n in zip(parts, sizes)
            ]
        )
        if self.accelerator.num_processes > 1:
            flat = self.accelerator.reduce(flat, "sum")
        values = flat.cpu().tolist()  # the one host sync
        out, start = [], 0
        for n in sizes:
            out.append(values[start : start + n])
            start += n
        return out

    def _window(self, counts: list[float]) -> dict[str, dict] | None:
        """Summed routing counts of both roles → per role, per MoE layer means (None when nothing was routed)."""
        experts = self._experts_per_layer()
        width = len(counts) // len(ROLES)
        window = {}
        for r, role in enumerate(ROLES):
            layers = split_counts(counts[r * width : (r + 1) * width], experts)
            n = layers[0]["tokens"] if layers else 0
            if n:  # a role with no token in the window (e.g. no old text in stage 1) reports nothing
                window[role] = {
                    "tokens": int(n),
                    "expert0_prob": [row["prob"][0] / n for row in layers],
                    "expert0_in_topk": [row["expert0_in_topk"] / n for row in layers],
                    "expert0_weight": [row["expert0_weight"] / n for row in layers],
                    "_prob": [row["prob"] for row in layers],
                }
        return window or None

    def _flush(self) -> tuple[dict[str, float], dict[str, dict] | None]:
        """Every training metric since the last log, summed over processes, read back once, then reset.

        Returns the loss-term means per step and process (plus cls_acc), and the routing window per role.
        Every process must call it at the same point (it all-reduces)."""
        names = sorted(self._sums)
        width = len(ROLES) * sum(3 + e for e in self._experts_per_layer())
        steps = torch.tensor([self._steps], dtype=torch.float64)
        sums, (steps,), routing = self._reduce(
            [torch.stack([self._sums[n].double() for n in names]) if names else None, steps, self._routing],
            [len(names), 1, width],
        )
        self._sums, self._steps, self._routing = {}, 0.0, None
        sums = dict(zip(names, sums))
        steps = steps or 1.0  # optimizer steps × processes (summed like the terms)
        logs = {name: round(sums[name] / steps, 6) for name in LOSS_TERMS if name in sums}
        if sums.get("_cls_n"):
            logs["cls_acc"] = round(sums["_cls_hits"] / sums["_cls_n"], 6)
        return logs, self._window(routing) if width else None

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
        """Add the accumulated loss terms, routing statistics and throughput to a training log."""
        if "loss" in logs:
            terms, window = self._flush()
            logs.update(terms)
            if window:
                self._last_routing = window
                logs.update(_router_logs(window, self._moe_layers()))
            now, step = time.perf_counter(), self.state.global_step
            if self.tokens_per_step and self._log_clock is not None and step > self._log_clock[1]:
                logs["tokens_per_s"] = round(
                    (step - self._log_clock[1]) * self.tokens_per_step / (now - self._log_clock[0])
                )
            self._log_clock = (now, step)
        super().log(logs, start_time)

    # -- validation -----------------------------------------------------------------------------------------
    def evaluate(self, eval_dataset=None, ignore_keys=None, metric_key_prefix: str = "eval") -> dict[str, float]:
        """With `validation`: loss and bits per byte per language and per role (the mean over its languages),
        `eval_loss` (the mean over languages) and the routing monitor on the validation tokens, logged once.

        Metric names (usable as `metric_for_best_model`): `eval_{lang}_loss`, `eval_{lang}_bpb`, `eval_{role}_loss`,
        `eval_{role}_bpb`, `eval_loss`, `eval_router/layer_{i}/{role}/expert0_weight`, ..."""
        if eval_dataset is not None or not self.validation:
            return super().evaluate(eval_dataset, ignore_keys, metric_key_prefix)
        self._memory_tracker.start()
        start = time.time()
        metrics: dict[str, float] = {}
        self._eval_routing = None
        for lang, part in self.validation.items():
            output = self.evaluation_loop(
                self.get_eval_dataloader(part.dataset),
                description=f"Validation {lang}",
                prediction_loss_only=True,
                metric_key_prefix=f"{metric_key_prefix}_{lang}",
            )
            loss = output.metrics[f"{metric_key_prefix}_{lang}_loss"]
            metrics[f"{metric_key_prefix}_{lang}_loss"] = loss
            metrics[f"{metric_key_prefix}_{lang}_bpb"] = loss / (math.log(2) * part.bytes_per_token)
        for role in ROLES:
            langs = [lang for lang, part in self.validation.items() if part.role == role]
            for stat in ("loss", "bpb"):
                if langs:
                    values = [metrics[f"{metric_key_prefix}_{lang}_{stat}"] for lang in langs]
                    metrics[f"{metric_key_prefix}_{role}_{stat}"] = sum(values) / len(values)
        losses = [metrics[f"{metric_key_prefix}_{lang}_loss"] for lang in self.validation]
        metrics[f"{metric_key_prefix}_loss"] = sum(losses) / len(losses)
        width = len(ROLES) * sum(3 + e for e in self._experts_per_layer())
        if width:
            (counts,) = self._reduce([self._eval_routing], [width])
            window = self._window(counts)
            for key, value in (_router_logs(window, self._moe_layers()) if window else {}).items():
                metrics[f"{metric_key_prefix}_{key}"] = value
        self._eval_routing = None
        metrics[f"{metric_key_prefix}_runtime"] = round(time.time() - start, 4)
        metrics = {k: round(v, 6) if isinstance(v, float) else v for k, v in metrics.items()}
        self.log(metrics)
        self.control = self.callback_handler.on_evaluate(self.args, self.state, self.control, metrics)
        self._memory_tracker.stop_and_update_metrics(metrics)
        return metrics


class _StartClock(TrainerCallback):
    """Starts the throughput clock when the training loop starts (after the data and model are set up)."""

    def __init__(self, trainer: MoETrainer):
        self.trainer = trainer

    def on_train_begin(self, args, state, control, **kwargs):
        self.trainer._log_clock = (time.perf_counter(), state.global_step)


def _role_masks(inputs: dict[str, torch.Tensor]) -> torch.Tensor:
    """`(roles, B, S)` bool: the real tokens of each language role (old = `lang_mask`)."""
    real = inputs.get("attention_mask")
    old = inputs.get("lang_mask")
    old = torch.zeros_like(inputs["input_ids"], dtype=torch.bool) if old is None else old.bool()
    real = torch.ones_like(old) if real is None else real.bool()
    return torch.stack([old & real, ~old & real])


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
