"""Regression: a fixed tiny stage 1 and stage 2 through `moe-lpr train` log the same losses as when the values
were stored; so do both stages compiled (`torch_compile: true`).

The model, tokenizer, corpora and seeds are fixed; every logged loss term of every step is compared with
`loss_regression.json` (rel 1e-3: room for another CPU's summation order, far below any real change). A change
that moves them on purpose says why in its commit and regenerates the file:

    MOELPR_UPDATE_LOSS_REGRESSION=1 python -m pytest tests/train/test_loss_regression.py
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
import yaml
from train_helpers import build_dense, write_corpora

from moelpr.cli import main

STORED = Path(__file__).with_name("loss_regression.json")
TERMS = ("loss", "lm_loss", "aux_loss", "lpr_loss", "router_prob0_old")
COMMON = {
    "cutoff_len": 32,
    "per_device_train_batch_size": 4,
    "max_steps": 4,
    "logging_steps": 1,
    "learning_rate": 1e-2,
    "seed": 7,
    "save_strategy": "no",
    "report_to": "none",
    "disable_tqdm": True,
}


def _losses(output_dir: Path) -> list[dict[str, float]]:
    history = json.loads((output_dir / "train_metrics.json").read_text())["log_history"]
    return [{k: entry[k] for k in TERMS if k in entry} for entry in history if "loss" in entry]


def run_stages(root: Path, **settings) -> dict[str, list[dict[str, float]]]:
    """`moe-lpr train` stage 1 then stage 2 of the fixed tiny run with these extra recipe settings; the logged
    terms per stage."""
    dense, corpora = build_dense(root), write_corpora(root / "data")
    common = {"corpora": str(corpora), **COMMON, **settings}
    recipes = {
        "s1": {"model": str(dense), "num_experts": 3, **common},
        "s2": {"model": str(root / "s1"), "stage": 2, "lpr_loss_coef": 0.5, **common},
    }
    for name, recipe in recipes.items():
        path = root / f"{name}.yaml"
        path.write_text(yaml.safe_dump({**recipe, "output_dir": str(root / name)}))
        assert main(["train", str(path)]) == 0
    got = {"stage1": _losses(root / "s1"), "stage2": _losses(root / "s2")}
    assert [len(v) for v in got.values()] == [4, 4]
    assert "aux_loss" in got["stage1"][0] and "lpr_loss" in got["stage2"][0]
    return got


def assert_stored(got: dict[str, list[dict[str, float]]]) -> None:
    stored = json.loads(STORED.read_text())
    for stage in ("stage1", "stage2"):
        for step, (have, want) in enumerate(zip(got[stage], stored[stage], strict=True)):
            assert have.keys() == want.keys(), (stage, step)
            for key in want:
                assert have[key] == pytest.approx(want[key], rel=1e-3), (stage, step, key)


def test_stage1_and_stage2_losses_match_the_stored_values(tmp_path):
    got = run_stages(tmp_path)
    if os.environ.get("MOELPR_UPDATE_LOSS_REGRESSION"):
        STORED.write_text(json.dumps(got, indent=2) + "\n")
    assert_stored(got)


@pytest.mark.slow  # ~40-60 s on 2 busy cores: inductor compiles the forward and backward graphs of both stages
def test_torch_compile_trains_stage1_and_stage2_alike(tmp_path):
    """`torch_compile: true` (the Trainer's own key) compiles the model with inductor and trains it: both stages
    log the stored (eager) losses, and compilation really happened."""
    from torch._dynamo.utils import counters

    counters.clear()
    got = run_stages(tmp_path, torch_compile=True)
    assert counters["stats"]["unique_graphs"] > 0  # dynamo compiled graphs (the loop path: several, docs/benchmarks.md)
    assert_stored(got)
    assert got["stage1"][-1]["lm_loss"] < got["stage1"][0]["lm_loss"]  # it trains
