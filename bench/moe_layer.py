"""Forward+backward throughput of the MoE-LPR block against the official code's dispatch.

The reference is written the way the paper's public code (a peft fork, Mixtral-v4 style) does it: experts
in a ModuleList of gate/up/down MLPs, a one-hot expert mask, a Python loop over all experts with
`torch.where`, gather, and `index_add_`. Both blocks share weights and routing (expert 0 frozen).

    python bench/moe_layer.py                     # float32 on CPU, bfloat16 on CUDA when present
    python bench/moe_layer.py --dtype bfloat16 --tokens 4096
"""

from __future__ import annotations

import argparse
import copy
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
            mlp.gate_proj.weight.copy_(gate), mlp.up_proj.weight.copy_(up), mlp.down_proj.weight.copy_(stacked.down_proj[e])
        copies.append(mlp)
    reference = ReferenceMoE([original, *copies], copy.deepcopy(router), top_k)
    return ours, reference


def step_time(block: nn.Module, x: torch.Tensor, grad: torch.Tensor, device: str) -> float:
    if device == "cuda":
        torch.cuda.synchronize()
    start = time.perf_counter()
    x.grad = None
    block(x).backward(grad)
    if device == "cuda":
        torch.cuda.synchronize()
    return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tokens", type=int, default=4096)
    parser.add_argument("--hidden", type=int, default=512)
    parser.add_argument("--intermediate", type=int, default=1376)
    parser.add_argument("--experts", type=int, default=4)
    parser.add_argument("--top-k", type=int, default=2)
    parser.add_argument("--dtype", default=None, help="float32 / bfloat16 (default: float32 on CPU, bfloat16 on CUDA)")
    parser.add_argument("--iters", type=int, default=10)
    args = parser.parse_args()
    device = "cuda" if torch.cuda.is_available() else "cpu"
    dtype = getattr(torch, args.dtype or ("bfloat16" if device == "cuda" else "float32"))
    ours, reference = build(args.hidden, args.intermediate, args.experts, args.top_k, dtype, device)
    x = torch.randn(args.tokens, args.hidden, device=device, dtype=dtype, requires_grad=True)
    grad = torch.randn_like(x)
    with torch.no_grad():
        diff = (ours(x) - reference(x)).abs().max().item()
    times: dict[str, list[float]] = {"ours": [], "reference": []}
    for i in range(args.iters + 2):  # interleaved, first two rounds are warm-up
        for name, block in (("ours", ours), ("reference", reference)):
            t = step_time(block, x, grad, device)
            if i >= 2:
                times[name].append(t)
    med = {name: statistics.median(ts) for name, ts in times.items()}
    name = torch.cuda.get_device_name() if device == "cuda" else f"CPU x{torch.get_num_threads()} threads"
    print(f"device: {name}; dtype: {dtype}; T={args.tokens} H={args.hidden} I={args.intermediate} "
          f"E={args.experts} top-{args.top_k}; max |ours - reference| = {diff:.2e}")
    for key in ("ours", "reference"):
        print(f"{key:>9}: fwd+bwd {med[key] * 1e3:8.1f} ms  {args.tokens / med[key]:10.0f} tokens/s")
    print(f"speed-up (reference time / ours): {med['reference'] / med['ours']:.2f}x")


if __name__ == "__main__":
    main()
