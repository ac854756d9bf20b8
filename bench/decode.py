"""Greedy decoding throughput (KV cache) of an MoE-LPR model against its dense base, batch 1 and 8.

Decoding a token is bound by reading weights, so the expected MoE/dense speed ratio is the ratio of weight
bytes one decoding step reads:

    dense  = L·(attn + norms + mlp) + final norm + lm_head
    moe    = L·(attn + norms + hit_B·mlp + router) + final norm + lm_head
    bound  = dense / moe          (the input embedding reads B rows: negligible, left out)

where hit_B is the mean number of distinct experts the B tokens of one step choose per layer (k at batch 1,
measured from the routing at batch B). At batch B > 1 a step also does B× the FLOPs; the MoE/dense FLOP ratio
per token is the same formula with hit = k, so the expected ratio lies between the bytes bound (memory-bound)
and the FLOP ratio (compute-bound); the table shows both. Tokens/s counts decoding only: (time to generate N tokens − time to
generate 1 token, i.e. the prefill) / (N − 1) steps. Target: measured ratio ≥ 0.9 × bound.

    python bench/decode.py                                  # Llama 512/1376, 8 layers, vocab 8000, 4 experts top-2
    python bench/decode.py --batches 1,8 --new-tokens 64 --repeats 3 --dtype bfloat16
"""

from __future__ import annotations

import argparse
import copy
import statistics
import time

import torch
from transformers import LlamaConfig, LlamaForCausalLM

import moelpr
from moelpr.model.capture import capture_routing, moe_blocks


def build(args, device, dtype):
    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=args.vocab,
        hidden_size=args.hidden,
        intermediate_size=args.inter,
        num_hidden_layers=args.layers,
        num_attention_heads=args.heads,
        num_key_value_heads=args.kv_heads or args.heads,
        max_position_embeddings=4096,
        bos_token_id=None,
        eos_token_id=None,
        pad_token_id=0,
    )
    dense = LlamaForCausalLM(config).eval()
    moe = moelpr.upcycle(copy.deepcopy(dense), num_experts=args.experts, top_k=args.top_k).eval()
    with torch.no_grad():  # trained-like experts, so routing is not degenerate
        for p in moe.parameters():
            if p.requires_grad:
                p.add_(torch.randn_like(p) * 0.02)
    return dense.to(device, dtype), moe.to(device, dtype)


def sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize()


@torch.inference_mode()
def generate_seconds(model, ids, new_tokens, device) -> float:
    sync(device)
    start = time.perf_counter()
    model.generate(
        input_ids=ids,
        attention_mask=torch.ones_like(ids),
        max_new_tokens=new_tokens,
        min_new_tokens=new_tokens,
        do_sample=False,
        pad_token_id=0,
    )
    sync(device)
    return time.perf_counter() - start


def decode_tokens_per_s(model, ids, args, device) -> float:
    generate_seconds(model, ids, 4, device)  # warm-up
    steps = []
    for _ in range(args.repeats):
        full = generate_seconds(model, ids, args.new_tokens, device)
        prefill = generate_seconds(model, ids, 1, device)
        steps.append((full - prefill) / (args.new_tokens - 1))
    return ids.shape[0] / statistics.median(steps)


@torch.inference_mode()
def experts_hit(moe, ids, args) -> float:
    """Mean distinct experts per layer chosen by the batch's tokens at one position (a decoding step)."""
    out = moe.generate(
        input_ids=ids,
        attention_mask=torch.ones_like(ids),
        max_new_tokens=16,
        min_new_tokens=16,
        do_sample=False,
        pad_token_id=0,
    )
    with capture_routing(moe) as routing:
        moe(input_ids=out)
    batch, seq = out.shape
    hits = []
    for layer in routing:
        chosen = layer.experts.view(batch, seq, -1)[:, ids.shape[1] :]  # (B, new, k)
        for pos in range(chosen.shape[1]):
            hits.append(chosen[:, pos].unique().numel())
    return statistics.mean(hits)


def weight_bytes(dense, moe, hit: float) -> tuple[float, float]:
    """Bytes one decoding step reads: dense, and MoE with `hit` experts per layer (formula in the docstring)."""
    size = lambda module: sum(p.numel() * p.element_size() for p in module.parameters())  # noqa: E731
    dense_total = size(dense) - size(dense.get_input_embeddings())
    if dense.config.tie_word_embeddings:
        dense_total += size(dense.get_input_embeddings())
    mlp = size(dense.model.layers[0].mlp)
    router = sum(size(r) for r in moe_blocks(moe)[0].routers)
    layers = len(dense.model.layers)
    return dense_total, dense_total + layers * ((hit - 1) * mlp + router)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--hidden", type=int, default=512)
    parser.add_argument("--inter", type=int, default=1376)
    parser.add_argument("--layers", type=int, default=8)
    parser.add_argument("--heads", type=int, default=8)
    parser.add_argument("--kv-heads", type=int, default=None)
    parser.add_argument("--vocab", type=int, default=8000)
    parser.add_argument("--experts", type=int, default=4)
    parser.add_argument("--top-k", type=int, default=2)
    parser.add_argument("--prompt-len", type=int, default=32)
    parser.add_argument("--new-tokens", type=int, default=64)
    parser.add_argument("--batches", default="1,8")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--dtype", default=None, help="float32 | bfloat16 (default: float32 on CPU, bfloat16 on CUDA)")
    parser.add_argument("--device", default=None, help="cpu | cuda (default: cuda when available)")
    parser.add_argument("--threads", type=int, default=None, help="torch intra-op threads on CPU")
    args = parser.parse_args()
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    dtype = getattr(torch, args.dtype or ("bfloat16" if device.type == "cuda" else "float32"))
    if args.threads:
        torch.set_num_threads(args.threads)
    dense, moe = build(args, device, dtype)
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else f"CPU, {torch.get_num_threads()} threads"
    print(
        f"device {name}, {str(dtype).removeprefix('torch.')}; Llama H={args.hidden} I={args.inter} L={args.layers} "
        f"V={args.vocab}; MoE {args.experts} experts top-{args.top_k}; prompt {args.prompt_len}, "
        f"{args.new_tokens} new tokens, median of {args.repeats}"
    )
    print(
        "| batch | dense tok/s | MoE tok/s | measured MoE/dense | experts read/layer | bound (dense/MoE bytes) "
        "| measured/bound | FLOP ratio (k experts) |"
    )
    print("|---|---|---|---|---|---|---|---|")
    for batch in [int(b) for b in args.batches.split(",")]:
        ids = torch.randint(1, args.vocab, (batch, args.prompt_len), generator=torch.Generator().manual_seed(batch)).to(
            device
        )
        dense_tps = decode_tokens_per_s(dense, ids, args, device)
        moe_tps = decode_tokens_per_s(moe, ids, args, device)
        hit = float(min(args.top_k, args.experts)) if batch == 1 else experts_hit(moe, ids, args)
        dense_bytes, moe_bytes = weight_bytes(dense, moe, hit)
        ratio, bound = moe_tps / dense_tps, dense_bytes / moe_bytes
        dense_active, moe_active = weight_bytes(dense, moe, float(min(args.top_k, args.experts)))
        flops = dense_active / moe_active  # per token, k experts (bytes ∝ parameters ∝ FLOPs)
        print(
            f"| {batch} | {dense_tps:.1f} | {moe_tps:.1f} | {ratio:.3f} | {hit:.2f} | {bound:.3f} | {ratio / bound:.2f} "
            f"| {flops:.3f} |"
        )


if __name__ == "__main__":
    main()
