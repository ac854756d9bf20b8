"""Reading a prepared dataset (`moelpr.data.prepare`): memory-mapped shards, mixed by weight, as a map-style
dataset the Trainer samples from.

A block is a view `tokens[i*S:(i+1)*S]` of a shard file; its `lang_mask` and `lang_group` are those of its
corpus (a block never mixes corpora), built when the block is read. Opening a dataset reads the manifest and
checks the shard files' sizes, so it takes the same time whatever the dataset's size; a shard's contents are
checked block by block as they are read (ids inside the vocabulary) and in full by `moe-lpr prepare` run again.
"""

from __future__ import annotations

import bisect
import json
import os
from pathlib import Path
from typing import Any

import numpy as np
import torch

from moelpr.data.corpus import Corpus
from moelpr.data.mix import Mixture, block_counts
from moelpr.data.prepare import FORMAT_VERSION, MANIFEST
from moelpr.errors import UserError

_AGAIN = "run `moe-lpr prepare` again to rebuild it"


def read_manifest(root: str | os.PathLike) -> dict[str, Any]:
    """The manifest of a prepared dataset directory; `UserError` if it is missing, incomplete or foreign."""
    path = Path(root) / MANIFEST
    if not Path(root).is_dir():
        raise UserError(f"prepared dataset {os.fspath(root)!r} does not exist; make it with `moe-lpr prepare`")
    if not path.is_file():
        raise UserError(
            f"{os.fspath(root)} is not a finished prepared dataset (no {MANIFEST}); run `moe-lpr prepare` to "
            "make or finish it"
        )
    try:
        manifest = json.loads(path.read_text())
    except (OSError, ValueError) as e:
        raise UserError(f"cannot read {path} ({type(e).__name__}); {_AGAIN}") from None
    if manifest.get("format") != FORMAT_VERSION:
        raise UserError(
            f"{os.fspath(root)} was prepared by another moelpr version (format {manifest.get('format')}, this one "
            f"reads {FORMAT_VERSION}); run `moe-lpr prepare` again into a new directory"
        )
    return manifest


def prepared_corpora(root: str | os.PathLike) -> list[Corpus]:
    """The corpora a prepared dataset holds (names, languages, roles, groups and mixing settings)."""
    return [
        Corpus(name=e["name"], paths=e["paths"], language=e["language"], role=e["role"], group=e["group"], **e["mix"])
        for e in read_manifest(root)["corpora"]
    ]


class PreparedDataset(torch.utils.data.Dataset):
    """One epoch of a prepared dataset's corpora, mixed by weight (`moelpr.data.mix`).

    Rows: `input_ids` `(S,)`, `lang_mask` `(S,)` (1 = an old-language block), `lang_group` `(S,)`, `language`.

    Args:
        root: the prepared dataset directory.
        corpora: names of the corpora to use (default: all), in the manifest's order.
        mix: per corpus name, mixing settings replacing the recorded ones ({"weight": 3}, {"epochs": 2}, or {}
            for "each block once").
        tokenizer: if given, must be the tokenizer the dataset was prepared with.
        cutoff_len: if given, must be the dataset's block length.
    """

    def __init__(
        self,
        root: str | os.PathLike,
        *,
        corpora: list[str] | None = None,
        mix: dict[str, dict] | None = None,
        tokenizer: Any = None,
        cutoff_len: int | None = None,
    ):
        self.root = Path(root)
        manifest = read_manifest(root)
        self.cutoff_len = manifest["cutoff_len"]
        self.vocab_size = manifest["vocab_size"]
        self.dtype = np.dtype(manifest["dtype"])
        _check_match(self.root, manifest, tokenizer, cutoff_len)
        entries = {e["name"]: e for e in manifest["corpora"]}
        names = list(entries) if corpora is None else list(corpora)
        unknown = [n for n in names if n not in entries]
        if unknown:
            raise UserError(f"{self.root} holds no corpus {unknown[0]!r}; it holds: {', '.join(entries)}")
        self.entries = [entries[n] for n in sorted(names, key=list(entries).index)]
        if not self.entries:
            raise UserError(f"no corpus of {self.root} selected; name at least one")
        mixes = [(mix or {}).get(e["name"], e["mix"]) for e in self.entries]
        blocks = [e["blocks"] for e in self.entries]
        counts = block_counts([e["name"] for e in self.entries], blocks, mixes, self.cutoff_len)
        self.mixture = Mixture(counts, blocks)
        self._files = [[self.root / s["file"] for s in e["shards"]] for e in self.entries]
        self._starts = [np.cumsum([0] + [s["blocks"] for s in e["shards"]]).tolist() for e in self.entries]
        self._check_sizes()
        self._maps: dict[tuple[int, int], np.ndarray] = {}

    def _check_sizes(self) -> None:
        for entry, files in zip(self.entries, self._files):
            for shard, path in zip(entry["shards"], files):
                expected = shard["blocks"] * self.cutoff_len * self.dtype.itemsize
                try:
                    size = path.stat().st_size
                except OSError:
                    raise UserError(f"prepared shard {path} is missing; {_AGAIN}") from None
                if size != expected:
                    raise UserError(
                        f"prepared shard {path} is truncated or damaged ({size} bytes, expected {expected}); {_AGAIN}"
                    )

    def __getstate__(self) -> dict[str, Any]:
        return {**self.__dict__, "_maps": {}}  # memory maps are opened again in each dataloader worker

    def __len__(self) -> int:
        return len(self.mixture)

    @property
    def corpus_blocks(self) -> dict[str, int]:
        """Blocks each corpus gives one epoch."""
        return {e["name"]: n for e, n in zip(self.entries, self.mixture.counts)}

    @property
    def bytes_per_token(self) -> float:
        """UTF-8 bytes of text per token (EOS counted) of the selected corpora: bits per byte = nats per token /
        (ln 2 · this)."""
        text = sum(e["text_bytes"] for e in self.entries)
        return text / max(1, sum(e["tokens"] + e["dropped"] for e in self.entries))

    def block(self, c: int, b: int) -> np.ndarray:
        """Token ids `(S,)` of block `b` of corpus `c`, checked against the vocabulary."""
        starts = self._starts[c]
        shard = bisect.bisect_right(starts, b) - 1
        tokens = self._map(c, shard)
        local = b - starts[shard]
        ids = np.asarray(tokens[local * self.cutoff_len : (local + 1) * self.cutoff_len], dtype=np.int64)  # (S,)
        if ids.min() < 0 or ids.max() >= self.vocab_size:
            bad = int(ids.max() if ids.max() >= self.vocab_size else ids.min())
            raise UserError(
                f"prepared shard {self._files[c][shard]} is corrupt: block {local} holds token id {bad}, outside "
                f"the vocabulary of {self.vocab_size}; {_AGAIN}"
            )
        return ids

    def _map(self, c: int, shard: int) -> np.ndarray:
        key = (c, shard)
        if key not in self._maps:
            self._maps[key] = np.memmap(self._files[c][shard], dtype=self.dtype, mode="r")
        return self._maps[key]

    def __getitem__(self, index: int) -> dict[str, Any]:
        c, b = self.mixture.locate(int(index))
        entry = self.entries[c]
        size = self.cutoff_len
        return {
            "input_ids": self.block(c, b),
            "lang_mask": np.full(size, entry["role"] == "old", dtype=np.int8),
            "lang_group": np.full(size, entry["group"], dtype=np.int8),
            "language": entry["language"],
        }


def _check_match(root: Path, manifest: dict, tokenizer: Any, cutoff_len: int | None) -> None:
    """The training run's tokenizer and block length must be the ones the data was prepared with."""
    if cutoff_len is not None and cutoff_len != manifest["cutoff_len"]:
        raise UserError(
            f"{root} holds blocks of {manifest['cutoff_len']} tokens but cutoff_len is {cutoff_len}; set cutoff_len: "
            f"{manifest['cutoff_len']} or prepare the data again with --cutoff-len {cutoff_len}"
        )
    if tokenizer is not None:
        from moelpr.data.encode import tokenizer_fingerprint

        if tokenizer_fingerprint(tokenizer) != manifest["tokenizer"]:
            raise UserError(
                f"{root} was prepared with another tokenizer than the model's; prepare it again with "
                "--tokenizer set to the model directory"
            )
