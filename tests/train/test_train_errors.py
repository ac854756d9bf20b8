"""Every bad input stops `moe-lpr train` with exit 2, one line, and nothing written to the output directory."""

import json

import pytest
import yaml
from train_helpers import TINY_RECIPES

from moelpr.cli import main


def _corpora(tmp_path, entries):
    path = tmp_path / "bad.yaml"
    path.write_text(yaml.safe_dump({"corpora": entries}))
    return path


def _entry(tmp_path, name, lines, role="new", language="el"):
    path = tmp_path / f"{name}.jsonl"
    path.write_text("".join(line + "\n" for line in lines))
    return {"name": name, "path": path.name, "language": language, "role": role}


GOOD = json.dumps({"text": "γειά σου κόσμε"})


@pytest.fixture(scope="module")
def upcycled(world, tmp_path_factory):
    out = tmp_path_factory.mktemp("bad") / "s1"
    dense, corpora = world
    assert (
        main(
            [
                "train",
                str(TINY_RECIPES / "stage1.yaml"),
                "--model",
                str(dense),
                "--corpora",
                str(corpora),
                "--output_dir",
                str(out),
                "--max_steps",
                "1",
            ]
        )
        == 0
    )
    return out


def _case(name, tmp_path, world, upcycled):
    dense, corpora = world
    if name == "malformed_json":
        return (
            "stage1",
            dense,
            _corpora(tmp_path, [_entry(tmp_path, "el", [GOOD, "{oops", GOOD])]),
            [],
            r"el\.jsonl:2: malformed JSON",
        )
    if name == "missing_text_field":
        return (
            "stage1",
            dense,
            _corpora(tmp_path, [_entry(tmp_path, "el", [GOOD, json.dumps({"txt": "x"})])]),
            [],
            "text",
        )
    if name == "empty_corpus":
        return "stage1", dense, _corpora(tmp_path, [_entry(tmp_path, "el", [])]), [], "no documents"
    if name == "unknown_role":
        return (
            "stage1",
            dense,
            _corpora(tmp_path, [_entry(tmp_path, "el", [GOOD], role="added")]),
            [],
            "unknown role 'added'",
        )
    if name == "stage2_no_old":
        return "stage2", upcycled, _corpora(tmp_path, [_entry(tmp_path, "el", [GOOD])]), [], "no corpus has role: old"
    if name == "stage2_dense":
        return "stage2", dense, corpora, [], "stage 2 needs a stage-1 MoE-LPR model; got a dense model"
    if name == "stage1_upcycled":
        return "stage1", upcycled, corpora, [], "already an MoE-LPR model.*continue: true"
    if name == "misspelt_key":
        return "stage1", dense, corpora, ["--lerning_rate", "1e-3"], "did you mean 'learning_rate'"
    if name == "stage1_no_new":
        return (
            "stage1",
            dense,
            _corpora(tmp_path, [_entry(tmp_path, "en", [GOOD], role="old", language="en")]),
            [],
            "no corpus has role: new",
        )
    raise AssertionError(name)


@pytest.mark.parametrize(
    "name",
    [
        "malformed_json",
        "missing_text_field",
        "empty_corpus",
        "unknown_role",
        "stage2_no_old",
        "stage2_dense",
        "stage1_upcycled",
        "misspelt_key",
        "stage1_no_new",
    ],
)
def test_bad_input_exits_2_with_one_line(name, tmp_path, world, upcycled, capsys):
    import re

    recipe, model, corpora, extra, message = _case(name, tmp_path, world, upcycled)
    out = tmp_path / "out"
    rc = main(
        [
            "train",
            str(TINY_RECIPES / f"{recipe}.yaml"),
            "--model",
            str(model),
            "--corpora",
            str(corpora),
            "--output_dir",
            str(out),
            "--max_steps",
            "1",
            *extra,
        ]
    )
    err = capsys.readouterr().err.strip().splitlines()
    assert rc == 2
    assert len(err) == 1 and err[0].startswith("moe-lpr train: error:"), err
    assert re.search(message, err[0]), err[0]
    assert not out.exists() or not any(out.iterdir())
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".out.")]  # no temporary leftovers


def test_existing_output_is_not_overwritten(world, upcycled, capsys):
    dense, corpora = world
    rc = main(
        [
            "train",
            str(TINY_RECIPES / "stage1.yaml"),
            "--model",
            str(dense),
            "--corpora",
            str(corpora),
            "--output_dir",
            str(upcycled),
            "--max_steps",
            "1",
        ]
    )
    assert rc == 2 and "already holds a trained model" in capsys.readouterr().err
