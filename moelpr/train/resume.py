"""Where a training run starts: at step 0, or at the last complete Trainer checkpoint of an earlier run.

Rerunning the same command after the process was killed (preemption, a job requeue) continues the run from
`output_dir/checkpoints/`, as LLaMA-Factory does. transformers 5.24 writes a checkpoint in place, not through a
temporary directory (`Trainer._save_checkpoint`: weights, optimizer, scheduler, RNG state, then
`trainer_state.json` last), so a run killed while saving leaves a partial `checkpoint-N`. `checkpoint_problem`
tells one from the files alone, by structure: safetensors headers against file sizes, torch archives by their
zip central directory (written last). Nothing is unpickled.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import sys
import zipfile
from pathlib import Path
from typing import Callable

from moelpr.errors import UserError

CHECKPOINT_DIR = re.compile(r"^checkpoint-(\d+)$")
TRAINER_STATE = "trainer_state.json"
OPTIMIZER_FILES = ("optimizer.pt", "scheduler.pt")
_TORCH_ARCHIVES = ("*.pt", "*.pth", "*.bin")  # torch.save's zip format (optimizer, scheduler, RNG, arguments)


def _stderr(line: str) -> None:
    print(line, file=sys.stderr, flush=True)


def checkpoints(ckpt_dir: Path) -> list[Path]:
    """The `checkpoint-N` directories of `ckpt_dir`, newest (largest N) first."""
    if not ckpt_dir.is_dir():
        return []
    found = [p for p in ckpt_dir.iterdir() if p.is_dir() and CHECKPOINT_DIR.match(p.name)]
    return sorted(found, key=lambda p: int(CHECKPOINT_DIR.match(p.name).group(1)), reverse=True)


def _safetensors_problem(path: Path) -> str | None:
    from safetensors import SafetensorError, safe_open

    try:
        with safe_open(path, framework="pt"):  # parses the header and checks it covers the file exactly
            return None
    except (SafetensorError, OSError) as err:
        return f"{path.name} is truncated or corrupt ({err})"


def _archive_problem(path: Path) -> str | None:
    try:
        with zipfile.ZipFile(path):  # reads the central directory, the last thing torch.save writes
            return None
    except (zipfile.BadZipFile, OSError):
        return f"{path.name} is truncated or not a torch archive"


def checkpoint_problem(path: Path, *, needs_optimizer: bool = True) -> str | None:
    """Why `path` is not a complete Trainer checkpoint, or None when it is one.

    Complete: `trainer_state.json` parses and records the step in the directory's name; model weights are
    there (every shard an index names, every safetensors file whole); `optimizer.pt` and `scheduler.pt` are
    there (unless `needs_optimizer` is false, for `save_only_model`, or DeepSpeed / FSDP keep their own
    optimizer directories), and every torch archive is a whole zip file.
    """
    match = CHECKPOINT_DIR.match(path.name)
    if match is None or not path.is_dir():
        return "not a checkpoint-N directory"
    state_file = path / TRAINER_STATE
    if not state_file.is_file():
        return f"{TRAINER_STATE} is missing"
    try:
        state = json.loads(state_file.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError):
        return f"{TRAINER_STATE} is not valid JSON"
    step = int(match.group(1))
    if not isinstance(state, dict) or state.get("global_step") != step:
        recorded = state.get("global_step") if isinstance(state, dict) else None
        return f"{TRAINER_STATE} records step {recorded}, not {step}"
    sharded = any(
        p.is_dir() and (p.name.startswith("global_step") or p.name.startswith("optimizer_")) for p in path.iterdir()
    )  # DeepSpeed global_stepN/, FSDP optimizer_0/
    for index in sorted(path.glob("*.safetensors.index.json")):
        try:
            shards = set(json.loads(index.read_text(encoding="utf-8"))["weight_map"].values())
        except (json.JSONDecodeError, UnicodeDecodeError, KeyError, TypeError, AttributeError):
            return f"{index.name} is not a valid weights index"
        missing = sorted(s for s in shards if not (path / s).is_file())
        if missing:
            return f"{index.name} names missing shard {missing[0]}"
    weights = sorted(path.glob("*.safetensors"))
    if not weights and not sharded:
        return "no model weights (*.safetensors)"
    for file in weights:
        if problem := _safetensors_problem(file):
            return problem
    if needs_optimizer and not sharded:
        for name in OPTIMIZER_FILES:
            if not (path / name).is_file():
                return f"{name} is missing"
    for pattern in _TORCH_ARCHIVES:
        for file in sorted(path.rglob(pattern)):
            if problem := _archive_problem(file):
                return problem
    return None


def last_complete_checkpoint(
    ckpt_dir: Path, *, needs_optimizer: bool = True, warn: Callable[[str], None] = _stderr
) -> Path | None:
    """The newest complete checkpoint in `ckpt_dir`; each newer incomplete one is skipped with a warning."""
    for path in checkpoints(ckpt_dir):
        problem = checkpoint_problem(path, needs_optimizer=needs_optimizer)
        if problem is None:
            return path
        warn(f"warning: skipping incomplete checkpoint {path}: {problem}")
    return None


def resume_point(
    training_args: dict, out_dir: Path, ckpt_dir: Path, *, overwrite: bool, finished: bool, main_process: bool
) -> str | None:
    """The checkpoint this run resumes from (None: start at step 0), from `resume_from_checkpoint`.

    - not set: the last complete checkpoint of an earlier run in `ckpt_dir`, said in one line on stderr; none
      there: step 0 (with a warning when only incomplete ones were found, which are removed);
    - `true`: the last complete checkpoint, which must exist; a path: that checkpoint, which must be complete;
    - `false`: never resume; checkpoints of an earlier run are refused;
    - `overwrite: true` (unless resuming is asked for): start again, removing earlier checkpoints.
    A finished model in `out_dir` (`finished`) is refused unless `overwrite` is set or resuming is explicit.

    Only the main process (`main_process`) prints and removes anything.
    """
    say = _stderr if main_process else (lambda line: None)
    needs_optimizer = not training_args.get("save_only_model", False)
    resume = training_args.get("resume_from_checkpoint")
    if isinstance(resume, str) and resume.strip().lower() in ("true", "false", ""):
        resume = {"true": True, "false": False}.get(resume.strip().lower())
    if out_dir.exists() and not out_dir.is_dir():
        raise UserError(f"output_dir {out_dir} exists and is not a directory; choose another")
    if resume is True:
        last = last_complete_checkpoint(ckpt_dir, needs_optimizer=needs_optimizer, warn=say)
        if last is None:
            raise UserError(
                f"resume_from_checkpoint: true but {ckpt_dir} holds no complete checkpoint-N directory; "
                "drop resume_from_checkpoint to start again"
            )
        say(f"resuming from {last}")
        return str(last)
    if resume is not None and resume is not False:
        if not isinstance(resume, (str, os.PathLike)):
            raise UserError(f"resume_from_checkpoint must be true, false or a checkpoint-N directory, got {resume!r}")
        path = Path(resume)
        problem = checkpoint_problem(path, needs_optimizer=needs_optimizer) if path.is_dir() else "no such directory"
        if problem:
            raise UserError(f"resume_from_checkpoint {resume} is not a complete Trainer checkpoint: {problem}")
        say(f"resuming from {path}")
        return str(path)
    if finished and not overwrite:
        raise UserError(f"output_dir {out_dir} already holds a trained model; choose another or set overwrite: true")
    if overwrite:
        _clear(ckpt_dir, main_process)
        return None
    if not checkpoints(ckpt_dir):
        return None
    if resume is False:
        raise UserError(
            f"output_dir {out_dir} holds checkpoints of an earlier run and resume_from_checkpoint is "
            "false; drop it to continue that run, or set overwrite: true to start again"
        )
    last = last_complete_checkpoint(ckpt_dir, needs_optimizer=needs_optimizer, warn=say)
    if last is None:
        say(f"warning: no complete checkpoint in {ckpt_dir}; starting again from step 0")
        _clear(ckpt_dir, main_process)
        return None
    say(f"resuming from {last} (the last complete checkpoint of an earlier run; overwrite: true starts again)")
    return str(last)


def _clear(ckpt_dir: Path, main_process: bool) -> None:
    """Remove the checkpoints of an earlier run (the Trainer would mix its own with them)."""
    if main_process and ckpt_dir.is_dir():
        shutil.rmtree(ckpt_dir, ignore_errors=True)
