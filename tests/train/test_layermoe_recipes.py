"""The shipped LayerMoE recipes carry the scripts' values (docs/method.md §4) and name files that exist."""

import json
from pathlib import Path

import yaml

from moelpr.data.corpus import load_corpora
from moelpr.train.recipe import load_recipe

REPO = Path(__file__).resolve().parents[2]
LAYERMOE = REPO / "recipes" / "layermoe"
G1 = [5, 4, 3, 5, 4, 3, 2, 3, 3, 2, 2, 2, 2, 2, 2, 2, 2, 3, 3, 4, 4, 4, 3, 3]
G0_G1_G2 = [10, 8, 6, 9, 8, 5, 3, 5, 5, 4, 3, 3, 3, 3, 3, 3, 3, 5, 5, 6, 6, 6, 4, 4]


def _raw(name):
    return yaml.safe_load((LAYERMOE / f"qwen1.5-1.8b_{name}.yaml").read_text())


def test_g1_and_g2_expert_counts():
    allocation = json.loads((LAYERMOE / "qwen1.5-1.8b_g1_allocation.json").read_text())
    assert allocation["experts_per_layer"] == G1 and sum(G1) == 72
    assert (REPO / _raw("g1_stage1")["num_experts"]) == LAYERMOE / "qwen1.5-1.8b_g1_allocation.json"
    additions = _raw("g2_stage1")["num_experts"]
    assert sum(additions) == 48 and [a + b for a, b in zip(G1, additions)] == G0_G1_G2


def test_stages_and_batches():
    expected = {  # name: (stage, expand, classifier layers, per-device × accumulation × 8 GPUs, cutoff)
        "g1_stage1": (1, False, None, 512, 1024),
        "g1_stage2": (2, False, [5, 6, 10, 11, 12, 13, 23], 768, 512),
        "g2_stage1": (1, True, None, 512, 1024),
        "g2_stage2": (2, False, [6, 10, 11, 12, 23], 640, 512),
    }
    for name, (stage, expand, layers, batch, cutoff) in expected.items():
        recipe = load_recipe(LAYERMOE / f"qwen1.5-1.8b_{name}.yaml")
        raw = _raw(name)
        assert (recipe.stage, recipe.expand, recipe.classifier_layers, recipe.cutoff_len) == (
            stage,
            expand,
            layers,
            cutoff,
        )
        assert raw["per_device_train_batch_size"] * raw["gradient_accumulation_steps"] * 8 == batch, name
        assert (raw["learning_rate"], raw["lr_scheduler_type"], raw["num_train_epochs"]) == (5e-5, "cosine", 1)
        if stage == 2:
            assert (recipe.lpr_loss_coef, recipe.cls_loss_coef, recipe.classifier_pooling) == (0.1, 0.1, "sequence")
        else:
            assert (recipe.aux_loss_coef, recipe.top_k) == (0.01, 2)


def test_lifelong_corpora_groups(tmp_path):
    def groups(name):
        spec = yaml.safe_load((REPO / "recipes" / "corpora" / name).read_text())
        for entry in spec["corpora"]:  # placeholder paths: point them at one tiny file
            entry["path"] = str(tmp_path / "x.jsonl")
        (tmp_path / "x.jsonl").write_text('{"text": "x"}\n')
        return {c.language: c.group for c in load_corpora(spec)}

    assert groups("layermoe_g2_bn_hi_ne.yaml") == {"bn": 2, "hi": 2, "ne": 2}
    assert groups("layermoe_g2_review.yaml") == {
        "en": 0,
        "zh": 0,
        "es": 0,
        "el": 1,
        "hu": 1,
        "tr": 1,
        "bn": 2,
        "hi": 2,
        "ne": 2,
    }
    for name in ("g1_stage1", "g1_stage2", "g2_stage1", "g2_stage2"):
        assert (REPO / _raw(name)["corpora"]).is_file(), name
