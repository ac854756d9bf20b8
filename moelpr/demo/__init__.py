"""The miniature reproduction (`moe-lpr demo`): real multilingual corpora (the LibreOffice help in the papers'
languages, `libreoffice`; Debian man pages, `manpages`), a byte-level BPE tokenizer trained on the base's mix
(`tokenizer`), and the comparison itself (`run.run_demo`)."""

from moelpr.demo.libreoffice import HELP_SOURCES, build_libreoffice_corpus
from moelpr.demo.manpages import MANPAGE_SOURCES, build_manpage_corpus
from moelpr.demo.tokenizer import train_tokenizer

__all__ = ["HELP_SOURCES", "MANPAGE_SOURCES", "build_libreoffice_corpus", "build_manpage_corpus", "train_tokenizer"]
