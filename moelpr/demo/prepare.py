"""The demo's setup: languages, corpus, the base's pretraining mix, tokenizer, training mixes, base initialisation.

Each step writes into the output directory (corpus/, pretrain/, tokenizer/, data/, models/base_init/) and is
skipped by a rerun that finds its output complete.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from moelpr.demo.plans import blocks_per_step
from moelpr.demo.settings import DemoSizes
from moelpr.errors import UserError


def user_languages(files: dict[str, str]) -> dict[str, list[str]]:
    """Old/new languages of user corpora files, checked: both roles present, evaluation text for each language."""
    from moelpr.data.corpus import load_corpora

    for split, path in files.items():
        if not Path(path).is_file():
            raise UserError(f"--{split if split != 'train' else 'corpora'} file {path} does not exist")
    train = load_corpora(files["train"])
    langs = {role: list(dict.fromkeys(c.language for c in train if c.role == role)) for role in ("old", "new")}
    if not langs["old"] or not langs["new"]:
        raise UserError(
            f"{files['train']} needs corpora of both roles, old and new (has old={langs['old']}, new={langs['new']})"
        )
    for split in ("validation", "heldout"):
        missing = sorted({*langs["old"], *langs["new"]} - {c.language for c in load_corpora(files[split])})
        if missing:
            raise UserError(f"{files[split]} has no {split} corpus for language(s) {', '.join(missing)}")
    return langs


def build_corpus(out: Path, corpus: str, sizes: DemoSizes, langs: dict[str, list[str]], seed: int) -> dict[str, Path]:
    """The built-in corpus (`libreoffice` or `manpages`) in corpus/, with its train, validation and test files."""
    files = {
        "train": out / "corpus" / "corpora.yaml",
        "validation": out / "corpus" / "validation.yaml",
        "heldout": out / "corpus" / "heldout.yaml",
    }
    if all(p.is_file() for p in files.values()):
        return files
    common = {
        "languages_old": tuple(langs["old"]),
        "languages_new": tuple(langs["new"]),
        "heldout_fraction": sizes.heldout_fraction,
        "validation_fraction": sizes.validation_fraction,
        "seed": seed,
        "overwrite": True,
    }
    if corpus == "libreoffice":
        from moelpr.demo.libreoffice import build_libreoffice_corpus

        build_libreoffice_corpus(out / "corpus", max_pages=sizes.max_pages_per_language, **common)
    else:
        from moelpr.demo.manpages import build_manpage_corpus

        build_manpage_corpus(out / "corpus", max_docs_per_language=sizes.max_pages_per_language, **common)
    return files


def pretraining_mix(out: Path, corpora_yaml: Path, new_share: float) -> Path:
    """pretrain/: the base's pretraining mix and the pool the later mixes come from (`moelpr.demo.data`)."""
    from moelpr.data.corpus import load_corpora
    from moelpr.demo.data import PRETRAIN_STATS, build_pretraining_mix

    folder = out / "pretrain"
    if not (folder / PRETRAIN_STATS).is_file():
        build_pretraining_mix(load_corpora(corpora_yaml), folder, new_share=new_share)
    return folder


def tokenizer(out: Path, base_yaml: Path, langs: dict[str, list[str]], sizes: DemoSizes, base: Path | None):
    """The user's model's tokenizer (`--base`), else one trained on the base's pretraining mix (every language in
    it, as the base sees them)."""
    from transformers import AutoTokenizer, PreTrainedTokenizerFast

    from moelpr.demo.tokenizer import train_tokenizer

    if base is not None:
        return AutoTokenizer.from_pretrained(base)
    path = out / "tokenizer"
    if (path / "tokenizer.json").is_file():
        return PreTrainedTokenizerFast.from_pretrained(path)
    return train_tokenizer(
        base_yaml, path, vocab_size=sizes.vocab_size, languages=[*langs["old"], *langs["new"]], overwrite=True
    )


def mixes(out: Path, pretrain: Path, tok, sizes: DemoSizes) -> dict[str, Any]:
    """The training mixes and their token counts; the replay is `replay_fraction` of the stage-1 tokens."""
    from moelpr.data.corpus import load_corpora
    from moelpr.demo.data import build_mixes

    data = out / "data"
    if not (data / "mix_stats.json").is_file():
        pool = load_corpora(pretrain / "pool.yaml")
        n_old = len({c.language for c in pool if c.role == "old"})
        build_mixes(
            pool,
            load_corpora(pretrain / "base.yaml"),
            tok,
            data,
            new_tokens=sizes.new_tokens_per_language,
            replay_tokens=max(
                1, int(sizes.replay_fraction * sizes.stage1_steps * blocks_per_step(sizes) * sizes.cutoff_len / n_old)
            ),
            review_scales=sizes.review_scales,
        )
    return json.loads((data / "mix_stats.json").read_text())


def init_base(out: Path, tok, sizes: DemoSizes, seed: int) -> Path:
    """A randomly initialised Llama-style model saved with the tokenizer: the start of the base pretraining."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    from moelpr.utils.atomic import atomic_output_dir

    path = out / "models" / "base_init"
    if (path / "config.json").is_file():
        return path
    config = LlamaConfig(
        vocab_size=len(tok),
        hidden_size=sizes.hidden_size,
        num_hidden_layers=sizes.num_layers,
        intermediate_size=sizes.intermediate_size,
        num_attention_heads=sizes.num_heads,
        num_key_value_heads=sizes.num_heads,
        max_position_embeddings=sizes.cutoff_len,
        bos_token_id=tok.bos_token_id,
        eos_token_id=tok.eos_token_id,
        pad_token_id=tok.pad_token_id,
        tie_word_embeddings=False,
    )
    torch.manual_seed(seed)
    model = LlamaForCausalLM(config)
    with atomic_output_dir(path, overwrite=True) as tmp:
        model.save_pretrained(tmp)
        tok.save_pretrained(tmp)
    return path
