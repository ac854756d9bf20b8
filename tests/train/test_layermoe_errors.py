"""Bad LayerMoE inputs stop `moe-lpr train` with exit 2 and one line; bad LayerMoE recipe keys are one-line errors."""

import json
import re

import pytest
from test_layermoe_chain import layermoe_world
from train_helpers import TINY_RECIPES, overrides

from moelpr.cli import main
from moelpr.errors import UserError
from moelpr.train.recipe import load_recipe


@pytest.fixture(scope="module")
def stage1(world, tmp_path_factory):
    """(LayerMoE world dir, a one-step stage-1 model with per-layer counts)."""
    dense, _ = world
    root = layermoe_world(tmp_path_factory.mktemp("layermoe_bad"))
    assert (
        main(
            [
                "train",
                str(TINY_RECIPES / "layermoe_stage1.yaml"),
                *overrides(
                    model=str(dense),
                    corpora=str(root / "g1.yaml"),
                    num_experts=str(root / "g1_allocation.json"),
                    output_dir=str(root / "s1"),
                    max_steps=1,
                ),
            ]
        )
        == 0
    )
    return root, root / "s1"


def _similarity(path, layers):
    path.write_text(
        json.dumps({"num_layers": layers, "per_layer": [{"layer": i, "score": 0.1} for i in range(layers)]})
    )
    return path


@pytest.mark.parametrize("case", ["top_k_too_large", "expand_unfinished", "similarity_layers"])
def test_bad_layermoe_input_exits_2_with_one_line(case, stage1, tmp_path, capsys):
    root, s1 = stage1
    if case == "top_k_too_large":
        recipe, extra = (
            "layermoe_stage2",
            dict(classifier_layers="null", similarity=str(_similarity(tmp_path / "s.json", 2)), classifier_top_k=3),
        )
        message = r"classifier_top_k 3 is larger than the model's 2 MoE layers"
    elif case == "expand_unfinished":
        recipe, extra = "layermoe_g2_stage1", dict(num_experts=str(root / "g2_allocation.json"))
        message = r"lifelong expansion needs a model that finished stage 2; .* is completed_stage 1"
    else:
        recipe, extra = (
            "layermoe_stage2",
            dict(classifier_layers="null", similarity=str(_similarity(tmp_path / "s.json", 3))),
        )
        message = r"the similarity file has 3 layers but the model has 2"
    out = tmp_path / "out"
    rc = main(
        [
            "train",
            str(TINY_RECIPES / f"{recipe}.yaml"),
            *overrides(model=str(s1), corpora=str(root / "all.yaml"), output_dir=str(out), **extra),
        ]
    )
    err = capsys.readouterr().err.strip().splitlines()
    assert rc == 2
    assert len(err) == 1 and err[0].startswith("moe-lpr train: error:"), err
    assert re.search(message, err[0]), err[0]
    assert not out.exists() or not any(out.iterdir())


BASE = {"model": "m", "corpora": "c.yaml", "output_dir": "out"}


@pytest.mark.parametrize(
    "bad, message",
    [
        ({"expand": True, "stage": 2}, "expand: true is lifelong stage 1"),
        ({"expand": True, "num_experts": 4}, "per-layer list of NEW experts or an allocation.json"),
        ({"expand": True, "continue": True, "num_experts": [1, 1]}, "does not combine with continue"),
        ({"expand": "yes"}, "expand must be true or false"),
        ({"classifier_layers": [0, 1]}, "set the LayerMoE classifiers of stage 2"),
        ({"stage": 2, "classifier_top_k": 3}, "also give similarity"),
        ({"stage": 2, "classifier_layers": [0, 1], "similarity": "s.json"}, "not both"),
        ({"stage": 2, "classifier_layers": [1, 1]}, "distinct layer indices"),
        ({"stage": 2, "classifier_layers": [0], "classifier_groups": 1}, "classifier_groups must be an integer ≥ 2"),
        ({"stage": 2, "classifier_pooling": "mean"}, "unknown classifier_pooling 'mean'"),
        ({"stage": 2, "cls_loss_coef": -1}, "cls_loss_coef must be a number"),
    ],
)
def test_bad_layermoe_keys(bad, message):
    with pytest.raises(UserError, match=re.escape(message)):
        load_recipe({**BASE, **bad})


def test_classifier_top_k_defaults_to_seven(tmp_path):
    from transformers import LlamaConfig

    from moelpr.layermoe.training import classifier_layers_from_similarity
    from moelpr.model import MoELPRConfig

    text = LlamaConfig(num_hidden_layers=8, hidden_size=16, intermediate_size=32, num_attention_heads=2)
    config = MoELPRConfig(text_config=text, experts_per_layer=[2] * 7 + [1])  # layer 7 stays dense
    path = tmp_path / "s.json"
    path.write_text(
        json.dumps(
            {
                "num_layers": 8,
                "per_layer": [{"layer": i, "score": s} for i, s in enumerate([0.1, 0.5, 0.3, 0.3, 0.2, 0.4, 0.6, 0.9])],
            }
        )
    )
    assert classifier_layers_from_similarity(path, config, 3) == [1, 5, 6]  # the dense layer 7 is never picked
    assert classifier_layers_from_similarity(path, config, 7) == list(range(7))
    with pytest.raises(UserError, match="classifier_top_k 8 is larger than the model's 7 MoE layers"):
        classifier_layers_from_similarity(path, config, 8)
    assert load_recipe({**BASE, "stage": 2, "similarity": "s.json"}).classifier_top_k is None  # → 7 at train time
