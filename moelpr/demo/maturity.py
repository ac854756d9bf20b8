"""A base trained to maturity (`--sizes mature`): pretraining until the validation bits per byte plateau.

Reading (c) of docs/demo.md asks whether claims 4 and 6 fail because of the method or because the base is
immature. With `DemoSizes.base_plateau` set, the base trains in two runs:

1. `base_stable`: a constant learning rate (after warm-up) for at most `base_steps` steps, evaluated on the
   validation pages every `base_eval_every` steps (`PlateauStop`). It stops at the first evaluation where the last
   fifth of the steps so far improved the score by less than `base_plateau` (relative), the score being the mean
   of the old-language and the new-language mean bits per byte (claim 6's "together" score);
2. `base`: `base_decay_fraction` × those steps more, the learning rate decaying linearly to zero (the cool-down
   of a warmup-stable-decay schedule), from the stable run's weights.

The stable phase saves a checkpoint at every evaluation and its curve so far (`eval/base_plateau.partial.json`):
a killed run continues from there when the same command is run again. The curve and the stopping reason are
written to `eval/base_plateau.json`; with the base's tokens per parameter
and epochs they are reported in results.json → `pretrain.maturity`.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any, Callable

from transformers import TrainerCallback

PLATEAU_FILE = "base_plateau.json"


def plateau_reached(curve: list[dict[str, float]], threshold: float) -> bool:
    """Whether the last fifth of the steps so far improved the score by less than `threshold` (relative).

    The reference is the last evaluation at or before 4/5 of the latest step; there must be one after step 0.
    """
    if len(curve) < 2:
        return False
    last = curve[-1]
    earlier = [p for p in curve[:-1] if 0 < p["step"] <= 0.8 * last["step"]]
    if not earlier:
        return False
    ref = earlier[-1]["score"]
    return (ref - last["score"]) / ref < threshold


class PlateauStop(TrainerCallback):
    """Evaluates the model on the validation pages every `every` steps and stops the training at a plateau.

    Args:
        evaluate: model → results of `moelpr.evaluate.perplexity.evaluate_corpora` (with `avg`).
        every: steps between evaluations.
        threshold: the relative improvement over the last fifth below which the training stops.
        curve: evaluations already made (step 0, the initialisation), extended in place.
        on_point: called with each new point (the demo prints it).
    """

    def __init__(
        self,
        evaluate: Callable[[Any], dict],
        every: int,
        threshold: float,
        curve: list[dict[str, float]],
        on_point: Callable[[dict[str, float]], None] = lambda point: None,
    ) -> None:
        self.evaluate, self.every, self.threshold, self.curve, self.on_point = (
            evaluate,
            every,
            threshold,
            curve,
            on_point,
        )
        self.stopped_at_plateau = False

    def on_step_end(self, args, state, control, model=None, **kwargs):
        if state.global_step % self.every != 0 and state.global_step != state.max_steps:
            return control
        was_training = model.training
        model.eval()
        self.curve.append(curve_point(state.global_step, self.evaluate(model)))
        self.on_point(self.curve[-1])
        model.train(was_training)
        if plateau_reached(self.curve, self.threshold):
            self.stopped_at_plateau = True
            control.should_training_stop = True
        return control


def curve_point(step: int, results: dict[str, Any]) -> dict[str, float]:
    """One point of the validation curve: the step, old and new mean bits per byte and their mean (the score)."""
    old, new = results["avg"]["old"]["bpb"], results["avg"]["new"]["bpb"]
    return {"step": step, "old_bpb": old, "new_bpb": new, "score": (old + new) / 2}


def train_mature_base(
    out: Path,
    runs: dict[str, dict[str, Any]],
    sizes: Any,
    validation_yaml: Path,
    train: Callable[..., Path],
    precision: str,
    log: Callable[[str], None],
) -> dict[str, Any]:
    """Train `base_stable` until the plateau (or its most steps) and return its record: the validation curve,
    whether it stopped at the plateau, its steps and the decay phase's steps. Reused by reruns."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from moelpr.data.corpus import load_corpora
    from moelpr.demo.steps import evaluate_at_demo_sizes
    from moelpr.utils.atomic import atomic_write_json

    path = out / "eval" / PLATEAU_FILE
    partial = path.with_suffix(".partial.json")  # the curve so far, beside the run's checkpoints
    stable = out / "models" / "base_stable"
    if path.is_file() and (stable / "config.json").is_file():
        record = json.loads(path.read_text())
    else:
        import shutil

        if (stable / "config.json").is_file():
            shutil.rmtree(stable)  # a finished stable model without its curve: train it again, measured
        init = out / "models" / "base_init"
        tokenizer, corpora = AutoTokenizer.from_pretrained(init), load_corpora(validation_yaml)

        def evaluate(model) -> dict:
            return evaluate_at_demo_sizes(model, tokenizer, corpora, sizes, precision)

        checkpoints = sorted(int(p.name.split("-")[-1]) for p in (stable / "checkpoints").glob("checkpoint-*"))
        if checkpoints and partial.is_file():  # a killed run: the trainer resumes from its last checkpoint
            curve = [p for p in json.loads(partial.read_text()) if p["step"] <= checkpoints[-1]]
        else:
            curve = [curve_point(0, evaluate(AutoModelForCausalLM.from_pretrained(init).eval()))]

        def logged(point: dict[str, float]) -> None:
            atomic_write_json(partial, curve)
            log(
                f"[demo] base (stable lr) step {point['step']:>6}: validation bpb old {point['old_bpb']:.4f} "
                f"new {point['new_bpb']:.4f} mean {point['score']:.4f}"
            )

        stop = PlateauStop(evaluate, sizes.base_eval_every, sizes.base_plateau, curve, on_point=logged)
        train("base_stable", runs["base_stable"], callbacks=[stop])
        record = {"curve": curve, "stopped_at_plateau": stop.stopped_at_plateau}
        atomic_write_json(path, record)
    stable_steps = int(record["curve"][-1]["step"])
    return {
        **record,
        "stable_steps": stable_steps,
        "decay_steps": max(1, round(sizes.base_decay_fraction * stable_steps)),
    }


def maturity_record(
    stable: dict[str, Any], sizes: Any, base_tokens: int, base: Path, after: dict[str, Any]
) -> dict[str, Any]:
    """The base's maturity for results.json: steps, tokens seen, tokens per parameter, epochs of its mix, the
    validation curve of the stable phase and the point after the decay (`after`: the base row's validation)."""
    from transformers import AutoModelForCausalLM

    from moelpr.demo.plans import blocks_per_step

    params = sum(p.numel() for p in AutoModelForCausalLM.from_pretrained(base).parameters())
    steps = stable["stable_steps"] + stable["decay_steps"]
    tokens = steps * blocks_per_step(sizes) * sizes.cutoff_len
    return {
        "stable_steps": stable["stable_steps"],
        "decay_steps": stable["decay_steps"],
        "tokens": tokens,
        "parameters": params,
        "tokens_per_parameter": tokens / params,
        "epochs": tokens / base_tokens if base_tokens else math.nan,
        "plateau_threshold": sizes.base_plateau,
        "stopped_at_plateau": stable["stopped_at_plateau"],
        "curve": stable["curve"],
        "after_decay": curve_point(steps, after),
    }
