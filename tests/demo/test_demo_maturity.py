"""The base-maturity preset's stopping rule (moelpr.demo.maturity) and the mature plan (stable, then decay)."""

from __future__ import annotations

from pathlib import Path

from moelpr.demo.maturity import plateau_reached
from moelpr.demo.plans import plans
from moelpr.demo.settings import FULL, MATURE


def _curve(scores: list[float], every: int = 100) -> list[dict[str, float]]:
    return [{"step": i * every, "score": s} for i, s in enumerate(scores)]


def test_plateau_is_the_last_fifth_improving_less_than_the_threshold():
    assert not plateau_reached(_curve([5.0]), 0.01)
    assert not plateau_reached(_curve([5.0, 3.0]), 0.01)  # only step 0 before 4/5 of step 100
    # step 500: the reference is step 400 (the last at or before 4/5 of 500)
    assert not plateau_reached(_curve([5.0, 4.0, 3.5, 3.3, 3.20, 3.15]), 0.01)  # 1.6 % in the last fifth
    assert plateau_reached(_curve([5.0, 4.0, 3.5, 3.3, 3.20, 3.18]), 0.01)  # 0.6 %
    assert plateau_reached(_curve([5.0, 4.0, 3.5, 3.3, 3.20, 3.25]), 0.01)  # worse: no further gain either
    # uneven spacing: at step 700 the reference is step 500, not 600
    curve = [{"step": 0, "score": 9.0}, {"step": 500, "score": 3.1}, {"step": 600, "score": 3.0}]
    assert plateau_reached([*curve, {"step": 700, "score": 3.08}], 0.01)
    assert not plateau_reached([*curve, {"step": 700, "score": 3.0}], 0.01)


def test_mature_base_trains_stable_then_decays(tmp_path: Path):
    mix = {"review_tokens": 7000, "reviews": {f"review_x{s:g}": {"tokens": int(7000 * s)} for s in (0.25, 0.5, 2)}}
    runs = plans(tmp_path, MATURE, mix, gamma=None)
    stable, decay = runs["base_stable"], runs["base"]
    assert stable["lr_scheduler_type"] == "constant_with_warmup" and stable["steps"] == MATURE.base_steps
    assert stable["model"].endswith("base_init") and decay["model"].endswith("base_stable")
    assert decay["lr_scheduler_type"] == "linear" and decay["lr"] == stable["lr"] == MATURE.base_lr
    assert "base_stable" not in plans(tmp_path, FULL, mix, gamma=None)  # the default: one cosine schedule
    assert {k: v for k, v in runs.items() if not k.startswith("base")} == {
        k: v for k, v in plans(tmp_path, FULL, mix, gamma=None).items() if not k.startswith("base")
    }  # the comparison itself is the default's
