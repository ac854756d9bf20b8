"""`prepare` and the prepared dataset: blocks per corpus with their role, parallel = serial, reuse by content key,
resumption after SIGKILL, damaged shards named in one line, and the compact on-disk layout."""

from __future__ import annotations

import filecmp
import os
import random
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

import moelpr.data.prepare as prep
from moelpr.data import Corpus, PreparedDataset, read_manifest
from moelpr.data.prepare import prepare
from moelpr.data.shards import ShardWriter
from moelpr.errors import UserError

EOS = 1
WORDS = "a b c d e f g h i j k l m n o p".split()


def _ids(tokenizer, text: str) -> list[int]:
    return tokenizer(text, add_special_tokens=False)["input_ids"]


def _docs(n: int, seed: int) -> list[str]:
    rng = random.Random(seed)
    return [" ".join(rng.choices(WORDS, k=rng.randint(1, 12))) for _ in range(n)]


@pytest.fixture
def corpora(tmp_path, jsonl) -> list[Corpus]:
    """Old `en`, new `el` (group 1, gzipped) and new `bn` (group 2, two files)."""
    return [
        Corpus(name="en", paths=[str(jsonl(tmp_path / "en.jsonl", _docs(60, 0)))], language="en", role="old"),
        Corpus(
            name="el", paths=[str(jsonl(tmp_path / "el.jsonl.gz", _docs(40, 1), gz=True))], language="el", role="new"
        ),
        Corpus(
            name="bn",
            paths=[str(jsonl(tmp_path / f"bn{i}.jsonl", _docs(30, i + 2))) for i in (1, 2)],
            language="bn",
            role="new",
            group=2,
        ),
    ]


def _stream(tokenizer, corpus: Corpus) -> list[int]:
    from moelpr.data import iter_documents

    return [t for doc in iter_documents(corpus) for t in _ids(tokenizer, doc) + [EOS]]


def test_blocks_are_cut_per_corpus_and_carry_its_role(tokenizer, corpora, tmp_path):
    root = prepare(corpora, tokenizer, tmp_path / "out", cutoff_len=8, progress=False)
    ds = PreparedDataset(root)
    for c, corpus in enumerate(corpora):  # one shard per file here: each file's tokens cut into blocks
        expected = []
        for path in corpus.paths:
            tokens = _stream(tokenizer, Corpus(name="x", paths=[path], language="x", role="new"))
            expected += tokens[: len(tokens) // 8 * 8]
        got = [t for b in range(ds.mixture.blocks[c]) for t in ds.block(c, b).tolist()]
        assert got == expected, corpus.name
    rows = [ds[i] for i in range(len(ds))]
    by_language = {r["language"]: (set(r["lang_mask"].tolist()), set(r["lang_group"].tolist())) for r in rows}
    assert by_language == {"en": ({1}, {0}), "el": ({0}, {1}), "bn": ({0}, {2})}
    assert [rows[i]["language"] for i in range(3)] != ["en"] * 3  # interleaved, not one corpus after another
    manifest = read_manifest(root)
    assert manifest["dtype"] == "uint16" and {e["name"]: len(e["shards"]) for e in manifest["corpora"]}["bn"] == 2


def test_parallel_equals_serial_and_a_finished_dataset_is_reused(tokenizer, corpora, tmp_path, monkeypatch, jsonl):
    serial = prepare(corpora, tokenizer, tmp_path / "serial", cutoff_len=8, shard_bytes=300, progress=False)
    parallel = prepare(corpora, tokenizer, tmp_path / "par", cutoff_len=8, shard_bytes=300, num_proc=2, progress=False)
    files = sorted(p.name for p in (serial / "shards").iterdir())
    assert len(files) > 10 and files == sorted(p.name for p in (parallel / "shards").iterdir())
    assert all(filecmp.cmp(serial / "shards" / f, parallel / "shards" / f, shallow=False) for f in files)
    assert read_manifest(serial) == read_manifest(parallel)

    written = []
    real_call = ShardWriter.__call__
    monkeypatch.setattr(
        ShardWriter,
        "__call__",
        lambda self, shard, report=None: written.append(shard.name) or real_call(self, shard, report),
    )
    assert prepare(corpora, tokenizer, serial, cutoff_len=8, shard_bytes=300, progress=False, verify=True) == serial
    assert written == []  # recognised by its key
    jsonl(Path(corpora[2].paths[1]), _docs(30, 99))  # one file changes: only its shards are prepared again
    prepare(corpora, tokenizer, serial, cutoff_len=8, shard_bytes=300, progress=False, overwrite=True)
    assert written and {name.split("-")[0] for name in written} == {"002"}
    assert len(written) == len(prep.split_source(corpora[2].paths[1], 300))
    with pytest.raises(UserError, match=r"holds a dataset prepared otherwise \(cutoff_len 8\); pass --overwrite"):
        prepare(corpora, tokenizer, serial, cutoff_len=4, progress=False)


KILLED = textwrap.dedent("""
    import sys, time
    import moelpr.data.encode as encode
    from moelpr.cli import main

    real = encode.Encoder.encode
    def slow(self, texts):  # slow enough that the kill lands in the middle of the run
        time.sleep(0.2)
        return real(self, texts)
    encode.Encoder.encode = slow
    sys.exit(main(sys.argv[1:]))
""")


def _many_files(tmp_path: Path, jsonl) -> Path:
    """Two corpora of 6 files (6 shards) each."""
    for lang, seed in (("en", 0), ("el", 10)):
        for i in range(6):
            jsonl(tmp_path / lang / f"{i}.jsonl", _docs(2000, seed + i))
    spec = tmp_path / "corpora.yaml"
    spec.write_text(
        "corpora:\n"
        + "".join(
            f"  - {{name: {x}, path: {x}/*.jsonl, language: {x}, role: {r}}}\n"
            for x, r in (("en", "old"), ("el", "new"))
        )
    )
    return spec


def _completed(out: Path) -> list[Path]:
    return list((out / "shards").glob("*.json")) if (out / "shards").is_dir() else []


def test_sigkilled_prepare_resumes_to_the_uninterrupted_dataset(tokenizer_dir, tmp_path, jsonl):
    spec = _many_files(tmp_path, jsonl)
    args = [str(spec), "--tokenizer", str(tokenizer_dir), "--cutoff-len", "16", "--shard-mb", "1", "--quiet"]
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)}
    script = tmp_path / "killed.py"
    script.write_text(KILLED)
    out = tmp_path / "killed"
    cmd = [sys.executable, str(script), "prepare", *args, "--num-proc", "2", "--output", str(out)]
    proc = subprocess.Popen(cmd, env=env, start_new_session=True)  # its own process group: workers die too
    deadline = time.time() + 120
    while not _completed(out):
        assert proc.poll() is None and time.time() < deadline, "prepare ended before it could be killed"
        time.sleep(0.01)
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait(timeout=30)
    assert not (out / prep.MANIFEST).exists()
    done = {p.stem: p.stat().st_mtime_ns for p in (out / "shards").glob("*.json")}
    assert 0 < len(done) < len(prep.plan(_load(spec), 1 << 20)) == 12

    from moelpr.cli import main

    assert main(["prepare", *args, "--output", str(out)]) == 0
    assert main(["prepare", *args, "--output", str(tmp_path / "whole")]) == 0
    assert {p.stem: p.stat().st_mtime_ns for p in (out / "shards").glob("*.json") if p.stem in done} == done
    assert not list(out.rglob(".*tmp-*"))  # the killed run's temporary files are gone
    assert read_manifest(out) == read_manifest(tmp_path / "whole")
    for f in (tmp_path / "whole" / "shards").iterdir():
        assert filecmp.cmp(f, out / "shards" / f.name, shallow=False), f.name


def test_a_kill_between_a_shards_record_and_its_rename_leaves_nothing_behind(tokenizer, corpora, tmp_path):
    """The unlucky kill, forced: a shard's ids are in place, its completion record only as the temporary file of
    `atomic_write_json`, beside an ids temporary of another attempt. The rerun redoes the shard, removes both
    temporaries, and gives the uninterrupted dataset."""
    whole = prepare(corpora, tokenizer, tmp_path / "whole", cutoff_len=8, shard_bytes=300, progress=False)
    killed = tmp_path / "killed"
    prepare(corpora, tokenizer, killed, cutoff_len=8, shard_bytes=300, progress=False)
    (killed / prep.MANIFEST).unlink()
    record = sorted((killed / "shards").glob("*.json"))[1]
    record.rename(record.with_name(f".{record.name}.tmp-k1ll3d"))
    (killed / "shards" / f".{record.stem}.tmp-0ther").write_bytes(b"partial ids")
    prepare(corpora, tokenizer, killed, cutoff_len=8, shard_bytes=300, progress=False)
    assert not list(killed.rglob(".*tmp-*"))
    assert read_manifest(killed) == read_manifest(whole)


def _load(spec: Path) -> list[Corpus]:
    from moelpr.data import load_corpora

    return load_corpora(spec)


def test_damaged_shards_are_named_in_one_line_and_prepared_again(tokenizer, corpora, tmp_path):
    root = prepare(corpora, tokenizer, tmp_path / "out", cutoff_len=8, progress=False)
    rows = [PreparedDataset(root)[i]["input_ids"].tolist() for i in range(20)]
    shard = root / "shards" / "001-00000.bin"
    data = shard.read_bytes()
    shard.write_bytes(data[:-6])
    with pytest.raises(
        UserError, match=r"prepared shard .*001-00000\.bin is truncated or damaged .*run `moe-lpr prepare` again"
    ) as e:
        PreparedDataset(root)
    assert "\n" not in str(e.value)
    shard.write_bytes(b"\xff" * 16 + data[16:])  # same size, ids outside the vocabulary
    ds = PreparedDataset(root)
    c = [e["name"] for e in ds.entries].index("el")
    with pytest.raises(UserError, match=r"prepared shard .*001-00000\.bin is corrupt: block 0 holds token id 65535"):
        ds.block(c, 0)
    prepare(corpora, tokenizer, root, cutoff_len=8, progress=False, verify=True)  # the checksum finds it
    assert shard.read_bytes() == data
    assert [PreparedDataset(root)[i]["input_ids"].tolist() for i in range(20)] == rows


def test_large_vocabulary_takes_four_bytes_per_token(tmp_path, jsonl):
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {"<pad>": 0, "</s>": 1, "<unk>": 2, **{f"w{i}": i + 3 for i in range(70_000)}}
    backend = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tok = PreTrainedTokenizerFast(tokenizer_object=backend, eos_token="</s>", pad_token="<pad>", unk_token="<unk>")
    rng = random.Random(0)
    docs = [" ".join(f"w{rng.randrange(70_000)}" for _ in range(200)) for _ in range(1000)]
    corpus = Corpus(name="x", paths=[str(jsonl(tmp_path / "x.jsonl", docs))], language="x", role="new")
    root = prepare([corpus], tok, tmp_path / "out", cutoff_len=64, progress=False)
    manifest = read_manifest(root)
    ds = PreparedDataset(root)
    assert manifest["dtype"] == "int32" and max(int(ds.block(0, b).max()) for b in range(len(ds))) > 65_535
    assert manifest["bytes"] / manifest["corpora"][0]["tokens"] <= 4.1
    assert ds.block(0, 0).tolist() == _ids(tok, docs[0])[:64]


def test_the_training_tokenizer_and_cutoff_must_match(tokenizer, corpora, tmp_path):
    root = prepare(corpora, tokenizer, tmp_path / "out", cutoff_len=8, progress=False)
    with pytest.raises(UserError, match=r"holds blocks of 8 tokens but cutoff_len is 16; set cutoff_len: 8"):
        PreparedDataset(root, cutoff_len=16)
    other = tokenizer.__class__(tokenizer_object=tokenizer.backend_tokenizer, eos_token="<unk>")
    with pytest.raises(UserError, match=r"prepared with another tokenizer than the model's"):
        PreparedDataset(root, tokenizer=other)
    PreparedDataset(root, tokenizer=tokenizer, cutoff_len=8)
    with pytest.raises(UserError, match=r"is not a finished prepared dataset \(no moelpr_prepared\.json\)"):
        PreparedDataset(tmp_path)
    with pytest.raises(UserError, match=r"holds no corpus 'zh'; it holds: en, el, bn"):
        PreparedDataset(root, corpora=["zh"])


def test_processes_of_a_launch_prepare_disjoint_shards_and_wait_for_each_other(
    tokenizer, corpora, tmp_path, monkeypatch
):
    """As the ranks of a torchrun launch (here two threads): each writes its share, each returns the whole."""
    import threading

    writers: dict[str, list[str]] = {}
    real_call = ShardWriter.__call__

    def record(self, shard, report=None):
        writers.setdefault(threading.current_thread().name, []).append(shard.name)
        time.sleep(0.01)
        return real_call(self, shard, report)

    monkeypatch.setattr(ShardWriter, "__call__", record)
    kwargs = dict(cutoff_len=8, shard_bytes=300, progress=False, world=2)
    other = threading.Thread(
        target=prepare, args=(corpora, tokenizer, tmp_path / "out"), kwargs={**kwargs, "rank": 1}, name="rank1"
    )
    other.start()
    root = prepare(corpora, tokenizer, tmp_path / "out", **kwargs, rank=0)
    other.join(timeout=60)
    assert not other.is_alive()
    names = [s.name for s in prep.plan(corpora, 300)]
    assert sorted(writers["MainThread"] + writers["rank1"]) == sorted(names)
    assert writers["MainThread"] == names[0::2] and writers["rank1"] == names[1::2]
    assert read_manifest(root) == read_manifest(
        prepare(corpora, tokenizer, tmp_path / "alone", cutoff_len=8, shard_bytes=300, progress=False)
    )


def test_encoder_gives_the_tokenizers_ids(tmp_path):
    """The backend's batch encoding (what workers run) = `tokenizer(texts)`, special tokens in the text included."""
    import pickle

    from train_helpers import build_dense, sentences
    from transformers import AutoTokenizer

    from moelpr.data.encode import Encoder

    tok = AutoTokenizer.from_pretrained(build_dense(tmp_path))
    texts = sentences("el", 20) + ["mixed </s> text <pad> ünïcode", "  spaces\n\nnewlines  "]
    expected = [t for ids in tok(texts, add_special_tokens=False)["input_ids"] for t in ids + [tok.eos_token_id]]
    for encoder in (Encoder(tok), pickle.loads(pickle.dumps(Encoder(tok)))):  # in this process, and in a worker
        flat, lengths = encoder.encode(texts)
        assert flat.tolist() == expected and lengths.sum() == len(expected)


def test_validation_datasets_per_language(tokenizer, corpora, tmp_path):
    from moelpr.data import validation_datasets

    weighted = [Corpus(**{**c.__dict__, "weight": w}) for c, w in zip(corpora, (1, 5, 1))]
    raw = validation_datasets(weighted, tokenizer, cutoff_len=8, cache_dir=tmp_path / "cache")
    root = prepare(weighted, tokenizer, tmp_path / "out", cutoff_len=8, progress=False)
    blocks = {e["name"]: e["blocks"] for e in read_manifest(root)["corpora"]}
    for by_language in (raw, validation_datasets(root, tokenizer, cutoff_len=8)):
        assert list(by_language) == ["en", "el", "bn"]
        for lang, ds in by_language.items():
            assert len(ds) == blocks[lang]  # every block once: the weights are for training
            assert {ds[i]["language"] for i in range(len(ds))} == {lang}
    with pytest.raises(UserError, match=r"holds blocks of 8 tokens but cutoff_len is 4"):
        validation_datasets(root, tokenizer, cutoff_len=4)
