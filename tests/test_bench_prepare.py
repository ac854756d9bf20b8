"""bench/prepare.py runs end to end at a tiny size (a smoke test: the figures themselves are the lead's to take)."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

BENCH = Path(__file__).resolve().parents[1] / "bench" / "prepare.py"


@pytest.mark.slow
def test_bench_prepare_runs(tmp_path):
    out = tmp_path / "results.json"
    cmd = [
        sys.executable,
        str(BENCH),
        "--workdir",
        str(tmp_path),
        "--sizes",
        "1,4",
        "--vocab",
        "600",
        "--json",
        str(out),
    ]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": os.pathsep.join(sys.path)}
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "prepare, 1 process:" in proc.stdout and "train start to step 1:" in proc.stdout
    results = json.loads(out.read_text())
    runs = results["prepare"]
    assert runs["large_2proc"]["tokens"] > 3 * runs["small_1proc"]["tokens"] > 0
    assert runs["small_1proc"]["tokens"] == runs["small_2proc"]["tokens"]  # the same data, whatever the processes
    assert runs["large_2proc"]["dtype"] == "uint16" and runs["large_2proc"]["bytes_per_token"] < 2.5
    assert all(0 < s < 300 for s in results["step1_seconds"].values())
