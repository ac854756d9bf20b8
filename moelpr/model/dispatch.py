"""How an MoE block runs its experts: one switch (`MoEBlock.dispatch`), the reference that defines the result,
and the paths that compute it faster.

    reference  the definition: for each expert, the tokens that chose it, their expert outputs times their
               routing weights, summed. Every other path is tested against it (outputs and gradients).
    loop       expert 0 runs as the original module on its rows, each stacked expert group through the
               per-expert loop of `looped.py` (hand-written backward, chunked). Pair counts are read on the
               host. CPU's path, and inference's everywhere: it touches only the experts the tokens chose.
    grouped    every expert, expert 0 included, in one `grouped_mm` per projection with offsets on the device:
               no host synchronisation where the kernel is fused (CUDA compute capability ≥ 9.0).
    triton     as grouped, with DeepSpeed's Triton grouped GEMM: no host synchronisation on Ampere (sm 8.x).
    auto       training on CUDA: grouped on sm ≥ 9.0; triton below when deepspeed + Triton are there, else
               grouped (torch's host-synchronised fallback, with a one-time warning); loop otherwise (CPU,
               other accelerators, inference, experts with biases, or rows a grouped kernel cannot align).

Whatever the routing, every trainable parameter of the block gets a gradient (zero for an expert no token
chose), so all processes of a data-parallel run (DDP, ZeRO-3, FSDP) reduce the same gradients.
"""

from __future__ import annotations

import warnings
from typing import TYPE_CHECKING, Callable

import torch
from torch import nn

from .arch import gate_up_down
from .errors import UserError
from .grouped import aligned, compute_dtype, grouped_matmul, triton_kernel_available

if TYPE_CHECKING:
    from .layer import MoEBlock, Routing


def run_experts(block: MoEBlock, x: torch.Tensor, routing: Routing) -> torch.Tensor:
    """Σ_j weights[t, j] · E_{experts[t, j]}(x[t]) for every token t of `x` `(N, H)`, by the block's path."""
    path = block.dispatch if block.dispatch != "auto" else auto_path(block, x)
    if path == "reference":
        return reference(block, x, routing)
    if path == "loop":
        return loop(block, x, routing)
    return grouped(block, x, routing, kernel="torch" if path == "grouped" else "triton")


def auto_path(block: MoEBlock, x: torch.Tensor) -> str:
    """The path "auto" takes for `x` (see the module docstring): `choose_path` on this block and device."""
    cuda = x.device.type == "cuda" and torch.version.hip is None
    stack = block.experts[0]
    return choose_path(
        training=torch.is_grad_enabled(),
        cuda_capability=torch.cuda.get_device_capability(x.device) if cuda else None,
        grouped_fits=not any(g.has_bias for g in block.experts) and aligned(x, stack.gate_up_proj, stack.down_proj),
        triton=triton_kernel_available,
    )


def choose_path(
    *, training: bool, cuda_capability: tuple[int, int] | None, grouped_fits: bool, triton: Callable[[], bool]
) -> str:
    """Auto's rule. `cuda_capability`: the NVIDIA GPU's (None off CUDA, or on ROCm); `grouped_fits`: bias-free
    experts whose rows a grouped kernel can align; `triton`: whether DeepSpeed's Triton kernel runs here."""
    if not training or cuda_capability is None or not grouped_fits:
        return "loop"
    if cuda_capability[0] >= 9:
        return "grouped"
    if triton():
        return "triton"
    _warn_host_sync()
    return "grouped"


def reference(block: MoEBlock, x: torch.Tensor, routing: Routing) -> torch.Tensor:
    """The definition: each expert on the tokens that chose it, weighted by their routing weights, summed."""
    out = torch.zeros_like(x)  # (N, H)
    hits = routing.experts[..., None] == torch.arange(block.num_experts, device=x.device)  # (N, k, E)
    if routing.allowed is not None:
        hits &= routing.allowed[..., None]
    for e in range(block.num_experts):
        rows = hits[:, :, e].any(dim=-1).nonzero().squeeze(-1)  # (n,) tokens that chose e
        weight = (routing.weights * hits[:, :, e]).sum(dim=-1)[rows]  # (n,)
        out = out.index_add(0, rows, block.expert(e)(x[rows]) * weight[:, None].to(x.dtype))
    return keep_in_graph(out, block)


@torch.compiler.disable  # runs eagerly under torch.compile: one graph break per block (docs/benchmarks.md)
def loop(block: MoEBlock, x: torch.Tensor, routing: Routing) -> torch.Tensor:
    """Expert 0 as the original module on its rows, each stacked group through `looped.add_looped`.

    Not traced by torch.compile: its Python loop follows pair counts read on the host, which dynamo would guard
    on and recompile for at every new routing (until its recompile limit), and `looped.py`'s autograd Function
    is not traceable either.
    """
    token, expert, weight = sorted_pairs(routing, x.dtype, drop_disallowed=True)
    counts = torch.bincount(expert, minlength=block.num_experts).tolist()  # host sync: the loop needs them
    out = torch.zeros_like(x)  # (N, H)
    if counts[0]:
        rows = token[: counts[0]]
        out.index_add_(0, rows, block.original(x.index_select(0, rows)) * weight[: counts[0], None])
    else:
        out = keep_in_graph(out, block.original)
    row, first = counts[0], 1
    for group in block.experts:
        group_counts = counts[first : first + group.num_experts]
        end = row + sum(group_counts)
        if end > row or torch.is_grad_enabled():  # an idle group is skipped when nothing needs its gradient
            out = group(out, x, token[row:end], weight[row:end], group_counts)
        row, first = end, first + group.num_experts
    return out


def grouped(block: MoEBlock, x: torch.Tensor, routing: Routing, kernel: str) -> torch.Tensor:
    """All experts in one grouped matmul per projection (`grouped.py`'s `kernel`), offsets on the device.

    Expert 0's weights are concatenated in front of the stacked new experts (a copy of one MLP per call);
    with trainable new experts the backward also forms expert 0's weight gradient, which is discarded.
    Picks a classifier disallowed are computed at weight 0 rather than dropped (dropping would read a count).
    """
    if any(group.has_bias for group in block.experts):
        raise UserError(f"moe_dispatch: {block.dispatch} needs bias-free experts; use loop (or auto) for this model")
    token, expert, weight = sorted_pairs(routing, x.dtype, drop_disallowed=False)
    dtype = compute_dtype(x)
    gate_up, down = _stacked_weights(block, dtype)  # (E, 2I, H), (E, H, I)
    counts = torch.zeros(block.num_experts, dtype=torch.int32, device=x.device)
    counts.scatter_add_(0, expert, torch.ones_like(expert, dtype=torch.int32))  # (E,)
    offsets = counts.cumsum(0, dtype=torch.int32)  # no host sync (bincount would read the max back)
    rows = x.index_select(0, token).to(dtype)  # (P, H)
    gate, up = grouped_matmul(kernel, rows, gate_up, offsets).chunk(2, dim=-1)  # (P, I) each
    ys = grouped_matmul(kernel, block.experts[0].act_fn(gate) * up, down, offsets)  # (P, H)
    return torch.zeros_like(x).index_add_(0, token, ys * weight[:, None])


def sorted_pairs(
    routing: Routing, dtype: torch.dtype, *, drop_disallowed: bool
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The (token, expert) pairs of a routing sorted by expert (stable): token `(P,)`, expert `(P,)`, weight `(P,)`.

    `drop_disallowed` leaves out the picks a classifier disallowed (this reads a count: a host sync).
    """
    k = routing.experts.shape[-1]
    expert = routing.experts.reshape(-1)  # (N·k,)
    weight = routing.weights.reshape(-1)  # (N·k,)
    token = None
    if drop_disallowed and routing.allowed is not None:
        keep = routing.allowed.reshape(-1)
        token = torch.arange(routing.experts.shape[0], device=expert.device).repeat_interleave(k)[keep]
        expert, weight = expert[keep], weight[keep]
    order = expert.argsort(stable=True)  # (P,)
    token = order // k if token is None else token[order]
    return token, expert[order], weight[order].to(dtype)


def keep_in_graph(out: torch.Tensor, module: nn.Module) -> torch.Tensor:
    """`out`, plus zero times `module`'s trainable parameters when a backward can follow.

    For an expert (or group) that ran on no token: every process's backward then gives every trainable parameter
    a (zero) gradient whatever its routing, so DDP never sees one as unused and ZeRO-3 / FSDP reduce the same
    gradients on every rank.
    """
    trainable = [p for p in module.parameters() if p.requires_grad]
    if not torch.is_grad_enabled() or not trainable:
        return out
    return out + 0.0 * sum(p.sum() for p in trainable)


def _stacked_weights(block: MoEBlock, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    """Every expert's gate_up `(E, 2I, H)` and down `(E, H, I)`, expert 0 first, in `dtype`."""
    gate_up0, down0, _, _ = gate_up_down(block.original)
    gate_up = torch.cat([gate_up0[None], *(g.gate_up_proj for g in block.experts)]).to(dtype)
    down = torch.cat([down0[None], *(g.down_proj for g in block.experts)]).to(dtype)
    return gate_up, down


_warned: list[bool] = []


def _warn_host_sync() -> None:
    if not _warned:
        _warned.append(True)
        warnings.warn(
            "MoE dispatch: this GPU (compute capability < 9.0) has no fused grouped matmul in PyTorch, whose fallback "
            "synchronises with the host; pip install deepspeed for its Triton grouped GEMM (moe_dispatch: triton)",
            stacklevel=3,
        )
