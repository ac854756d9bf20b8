"""A tiny world for the training tests: a byte-level BPE tokenizer, a 2-layer Llama and jsonl corpora in
2 old and 2 new made-up languages (distinct alphabets, so routing can tell them apart)."""

from __future__ import annotations

import json
import os
import random
import signal
import subprocess
import sys
from pathlib import Path

import yaml

REPO = Path(__file__).resolve().parents[1]
TINY_RECIPES = REPO / "recipes" / "tiny"

LANGS = {  # language: (role, alphabet)
    "en": ("old", "abcdefghijklmnop"),
    "es": ("old", "aeioulmnrstdñ"),
    "el": ("new", "αβγδεζηθικλμνξοπ"),
    "ru": ("new", "абвгдежзийклмноп"),
}


def sentences(lang: str, n: int, seed: int = 0) -> list[str]:
    rng = random.Random(f"{lang}-{seed}")
    alphabet = LANGS[lang][1]
    words = ["".join(rng.choice(alphabet) for _ in range(rng.randint(2, 6))) for _ in range(40)]
    return [" ".join(rng.choice(words) for _ in range(rng.randint(8, 20))) + "." for _ in range(n)]


def write_corpora(root: Path, docs: int = 40, langs: tuple[str, ...] = tuple(LANGS)) -> Path:
    """jsonl files plus a corpora.yaml naming them; returns the YAML path."""
    root.mkdir(parents=True, exist_ok=True)
    entries = []
    for lang in langs:
        path = root / f"{lang}.jsonl"
        path.write_text("".join(json.dumps({"text": t}, ensure_ascii=False) + "\n" for t in sentences(lang, docs)))
        entries.append({"name": lang, "path": path.name, "language": lang, "role": LANGS[lang][0]})
    spec = root / "corpora.yaml"
    spec.write_text(yaml.safe_dump({"corpora": entries}, allow_unicode=True))
    return spec


def build_dense(root: Path, seed: int = 0) -> Path:
    """Train the tokenizer and save a tiny random Llama (hidden 64, 2 layers) with it; returns the directory."""
    import torch
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

    backend = Tokenizer(models.BPE())
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    backend.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=400,
        special_tokens=["<s>", "</s>", "<pad>", "<unk>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    backend.train_from_iterator([t for lang in LANGS for t in sentences(lang, 40)], trainer=trainer)
    tok = PreTrainedTokenizerFast(
        tokenizer_object=backend, bos_token="<s>", eos_token="</s>", pad_token="<pad>", unk_token="<unk>"
    )
    torch.manual_seed(seed)
    config = LlamaConfig(
        vocab_size=len(tok),
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=256,
        bos_token_id=tok.bos_token_id,
        eos_token_id=tok.eos_token_id,
        pad_token_id=tok.pad_token_id,
    )
    model = LlamaForCausalLM(config)
    out = root / "dense"
    model.save_pretrained(out)
    tok.save_pretrained(out)
    return out


def overrides(**kw) -> list[str]:
    """`{"max_steps": 2}` → `["--max_steps", "2"]` (values as YAML flow text)."""
    args = []
    for key, value in kw.items():
        text = value if isinstance(value, str) else yaml.safe_dump(value, default_flow_style=True).strip()
        if text.endswith("\n..."):
            text = text[:-4].strip()
        args += [f"--{key}", text]
    return args


def state(model) -> dict:
    return {n: p.detach().clone() for n, p in model.state_dict().items()}


def logged(out_dir: Path) -> list[dict]:
    """The training log entries (those with `loss`) from train_metrics.json."""
    metrics = json.loads((Path(out_dir) / "train_metrics.json").read_text())
    return [e for e in metrics["log_history"] if "loss" in e]


def starve_experts(experts: tuple[int, ...], starved) -> dict[str, int]:
    """Make every MoE block route no token to `experts` on the forwards where `starved(n)` holds, n = that block's
    forward count from 0 (their router logits are pushed to −∞ there). Patches `MoEBlock` for this process.

    Returns counters, updated as the model runs: "starved" / "fed" forwards, and "starved_pairs" / "fed_pairs",
    the (token, pick) pairs routed to `experts` on each kind (0 on starved forwards is what the patch promises).
    """
    import torch

    from moelpr.model.layer import MoEBlock

    seen = {"starved": 0, "fed": 0, "starved_pairs": 0, "fed_pairs": 0}
    router_logits, route = MoEBlock.router_logits, MoEBlock.route

    def patched_logits(self, x):
        logits = router_logits(self, x)  # (N, E)
        if not starved(getattr(self, "_forwards", 0)):
            return logits
        banned = torch.isin(torch.arange(logits.shape[-1], device=logits.device), torch.tensor(experts))  # (E,)
        return logits.masked_fill(banned, float("-inf"))

    def patched_route(self, hidden_states):
        routing = route(self, hidden_states)
        kind = "starved" if starved(getattr(self, "_forwards", 0)) else "fed"
        self._forwards = getattr(self, "_forwards", 0) + 1
        seen[kind] += 1
        seen[f"{kind}_pairs"] += int(torch.isin(routing.experts, torch.tensor(experts)).sum())
        return routing

    MoEBlock.router_logits, MoEBlock.route = patched_logits, patched_route
    return seen


def torchrun(args: list[str], env: dict[str, str], timeout: float) -> subprocess.CompletedProcess:
    """`torchrun --standalone --nproc_per_node 2 ARGS` with a deadline that fails the test instead of hanging:
    past `timeout` seconds the launcher and its workers (one process group) are killed and the test fails
    with the tail of their output. Returns the finished process (the caller checks its return code)."""
    import pytest

    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", *args]
    proc = subprocess.Popen(
        cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True
    )
    try:
        stdout, stderr = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)  # the workers too: a hung collective never returns
        stdout, stderr = proc.communicate()
        pytest.fail(f"torchrun still running after {timeout:.0f} s (a hang?):\n{stdout[-1000:]}{stderr[-3000:]}")
    return subprocess.CompletedProcess(cmd, proc.returncode, stdout, stderr)
