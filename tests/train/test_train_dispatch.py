"""Every dispatch path that runs on CPU trains alike through `moe-lpr train`: stage 1 then stage 2 with
`moe_dispatch: loop` (CPU's path), `grouped` (the GPUs' path, forced: `F.grouped_mm` runs on CPU fp32) and
`reference` (the definition) log the same losses step by step, within float32 summation-order noise."""

import pytest
from train_helpers import TINY_RECIPES, logged, overrides

from moelpr.cli import main

STEPS = 3
TERMS = ("loss", "lm_loss", "aux_loss", "lpr_loss", "router_prob0_old")


def run_stages(world, out, dispatch: str) -> dict[str, list[dict]]:
    """Stage 1 then stage 2 of the tiny recipes with `moe_dispatch: dispatch`; the logged terms per stage."""
    dense, corpora = world
    logs = {}
    model = dense
    for stage in ("stage1", "stage2"):
        args = overrides(corpora=str(corpora), max_steps=STEPS, moe_dispatch=dispatch)
        args += ["--model", str(model), "--output_dir", str(out / stage)]
        assert main(["train", str(TINY_RECIPES / f"{stage}.yaml"), *args]) == 0
        logs[stage] = [{k: e[k] for k in TERMS if k in e} for e in logged(out / stage)]
        model = out / stage
    return logs


@pytest.fixture(scope="module")
def reference(world, tmp_path_factory):
    return run_stages(world, tmp_path_factory.mktemp("reference"), "reference")


@pytest.mark.parametrize("dispatch", ["loop", "grouped"])
def test_dispatch_paths_log_the_same_losses(world, reference, tmp_path, dispatch):
    got = run_stages(world, tmp_path, dispatch)
    for stage, want in reference.items():
        assert len(got[stage]) == len(want) == STEPS
        assert "aux_loss" in want[0] if stage == "stage1" else "lpr_loss" in want[0]
        for step, (have, expected) in enumerate(zip(got[stage], want)):
            assert have.keys() == expected.keys(), (stage, step)
            for key, value in expected.items():
                assert have[key] == pytest.approx(value, rel=1e-4), (stage, step, key)
    assert got["stage1"][-1]["lm_loss"] < got["stage1"][0]["lm_loss"]  # it trains
