"""Data pipeline: corpora specs (`corpus`), reading sources (`read`), preparing tokenised, packed shards on disk
(`prepare`, `shards`, `encode`), reading them mixed by weight (`prepared`, `mix`), the streaming path
(`stream`), the datasets a training run reads (`training`), and batching (`collate`). The preparation itself is
`moelpr.data.prepare.prepare` (what `moe-lpr prepare` runs)."""

from moelpr.data.collate import BlockCollator, collate_blocks
from moelpr.data.corpus import Corpus, iter_documents, load_corpora
from moelpr.data.prepared import PreparedDataset, prepared_corpora, read_manifest
from moelpr.data.training import default_cache_dir, training_dataset, validation_datasets

__all__ = [
    "BlockCollator",
    "Corpus",
    "PreparedDataset",
    "collate_blocks",
    "default_cache_dir",
    "iter_documents",
    "load_corpora",
    "prepared_corpora",
    "read_manifest",
    "training_dataset",
    "validation_datasets",
]
