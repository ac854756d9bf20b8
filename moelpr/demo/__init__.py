"""The miniature reproduction (`moe-lpr demo`): a real multilingual corpus from Debian man pages
(`corpus`) and a byte-level BPE tokenizer trained on its original languages only (`tokenizer`)."""

from moelpr.demo.corpus import MANPAGE_SOURCES, build_manpage_corpus
from moelpr.demo.tokenizer import train_tokenizer

__all__ = ["MANPAGE_SOURCES", "build_manpage_corpus", "train_tokenizer"]
