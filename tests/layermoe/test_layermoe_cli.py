"""`moe-lpr similarity` and `moe-lpr allocate` end to end through `moelpr.cli.main`."""

from __future__ import annotations

import json
import sys
import types
from dataclasses import dataclass

import pytest
from layermoe_helpers import LLAMA_N, LLAMA_S, make_texts, similarity_json

from moelpr.cli import main


@pytest.fixture()
def similarity_file(tmp_path):
    path = tmp_path / "similarity.json"
    path.write_text(json.dumps(similarity_json(LLAMA_S)))
    return path


def _model_dir(tmp_path, num_layers):
    model_dir = tmp_path / f"model{num_layers}"
    model_dir.mkdir()
    (model_dir / "config.json").write_text(json.dumps({"model_type": "llama", "num_hidden_layers": num_layers}))
    return model_dir


def test_allocate_end_to_end(tmp_path, similarity_file, capsys):
    out = tmp_path / "out" / "allocation.json"
    model_dir = _model_dir(tmp_path, 28)
    argv = ["allocate", "--similarity", str(similarity_file), "--budget", "70", "--output", str(out)]
    assert main(argv + ["--model", str(model_dir)]) == 0
    allocation = json.loads(out.read_text())
    assert allocation["experts_per_layer"] == LLAMA_N
    assert allocation["budget"] == 70 and allocation["total_experts"] == 84 and allocation["new_experts"] == 56
    assert allocation["scores"] == LLAMA_S and allocation["source"] == str(similarity_file)
    png = out.with_suffix(".png")
    assert png.read_bytes().startswith(b"\x89PNG") and png.stat().st_size > 5_000
    assert "84 experts (56 new)" in capsys.readouterr().out


def test_allocate_nonpositive_score_exits_2_then_least_similar_allocates(tmp_path, capsys):
    sim = tmp_path / "similarity.json"
    sim.write_text(json.dumps(similarity_json([-0.066, 0.072, 0.054, 0.054])))
    out = tmp_path / "allocation.json"
    argv = ["allocate", "--similarity", str(sim), "--budget", "9", "--output", str(out)]
    assert main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert "layer 0 has -0.066; pass --nonpositive least-similar" in err and len(err.splitlines()) == 1
    assert not out.exists()
    assert main([*argv, "--nonpositive", "least-similar"]) == 0
    allocation = json.loads(out.read_text())
    assert allocation["experts_per_layer"][0] == max(allocation["experts_per_layer"])
    assert allocation["scored_as_least_similar"] == [0] and allocation["scores"][0] == -0.066  # the measured score


def test_allocate_explicit_plot_path(tmp_path, similarity_file):
    plot = tmp_path / "figs" / "alloc.png"
    argv = ["allocate", "--similarity", str(similarity_file), "--budget", "56", "--output", str(tmp_path / "a.json")]
    assert main(argv + ["--plot", str(plot)]) == 0
    assert plot.stat().st_size > 0 and json.loads((tmp_path / "a.json").read_text())["total_experts"] == 69


@pytest.mark.parametrize(
    "case, message",
    [
        ("small_budget", "smaller than 2 × 28 layers"),
        ("missing", "does not exist"),
        ("malformed", "per_layer[0] has no numeric 'score'"),
        ("no_per_layer", "not a similarity file"),
        ("not_json", "not valid JSON"),
        ("layer_mismatch", "has 28 layers but the model has 4"),
        ("missing_model", "has no config.json"),
    ],
)
def test_allocate_bad_input_exits_2(tmp_path, similarity_file, capsys, case, message):
    budget, sim, extra = "70", similarity_file, []
    if case == "small_budget":
        budget = "50"
    elif case == "missing":
        sim = tmp_path / "nope.json"
    elif case == "malformed":
        sim = tmp_path / "bad.json"
        sim.write_text(json.dumps({"per_layer": [{"layer": 0, "pairs": {}}]}))
    elif case == "no_per_layer":
        sim = tmp_path / "bad.json"
        sim.write_text(json.dumps({"layers": []}))
    elif case == "not_json":
        sim = tmp_path / "bad.json"
        sim.write_text("{not json")
    elif case == "layer_mismatch":
        extra = ["--model", str(_model_dir(tmp_path, 4))]
    elif case == "missing_model":
        extra = ["--model", str(tmp_path / "no-model")]
    out = tmp_path / "allocation.json"
    assert main(["allocate", "--similarity", str(sim), "--budget", budget, "--output", str(out), *extra]) == 2
    err = capsys.readouterr().err.strip()
    assert message in err and len(err.splitlines()) == 1
    assert not out.exists() and not out.with_suffix(".png").exists()


@dataclass
class _Corpus:
    name: str
    language: str
    role: str
    texts: list[str]


@pytest.fixture()
def fake_corpora(monkeypatch):
    """A stand-in for `moelpr.data.corpus` (load_corpora / iter_documents), so the command is tested alone."""
    registry: dict[str, list[_Corpus]] = {}
    module = types.ModuleType("moelpr.data.corpus")
    module.load_corpora = lambda spec: registry[str(spec)]
    module.iter_documents = lambda corpus: iter(corpus.texts)
    monkeypatch.setitem(sys.modules, "moelpr.data.corpus", module)
    return registry


@pytest.fixture(scope="module")
def saved_model(tmp_path_factory, tiny_llama, tiny_tokenizer):
    model_dir = tmp_path_factory.mktemp("tiny-llama")
    tiny_llama.save_pretrained(model_dir)
    tiny_tokenizer.save_pretrained(model_dir)
    return model_dir


def _corpora_file(tmp_path, registry, corpora):
    path = tmp_path / "corpora.yaml"
    path.write_text("# stand-in; contents served by the fake corpus module\n")
    registry[str(path)] = corpora
    return path


def test_similarity_end_to_end_then_allocate(tmp_path, fake_corpora, saved_model):
    corpora = _corpora_file(
        tmp_path,
        fake_corpora,
        [
            _Corpus("en-a", "en", "old", make_texts("en", 5)),
            _Corpus("tr", "tr", "new", make_texts("tr", 20)),
            _Corpus("en-b", "en", "old", make_texts("en", 20, seed=1)),
            _Corpus("hu", "hu", "new", make_texts("hu", 20)),
        ],
    )
    out = tmp_path / "similarity.json"
    argv = ["similarity", "--model", str(saved_model), "--corpora", str(corpora), "--output", str(out)]
    assert main(argv + ["--tokens", "100", "--batch-size", "3", "--device", "cpu"]) == 0
    result = json.loads(out.read_text())
    assert result["num_layers"] == 4 and result["model"] == str(saved_model)
    assert result["languages"] == {"old": ["en"], "new": ["tr", "hu"]}
    assert result["tokens"] == {"en": 100, "tr": 100, "hu": 100}
    assert set(result["per_layer"][0]["pairs"]) == {"tr-hu", "tr-en", "hu-en"}

    alloc = tmp_path / "allocation.json"
    shifted = tmp_path / "shifted.json"  # random-model cosines can be ≤ 0; shift them to test the chain
    result["per_layer"] = [dict(e, score=e["score"] + 2.0) for e in result["per_layer"]]
    shifted.write_text(json.dumps(result))
    argv = ["allocate", "--similarity", str(shifted), "--budget", "8", "--output", str(alloc)]
    assert main(argv + ["--model", str(saved_model)]) == 0
    assert len(json.loads(alloc.read_text())["experts_per_layer"]) == 4


def test_similarity_new_override(tmp_path, fake_corpora, saved_model):
    corpora = _corpora_file(
        tmp_path,
        fake_corpora,
        [
            _Corpus("en", "en", "old", make_texts("en", 10)),
            _Corpus("tr", "tr", "new", make_texts("tr", 10)),
            _Corpus("hu", "hu", "new", make_texts("hu", 10)),
        ],
    )
    out = tmp_path / "similarity.json"
    argv = ["similarity", "--model", str(saved_model), "--corpora", str(corpora), "--output", str(out)]
    assert main(argv + ["--tokens", "40", "--new", "hu", "--device", "cpu"]) == 0
    result = json.loads(out.read_text())
    assert result["languages"] == {"old": ["en", "tr"], "new": ["hu"]}
    assert set(result["per_layer"][0]["pairs"]) == {"hu-en", "hu-tr"}


@pytest.mark.parametrize(
    "case, message",
    [
        ("missing_model", "has no config.json"),
        ("no_new", "no corpus with role 'new'"),
        ("no_old", "no corpus with role 'old'"),
        ("empty_language", "'hu' has no text in its corpora"),
        ("unknown_new", "--new names language(s) ['xx']"),
    ],
)
def test_similarity_bad_input_exits_2(tmp_path, fake_corpora, saved_model, capsys, case, message):
    en = _Corpus("en", "en", "old", make_texts("en", 3))
    tr = _Corpus("tr", "tr", "new", make_texts("tr", 3))
    corpora = {
        "no_new": [en],
        "no_old": [tr],
        "empty_language": [en, tr, _Corpus("hu", "hu", "new", ["", ""])],
    }.get(case, [en, tr])
    path = _corpora_file(tmp_path, fake_corpora, corpora)
    model = tmp_path / "no-model" if case == "missing_model" else saved_model
    extra = ["--new", "xx"] if case == "unknown_new" else []
    out = tmp_path / "similarity.json"
    argv = ["similarity", "--model", str(model), "--corpora", str(path), "--output", str(out), "--tokens", "20"]
    assert main(argv + ["--device", "cpu", *extra]) == 2
    err = capsys.readouterr().err.strip()
    assert message in err and len(err.splitlines()) == 1
    assert not out.exists()


def test_similarity_and_allocate_on_a_saved_moelpr_model(tmp_path, fake_corpora, tiny_llama, tiny_tokenizer):
    """A moelpr directory loads through `moelpr.load_model`; allocate reads its nested layer count."""
    import copy

    import moelpr

    model_dir = tmp_path / "moe"
    moe = moelpr.upcycle(copy.deepcopy(tiny_llama), num_experts=2)
    moelpr.save_model(moe, model_dir, format="full", tokenizer=tiny_tokenizer)
    corpora = _corpora_file(
        tmp_path,
        fake_corpora,
        [
            _Corpus("en", "en", "old", make_texts("en", 6)),
            _Corpus("tr", "tr", "new", make_texts("tr", 6)),
        ],
    )
    out = tmp_path / "similarity.json"
    argv = ["similarity", "--model", str(model_dir), "--corpora", str(corpora), "--output", str(out)]
    assert main(argv + ["--tokens", "30", "--device", "cpu"]) == 0
    assert json.loads(out.read_text())["num_layers"] == 4

    sim = tmp_path / "sim3.json"
    sim.write_text(json.dumps(similarity_json([0.1, 0.2, 0.3])))
    argv = ["allocate", "--similarity", str(sim), "--budget", "6", "--output", str(tmp_path / "a.json")]
    assert main(argv + ["--model", str(model_dir)]) == 2  # 3 layers in the file, 4 in the model


def test_similarity_with_real_corpora_files(tmp_path, saved_model):
    """The command against `moelpr.data.corpus` itself: a YAML list of JSONL corpora."""
    for lang in ("en", "tr"):
        lines = [json.dumps({"text": text}) for text in make_texts(lang, 10)]
        (tmp_path / f"{lang}.jsonl").write_text("\n".join(lines) + "\n")
    corpora = tmp_path / "corpora.yaml"
    corpora.write_text(
        "- {name: en, path: en.jsonl, language: en, role: old}\n- {name: tr, path: tr.jsonl, language: tr, role: new}\n"
    )
    out = tmp_path / "similarity.json"
    argv = ["similarity", "--model", str(saved_model), "--corpora", str(corpora), "--output", str(out)]
    assert main(argv + ["--tokens", "40", "--device", "cpu"]) == 0
    result = json.loads(out.read_text())
    assert result["tokens"] == {"en": 40, "tr": 40} and set(result["per_layer"][3]["pairs"]) == {"tr-en"}
