"""`moe-lpr demo`: the --quick run end to end on the LibreOffice help, reruns, and bad input (exit 2, one line)."""

from __future__ import annotations

import json
import math
import time
from pathlib import Path

import pytest

from moelpr.cli import main
from moelpr.demo.claims import OLD_TOLERANCE
from moelpr.demo.run import METHODS, choose_gamma
from moelpr.demo.settings import QUICK, settings_record


def _help_installed() -> bool:
    from moelpr.demo.libreoffice import HELP_SOURCES, help_root

    return all((help_root() / folder / "text").is_dir() for _, folder in HELP_SOURCES.values())


needs_help = pytest.mark.skipif(
    not _help_installed(), reason="needs the LibreOffice help (bash scripts/install_corpora.sh)"
)


def _demo(capsys, *args) -> tuple[int, str, str]:
    code = main(["demo", *map(str, args), "--no-progress"])
    io = capsys.readouterr()
    return code, io.out, io.err


def _one_line_error(code: int, err: str, *needles: str) -> None:
    assert code == 2
    lines = [line for line in err.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("moe-lpr demo: error:"), err
    for needle in needles:
        assert needle in lines[0], lines[0]


@pytest.fixture(scope="module")
def quick_run(tmp_path_factory):
    """One --quick demo run, shared by the tests below (about a minute on 2 idle cores)."""
    if not _help_installed():
        pytest.skip("needs the LibreOffice help (bash scripts/install_corpora.sh)")
    out = tmp_path_factory.mktemp("demo") / "run"
    start = time.monotonic()
    code = main(["demo", "--output", str(out), "--quick", "--no-progress", "--precision", "fp32"])
    return out, code, time.monotonic() - start


@needs_help
def test_quick_demo_writes_results_report_and_figures(quick_run):
    out, code, _ = quick_run
    assert code == 0
    results = json.loads((out / "results.json").read_text())
    assert results["languages"] == {"old": ["en", "es", "zh"], "new": ["el", "hu", "tr"]}
    assert list(results["methods"]) == list(METHODS)
    for name, res in results["methods"].items():
        for split in (res, res["validation"]):  # the test figures where they always were, validation beside them
            for metric in ("ppl", "bpb"):
                assert set(split[metric]) == {"en", "es", "zh", "el", "hu", "tr"}, name
                assert all(math.isfinite(v) and v > 0 for v in split[metric].values()), name
        assert res["split"] == "test" and res["validation"]["split"] == "validation"
        assert res["ppl"] != res["validation"]["ppl"], name  # two different sets of pages
    assert "routing" in results["methods"]["moe_lpr"] and "routing" not in results["methods"]["full"]
    assert len(results["claims"]) == 6 and all(isinstance(c["reproduced"], bool) for c in results["claims"])
    report = (out / "results.md").read_text()
    assert "Does the paper's claim reproduce here?" in report and "| moe_lpr |" in report
    for name in (
        "old_vs_new.png",
        "router_expert0.png",
        "router_expert0_layers.png",
        "review_curve.png",
        "gamma_tradeoff.png",
    ):
        assert (out / name).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n", name
        assert name in report
    sweeps = results["sweeps"]
    assert [p["gamma"] for p in sweeps["gamma"]] == sorted({0.0, *QUICK.gamma_grid})
    # the row is the grid point the rule picks from the grid's own validation numbers, and was trained with it
    base_old = results["methods"]["base"]["validation"]["avg"]["old"]["ppl"]
    grid = {p["gamma"]: p["validation"]["avg"]["old"]["ppl"] for p in sweeps["gamma"] if p["gamma"] > 0}
    assert sweeps["chosen_gamma"] == choose_gamma(grid, base_old, OLD_TOLERANCE)[0]
    chosen = next(p for p in sweeps["gamma"] if p["gamma"] == sweeps["chosen_gamma"])
    assert chosen["validation"]["ppl"] == results["methods"]["moe_lpr"]["validation"]["ppl"]
    config = json.loads((out / "models" / "moe_lpr" / "config.json").read_text())
    assert config["lpr_loss_coef"] == sweeps["chosen_gamma"]
    assert f"γ = {sweeps['chosen_gamma']:g}" in report
    assert [p["scale"] for p in sweeps["review"]] == [0.0, *sorted(QUICK.review_scales)]
    tokens = [p["review_tokens"] for p in sweeps["review"]]
    assert tokens == sorted(tokens) and tokens[0] == 0 and len(set(tokens)) == len(tokens)
    by_run = {p["run"]: p for p in sweeps["review"]}
    assert by_run["moe_lpr"]["validation"]["ppl"] == results["methods"]["moe_lpr"]["validation"]["ppl"]
    probes = results["probes"]["moe_lpr"]
    assert [p["layer"] for p in probes] == list(range(QUICK.num_layers))
    assert all(
        0 <= p["lpr_only"]["mean_p0_old"] <= 1 and 0.5 <= p["separate"]["balanced_accuracy"] <= 1 for p in probes
    )
    effects = results["dense_layer"]["moe_lpr"]
    assert [e["layer"] for e in effects] == list(range(QUICK.num_layers))
    assert "Where MoE-LPR's remaining forgetting sits" in report
    share = results["data"]["base_new_token_share"]
    assert 0 < share < 0.15 and results["pretrain"]["new_share"] <= QUICK.base_new_share  # a few per cent
    allocation = json.loads((out / "layermoe" / "allocation.json").read_text())
    experts = results["experts"]
    assert experts["layermoe"]["experts_per_layer"] == allocation["experts_per_layer"]  # stage 1 used the allocation
    assert experts["moe_lpr"]["experts_per_layer"] == [QUICK.num_experts] * QUICK.num_layers
    assert experts["layermoe"]["new_experts"] == sum(allocation["experts_per_layer"]) - QUICK.num_layers
    assert "New-expert budget" in report and "| layermoe |" in report
    settings = json.loads((out / "demo_settings.json").read_text())
    assert settings["preset"] == "quick" and settings["sizes"]["base_steps"] == QUICK.base_steps
    for name in METHODS:
        assert (out / "models" / name / "config.json").is_file() and (out / "eval" / "test" / f"{name}.json").is_file()


@needs_help
def test_rerun_reuses_everything(quick_run, capsys):
    out, code, _ = quick_run
    assert code == 0
    before = (out / "models" / "base" / "model.safetensors").stat().st_mtime_ns
    start = time.monotonic()
    code, stdout, err = _demo(capsys, "--output", out, "--quick", "--precision", "fp32")
    assert code == 0, err
    assert time.monotonic() - start < 30  # nothing is trained or evaluated again
    assert (out / "models" / "base" / "model.safetensors").stat().st_mtime_ns == before
    finished = [
        line.split()[1]
        for line in stdout.splitlines()
        if line.startswith("[demo] ") and line.split()[1] in METHODS and "old ppl" in line
    ]
    assert finished == list(METHODS)  # one line per method, in order


@needs_help
def test_rerun_with_other_settings_is_refused(quick_run, capsys):
    out, _, _ = quick_run
    code, _, err = _demo(capsys, "--output", out, "--quick", "--seed", 7, "--precision", "fp32")
    _one_line_error(code, err, "other settings", "seed", "--overwrite")


def test_unknown_language_code(tmp_path, capsys):
    code, _, err = _demo(capsys, "--output", tmp_path / "out", "--quick", "--new", "tr,xx")
    _one_line_error(code, err, "'xx'")
    code, _, err = _demo(capsys, "--output", tmp_path / "out", "--quick", "--new", "uk")  # a man-page language
    _one_line_error(code, err, "'uk'", "supported: en, es, zh, el, hu, tr")
    assert not (tmp_path / "out").exists()


def test_settings_mismatch_without_running(tmp_path, capsys):
    out = tmp_path / "out"
    out.mkdir()
    languages = {"old": ["en", "es", "zh"], "new": ["el", "hu", "tr"]}
    record = settings_record(
        QUICK, preset="quick", seed=0, precision="fp32", languages=languages, corpora=None, corpus="libreoffice"
    )
    (out / "demo_settings.json").write_text(json.dumps(record))
    code, _, err = _demo(capsys, "--output", out, "--seed", 0, "--precision", "fp32")  # default, not quick
    _one_line_error(code, err, "other settings", "preset")


def test_size_presets_are_checked(tmp_path, capsys):
    code, _, err = _demo(capsys, "--output", tmp_path / "a", "--sizes", "huge")
    _one_line_error(code, err, "--sizes", "'huge'", "default")
    code, _, err = _demo(capsys, "--output", tmp_path / "b", "--quick", "--sizes", "large")
    _one_line_error(code, err, "--quick", "--sizes large")
    assert not (tmp_path / "a").exists() and not (tmp_path / "b").exists()


def test_non_demo_directory_is_refused(tmp_path, capsys):
    (tmp_path / "precious.txt").write_text("keep me")
    code, _, err = _demo(capsys, "--output", tmp_path, "--quick", "--overwrite")
    _one_line_error(code, err, "holds no demo run")
    assert (tmp_path / "precious.txt").is_file()


def test_corpora_needs_validation_heldout_and_existing_files(tmp_path, capsys):
    code, _, err = _demo(
        capsys,
        "--output",
        tmp_path / "a",
        "--quick",
        "--corpora",
        tmp_path / "c.yaml",
        "--heldout",
        tmp_path / "h.yaml",
    )
    _one_line_error(code, err, "--validation", "--heldout")
    code, _, err = _demo(
        capsys,
        "--output",
        tmp_path / "b",
        "--quick",
        "--corpora",
        tmp_path / "c.yaml",
        "--validation",
        tmp_path / "v.yaml",
        "--heldout",
        tmp_path / "h.yaml",
    )
    _one_line_error(code, err, "does not exist")


def _write_corpora(tmp_path: Path, entries: list[tuple[str, str]], name: str) -> Path:
    import yaml

    rows = []
    for lang, role in entries:
        path = tmp_path / f"{name}_{lang}.jsonl"
        path.write_text(json.dumps({"text": f"some {lang} text"}) + "\n")
        rows.append({"name": f"{name}_{lang}", "path": path.name, "language": lang, "role": role})
    spec = tmp_path / f"{name}.yaml"
    spec.write_text(yaml.safe_dump(rows))
    return spec


def test_user_corpora_errors(tmp_path, capsys):
    only_new = _write_corpora(tmp_path, [("tr", "new")], "train")
    held = _write_corpora(tmp_path, [("tr", "new")], "held")
    files = ("--validation", held, "--heldout", held)
    code, _, err = _demo(capsys, "--output", tmp_path / "a", "--quick", "--corpora", only_new, *files)
    _one_line_error(code, err, "both roles")
    both = _write_corpora(tmp_path, [("en", "old"), ("tr", "new")], "train2")
    code, _, err = _demo(capsys, "--output", tmp_path / "b", "--quick", "--corpora", both, *files)
    _one_line_error(code, err, "no validation corpus", "en")
    broken = tmp_path / "broken.yaml"
    broken.write_text("- name: x\n  path: [unclosed\n")
    code, _, err = _demo(capsys, "--output", tmp_path / "c", "--quick", "--corpora", broken, *files)
    _one_line_error(code, err, "cannot parse")


@needs_help
def test_embedding_share_counts_the_base(quick_run):
    import moelpr
    from moelpr.demo.diagnosis import embedding_share

    out, _, _ = quick_run
    model = moelpr.load_model(out / "models" / "base")
    total = sum(p.numel() for p in model.parameters())
    embeddings = model.get_input_embeddings().weight.numel() + model.get_output_embeddings().weight.numel()
    sizes = json.loads((out / "demo_settings.json").read_text())["sizes"]
    assert embedding_share(sizes) == pytest.approx(embeddings / total)


def test_gamma_rule_takes_the_smallest_within_tolerance_else_the_least_forgetting():
    base = 100.0
    assert choose_gamma({0.01: 108.0, 0.1: 104.0, 0.3: 103.0, 1.0: 105.5}, base, 0.05)[0] == 0.1
    assert choose_gamma({1.0: 105.0, 0.3: 104.9}, base, 0.05)[0] == 0.3  # grid order does not matter
    gamma, reason = choose_gamma({0.1: 109.0, 0.3: 106.0, 1.0: 107.0}, base, 0.05)
    assert gamma == 0.3 and reason.startswith("no γ keeps") and "γ 0.3: +6.0%" in reason
