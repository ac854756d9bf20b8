"""`--format hf`: a copy of the checkpoint in its portable form (the model code travels with every full checkpoint)."""

from __future__ import annotations

import json

import torch
from safetensors.torch import load_file
from tiny import trained_moe

import moelpr
from moelpr.export import export_model


def test_hf_export_is_the_portable_checkpoint_with_tokenizer_files(moe_dir, tmp_path):
    out = tmp_path / "out"
    export_model(moelpr.load_model(moe_dir), out, format="hf", source_dir=moe_dir)
    names = {p.name for p in out.iterdir()}
    assert {"tokenizer.json", "tokenizer_config.json", "generation_config.json", "modeling_moelpr.py"} <= names
    assert (out / "tokenizer.json").read_bytes() == (moe_dir / "tokenizer.json").read_bytes()
    a, b = load_file(str(out / "model.safetensors")), load_file(str(moe_dir / "model.safetensors"))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_layermoe_models_export_to_hf(tmp_path):
    export_model(_classifier_model(), tmp_path / "out", format="hf")
    assert json.loads((tmp_path / "out" / "config.json").read_text())["classifier_layers"] == [0, 2]


def _classifier_model():
    moe = trained_moe(num_experts=3)
    moelpr.add_classifiers(moe, [0, 2], num_classes=2, pooling="token")
    return moe
