"""The demo's mixes: an English-centric pretraining mix whose new-language pages stage 1 never sees, and the
stage-1 / review / baseline mixes cut from the rest by token budgets."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml

from moelpr.data.corpus import iter_documents, load_corpora
from moelpr.demo.data import build_mixes, build_pretraining_mix, review_name
from moelpr.demo.tokenizer import train_tokenizer
from moelpr.errors import UserError


def _corpora(tmp_path: Path) -> list:
    rows = []
    for lang, role, word, pages in (("en", "old", "apple", 10), ("tr", "new", "elma", 12), ("hu", "new", "alma", 12)):
        path = tmp_path / f"{lang}.jsonl"
        path.write_text(
            "".join(json.dumps({"text": f"{lang} page {i}: " + f"{word} " * (20 + i)}) + "\n" for i in range(pages))
        )
        rows.append({"name": lang, "path": path.name, "language": lang, "role": role})
    (tmp_path / "corpora.yaml").write_text(yaml.safe_dump(rows))
    return load_corpora(tmp_path / "corpora.yaml")


def _texts(spec: Path, lang: str) -> list[str]:
    return [t for c in load_corpora(spec) if c.language == lang for t in iter_documents(c)]


def test_pretraining_mix_holds_a_stated_share_of_pages_the_pool_lacks(tmp_path: Path) -> None:
    corpora = _corpora(tmp_path)
    stats = build_pretraining_mix(corpora, tmp_path / "pretrain", new_share=0.2)
    old_bytes = sum(len(t.encode()) for t in _texts(tmp_path / "corpora.yaml", "en"))
    assert stats["old_bytes"] == old_bytes
    for lang in ("tr", "hu"):
        base, pool = _texts(tmp_path / "pretrain/base.yaml", lang), _texts(tmp_path / "pretrain/pool.yaml", lang)
        everything = _texts(tmp_path / "corpora.yaml", lang)
        assert base and pool and not set(base) & set(pool) and sorted(base + pool) == sorted(everything)
        assert pool[0] == everything[0]  # the pool keeps the first pages (stage 1 starts there), base the last
        per_language = 0.2 * old_bytes / 0.8 / 2
        assert sum(len(t.encode()) for t in base) <= per_language
        assert stats["per_language"][lang]["base_pages"] == len(base)
    assert 0.1 < stats["new_share"] <= 0.2  # whole pages: at most the target
    assert _texts(tmp_path / "pretrain/base.yaml", "en") == _texts(tmp_path / "pretrain/pool.yaml", "en")
    build_pretraining_mix(corpora, tmp_path / "none", new_share=0.0)
    assert {c.language for c in load_corpora(tmp_path / "none/base.yaml")} == {"en"}
    with pytest.raises(UserError, match="share"):
        build_pretraining_mix(corpora, tmp_path / "bad", new_share=1.0)


def test_mixes_come_from_the_pool_with_review_scales(tmp_path: Path) -> None:
    corpora = _corpora(tmp_path)
    build_pretraining_mix(corpora, tmp_path / "pretrain", new_share=0.2)
    tokenizer = train_tokenizer(
        tmp_path / "pretrain/base.yaml", tmp_path / "tok", vocab_size=300, languages=["en", "tr", "hu"]
    )
    pool, base = load_corpora(tmp_path / "pretrain/pool.yaml"), load_corpora(tmp_path / "pretrain/base.yaml")
    data = build_mixes(
        pool, base, tokenizer, tmp_path / "data", new_tokens=60, replay_tokens=20, review_scales=(0.5, 2.0)
    )
    stats = json.loads((data / "mix_stats.json").read_text())
    base_pages = set(_texts(tmp_path / "pretrain/base.yaml", "tr"))
    stage1 = _texts(data / "stage1.yaml", "tr")
    assert stage1 and base_pages and not base_pages & set(stage1)  # stage 1 never sees the base's new-language pages
    assert set(_texts(data / "base.yaml", "tr")) == base_pages
    assert stats["per_language"]["tr"]["stage1"] == 60 and stats["stage1_tokens"] == 120
    assert stats["base_new_token_share"] == pytest.approx(
        (stats["base_tokens"]["tr"] + stats["base_tokens"]["hu"]) / sum(stats["base_tokens"].values())
    )
    for scale in (0.5, 1.0, 2.0):
        review = stats["reviews"][review_name(scale)]
        assert review["replay_tokens"] == round(scale * 20)  # one old language
        assert review["tokens"] == review["replay_tokens"] + 2 * min(round(scale * 40), 60)  # capped by stage 1
        assert (data / f"{review_name(scale)}.yaml").is_file()
    assert stats["review_tokens"] == stats["reviews"]["review"]["tokens"]
    review_tr = _texts(data / "review.yaml", "tr")
    assert "".join(stage1).startswith("".join(review_tr)[:50])  # the review's new text is stage 1's start
    assert {c.role for c in load_corpora(data / "baselines.yaml")} == {"old", "new"}
