"""Sources through `datasets` and the pieces processes read: Arrow files, save_to_disk folders, CSV, .zst, and
pieces (byte ranges, row groups, row runs) that together read exactly the whole source."""

from __future__ import annotations

import json

import pytest

from moelpr.data.corpus import Corpus, file_format, iter_documents, load_corpora
from moelpr.data.read import read_piece, split_source
from moelpr.errors import UserError

DOCS = [f"doc {i} " + "δ" * (i % 7) for i in range(200)]


def _corpus(*paths, **kw) -> Corpus:
    return Corpus(name="c", paths=[str(p) for p in paths], language="en", role="old", **kw)


def _zst(path, text: str):
    import zstandard

    path.write_bytes(zstandard.ZstdCompressor().compress(text.encode("utf-8")))
    return path


def test_save_to_disk_folder_arrow_file_and_csv_are_read(tmp_path):
    from datasets import Dataset, DatasetDict

    ds = Dataset.from_dict({"id": list(range(len(DOCS))), "body": DOCS})
    ds.save_to_disk(tmp_path / "saved")
    (corpus,) = load_corpora([{"name": "c", "path": "saved", "language": "en", "role": "old"}], base_dir=tmp_path)
    assert corpus.paths == [str(tmp_path / "saved")] and file_format(corpus.paths[0])[0] == "save_to_disk"
    with pytest.raises(UserError, match=r"no column 'text' \(columns: id, body\); set text_column:"):
        list(iter_documents(corpus))
    assert list(iter_documents(_corpus(tmp_path / "saved", text_column="body"))) == DOCS
    (arrow,) = (tmp_path / "saved").glob("*.arrow")  # a datasets Arrow file on its own
    assert list(iter_documents(_corpus(arrow, text_column="body"))) == DOCS
    DatasetDict({"train": ds}).save_to_disk(tmp_path / "dict")
    with pytest.raises(UserError, match=r"is a DatasetDict folder \(splits: train\); point path to one split"):
        load_corpora([{"name": "c", "path": "dict", "language": "en", "role": "old"}], base_dir=tmp_path)
    (tmp_path / "t.csv").write_text("id,text\n" + "".join(f'{i},"{d}"\n' for i, d in enumerate(DOCS)))
    assert list(iter_documents(_corpus(tmp_path / "t.csv"))) == DOCS


def test_zst_files_are_read(tmp_path):
    lines = "".join(json.dumps({"text": d}, ensure_ascii=False) + "\n" for d in DOCS)
    assert list(iter_documents(_corpus(_zst(tmp_path / "a.jsonl.zst", lines)))) == DOCS
    assert list(iter_documents(_corpus(_zst(tmp_path / "a.txt.zst", "\n".join(DOCS))))) == DOCS
    csv = "text\n" + "".join(f'"{d}"\n' for d in DOCS)
    assert list(iter_documents(_corpus(_zst(tmp_path / "a.csv.zst", csv)))) == DOCS
    (tmp_path / "broken.jsonl.zst").write_bytes(b"\x28\xb5\x2f\xfd garbage")
    with pytest.raises(UserError, match=r"broken\.jsonl\.zst: cannot read the file"):
        list(iter_documents(_corpus(tmp_path / "broken.jsonl.zst")))


def test_globs_of_files_and_folders(tmp_path, jsonl):
    from datasets import Dataset

    jsonl(tmp_path / "shards" / "a.jsonl", DOCS[:3])
    Dataset.from_dict({"text": DOCS[3:5]}).save_to_disk(tmp_path / "shards" / "b")
    (corpus,) = load_corpora([{"name": "c", "path": "shards/*", "language": "en", "role": "old"}], base_dir=tmp_path)
    assert [p.rsplit("/", 1)[1] for p in corpus.paths] == ["a.jsonl", "b"]
    assert list(iter_documents(corpus)) == DOCS[:5]


def _pieces_read(path, target: int, **kw) -> list[str]:
    pieces = split_source(str(path), target)
    assert len(pieces) > 1, "the source should have been cut"
    return [t for p in pieces for t in read_piece(p, kw.get("text_column", "text"))]


def test_pieces_cover_the_source_exactly(tmp_path, jsonl):
    import pyarrow as pa
    import pyarrow.parquet as pq
    from datasets import Dataset

    path = jsonl(tmp_path / "a.jsonl", DOCS)
    for target in (1, 100, 997, 5000):  # byte ranges hold the lines that start in them
        assert _pieces_read(path, target) == DOCS
    (tmp_path / "t.txt").write_text("\n".join(DOCS) + "\n")
    assert _pieces_read(tmp_path / "t.txt", 333) == DOCS
    pq.write_table(pa.table({"text": DOCS}), tmp_path / "p.parquet", row_group_size=16)
    assert _pieces_read(tmp_path / "p.parquet", 100) == DOCS  # runs of row groups
    Dataset.from_dict({"text": DOCS}).save_to_disk(tmp_path / "saved")
    assert _pieces_read(tmp_path / "saved", 500) == DOCS  # runs of rows
    assert len(split_source(str(_zst(tmp_path / "z.jsonl.zst", "x\n" * 1000)), 1)) == 1  # not seekable: whole


def test_bad_record_in_a_later_piece_names_its_line(tmp_path, jsonl):
    path = jsonl(tmp_path / "a.jsonl", DOCS)
    lines = path.read_text().splitlines()
    lines[150] = '{"text": broken'
    path.write_text("\n".join(lines) + "\n")
    pieces = split_source(str(path), 500)
    with pytest.raises(UserError, match=r"corpus 'c': .*a\.jsonl:151: malformed JSON") as e:
        for piece in pieces:
            list(read_piece(piece, "text", corpus="c"))
    assert "\n" not in str(e.value)
    stats: dict = {}
    kept = [t for p in pieces for t in read_piece(p, "text", on_bad_record="skip", stats=stats)]
    assert kept == DOCS[:150] + DOCS[151:] and stats["skipped"] == 1
