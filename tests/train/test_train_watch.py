"""A run you can validate and watch: per-language / per-role validation during training (and the best model by
it), the summary before step 1, one compact console line per log, train_log.jsonl, tokens/s, the stage-2
convergence warning while training; inconsistent settings stop before any model is built."""

from __future__ import annotations

import json
import logging

import pytest
from train_helpers import TINY_RECIPES, logged, overrides, write_corpora

from moelpr.cli import main
from moelpr.train import load_recipe, train


def _stage1(world, tmp_path):
    dense, corpora = world
    keys = {"model": str(dense), "corpora": str(corpora), "output_dir": str(tmp_path / "s1"), "max_steps": 4}
    return train(load_recipe(TINY_RECIPES / "stage1.yaml", overrides(**keys)))


def test_validation_per_language_and_role_and_the_best_model_by_it(world, tmp_path, caplog):
    stage1 = _stage1(world, tmp_path)
    validation = write_corpora(tmp_path / "val", docs=12)
    keys = {
        "model": str(stage1),
        "corpora": str(world[1]),
        "output_dir": str(tmp_path / "s2"),
        "validation": str(validation),
        "eval_steps": 2,
        "max_steps": 4,
        "save_strategy": "steps",
        "save_steps": 2,
        "load_best_model_at_end": True,
        "metric_for_best_model": "old_bpb",
        "router_warning_threshold": 0.0,  # every layer counts as unconverged: the warning must fire mid-run
    }
    with caplog.at_level(logging.WARNING, logger="moelpr.train"):
        out = train(load_recipe(TINY_RECIPES / "stage2.yaml", overrides(**keys)))
    history = json.loads((out / "train_metrics.json").read_text())["log_history"]
    evals = [e for e in history if "eval_loss" in e]
    assert [e["step"] for e in evals] == [2, 4]
    first = evals[0]
    for lang in ("en", "es", "el", "ru"):
        assert first[f"eval_{lang}_bpb"] > 0 and first[f"eval_{lang}_loss"] > 0
    for role, langs in (("old", ("en", "es")), ("new", ("el", "ru"))):
        assert first[f"eval_{role}_bpb"] == pytest.approx(sum(first[f"eval_{lang}_bpb"] for lang in langs) / 2)
    assert first["eval_loss"] == pytest.approx(sum(first[f"eval_{lang}_loss"] for lang in ("en", "es", "el", "ru")) / 4)
    assert "eval_router/layer_0/old/expert0_weight" in first and "eval_router/layer_1/new/expert0_prob" in first
    # bits per byte is the loss in nats per token over ln 2 · bytes per token: the same factor at every evaluation
    ratio = [e["eval_el_loss"] / e["eval_el_bpb"] for e in evals]
    assert ratio[0] == pytest.approx(ratio[1], rel=1e-6)
    state = json.loads((out / "checkpoints" / "checkpoint-4" / "trainer_state.json").read_text())
    best = min(evals, key=lambda e: e["eval_old_bpb"])
    assert state["best_metric"] == pytest.approx(best["eval_old_bpb"])  # lower bits per byte is better
    assert state["best_model_checkpoint"].endswith(f"checkpoint-{best['step']}")
    mid_run = [r.getMessage() for r in caplog.records if "router convergence at step 2" in r.getMessage()]
    assert any("validation tokens" in m for m in mid_run)


def test_the_console_shows_a_summary_and_one_short_line_per_log(world, tmp_path, capsys):
    dense, corpora = world
    args = ["train", str(TINY_RECIPES / "stage1.yaml")]
    args += overrides(model=str(dense), corpora=str(corpora), output_dir=str(tmp_path / "s1"), max_steps=3)
    args += ["--disable_tqdm", "true"]
    assert main(args) == 0
    out = capsys.readouterr().out
    summary = out[out.index("training run:") :]
    assert "tokens per epoch" in summary and "new: " in summary and "optimizer steps 3" in summary
    assert "tokens per step" in summary and "trainable params" in summary
    lines = [line for line in out.splitlines() if line.startswith("step ")]
    assert [line.split(" | ")[0] for line in lines] == ["step 1/3", "step 2/3", "step 3/3"]
    assert all(len(line) < 200 and "router/layer" not in line for line in lines)
    assert "tok/s" in lines[1] and "old→expert 0" not in lines[1]  # stage 1 has no old-language tokens
    logs = [json.loads(line) for line in (tmp_path / "s1" / "checkpoints" / "train_log.jsonl").read_text().splitlines()]
    assert [e["step"] for e in logs if "loss" in e] == [1, 2, 3]
    assert "router/layer_0/new/expert0_weight" in logs[0] and logs[1]["tokens_per_s"] > 0
    assert logged(tmp_path / "s1")[1]["tokens_per_s"] > 0


@pytest.mark.parametrize(
    "keys, message",
    [
        ({"eval_strategy": "steps"}, "eval_strategy: steps needs validation data"),
        ({"load_best_model_at_end": True}, "load_best_model_at_end needs validation data"),
        ({"validation": "VAL", "metric_for_best_model": "hu_bpb"}, "metric_for_best_model 'hu_bpb' is not one"),
    ],
)
def test_inconsistent_evaluation_settings_stop_before_the_model(world, tmp_path, capsys, monkeypatch, keys, message):
    import moelpr.train.methods as methods

    dense, corpora = world
    keys = {k: str(write_corpora(tmp_path / "val", docs=4)) if v == "VAL" else v for k, v in keys.items()}
    built = []
    monkeypatch.setattr(methods, "_upcycled", lambda recipe: built.append(1))  # a model must not be built
    args = ["train", str(TINY_RECIPES / "stage1.yaml")]
    args += overrides(model=str(dense), corpora=str(corpora), output_dir=str(tmp_path / "out"), **keys)
    assert main(args) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and message in err and not built
    assert not (tmp_path / "out").exists()
