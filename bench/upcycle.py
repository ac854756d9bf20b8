"""Upcycling memory and time: the streamed `moe-lpr upcycle` against the in-memory `moelpr.upcycle` path.

    python bench/upcycle.py make-dense DIR                      # random bf16 weights, Qwen1.5-1.8B's shapes (3.7 GB)
    /usr/bin/time -v moe-lpr upcycle --model DIR --num-experts 6 --top-k 2 --output STREAMED
    /usr/bin/time -v python bench/upcycle.py in-memory --model DIR --num-experts 6 --top-k 2 --output IN_MEMORY
    python bench/upcycle.py compare STREAMED IN_MEMORY          # same keys, dtypes and values, read lazily

`in-memory` is what `moe-lpr upcycle` ran before it streamed: load the dense model, `moelpr.upcycle`,
`moelpr.save_model`. Both seed the routers with 0, so `compare` expects identical tensors.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch

QWEN15_18B = dict(
    hidden_size=2048,
    intermediate_size=5504,
    num_hidden_layers=24,
    num_attention_heads=16,
    num_key_value_heads=16,
    vocab_size=151936,
    max_position_embeddings=32768,
    tie_word_embeddings=False,
)
"""Qwen1.5-1.8B's shapes (a Qwen2 architecture: q/k/v biases, untied embeddings)."""


def make_dense(out: Path) -> None:
    from transformers import AutoModelForCausalLM, Qwen2Config

    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(Qwen2Config(**QWEN15_18B), dtype=torch.bfloat16)
    model.save_pretrained(out)
    print(f"wrote {out}: {model.num_parameters():,} parameters")


def in_memory(args: argparse.Namespace) -> None:
    from transformers import AutoTokenizer

    import moelpr

    model = moelpr.load_model(args.model)
    torch.manual_seed(args.seed)
    moe = moelpr.upcycle(model, num_experts=args.num_experts, top_k=args.top_k)
    moe.config.base_model_path = str(Path(args.model).resolve())
    has_tokenizer = (Path(args.model) / "tokenizer_config.json").is_file()
    tokenizer = AutoTokenizer.from_pretrained(args.model) if has_tokenizer else None
    moelpr.save_model(moe, args.output, format="full", tokenizer=tokenizer)
    print(moelpr.parameter_summary(moe))


def _files(path: Path) -> dict[str, Path]:
    index = path / "model.safetensors.index.json"
    if index.is_file():
        return {k: path / f for k, f in json.loads(index.read_text())["weight_map"].items()}
    from safetensors import safe_open

    with safe_open(path / "model.safetensors", framework="pt") as f:
        return {k: path / "model.safetensors" for k in f.keys()}


def compare(a: Path, b: Path) -> None:
    from safetensors import safe_open

    files_a, files_b = _files(a), _files(b)
    assert set(files_a) == set(files_b), sorted(set(files_a) ^ set(files_b))[:5]
    for name in sorted(files_a):
        with safe_open(files_a[name], framework="pt") as fa, safe_open(files_b[name], framework="pt") as fb:
            ta, tb = fa.get_tensor(name), fb.get_tensor(name)
        assert ta.dtype == tb.dtype and torch.equal(ta, tb), name
    config_a, config_b = (json.loads((p / "config.json").read_text()) for p in (a, b))
    assert config_a == config_b, {k for k in config_a if config_a[k] != config_b.get(k)}
    print(f"{len(files_a)} tensors equal (values, dtypes), config.json equal")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="cmd", required=True)
    sub.add_parser("make-dense").add_argument("out", type=Path)
    mem = sub.add_parser("in-memory")
    mem.add_argument("--model", required=True)
    mem.add_argument("--num-experts", type=int, default=6)
    mem.add_argument("--top-k", type=int, default=2)
    mem.add_argument("--seed", type=int, default=0)
    mem.add_argument("--output", required=True)
    cmp = sub.add_parser("compare")
    cmp.add_argument("a", type=Path)
    cmp.add_argument("b", type=Path)
    args = parser.parse_args()
    if args.cmd == "make-dense":
        make_dense(args.out)
    elif args.cmd == "in-memory":
        in_memory(args)
    else:
        compare(args.a, args.b)


if __name__ == "__main__":
    main()
