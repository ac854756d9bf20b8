"""Baselines: LLaMA-Pro expansion is an identity at init and round-trips; LoRA merges; bad input is a UserError."""

from __future__ import annotations

import pytest
import torch
from tiny import COMMON, CONFIGS, tiny_ids, tiny_model
from transformers import AutoModelForCausalLM

from moelpr import UserError, upcycle
from moelpr.train.baselines import llama_pro_positions, prepare_baseline, save_baseline


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
    model = prepare_baseline("llama_pro", model, llama_pro_blocks=2, verbose=False)

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
    model = prepare_baseline("llama_pro", _model("qwen2"), llama_pro_every=1, verbose=False)
    assert model.config.num_hidden_layers == 8
    cached = model.generate(ids, use_cache=True, **kwargs)
    uncached = model.generate(ids, use_cache=False, **kwargs)
    assert torch.equal(cached, expected) and torch.equal(uncached, expected)


def test_llama_pro_save_reload_round_trip(tmp_path):
    model = prepare_baseline("llama_pro", _model("gemma2"), llama_pro_blocks=2, verbose=False)
    with torch.no_grad():  # as after training: the new blocks are no longer identities
        for p in model.model.layers[2].parameters():
            p.add_(0.01 * torch.randn_like(p))
    ids = tiny_ids()
    expected = _logits(model, ids)
    save_baseline("llama_pro", model, tmp_path / "out")
    assert not list((tmp_path / "out").glob("*.bin")) and list((tmp_path / "out").glob("*.safetensors"))
    reloaded = AutoModelForCausalLM.from_pretrained(tmp_path / "out").eval()
    assert reloaded.config.num_hidden_layers == 6 and len(reloaded.model.layers) == 6
    assert (_logits(reloaded, ids) - expected).abs().max().item() <= 1e-6


def test_lora_merge_round_trip(tmp_path):
    from moelpr import load_model

    model = prepare_baseline("lora", tiny_model("llama"), verbose=False)
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
    merged = save_baseline("lora", model, tmp_path / "out")
    assert not hasattr(merged, "peft_config")
    assert (tmp_path / "out" / "adapter" / "adapter_model.safetensors").is_file()
    assert not list((tmp_path / "out").rglob("*.bin"))
    reloaded = load_model(tmp_path / "out").eval()
    assert type(reloaded).__name__ == "LlamaForCausalLM"
    assert (_logits(reloaded, ids) - expected).abs().max().item() <= 1e-5


def test_full_trains_everything(tmp_path):
    model = tiny_model("llama")
    model.requires_grad_(False)
    model = prepare_baseline("full", model, verbose=False)
    assert all(p.requires_grad for p in model.parameters())
    save_baseline("full", model, tmp_path / "out")
    with pytest.raises(UserError, match="not empty"):
        save_baseline("full", model, tmp_path / "out")


def test_positions():
    assert llama_pro_positions(24, blocks=12) == list(range(1, 24, 2)) == llama_pro_positions(24, every=2)
    assert llama_pro_positions(32, blocks=8) == [3, 7, 11, 15, 19, 23, 27, 31]
    assert llama_pro_positions(5, blocks=2) == [1, 4]
    assert llama_pro_positions(3, blocks=3) == [0, 1, 2]
    assert llama_pro_positions(5, every=2) == [1, 3]


@pytest.mark.parametrize(
    "method, kwargs, message",
    [
        ("adapter", {}, "unknown baseline method"),
        ("llama_pro", {}, "exactly one of"),
        ("llama_pro", {"llama_pro_blocks": 2, "llama_pro_every": 1}, "exactly one of"),
        ("llama_pro", {"llama_pro_blocks": 4}, "between 1 and the model's 3 layers"),
        ("llama_pro", {"llama_pro_every": 0}, "llama_pro_every must be"),
        ("llama_pro", {"llama_pro_blocks": 1.5}, "llama_pro_blocks must be"),
        ("full", {"llama_pro_blocks": 2}, "only apply to method 'llama_pro'"),
        ("lora", {"lora_rank": 0}, "lora_rank must be"),
        ("lora", {"lora_target": "no_such_proj"}, "lora_target"),
    ],
)
def test_bad_arguments_are_one_line_user_errors(method, kwargs, message):
    with pytest.raises(UserError, match=message) as err:
        prepare_baseline(method, tiny_model("llama"), verbose=False, **kwargs)
    assert "\n" not in str(err.value)


def test_rejects_upcycled_and_wrong_kind_models(tmp_path):
    with pytest.raises(UserError, match="upcycled"):
        prepare_baseline("full", upcycle(tiny_model("llama"), num_experts=2), verbose=False)
    with pytest.raises(UserError, match="needs a peft LoRA model"):
        save_baseline("lora", tiny_model("llama"), tmp_path / "x")
    assert not (tmp_path / "x").exists()
