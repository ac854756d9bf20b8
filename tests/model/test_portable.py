"""Every checkpoint carries the model definition: stock transformers loads it where moelpr is not installed."""

from __future__ import annotations

import ast
import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file
from tiny import run_without_moelpr, tiny_ids, tiny_model, trained_moe

import moelpr

MODEL_DIR = Path(moelpr.__file__).resolve().parent / "model"

# Loads every directory with trust_remote_code where moelpr cannot be imported; stores logits + greedy tokens.
CHILD = r"""
import json, sys
import torch
from safetensors.torch import load_file, save_file
from transformers import AutoModelForCausalLM

report = {}
for out in json.loads(sys.argv[1]):
    try:
        model = AutoModelForCausalLM.from_pretrained(out, trust_remote_code=True).eval()
    except Exception as err:  # the delta case: report the message
        report[out] = {"error": f"{type(err).__name__}: {err}"}
        continue
    ids = load_file(out + ".ids.safetensors")["ids"]
    with torch.no_grad():
        logits = model(input_ids=ids).logits
        tokens = model.generate(ids[:1, :5], attention_mask=torch.ones_like(ids[:1, :5]), max_new_tokens=6,
                                do_sample=False, pad_token_id=0)
    save_file({"logits": logits.contiguous(), "tokens": tokens.contiguous()}, out + ".theirs.safetensors")
    report[out] = {"module": type(model).__module__}
print(json.dumps(report))
"""


def _layermoe(pooling: str):
    moe = trained_moe(num_experts=3)
    moelpr.add_classifiers(moe, [0, 2], num_classes=2, pooling=pooling)
    with torch.no_grad():  # classifiers that split the batch, so both classes' routing is exercised
        for block in moelpr.moe_blocks(moe):
            if block.classifier is not None:
                block.classifier.linear.weight.normal_(std=1.0)
    return moe.eval()


def _lifelong():
    moe = trained_moe(num_experts=3)
    moelpr.add_classifiers(moe, [1], num_classes=2)
    moe.config.completed_stage = 2
    from moelpr.upcycling.expand import expand

    expand(moe, [1, 2, 1])  # G2: one more expansion group (copies of expert 0)
    gen = torch.Generator().manual_seed(7)
    with torch.no_grad():
        for name, p in moe.named_parameters():
            if ".experts.1." in name or ".routers.1." in name:
                p.add_(torch.randn(p.shape, generator=gen) * 0.05)
    return moe.eval()


def _biased():
    moe = trained_moe("llama", num_experts=3, top_k=1, mlp_bias=True)
    with torch.no_grad():  # non-zero biases, so a dropped bias would show
        for n, p in moe.named_parameters():
            if n.endswith("bias"):
                p.normal_(std=0.1)
    return moe


def _loramoe():
    model = moelpr.loramoe(tiny_model("qwen2"), num_experts=3, rank=4, alpha=8)
    with torch.no_grad():
        for p in model.parameters():
            if p.requires_grad:
                p.add_(torch.randn_like(p) * 0.05)
    return model.eval()


CASES = {
    "llama": lambda: trained_moe("llama", num_experts=[4, 1, 3]),
    "llama-k1-mlp-bias": _biased,
    "gemma2-tied": lambda: trained_moe("gemma2", num_experts=3),
    "phi3-fused": lambda: trained_moe("phi3", num_experts=[2, 3, 1]),
    "qwen2": lambda: trained_moe("qwen2", num_experts=4),
    "qwen3": lambda: trained_moe("qwen3", num_experts=3),
    "layermoe-sequence": lambda: _layermoe("sequence"),
    "layermoe-token": lambda: _layermoe("token"),
    "lifelong-g2": _lifelong,
    "loramoe": _loramoe,
}


def _run_child(tmp_path: Path, outs: list[str]) -> dict:
    cwd = tmp_path / "elsewhere"
    cwd.mkdir(exist_ok=True)
    return json.loads(run_without_moelpr(CHILD, [json.dumps(outs)], cwd).strip().splitlines()[-1])


def test_every_saved_model_loads_without_moelpr_with_the_same_logits_and_tokens(tmp_path):
    ours, outs = {}, []
    for name, build in CASES.items():
        moe = build()
        out = tmp_path / name
        moelpr.save_model(moe, out, format="full")
        config = json.loads((out / "config.json").read_text())
        assert config["auto_map"] == {
            "AutoConfig": "configuration_moelpr.MoELPRConfig",
            "AutoModelForCausalLM": "modeling_moelpr.MoELPRForCausalLM",
        }
        ids = tiny_ids(seed=3)
        save_file({"ids": ids}, str(out) + ".ids.safetensors")
        with torch.no_grad():
            tokens = moe.generate(
                ids[:1, :5],
                attention_mask=torch.ones_like(ids[:1, :5]),
                max_new_tokens=6,
                do_sample=False,
                pad_token_id=0,
            )
            ours[str(out)] = (moe(input_ids=ids).logits, tokens)
        outs.append(str(out))

    delta = tmp_path / "delta"
    base = tmp_path / "base"
    tiny_model().save_pretrained(base)
    upcycled = moelpr.upcycle(moelpr.load_model(base), num_experts=3)
    upcycled.config.base_model_path = str(base)
    moelpr.save_model(upcycled, delta, format="delta")
    report = _run_child(tmp_path, outs + [str(delta)])

    for out, (logits, tokens) in ours.items():
        assert report[out]["module"].endswith("modeling_moelpr") and "moelpr.model" not in report[out]["module"], out
        theirs = load_file(out + ".theirs.safetensors")
        assert (theirs["logits"] - logits).abs().max().item() <= 1e-5, out
        assert torch.equal(theirs["tokens"], tokens), out
    assert "delta checkpoint" in report[str(delta)]["error"] and "moelpr.load_model" in report[str(delta)]["error"]


def test_shipped_modules_import_only_torch_transformers_safetensors_and_each_other(tmp_path):
    moelpr.save_model(_layermoe("sequence"), tmp_path / "out", format="full")
    shipped = sorted(p.name for p in (tmp_path / "out").glob("*.py"))
    package = sorted(p.name for p in MODEL_DIR.glob("*.py") if p.name != "__init__.py")
    assert shipped == package  # every module of the definition travels, and nothing else
    for name in shipped:
        assert (tmp_path / "out" / name).read_text() == (MODEL_DIR / name).read_text()  # the package's own files
        tree = ast.parse((MODEL_DIR / name).read_text())
        roots = {
            alias.name.split(".")[0] for node in ast.walk(tree) if isinstance(node, ast.Import) for alias in node.names
        }
        roots |= {
            node.module.split(".")[0]
            for node in ast.walk(tree)
            if isinstance(node, ast.ImportFrom) and node.level == 0 and node.module
        }
        stdlib = {"__future__", "contextlib", "dataclasses", "functools", "math", "os", "typing", "warnings"}
        # optional, inside functions only: deepspeed (the Triton path, which auto takes only where it imports) and
        # moelpr (what loads a delta checkpoint; without it the shipped code says to install moelpr)
        assert roots <= stdlib | {"torch", "transformers", "safetensors", "deepspeed", "moelpr"}, (name, roots)


@pytest.mark.parametrize("pooling", ["sequence", "token"])
def test_layermoe_reloads_in_process_with_the_same_logits(tmp_path, pooling):
    """After `import moelpr` the registered class wins over the shipped copy (transformers' rule for explicitly
    registered classes); either way a reloaded LayerMoE model computes what the saved one did."""
    from transformers import AutoModelForCausalLM

    moe = _layermoe(pooling)
    moelpr.save_model(moe, tmp_path / "out", format="full")
    ids = tiny_ids(seed=5)
    for loaded in (
        moelpr.load_model(tmp_path / "out"),
        AutoModelForCausalLM.from_pretrained(tmp_path / "out", trust_remote_code=True),
    ):
        assert type(loaded) is moelpr.MoELPRForCausalLM
        with torch.no_grad():
            assert torch.equal(loaded.eval()(input_ids=ids).logits, moe(input_ids=ids).logits)
