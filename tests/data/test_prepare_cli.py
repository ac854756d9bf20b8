"""`moe-lpr prepare`: the summary of a run, and every bad input: exit status 2, one line on stderr, no manifest
and no temporary file left behind."""

from __future__ import annotations

import re

import pytest

from moelpr.cli import main
from moelpr.data import PreparedDataset
from moelpr.data.prepare import MANIFEST


@pytest.fixture
def spec(tmp_path, jsonl):
    jsonl(tmp_path / "en.jsonl", ["a b c d e f"] * 50)
    jsonl(tmp_path / "el.jsonl", ["g h i j"] * 80)
    path = tmp_path / "corpora.yaml"
    path.write_text(
        "corpora:\n"
        "  - {name: en, path: en.jsonl, language: en, role: old, weight: 1}\n"
        "  - {name: el, path: el.jsonl, language: el, role: new, weight: 2}\n"
    )
    return path


def test_prepare_prints_a_summary(spec, tokenizer_dir, tmp_path, capsys):
    out = tmp_path / "out"
    args = ["prepare", str(spec), "--tokenizer", str(tokenizer_dir), "--cutoff-len", "8", "--output", str(out)]
    assert main([*args, "--num-proc", "2"]) == 0
    printed = capsys.readouterr().out
    assert re.search(r"^en\s+old\s+50\s+344\s+43$", printed, re.M)  # 50 docs × 7 tokens = 350: 43 blocks of 8
    assert re.search(r"^el\s+new\s+80\s+400\s+50$", printed, re.M)
    assert "bytes on disk (" in printed and "per token, uint16)" in printed and f"prepared: {out}" in printed
    ds = PreparedDataset(out)
    assert ds.corpus_blocks == {"en": 31, "el": 62}  # the recorded weights: 1 share and 2 of the 93 blocks
    stamps = {f: f.stat().st_mtime_ns for f in out.rglob("*")}
    assert main(args) == 0  # finished: its shards checked and reused
    assert {f: f.stat().st_mtime_ns for f in out.rglob("*")} == stamps


def _bad(capsys, tmp_path, *argv, match: str) -> None:
    out = tmp_path / "out"
    assert main(["prepare", *argv, "--quiet"]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and err.startswith("moe-lpr prepare: error: ") and match in err, err
    assert not (out / MANIFEST).exists()
    assert not list(tmp_path.rglob("*tmp-*")), "a temporary file was left behind"


def test_bad_inputs_exit_2_with_one_line_and_nothing_half_written(spec, tokenizer_dir, tmp_path, capsys, jsonl):
    tok = ["--tokenizer", str(tokenizer_dir)]
    out = ["--output", str(tmp_path / "out")]
    _bad(capsys, tmp_path, str(tmp_path / "nope.yaml"), *tok, "--cutoff-len", "8", *out, match="does not exist")
    _bad(capsys, tmp_path, str(spec), "--tokenizer", str(tmp_path), "--cutoff-len", "8", *out, match="no tokenizer")
    _bad(capsys, tmp_path, str(spec), *tok, "--cutoff-len", "0", *out, match="--cutoff-len must be a positive")
    _bad(capsys, tmp_path, str(spec), *tok, "--cutoff-len", "8", "--num-proc", "0", *out, match="--num-proc must")
    _bad(capsys, tmp_path, str(spec), *tok, "--cutoff-len", "1000", *out, match="fewer than one block")
    (tmp_path / "file").write_text("x")
    _bad(
        capsys,
        tmp_path,
        str(spec),
        *tok,
        "--cutoff-len",
        "8",
        "--output",
        str(tmp_path / "file"),
        match="is not a directory",
    )
    (tmp_path / "other").mkdir()
    (tmp_path / "other" / "notes.txt").write_text("mine")
    _bad(
        capsys,
        tmp_path,
        str(spec),
        *tok,
        "--cutoff-len",
        "8",
        "--output",
        str(tmp_path / "other"),
        match="is not a prepared dataset",
    )
    assert (tmp_path / "other" / "notes.txt").read_text() == "mine"
    lines = ['{"text": "a b"}'] * 3000 + ['{"text": broken'] + ['{"text": "c d"}'] * 10
    (tmp_path / "el.jsonl").write_text("\n".join(lines) + "\n")
    for procs in ("1", "2"):
        _bad(
            capsys,
            tmp_path,
            str(spec),
            *tok,
            "--cutoff-len",
            "8",
            "--num-proc",
            procs,
            "--shard-mb",
            "1",
            *out,
            match="el.jsonl:3001: malformed JSON",
        )
    assert main(["prepare", str(spec), *tok, "--cutoff-len", "8", *out, "--on-bad-record", "skip"]) == 0
    assert "1 bad records skipped" in capsys.readouterr().out
