"""Forward+backward throughput of the MoE-LPR block against the official code's dispatch and the matmul floor,
and against transformers' own fused Mixtral experts; eager and compiled.

The reference is written the way the paper's public code (a peft fork, Mixtral-v4 style) does it: experts
in a ModuleList of gate/up/down MLPs, a one-hot expert mask, a Python loop over all experts with
`torch.where`, gather, and `index_add_`. Both blocks share weights and routing (expert 0 frozen).

The floor is the bare matmuls of the same pass, on the row counts this routing gives each expert: forward
2 per expert (gate_up, down), input gradient 2 per expert, weight gradient 2 per trained expert (all but
expert 0), written into buffers allocated once; nothing else. No dispatch can be faster than the floor.

"hf" is transformers' `MixtralSparseMoeBlock` (router + fused `MixtralExperts`, `experts_implementation=
"grouped_mm"`) with the same weights and routing; all its experts train (one stacked parameter), expert 0 too.
A variant name with "+compile" is that block under `torch.compile` (`--compile-backend`, inductor by default).

Every configuration (tokens × experts) times the variants interleaved, rotating their order each round; the
table gives the median step, the spread (min–max) and each variant's speed as a ratio to the floor, the
reference and hf (those measured), all from this one run.

    python bench/moe_layer.py --threads 2                        # CPU float32: T 512/4096/16384 × E 4/6
    python bench/moe_layer.py --dtype bfloat16 --tokens 4096 --experts 4
    python bench/moe_layer.py --autocast bfloat16               # fp32 weights, bf16 autocast (mixed precision)
    python bench/moe_layer.py --tokens 8192 --experts 6 --hidden 2048 --intermediate 5504 \
        --variants ours,reference,hf,ours+compile,hf+compile  # GPU: Qwen1.5-1.8B's layer (bench/gpu_check.sh)
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


def transformers_block(ours: MoEBlock) -> nn.Module:
    """transformers' Mixtral MoE block (router + fused `MixtralExperts` on `grouped_mm`) with `ours`'s weights:
    expert 0 (the original MLP) in front of the new experts, our router's rows as its router."""
    from transformers import MixtralConfig
    from transformers.models.mixtral.modeling_mixtral import MixtralSparseMoeBlock

    original, (stacked,), weight = ours.original, ours.experts, ours.routers[0].weight
    hidden, inter = original.down_proj.weight.shape
    config = MixtralConfig(
        hidden_size=hidden,
        intermediate_size=inter,
        num_local_experts=ours.num_experts,
        num_experts_per_tok=ours.top_k,
        router_jitter_noise=0.0,
    )
    config._experts_implementation = "grouped_mm"  # transformers' fused grouped-matmul experts
    block = MixtralSparseMoeBlock(config).to(weight.device, weight.dtype)
    with torch.no_grad():
        block.gate.weight.copy_(weight)
        gate_up0 = torch.cat([original.gate_proj.weight, original.up_proj.weight])  # (2I, H): [gate; up]
        block.experts.gate_up_proj.copy_(torch.cat([gate_up0[None], stacked.gate_up_proj]))  # (E, 2I, H)
        block.experts.down_proj.copy_(torch.cat([original.down_proj.weight[None], stacked.down_proj]))  # (E, H, I)
    return block


VARIANTS = ("ours", "reference", "floor", "hf")  # each but the floor also as "<name>+compile"


def run_config(args, tokens: int, experts: int, dtype: torch.dtype, device: str) -> dict:
    """Time `args.variants` on one (tokens, experts) configuration; medians, spreads, routing and agreement."""
    ours, reference = build(args.hidden, args.intermediate, experts, args.top_k, dtype, device)
    blocks = {"ours": ours, "reference": reference}
    if any(v.startswith("hf") for v in args.variants):
        blocks["hf"] = transformers_block(ours)
    x = torch.randn(tokens, args.hidden, device=device, dtype=dtype, requires_grad=True)
    grad = torch.randn_like(x)
    counts = expert_counts(ours, x)
    autocast = (
        torch.autocast(device, dtype=getattr(torch, args.autocast)) if args.autocast else contextlib.nullcontext()
    )

    def call(name: str, block: nn.Module, inputs: torch.Tensor) -> torch.Tensor:
        return block(inputs[None])[0] if name == "hf" else block(inputs)  # Mixtral's block takes (B, S, H)

    def step(name: str, block: nn.Module):
        def run():
            x.grad = None
            with autocast:
                y = call(name, block, x)
            y.backward(grad)

        return run

    with torch.no_grad(), autocast:
        want = ours(x).float()
        diff = {n: (call(n, b, x).float() - want).abs().max().item() for n, b in blocks.items() if n != "ours"}
    compute = getattr(torch, args.autocast) if args.autocast else dtype
    variants = {}
    for name in args.variants:
        base, compiled = name.removesuffix("+compile"), name.endswith("+compile")
        if base == "floor":
            variants[name] = MatmulFloor(counts, args.hidden, args.intermediate, compute, device)
        else:
            block = torch.compile(blocks[base], backend=args.compile_backend) if compiled else blocks[base]
            variants[name] = step(base, block)
    names = list(variants)
    times: dict[str, list[float]] = {n: [] for n in names}
    for it in range(args.warmup + args.rounds):
        for name in names[it % len(names) :] + names[: it % len(names)]:
            t = timed(variants[name], device)
            if it >= args.warmup:
                times[name].append(t)
        for block in blocks.values():
            block.zero_grad(set_to_none=True)
    return {
        "tokens": tokens,
        "experts": experts,
        "counts": counts,
        "diff": diff,
        "median": {n: statistics.median(v) for n, v in times.items()},
        "spread": {n: (min(v), max(v)) for n, v in times.items()},
    }


def ratios(median: dict[str, float], name: str) -> dict[str, float]:
    """Speed of `name` relative to the floor, the reference and hf (eager), those measured: their time / its time."""
    return {base: median[base] / median[name] for base in ("floor", "reference", "hf") if base in median}


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--tokens", default="512,4096,16384", help="comma-separated token counts T")
    p.add_argument("--experts", default="4,6", help="comma-separated expert counts E (expert 0 frozen)")
    p.add_argument("--hidden", type=int, default=512)
    p.add_argument("--intermediate", type=int, default=1376)
    p.add_argument("--top-k", type=int, default=2)
    p.add_argument("--dtype", default=None, help="float32 / bfloat16 (default: float32 on CPU, bfloat16 on CUDA)")
    p.add_argument("--autocast", default=None, help="run every block under autocast to this dtype (e.g. bfloat16)")
    p.add_argument(
        "--variants",
        type=lambda text: text.split(","),
        default=["ours", "reference", "floor"],
        help=f"comma-separated, from {', '.join(VARIANTS)}; any but floor may end in +compile",
    )
    p.add_argument("--compile-backend", default="inductor", help="torch.compile backend of the +compile variants")
    p.add_argument("--threads", type=int, default=None, help="intra-op CPU threads (default: torch's)")
    p.add_argument("--rounds", type=int, default=7, help="timed rounds per configuration (median)")
    p.add_argument("--warmup", type=int, default=2)
    return p


def main() -> None:
    args = parser().parse_args()
    unknown = [v for v in args.variants if v.removesuffix("+compile") not in VARIANTS or v == "floor+compile"]
    if unknown:
        raise SystemExit(f"unknown variants {unknown}; choose from {', '.join(VARIANTS)} (+compile)")
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
        "x base = base time / variant time (floor, reference, hf: those measured)"
    )
    bases = [b for b in ("floor", "reference", "hf") if b in args.variants]
    print("| T | E | variant | ms/step (min-max) | tokens/s | " + " | ".join(f"x {b}" for b in bases) + " |")
    print("|---|---|---|---|---|" + "---|" * len(bases))
    notes = []
    for tokens in (int(t) for t in args.tokens.split(",")):
        for experts in (int(e) for e in args.experts.split(",")):
            r = run_config(args, tokens, experts, dtype, device)
            med = r["median"]
            for name in args.variants:
                lo, hi = r["spread"][name]
                x = ratios(med, name)
                print(
                    f"| {tokens} | {experts} | {name} | {med[name] * 1e3:.1f} ({lo * 1e3:.1f}-{hi * 1e3:.1f}) "
                    f"| {tokens / med[name]:,.0f} | " + " | ".join(f"{x[b]:.3f}" for b in bases) + " |",
                    flush=True,
                )
            agree = ", ".join(f"{n} {d:.1e}" for n, d in r["diff"].items())
            notes.append(f"T={tokens} E={experts}: pairs per expert {r['counts']}, max |output - ours|: {agree}")
    print("\n".join(notes))
    print(f"load average at the end {os.getloadavg()[0]:.2f}")


if __name__ == "__main__":
    main()
