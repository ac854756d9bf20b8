"""`--format mixtral | qwen3_moe | qwen2_moe`: stock checkpoints (no remote code), exact or refused."""

from __future__ import annotations

import json

import pytest
import torch
from tiny import tiny_ids, trained_moe
from transformers import AutoModelForCausalLM

import moelpr
from moelpr.cli import main
from moelpr.export import export_model, native

CASES = [  # (id, arch, format, experts, top_k, base-config overrides)
    (
        "llama-mixtral",
        "llama",
        "mixtral",
        4,
        2,
        {"rope_parameters": {"rope_type": "default", "rope_theta": 5e5}, "tie_word_embeddings": True},
    ),
    ("mistral-mixtral-window", "mistral", "mixtral", 3, 3, {"sliding_window": 5}),
    ("qwen3-dense-layer", "qwen3", "qwen3_moe", [3, 1, 3], 2, {}),
    ("qwen3-top1", "qwen3", "qwen3_moe", [1, 3, 3], 1, {}),
    ("qwen2-shared-zero", "qwen2", "qwen2_moe", [1, 4, 4], 2, {}),
]


@pytest.mark.parametrize("arch, fmt, experts, top_k, overrides", [c[1:] for c in CASES], ids=[c[0] for c in CASES])
def test_native_export_is_exact(tmp_path, arch, fmt, experts, top_k, overrides):
    moe = trained_moe(arch, num_experts=experts, top_k=top_k, **overrides)
    if overrides.get("tie_word_embeddings"):
        moe.lm.tie_weights()
    out = export_model(moe, tmp_path / "out", format=fmt)
    config = json.loads((out / "config.json").read_text())
    assert config["model_type"] == fmt and "auto_map" not in config
    assert not list(out.glob("*.py"))
    theirs = AutoModelForCausalLM.from_pretrained(out).eval()  # no trust_remote_code
    assert type(theirs).__name__ == native.FORMATS[fmt].model_class
    assert theirs.config.rope_parameters == moe.config.text_config.rope_parameters
    assert theirs.config.tie_word_embeddings == moe.config.text_config.tie_word_embeddings
    ids = tiny_ids(seq=12, seed=5)
    with torch.no_grad():
        assert (theirs(input_ids=ids).logits - moe(input_ids=ids).logits).abs().max().item() <= 1e-4
    if fmt != "mixtral":
        assert theirs.config.norm_topk_prob == (top_k > 1)
        assert theirs.config.mlp_only_layers == [i for i, n in enumerate(moe.config.experts_per_layer) if n == 1]


@pytest.mark.parametrize(
    "arch, fmt, experts, top_k, overrides, reasons",
    [
        (
            "llama",
            "mixtral",
            [5, 3, 5],
            1,
            {"attention_bias": True},
            ["layer 1 has 3 experts", "top_k=1", "attention_bias=True"],
        ),
        ("llama", "mixtral", [4, 1, 4], 2, {}, ["layer 1 has 1 expert"]),
        ("gemma2", "mixtral", 3, 2, {}, ["base model_type 'gemma2' is not llama or mistral"]),
        ("qwen3", "qwen3_moe", [3, 4, 1], 2, {}, ["MoE layers must share one expert count"]),
        ("llama", "qwen2_moe", 3, 2, {"mlp_bias": True}, ["base model_type 'llama' is not qwen2"]),
        ("llama", "mixtral", 3, 2, {"mlp_bias": True}, ["mlp_bias=True"]),
    ],
)
def test_inexact_conversions_are_refused_with_every_reason(tmp_path, arch, fmt, experts, top_k, overrides, reasons):
    moe = trained_moe(arch, num_experts=experts, top_k=top_k, **overrides)
    with pytest.raises(moelpr.UserError, match=f"cannot export to {fmt}") as err:
        export_model(moe, tmp_path / "out", format=fmt)
    for reason in reasons:
        assert reason in str(err.value)
    assert "\n" not in str(err.value) and not (tmp_path / "out").exists()


def test_classifier_models_are_refused(tmp_path):
    moe = trained_moe()
    moe.config.classifier_layers = [0, 2]
    with pytest.raises(moelpr.UserError, match=r"LayerMoE classifiers in layers \[0, 2\]"):
        export_model(moe, tmp_path / "out", format="mixtral")


def test_failed_logit_check_writes_nothing(tmp_path, monkeypatch):
    moe = trained_moe()
    build = native.native_state_dict

    def broken(model, fmt):
        state = build(model, fmt)
        state["model.layers.0.mlp.gate.weight"] = state["model.layers.0.mlp.gate.weight"].flip(0)
        return state

    monkeypatch.setattr(native, "native_state_dict", broken)
    with pytest.raises(moelpr.UserError, match="logits differ"):
        export_model(moe, tmp_path / "out", format="mixtral")
    assert not (tmp_path / "out").exists()


def test_output_dir_and_format_checks(tmp_path):
    moe = trained_moe()
    out = tmp_path / "out"
    out.mkdir()
    (out / "keep.txt").write_text("x")
    with pytest.raises(moelpr.UserError, match="--overwrite"):
        export_model(moe, out, format="mixtral")
    assert (out / "keep.txt").exists()
    export_model(moe, out, format="mixtral", overwrite=True)
    assert not (out / "keep.txt").exists() and (out / "config.json").is_file()
    with pytest.raises(moelpr.UserError, match="unknown export format 'gguf'"):
        export_model(moe, tmp_path / "other", format="gguf")
    with pytest.raises(moelpr.UserError, match="not an MoE-LPR model"):
        export_model(moe.lm, tmp_path / "other", format="hf")


def test_export_cli(moe_dir, tmp_path, capsys):
    out = tmp_path / "hf"
    assert main(["export", "--model", str(moe_dir), "--format", "hf", "--output", str(out)]) == 0
    assert (out / "modeling_moelpr.py").is_file() and (out / "tokenizer.json").is_file()
    assert "trust_remote_code=True" in capsys.readouterr().out
    # moe_dir has experts [4, 1, 3]: no Mixtral form
    assert main(["export", "--model", str(moe_dir), "--format", "mixtral", "--output", str(tmp_path / "mx")]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "layer 1 has 1 expert" in err and "layer 2 has 3 experts" in err
    assert main(["export", "--model", str(moe_dir), "--format", "onnx", "--output", str(tmp_path / "x")]) == 2
    assert "unknown export format 'onnx'" in capsys.readouterr().err
    assert main(["export", "--model", str(moe_dir), "--format", "hf", "--output", str(out)]) == 2
    assert "--overwrite" in capsys.readouterr().err
    assert not (tmp_path / "mx").exists() and not (tmp_path / "x").exists()
