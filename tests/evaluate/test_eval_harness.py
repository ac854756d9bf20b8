"""lm-eval integration: `moe-lpr benchmark` is stock lm-eval `hf` with remote code; shipped suites."""

import json
import re
import sys
from pathlib import Path

import pytest
import yaml
from tiny import run_without_moelpr

from moelpr.cli import main
from moelpr.evaluate import harness
from moelpr.evaluate.perplexity import evaluate_texts

lm_eval = pytest.importorskip("lm_eval")


def _local_tasks(root: Path, docs: list[str]) -> Path:
    """A loglikelihood_rolling task over `docs` and a group running a multiple-choice task 2-shot."""
    root.mkdir(parents=True, exist_ok=True)
    (root / "ppl.jsonl").write_text(
        "".join(json.dumps({"text": d}, ensure_ascii=False) + "\n" for d in docs), encoding="utf-8"
    )
    mc = [
        {"question": f"{a} plus {b}?", "choices": [str(a + b), str(a + b + 1), str(a * b + 7)], "answer": 0}
        for a, b in [(1, 2), (2, 3), (3, 4), (4, 5), (5, 6), (6, 7)]
    ]
    (root / "mc.jsonl").write_text("".join(json.dumps(r) + "\n" for r in mc), encoding="utf-8")
    (root / "local_ppl.yaml").write_text(
        yaml.safe_dump(
            {  # absolute data paths: lm-eval resolves against the CWD
                "task": "local_ppl",
                "dataset_path": "json",
                "dataset_kwargs": {"data_files": {"test": str(root / "ppl.jsonl")}},
                "output_type": "loglikelihood_rolling",
                "test_split": "test",
                "doc_to_text": "",
                "doc_to_target": "{{text}}",
                "metric_list": [
                    {"metric": "word_perplexity"},
                    {"metric": "byte_perplexity"},
                    {"metric": "bits_per_byte"},
                ],
            }
        )
    )
    (root / "local_mc.yaml").write_text(
        yaml.safe_dump(
            {
                "task": "local_mc",
                "dataset_path": "json",
                "dataset_kwargs": {"data_files": {"train": str(root / "mc.jsonl"), "test": str(root / "mc.jsonl")}},
                "output_type": "multiple_choice",
                "training_split": "train",
                "test_split": "test",
                "doc_to_text": "Question: {{question}}\nAnswer:",
                "doc_to_choice": "{{choices}}",
                "doc_to_target": "{{answer}}",
                "metric_list": [{"metric": "acc"}],
            }
        )
    )
    (root / "local_group.yaml").write_text(
        yaml.safe_dump(
            {  # the shape of our suite YAMLs
                "group": "local_group",
                "task": [{"task": "local_mc", "num_fewshot": 2}],
                "aggregate_metric_list": [{"metric": "acc", "weight_by_size": False}],
            }
        )
    )
    return root


def _lm_eval_bpb(lm, task_dir: Path) -> float:
    from lm_eval.tasks import TaskManager

    out = lm_eval.simple_evaluate(
        model=lm,
        tasks=["local_ppl"],
        bootstrap_iters=0,
        task_manager=TaskManager(include_path=str(task_dir), include_defaults=False),
    )
    return out["results"]["local_ppl"]["bits_per_byte,none"]


def test_benchmark_on_a_saved_dense_model_is_stock_hf(tmp_path, dense_dir, dense_model, tokenizer, texts):
    from lm_eval.models.huggingface import HFLM

    docs = texts["en"] + texts["el"]  # long (several windows) and multi-byte documents
    task_dir = _local_tasks(tmp_path / "tasks", docs)
    record = harness.run_benchmark(
        dense_dir,
        ["local_ppl", "local_group"],
        include_paths=[task_dir],
        device="cpu",
        batch_size=3,
        include_defaults=False,
        bootstrap_iters=0,
    )
    stock = _lm_eval_bpb(HFLM(pretrained=dense_model, tokenizer=tokenizer, batch_size=3), task_dir)
    assert record["results"]["local_ppl"]["bits_per_byte,none"] == pytest.approx(stock, rel=1e-6)
    # lm-eval's rolling windows prepend BOS and our tokenizer adds one too: BOS→BOS is scored once per
    # document (documented in harness.py); `moe-lpr eval` does not score it, so its bpb is lower.
    ours = evaluate_texts(dense_model, tokenizer, {"xx": docs}, {"xx": "old"}, progress=False)
    assert stock > ours["bpb"]["xx"] * (1 + 1e-3)
    assert record["n-shot"]["local_mc"] == 2  # the group's num_fewshot reaches its task
    assert 0.0 <= record["results"]["local_group"]["acc,none"] <= 1.0
    assert record["model"] == str(dense_dir) and record["summary"]["scores"] == {}
    json.dumps(record)  # JSON-ready


# The stock `lm_eval` CLI in a process where moelpr cannot be imported, on a directory `moe-lpr train` wrote.
STOCK_CLI = r"""
from lm_eval.__main__ import cli_evaluate
sys.argv = ["lm_eval", *sys.argv[1:]]
cli_evaluate()
"""


def test_stock_lm_eval_cli_runs_a_train_output_as_moe_lpr_benchmark_does(tmp_path, dense_dir, corpora_file, texts):
    import moelpr
    from moelpr.train import load_recipe, train

    out = train(
        load_recipe(
            {
                "model": str(dense_dir),
                "corpora": str(corpora_file),
                "num_experts": 3,
                "cutoff_len": 16,
                "output_dir": str(tmp_path / "stage1"),
                "max_steps": 2,
                "per_device_train_batch_size": 2,
                "learning_rate": 0.05,
                "save_strategy": "no",
                "report_to": "none",
                "use_cpu": True,
                "disable_tqdm": True,
            }
        )
    )
    assert (out / "modeling_moelpr.py").is_file()  # a native train output, no export step
    task_dir = _local_tasks(tmp_path / "tasks", texts["es"] + texts["hu"])
    args = [
        "run",
        "--model",
        "hf",
        "--model_args",
        f"pretrained={out},trust_remote_code=True,dtype=float32",
        "--tasks",
        "local_ppl",
        "local_group",
        "--include_path",
        str(task_dir),
        "--device",
        "cpu",
        "--batch_size",
        "2",
        "--output_path",
        str(tmp_path / "cli"),
    ]
    run_without_moelpr(STOCK_CLI, args, tmp_path)
    cli = json.loads(next((tmp_path / "cli").rglob("results_*.json")).read_text())["results"]

    record = harness.run_benchmark(
        out,
        ["local_ppl", "local_group"],
        include_paths=[task_dir],
        device="cpu",
        dtype="float32",
        batch_size=2,
        include_defaults=False,
        bootstrap_iters=0,
    )
    ours = record["results"]
    assert cli["local_ppl"]["bits_per_byte,none"] == pytest.approx(ours["local_ppl"]["bits_per_byte,none"], rel=1e-6)
    assert cli["local_group"]["acc,none"] == ours["local_group"]["acc,none"]
    dense = harness.run_benchmark(
        dense_dir,
        ["local_ppl"],
        include_paths=[task_dir],
        device="cpu",
        dtype="float32",
        batch_size=2,
        include_defaults=False,
        bootstrap_iters=0,
    )["results"]
    assert ours["local_ppl"]["bits_per_byte,none"] != dense["local_ppl"]["bits_per_byte,none"]  # trained: it moved
    assert isinstance(moelpr.load_model(out), moelpr.MoELPRForCausalLM)


def test_delta_checkpoints_are_refused_with_the_way_out(tmp_path, dense_dir):
    import moelpr

    moe = moelpr.upcycle(moelpr.load_model(dense_dir), num_experts=2)
    moe.config.base_model_path = str(dense_dir)
    moelpr.save_model(moe, tmp_path / "delta", format="delta")
    with pytest.raises(harness.UserError, match="delta checkpoint.*export --model DIR --format hf"):
        harness.run_benchmark(tmp_path / "delta", ["local_ppl"], include_defaults=False)


def _referenced_tasks(data: dict) -> list[str]:
    return [t if isinstance(t, str) else t["task"] for t in data["task"]]


def test_shipped_suites_mirror_the_table_and_reference_existing_tasks():
    files = {p.stem: yaml.safe_load(p.read_text()) for p in harness.TASKS_DIR.glob("*.yaml")}
    assert all(data["group"] == stem for stem, data in files.items())
    for bench, spec in harness.PAPER_BENCHMARKS.items():
        for role, langs in (("old", harness.OLD_LANGUAGES), ("new", harness.NEW_LANGUAGES)):
            data = files[f"moelpr_{bench}_{role}"]
            assert _referenced_tasks(data) == [spec["tasks"][lang] for lang in langs if lang in spec["tasks"]]
            assert {t["num_fewshot"] for t in data["task"]} == {spec["num_fewshot"]}
            assert data["aggregate_metric_list"][0]["metric"] == spec["metric"]
    for names in harness.SUITES.values():
        assert all(name in files for name in names)
    # every task a suite references is a group of ours or exists in the installed lm-eval's task files
    root = Path(lm_eval.__file__).parent / "tasks"
    pattern = re.compile(r"^(?:task|group):\s*['\"]?([\w\-.]+)", re.M)
    known = {name for p in root.rglob("*.yaml") for name in pattern.findall(p.read_text(errors="ignore"))}
    referenced = {t for data in files.values() for t in _referenced_tasks(data)}
    missing = sorted(referenced - known - set(files))
    assert not missing, f"suite YAMLs reference tasks lm-eval {lm_eval.__version__} lacks: {missing}"


def test_lm_eval_reads_the_shipped_files_as_groups():
    from lm_eval.tasks import TaskManager

    manager = TaskManager(include_path=str(harness.TASKS_DIR), include_defaults=False)  # ours only: fast
    assert set(manager.all_groups) == {p.stem for p in harness.TASKS_DIR.glob("*.yaml")}


def test_summarize_gives_the_papers_averages():
    results = {
        "arc_challenge": {"acc_norm,none": 0.4},
        "arc_zh": {"acc_norm,none": 0.3},
        "arc_hu": {"acc_norm,none": 0.2},
        "belebele_ell_Grek": {"acc,none": 0.5},
        "belebele_tur_Latn": {"acc,none": 0.7},
        "global_mmlu_full_el": {"acc,none": 0.25},
        "mmlu": {"acc,none": float("nan")},
    }
    summary = harness.summarize(results)
    assert summary["scores"] == {"arc": {"en": 0.4, "zh": 0.3, "hu": 0.2}, "belebele": {"el": 0.5, "tr": 0.7}}
    assert summary["avg"]["old"] == pytest.approx({"arc": 0.35, "all": 0.35})
    assert summary["avg"]["new"] == pytest.approx({"arc": 0.2, "belebele": 0.6, "all": 0.4})
    assert summary["substitutes"] == {"mmlu": {"el": 0.25}}


def _benchmark(capsys, *args):
    code = main(["benchmark", *args])
    return code, capsys.readouterr().err


def test_benchmark_bad_inputs_exit_2(tmp_path, capsys, monkeypatch, dense_dir):
    code, err = _benchmark(capsys, "--model", str(tmp_path / "nope"), "--suite", "moelpr-paper", "--output", "o.json")
    assert code == 2 and "does not exist" in err
    code, err = _benchmark(capsys, "--model", str(dense_dir), "--output", str(tmp_path / "o.json"))
    assert code == 2 and "--suite" in err
    monkeypatch.setitem(sys.modules, "lm_eval", None)  # as if lm-eval were not installed
    code, err = _benchmark(capsys, "--model", str(dense_dir), "--suite", "moelpr-paper", "--output", "o.json")
    assert code == 2 and "pip install 'moelpr[eval]'" in err
    assert err.count("\n") == 1 and not (tmp_path / "o.json").exists()


def test_unknown_task_is_a_user_error(tmp_path, dense_dir):
    with pytest.raises(harness.UserError, match="unknown lm-eval task"):
        harness.run_benchmark(dense_dir, ["no_such_task"], include_defaults=False)


def test_summarize_averages_the_runs_own_languages():
    results = {
        "belebele_ell_Grek": {"acc,none": 0.5},
        "belebele_tur_Latn": {"acc,none": 0.7},
        "belebele_hun_Latn": {"acc,none": 0.3},
        "belebele_eng_Latn": {"acc,none": 0.9},
    }
    summary = harness.summarize(results, old=("en",), new=("tr", "hu"))
    assert summary["avg"]["new"] == pytest.approx({"belebele": 0.5, "all": 0.5})  # Greek left out
    assert summary["avg"]["old"] == pytest.approx({"belebele": 0.9, "all": 0.9})
    assert summary["languages"] == {"old": ["en"], "new": ["tr", "hu"]}
    local = harness.language_benchmarks(["quiz_hu", "quiz_tr", "quiz_xx", "story_en"], ["en", "tr", "hu"])
    assert local == {
        "quiz": {"metric": None, "tasks": {"hu": "quiz_hu", "tr": "quiz_tr"}},
        "story": {"metric": None, "tasks": {"en": "story_en"}},
    }
    scores = {"quiz_hu": {"acc,none": 0.2, "acc_norm,none": 0.4}, "quiz_tr": {"acc,none": 0.6}, "story_en": {}}
    local_summary = harness.summarize(scores, old=("en",), new=("tr", "hu"), benchmarks=local)
    assert local_summary["scores"] == {"quiz": {"hu": 0.4, "tr": 0.6}}  # acc_norm first where reported
    assert local_summary["avg"]["new"]["all"] == pytest.approx(0.5) and local_summary["avg"]["old"] == {}
