"""The demo's training mixes: the base's pretraining mix, then the stage-1 / review / baseline mixes.

The base is English-centric, as the papers' LLMs are: it pretrains on all the old-language train text plus
a small share of new-language pages (`build_pretraining_mix`, in bytes, before any tokenizer exists, since
the tokenizer is trained on this same mix). Those pages are taken from the end of each new language's
train pages and never reach stage 1, which draws from the rest (the "pool"):

    pretrain/base.yaml   old train corpora + pretrain/new/<lang>.jsonl: the base's pretraining (and tokenizer) mix
    pretrain/pool.yaml   old train corpora + pretrain/pool/<lang>.jsonl: what the later mixes are cut from
    pretrain/pretrain_stats.json

The later mixes are cut from the pool by token budgets of the demo tokenizer (documents in file order):

    data/base.yaml       = pretrain/base.yaml (the base model's pretraining text)
    data/stage1.yaml     new/<lang>.jsonl: `new_tokens_per_language` tokens per new language (MoE stage 1)
    data/review.yaml     replay/<old>.jsonl + review/<new>.jsonl: stage 2 (old:new tokens = 1:2, as the paper)
    data/baselines.yaml  stage 1's new-language text + the same replay (the paper trains baselines on both)

Budgets are in tokens of the demo tokenizer so every new language gets the same share whatever its script
(Ukrainian takes ~4× more tokens per character than Turkish under an English/Spanish/Chinese tokenizer).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import yaml

from moelpr.data.corpus import Corpus, iter_documents
from moelpr.errors import UserError
from moelpr.utils.atomic import atomic_output_dir

PRETRAIN_STATS = "pretrain_stats.json"


def _by_language(corpora: list[Corpus]) -> dict[str, list[Corpus]]:
    by_lang: dict[str, list[Corpus]] = {}
    for c in corpora:
        by_lang.setdefault(c.language, []).append(c)
    return by_lang


def _tail_pages(texts: list[str], budget: int) -> tuple[list[str], list[str]]:
    """Split pages into (kept for stage 1, taken for the base): from the last page backwards, take each
    page that still fits in `budget` UTF-8 bytes. Order within each side is the file order."""
    taken: set[int] = set()
    for i in range(len(texts) - 1, 0, -1):  # never the first page: stage 1 keeps text to start from
        size = len(texts[i].encode("utf-8"))
        if size <= budget:
            taken.add(i)
            budget -= size
    return ([t for i, t in enumerate(texts) if i not in taken], [t for i, t in enumerate(texts) if i in taken])


def build_pretraining_mix(corpora: list[Corpus], out_dir: Path, *, new_share: float) -> dict[str, Any]:
    """Write the base's pretraining mix and the pool the later mixes come from (see the module docstring).

    Args:
        corpora: the train corpora (roles old and new).
        new_share: the new languages' share of the pretraining mix's UTF-8 bytes, split equally between
            them (whole pages, so each language's share is at most its equal part); 0 = old languages only.

    Returns:
        The statistics written to pretrain_stats.json: bytes and pages per language, the realised share.
    """
    if not 0 <= new_share < 1:
        raise UserError(f"the base's new-language share must be in [0, 1), got {new_share}")
    by_lang = _by_language(corpora)
    old = [lang for lang, cs in by_lang.items() if cs[0].role == "old"]
    new = [lang for lang, cs in by_lang.items() if cs[0].role == "new"]
    old_bytes = sum(len(t.encode("utf-8")) for lang in old for c in by_lang[lang] for t in iter_documents(c))
    per_new = int(new_share * old_bytes / (1 - new_share) / max(1, len(new)))  # bytes per new language
    stats: dict[str, Any] = {"new_share_target": new_share, "old_bytes": old_bytes, "per_language": {}}
    base_entries = [
        {"name": c.name, "path": c.paths, "language": lang, "role": "old", "text_column": c.text_column}
        for lang in old
        for c in by_lang[lang]
    ]
    pool_entries = list(base_entries)
    with atomic_output_dir(out_dir, overwrite=True) as tmp:
        for lang in new:
            texts = [t for c in by_lang[lang] for t in iter_documents(c)]
            pool, base = _tail_pages(texts, per_new) if new_share > 0 else (texts, [])
            stats["per_language"][lang] = {
                "base_pages": len(base),
                "base_bytes": sum(len(t.encode()) for t in base),
                "pool_pages": len(pool),
                "pool_bytes": sum(len(t.encode()) for t in pool),
            }
            _write_jsonl(tmp / "pool" / f"{lang}.jsonl", pool)
            pool_entries.append(_entry(lang, f"pool/{lang}.jsonl", "new", f"pool_{lang}"))
            if base:
                _write_jsonl(tmp / "new" / f"{lang}.jsonl", base)
                base_entries.append(_entry(lang, f"new/{lang}.jsonl", "new", f"base_{lang}"))
        new_bytes = sum(s["base_bytes"] for s in stats["per_language"].values())
        stats["new_bytes"] = new_bytes
        stats["new_share"] = new_bytes / max(1, new_bytes + old_bytes)
        for name, entries in (("base", base_entries), ("pool", pool_entries)):
            (tmp / f"{name}.yaml").write_text(yaml.safe_dump(entries, sort_keys=False, allow_unicode=True))
        (tmp / PRETRAIN_STATS).write_text(json.dumps(stats, indent=2) + "\n")  # last: marks a complete build
    return stats


def take_tokens(corpora: list[Corpus], tokenizer: Any, budget: int) -> tuple[list[str], int]:
    """Documents of `corpora` in order until `budget` tokens (EOS counted), the last one cut at a token boundary.

    Returns the texts and their token count.
    """
    kept: list[str] = []
    total = 0
    for corpus in corpora:
        for text in iter_documents(corpus):
            ids = tokenizer(text, add_special_tokens=False)["input_ids"]
            if total + len(ids) + 1 > budget:  # +1: the EOS packing appends
                room = budget - total - 1
                if room > 0:
                    kept.append(tokenizer.decode(ids[:room]))
                    total += room + 1
                return kept, total
            kept.append(text)
            total += len(ids) + 1
    return kept, total


def _entry(lang: str, rel: str, role: str, name: str) -> dict[str, str]:
    return {"name": name, "path": rel, "language": lang, "role": role, "text_column": "text"}


def _write_jsonl(path: Path, texts: list[str]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w", encoding="utf-8") as f:
        f.writelines(json.dumps({"text": t}, ensure_ascii=False) + "\n" for t in texts)


def review_name(scale: float) -> str:
    """The corpora file (without .yaml) of the review mix `scale` × the default size: review, review_x0.5, ..."""
    return "review" if scale == 1 else f"review_x{scale:g}"


def build_mixes(
    pool: list[Corpus],
    base: list[Corpus],
    tokenizer: Any,
    out_dir: Path,
    *,
    new_tokens: int,
    replay_tokens: int,
    review_scales: tuple[float, ...] = (1.0,),
) -> Path:
    """Write the corpora files of the module docstring into `out_dir` (atomically) and return it.

    Args:
        pool: the corpora the mixes are cut from (old train text + the new pages the base never saw).
        base: the base's pretraining corpora (written as base.yaml; their tokens are counted for the stats).
        new_tokens: stage-1 tokens per new language (a language with less text gives all it has).
        replay_tokens: stage-2 replay tokens per old language (the review's new-language text is 2× this per
            new language, taken from the start of the stage-1 text).
        review_scales: also write review mixes of these multiples of the default size (the review curve),
            each as `review_name(scale)`.yaml; 1 is always written (review.yaml).
    """
    by_lang = _by_language(pool)
    old = [lang for lang, cs in by_lang.items() if cs[0].role == "old"]
    new = [lang for lang, cs in by_lang.items() if cs[0].role == "new"]
    scales = sorted({1.0, *review_scales})
    files: dict[str, list[dict]] = {"base": [], "stage1": [], "baselines": [], **{review_name(x): [] for x in scales}}
    stats: dict[str, Any] = {
        "stage1_tokens": 0,
        "replay_tokens": 0,
        "review_tokens": 0,
        "per_language": {},
        "reviews": {review_name(x): {"scale": x, "replay_tokens": 0, "tokens": 0} for x in scales},
    }
    base_tokens = {}
    for c in base:
        files["base"].append(
            {"name": c.name, "path": c.paths, "language": c.language, "role": c.role, "text_column": c.text_column}
        )
        count = sum(len(ids) + 1 for ids in tokenizer(list(iter_documents(c)), add_special_tokens=False)["input_ids"])
        base_tokens[c.language] = base_tokens.get(c.language, 0) + count
    stats["base_tokens"] = base_tokens
    stats["base_new_token_share"] = sum(n for lang, n in base_tokens.items() if lang in new) / max(
        1, sum(base_tokens.values())
    )

    def review_part(lang: str, role: str, budget: int, folder: str, cap: int | None = None) -> None:
        for x in scales:
            name = review_name(x)
            size = int(round(x * budget))
            texts, n = take_tokens(by_lang[lang], tokenizer, size if cap is None else min(size, cap))
            _write_jsonl(tmp / name / folder / f"{lang}.jsonl", texts)
            files[name].append(_entry(lang, f"{name}/{folder}/{lang}.jsonl", role, f"{name}_{folder}_{lang}"))
            stats["reviews"][name]["tokens"] += n
            stats["reviews"][name]["replay_tokens"] += n if role == "old" else 0

    with atomic_output_dir(out_dir, overwrite=True) as tmp:
        for lang in old:
            replay, n = take_tokens(by_lang[lang], tokenizer, replay_tokens)
            if not replay:
                raise UserError(f"no {lang!r} text for the stage-2 replay; add old-language text")
            stats["replay_tokens"] += n
            stats["per_language"][lang] = {"replay": n}
            _write_jsonl(tmp / "replay" / f"{lang}.jsonl", replay)
            files["baselines"].append(_entry(lang, f"replay/{lang}.jsonl", "old", f"replay_{lang}"))
            review_part(lang, "old", replay_tokens, "replay")
        for lang in new:
            texts, n = take_tokens(by_lang[lang], tokenizer, new_tokens)
            if not texts:
                raise UserError(f"no {lang!r} text for stage 1; add new-language text")
            stats["stage1_tokens"] += n
            stats["per_language"][lang] = {"stage1": n}
            _write_jsonl(tmp / "new" / f"{lang}.jsonl", texts)
            entry = _entry(lang, f"new/{lang}.jsonl", "new", f"new_{lang}")
            files["stage1"].append(entry)
            files["baselines"].append(entry)
            review_part(lang, "new", 2 * replay_tokens, "new", cap=n)  # from the stage-1 text's start
        stats["review_tokens"] = stats["reviews"]["review"]["tokens"]
        for name, entries in files.items():
            (tmp / f"{name}.yaml").write_text(yaml.safe_dump(entries, sort_keys=False, allow_unicode=True))
        (tmp / "mix_stats.json").write_text(json.dumps(stats, indent=2) + "\n")  # last: marks a complete build
    return out_dir
