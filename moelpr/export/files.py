"""Files that travel with exported weights: tokenizer files and the generation config."""

from __future__ import annotations

import shutil
from pathlib import Path

# glob patterns of the files `AutoTokenizer.save_pretrained` and `GenerationConfig.save_pretrained` write
AUX_FILE_PATTERNS = (
    "tokenizer*.json",
    "tokenizer.model",
    "special_tokens_map.json",
    "added_tokens.json",
    "vocab.json",
    "vocab.txt",
    "merges.txt",
    "spiece.model",
    "chat_template.jinja",
    "chat_template.json",
    "generation_config.json",
)


def copy_aux_files(source: Path | None, target: Path) -> list[str]:
    """Copy tokenizer and generation-config files from `source` (a model directory) into `target`."""
    if source is None or not Path(source).is_dir():
        return []
    copied = []
    for pattern in AUX_FILE_PATTERNS:
        for path in sorted(Path(source).glob(pattern)):
            if path.is_file():
                shutil.copyfile(path, target / path.name)
                copied.append(path.name)
    return copied
