"""The streamed upcycle (`moe-lpr upcycle`): the same checkpoint as the in-memory path, a fraction of its memory."""

from __future__ import annotations

import filecmp
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file
from tiny import CONFIGS, tiny_ids, tiny_model, word_tokenizer

import moelpr
from moelpr.cli import main
from moelpr.upcycling.stream import stream_upcycle

COUNTS = [3, 1, 4]  # an MoE layer, a dense one, a bigger MoE layer


def _dense(tmp_path: Path, arch: str = "llama", **save) -> Path:
    path = tmp_path / f"{arch}-dense"
    overrides = {"mlp_bias": True} if arch == "llama" else {}  # biases in the experts too
    tiny_model(arch, **overrides).save_pretrained(path, **save)
    return path


def _in_memory(dense: Path, out: Path, seed: int, format: str = "full", **save) -> None:
    """What `moe-lpr upcycle` did before it streamed, seeded."""
    torch.manual_seed(seed)
    moe = moelpr.upcycle(moelpr.load_model(dense), num_experts=COUNTS, top_k=2)
    moe.config.base_model_path = str(dense.resolve())
    if save:
        moe.save_pretrained(out, **save)
    else:
        moelpr.save_model(moe, out, format=format)


def _tensors(path: Path) -> dict[str, torch.Tensor]:
    tensors = {}
    for file in sorted(path.glob("*.safetensors")):
        tensors.update(load_file(file))
    return tensors


def _same_files(a: Path, b: Path) -> None:
    names = sorted(p.name for p in a.iterdir())
    assert names == sorted(p.name for p in b.iterdir())
    _, mismatch, errors = filecmp.cmpfiles(a, b, names, shallow=False)
    assert mismatch == [] and errors == []


@pytest.mark.parametrize("arch", sorted(CONFIGS))
def test_streamed_checkpoint_is_the_in_memory_one(arch, tmp_path):
    dense = _dense(tmp_path, arch)
    _in_memory(dense, tmp_path / "memory", seed=3)
    stream_upcycle(dense, tmp_path / "streamed", num_experts=COUNTS, top_k=2, seed=3)
    memory, streamed = _tensors(tmp_path / "memory"), _tensors(tmp_path / "streamed")
    assert list(streamed) == list(memory)
    for name, tensor in memory.items():
        assert streamed[name].dtype == tensor.dtype and torch.equal(streamed[name], tensor), name
    assert any(".experts.0." in name for name in streamed) and any(".routers.0." in name for name in streamed)
    # config.json, generation_config.json, the model code and the weights file itself: byte for byte
    _same_files(tmp_path / "memory", tmp_path / "streamed")


def test_seed_draws_the_routers_and_nothing_else(tmp_path):
    dense = _dense(tmp_path)
    before = torch.random.get_rng_state()
    stream_upcycle(dense, tmp_path / "a", num_experts=COUNTS, seed=0)
    assert torch.equal(torch.random.get_rng_state(), before)  # the caller's random state is left alone
    stream_upcycle(dense, tmp_path / "b", num_experts=COUNTS, seed=1)
    a, b = _tensors(tmp_path / "a"), _tensors(tmp_path / "b")
    routers = [name for name in a if ".routers." in name]
    assert routers and all(not torch.equal(a[name], b[name]) for name in routers)
    assert all(torch.equal(a[name], b[name]) for name in a if name not in routers)


@pytest.mark.parametrize("arch", ["gemma2", "phi3"])  # tied embeddings; fused gate_up
def test_sharded_in_and_out_match_save_pretrained(arch, tmp_path):
    dense = _dense(tmp_path, arch, max_shard_size="40KB")  # a sharded dense checkpoint with an index
    assert (dense / "model.safetensors.index.json").is_file()
    _in_memory(dense, tmp_path / "memory", seed=0, max_shard_size="100KB")
    stream_upcycle(dense, tmp_path / "streamed", num_experts=COUNTS, seed=0, max_shard_size="100KB")
    assert len(list((tmp_path / "streamed").glob("model-*.safetensors"))) > 3
    _same_files(tmp_path / "memory", tmp_path / "streamed")  # shards, index, config, code


def test_delta_format_is_the_in_memory_one(tmp_path):
    dense = _dense(tmp_path)
    _in_memory(dense, tmp_path / "memory", seed=0, format="delta")
    stream_upcycle(dense, tmp_path / "streamed", num_experts=COUNTS, seed=0, format="delta")
    _same_files(tmp_path / "memory", tmp_path / "streamed")
    assert moelpr.load_model(tmp_path / "streamed").config.experts_per_layer == COUNTS


# Loads a checkpoint with stock transformers in a process where moelpr cannot be imported (as test_portable.py
# does) and saves its logits.
REMOTE_CHILD = r"""
import importlib.abc, importlib.util, sys
sys.meta_path[:] = [f for f in sys.meta_path if "editable" not in getattr(f, "__module__", "")]
sys.path_hooks[:] = [h for h in sys.path_hooks if "editable" not in getattr(h, "__module__", "")]
sys.path[:] = [p for p in sys.path
               if "__editable__" not in p and not (p.startswith(sys.argv[1]) and "site-packages" not in p)]
sys.path_importer_cache.clear()

class Block(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] == "moelpr":
            raise ModuleNotFoundError(name)

sys.meta_path.insert(0, Block())
import torch
from safetensors.torch import load_file, save_file
from transformers import AutoModelForCausalLM

model = AutoModelForCausalLM.from_pretrained(sys.argv[2], trust_remote_code=True).eval()
with torch.no_grad():
    logits = model(input_ids=load_file(sys.argv[3])["ids"]).logits
save_file({"logits": logits.contiguous()}, sys.argv[3])
print(type(model).__module__)
"""


def test_cli_output_loads_with_moelpr_and_with_remote_code(tmp_path, capsys):
    from transformers import AutoTokenizer

    dense_model = tiny_model("qwen2")
    dense = tmp_path / "dense"
    dense_model.save_pretrained(dense)
    word_tokenizer().save_pretrained(dense)
    out = tmp_path / "moe"
    assert (
        main(
            [
                "upcycle",
                "--model",
                str(dense),
                "--num-experts",
                "3,1,4",
                "--top-k",
                "2",
                "--output",
                str(out),
                "--max-shard-size",
                "200KB",
            ]
        )
        == 0
    )
    assert "experts per layer [3, 1, 4], top-2" in capsys.readouterr().out
    assert (out / "model.safetensors.index.json").is_file()
    ids = tiny_ids()
    with torch.no_grad():
        reference = dense_model(ids).logits
        ours = moelpr.load_model(out).eval()
        assert (ours(ids).logits - reference).abs().max().item() <= 1e-5  # top-2 of copies: the dense model
    assert ours.config.base_fingerprint == moelpr.checkpoint.base_fingerprint(dense_model.state_dict())
    assert AutoTokenizer.from_pretrained(out).convert_tokens_to_ids("w5") == 5

    exchange = tmp_path / "ids.safetensors"
    save_file({"ids": ids}, exchange)
    repo = str(Path(moelpr.__file__).resolve().parent.parent)
    env = {**os.environ, "HF_MODULES_CACHE": str(tmp_path / "modules")}
    result = subprocess.run(
        [sys.executable, "-I", "-c", REMOTE_CHILD, repo, str(out), str(exchange)],
        capture_output=True,
        text=True,
        cwd=tmp_path,
        env=env,
    )
    assert result.returncode == 0, result.stderr[-2000:]
    assert not result.stdout.strip().startswith("moelpr")  # the model code shipped in the checkpoint
    assert (load_file(exchange)["logits"] - reference).abs().max().item() <= 1e-5


# Runs one upcycle in a fresh process and prints its peak memory above the RSS after the imports.
MEMORY_CHILD = r"""
import json, resource, sys, torch
import transformers.models.llama.modeling_llama, safetensors.torch, huggingface_hub  # imports before the baseline
import moelpr
from moelpr.upcycling.stream import stream_upcycle

def vm(field):
    return int(next(l for l in open("/proc/self/status") if l.startswith(field)).split()[1]) * 1024

dense, out, how = sys.argv[1:4]
base = vm("VmRSS:")
if how == "streamed":
    stream_upcycle(dense, out, num_experts=6, top_k=2, max_shard_size="16MB")
else:
    moe = moelpr.upcycle(moelpr.load_model(dense), num_experts=6, top_k=2)
    moelpr.save_model(moe, out, format="full")
print(json.dumps({"peak_above_base": vm("VmHWM:") - base}))
"""


def test_streamed_peak_memory_is_a_fraction_of_in_memory(tmp_path):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=8192,
        hidden_size=256,
        intermediate_size=1024,
        num_hidden_layers=12,
        num_attention_heads=4,
        num_key_value_heads=2,
    )
    LlamaForCausalLM(config).save_pretrained(tmp_path / "dense")  # float32, 17 M parameters
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    peaks = {}
    for how in ("in-memory", "streamed"):
        result = subprocess.run(
            [sys.executable, "-c", MEMORY_CHILD, str(tmp_path / "dense"), str(tmp_path / how), how],
            capture_output=True,
            text=True,
            env=env,
            check=True,
        )
        peaks[how] = json.loads(result.stdout.strip().splitlines()[-1])["peak_above_base"]
    output = (tmp_path / "in-memory" / "model.safetensors").stat().st_size  # 253 MB
    assert peaks["in-memory"] > 0.8 * output  # the measurement sees the model
    assert peaks["streamed"] < 0.4 * peaks["in-memory"], peaks


def _cli_error(args: list[str], capsys) -> str:
    capsys.readouterr()  # drop what building the fixtures printed
    assert main(["upcycle", *args]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "Traceback" not in err
    return err


def _leaves_no_output(tmp_path: Path) -> None:
    assert not (tmp_path / "out").exists() and not any(p.name.startswith(".out") for p in tmp_path.iterdir())


def test_an_moe_checkpoint_is_not_a_dense_model(tmp_path, capsys):
    dense = _dense(tmp_path)
    stream_upcycle(dense, tmp_path / "moe", num_experts=3)
    err = _cli_error(["--model", str(tmp_path / "moe"), "--output", str(tmp_path / "out")], capsys)
    assert "already an MoE-LPR model; upcycle a dense model" in err
    _leaves_no_output(tmp_path)


def _edit(dense: Path, case: str) -> str:
    """Break the dense checkpoint at `dense` in one way; return the expected message."""
    weights = dense / "model.safetensors"
    if case == "no weights":
        weights.unlink()
        return "has no safetensors weights (model.safetensors or model.safetensors.index.json)"
    if case == "pickle weights":
        weights.rename(dense / "pytorch_model.bin")
        return "found pytorch_model.bin: pickle checkpoints are not read"
    if case == "missing shard":
        index = {"metadata": {}, "weight_map": {"model.embed_tokens.weight": "model-00002-of-00002.safetensors"}}
        (dense / "model.safetensors.index.json").write_text(json.dumps(index))
        return "lists the weights file model-00002-of-00002.safetensors, which is missing"
    if case == "missing tensor":
        tensors = load_file(weights)
        del tensors["model.layers.1.mlp.up_proj.weight"]
        save_file(tensors, weights, metadata={"format": "pt"})
        return "has no tensor 'model.layers.1.mlp.up_proj.weight', which LlamaForCausalLM needs"
    if case == "wrong shapes":
        config = json.loads((dense / "config.json").read_text())
        (dense / "config.json").write_text(json.dumps({**config, "intermediate_size": 96}))
        return "but config.json implies (96, 64); the weights do not belong to this config"
    if case == "corrupt weights":
        weights.write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{not json}      ")
        return "is not a readable safetensors file"
    if case == "no config":
        (dense / "config.json").unlink()
        return "is not a model directory (no config.json)"
    raise AssertionError(case)


@pytest.mark.parametrize(
    "case",
    ["no weights", "pickle weights", "missing shard", "missing tensor", "wrong shapes", "corrupt weights", "no config"],
)
def test_bad_dense_checkpoints_are_one_line_errors(case, tmp_path, capsys):
    dense = _dense(tmp_path)
    message = _edit(dense, case)
    err = _cli_error(["--model", str(dense), "--output", str(tmp_path / "out")], capsys)
    assert message in err, err
    _leaves_no_output(tmp_path)


def test_not_a_causal_lm_and_bad_shard_size(tmp_path, capsys):
    from transformers import T5Config

    t5 = tmp_path / "t5"
    T5Config(d_model=32, num_layers=1, num_heads=2, d_ff=64, vocab_size=64).save_pretrained(t5)
    save_file({"shared.weight": torch.zeros(64, 32)}, t5 / "model.safetensors")
    err = _cli_error(["--model", str(t5), "--output", str(tmp_path / "out")], capsys)
    assert "is not a causal language model" in err
    dense = _dense(tmp_path)
    err = _cli_error(["--model", str(dense), "--output", str(tmp_path / "out"), "--max-shard-size", "lots"], capsys)
    assert "bad max shard size 'lots'" in err
    _leaves_no_output(tmp_path)
