"""`bf16: true` trains wherever it is asked for: bf16 autocast with float32 master weights, also on a CPU."""

import pytest
import torch
import yaml
from safetensors import safe_open
from train_helpers import TINY_RECIPES
from transformers import TrainerCallback

from moelpr.errors import UserError
from moelpr.train import load_recipe, train
from moelpr.train import run as train_run


def _recipe(world, out, name="full.yaml", **keys):
    """A tiny recipe without the `use_cpu: true` the tiny recipes carry (the point is not to need it)."""
    dense, corpora = world
    raw = yaml.safe_load((TINY_RECIPES / name).read_text())
    raw.pop("use_cpu")
    return load_recipe({**raw, "model": str(dense), "corpora": str(corpora), "output_dir": str(out), **keys})


class _LinearDtypes(TrainerCallback):
    """Records the output dtype of every `nn.Linear` forward and the parameter dtypes during training."""

    def __init__(self):
        self.outputs: set[torch.dtype] = set()
        self.params: set[torch.dtype] = set()

    def on_train_begin(self, args, state, control, model=None, **kwargs):
        for module in model.modules():
            if isinstance(module, torch.nn.Linear):
                module.register_forward_hook(lambda m, i, o: self.outputs.add(o.dtype))

    def on_step_end(self, args, state, control, model=None, **kwargs):
        self.params |= {p.dtype for p in model.parameters()}


def test_bf16_recipe_runs_under_bf16_autocast_with_float32_weights(world, tmp_path):
    seen = _LinearDtypes()
    out = train(_recipe(world, tmp_path / "bf16", max_steps=2, bf16=True), callbacks=[seen])
    assert seen.outputs == {torch.bfloat16}  # every matmul ran in bf16: autocast was on, not silently fp32
    assert seen.params == {torch.float32}  # master weights stay float32 (mixed precision, not bf16 weights)
    with safe_open(out / "model.safetensors", framework="pt") as f:
        assert {f.get_slice(k).get_dtype() for k in f.keys()} == {"F32"}


def test_fp32_recipe_runs_in_float32(world, tmp_path):
    seen = _LinearDtypes()
    train(_recipe(world, tmp_path / "fp32", max_steps=1, use_cpu=True), callbacks=[seen])
    assert seen.outputs == {torch.float32}


def test_moe_stage1_trains_in_bf16(world, tmp_path):
    out = train(_recipe(world, tmp_path / "s1", "stage1.yaml", max_steps=2, bf16=True))
    assert (out / "train_metrics.json").is_file()


def test_cpu_is_chosen_only_without_an_accelerator(world, tmp_path, monkeypatch):
    recipe = _recipe(world, tmp_path / "x", bf16=True)
    monkeypatch.setattr(train_run, "_has_accelerator", lambda: False)
    assert train_run._training_arguments(recipe, tmp_path / "ckpt").use_cpu is True
    assert train_run._training_arguments(_recipe(world, tmp_path / "y"), tmp_path / "ckpt").use_cpu is True  # fp32
    monkeypatch.setattr(train_run, "_has_accelerator", lambda: True)
    if not torch.accelerator.is_available():  # an accelerator is claimed but there is none: the Trainer refuses
        with pytest.raises(UserError, match="invalid training arguments: .*bf16"):
            train_run._training_arguments(recipe, tmp_path / "ckpt")
    else:
        assert train_run._training_arguments(recipe, tmp_path / "ckpt").use_cpu is False


def test_explicit_use_cpu_false_is_kept(world, tmp_path, monkeypatch):
    monkeypatch.setattr(train_run, "_has_accelerator", lambda: False)
    recipe = _recipe(world, tmp_path / "x", bf16=True, use_cpu=False)
    with pytest.raises(UserError, match="invalid training arguments"):
        train_run._training_arguments(recipe, tmp_path / "ckpt")
