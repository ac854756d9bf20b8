"""Watching a long run: a summary before step 1, one compact console line per log, every log as JSON, and the
router-convergence warning while the run can still act on it.

- `RunSummary` prints, before step 1: tokens and blocks per language and role, optimizer steps, tokens per step,
  the effective batch and the trainable parameters.
- `CompactProgress` / `CompactPrinter` replace the Trainer's progress printer (which prints every logged value,
  7–9 KB a line with the per-layer router metrics of a 24–32 layer model) by one line: step, loss and its terms,
  learning rate, tokens/s, and expert 0's weight for old-language tokens with the count of layers below the
  convergence threshold.
- `JsonLog` appends every log (all per-layer router metrics included) to `train_log.jsonl` in the checkpoint
  directory; `report_to` backends (TensorBoard, Weights & Biases with `pip install 'moelpr[wandb]'`) receive the
  same values.
- `ConvergenceWatch` warns, in stage 2, at every evaluation (and from half-way through the run at a training log
  whose set of unconverged layers changed) about MoE layers whose old-language tokens still take more than the
  threshold of their output from new experts.
"""

from __future__ import annotations

import json
import logging
import re
from collections import defaultdict
from pathlib import Path
from typing import Any

from transformers import TrainerCallback
from transformers.trainer_callback import ProgressCallback

logger = logging.getLogger("moelpr.train")

_OLD_WEIGHT = re.compile(r"^(eval_)?router/layer_(\d+)/old/expert0_weight$")


def unconverged_layers(logs: dict[str, Any], threshold: float, prefix: str = "") -> tuple[list[int], float] | None:
    """The MoE layers whose old-language tokens take more than `threshold` of their output from new experts, and
    expert 0's mean weight over layers, from one log's router metrics (None when the log has none)."""
    weights = {}
    for key, value in logs.items():
        found = _OLD_WEIGHT.match(key)
        if found and (found.group(1) or "") == prefix:
            weights[int(found.group(2))] = value
    if not weights:
        return None
    return sorted(layer for layer, w in weights.items() if 1.0 - w > threshold), sum(weights.values()) / len(weights)


def compact_line(logs: dict[str, Any], state, threshold: float) -> str:
    """One console line for a log: training step or evaluation."""
    if any(k.startswith("eval_") for k in logs):
        parts = [f"eval @ step {state.global_step}"]
        for role in ("old", "new"):
            if f"eval_{role}_bpb" in logs:
                parts.append(f"{role} bpb {logs[f'eval_{role}_bpb']:.4f} (loss {logs[f'eval_{role}_loss']:.4f})")
        if "eval_loss" in logs and len(parts) == 1:
            parts.append(f"loss {logs['eval_loss']:.4f}")
        routing = unconverged_layers(logs, threshold, prefix="eval_")
    elif "train_runtime" in logs:  # the Trainer's end-of-training summary
        loss = f", mean loss {logs['train_loss']:.4f}" if "train_loss" in logs else ""
        return f"trained {state.global_step} steps in {logs['train_runtime']:.0f} s{loss}"
    else:
        parts = [f"step {state.global_step}/{state.max_steps}"]
        if "loss" in logs:
            terms = " ".join(
                f"{k[:-5]} {logs[k]:.4f}" for k in ("lm_loss", "aux_loss", "lpr_loss", "cls_loss") if k in logs
            )
            parts.append(f"loss {logs['loss']:.4f}" + (f" ({terms})" if terms else ""))
        if "learning_rate" in logs:
            parts.append(f"lr {logs['learning_rate']:.2e}")
        if "tokens_per_s" in logs:
            parts.append(f"{logs['tokens_per_s']:,} tok/s")
        if "cls_acc" in logs:
            parts.append(f"cls acc {logs['cls_acc']:.3f}")
        routing = unconverged_layers(logs, threshold)
    if routing is not None:
        layers, mean = routing
        parts.append(f"old→expert 0 {mean:.3f} ({len(layers)} layer(s) below {1 - threshold:.2f})")
    return " | ".join(parts)


class CompactProgress(ProgressCallback):
    """The Trainer's progress bar, with one compact line per log instead of every logged value."""

    def __init__(self, threshold: float):
        super().__init__()
        self.threshold = threshold

    def on_log(self, args, state, control, logs=None, **kwargs):
        if state.is_world_process_zero and self.training_bar is not None and logs:
            self.training_bar.write(compact_line(logs, state, self.threshold))


class CompactPrinter(TrainerCallback):
    """`disable_tqdm: true`: one compact line per log on stdout."""

    def __init__(self, threshold: float):
        self.threshold = threshold

    def on_log(self, args, state, control, logs=None, **kwargs):
        if state.is_world_process_zero and logs:
            print(compact_line(logs, state, self.threshold), flush=True)


class JsonLog(TrainerCallback):
    """Appends every log, with its step, as one JSON line to `<output_dir>/train_log.jsonl` (main process)."""

    def on_log(self, args, state, control, logs=None, **kwargs):
        if state.is_world_process_zero and logs:
            path = Path(args.output_dir) / "train_log.jsonl"
            path.parent.mkdir(parents=True, exist_ok=True)
            with path.open("a", encoding="utf-8") as f:
                f.write(json.dumps({"step": state.global_step, **logs}) + "\n")


class ConvergenceWatch(TrainerCallback):
    """Stage 2: the router-convergence warning at every evaluation, and at training logs from half-way on."""

    def __init__(self, threshold: float):
        self.threshold = threshold
        self._warned: list[int] | None = None

    def on_log(self, args, state, control, logs=None, **kwargs):
        if not state.is_world_process_zero or not logs:
            return
        evaluation = any(k.startswith("eval_router/") for k in logs)
        routing = unconverged_layers(logs, self.threshold, prefix="eval_" if evaluation else "")
        if routing is None or not routing[0]:
            return
        late = state.max_steps and state.global_step >= state.max_steps / 2
        if evaluation or (late and routing[0] != self._warned):
            self._warned = routing[0]
            where = "validation" if evaluation else "training"
            logger.warning(
                f"router convergence at step {state.global_step} ({where} tokens): old-language tokens take more "
                f"than {self.threshold:.0%} of their output from new experts in MoE layer(s) "
                f"{', '.join(map(str, routing[0]))}; more review steps, a larger lpr_loss_coef or "
                "lpr_loss_reduction: sum push them back"
            )


class RunSummary(TrainerCallback):
    """Before step 1 (main process): what this run will train on and how."""

    def __init__(self, dataset: Any, cutoff_len: int, parameters: str):
        self.dataset, self.cutoff_len, self.parameters = dataset, cutoff_len, parameters

    def on_train_begin(self, args, state, control, **kwargs):
        if not state.is_world_process_zero:
            return
        batch = args.per_device_train_batch_size * args.gradient_accumulation_steps * args.world_size
        lines = ["training run:", f"  {self.parameters}"]
        lines += [f"  {line}" for line in data_lines(self.dataset, self.cutoff_len)]
        lines.append(
            f"  optimizer steps {state.max_steps:,} | effective batch {batch} blocks "
            f"({args.per_device_train_batch_size} per device × {args.gradient_accumulation_steps} accumulation × "
            f"{args.world_size} processes) | {batch * self.cutoff_len:,} tokens per step"
        )
        print("\n".join(lines), flush=True)


def data_lines(dataset: Any, cutoff_len: int) -> list[str]:
    """Blocks and tokens per language and role of one epoch of `dataset` (a prepared dataset), else its kind."""
    entries = getattr(dataset, "entries", None)
    blocks = getattr(dataset, "corpus_blocks", None)
    if entries is None or blocks is None:
        return [f"data: {type(dataset).__name__} (streamed: its size is not known ahead)"]
    by_lang: dict[tuple[str, str], int] = defaultdict(int)
    for entry in entries:
        by_lang[(entry["role"], entry["language"])] += blocks[entry["name"]]
    total = sum(by_lang.values())
    lines = [f"data: {total:,} blocks of {cutoff_len} tokens = {total * cutoff_len:,} tokens per epoch"]
    for role in ("old", "new"):
        langs = [(lang, n) for (r, lang), n in sorted(by_lang.items()) if r == role]
        if langs:
            tokens = sum(n for _, n in langs) * cutoff_len
            detail = ", ".join(f"{lang} {n * cutoff_len:,}" for lang, n in langs)
            lines.append(f"  {role}: {tokens:,} tokens ({100 * tokens / (total * cutoff_len):.1f} %): {detail}")
    return lines
