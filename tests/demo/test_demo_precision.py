"""The demo in both precisions on any CPU: `auto` with the native-bf16 detection forced each way (the `--quick`
run in test_demo_run.py takes float32, `auto` at its sizes), so CI runs the bf16 and the fp32 demo anywhere."""

from __future__ import annotations

import json

import pytest
from tiny import MICRO, toy_corpora

from moelpr.demo import run as demo_run
from moelpr.demo import settings


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
        corpora=str(toy_corpora(tmp_path, "train", 60, 0)),
        validation=str(toy_corpora(tmp_path, "validation", 5, 2)),
        heldout=str(toy_corpora(tmp_path, "heldout", 5, 1)),
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
    _check_frozen_parts(out, results)


def _check_frozen_parts(out, results: dict) -> None:
    """The two validation runs of reading (c) (embeddings + LM head frozen, or only they trained) leave the
    frozen part exactly as the base had it and change the rest."""
    from safetensors.torch import load_file

    base = load_file(out / "models" / "base" / "model.safetensors")
    embeddings = {"model.embed_tokens.weight", "lm_head.weight"}
    for run, frozen in (("full_frozen_embeddings", embeddings), ("full_embeddings_only", set(base) - embeddings)):
        weights = load_file(out / "models" / "sweeps" / run / "model.safetensors")
        assert all(weights[k].equal(base[k]) for k in frozen), run
        assert not any(weights[k].equal(base[k]) for k in set(base) - frozen), run
    assert [p["frozen"] for p in results["sweeps"]["embeddings"]] == ["embeddings", "rest"]
    if not (results["claims"][3]["reproduced"] and results["claims"][5]["reproduced"]):  # the section is there
        assert "Full fine-tuning with a part frozen" in (out / "results.md").read_text()
