"""Corpora specs (YAML, inline, dataset_info.json), path resolution, file reading and every bad-input error."""

from __future__ import annotations

import gzip
import json
from pathlib import Path

import pytest
import yaml

from moelpr.data.corpus import Corpus, file_format, iter_documents, load_corpora
from moelpr.errors import UserError


def _raises(match: str):
    return pytest.raises(UserError, match=match)


def _one_line(excinfo) -> str:
    message = str(excinfo.value)
    assert "\n" not in message
    return message


def _entry(path: str = "en.jsonl", **overrides) -> dict:
    return {"name": "en", "path": path, "language": "en", "role": "old", **overrides}


# ------------------------------------------------------------------------------------------------- specs


def test_yaml_list_and_mapping_resolve_relative_to_spec_dir(tmp_path, jsonl):
    jsonl(tmp_path / "data" / "en.jsonl", ["x"])
    jsonl(tmp_path / "data" / "el.jsonl", ["y"])
    entries = [_entry("data/en.jsonl"), {"name": "el", "path": "data/el.jsonl", "language": "el", "role": "new"}]
    spec_dir = tmp_path / "specs"
    spec_dir.mkdir()
    (spec_dir / "list.yaml").write_text(yaml.safe_dump([{**e, "path": "../" + e["path"]} for e in entries]))
    (tmp_path / "map.yaml").write_text(yaml.safe_dump({"corpora": entries}))
    for spec in (spec_dir / "list.yaml", str(tmp_path / "map.yaml")):
        en, el = load_corpora(spec)
        assert en.paths == [str(tmp_path.resolve() / "data" / "en.jsonl")]
        assert (en.role, en.group, el.role, el.group) == ("old", 0, "new", 1)
        assert (el.language, el.text_column, el.max_docs) == ("el", "text", None)


def test_inline_list_uses_base_dir(tmp_path, jsonl):
    jsonl(tmp_path / "en.jsonl", ["x"])
    (corpus,) = load_corpora([_entry(group=0, max_docs=5, text_field="body")], base_dir=tmp_path)  # the old name
    assert corpus.paths == [str(tmp_path / "en.jsonl")]
    assert (corpus.max_docs, corpus.text_column) == (5, "body")
    (corpus,) = load_corpora([_entry(text_column="body", weight=2)], base_dir=tmp_path)
    assert (corpus.text_column, corpus.mix) == ("body", {"weight": 2})


def test_paths_lists_globs_and_directories_expand_in_order(tmp_path, jsonl):
    for name in ("b.jsonl", "a.jsonl", "c.txt", "README.md"):
        jsonl(tmp_path / "shards" / name, ["x"])
    jsonl(tmp_path / "extra.jsonl.gz", ["x"], gz=True)
    entry = _entry(["shards/*.jsonl", "extra.jsonl.gz", "shards/a.jsonl"])
    (corpus,) = load_corpora([entry], base_dir=tmp_path)
    assert [Path(p).name for p in corpus.paths] == ["a.jsonl", "b.jsonl", "extra.jsonl.gz"]  # deduplicated
    (corpus,) = load_corpora([_entry("shards")], base_dir=tmp_path)  # a directory: its supported files
    assert [Path(p).name for p in corpus.paths] == ["a.jsonl", "b.jsonl", "c.txt"]
    entry = _entry()
    entry["paths"] = ["shards/a.jsonl"]  # `paths` is accepted as a synonym of `path`
    del entry["path"]
    (corpus,) = load_corpora([entry], base_dir=tmp_path)
    assert corpus.paths == [str(tmp_path / "shards" / "a.jsonl")]


def test_new_corpus_may_set_lifelong_group(tmp_path, jsonl):
    jsonl(tmp_path / "bn.jsonl", ["x"])
    (corpus,) = load_corpora(
        [{"name": "bn", "path": "bn.jsonl", "language": "bn", "role": "new", "group": 2}], base_dir=tmp_path
    )
    assert corpus.group == 2


@pytest.mark.parametrize("key", ["name", "path", "language", "role"])
def test_missing_required_key(tmp_path, jsonl, key):
    jsonl(tmp_path / "en.jsonl", ["x"])
    entry = _entry()
    del entry[key]
    with _raises(f"missing '{key}'") as e:
        load_corpora([entry], base_dir=tmp_path)
    _one_line(e)


@pytest.mark.parametrize(
    ("entry", "match"),
    [
        (_entry(role="original"), r"unknown role 'original'; valid roles: old, new"),
        (_entry(langauge="en"), r"unknown key 'langauge'; did you mean 'language'\?"),
        (_entry(text_colum="body"), r"did you mean 'text_column'\?"),
        (_entry(text_column="a", text_field="b"), r"either text_column or text_field"),
        (_entry(weight=0), r"weight must be a number > 0"),
        (_entry(tokens=1.5), r"tokens must be a positive integer"),
        (_entry(weight=1, epochs=2), r"give one of weight, tokens or epochs, not weight and epochs"),
        (_entry("nothing/*.jsonl"), r"matches no file"),
        (_entry("missing.jsonl"), r"does not exist"),
        (_entry("en.tsv"), r"unsupported data file .*en\.tsv.*supported: \.jsonl"),
        (_entry("en.parquet.gz"), r"unsupported data file"),
        (_entry("plain_dir"), r"holds no \.jsonl/.*files"),
        (_entry(group=1), r"old-language corpus is group 0"),
        (_entry(role="new", group=0), r"needs 1 <= group <= 127"),
        (_entry(max_docs=0), r"max_docs must be a positive integer"),
        (_entry(language=False), r"YAML boolean.*quote it"),
        ({**_entry(), "paths": ["en.jsonl"]}, r"either path or paths"),
        ("en.jsonl", r"expected a mapping"),
        (_entry(path=[]), r"non-empty list"),
    ],
)
def test_bad_entries(tmp_path, jsonl, entry, match):
    jsonl(tmp_path / "en.jsonl", ["x"])
    (tmp_path / "en.tsv").write_text("text\nx\n")
    (tmp_path / "plain_dir").mkdir()
    (tmp_path / "en.parquet.gz").write_bytes(b"")
    with _raises(match) as e:
        load_corpora([entry], base_dir=tmp_path)
    _one_line(e)


def test_duplicate_names_and_bad_top_level(tmp_path, jsonl):
    jsonl(tmp_path / "en.jsonl", ["x"])
    with _raises("duplicate corpus name 'en'"):
        load_corpora([_entry(), _entry()], base_dir=tmp_path)
    with _raises("expected a non-empty list"):
        load_corpora([], base_dir=tmp_path)
    (tmp_path / "c.yaml").write_text(yaml.safe_dump({"corpora": [_entry()], "seed": 1}))
    with _raises("unknown top-level key 'seed'"):
        load_corpora(tmp_path / "c.yaml")
    (tmp_path / "broken.yaml").write_text("corpora: [\n  - name: en\n")
    with _raises("cannot parse corpora file") as e:
        load_corpora(tmp_path / "broken.yaml")
    _one_line(e)
    with _raises("does not exist"):
        load_corpora(tmp_path / "nope.yaml")


def test_dataset_info_json(tmp_path, jsonl):
    jsonl(tmp_path / "en.json", [{"content": "x"}])
    jsonl(tmp_path / "el.json", ["y"])
    jsonl(tmp_path / "bn.json", ["z"])
    info = {
        "en": {"file_name": "en.json", "columns": {"prompt": "content"}, "language": "old", "group_tag": "g0"},
        "el": {"file_name": "el.json", "language": "new", "formatting": "alpaca"},
        "bn": {"file_name": "bn.json", "columns": {"prompt": "text"}, "language": "new", "group_tag": "g2"},
    }
    (tmp_path / "dataset_info.json").write_text(json.dumps(info))
    en, el, bn = load_corpora(tmp_path / "dataset_info.json")
    assert (en.name, en.language, en.role, en.group, en.text_column) == ("en", "en", "old", 0, "content")
    assert (el.language, el.role, el.group, el.text_column) == ("el", "new", 1, "text")
    assert (bn.role, bn.group) == ("new", 2)
    assert en.paths == [str(tmp_path / "en.json")]
    assert list(iter_documents(en)) == ["x"]


@pytest.mark.parametrize(
    ("entry", "match"),
    [
        ({"file_name": "el.json"}, r"missing 'language'; set it to \"old\""),
        ({"language": "new"}, r"missing 'file_name'"),
        ({"file_name": "el.json", "language": "new", "hf_hub_url": "x/y"}, r"'hf_hub_url' is not supported"),
        ({"file_name": "el.json", "language": "new", "group_tg": "g1"}, r"did you mean 'group_tag'\?"),
        ({"file_name": "el.json", "language": "new", "group_tag": "one"}, r"group_tag must look like 'g0'"),
        ({"file_name": "el.json", "language": "new", "group_tag": "g0"}, r"needs 1 <= group"),
        ({"file_name": "el.json", "language": "newer"}, r"'language' is 'newer'; set it to \"old\""),
    ],
)
def test_bad_dataset_info(tmp_path, jsonl, entry, match):
    jsonl(tmp_path / "el.json", ["y"])
    (tmp_path / "dataset_info.json").write_text(json.dumps({"el": entry}))
    with _raises(match) as e:
        load_corpora(tmp_path / "dataset_info.json")
    _one_line(e)


# ----------------------------------------------------------------------------------------------- reading


def _corpus(*paths: Path, **kw) -> Corpus:
    return Corpus(name="c", paths=[str(p) for p in paths], language="en", role="old", **kw)


def test_every_format_reads_the_same_documents(tmp_path, jsonl):
    import pyarrow as pa
    import pyarrow.parquet as pq

    docs = ["first doc", "second δεύτερο", "third"]
    files = [
        jsonl(tmp_path / "a.jsonl", docs),
        jsonl(tmp_path / "b.jsonl.gz", docs, gz=True),
        jsonl(tmp_path / "lines.json", docs),
    ]
    (tmp_path / "arr.json").write_text(json.dumps([{"text": d} for d in docs], indent=2))
    with gzip.open(tmp_path / "arr.json.gz", "wt", encoding="utf-8") as f:
        json.dump([{"text": d} for d in docs], f)
    (tmp_path / "t.txt").write_text("first doc\n\nsecond δεύτερο\r\n   \nthird\n", encoding="utf-8")
    with gzip.open(tmp_path / "t.txt.gz", "wt", encoding="utf-8") as f:
        f.write("first doc\nsecond δεύτερο\nthird")
    pq.write_table(pa.table({"id": [1, 2, 3], "text": docs}), tmp_path / "p.parquet", row_group_size=2)
    files += [tmp_path / n for n in ("arr.json", "arr.json.gz", "t.txt", "t.txt.gz", "p.parquet")]
    for path in files:
        assert list(iter_documents(_corpus(path))) == docs, path
    assert file_format(tmp_path / "X.JSONL.GZ") == (".jsonl", "gzip")
    assert file_format(tmp_path / "x.csv.zst") == (".csv", "zstd")


def test_order_max_docs_empty_and_stats(tmp_path, jsonl):
    a = jsonl(tmp_path / "a.jsonl", ["1", "", "2"])
    b = jsonl(tmp_path / "b.jsonl", ["3", "4", "5"])
    stats: dict = {}
    assert list(iter_documents(_corpus(a, b), stats=stats)) == ["1", "2", "3", "4", "5"]
    assert stats == {"docs": 5, "skipped": 0}
    assert list(iter_documents(_corpus(a, b, max_docs=3))) == ["1", "2", "3"]
    assert list(iter_documents(_corpus(a, b, max_docs=99))) == ["1", "2", "3", "4", "5"]


def test_malformed_json_line_error_and_skip(tmp_path):
    path = tmp_path / "bad.jsonl"
    path.write_text('{"text": "ok"}\n{"text": "broken\n{"text": "fine"}\n[1, 2]\n')
    with _raises(r"bad\.jsonl:2: malformed JSON") as e:
        list(iter_documents(_corpus(path)))
    _one_line(e)
    stats: dict = {}
    assert list(iter_documents(_corpus(path), on_bad_record="skip", stats=stats)) == ["ok", "fine"]
    assert stats == {"docs": 2, "skipped": 2}  # the broken line and the non-object line
    with _raises(r"unknown on_bad_record 'ignore'; valid: error, skip"):
        list(iter_documents(_corpus(path), on_bad_record="ignore"))


def test_missing_or_non_string_text_field(tmp_path, jsonl):
    path = jsonl(tmp_path / "x.jsonl", [{"text": "ok"}, {"body": "b", "url": "u"}])
    with _raises(r"x\.jsonl:2: record has no field 'text' \(fields: body, url\); set text_column:") as e:
        list(iter_documents(_corpus(path)))
    _one_line(e)
    path = jsonl(tmp_path / "n.jsonl", [{"text": None}])
    with _raises(r"n\.jsonl:1: field 'text' is null, not a string"):
        list(iter_documents(_corpus(path)))
    arr = tmp_path / "arr.json"
    arr.write_text(json.dumps([{"text": "a"}, {"txt": "b"}]))
    with _raises(r"arr\.json: record 1: record has no field 'text'"):
        list(iter_documents(_corpus(arr)))
    assert list(iter_documents(_corpus(arr, text_column="txt"), on_bad_record="skip")) == ["b"]


def test_parquet_errors(tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    pq.write_table(pa.table({"body": ["x", None]}), tmp_path / "p.parquet")
    with _raises(r"no column 'text' \(columns: body\); set text_column:"):
        list(iter_documents(_corpus(tmp_path / "p.parquet")))
    with _raises(r"p\.parquet: row 1: field 'body' is null"):
        list(iter_documents(_corpus(tmp_path / "p.parquet", text_column="body")))
    pq.write_table(pa.table({"text": [1, 2]}), tmp_path / "n.parquet")
    with _raises(r"column 'text' is int64, not string"):
        list(iter_documents(_corpus(tmp_path / "n.parquet")))
    (tmp_path / "junk.parquet").write_bytes(b"not parquet at all")
    with _raises(r"junk\.parquet: cannot read parquet") as e:
        list(iter_documents(_corpus(tmp_path / "junk.parquet")))
    _one_line(e)


def test_file_level_errors(tmp_path, jsonl):
    arr = tmp_path / "arr.json"
    arr.write_text('[\n  {"text": "a"},\n  {"text": \n]')
    with _raises(r"arr\.json:4: malformed JSON"):
        list(iter_documents(_corpus(arr)))
    latin = tmp_path / "latin.txt"
    latin.write_bytes("café\n".encode("latin-1"))
    with _raises(r"latin\.txt: not valid UTF-8") as e:
        list(iter_documents(_corpus(latin)))
    _one_line(e)
    fake_gz = tmp_path / "fake.jsonl.gz"
    fake_gz.write_bytes(b"plain text")
    with _raises(r"fake\.jsonl\.gz: cannot read the file"):
        list(iter_documents(_corpus(fake_gz)))
    gone = jsonl(tmp_path / "gone.jsonl", ["x"])
    corpus = _corpus(gone)
    gone.unlink()
    with _raises(r"gone\.jsonl: cannot read the file"):
        list(iter_documents(corpus))


def test_corpus_without_documents(tmp_path, jsonl):
    empty = jsonl(tmp_path / "empty.jsonl", ["", ""])
    with _raises(r"corpus 'c' has no documents in .*empty\.jsonl; check the files and text_column") as e:
        list(iter_documents(_corpus(empty)))
    _one_line(e)
    bad = tmp_path / "bad.jsonl"
    bad.write_text("nope\n")
    with _raises(r"has no documents .*\(1 bad records skipped\)"):
        list(iter_documents(_corpus(bad), on_bad_record="skip"))


def test_corpus_direct_construction_validates(tmp_path):
    with _raises("unknown role 'both'"):
        Corpus(name="c", paths=["x.jsonl"], language="en", role="both")
    with _raises("no data files given"):
        Corpus(name="c", paths=[], language="en", role="old")
    with _raises("group must be an integer"):
        Corpus(name="c", paths=["x.jsonl"], language="en", role="new", group="1")
    corpus = Corpus(name="c", paths="x.jsonl", language="en", role="new")  # a single path is accepted
    assert (corpus.paths, corpus.group) == (["x.jsonl"], 1)


def test_broken_dataset_info_json(tmp_path):
    (tmp_path / "dataset_info.json").write_text('{"el": {"file_name": "el.json",}}')
    with _raises(r"cannot parse corpora file .*dataset_info\.json") as e:
        load_corpora(tmp_path / "dataset_info.json")
    _one_line(e)
