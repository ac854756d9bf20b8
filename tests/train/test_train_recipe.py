"""Recipe loading: TrainingArguments keys, overrides, suggestions, validation; every shipped tiny recipe loads."""

import json

import pytest
from train_helpers import TINY_RECIPES

from moelpr.errors import UserError
from moelpr.train.overrides import parse_overrides
from moelpr.train.recipe import Recipe, load_recipe

BASE = {"model": "m", "corpora": "c.yaml", "output_dir": "out"}


def test_training_args_are_collected_and_overrides_win(tmp_path):
    path = tmp_path / "r.yaml"
    path.write_text("model: m\ncorpora: c.yaml\noutput_dir: out\nlearning_rate: 1.0e-4\ncontinue: true\nstage: 1\n")
    recipe = load_recipe(
        path, ["--learning_rate", "3e-4", "--max_steps", "7", "--bf16", "--layers", "[0, 1]", "--num-experts=6"]
    )
    assert recipe.training_args == {"output_dir": "out", "learning_rate": 3e-4, "max_steps": 7, "bf16": True}
    assert recipe.continue_ is True and recipe.layers == [0, 1] and recipe.num_experts == 6
    assert recipe.save_format == "full" and recipe.aux_loss_coef == 0.01 and recipe.lpr_loss_coef == 0.1
    assert recipe.to_dict()["continue"] is True and recipe.to_dict()["learning_rate"] == 3e-4


def test_overrides_are_read_as_the_key_expects():
    assert parse_overrides(["--a", "1", "--b", "true", "--c=[1, 2]", "--e"]) == {
        "a": "1",
        "b": "true",
        "c": "[1, 2]",
        "e": True,
    }
    with pytest.raises(UserError, match="overrides look like"):
        parse_overrides(["stray"])
    overrides = ["--max_steps", "5", "--bf16", "true", "--layers", "[0, 1]", "--save_strategy", "no"]
    overrides += ["--run_name", "123", "--report_to", "none", "--learning_rate", "3e-4", "--continue"]
    recipe = load_recipe(BASE, overrides)
    assert recipe.training_args["max_steps"] == 5 and recipe.training_args["bf16"] is True
    assert recipe.training_args["learning_rate"] == 3e-4 and recipe.layers == [0, 1] and recipe.continue_ is True
    # YAML would make these false / 123 / None: the keys expect text, so the text stays
    assert recipe.training_args["save_strategy"] == "no"
    assert recipe.training_args["run_name"] == "123" and recipe.training_args["report_to"] == "none"


def test_train_help_lists_every_recipe_key_with_type_and_default():
    from moelpr.train.overrides import recipe_help

    text = recipe_help()
    assert "lpr_loss_coef (float; default 0.1): Weight of the LPR loss (stage 2)" in text
    assert "model (str; required)" in text and "continue (bool; default False)" in text
    assert "moe_dispatch (str; default 'auto')" in text


def test_misspelt_key_gets_a_suggestion():
    with pytest.raises(UserError, match=r"unknown recipe key 'lerning_rate'; did you mean 'learning_rate'\?"):
        load_recipe({**BASE, "lerning_rate": 1e-4})
    with pytest.raises(UserError, match="did you mean 'lpr_loss_coef'"):
        load_recipe({**BASE, "lpr_los_coef": 0.1})


@pytest.mark.parametrize(
    "bad, message",
    [
        ({"method": "moelpr"}, "unknown method"),
        ({"stage": 3}, "stage must be 1 or 2"),
        ({"method": "full", "stage": 2}, "stage 2 exists only for method: moe"),
        ({"method": "full", "save_format": "delta"}, "save_format: delta is only for method: moe"),
        ({"lpr_loss_form": "double"}, "unknown lpr_loss_form"),
        ({"cutoff_len": 0}, "cutoff_len must be a positive integer"),
        ({"aux_loss_coef": -1}, "aux_loss_coef must be a number"),
        ({"output_dir": None}, "needs output_dir"),
        ({"streaming": True}, "streaming: true needs max_steps"),
    ],
)
def test_validation_one_liners(bad, message):
    with pytest.raises(UserError, match=message) as err:
        load_recipe({**BASE, **bad})
    assert "\n" not in str(err.value)


def test_num_experts_from_allocation_json(tmp_path):
    alloc = tmp_path / "allocation.json"
    alloc.write_text(json.dumps({"experts_per_layer": [2, 3]}))
    assert load_recipe({**BASE, "num_experts": str(alloc)}).experts_per_layer() == [2, 3]
    with pytest.raises(UserError, match="does not exist"):
        load_recipe({**BASE, "num_experts": str(tmp_path / "none.json")}).experts_per_layer()


@pytest.mark.parametrize("name", ["stage1", "stage2", "full", "lora", "llama_pro"])
def test_shipped_tiny_recipes_validate(name):
    path = TINY_RECIPES / f"{name}.yaml"
    assert path.read_text().startswith("# moe-lpr train recipes/tiny/")
    assert isinstance(load_recipe(path), Recipe)
