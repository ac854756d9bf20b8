"""`moe-lpr upcycle` / `info` end to end, and their bad-input errors (exit 2, one line, no traceback)."""

import json
import subprocess
import sys

import pytest
from tiny import tiny_model

from moelpr.cli import VERBS, main


@pytest.fixture()
def dense_dir(tmp_path):
    path = tmp_path / "dense"
    tiny_model().save_pretrained(path)
    return path


def test_upcycle_and_info(dense_dir, tmp_path, capsys):
    out = tmp_path / "moe"
    assert (
        main(
            [
                "upcycle",
                "--model",
                str(dense_dir),
                "--num-experts",
                "3",
                "--top-k",
                "2",
                "--layers",
                "0,2",
                "--output",
                str(out),
            ]
        )
        == 0
    )
    config = json.loads((out / "config.json").read_text())
    assert config["experts_per_layer"] == [3, 1, 3]
    assert main(["info", str(out)]) == 0
    text = capsys.readouterr().out
    assert "experts per layer (incl. original): [3, 1, 3]" in text and "stage2: trainable params" in text


def test_upcycle_delta_format(dense_dir, tmp_path):
    out = tmp_path / "moe"
    assert main(["upcycle", "--model", str(dense_dir), "--format", "delta", "--output", str(out)]) == 0
    assert (out / "delta.safetensors").is_file()
    assert main(["info", str(out)]) == 0


@pytest.mark.parametrize(
    "args, message",
    [
        (["--num-experts", "1"], "num_experts must be at least 2"),
        (["--top-k", "9"], "top_k must be between 1"),
        (["--num-experts", "2,2"], "lists 2 counts but the model has 3 layers"),
        (["--layers", "0,5"], "unknown layer index 5"),
    ],
)
def test_upcycle_bad_input_exit_2(dense_dir, tmp_path, capsys, args, message):
    out = tmp_path / "moe"
    assert main(["upcycle", "--model", str(dense_dir), "--output", str(out), *args]) == 2
    err = capsys.readouterr().err.strip()
    assert message in err and len(err.splitlines()) == 1
    assert not out.exists() and [p.name for p in tmp_path.iterdir()] == ["dense"]


def test_missing_and_non_model_directories(tmp_path, capsys):
    assert main(["upcycle", "--model", str(tmp_path / "missing"), "--output", str(tmp_path / "o")]) == 2
    assert "does not exist" in capsys.readouterr().err
    (tmp_path / "empty").mkdir()
    assert main(["info", str(tmp_path / "empty")]) == 2
    assert "not a model directory" in capsys.readouterr().err


def test_unsupported_architecture_from_cli(tmp_path, capsys):
    from transformers import GPT2Config, GPT2LMHeadModel

    GPT2LMHeadModel(GPT2Config(n_layer=2, n_embd=32, n_head=2, vocab_size=64)).save_pretrained(tmp_path / "gpt2")
    assert main(["upcycle", "--model", str(tmp_path / "gpt2"), "--output", str(tmp_path / "o")]) == 2
    assert "unsupported model GPT2LMHeadModel" in capsys.readouterr().err


def test_console_script_no_traceback(tmp_path):
    result = subprocess.run([sys.executable, "-m", "moelpr.cli", "info", str(tmp_path)], capture_output=True, text=True)
    assert result.returncode == 2
    assert "Traceback" not in result.stderr and result.stderr.count("\n") == 1


HEAVY = ("torch", "transformers", "datasets", "numpy", "lm_eval", "matplotlib")


def _light_run(args: list[str]) -> subprocess.CompletedProcess:
    """`moe-lpr ARGS` in a fresh interpreter that fails if it imports a heavy library."""
    code = (
        "import sys\nfrom moelpr.cli import main\ntry:\n    code = main(sys.argv[1:])\nexcept SystemExit as e:\n"
        "    code = e.code\nheavy = [m for m in %r if m in sys.modules]\nassert not heavy, heavy\nsys.exit(code)"
        % (HEAVY,)
    )
    return subprocess.run([sys.executable, "-c", code, *args], capture_output=True, text=True, timeout=120)


@pytest.mark.parametrize("verb", list(VERBS))
def test_every_verb_help_ends_with_an_example_without_importing_torch(verb):
    result = _light_run([verb, "--help"])
    assert result.returncode == 0, result.stderr
    assert result.stdout.rstrip().splitlines()[-1].startswith(f"  moe-lpr {verb} ")  # the example closes the help


def test_top_help_version_and_errors_stay_light():
    assert "VERB" in _light_run(["--help"]).stdout
    version = _light_run(["--version"])
    assert version.returncode == 0 and version.stdout.startswith("moe-lpr ")
    unknown = _light_run(["trian"])
    assert unknown.returncode == 2 and "unknown verb 'trian'" in unknown.stderr
    missing = _light_run(["upcycle", "--output", "x"])  # an argument error, before anything is loaded
    assert missing.returncode == 2 and "--model" in missing.stderr


def test_train_without_a_recipe_says_so(capsys):
    assert main(["train"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "no recipe given; pass a recipe YAML" in err


def test_train_help_lists_recipe_keys():
    help_text = _light_run(["train", "--help"]).stdout
    assert "recipe keys" in help_text and "lpr_loss_coef (float; default 0.1)" in help_text
