"""Regression: a fixed tiny stage 1 and stage 2 log the same losses as when the values were stored.

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
from train_helpers import build_dense, write_corpora

from moelpr.train import load_recipe, train

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


def test_stage1_and_stage2_losses_match_the_stored_values(tmp_path):
    dense, corpora = build_dense(tmp_path), write_corpora(tmp_path / "data")
    stage1 = train(
        load_recipe(
            {
                "model": str(dense),
                "corpora": str(corpora),
                "num_experts": 3,
                "output_dir": str(tmp_path / "s1"),
                **COMMON,
            }
        )
    )
    stage2 = train(
        load_recipe(
            {
                "model": str(stage1),
                "corpora": str(corpora),
                "stage": 2,
                "lpr_loss_coef": 0.5,
                "output_dir": str(tmp_path / "s2"),
                **COMMON,
            }
        )
    )
    got = {"stage1": _losses(stage1), "stage2": _losses(stage2)}
    assert [len(v) for v in got.values()] == [4, 4]
    assert "aux_loss" in got["stage1"][0] and "lpr_loss" in got["stage2"][0]
    if os.environ.get("MOELPR_UPDATE_LOSS_REGRESSION"):
        STORED.write_text(json.dumps(got, indent=2) + "\n")
    stored = json.loads(STORED.read_text())
    for stage in ("stage1", "stage2"):
        for step, (have, want) in enumerate(zip(got[stage], stored[stage], strict=True)):
            assert have.keys() == want.keys(), (stage, step)
            for key in want:
                assert have[key] == pytest.approx(want[key], rel=1e-3), (stage, step, key)
