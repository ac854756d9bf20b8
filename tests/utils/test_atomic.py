"""Outputs appear whole or not at all: `moelpr.utils.atomic` on success, on errors, on interrupts and on a kill."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap

import pytest

from moelpr.errors import UserError
from moelpr.utils.atomic import atomic_output_dir, atomic_write_json, atomic_write_text


def _siblings(path):
    return sorted(p.name for p in path.parent.iterdir())


def test_directory_appears_only_when_the_block_succeeds(tmp_path):
    final = tmp_path / "out"
    with atomic_output_dir(final) as staging:
        (staging / "a.txt").write_text("a")
        assert not final.exists() and staging.parent == tmp_path  # same filesystem: the rename is atomic
    assert (final / "a.txt").read_text() == "a" and _siblings(final) == ["out"]
    mode = os.stat(final).st_mode & 0o777
    umask = os.umask(0)
    os.umask(umask)
    assert mode == 0o777 & ~umask  # not mkdtemp's private 0700


@pytest.mark.parametrize("error", [RuntimeError("boom"), KeyboardInterrupt()])
def test_an_error_or_interrupt_leaves_nothing_and_keeps_the_old_output(tmp_path, error):
    final = tmp_path / "out"
    with pytest.raises(type(error)), atomic_output_dir(final) as staging:
        (staging / "half.txt").write_text("half")
        raise error
    assert _siblings(final) == []
    final.mkdir()
    (final / "old.txt").write_text("old")
    with pytest.raises(type(error)), atomic_output_dir(final, overwrite=True) as staging:
        (staging / "new.txt").write_text("new")
        raise error
    assert sorted(p.name for p in final.iterdir()) == ["old.txt"] and _siblings(final) == ["out"]


def test_a_non_empty_output_needs_overwrite_and_a_file_is_refused(tmp_path):
    final = tmp_path / "out"
    final.mkdir()
    (final / "old.txt").write_text("old")
    with pytest.raises(UserError, match="exists and is not empty; pass --overwrite"):
        with atomic_output_dir(final):
            pass
    with atomic_output_dir(final, overwrite=True) as staging:
        (staging / "new.txt").write_text("new")
    assert sorted(p.name for p in final.iterdir()) == ["new.txt"] and _siblings(final) == ["out"]
    (tmp_path / "file").write_text("x")
    with pytest.raises(UserError, match="is not a directory"):
        with atomic_output_dir(tmp_path / "file"):
            pass
    with atomic_output_dir(tmp_path / "empty_ok") as staging:  # an existing empty directory is fine
        pass
    assert (tmp_path / "empty_ok").is_dir()


def test_file_writes_replace_whole_and_clean_up_on_failure(tmp_path):
    target = tmp_path / "deep" / "metrics.json"
    atomic_write_json(target, {"a": 1})
    assert target.read_text() == '{\n  "a": 1\n}\n'
    with pytest.raises(TypeError):
        atomic_write_json(target, {"a": object()})  # not serialisable: fails before anything is written
    assert target.read_text() == '{\n  "a": 1\n}\n' and _siblings(target) == ["metrics.json"]
    atomic_write_text(target, "é")
    assert target.read_text(encoding="utf-8") == "é"


def test_a_killed_writer_leaves_the_previous_output_intact(tmp_path):
    """SIGKILL inside the block: the final directory keeps its old content; only a dot-named staging remains."""
    final = tmp_path / "out"
    final.mkdir()
    (final / "old.txt").write_text("old")
    script = textwrap.dedent(
        f"""
        import os, sys, time
        from moelpr.utils.atomic import atomic_output_dir
        with atomic_output_dir({str(final)!r}, overwrite=True) as staging:
            (staging / "new.txt").write_text("new")
            print("ready", flush=True)
            time.sleep(60)
        """
    )
    child = subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.PIPE, text=True)
    try:
        assert child.stdout.readline().strip() == "ready"
        child.send_signal(signal.SIGKILL)
        child.wait(timeout=30)
    finally:
        child.kill()
    assert sorted(p.name for p in final.iterdir()) == ["old.txt"]
    assert all(name == "out" or name.startswith(".out.tmp-") for name in _siblings(final))
