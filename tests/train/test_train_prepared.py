"""Training from a dataset made by `moe-lpr prepare` (`prepared:`): two torchrun processes run stage 1 from it,
agree on their weights and log the loss one process logs on the same global batch; recipe errors."""

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from train_helpers import TINY_RECIPES, logged, overrides

from moelpr.cli import main
from moelpr.errors import UserError
from moelpr.train import load_recipe, train


@pytest.fixture(scope="module")
def prepared(world, tmp_path_factory) -> Path:
    dense, corpora = world
    out = tmp_path_factory.mktemp("prepared") / "data"
    args = ["prepare", str(corpora), "--tokenizer", str(dense), "--cutoff-len", "32", "--output", str(out)]
    assert main([*args, "--num-proc", "1", "--quiet"]) == 0
    return out


@pytest.mark.slow
def test_two_processes_train_stage1_from_prepared_data(world, prepared, tmp_path):
    dense, _ = world
    cli = shutil.which("moe-lpr", path=str(Path(sys.executable).parent)) or shutil.which("moe-lpr")
    args = overrides(model=str(dense), prepared=str(prepared), max_steps=2, per_device_train_batch_size=2)
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", cli, "train"]
    cmd += [str(TINY_RECIPES / "stage1.yaml"), "--output_dir", str(tmp_path / "ddp"), *args]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    metrics = json.loads((tmp_path / "ddp" / "train_metrics.json").read_text())
    assert metrics["recipe"]["prepared"] == str(prepared) and metrics["metrics"]["train_runtime"] > 0

    single = load_recipe(
        TINY_RECIPES / "stage1.yaml", args + overrides(output_dir=str(tmp_path / "one"), per_device_train_batch_size=4)
    )
    one, two = logged(train(single))[0], logged(tmp_path / "ddp")[0]
    assert abs(one["lm_loss"] - two["lm_loss"]) <= 1e-5 * one["lm_loss"], (one, two)


def test_recipe_data_keys(world, prepared, tmp_path):
    dense, corpora = world
    base = {"model": str(dense), "output_dir": str(tmp_path / "out")}
    with pytest.raises(UserError, match=r"needs corpora: \(a corpora spec\) or prepared:"):
        load_recipe(base)
    with pytest.raises(UserError, match=r"or prepared: \(a directory from `moe-lpr prepare`\), not both"):
        load_recipe({**base, "corpora": str(corpora), "prepared": str(prepared)})
    with pytest.raises(UserError, match=r"prepared data is memory-mapped, not streamed"):
        load_recipe({**base, "prepared": str(prepared), "streaming": True, "max_steps": 2})
    with pytest.raises(UserError, match=r"max_docs applies when corpora are prepared"):
        load_recipe({**base, "prepared": str(prepared), "max_docs": 5})
    with pytest.raises(UserError, match=r"weights must map corpus names to numbers > 0"):
        load_recipe({**base, "corpora": str(corpora), "weights": {"el": 0}})
    recipe = load_recipe(
        TINY_RECIPES / "stage1.yaml", overrides(**base, corpora="", prepared=str(prepared), cutoff_len=64)
    )
    with pytest.raises(UserError, match=r"holds blocks of 32 tokens but cutoff_len is 64"):
        train(recipe)


def test_train_with_mismatched_prepared_data_exits_2(world, prepared, tmp_path, capsys):
    dense, _ = world
    out = tmp_path / "out"
    args = overrides(model=str(dense), prepared=str(prepared), cutoff_len=64, output_dir=str(out), max_steps=1)
    assert main(["train", str(TINY_RECIPES / "stage1.yaml"), *args]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "holds blocks of 32 tokens but cutoff_len is 64" in err[0], err
    assert not (out / "config.json").exists()
    args = overrides(model=str(dense), prepared=str(tmp_path), output_dir=str(out), max_steps=1)
    assert main(["train", str(TINY_RECIPES / "stage1.yaml"), *args]) == 2
    assert "is not a finished prepared dataset" in capsys.readouterr().err
