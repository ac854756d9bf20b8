"""The demo's training mixes, cut from the train corpora by token budgets (documents in file order).

    data/base.yaml       old-language train corpora: the base model's pretraining text
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
    return {"name": name, "path": rel, "language": lang, "role": role, "text_field": "text"}


def _write_jsonl(path: Path, texts: list[str]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w", encoding="utf-8") as f:
        f.writelines(json.dumps({"text": t}, ensure_ascii=False) + "\n" for t in texts)


def build_mixes(corpora: list[Corpus], tokenizer: Any, out_dir: Path, *, new_tokens: int, replay_tokens: int) -> Path:
    """Write the four corpora files above into `out_dir` (atomically) and return it.

    Args:
        corpora: the train corpora (roles old and new).
        new_tokens: stage-1 tokens per new language.
        replay_tokens: stage-2 replay tokens per old language (the review's new-language text is 2× this per
            new language, taken from the start of the stage-1 text).
    """
    by_lang: dict[str, list[Corpus]] = {}
    for c in corpora:
        by_lang.setdefault(c.language, []).append(c)
    old = [lang for lang, cs in by_lang.items() if cs[0].role == "old"]
    new = [lang for lang, cs in by_lang.items() if cs[0].role == "new"]
    files: dict[str, list[dict]] = {"base": [], "stage1": [], "review": [], "baselines": []}
    stats = {"stage1_tokens": 0, "replay_tokens": 0, "review_tokens": 0, "per_language": {}}
    with atomic_output_dir(out_dir, overwrite=True) as tmp:
        for lang in old:
            for c in by_lang[lang]:  # the full old-language text, where it lies
                files["base"].append({"name": c.name, "path": c.paths, "language": lang, "role": "old",
                                      "text_field": c.text_field})
            replay, n = take_tokens(by_lang[lang], tokenizer, replay_tokens)
            stats["replay_tokens"] += n
            stats["review_tokens"] += n
            stats["per_language"][lang] = {"replay": n}
            if not replay:
                raise UserError(f"no {lang!r} text for the stage-2 replay; add old-language text")
            _write_jsonl(tmp / "replay" / f"{lang}.jsonl", replay)
            entry = _entry(lang, f"replay/{lang}.jsonl", "old", f"replay_{lang}")
            files["review"].append(entry)
            files["baselines"].append(entry)
        for lang in new:
            texts, n = take_tokens(by_lang[lang], tokenizer, new_tokens)
            stats["stage1_tokens"] += n
            stats["per_language"][lang] = {"stage1": n}
            if not texts:
                raise UserError(f"no {lang!r} text for stage 1; add new-language text")
            _write_jsonl(tmp / "new" / f"{lang}.jsonl", texts)
            entry = _entry(lang, f"new/{lang}.jsonl", "new", f"new_{lang}")
            files["stage1"].append(entry)
            files["baselines"].append(entry)
            budget = min(2 * replay_tokens, stats["per_language"][lang]["stage1"])  # from the stage-1 text's start
            review, n = take_tokens(by_lang[lang], tokenizer, budget)
            stats["review_tokens"] += n
            stats["per_language"][lang]["review"] = n
            _write_jsonl(tmp / "review" / f"{lang}.jsonl", review)
            files["review"].append(_entry(lang, f"review/{lang}.jsonl", "new", f"review_{lang}"))
        for name, entries in files.items():
            (tmp / f"{name}.yaml").write_text(yaml.safe_dump(entries, sort_keys=False, allow_unicode=True))
        (tmp / "mix_stats.json").write_text(json.dumps(stats, indent=2) + "\n")  # last: marks a complete build
    return out_dir
