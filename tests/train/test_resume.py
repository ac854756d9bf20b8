"""A killed run continues when the same command is run again: from its last complete checkpoint, to the same weights.

Killed runs are real (`SIGKILL` to a `moe-lpr train` subprocess) or made by copying the checkpoints of a finished
run into a fresh output directory (the state a run killed after its last checkpoint leaves) and damaging them.
"""

import json
import os
import shutil
import signal
import subprocess
import sys
import time

import pytest
from safetensors.torch import load_file
from train_helpers import TINY_RECIPES, overrides

from moelpr.cli import main
from moelpr.errors import UserError
from moelpr.train import load_recipe, train
from moelpr.train.resume import checkpoint_problem, last_complete_checkpoint, resume_point

STEPS = {"max_steps": 4, "save_strategy": "steps", "save_steps": 2, "disable_tqdm": True}


def _args(world, out, **kw) -> list[str]:
    dense, corpora = world
    return [
        str(TINY_RECIPES / "stage1.yaml"),
        *overrides(model=str(dense), corpora=str(corpora), output_dir=str(out), **{**STEPS, **kw}),
    ]


def _train(world, out, **kw):
    args = _args(world, out, **kw)
    return train(load_recipe(args[0], args[1:]))


def _weights(out) -> dict:
    files = sorted(out.glob("*.safetensors"))
    assert files, f"no weights in {out}"
    return {k: v for f in files for k, v in load_file(f).items()}


def _assert_same_weights(a, b) -> None:
    wa, wb = _weights(a), _weights(b)
    assert wa.keys() == wb.keys()
    for name in wa:
        assert wa[name].equal(wb[name]), name  # bit-identical


@pytest.fixture(scope="module")
def reference(world, tmp_path_factory):
    """An uninterrupted run: final model plus checkpoint-2 and checkpoint-4."""
    return _train(world, tmp_path_factory.mktemp("resume") / "ref")


def _killed_copy(reference, out, keep=("checkpoint-2", "checkpoint-4")):
    """`out` as a run killed after its last checkpoint leaves it: checkpoints, no final model."""
    for name in keep:
        shutil.copytree(reference / "checkpoints" / name, out / "checkpoints" / name)
    return out


# ---- a real SIGKILL -------------------------------------------------------------------------------------------------


def test_sigkill_then_the_same_command_resumes_to_identical_weights(world, tmp_path, capsys):
    out = tmp_path / "killed"
    command = [sys.executable, "-m", "moelpr.cli", "train", *_args(world, out, max_steps=12)]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}  # the reference below runs on one thread too (conftest)
    log = (tmp_path / "first.log").open("w")
    proc = subprocess.Popen(command, env=env, stdout=log, stderr=subprocess.STDOUT)
    first = out / "checkpoints" / "checkpoint-2" / "trainer_state.json"  # the Trainer writes it last
    deadline = time.monotonic() + 300
    while proc.poll() is None and time.monotonic() < deadline:
        if first.is_file() and first.read_text().rstrip().endswith("}"):
            break
        time.sleep(0.01)
    proc.send_signal(signal.SIGKILL)
    assert proc.wait() == -signal.SIGKILL, (tmp_path / "first.log").read_text()[-2000:]
    assert not (out / "config.json").exists()  # killed mid-run: no final model yet

    assert main(command[3:]) == 0  # the same command again (in this process: one interpreter start less)
    err = capsys.readouterr().err
    resumed = [line for line in err.splitlines() if line.startswith("resuming from ")]
    assert len(resumed) == 1 and f"{out / 'checkpoints'}/checkpoint-" in resumed[0], err[-2000:]
    uninterrupted = _train(world, tmp_path / "uninterrupted", max_steps=12)
    _assert_same_weights(out, uninterrupted)


# ---- damaged checkpoints --------------------------------------------------------------------------------------------


def _cut_half(path):
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])


DAMAGE = {
    "model_cut_in_half": (lambda c: _cut_half(c / "model.safetensors"), "model.safetensors is truncated or corrupt"),
    "trainer_state_missing": (lambda c: (c / "trainer_state.json").unlink(), "trainer_state.json is missing"),
    "trainer_state_cut": (lambda c: _cut_half(c / "trainer_state.json"), "trainer_state.json is not valid JSON"),
    "optimizer_cut": (lambda c: _cut_half(c / "optimizer.pt"), "optimizer.pt is truncated or not a torch archive"),
    "scheduler_missing": (lambda c: (c / "scheduler.pt").unlink(), "scheduler.pt is missing"),
    "rng_state_cut": (lambda c: _cut_half(c / "rng_state.pth"), "rng_state.pth is truncated"),
    "weights_missing": (lambda c: (c / "model.safetensors").unlink(), "no model weights"),
    "wrong_step": (lambda c: (c / "trainer_state.json").write_text('{"global_step": 3}'), "records step 3, not 4"),
    "missing_shard": (
        lambda c: (c / "model.safetensors.index.json").write_text(
            '{"weight_map": {"w": "model-00002-of-00002.safetensors"}}'
        ),
        "names missing shard model-00002-of-00002",
    ),
}


@pytest.mark.parametrize("damage", DAMAGE)
def test_checkpoint_problem_names_what_is_wrong(reference, tmp_path, damage):
    ckpt = shutil.copytree(reference / "checkpoints" / "checkpoint-4", tmp_path / "checkpoint-4")
    assert checkpoint_problem(ckpt) is None
    spoil, reason = DAMAGE[damage]
    spoil(ckpt)
    assert reason in checkpoint_problem(ckpt)


def test_save_only_model_checkpoints_need_no_optimizer(reference, tmp_path):
    ckpt = shutil.copytree(reference / "checkpoints" / "checkpoint-4", tmp_path / "checkpoint-4")
    (ckpt / "optimizer.pt").unlink()
    (ckpt / "scheduler.pt").unlink()
    assert checkpoint_problem(ckpt) == "optimizer.pt is missing"
    assert checkpoint_problem(ckpt, needs_optimizer=False) is None


@pytest.mark.parametrize("damage", ["model_cut_in_half", "trainer_state_missing"])
def test_a_damaged_last_checkpoint_is_skipped_for_the_previous_one(world, reference, tmp_path, capsys, damage):
    out = _killed_copy(reference, tmp_path / "out")
    DAMAGE[damage][0](out / "checkpoints" / "checkpoint-4")
    _train(world, out)
    err = capsys.readouterr().err.splitlines()
    skipped = [line for line in err if line.startswith("warning: skipping incomplete checkpoint")]
    assert len(skipped) == 1 and "checkpoint-4: " + DAMAGE[damage][1] in skipped[0], err
    assert [line for line in err if line.startswith("resuming from ")] == [
        f"resuming from {out / 'checkpoints' / 'checkpoint-2'} (the last complete checkpoint of an earlier run; "
        "overwrite: true starts again)"
    ]
    _assert_same_weights(out, reference)
    assert checkpoint_problem(out / "checkpoints" / "checkpoint-4") is None  # the Trainer wrote it again


def test_no_complete_checkpoint_starts_again_with_a_warning(world, reference, tmp_path, capsys):
    out = _killed_copy(reference, tmp_path / "out")
    for name in ("checkpoint-2", "checkpoint-4"):
        _cut_half(out / "checkpoints" / name / "model.safetensors")
    _train(world, out)
    err = capsys.readouterr().err
    assert err.count("warning: skipping incomplete checkpoint") == 2
    assert f"warning: no complete checkpoint in {out / 'checkpoints'}; starting again from step 0" in err
    assert "resuming from" not in err
    _assert_same_weights(out, reference)


def test_overwrite_starts_again_and_clears_old_checkpoints(world, reference, tmp_path, capsys):
    out = _killed_copy(reference, tmp_path / "out")
    stale = shutil.copytree(out / "checkpoints" / "checkpoint-4", out / "checkpoints" / "checkpoint-6")
    (stale / "trainer_state.json").write_text('{"global_step": 6}')  # a complete-looking checkpoint of a longer run
    _train(world, out, overwrite=True)
    err = capsys.readouterr().err
    assert "resuming from" not in err and "warning" not in err
    assert sorted(p.name for p in (out / "checkpoints").iterdir()) == [
        "checkpoint-2",
        "checkpoint-4",
        "train_log.jsonl",
    ]
    metrics = json.loads((out / "train_metrics.json").read_text())
    assert [e["step"] for e in metrics["log_history"] if "loss" in e] == [1, 2, 3, 4]  # from step 0
    log = [json.loads(line) for line in (out / "checkpoints" / "train_log.jsonl").read_text().splitlines()]
    assert [e["step"] for e in log if "loss" in e] == [1, 2, 3, 4]  # the old run's log went with its checkpoints
    _assert_same_weights(out, reference)


# ---- explicit resume_from_checkpoint -------------------------------------------------------------------------------


def _cli(world, out, capsys, **kw) -> tuple[int, list[str]]:
    code = main(["train", *_args(world, out, **kw)])
    return code, capsys.readouterr().err.strip().splitlines()


def test_resume_false_refuses_checkpoints_of_an_earlier_run(world, reference, tmp_path, capsys):
    out = _killed_copy(reference, tmp_path / "out")
    code, err = _cli(world, out, capsys, resume_from_checkpoint=False)
    assert code == 2 and len(err) == 1 and "resume_from_checkpoint is false" in err[0] and "overwrite: true" in err[0]


def test_resume_true_needs_a_complete_checkpoint(world, reference, tmp_path, capsys):
    out = _killed_copy(reference, tmp_path / "out", keep=("checkpoint-2",))
    (out / "checkpoints" / "checkpoint-2" / "trainer_state.json").unlink()
    code, err = _cli(world, out, capsys, resume_from_checkpoint=True)
    assert code == 2 and err[-1].startswith("moe-lpr train: error: resume_from_checkpoint: true but")
    assert "holds no complete checkpoint" in err[-1]


def test_resume_path_must_be_complete(world, reference, tmp_path, capsys):
    ckpt = shutil.copytree(reference / "checkpoints" / "checkpoint-2", tmp_path / "elsewhere" / "checkpoint-2")
    _cut_half(ckpt / "optimizer.pt")
    code, err = _cli(world, tmp_path / "out", capsys, resume_from_checkpoint=str(ckpt))
    assert code == 2 and len(err) == 1
    assert "is not a complete Trainer checkpoint: optimizer.pt is truncated" in err[0]


def test_a_finished_run_is_not_resumed(world, reference, capsys):
    code, err = _cli(world, reference, capsys)
    assert code == 2 and len(err) == 1 and "already holds a trained model" in err[0]


def test_last_complete_checkpoint_prefers_the_newest(reference, tmp_path):
    ckpts = shutil.copytree(reference / "checkpoints", tmp_path / "checkpoints")
    warnings: list[str] = []
    assert last_complete_checkpoint(ckpts, warn=warnings.append) == ckpts / "checkpoint-4" and not warnings
    _cut_half(ckpts / "checkpoint-4" / "model.safetensors")
    assert last_complete_checkpoint(ckpts, warn=warnings.append) == ckpts / "checkpoint-2"
    assert len(warnings) == 1 and "checkpoint-4: model.safetensors is truncated" in warnings[0]


def test_resume_value_must_be_a_flag_or_a_path(tmp_path):
    with pytest.raises(UserError, match="must be true, false or a checkpoint-N directory, got 3"):
        resume_point(
            {"resume_from_checkpoint": 3},
            tmp_path,
            tmp_path / "checkpoints",
            overwrite=False,
            finished=False,
            main_process=True,
        )
