"""`moe-lpr eval` end to end on tiny saved models; bad inputs exit 2 with one line."""

import json

import pytest
import yaml

from moelpr.cli import main


def _eval(capsys, *args):
    code = main(["eval", *map(str, args), "--no-progress"])
    return code, capsys.readouterr()


def test_eval_writes_results_with_routing_for_an_moe_model(tmp_path, capsys, moe_dir, corpora_file):
    out = tmp_path / "runs" / "moe-lpr.json"
    code, io = _eval(
        capsys, "--model", moe_dir, "--corpora", corpora_file, "--output", out, "--max-docs", 2, "--batch-size", 3
    )
    assert code == 0, io.err
    results = json.loads(out.read_text())
    assert results["method"] == "moe-lpr" and results["languages"] == {"old": ["en", "es"], "new": ["el", "hu"]}
    assert set(results["ppl"]) == set(results["bpb"]) == {"en", "es", "el", "hu"}
    assert results["docs"]["en"] == 2 and results["context_len"] == 24
    routing = results["routing"]["el"]
    assert routing["layers"] == [0, 1] and len(routing["mean_prob"]) == 2 and len(routing["mean_prob"][0]) == 3
    assert all(0.0 <= share <= 1.0 for share in routing["top_k_has_expert0"])
    assert results["avg"]["new"]["bpb"] == pytest.approx((results["bpb"]["el"] + results["bpb"]["hu"]) / 2)
    assert "wrote" in io.out


def test_eval_dense_model_has_no_routing(tmp_path, capsys, dense_dir, corpora_file):
    out = tmp_path / "base.json"
    code, io = _eval(
        capsys, "--model", dense_dir, "--corpora", corpora_file, "--output", out, "--max-tokens", 20, "--method", "base"
    )
    assert code == 0, io.err
    results = json.loads(out.read_text())
    assert results["method"] == "base" and "routing" not in results
    assert all(n <= 20 for n in results["tokens"].values())


def test_eval_bad_inputs_exit_2(tmp_path, capsys, dense_dir, corpora_file):
    out = tmp_path / "r.json"
    code, io = _eval(capsys, "--model", tmp_path / "missing", "--corpora", corpora_file, "--output", out)
    assert code == 2 and "does not exist" in io.err and io.err.count("\n") == 1
    code, io = _eval(capsys, "--model", dense_dir, "--corpora", tmp_path / "nope.yaml", "--output", out)
    assert code == 2 and "corpora file" in io.err
    empty = tmp_path / "empty.jsonl"
    empty.write_text(json.dumps({"text": ""}) + "\n" + json.dumps({"text": " "}) + "\n")
    spec = tmp_path / "bad.yaml"
    spec.write_text(yaml.safe_dump([{"name": "tr", "path": str(empty), "language": "tr", "role": "new"}]))
    code, io = _eval(capsys, "--model", dense_dir, "--corpora", spec, "--output", out)
    assert code == 2 and "'tr'" in io.err and io.err.count("\n") == 1
    code, io = _eval(capsys, "--model", dense_dir, "--corpora", corpora_file, "--output", out, "--max-docs", 0)
    assert code == 2 and "--max-docs" in io.err
    assert not out.exists()
