"""The demo tokenizer: byte-level, lossless in every language, trained on the old languages only."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml
from transformers import PreTrainedTokenizerFast

from moelpr.demo.tokenizer import SPECIAL_TOKENS, train_tokenizer
from moelpr.errors import UserError

TEXTS = {
    "en": "The daemon reads its configuration file at startup and exits with an error if a value is invalid.",
    "es": "El demonio lee su fichero de configuración al arrancar y termina con un error si un valor no es válido.",
    "zh": "守护进程在启动时读取配置文件，如果某个值无效，就会报错并退出。",
    "tr": "Artalan süreci açılışta yapılandırma dosyasını okur ve bir değer geçersizse hatayla çıkar.",
    "hu": "A démon induláskor beolvassa a beállítófájlt, és hibával kilép, ha egy érték érvénytelen.",
    "uk": "Фонова служба читає файл налаштувань під час запуску і завершує роботу з помилкою, якщо щось не так.",
}
EDGE = ["", " leading space", "tabs\tand\nnew lines\n\n", "emoji 🙂 and \u00a0nbsp", "ʻokina ß Ǆ ﬁ"]


def _old_texts() -> list[str]:
    return [TEXTS[lang] * 3 + f" {i}" for i in range(20) for lang in ("en", "es", "zh")]


def test_round_trip_reload_and_vocab(tmp_path: Path) -> None:
    tok = train_tokenizer(_old_texts(), tmp_path / "tok", vocab_size=400)
    assert isinstance(tok, PreTrainedTokenizerFast)
    assert len(tok) == 400
    assert tok.convert_ids_to_tokens([0, 1, 2, 3]) == list(SPECIAL_TOKENS)
    assert (tok.unk_token, tok.bos_token, tok.eos_token, tok.pad_token) == SPECIAL_TOKENS
    reloaded = PreTrainedTokenizerFast.from_pretrained(tmp_path / "tok")
    for text in [*TEXTS.values(), *EDGE]:
        ids = tok(text)["input_ids"]
        assert tok.decode(ids) == text  # lossless, new languages and unseen characters included
        assert reloaded(text)["input_ids"] == ids
        assert not {tok.bos_token_id, tok.eos_token_id} & set(ids)  # no special tokens added on encode
    # Trained on old languages only: new-language text splits into more tokens per character.
    per_char = {lang: len(tok(t)["input_ids"]) / len(t) for lang, t in TEXTS.items()}
    assert max(per_char["en"], per_char["es"]) < min(per_char["tr"], per_char["hu"], per_char["uk"])


def test_trains_on_old_corpora_of_a_corpora_file(tmp_path: Path) -> None:
    (tmp_path / "train").mkdir()
    docs = {"en": "foobarbaz " * 50 + TEXTS["en"], "uk": "quxquuxcorge " * 50 + TEXTS["uk"]}
    for lang, text in docs.items():
        (tmp_path / "train" / f"{lang}.jsonl").write_text(json.dumps({"text": text}) + "\n")
    spec = [
        {"name": "en", "path": "train/en.jsonl", "language": "en", "role": "old", "text_field": "text"},
        {"name": "uk", "path": "train/uk.jsonl", "language": "uk", "role": "new", "text_field": "text"},
    ]
    (tmp_path / "corpora.yaml").write_text(yaml.safe_dump(spec))
    tok = train_tokenizer(tmp_path / "corpora.yaml", tmp_path / "tok", vocab_size=300)
    vocab = tok.get_vocab()
    assert "foobarbaz" in vocab and "quxquuxcorge" not in vocab
    tok_uk = train_tokenizer(tmp_path / "corpora.yaml", tmp_path / "tok_uk", vocab_size=300, languages=["uk"])
    assert "quxquuxcorge" in tok_uk.get_vocab()


def test_bad_input(tmp_path: Path) -> None:
    with pytest.raises(UserError, match="vocab_size must be at least 260"):
        train_tokenizer(["abc"], tmp_path / "a", vocab_size=100)
    with pytest.raises(UserError, match="does not exist"):
        train_tokenizer(tmp_path / "missing.yaml", tmp_path / "b")
    train_tokenizer(["abc"], tmp_path / "c", vocab_size=270)
    with pytest.raises(UserError, match="not empty"):
        train_tokenizer(["abc"], tmp_path / "c", vocab_size=270)
    assert not (tmp_path / "a").exists()
