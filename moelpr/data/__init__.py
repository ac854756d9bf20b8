"""Data pipeline: corpora specs and reading (`corpus`), tokenising and packing with the per-token language-role
mask and an on-disk cache (`pack`), and batching (`collate`)."""

from moelpr.data.collate import BlockCollator, collate_blocks
from moelpr.data.corpus import Corpus, iter_documents, load_corpora
from moelpr.data.pack import tokenize_and_pack

__all__ = ["BlockCollator", "Corpus", "collate_blocks", "iter_documents", "load_corpora", "tokenize_and_pack"]
