"""Tiny random models of every supported architecture, built from configs (nothing is downloaded), tiny
trained-like MoE-LPR models and a word tokenizer."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import torch
from transformers import (
    AutoModelForCausalLM,
    Gemma2Config,
    LlamaConfig,
    MistralConfig,
    Phi3Config,
    Qwen2Config,
    Qwen3Config,
)

VOCAB = 128
COMMON = dict(
    vocab_size=VOCAB,
    hidden_size=64,
    intermediate_size=128,
    num_hidden_layers=3,
    num_attention_heads=4,
    num_key_value_heads=2,
    max_position_embeddings=128,
)

CONFIGS = {
    "llama": lambda: LlamaConfig(**COMMON),
    "mistral": lambda: MistralConfig(**COMMON),
    "qwen2": lambda: Qwen2Config(**COMMON),
    "qwen3": lambda: Qwen3Config(**COMMON, head_dim=16),
    "gemma2": lambda: Gemma2Config(**COMMON, head_dim=16),
    "phi3": lambda: Phi3Config(**COMMON, pad_token_id=0),
}


def tiny_model(arch: str = "llama", seed: int = 0, **overrides) -> torch.nn.Module:
    """A freshly initialised tiny causal LM in eval mode."""
    torch.manual_seed(seed)
    config = CONFIGS[arch]()
    for key, value in overrides.items():
        setattr(config, key, value)
    return AutoModelForCausalLM.from_config(config).eval()


def tiny_ids(batch: int = 2, seq: int = 12, seed: int = 1) -> torch.Tensor:
    return torch.randint(0, VOCAB, (batch, seq), generator=torch.Generator().manual_seed(seed))


def word_tokenizer():
    """Word-level fast tokenizer with ids < VOCAB: `<pad>` 0, `<unk>` 1, `<s>` 2, `</s>` 3, then w4 … w127."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {"<pad>": 0, "<unk>": 1, "<s>": 2, "</s>": 3}
    vocab.update({f"w{i}": i for i in range(4, VOCAB)})
    backend = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    backend.decoder = decoders.WordPiece(prefix="##")  # joins words with spaces
    return PreTrainedTokenizerFast(
        tokenizer_object=backend, unk_token="<unk>", pad_token="<pad>", bos_token="<s>", eos_token="</s>"
    )


def trained_moe(arch: str = "llama", num_experts=4, top_k: int = 2, seed: int = 0, **overrides):
    """An upcycled tiny model whose new experts and routers are perturbed (as training would), in eval mode."""
    import moelpr

    moe = moelpr.upcycle(tiny_model(arch, seed=seed, **overrides), num_experts=num_experts, top_k=top_k)
    gen = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():
        for p in moe.parameters():
            if p.requires_grad:
                p.add_(torch.randn(p.shape, generator=gen) * 0.05)
    return moe.eval()


REPO = Path(__file__).resolve().parents[1]

# Prepended to a `python -I` child: drops the editable-install finder of moelpr and the checkout (but keeps
# site-packages: CI's venv lives inside the checkout), proves moelpr is not importable, and blocks it.
_WITHOUT_MOELPR = r"""
import importlib.abc, importlib.util, sys
_repo = sys.argv.pop(1)
sys.meta_path[:] = [f for f in sys.meta_path if "editable" not in getattr(f, "__module__", "")]
sys.path_hooks[:] = [h for h in sys.path_hooks if "editable" not in getattr(h, "__module__", "")]
sys.path[:] = [p for p in sys.path if "__editable__" not in p and not (p.startswith(_repo) and "site-packages" not in p)]
sys.path_importer_cache.clear()
assert importlib.util.find_spec("moelpr") is None, "moelpr is still importable"

class _Block(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] == "moelpr":
            raise ModuleNotFoundError(f"moelpr is blocked in this process ({name})")
        return None

sys.meta_path.insert(0, _Block())
"""
_CHECK_UNUSED = '\nassert not any(name.split(".")[0] == "moelpr" for name in sys.modules)\n'


def run_without_moelpr(script: str, args: list[str], cwd: Path, timeout: int = 300) -> str:
    """Run `script` (with `sys.argv[1:] == args`) in a fresh interpreter that cannot import moelpr; its stdout."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("PYTHON")}
    env.update(
        HF_MODULES_CACHE=str(cwd / "hf_modules"),
        OMP_NUM_THREADS="1",
        HF_HUB_OFFLINE="1",
        HF_DATASETS_OFFLINE="1",
        TRANSFORMERS_VERBOSITY="error",
    )
    proc = subprocess.run(
        [sys.executable, "-I", "-c", _WITHOUT_MOELPR + script + _CHECK_UNUSED, str(REPO), *args],
        cwd=cwd,
        env=env,
        capture_output=True,
        text=True,
        timeout=timeout,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    return proc.stdout


TOY_ALPHABETS = {
    "en": ("old", "abcdefghijklmnop"),
    "es": ("old", "aeioulmnrstdñ"),
    "el": ("new", "αβγδεζηθικλμνξοπ"),
    "ru": ("new", "абвгдежзийклмноп"),
}


def toy_corpora(root: Path, name: str, docs: int, seed: int) -> Path:
    """A corpora file `root/<name>.yaml` of four made-up languages (old en, es; new el, ru), `docs` one-line
    documents each; most words are shared, so the layers see some similarity."""
    import json
    import random

    import yaml

    entries = []
    shared = random.Random("shared")
    common = ["".join(shared.choice("aeiou") for _ in range(shared.randint(2, 4))) for _ in range(40)]
    for lang, (role, alphabet) in TOY_ALPHABETS.items():
        rng = random.Random(f"{lang}-{seed}")
        own = ["".join(rng.choice(alphabet) for _ in range(rng.randint(2, 6))) for _ in range(40)]
        lines = [
            " ".join(rng.choice(common if rng.random() < 0.8 else own) for _ in range(rng.randint(8, 20))) + "."
            for _ in range(docs)
        ]
        path = root / f"{name}_{lang}.jsonl"
        path.write_text("".join(json.dumps({"text": t}, ensure_ascii=False) + "\n" for t in lines), encoding="utf-8")
        entries.append({"name": f"{name}_{lang}", "path": path.name, "language": lang, "role": role})
    spec = root / f"{name}.yaml"
    spec.write_text(yaml.safe_dump(entries, allow_unicode=True), encoding="utf-8")
    return spec


def _demo_sizes(**sizes):
    from moelpr.demo.settings import DemoSizes

    return DemoSizes(**sizes)


# Toy demo sizes: every step of the pipeline runs, in seconds (bf16 is ~8x slower on CPUs without native bf16).
MICRO = _demo_sizes(
    vocab_size=300,
    hidden_size=32,
    num_layers=2,
    intermediate_size=64,
    num_heads=2,
    cutoff_len=32,
    batch_size=4,
    base_steps=15,
    new_tokens_per_language=600,
    stage1_steps=2,
    replay_fraction=0.5,
    stage2_epochs=1,
    eval_tokens_per_language=60,
    eval_batch_size=4,
    similarity_tokens=200,
    layermoe_budget=5,
    lora_rank=2,
    llama_pro_blocks=1,
    loramoe_experts=2,
    loramoe_rank=2,
    review_scales=(1.0,),
    gamma_grid=(0.3,),
    auto_bf16=True,
)
