"""`--format hf`: weights + self-contained remote code that stock transformers loads without moelpr."""

from __future__ import annotations

import ast
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from export_helpers import trained_moe
from safetensors.torch import load_file, save_file
from tiny import tiny_ids

import moelpr
from moelpr.export import export_model
from moelpr.export.hf import MODULES, STANDALONE_DIR

REPO = Path(moelpr.__file__).resolve().parent.parent

# Runs in `python -I` from an empty cwd: drops the editable-install finder of moelpr, proves moelpr is not
# importable, then loads every exported directory with trust_remote_code and stores logits + greedy tokens.
CHILD = r"""
import importlib.abc, importlib.util, json, sys
sys.meta_path[:] = [f for f in sys.meta_path if "editable" not in getattr(f, "__module__", "")]
sys.path_hooks[:] = [h for h in sys.path_hooks if "editable" not in getattr(h, "__module__", "")]
# drop the source checkout (and anything under it) but keep site-packages: CI's venv lives inside the checkout
sys.path[:] = [p for p in sys.path if "__editable__" not in p and not (p.startswith(sys.argv[1]) and "site-packages" not in p)]
sys.path_importer_cache.clear()
assert importlib.util.find_spec("moelpr") is None, "moelpr is still importable"

class Block(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] == "moelpr":
            raise ModuleNotFoundError(f"moelpr is blocked in this process ({name})")
        return None

sys.meta_path.insert(0, Block())
import torch
from safetensors.torch import load_file, save_file
from transformers import AutoModelForCausalLM

report = {}
for out in json.loads(sys.argv[2]):
    model = AutoModelForCausalLM.from_pretrained(out, trust_remote_code=True).eval()
    ids = load_file(out + ".ids.safetensors")["ids"]
    with torch.no_grad():
        logits = model(input_ids=ids).logits
        # one greedy generation (KV cache through the remote MoE block); logits for the other bases
        tokens = model.generate(ids[:1, :4], max_new_tokens=6, do_sample=False, pad_token_id=0) if not report else ids
    save_file({"logits": logits.contiguous(), "tokens": tokens.contiguous()}, out + ".theirs.safetensors")
    report[out] = type(model).__module__
assert not any(name.split(".")[0] == "moelpr" for name in sys.modules)
print(json.dumps(report))
"""

CASES = {
    "llama": dict(arch="llama", num_experts=[4, 1, 3]),
    "llama-k1-mlp-bias": dict(arch="llama", num_experts=3, top_k=1, mlp_bias=True),
    "gemma2-tied": dict(arch="gemma2", num_experts=3),
    "phi3-fused": dict(arch="phi3", num_experts=[2, 3, 1]),
    "qwen2": dict(arch="qwen2", num_experts=4),
    "qwen3": dict(arch="qwen3", num_experts=3),
}


def test_standalone_modules_import_only_torch_and_transformers():
    for module in MODULES:
        tree = ast.parse((STANDALONE_DIR / f"{module}.py").read_text())
        roots = {alias.name.split(".")[0] for node in ast.walk(tree) if isinstance(node, ast.Import) for alias in node.names}
        roots |= {node.module.split(".")[0] for node in ast.walk(tree)
                  if isinstance(node, ast.ImportFrom) and node.level == 0 and node.module}
        assert roots <= {"__future__", "torch", "transformers"}, (module, roots)


def test_hf_export_loads_without_moelpr_and_matches(tmp_path):
    ours, outs = {}, []
    for name, case in CASES.items():
        case = dict(case)
        extra = {"mlp_bias": case.pop("mlp_bias")} if "mlp_bias" in case else {}
        moe = trained_moe(case.pop("arch"), **case, **extra)
        if extra:
            with torch.no_grad():  # non-zero biases, so a dropped bias would show
                for n, p in moe.named_parameters():
                    if n.endswith("bias"):
                        p.normal_(std=0.1)
        out = tmp_path / name
        export_model(moe, out, format="hf")
        ids = tiny_ids(seed=3)
        save_file({"ids": ids}, str(out) + ".ids.safetensors")
        with torch.no_grad():
            tokens = moe.generate(ids[:1, :4], max_new_tokens=6, do_sample=False, pad_token_id=0) if not outs else ids
            ours[str(out)] = (moe(input_ids=ids).logits, tokens)
        outs.append(str(out))
        config = json.loads((out / "config.json").read_text())
        assert config["auto_map"]["AutoModelForCausalLM"] == "modeling_moelpr.MoELPRForCausalLM"
        assert {"configuration_moelpr.py", "modeling_moelpr.py", "model.safetensors"} <= {p.name for p in out.iterdir()}
        full = tmp_path / f"{name}-full"
        moelpr.save_model(moe, full, format="full")
        assert set(load_file(str(out / "model.safetensors"))) == set(load_file(str(full / "model.safetensors")))

    cwd = tmp_path / "elsewhere"
    cwd.mkdir()
    env = {k: v for k, v in os.environ.items() if not k.startswith("PYTHON")}
    env.update(HF_MODULES_CACHE=str(tmp_path / "hf_modules"), OMP_NUM_THREADS="1", HF_HUB_OFFLINE="1", TRANSFORMERS_VERBOSITY="error")
    proc = subprocess.run([sys.executable, "-I", "-c", CHILD, str(REPO), json.dumps(outs)], cwd=cwd, env=env,
                          capture_output=True, text=True, timeout=240)
    assert proc.returncode == 0, proc.stderr[-3000:]
    modules = json.loads(proc.stdout.strip().splitlines()[-1])
    for out, (logits, tokens) in ours.items():
        assert "modeling_moelpr" in modules[out] and "moelpr.export" not in modules[out]
        theirs = load_file(out + ".theirs.safetensors")
        assert (theirs["logits"] - logits).abs().max().item() <= 1e-5, out
        assert torch.equal(theirs["tokens"], tokens), out


def test_hf_export_copies_tokenizer_and_generation_config(moe_dir, tmp_path):
    out = tmp_path / "out"
    export_model(moelpr.load_model(moe_dir), out, format="hf", source_dir=moe_dir)
    names = {p.name for p in out.iterdir()}
    assert {"tokenizer.json", "tokenizer_config.json", "generation_config.json"} <= names
    assert (out / "tokenizer.json").read_bytes() == (moe_dir / "tokenizer.json").read_bytes()


def test_refuses_classifier_models(tmp_path):
    moe = trained_moe()
    moe.config.classifier_layers = [1]
    with pytest.raises(moelpr.UserError, match="classifier"):
        export_model(moe, tmp_path / "out", format="hf")
    assert not (tmp_path / "out").exists()
