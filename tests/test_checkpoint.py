"""Save/load round trips (full and delta formats), fingerprint checks."""

import json

import pytest
import torch
from tiny import tiny_ids, tiny_model
from transformers import AutoModelForCausalLM

import moelpr
from moelpr import UserError


def trained_like(moe):
    """Perturb the new parameters, as training would."""
    with torch.no_grad():
        for p in moe.parameters():
            if p.requires_grad:
                p.add_(torch.randn_like(p) * 0.05)
    return moe


def saved_base(tmp_path, arch="llama", seed=0):
    base_dir = tmp_path / f"base-{arch}-{seed}"
    tiny_model(arch, seed=seed).save_pretrained(base_dir)
    return base_dir


@pytest.mark.parametrize("arch", ["llama", "gemma2"])
def test_full_round_trip_is_bit_exact(tmp_path, arch):
    moe = trained_like(moelpr.upcycle(moelpr.load_model(saved_base(tmp_path, arch)), num_experts=[3, 1, 2]))
    moelpr.save_model(moe, tmp_path / "out", format="full")
    config = json.loads((tmp_path / "out" / "config.json").read_text())
    assert config["model_type"] == "moelpr" and config["experts_per_layer"] == [3, 1, 2]
    assert config["text_config"]["model_type"] == arch
    assert not list((tmp_path / "out").glob("*.bin")) and list((tmp_path / "out").glob("*.safetensors"))
    for loaded in (moelpr.load_model(tmp_path / "out"), AutoModelForCausalLM.from_pretrained(tmp_path / "out")):
        assert isinstance(loaded, moelpr.MoELPRForCausalLM)
        a, b = moe.state_dict(), loaded.state_dict()
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
        ids = tiny_ids()
        assert torch.equal(moe.eval()(ids).logits, loaded.eval()(ids).logits)


def test_delta_round_trip_and_size(tmp_path):
    base_dir = saved_base(tmp_path)
    moe = trained_like(moelpr.upcycle(moelpr.load_model(base_dir), num_experts=3))
    moelpr.save_model(moe, tmp_path / "delta", format="delta")
    files = {p.name for p in (tmp_path / "delta").iterdir()}
    assert {"config.json", "delta.safetensors", "moelpr_delta.json"} <= files
    loaded = moelpr.load_model(tmp_path / "delta")
    via_auto = AutoModelForCausalLM.from_pretrained(tmp_path / "delta")
    for model in (loaded, via_auto):
        a, b = moe.state_dict(), model.state_dict()
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    delta_bytes = (tmp_path / "delta" / "delta.safetensors").stat().st_size
    new_params = sum(p.numel() for n, p in moe.named_parameters() if p.requires_grad)
    assert delta_bytes < 4 * new_params + 64 * 1024  # only the new weights


def test_delta_on_a_different_base_fails_clearly(tmp_path):
    base_dir = saved_base(tmp_path)
    moe = moelpr.upcycle(moelpr.load_model(base_dir), num_experts=3)
    moelpr.save_model(moe, tmp_path / "delta", format="delta")
    other = saved_base(tmp_path, seed=7)
    with pytest.raises(UserError, match="is not the base .* was trained on"):
        moelpr.load_model(tmp_path / "delta", base_model=str(other))


def test_delta_refuses_models_with_trained_base_parameters(tmp_path):
    moe = moelpr.upcycle(moelpr.load_model(saved_base(tmp_path)), num_experts=3)
    moelpr.set_trainable(moe, "all")
    with pytest.raises(UserError, match="format='full'"):
        moelpr.save_model(moe, tmp_path / "delta", format="delta")
    assert not (tmp_path / "delta").exists()


@pytest.mark.parametrize(
    "setup, message",
    [
        (lambda p: None, "does not exist"),
        (lambda p: p.mkdir(), "is not a model directory"),
    ],
)
def test_load_bad_directories(tmp_path, setup, message):
    target = tmp_path / "nope"
    setup(target)
    with pytest.raises(UserError, match=message):
        moelpr.load_model(target)


def test_output_directory_not_half_written_on_error(tmp_path):
    moe = moelpr.upcycle(tiny_model(), num_experts=3)  # built from a config: no base directory for a delta
    with pytest.raises(UserError, match="delta format needs"):
        moelpr.save_model(moe, tmp_path / "out", format="delta")
    assert list(tmp_path.iterdir()) == []


def test_directories_written_before_the_code_travelled_still_load(tmp_path):
    """The previous release wrote full checkpoints without the model's modules and without `auto_map`."""
    moe = trained_like(moelpr.upcycle(tiny_model(), num_experts=3))
    moelpr.add_classifiers(moe, [1], num_classes=2)
    moelpr.save_model(moe, tmp_path / "old", format="full")
    for module in (tmp_path / "old").glob("*.py"):  # the old layout: weights and config only
        module.unlink()
    config = json.loads((tmp_path / "old" / "config.json").read_text())
    del config["auto_map"]
    (tmp_path / "old" / "config.json").write_text(json.dumps(config))
    ids = tiny_ids()
    for loaded in (moelpr.load_model(tmp_path / "old"), AutoModelForCausalLM.from_pretrained(tmp_path / "old")):
        assert type(loaded) is moelpr.MoELPRForCausalLM
        with torch.no_grad():
            assert torch.equal(loaded.eval()(ids).logits, moe.eval()(ids).logits)
