"""Forward+backward throughput of the MoE-LPR block against the official code's dispatch and the matmul floor.

The reference is written the way the paper's public code (a peft fork, Mixtral-v4 style) does it: experts
in a ModuleList of gate/up/down MLPs, a one-hot expert mask, a Python loop over all experts with
`torch.where`, gather, and `index_add_`. Both blocks share weights and routing (expert 0 frozen).

The floor is the bare matmuls of the same pass, on the row counts this routing gives each expert: forward
2 per expert (gate_up, down), input gradient 2 per expert, weight gradient 2 per trained expert (all but
expert 0), written into buffers allocated once; nothing else. No dispatch can be faster than the floor.

Every configuration (tokens × experts) times the three variants interleaved, rotating their order each
round; the table gives the median step, the spread (min–max) and each variant's speed as a ratio to the
floor and to the reference, all from this one run.

    python bench/moe_layer.py --threads 2                        # CPU float32: T 512/4096/16384 × E 4/6
    python bench/moe_layer.py --dtype bfloat16 --tokens 4096 --experts 4
    python bench/moe_layer.py --autocast bfloat16               # fp32 weights, bf16 autocast (mixed precision)
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import os
import statistics
import time

import torch
import torch.nn.functional as F
from torch import nn

from moelpr.model.layer import MoEBlock, StackedExperts, new_router


class GatedMLP(nn.Module):
    def __init__(self, hidden: int, inter: int):
        super().__init__()
        self.gate_proj = nn.Linear(hidden, inter, bias=False)
        self.up_proj = nn.Linear(hidden, inter, bias=False)
        self.down_proj = nn.Linear(inter, hidden, bias=False)
        self.act_fn = nn.SiLU()

    def forward(self, x):
        return self.down_proj(self.act_fn(self.gate_proj(x)) * self.up_proj(x))


class ReferenceMoE(nn.Module):
    """The official code's routing loop (MoE-LPR `tuners/moe`, after transformers' Mixtral v4)."""

    def __init__(self, experts: list[nn.Module], router: nn.Linear, top_k: int):
        super().__init__()
        self.experts, self.router, self.top_k = nn.ModuleList(experts), router, top_k

    def forward(self, hidden):
        x = hidden.view(-1, hidden.shape[-1])
        routing_weights = F.softmax(self.router(x), dim=1, dtype=torch.float)
        routing_weights, selected = torch.topk(routing_weights, self.top_k, dim=-1)
        routing_weights = (routing_weights / routing_weights.sum(dim=-1, keepdim=True)).to(x.dtype)
        final = torch.zeros_like(x)
        expert_mask = F.one_hot(selected, num_classes=len(self.experts)).permute(2, 1, 0)
        for e, expert in enumerate(self.experts):
            idx, top_x = torch.where(expert_mask[e])
            current = x[None, top_x].reshape(-1, x.shape[-1])
            final.index_add_(0, top_x, (expert(current) * routing_weights[top_x, idx, None]).to(x.dtype))
        return final.view_as(hidden)


class MatmulFloor:
    """The matmuls of one forward+backward and nothing else, on preallocated operands and outputs."""

    def __init__(self, counts: list[int], hidden: int, inter: int, dtype: torch.dtype, device: str):
        def rand(*shape):
            return torch.randn(*shape, dtype=dtype, device=device)

        self.work = []
        for e, n in enumerate(counts):
            if not n:
                continue
            x, dy, h, a = rand(n, hidden), rand(n, hidden), rand(n, 2 * inter), rand(n, inter)
            gate_up, down = rand(2 * inter, hidden), rand(hidden, inter)
            mms = [
                (x, gate_up.t(), rand(n, 2 * inter)),
                (a, down.t(), rand(n, hidden)),  # forward
                (dy, down, rand(n, inter)),
                (h, gate_up, rand(n, hidden)),
            ]  # input gradients
            if e > 0:  # weight gradients of the trained experts
                mms += [(dy.t(), a, rand(hidden, inter)), (h.t(), x, rand(2 * inter, hidden))]
            self.work += mms

    def __call__(self) -> None:
        for a, b, out in self.work:
            torch.mm(a, b, out=out)


def build(hidden: int, inter: int, experts: int, top_k: int, dtype: torch.dtype, device: str):
    torch.manual_seed(0)
    original = GatedMLP(hidden, inter).to(device, dtype).requires_grad_(False)
    stacked = StackedExperts.copies_of(original, experts - 1)
    with torch.no_grad():
        stacked.gate_up_proj.add_(torch.randn_like(stacked.gate_up_proj) * 0.02)
        stacked.down_proj.add_(torch.randn_like(stacked.down_proj) * 0.02)
    router = new_router(hidden, experts, like=original.down_proj.weight)
    ours = MoEBlock(original=original, experts=[stacked], routers=[router], top_k=top_k)
    copies = []
    for e in range(experts - 1):
        mlp = copy.deepcopy(original).requires_grad_(True)
        gate, up = stacked.gate_up_proj[e].detach().chunk(2)
        with torch.no_grad():
            (
                mlp.gate_proj.weight.copy_(gate),
                mlp.up_proj.weight.copy_(up),
                mlp.down_proj.weight.copy_(stacked.down_proj[e]),
            )
        copies.append(mlp)
    reference = ReferenceMoE([original, *copies], copy.deepcopy(router), top_k)
    return ours, reference


def expert_counts(block: MoEBlock, x: torch.Tensor) -> list[int]:
    with torch.no_grad():
        experts = block.route(x).experts
    return torch.bincount(experts.reshape(-1), minlength=block.num_experts).tolist()


def timed(fn, device: str) -> float:
    if device == "cuda":
        torch.cuda.synchronize()
    start = time.perf_counter()
    fn()
    if device == "cuda":
        torch.cuda.synchronize()
    return time.perf_counter() - start


def run_config(args, tokens: int, experts: int, dtype: torch.dtype, device: str) -> dict:
    ours, reference = build(args.hidden, args.intermediate, experts, args.top_k, dtype, device)
    x = torch.randn(tokens, args.hidden, device=device, dtype=dtype, requires_grad=True)
    grad = torch.randn_like(x)
    counts = expert_counts(ours, x)
    autocast = (
        torch.autocast(device, dtype=getattr(torch, args.autocast)) if args.autocast else contextlib.nullcontext()
    )

    def step(block):
        def run():
            x.grad = None
            with autocast:
                y = block(x)
            y.backward(grad)

        return run

    with torch.no_grad(), autocast:
        diff = (ours(x).float() - reference(x).float()).abs().max().item()
    compute = getattr(torch, args.autocast) if args.autocast else dtype
    variants = {
        "ours": step(ours),
        "reference": step(reference),
        "floor": MatmulFloor(counts, args.hidden, args.intermediate, compute, device),
    }
    names = list(variants)
    times: dict[str, list[float]] = {n: [] for n in names}
    for it in range(args.warmup + args.rounds):
        for name in names[it % 3 :] + names[: it % 3]:
            t = timed(variants[name], device)
            if it >= args.warmup:
                times[name].append(t)
        for block in (ours, reference):
            block.zero_grad(set_to_none=True)
    return {
        "tokens": tokens,
        "experts": experts,
        "counts": counts,
        "diff": diff,
        "median": {n: statistics.median(v) for n, v in times.items()},
        "spread": {n: (min(v), max(v)) for n, v in times.items()},
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tokens", default="512,4096,16384", help="comma-separated token counts T")
    parser.add_argument("--experts", default="4,6", help="comma-separated expert counts E (expert 0 frozen)")
    parser.add_argument("--hidden", type=int, default=512)
    parser.add_argument("--intermediate", type=int, default=1376)
    parser.add_argument("--top-k", type=int, default=2)
    parser.add_argument("--dtype", default=None, help="float32 / bfloat16 (default: float32 on CPU, bfloat16 on CUDA)")
    parser.add_argument("--autocast", default=None, help="run both blocks under autocast to this dtype (e.g. bfloat16)")
    parser.add_argument("--threads", type=int, default=None, help="intra-op CPU threads (default: torch's)")
    parser.add_argument("--rounds", type=int, default=7, help="timed rounds per configuration (median)")
    parser.add_argument("--warmup", type=int, default=2)
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    dtype = getattr(torch, args.dtype or ("bfloat16" if device == "cuda" else "float32"))
    where = torch.cuda.get_device_name() if device == "cuda" else f"CPU, {torch.get_num_threads()} threads"
    print(
        f"device: {where}; dtype {dtype}; autocast {args.autocast or 'off'}; torch {torch.__version__}; "
        f"H={args.hidden} I={args.intermediate} top-{args.top_k}; load average {os.getloadavg()[0]:.2f}"
    )
    print(
        f"median of {args.rounds} interleaved rounds after {args.warmup} warm-up; "
        "x floor = floor time / variant time, x ref = reference time / variant time"
    )
    print("| T | E | variant | ms/step (min-max) | tokens/s | x floor | x ref |")
    print("|---|---|---|---|---|---|---|")
    notes = []
    for tokens in (int(t) for t in args.tokens.split(",")):
        for experts in (int(e) for e in args.experts.split(",")):
            r = run_config(args, tokens, experts, dtype, device)
            med = r["median"]
            for name in ("ours", "reference", "floor"):
                lo, hi = r["spread"][name]
                print(
                    f"| {tokens} | {experts} | {name} | {med[name] * 1e3:.1f} ({lo * 1e3:.1f}-{hi * 1e3:.1f}) "
                    f"| {tokens / med[name]:,.0f} | {med['floor'] / med[name]:.3f} | {med['reference'] / med[name]:.3f} |",
                    flush=True,
                )
            notes.append(
                f"T={tokens} E={experts}: pairs per expert {r['counts']}, max |ours - reference| = {r['diff']:.1e}"
            )
    print("\n".join(notes))
    print(f"load average at the end {os.getloadavg()[0]:.2f}")


if __name__ == "__main__":
    main()
