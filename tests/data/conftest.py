"""Shared fixtures for the data tests: a tiny word-level tokenizer and corpus-file writers."""

from __future__ import annotations

import gzip
import json
import signal
from pathlib import Path

import pytest

WORDS = "a b c d e f g h i j k l m n o p alpha beta gamma delta".split()


@pytest.fixture(autouse=True)
def _fail_instead_of_hanging():
    """Data tests start tokenising processes and dataloader workers: one that hangs fails after 3 minutes."""

    def timeout(signum, frame):
        raise TimeoutError("the test ran for more than 180 s")

    previous = signal.signal(signal.SIGALRM, timeout)
    signal.alarm(180)
    yield
    signal.alarm(0)
    signal.signal(signal.SIGALRM, previous)


@pytest.fixture(scope="session")
def tokenizer():
    """Word-level fast tokenizer: one token per whitespace-separated word; eos `</s>` (1), pad `<pad>` (0)."""
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    backend = Tokenizer(models.WordLevel(unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    trainer = trainers.WordLevelTrainer(special_tokens=["<pad>", "</s>", "<unk>"])
    backend.train_from_iterator([" ".join(WORDS)], trainer)
    tok = PreTrainedTokenizerFast(tokenizer_object=backend, eos_token="</s>", pad_token="<pad>", unk_token="<unk>")
    assert (tok.pad_token_id, tok.eos_token_id) == (0, 1)
    return tok


@pytest.fixture(scope="session")
def tokenizer_dir(tokenizer, tmp_path_factory):
    """The word-level tokenizer saved to a directory (what `moe-lpr prepare --tokenizer` reads)."""
    path = tmp_path_factory.mktemp("tokenizer")
    tokenizer.save_pretrained(path)
    return path


def write_jsonl(path: Path, texts: list, *, field: str = "text", gz: bool = False) -> Path:
    """Write one JSON object per line (`texts` items that are dicts are written as they are)."""
    lines = [json.dumps(t if isinstance(t, dict) else {field: t}, ensure_ascii=False) for t in texts]
    data = "\n".join(lines) + "\n"
    path.parent.mkdir(parents=True, exist_ok=True)
    if gz:
        with gzip.open(path, "wt", encoding="utf-8") as f:
            f.write(data)
    else:
        path.write_text(data, encoding="utf-8")
    return path


@pytest.fixture
def jsonl():
    """The `write_jsonl` helper, as a fixture so tests need not import conftest."""
    return write_jsonl
