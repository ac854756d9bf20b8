"""Every shipped YAML validates: recipe keys, launch-command header, referenced DeepSpeed/FSDP/corpora files,
and the paper's hyper-parameters in the MoE-LPR and baseline recipes."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml
from transformers import TrainingArguments

from moelpr.data.corpus import Corpus
from moelpr.train.recipe import load_recipe, recipe_keys

REPO = Path(__file__).resolve().parents[2]
RECIPES = REPO / "recipes"
NOT_RECIPES = ("corpora", "accelerate")  # data specs and launcher configs, checked separately below
RECIPE_FILES = sorted(p for p in RECIPES.rglob("*.yaml") if p.relative_to(RECIPES).parts[0] not in NOT_RECIPES)


def _rel(path: Path) -> str:
    return path.relative_to(REPO).as_posix()


def _load(path: Path) -> dict:
    raw = yaml.safe_load(path.read_text())
    assert isinstance(raw, dict), f"{_rel(path)} is not a mapping"
    return raw


def _known_keys() -> set[str]:
    own, ta = recipe_keys()  # the recipe's own list is the authority
    return {*own, *ta}


def test_recipes_are_shipped():
    names = {_rel(p) for p in RECIPE_FILES}
    for expected in (
        "moe_lpr/qwen1.5-1.8b_stage1",
        "moe_lpr/qwen1.5-1.8b_stage2",
        "moe_lpr/qwen1.5-1.8b_stage1_official4",
        "moe_lpr/llama3-8b_stage1",
        "moe_lpr/llama3-8b_stage2",
        "baselines/qwen1.5-1.8b_full",
        "baselines/qwen1.5-1.8b_lora",
        "baselines/qwen1.5-1.8b_llama_pro",
        "baselines/qwen1.5-1.8b_loramoe",
        "baselines/qwen1.5-1.8b_moe_one_stage",
        "moe_lpr/qwen1.5-1.8b_stage1_no_copy",
    ):
        assert f"recipes/{expected}.yaml" in names


@pytest.mark.parametrize("path", RECIPE_FILES, ids=_rel)
def test_recipe_keys_and_header(path):
    assert path.read_text().splitlines()[0].startswith(f"# moe-lpr train {_rel(path)}"), (
        f"{_rel(path)} must begin with its launch command"
    )
    raw = _load(path)
    unknown = sorted(set(raw) - _known_keys())
    assert not unknown, f"{_rel(path)}: unknown keys {unknown}"
    for key in ("deepspeed", "fsdp_config"):
        if isinstance(raw.get(key), str):
            target = REPO / raw[key]
            assert target.is_file(), f"{_rel(path)}: {key} file {raw[key]} is missing"
            assert isinstance(json.loads(target.read_text()), dict)
    if isinstance(raw.get("corpora"), str) and raw["corpora"].startswith("recipes/"):
        assert (REPO / raw["corpora"]).is_file(), f"{_rel(path)}: corpora file {raw['corpora']} is missing"


@pytest.mark.parametrize("path", RECIPE_FILES, ids=_rel)
def test_recipe_loads_through_load_recipe(path):
    recipe = load_recipe(path)
    # the TrainingArguments part must construct (on CPU; DeepSpeed is not installed in the test environment)
    fields = {k: v for k, v in recipe.training_args.items() if k != "deepspeed"}
    fields["use_cpu"] = True
    TrainingArguments(**fields)


GPUS = {
    "qwen1.5-1.8b_stage1": 8,
    "qwen1.5-1.8b_stage2": 8,
    "qwen1.5-1.8b_stage1_official4": 4,
    "llama3-8b_stage1": 8,
    "llama3-8b_stage2": 8,
    "qwen1.5-1.8b_full": 8,
    "qwen1.5-1.8b_lora": 8,
    "qwen1.5-1.8b_llama_pro": 8,
    "qwen1.5-1.8b_loramoe": 8,
    "qwen1.5-1.8b_moe_one_stage": 8,
    "qwen1.5-1.8b_stage1_no_copy": 8,
}
PAPER = {  # docs/method.md §3: (experts, global batch, cutoff_len)
    "qwen1.5-1.8b_stage1": (6, 512, 1024),
    "qwen1.5-1.8b_stage2": (None, 512, 512),
    "qwen1.5-1.8b_stage1_official4": (4, 256, 1024),
    "llama3-8b_stage1": (4, 512, 1024),
    "llama3-8b_stage2": (None, 512, 512),
    "qwen1.5-1.8b_full": (None, 512, 1024),
    "qwen1.5-1.8b_lora": (None, 512, 1024),
    "qwen1.5-1.8b_llama_pro": (None, 512, 1024),
    "qwen1.5-1.8b_loramoe": (None, 512, 1024),
    "qwen1.5-1.8b_moe_one_stage": (None, 512, 1024),
    "qwen1.5-1.8b_stage1_no_copy": (6, 512, 1024),
}


@pytest.mark.parametrize("name", sorted(PAPER))
def test_paper_hyper_parameters(name):
    path = next(p for p in RECIPE_FILES if p.stem == name)
    raw = _load(path)
    experts, batch, cutoff = PAPER[name]
    assert raw["per_device_train_batch_size"] * raw["gradient_accumulation_steps"] * GPUS[name] == batch
    assert f"--nproc_per_node {GPUS[name]} " in path.read_text()
    assert raw["cutoff_len"] == cutoff
    assert (raw["learning_rate"], raw["lr_scheduler_type"], raw["num_train_epochs"], raw["bf16"]) == (
        5e-5,
        "cosine",
        1,
        True,
    )
    if experts is not None:
        assert (raw["num_experts"], raw["top_k"], raw["aux_loss_coef"], raw["stage"]) == (experts, 2, 0.01, 1)
        assert "save_format" not in raw  # the default, full: stock lm-eval / transformers load the output
    if raw.get("stage") == 2:
        assert raw["lpr_loss_coef"] == 0.1 and "aux_loss_coef" not in raw
    if raw["method"] == "lora":
        assert (raw["lora_rank"], raw["lora_alpha"], raw["lora_target"]) == (8, 16, "all-linear")
    if raw["method"] == "llama_pro":
        assert raw["llama_pro_blocks"] == 12
    if raw["method"] == "loramoe":
        assert (raw["loramoe_experts"], raw["lora_rank"]) == (8, 180)
    if raw["method"] == "moe_one_stage":
        assert (raw["num_experts"], raw["top_k"], raw["aux_loss_coef"]) == (6, 2, 0.01)


@pytest.mark.parametrize("path", sorted((RECIPES / "corpora").glob("*.yaml")), ids=_rel)
def test_corpora_files(path):
    assert path.read_text().startswith("#")
    entries = _load(path)["corpora"]
    corpora = [
        Corpus(name=e["name"], paths=[e["path"]], language=e["language"], role=e["role"], max_docs=e.get("max_docs"))
        for e in entries
    ]
    assert len({c.name for c in corpora}) == len(corpora)
    if "review" in path.stem:  # stage 2: 50K docs per original language, 100K per expanded one
        assert {c.max_docs for c in corpora if c.role == "old"} == {50000}
        assert {c.max_docs for c in corpora if c.role == "new"} == {100000}
    if "baselines" in path.stem:  # all the stage-1 data plus the 50K-document replay
        assert {c.max_docs for c in corpora if c.role == "new"} == {None}
        assert {c.max_docs for c in corpora if c.role == "old"} == {50000}


def test_launcher_configs():
    for name in ("zero2", "zero3"):
        config = json.loads((RECIPES / "deepspeed" / f"{name}.json").read_text())
        assert config["zero_optimization"]["stage"] == int(name[-1])
        assert config["bf16"]["enabled"] == "auto"  # follows the recipe's bf16
    fsdp = json.loads((RECIPES / "accelerate" / "fsdp_config.json").read_text())
    assert fsdp["version"] == 2 and fsdp["auto_wrap_policy"] == "TRANSFORMER_BASED_WRAP"
    launch = yaml.safe_load((RECIPES / "accelerate" / "fsdp.yaml").read_text())
    assert launch["distributed_type"] == "FSDP"
    assert launch["fsdp_config"]["fsdp_version"] == 2
    assert launch["fsdp_config"]["fsdp_auto_wrap_policy"] == "TRANSFORMER_BASED_WRAP"
    args = TrainingArguments(
        output_dir="unused", fsdp=True, fsdp_config=str(RECIPES / "accelerate" / "fsdp_config.json")
    )
    assert args.fsdp_plugin_args["fsdp_version"] == 2
