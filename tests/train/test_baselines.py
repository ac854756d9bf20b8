"""Baselines: LLaMA-Pro expansion is an identity at init and round-trips; LoRA merges; bad input is a UserError."""

from __future__ import annotations

import pytest
import torch
from tiny import COMMON, CONFIGS, tiny_ids, tiny_model
from transformers import AutoModelForCausalLM

from moelpr import UserError, upcycle
from moelpr.baselines import add_llama_pro_blocks, add_lora, llama_pro_positions, save_merged_lora


def _model(arch: str, layers: int = 4):
    """A tiny model with `layers` layers, built so that per-layer config lists (layer_types) match."""
    torch.manual_seed(0)
    extra = {"head_dim": 16} if arch in ("gemma2", "qwen3") else {"pad_token_id": 0} if arch == "phi3" else {}
    config = type(CONFIGS[arch]())(**{**COMMON, "num_hidden_layers": layers}, **extra)
    return AutoModelForCausalLM.from_config(config).eval()


def _logits(model, ids):
    with torch.no_grad():
        return model(input_ids=ids).logits


@pytest.mark.parametrize("arch", ["llama", "qwen2", "gemma2", "phi3"])
def test_llama_pro_expansion_is_identity_and_trains_only_new_blocks(arch):
    model = _model(arch)
    if arch == "gemma2":  # alternating sliding/full attention: the per-layer list must be expanded too
        assert model.config.layer_types[:2] == ["sliding_attention", "full_attention"]
    ids = tiny_ids()
    before = _logits(model, ids)
    kinds = list(getattr(model.config, "layer_types", None) or [])
    model = add_llama_pro_blocks(model, blocks=2)

    layers = model.model.layers
    assert len(layers) == model.config.num_hidden_layers == 6
    assert model.config.llama_pro_added_layers == [2, 5]
    assert [getattr(l.self_attn, "layer_idx", i) for i, l in enumerate(layers)] == list(range(6))
    if kinds:
        assert model.config.layer_types == [kinds[0], kinds[1], kinds[1], kinds[2], kinds[3], kinds[3]]
    assert (_logits(model, ids) - before).abs().max().item() <= 1e-5

    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable and all(n.startswith(("model.layers.2.", "model.layers.5.")) for n in trainable)
    assert trainable == {n for n, _ in model.named_parameters() if n.startswith(("model.layers.2.", "model.layers.5."))}
    model.train()
    model(input_ids=ids, labels=ids).loss.backward()
    assert all(p.grad is None for n, p in model.named_parameters() if n not in trainable)
    assert model.model.layers[2].self_attn.o_proj.weight.grad.abs().sum() > 0


def test_llama_pro_generate_with_cache_matches_dense():
    dense = _model("qwen2")
    ids = tiny_ids(batch=1, seq=6)
    kwargs = dict(max_new_tokens=8, do_sample=False, pad_token_id=0)
    expected = dense.generate(ids, **kwargs)
    model = add_llama_pro_blocks(_model("qwen2"), every=1)
    assert model.config.num_hidden_layers == 8
    cached = model.generate(ids, use_cache=True, **kwargs)
    uncached = model.generate(ids, use_cache=False, **kwargs)
    assert torch.equal(cached, expected) and torch.equal(uncached, expected)


def test_llama_pro_save_reload_round_trip(tmp_path):
    model = add_llama_pro_blocks(_model("gemma2"), blocks=2)
    with torch.no_grad():  # as after training: the new blocks are no longer identities
        for p in model.model.layers[2].parameters():
            p.add_(0.01 * torch.randn_like(p))
    ids = tiny_ids()
    expected = _logits(model, ids)
    model.save_pretrained(tmp_path / "out")  # what moelpr.train.methods saves for llama_pro
    assert not list((tmp_path / "out").glob("*.bin")) and list((tmp_path / "out").glob("*.safetensors"))
    reloaded = AutoModelForCausalLM.from_pretrained(tmp_path / "out").eval()
    assert reloaded.config.num_hidden_layers == 6 and len(reloaded.model.layers) == 6
    assert (_logits(reloaded, ids) - expected).abs().max().item() <= 1e-6


def test_lora_merge_round_trip(tmp_path):
    from moelpr import load_model

    model = add_lora(tiny_model("llama"))
    trainable = [n for n, p in model.named_parameters() if p.requires_grad]
    assert trainable and all(".lora_" in n for n in trainable)
    targets = {n.split(".lora_")[0].rsplit(".", 1)[-1] for n in trainable}
    assert targets == {"q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"}
    assert model.peft_config["default"].r == 8 and model.peft_config["default"].lora_alpha == 16
    with torch.no_grad():  # lora_B starts at zero; make the adapter matter
        for n, p in model.named_parameters():
            if "lora_B" in n:
                p.normal_(0, 0.05)
    ids = tiny_ids()
    expected = _logits(model, ids)
    merged = save_merged_lora(model, tmp_path / "out")
    assert not hasattr(merged, "peft_config")
    assert (tmp_path / "out" / "adapter" / "adapter_model.safetensors").is_file()
    assert not list((tmp_path / "out").rglob("*.bin"))
    reloaded = load_model(tmp_path / "out").eval()
    assert type(reloaded).__name__ == "LlamaForCausalLM"
    assert (_logits(reloaded, ids) - expected).abs().max().item() <= 1e-5


def test_positions():
    assert llama_pro_positions(24, blocks=12) == list(range(1, 24, 2)) == llama_pro_positions(24, every=2)
    assert llama_pro_positions(32, blocks=8) == [3, 7, 11, 15, 19, 23, 27, 31]
    assert llama_pro_positions(5, blocks=2) == [1, 4]
    assert llama_pro_positions(3, blocks=3) == [0, 1, 2]
    assert llama_pro_positions(5, every=2) == [1, 3]


@pytest.mark.parametrize(
    "build, kwargs, message",
    [
        (add_llama_pro_blocks, {}, "exactly one of"),
        (add_llama_pro_blocks, {"blocks": 2, "every": 1}, "exactly one of"),
        (add_llama_pro_blocks, {"blocks": 4}, "between 1 and the model's 3 layers"),
        (add_llama_pro_blocks, {"every": 0}, "llama_pro_every must be"),
        (add_llama_pro_blocks, {"blocks": 1.5}, "llama_pro_blocks must be"),
        (add_lora, {"rank": 0}, "lora_rank must be"),
        (add_lora, {"target": "no_such_proj"}, "lora_target"),
    ],
)
def test_bad_arguments_are_one_line_user_errors(build, kwargs, message):
    with pytest.raises(UserError, match=message) as err:
        build(tiny_model("llama"), **kwargs)
    assert "\n" not in str(err.value)


def test_rejects_upcycled_and_wrong_kind_models(tmp_path):
    with pytest.raises(UserError, match="upcycled"):
        add_lora(upcycle(tiny_model("llama"), num_experts=2))
    with pytest.raises(UserError, match="needs a peft LoRA model"):
        save_merged_lora(tiny_model("llama"), tmp_path / "x")
    assert not (tmp_path / "x").exists()
