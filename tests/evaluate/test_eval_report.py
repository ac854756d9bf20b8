"""`moe-lpr report`: Markdown table and PNG figures from results files; bad inputs exit 2."""

import json

import pytest

from moelpr.cli import main
from moelpr.evaluate.perplexity import evaluate_texts
from moelpr.evaluate.report import load_results, markdown

PNG = b"\x89PNG\r\n\x1a\n"


def _write(path, obj):
    path.write_text(json.dumps(obj), encoding="utf-8")
    return path


@pytest.fixture()
def result_files(tmp_path, dense_model, moe_model, tokenizer, texts, roles):
    """base.json (dense) and moe-lpr.json (MoE, with routing) from real evaluations."""
    base = evaluate_texts(dense_model, tokenizer, texts, roles, progress=False)
    moe = evaluate_texts(moe_model, tokenizer, texts, roles, progress=False)
    return _write(tmp_path / "base.json", base), _write(tmp_path / "moe-lpr.json", {"method": "moe-lpr", **moe})


def test_report_renders_table_and_figures(tmp_path, capsys, result_files):
    out = tmp_path / "report"
    assert main(["report", *map(str, result_files), "--output", str(out)]) == 0
    page = (out / "results.md").read_text()
    assert "| method | en | es | old avg | Δ old | el | hu | new avg | Δ new |" in page
    assert "| base |" in page and "| moe-lpr |" in page and "## Routing" in page
    base, moe = (json.loads(p.read_text()) for p in result_files)
    change = 100 * (moe["avg"]["old"]["ppl"] - base["avg"]["old"]["ppl"]) / base["avg"]["old"]["ppl"]
    assert f"{change:+.1f}%" in page
    for name in ("old_vs_new.png", "router_expert0.png"):
        data = (out / name).read_bytes()
        assert data.startswith(PNG) and len(data) > 5000
    assert not (out / "review_data.png").exists()  # fewer than two review runs


def test_demo_results_and_review_runs(tmp_path, result_files):
    base, moe = (json.loads(p.read_text()) for p in result_files)
    languages = base.pop("languages")
    moe.pop("languages")
    demo = _write(tmp_path / "results.json", {"languages": languages, "methods": {"base": base, "moe-lpr": moe}})
    runs = []
    for docs, shift in ((0, 0.3), (1000, 0.1), (5000, 0.05)):
        run = {
            **moe,
            "review_docs": docs,
            "method": f"review-{docs}",
            "bpb": {lang: v + (shift if lang in ("en", "es") else 0.0) for lang, v in moe["bpb"].items()},
            "languages": languages,
        }
        runs.append(_write(tmp_path / f"review-{docs}.json", run))
    out = tmp_path / "report"
    (out).mkdir()
    (out / "review_data.png").write_bytes(b"stale")
    assert main(["report", str(demo), *map(str, runs), "--output", str(out)]) == 0
    page = (out / "results.md").read_text()
    assert "## Review data" in page and "| review-1000 | 1000 |" in page
    assert (out / "review_data.png").read_bytes().startswith(PNG)
    methods = [m.name for m in load_results(demo)]
    assert methods == ["base", "moe-lpr"]
    # drawn again without review runs: the old Figure 4 goes away
    assert main(["report", str(demo), "--output", str(out)]) == 0
    assert not (out / "review_data.png").exists()


def test_base_is_the_method_named_base_else_the_first(result_files):
    methods = load_results(result_files[1]) + load_results(result_files[0])
    assert "against `base`" in markdown(methods)
    methods[1].name = "dense"
    assert "against `moe-lpr`" in markdown(methods)


def test_bad_results_files_exit_2(tmp_path, capsys, result_files):
    bad = _write(tmp_path / "bad.json", {"ppl": {"en": 3.0}})
    assert main(["report", str(result_files[0]), str(bad), "--output", str(tmp_path / "r")]) == 2
    err = capsys.readouterr().err
    assert "bad.json" in err and "'bpb'" in err and err.count("\n") == 1
    no_lang = _write(tmp_path / "nolang.json", {"ppl": {"en": 3.0}, "bpb": {"en": 1.0}})
    assert main(["report", str(no_lang), "--output", str(tmp_path / "r")]) == 2
    assert "'languages'" in capsys.readouterr().err
    demo = _write(tmp_path / "demo.json", {"languages": {"old": ["en"], "new": []}, "methods": {"x": {"bpb": {}}}})
    assert main(["report", str(demo), "--output", str(tmp_path / "r")]) == 2
    assert "methods['x']" in capsys.readouterr().err
    (tmp_path / "text.json").write_text("not json")
    assert main(["report", str(tmp_path / "text.json"), "--output", str(tmp_path / "r")]) == 2
    assert main(["report", str(tmp_path / "missing.json"), "--output", str(tmp_path / "r")]) == 2
    assert "does not exist" in capsys.readouterr().err
    assert not (tmp_path / "r" / "results.md").exists()


def test_labels_of_nearby_points_do_not_overlap():
    from moelpr.evaluate.report import place_labels, pyplot

    plt = pyplot()
    fig, ax = plt.subplots(figsize=(6, 4.8))
    points = {
        (5.50, 2.600): ["moe_lpr"],
        (5.52, 2.601): ["layermoe"],
        (5.51, 2.62): ["moe_review_no_lpr"],
        (3.0, 2.8): ["full"],
    }
    for x, y in points:
        ax.scatter([x], [y])
    ax.margins(0.25)
    place_labels(fig, ax, points)
    renderer = fig.canvas.get_renderer()
    labels = [t for t in ax.texts if t.get_text()]
    assert sorted(t.get_text() for t in labels) == sorted(n for names in points.values() for n in names)
    boxes = [t.get_window_extent(renderer) for t in labels]
    assert not any(a.overlaps(b) for i, a in enumerate(boxes) for b in boxes[i + 1 :])
    plt.close(fig)
