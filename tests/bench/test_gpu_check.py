"""`bench/gpu_check.sh --cpu` runs every part of the GPU check that can run without a GPU, at toy sizes, and
prints its one table: so the script is ready for a lent GPU (docs/benchmarks.md §7)."""

import os
import subprocess
import sys

import pytest
from train_helpers import REPO

CHECKS = {  # check → rows expected in --cpu mode
    "device": 1,
    "torch.compile graph breaks": 1,
    "tiny training": 1,
    "host syncs per step": 1,
    "MoE block fwd+bwd, eager": 2,
    "MoE block fwd+bwd, compiled (aot_eager)": 2,
    "training step, eager": 1,
    "training step, compiled (aot_eager)": 1,
    "peak memory": 1,
}


@pytest.mark.slow  # ~50 s on one busy core: a tiny training, two toy blocks, a toy training step, a memory check
def test_cpu_mode_prints_the_whole_table():
    env = {**os.environ, "PYTHON": sys.executable, "OMP_NUM_THREADS": "1"}
    proc = subprocess.run(
        ["bash", str(REPO / "bench" / "gpu_check.sh"), "--cpu", "--train-steps", "6"],
        env=env,
        capture_output=True,
        text=True,
        timeout=400,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    lines = [line for line in proc.stdout.splitlines() if line.startswith("| ")]
    assert lines[0].startswith("| check | setting | measured |")
    rows = [
        [cell.strip() for cell in line.strip("|").split(" | ")] for line in lines[1:] if not line.startswith("|---")
    ]
    assert all(len(row) == 5 for row in rows), rows  # the table's columns, whatever a cell says
    checks = [row[0] for row in rows]
    assert {check: checks.count(check) for check in CHECKS} == CHECKS, checks
    by_check = {row[0]: row for row in rows}
    assert "compute capability" not in by_check["device"][1] and "loop path" in by_check["device"][2]
    assert by_check["tiny training"][4] == "PASS"  # the stage-1 loss fell
    assert by_check["host syncs per step"][2] == "not measured: CUDA only"
    assert "max |Δ| vs ours: loop 0.0e+00" in by_check["MoE block fwd+bwd, eager"][2]  # same routing, same sums
    assert "planned" in by_check["peak memory"][2] and "skipped" not in proc.stdout


def test_no_gpu_without_cpu_mode_is_one_line():
    env = {**os.environ, "PYTHON": sys.executable, "CUDA_VISIBLE_DEVICES": ""}  # no GPU, also on a GPU machine
    proc = subprocess.run(
        ["bash", str(REPO / "bench" / "gpu_check.sh")], env=env, capture_output=True, text=True, timeout=120
    )
    assert proc.returncode == 1 and proc.stderr.strip().splitlines()[-1].startswith("gpu_check: no GPU here")
