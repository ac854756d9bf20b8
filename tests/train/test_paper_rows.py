"""The papers' rows beside MoE-LPR: the one-stage "MoE", LoRAMoE and "w/o Expert-Copy", through `moe-lpr train`;
and the router-convergence monitor of stage 2."""

from __future__ import annotations

import json
import logging

import pytest
import torch
from tiny import tiny_ids, tiny_model
from train_helpers import TINY_RECIPES, logged, overrides

import moelpr
from moelpr.train import load_recipe, train


def _run(world, out, name, **kw):
    dense, corpora = world
    keys = {"model": str(dense), "corpora": str(corpora), "output_dir": str(out), **kw}
    return train(load_recipe(TINY_RECIPES / name, overrides(**keys)))


def _dense_name(moe_name: str) -> str:
    return moe_name.removeprefix("lm.").replace(".mlp.original.", ".mlp.")


def test_moe_one_stage_trains_every_parameter_on_new_and_replay_data(world, tmp_path):
    out = _run(world, tmp_path / "one", "moe_one_stage.yaml")
    dense = dict(moelpr.load_model(world[0]).named_parameters())
    moe = moelpr.load_model(out)
    assert isinstance(moe, moelpr.MoELPRForCausalLM) and moe.config.completed_stage == 1
    params = dict(moe.named_parameters())
    for name in (
        "lm.model.embed_tokens.weight",
        "lm.model.layers.0.self_attn.q_proj.weight",
        "lm.model.layers.1.mlp.original.down_proj.weight",
    ):
        assert not torch.equal(params[name], dense[_dense_name(name)]), name  # frozen in MoE-LPR, trained here
    first = logged(out)[0]
    assert "aux_loss" in first and "router_prob0_old" in first  # the replay's old-language tokens were trained on


def test_loramoe_trains_only_lora_experts_and_routers_and_reloads_exactly(world, tmp_path):
    out = _run(world, tmp_path / "loramoe", "loramoe.yaml")
    dense = dict(moelpr.load_model(world[0]).named_parameters())
    model = moelpr.load_model(out)
    assert model.config.loramoe == {"experts": 4, "rank": 4, "alpha": 8}
    moved = 0
    for name, param in model.named_parameters():
        if ".lora_" in name:
            moved += not torch.equal(param, torch.zeros_like(param))
            continue
        assert torch.equal(param, dense[_dense_name(name).replace(".base.", ".")]), name  # backbone untouched
    assert moved >= 2 * 3 * 2  # lora_B (zero at init) and the routers moved in every linear of both layers
    ids = tiny_ids(seed=4) % 100
    again = moelpr.load_model(out)
    with torch.no_grad():
        assert torch.equal(again(input_ids=ids).logits, model(input_ids=ids).logits)


def test_loramoe_equals_the_dense_model_at_init_and_mixes_all_experts():
    dense = tiny_model()
    ids = tiny_ids()
    with torch.no_grad():
        before = dense(input_ids=ids).logits
    model = moelpr.loramoe(dense, num_experts=3, rank=2, alpha=4)
    with torch.no_grad():
        assert torch.equal(model(input_ids=ids).logits, before)  # B = 0: the LoRA delta is exactly zero
    linear = model.lm.model.layers[0].mlp.down_proj
    with torch.no_grad():
        linear.lora_B.normal_()
    x = torch.randn(5, linear.base.in_features)
    gates = linear.lora_router(x).softmax(-1)  # (5, E)
    expected = linear.base(x) + linear.scaling * sum(
        gates[:, e : e + 1] * (x @ linear.lora_A[2 * e : 2 * e + 2].t() @ linear.lora_B[:, 2 * e : 2 * e + 2].t())
        for e in range(3)
    )
    torch.testing.assert_close(linear(x), expected)
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable and all(n.endswith(("lora_A", "lora_B", "lora_router.weight")) for n in trainable)
    with pytest.raises(moelpr.UserError, match="lora_rank"):
        moelpr.loramoe(tiny_model(), num_experts=2, rank=0)


def test_no_copy_stage1_starts_from_random_experts(world, tmp_path):
    out = _run(world, tmp_path / "nocopy", "stage1.yaml", expert_init="random", max_steps=1, save_format="full")
    moe = moelpr.load_model(out)
    assert moe.config.expert_init == "random"
    block = moelpr.moe_blocks(moe)[0]
    start = torch.cat([block.original.gate_proj.weight, block.original.up_proj.weight])  # (2I, H)
    assert (block.experts[0].gate_up_proj[0] - start).abs().mean() > 0.01  # not a (trained) copy


@pytest.fixture(scope="module")
def stage1(world, tmp_path_factory):
    return _run(world, tmp_path_factory.mktemp("monitor") / "s1", "stage1.yaml", max_steps=4)


def test_router_convergence_is_logged_per_layer_and_role_and_warns(world, stage1, tmp_path, caplog):
    with caplog.at_level(logging.WARNING, logger="moelpr.train.run"):
        out = _run(world, tmp_path / "s2", "stage2.yaml", model=str(stage1), max_steps=3, router_warning_threshold=0.0)
    entry = logged(out)[-1]
    for role in ("old", "new"):
        for stat in ("expert0_prob", "expert0_in_topk", "expert0_weight"):
            for layer in (0, 1):
                assert 0.0 <= entry[f"router/layer_{layer}/{role}/{stat}"] <= 1.0
    report = json.loads((out / "train_metrics.json").read_text())["router_convergence"]
    assert report["layers"] == [0, 1] and report["threshold"] == 0.0
    assert set(report) >= {"old", "new", "unconverged_layers"} and report["old"]["tokens"] > 0
    assert report["unconverged_layers"] == [l for l, w in zip([0, 1], report["old"]["expert0_weight"]) if w < 1.0]
    warnings = [r.getMessage() for r in caplog.records if "router convergence" in r.getMessage()]
    final = [w for w in warnings if "train_metrics.json: router_convergence" in w]  # the end-of-run summary
    assert len(final) == 1 and "MoE layer(s) 0" in final[0]
    assert any(w.startswith("router convergence at step 2 (training tokens)") for w in warnings)  # while training
    # the mean over layers of the per-layer probabilities is the existing summary figure of the same window
    assert entry["router_prob0_old"] == pytest.approx(
        sum(entry[f"router/layer_{l}/old/expert0_prob"] for l in (0, 1)) / 2, rel=1e-5
    )

    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="moelpr.train.run"):
        _run(world, tmp_path / "quiet", "stage2.yaml", model=str(stage1), max_steps=1, router_warning_threshold=1.0)
    assert not [r for r in caplog.records if "router convergence" in r.getMessage()]


def test_stage1_has_no_old_role_and_no_warning(stage1):
    report = json.loads((stage1 / "train_metrics.json").read_text())["router_convergence"]
    assert "old" not in report and report["new"]["tokens"] > 0 and report["unconverged_layers"] == []
