"""`moe-lpr demo --base DIR`: the whole comparison from a saved pretrained model and its tokenizer (a tiny one
made here), with lm-eval rows from local task YAMLs; the paper preset's scaling; bad input."""

from __future__ import annotations

import dataclasses
import json
import math
from pathlib import Path

import pytest
import yaml
from tiny import MICRO, toy_corpora

from moelpr.cli import main
from moelpr.demo.plans import METHODS, stage2_steps
from moelpr.demo.pretrained import check_base, fit_sizes
from moelpr.demo.settings import PAPER
from moelpr.errors import UserError


def _pretrained(root: Path, corpora: Path, layers: int = 2) -> Path:
    """A tiny Llama saved with a BPE tokenizer trained on the corpora: a stand-in for a real pretrained model."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    from moelpr.demo.tokenizer import train_tokenizer

    tok = train_tokenizer(corpora, root / "tokenizer", vocab_size=300, languages=["en", "es", "el", "ru"])
    config = LlamaConfig(
        vocab_size=len(tok),
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=layers,
        num_attention_heads=2,
        num_key_value_heads=2,
        max_position_embeddings=64,
        bos_token_id=tok.bos_token_id,
        eos_token_id=tok.eos_token_id,
        pad_token_id=tok.pad_token_id,
    )
    torch.manual_seed(0)
    path = root / "pretrained"
    LlamaForCausalLM(config).save_pretrained(path)
    tok.save_pretrained(path)
    return path


def _tasks(root: Path) -> Path:
    """Multiple-choice tasks `toy_en` (old) and `toy_el` (new), and `other_xx` (no run language)."""
    root.mkdir(parents=True)
    rows = [{"q": f"{w} is", "choices": [w, w[::-1] + "x"], "answer": 0} for w in ("abab", "cdcd", "αβαβ", "γδγδ")]
    (root / "data.jsonl").write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows), encoding="utf-8")
    for task in ("toy_en", "toy_el", "other_xx"):
        spec = {
            "task": task,
            "dataset_path": "json",
            "dataset_kwargs": {"data_files": {"test": str(root / "data.jsonl")}},
            "output_type": "multiple_choice",
            "test_split": "test",
            "doc_to_text": "{{q}}",
            "doc_to_choice": "{{choices}}",
            "doc_to_target": "{{answer}}",
            "metric_list": [{"metric": "acc"}],
        }
        (root / f"{task}.yaml").write_text(yaml.safe_dump(spec, allow_unicode=True), encoding="utf-8")
    return root


@pytest.mark.slow
def test_demo_from_a_pretrained_model_lists_every_row(tmp_path):
    pytest.importorskip("lm_eval")
    train = toy_corpora(tmp_path, "train", 60, 0)
    base = _pretrained(tmp_path, train)
    results = main(
        [
            "demo",
            "--output",
            str(tmp_path / "run"),
            "--base",
            str(base),
            "--quick",
            "--corpora",
            str(train),
            "--validation",
            str(toy_corpora(tmp_path, "validation", 5, 2)),
            "--heldout",
            str(toy_corpora(tmp_path, "heldout", 5, 1)),
            "--benchmark",
            str(_tasks(tmp_path / "tasks")),
            "--no-progress",
        ]
    )
    assert results == 0
    out = tmp_path / "run"
    res = json.loads((out / "results.json").read_text())
    assert list(res["methods"]) == list(METHODS)
    assert res["methods"]["base"]["model"] == str(base)  # the given model is the base row, not trained here
    assert not (out / "models" / "base").exists() and not (out / "tokenizer").exists()
    recipe = json.loads((out / "models" / "full" / "train_metrics.json").read_text())["recipe"]
    assert recipe["model"] == str(base)
    assert res["settings"]["base"] == str(base) and res["settings"]["sizes"]["num_layers"] == 2
    assert res["sweeps"]["chosen_gamma"] in res["settings"]["sizes"]["gamma_grid"]
    assert 0 < res["pretrain"]["embedding_share"] < 1
    report = (out / "results.md").read_text()
    for name in METHODS:
        assert f"| {name} |" in report, name
    assert f"the pretrained model {base}" in report and "Does the paper's claim reproduce here?" in report
    bench = res["benchmark"]
    assert bench["tasks"] == ["other_xx", "toy_el", "toy_en"]
    assert bench["benchmarks"] == {"toy": {"metric": None, "tasks": {"en": "toy_en", "el": "toy_el"}}}
    assert list(bench["rows"]) == list(METHODS)
    for summary in bench["rows"].values():
        assert set(summary["avg"]["old"]) == {"toy", "all"} and set(summary["avg"]["new"]) == {"toy", "all"}
    assert "## lm-eval rows" in report
    assert (out / "old_vs_new.png").is_file() and (out / "gamma_tradeoff.png").is_file()


def test_paper_preset_scales_with_the_token_budget(tmp_path):
    from transformers import LlamaConfig

    path = tmp_path / "model"
    config = LlamaConfig(num_hidden_layers=24, hidden_size=64, intermediate_size=128, num_attention_heads=4)
    config.max_position_embeddings = 4096
    config.save_pretrained(path)
    sizes = fit_sizes(PAPER, path, 20_000_000, 3)
    assert sizes.cutoff_len == 1024 and sizes.stage2_cutoff_len == 512 and sizes.lr == sizes.stage2_lr == 5e-5
    assert sizes.stage1_steps == math.ceil(20_000_000 / (64 * 1024)) and sizes.new_tokens_per_language == 6_666_666
    assert sizes.llama_pro_blocks == 12 and sizes.layermoe_budget == 24 + 48 and sizes.classifier_top_k == 7
    # stage 2: one epoch of a review 3 × the replay (0.575 % of stage 1), in 512-token blocks: ~3.4 % of stage 1
    review = 3 * sizes.replay_fraction * 20_000_000
    assert stage2_steps(int(review), sizes) / sizes.stage1_steps == pytest.approx(0.0345, abs=0.002)
    with pytest.raises(UserError, match="--tokens"):
        fit_sizes(PAPER, path, None, 3)
    small = fit_sizes(dataclasses.replace(MICRO, cutoff_len=8192), path, None, 3)
    assert small.cutoff_len == 4096 and small.stage1_steps == MICRO.stage1_steps  # a small preset keeps its budget


def test_bad_base_is_one_line(tmp_path, capsys):
    with pytest.raises(UserError, match="no config.json"):
        check_base(tmp_path)
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "llama"}))
    with pytest.raises(UserError, match="no tokenizer"):
        check_base(tmp_path)
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "moelpr", "experts_per_layer": [4]}))
    with pytest.raises(UserError, match="MoE-LPR model"):
        check_base(tmp_path)
    for args in (["--sizes", "paper"], ["--tokens", "1000"]):
        code = main(["demo", "--output", str(tmp_path / "out"), *args, "--no-progress"])
        err = capsys.readouterr().err.strip().splitlines()
        assert code == 2 and len(err) == 1 and "--base" in err[0]
