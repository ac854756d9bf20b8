"""The demo's tokenizer: a byte-level BPE trained on the base's pretraining mix (mostly the old languages).

It stands in for an English-centric LLM's tokenizer: trained on the same mix as the base (the old languages
plus a few per cent of new-language text), it encodes new-language text losslessly (every byte has a token)
but in more, shorter tokens. Encoding adds no special tokens (no BOS/EOS
post-processor); callers that want `<s>`/`</s>` add `bos_token_id`/`eos_token_id` themselves.
"""

from __future__ import annotations

import os
from collections.abc import Iterable, Iterator, Sequence
from pathlib import Path
from typing import TYPE_CHECKING

from moelpr.errors import UserError
from moelpr.utils.atomic import atomic_output_dir

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerFast

SPECIAL_TOKENS = ("<unk>", "<s>", "</s>", "<pad>")  # ids 0..3


def iter_corpora_texts(corpora_yaml: str | os.PathLike, languages: Sequence[str] | None = None) -> Iterator[str]:
    """Documents of the corpora in a corpora file: those of `languages`, or else those with role "old"."""
    from moelpr.data.corpus import iter_documents, load_corpora

    corpora = load_corpora(corpora_yaml)
    chosen = [c for c in corpora if (c.language in languages if languages is not None else c.role == "old")]
    if not chosen:
        which = f"languages {list(languages)}" if languages is not None else 'role "old"'
        raise UserError(f"no corpus with {which} in {os.fspath(corpora_yaml)}; check its language/role fields")
    for corpus in chosen:
        yield from iter_documents(corpus)


def train_tokenizer(
    source: str | os.PathLike | Iterable[str],
    out_dir: str | os.PathLike,
    *,
    vocab_size: int = 8000,
    languages: Sequence[str] | None = None,
    overwrite: bool = False,
) -> PreTrainedTokenizerFast:
    """Train a byte-level BPE tokenizer and save it with `save_pretrained(out_dir)` (atomically).

    Args:
        source: a corpora YAML file (its "old" corpora, or those of `languages`, are read) or an
            iterable of texts used as given.
        out_dir: where the tokenizer files go.
        vocab_size: total vocabulary, the 4 special tokens and 256 byte tokens included.
        languages: with a corpora file, train on these languages instead of the "old" ones.
        overwrite: replace an existing non-empty `out_dir`.

    Returns:
        The `transformers.PreTrainedTokenizerFast` reloaded from `out_dir`.
    """
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    min_size = len(SPECIAL_TOKENS) + len(pre_tokenizers.ByteLevel.alphabet())
    if vocab_size < min_size:
        raise UserError(f"vocab_size must be at least {min_size} (special tokens + 256 bytes), got {vocab_size}")
    if isinstance(source, (str, os.PathLike)):
        texts: Iterable[str] = iter_corpora_texts(source, languages)
    else:
        texts = source

    tokenizer = Tokenizer(models.BPE())  # no unk needed: every byte is in the vocabulary
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=list(SPECIAL_TOKENS),
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tokenizer.train_from_iterator(texts, trainer=trainer)

    wrapped = PreTrainedTokenizerFast(
        tokenizer_object=tokenizer,
        unk_token="<unk>",
        bos_token="<s>",
        eos_token="</s>",
        pad_token="<pad>",
        clean_up_tokenization_spaces=False,  # decoding must give back the exact text
    )
    final = Path(out_dir)
    with atomic_output_dir(final, overwrite=overwrite) as tmp:
        wrapped.save_pretrained(tmp)
    return PreTrainedTokenizerFast.from_pretrained(final)
