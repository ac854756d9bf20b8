"""Stage 1 and 2 end to end on a tiny Llama: what moves, what stays, and what stage 2 achieves."""

import pytest
import torch
from train_helpers import TINY_RECIPES, logged, overrides, sentences

import moelpr
from moelpr.cli import main

S1 = dict(max_steps=12, learning_rate=1e-2)
S2 = dict(max_steps=30, learning_rate=5e-2, lpr_loss_coef=0.5)


@pytest.fixture(scope="module")
def stages(world, tmp_path_factory):
    """Run stage 1 then stage 2 once for this module; returns (dense dir, stage-1 dir, stage-2 dir)."""
    dense, corpora = world
    out = tmp_path_factory.mktemp("stages")
    common = overrides(corpora=str(corpora))
    assert (
        main(
            [
                "train",
                str(TINY_RECIPES / "stage1.yaml"),
                "--model",
                str(dense),
                "--output_dir",
                str(out / "s1"),
                *common,
                *overrides(**S1),
            ]
        )
        == 0
    )
    assert (
        main(
            [
                "train",
                str(TINY_RECIPES / "stage2.yaml"),
                "--model",
                str(out / "s1"),
                "--output_dir",
                str(out / "s2"),
                *common,
                *overrides(**S2),
            ]
        )
        == 0
    )
    return dense, out / "s1", out / "s2"


def _dense_name(moe_name: str) -> str:
    return moe_name.removeprefix("lm.").replace(".mlp.original.", ".mlp.")


def test_stage1_keeps_every_original_parameter_and_moves_new_experts(stages):
    dense_dir, s1, _ = stages
    dense = dict(moelpr.load_model(dense_dir).named_parameters())
    moe = moelpr.load_model(s1)
    assert isinstance(moe, moelpr.MoELPRForCausalLM)
    moved = 0
    for name, param in moe.named_parameters():
        if ".experts." in name or ".routers." in name:
            continue
        assert torch.equal(param, dense[_dense_name(name)]), name  # bit-identical
    for block in moelpr.moe_blocks(moe):
        orig = block.original
        start = torch.cat([orig.gate_proj.weight, orig.up_proj.weight])  # (2I, H): what the copies started as
        for expert in block.experts[0].gate_up_proj:
            assert not torch.equal(expert, start)
            moved += 1
    assert moved == 2 * 3  # 2 layers × 3 new experts
    assert (s1 / "train_metrics.json").is_file() and (s1 / "moelpr_delta.json").is_file()
    first = logged(s1)[0]
    assert {"lm_loss", "aux_loss", "router_prob/expert_0", "router_prob/expert_3"} <= set(first)
    assert "lpr_loss" not in first


def test_stage2_moves_only_routers(stages):
    _, s1, s2 = stages
    before = dict(moelpr.load_model(s1).named_parameters())
    after = moelpr.load_model(s2)
    for name, param in after.named_parameters():
        same = torch.equal(param, before[name])
        assert same != (".routers." in name), name
    assert {"lm_loss", "lpr_loss", "router_prob0_old"} <= set(logged(s2)[0])
    assert after.config.aux_loss_coef == 0 and after.config.lpr_loss_coef == S2["lpr_loss_coef"]


@torch.no_grad()
def _evaluate(model_dir, langs, old: bool):
    """(mean expert-0 router probability over MoE layers and tokens, LM loss) on held-out text."""
    model = moelpr.load_model(model_dir).eval()
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(model_dir)
    ids = [i for lang in langs for t in sentences(lang, 12, seed=99) for i in tok(t)["input_ids"] + [tok.eos_token_id]]
    ids = torch.tensor(ids[: (len(ids) // 32) * 32]).view(-1, 32)  # (B, 32)
    out = model(input_ids=ids, labels=ids, output_router_logits=True, lang_mask=torch.full_like(ids, int(old)))
    p0 = torch.stack([logits.softmax(-1)[:, 0].mean() for logits in out.router_logits]).mean()
    return p0.item(), out.lm_loss.item()


def test_stage2_routes_old_languages_to_expert0_without_hurting_new(stages):
    _, s1, s2 = stages
    p0_before, _ = _evaluate(s1, ["en", "es"], old=True)
    p0_after, _ = _evaluate(s2, ["en", "es"], old=True)
    _, new_before = _evaluate(s1, ["el", "ru"], old=False)
    _, new_after = _evaluate(s2, ["el", "ru"], old=False)
    assert p0_before < 0.5 and p0_after >= 0.8, (p0_before, p0_after)
    assert abs(new_after - new_before) / new_before <= 0.02, (new_before, new_after)


def test_full_baseline_trains_the_dense_model(world, tmp_path):
    dense, corpora = world
    out = tmp_path / "full"
    assert (
        main(
            [
                "train",
                str(TINY_RECIPES / "full.yaml"),
                "--model",
                str(dense),
                "--corpora",
                str(corpora),
                "--output_dir",
                str(out),
                "--max_steps",
                "2",
            ]
        )
        == 0
    )
    model = moelpr.load_model(out)
    assert not isinstance(model, moelpr.MoELPRForCausalLM)
    base = dict(moelpr.load_model(dense).named_parameters())
    assert all(not torch.equal(p, base[n]) for n, p in model.named_parameters() if n.endswith("q_proj.weight"))
    assert "lm_loss" in logged(out)[0]


@pytest.mark.parametrize("method", ["lora", "llama_pro"])
def test_lora_and_llama_pro_baselines_run(world, tmp_path, method):
    dense, corpora = world
    out = tmp_path / method
    assert (
        main(
            [
                "train",
                str(TINY_RECIPES / f"{method}.yaml"),
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
    model = moelpr.load_model(out)  # a plain dense model (LoRA merged; LLaMA-Pro with its added block)
    layers = model.config.num_hidden_layers
    assert layers == (3 if method == "llama_pro" else 2)
    assert "lm_loss" in logged(out)[0]
