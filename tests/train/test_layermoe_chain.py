"""LayerMoE end to end on a tiny Llama: per-layer counts from an allocation.json, stage 2 with classifiers,
and lifelong expansion G0 → G1 → G2 (the earlier groups stay bit-identical through G2's stage 1)."""

import json

import pytest
import torch
import yaml
from train_helpers import TINY_RECIPES, logged, overrides, write_corpora

import moelpr
from moelpr.cli import main
from moelpr.train import load_recipe, train

G1_ALLOCATION = [3, 2]  # experts per layer, expert 0 included: 2 + 1 new
G2_ALLOCATION = [2, 3]  # G2 step: N_l − 1 = 1 + 2 new


def layermoe_world(root):
    """Corpora files: G1 (en, es old; el new, group 1) and all groups (… plus ru, group 2); allocations; similarity."""
    write_corpora(root)
    entries = [
        {"name": lang, "path": f"{lang}.jsonl", "language": lang, "role": role, **extra}
        for lang, role, extra in (
            ("en", "old", {}),
            ("es", "old", {}),
            ("el", "new", {"group": 1}),
            ("ru", "new", {"group": 2}),
        )
    ]
    (root / "g1.yaml").write_text(yaml.safe_dump({"corpora": entries[:3]}))
    (root / "all.yaml").write_text(yaml.safe_dump({"corpora": entries}))
    for name, counts in (("g1_allocation.json", G1_ALLOCATION), ("g2_allocation.json", G2_ALLOCATION)):
        (root / name).write_text(json.dumps({"experts_per_layer": counts}))
    similarity = {"num_layers": 2, "per_layer": [{"layer": 0, "score": 0.05}, {"layer": 1, "score": 0.10}]}
    (root / "similarity.json").write_text(json.dumps(similarity))
    return root


class _KeepFinalState:
    """Trainer callback keeping a copy of the trained model's parameters."""

    def __init__(self):
        from transformers import TrainerCallback

        keeper = self

        class Callback(TrainerCallback):
            def on_train_end(self, args, state, control, model=None, **kwargs):
                keeper.state = {n: p.detach().clone() for n, p in model.named_parameters()}

        self.callback = Callback()


@pytest.fixture(scope="module")
def chain(world, tmp_path_factory):
    dense, _ = world
    root = layermoe_world(tmp_path_factory.mktemp("layermoe"))
    out = {"root": root, "dense": dense}
    keep = _KeepFinalState()
    recipe = load_recipe(
        TINY_RECIPES / "layermoe_stage1.yaml",
        overrides(
            model=str(dense),
            corpora=str(root / "g1.yaml"),
            num_experts=str(root / "g1_allocation.json"),
            output_dir=str(root / "g1_s1"),
        ),
    )
    out["g1_s1"] = train(recipe, callbacks=[keep.callback])
    out["g1_s1_trained"] = keep.state
    steps = [  # (recipe, input, output, corpora, extra overrides)
        (
            "layermoe_stage2",
            "g1_s1",
            "g1_s2",
            "g1.yaml",  # similarity picks the top-1 layer (layer 1)
            dict(classifier_layers="null", similarity=str(root / "similarity.json"), classifier_top_k=1),
        ),
        ("layermoe_g2_stage1", "g1_s2", "g2_s1", "all.yaml", dict(num_experts=str(root / "g2_allocation.json"))),
        ("layermoe_g2_stage2", "g2_s1", "g2_s2", "all.yaml", {}),
    ]
    for name, source, target, corpora, extra in steps:
        assert (
            main(
                [
                    "train",
                    str(TINY_RECIPES / f"{name}.yaml"),
                    *overrides(
                        model=str(root / source), corpora=str(root / corpora), output_dir=str(root / target), **extra
                    ),
                ]
            )
            == 0
        )
        out[target] = root / target
    return out


def _params(path):
    return dict(moelpr.load_model(path).named_parameters())


def test_per_layer_counts_train_and_reload_identically(chain):
    model = moelpr.load_model(chain["g1_s1"])
    assert model.config.experts_per_layer == G1_ALLOCATION and model.config.completed_stage == 1
    assert [b.num_experts for b in moelpr.moe_blocks(model)] == G1_ALLOCATION
    trained = chain["g1_s1_trained"]
    assert set(trained) == {n for n, _ in model.named_parameters()}
    assert all(torch.equal(p, trained[n]) for n, p in model.named_parameters())
    for block in moelpr.moe_blocks(model):
        start = torch.cat([block.original.gate_proj.weight, block.original.up_proj.weight])  # the copies' start
        assert all(not torch.equal(e, start) for e in block.experts[0].gate_up_proj)  # the new experts trained


def test_stage2_with_classifiers_trains_only_routers_and_classifiers(chain):
    before, after_model = _params(chain["g1_s1"]), moelpr.load_model(chain["g1_s2"])
    cfg = after_model.config
    assert cfg.classifier_layers == [1] and cfg.classifier_groups == 2 and cfg.completed_stage == 2  # groups 0, 1
    changed = set()
    for name, param in after_model.named_parameters():
        if ".classifier." in name:
            continue  # new in stage 2
        if not torch.equal(param, before[name]):
            changed.add(name)
    assert changed and all(".routers." in n for n in changed), changed
    assert {n for n, _ in after_model.named_parameters()} - set(before) == {
        "lm.model.layers.1.mlp.classifier.linear.weight"
    }
    first = logged(chain["g1_s2"])[0]
    assert {"lm_loss", "lpr_loss", "cls_loss", "cls_acc"} <= set(first) and first["cls_loss"] > 0
    assert "aux_loss" not in first


def test_lifelong_stage1_keeps_g0_and_g1_bit_identical(chain):
    before, after_model = _params(chain["g1_s2"]), moelpr.load_model(chain["g2_s1"])
    cfg = after_model.config
    assert cfg.expert_groups == [[2, 1], [1, 2]] and cfg.experts_per_layer == [4, 4] and cfg.completed_stage == 1
    after = dict(after_model.named_parameters())
    assert set(before) <= set(after)
    for name, param in before.items():
        assert torch.equal(after[name], param), name  # original, G1 experts, routers.0, classifiers, attention …
    added = set(after) - set(before)
    assert added == {
        f"lm.model.layers.{i}.mlp.{kind}"
        for i in (0, 1)
        for kind in ("experts.1.gate_up_proj", "experts.1.down_proj", "routers.1.weight")
    }
    for i, new in ((0, 1), (1, 2)):
        block = moelpr.moe_blocks(after_model)[i]
        assert block.experts[1].num_experts == new and block.routers[1].weight.shape[0] == new
        start = torch.cat([block.original.gate_proj.weight, block.original.up_proj.weight])  # the copies' start
        assert all(not torch.equal(e, start) for e in block.experts[1].gate_up_proj)  # trained
    limits = moelpr.moe_blocks(after_model)[1].classifier.limits
    assert limits == [1, 4]  # the frozen G1 classifier: its "new" class may now use the G2 experts too
    assert "router_prob/expert_3" in logged(chain["g2_s1"])[0]


def test_lifelong_stage2_trains_routers_and_classifiers_of_all_groups(chain):
    before, after_model = _params(chain["g2_s1"]), moelpr.load_model(chain["g2_s2"])
    cfg = after_model.config
    assert cfg.classifier_layers == [0, 1] and cfg.classifier_groups == 3 and cfg.completed_stage == 2
    assert [b.classifier.limits for b in moelpr.moe_blocks(after_model)] == [[1, 3, 4], [1, 2, 4]]
    changed = {n for n, p in after_model.named_parameters() if n in before and not torch.equal(p, before[n])}
    assert {n.split(".mlp.")[1] for n in changed} <= {
        "routers.0.weight",
        "routers.1.weight",
        "classifier.linear.weight",
    }
    assert any("routers.1" in n for n in changed)
    assert "cls_loss" in logged(chain["g2_s2"])[0]
