"""The demo in both precisions on any CPU: `auto` with the native-bf16 detection forced each way (the `--quick`
run in test_demo_run.py takes float32, `auto` at its sizes), so CI runs the bf16 and the fp32 demo anywhere."""

from __future__ import annotations

import json
import random
from pathlib import Path

import pytest
import yaml

from moelpr.demo import run as demo_run
from moelpr.demo import settings
from moelpr.demo.settings import DemoSizes

# Toy sizes: every step of the pipeline runs, in seconds (bf16 is ~8x slower on CPUs without native bf16).
MICRO = DemoSizes(
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
ALPHABETS = {
    "en": ("old", "abcdefghijklmnop"),
    "es": ("old", "aeioulmnrstdñ"),
    "el": ("new", "αβγδεζηθικλμνξοπ"),
    "ru": ("new", "абвгдежзийклмноп"),
}


def _corpora(root: Path, name: str, docs: int, seed: int) -> Path:
    """Four made-up languages; most words are shared, so the layers see some similarity."""
    entries = []
    shared = random.Random("shared")
    common = ["".join(shared.choice("aeiou") for _ in range(shared.randint(2, 4))) for _ in range(40)]
    for lang, (role, alphabet) in ALPHABETS.items():
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


def test_auto_is_bf16_only_where_the_sizes_ask_and_the_cpu_has_it(monkeypatch):
    for native in (True, False):
        monkeypatch.setattr(settings, "cpu_has_native_bf16", lambda native=native: native)
        assert settings.resolve_precision("auto", settings.FULL) == "fp32"
        assert settings.resolve_precision("auto", settings.QUICK) == "fp32"
        assert settings.resolve_precision("auto", settings.LARGE) == ("bf16" if native else "fp32")
        assert settings.resolve_precision("bf16", settings.FULL) == "bf16"


@pytest.mark.parametrize("forced_bf16", [True, False], ids=["native-bf16", "no-native-bf16"])
def test_demo_runs_in_both_precisions(tmp_path, monkeypatch, forced_bf16):
    monkeypatch.setattr(settings, "cpu_has_native_bf16", lambda: forced_bf16)
    precision = "bf16" if forced_bf16 else "fp32"
    out = tmp_path / "run"
    results = demo_run.run_demo(
        out,
        corpora=str(_corpora(tmp_path, "train", 60, 0)),
        validation=str(_corpora(tmp_path, "validation", 5, 2)),
        heldout=str(_corpora(tmp_path, "heldout", 5, 1)),
        precision="auto",
        custom_sizes=MICRO,
        progress=False,
        log=lambda line: None,
    )
    assert json.loads((out / "demo_settings.json").read_text())["precision"] == precision
    assert f"precision {precision} (training and evaluation)" in (out / "results.md").read_text()
    for name in demo_run.METHODS:
        for split in ("validation", "test"):
            assert json.loads((out / "eval" / split / f"{name}.json").read_text())["precision"] == precision, name
    base_args = json.loads((out / "models" / "base" / "train_metrics.json").read_text())["recipe"]
    assert base_args["bf16"] is forced_bf16
    assert set(results["methods"]) == set(demo_run.METHODS)
