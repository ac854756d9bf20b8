"""The per-expert loop over stacked experts: the path on CPU, and on accelerators without `grouped_mm`.

For each expert of a group and each chunk of its pairs (sorted by expert) one autograd Function gathers
the tokens, runs the gated MLP `act(x·G_e) ⊙ (x·U_e) · D_e`, scales by the routing weight and adds the
result into the output with `index_add_`. Its hand-written backward does the matmuls of autograd over the
same loop (the official code's dispatch) with fewer element-wise passes and allocations:
- act(gate) is recomputed, not saved, and the expert output is not saved at all: the routing-weight
  gradient is <dout·D_e, act(gate)·up>, from tensors the backward has anyway; act(gate)·up is saved only
  when the down projection trains (stage 1), and recomputed when only routers and inputs need gradients
  (stage 2), so frozen experts save their pre-activations alone;
- gate and up stay one `(rows, 2I)` matmul forward and backward (two matmuls per expert and direction, as
  in the floor of `bench/moe_layer.py`), with no concatenation of their gradients;
- the input gradient goes into one `(N, H)` buffer, not one full-size zero tensor per expert;
- each weight gradient goes into its expert's slice of the stacked gradient.
Chunks keep every temporary under glibc's mmap ceiling: bigger blocks are mapped afresh on every
allocation and each of their pages faults on first touch (docs/benchmarks.md §1).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from .grouped import cast, compute_dtype

# glibc maps every block above 32 MiB (the ceiling of its dynamic mmap threshold) afresh, so each of its
# pages faults on first touch, every step; an expert's (rows, 2I) pre-activations are cut into equal chunks
# below that. Smaller chunks would mean more ops, which costs more than it saves when threads contend.
_CHUNK_BYTES = 30 << 20


def _chunks(counts: list[int], max_rows: int):
    """(expert, row slice, first chunk of that expert?) covering every pair, in equal chunks of ≤ `max_rows`."""
    start = 0
    for e, n in enumerate(counts):
        if n:
            rows = -(-n // -(-n // max_rows))  # ceil(n / ceil(n / max_rows))
            for lo in range(start, start + n, rows):
                yield e, slice(lo, min(lo + rows, start + n)), lo == start
        start += n


def _accumulate(buffer: torch.Tensor, a: torch.Tensor, b: torch.Tensor, first: bool) -> None:
    """buffer (=, if first, else +=) a @ b, in buffer's dtype (float32 master gradients under autocast).

    The first product lands in a small fresh tensor (recycled heap memory) and is copied in one streaming
    pass: the stacked gradient is one big allocation, often freshly mapped by glibc, and `mm(out=)` straight
    into it measured ~3% slower per backward with few rows per expert (T=512, E=6).
    """
    if first:
        buffer.copy_(a @ b)
    elif buffer.dtype == a.dtype:
        buffer.addmm_(a, b)
    else:
        buffer.add_(a @ b)


def _accumulate_sum(buffer: torch.Tensor, a: torch.Tensor, first: bool) -> None:
    buffer.copy_(a.sum(0)) if first else buffer.add_(a.sum(0))


def add_looped(
    out: torch.Tensor,
    x: torch.Tensor,
    token: torch.Tensor,
    weight: torch.Tensor,
    counts: list[int],
    gate_up: torch.Tensor,
    down: torch.Tensor,
    gate_up_bias: torch.Tensor | None,
    down_bias: torch.Tensor | None,
    act_fn: nn.Module,
) -> torch.Tensor:
    """`out[token[p]] += weight[p] · MLP_e(x[token[p]])` for the pairs p of one stacked group, sorted by expert.

    Args:
        out: `(N, H)` accumulator, updated in place and returned.
        x: `(N, H)` tokens.
        token, weight: `(M,)` token index and routing weight (out's dtype) of each pair, the first `counts[0]`
            for expert 0 of the group, the next `counts[1]` for expert 1, ...
        counts: pairs per expert (host ints, sum = M).
        gate_up, down: `(E, 2I, H)` rows [gate; up] and `(E, H, I)`, `nn.Linear` layout per expert.
        gate_up_bias, down_bias: `(E, 2I)` / `(E, H)` or None.
        act_fn: the activation, out of place (every transformers `ACT2FN` is).
    """
    return _LoopedExperts.apply(
        out, x, token, weight, gate_up, down, gate_up_bias, down_bias, counts, act_fn, torch.is_grad_enabled()
    )


class _LoopedExperts(torch.autograd.Function):
    """Saves, when a backward can follow, each used expert's weights in the compute dtype (cast once, as
    autocast's `F.linear` saves its casts) and, per chunk, [gate, up] and (if `down` trains) act(gate)·up."""

    @staticmethod
    def forward(ctx, out, x, token, weight, gate_up, down, gate_up_bias, down_bias, counts, act_fn, keep):
        dtype, inter = compute_dtype(x), down.shape[-1]
        keep_a = keep and ctx.needs_input_grad[5]  # act(gate)·up feeds only the down projection's gradient
        expert_weights, saved = {}, []
        for e, chunk, first in _chunks(counts, max(1, _CHUNK_BYTES // (2 * inter * dtype.itemsize))):
            if first:
                expert_weights[e] = cast(gate_up[e], dtype), cast(down[e], dtype)  # (2I, H), (H, I)
            w_gate_up, w_down = expert_weights[e]
            idx = token[chunk]
            xe = x.index_select(0, idx).to(dtype)  # (r, H)
            h = F.linear(xe, w_gate_up, None if gate_up_bias is None else cast(gate_up_bias[e], dtype))  # (r, 2I)
            a = act_fn(h[:, :inter]).mul_(h[:, inter:])  # (r, I)
            y = F.linear(a, w_down, None if down_bias is None else cast(down_bias[e], dtype))  # (r, H)
            out.index_add_(0, idx, y.to(out.dtype).mul_(weight[chunk, None]))
            if keep:
                saved += [h, a] if keep_a else [h]
        ctx.mark_dirty(out)
        cast_weights = [w for pair in expert_weights.values() for w in pair] if keep else []
        ctx.save_for_backward(x, token, weight, gate_up, down, gate_up_bias, down_bias, *cast_weights, *saved)
        ctx.counts, ctx.act_fn, ctx.dtype, ctx.experts = counts, act_fn, dtype, list(expert_weights) if keep else []
        ctx.keep_a = keep_a
        return out

    @staticmethod
    def backward(ctx, d_out):
        x, token, weight, gate_up, down, gate_up_bias, down_bias, *saved = ctx.saved_tensors
        n = 2 * len(ctx.experts)
        expert_weights = dict(zip(ctx.experts, zip(saved[:n:2], saved[1:n:2])))  # e -> (gate_up, down) in dtype
        saved = saved[n:]
        _, need_x, _, need_weight, need_gate_up, need_down, need_gate_up_bias, need_down_bias = ctx.needs_input_grad[:8]
        dtype, inter, counts = ctx.dtype, down.shape[-1], ctx.counts
        dx = torch.zeros_like(x) if need_x else None  # (N, H)
        d_weight = torch.empty_like(weight) if need_weight else None  # (M,)
        d_gate_up = _per_expert_buffer(gate_up, counts) if need_gate_up else None  # (E, 2I, H)
        d_down = _per_expert_buffer(down, counts) if need_down else None  # (E, H, I)
        d_gate_up_bias = _per_expert_buffer(gate_up_bias, counts) if need_gate_up_bias else None  # (E, 2I)
        d_down_bias = _per_expert_buffer(down_bias, counts) if need_down_bias else None  # (E, H)
        chunks = _chunks(counts, max(1, _CHUNK_BYTES // (2 * inter * dtype.itemsize)))
        per_chunk = zip(saved[0::2], saved[1::2]) if ctx.keep_a else ((h, None) for h in saved)
        for (e, chunk, first), (h, a) in zip(chunks, per_chunk):
            w_gate_up, w_down = expert_weights[e]
            idx, w = token[chunk], weight[chunk, None].to(dtype)  # (r,), (r, 1)
            gate, up = h[:, :inter], h[:, inter:]  # (r, I) each
            with torch.enable_grad():
                gate_ = gate.detach().requires_grad_(True)
                act = ctx.act_fn(gate_)  # (r, I), recomputed rather than saved
            if a is None and need_weight:
                a = act.detach() * up  # (r, I), recomputed: only the routing weight's gradient needs it
            dy = d_out.index_select(0, idx).to(dtype)  # (r, H), gradient of the weighted output
            g = dy @ w_down  # (r, I)
            if need_weight:
                dw = torch.linalg.vecdot(g, a)  # (r,)
                if down_bias is not None:
                    dw += dy @ cast(down_bias[e], dtype)
                d_weight[chunk] = dw
            dy.mul_(w)  # gradient of the expert output
            if need_down:
                _accumulate(d_down[e], dy.t(), a, first)
            if need_down_bias:
                _accumulate_sum(d_down_bias[e], dy, first)
            da = g.mul_(w)  # (r, I)
            dh = torch.empty_like(h)  # (r, 2I): [d gate, d up]
            (d_gate,) = torch.autograd.grad(act, gate_, da * up)  # (r, I)
            dh[:, :inter] = d_gate
            torch.mul(act.detach(), da, out=dh[:, inter:])
            if need_gate_up:
                _accumulate(d_gate_up[e], dh.t(), x.index_select(0, idx).to(dtype), first)
            if need_gate_up_bias:
                _accumulate_sum(d_gate_up_bias[e], dh, first)
            if need_x:
                dx.index_add_(0, idx, (dh @ w_gate_up).to(dx.dtype))
        return d_out, dx, None, d_weight, d_gate_up, d_down, d_gate_up_bias, d_down_bias, None, None, None


def _per_expert_buffer(param: torch.Tensor, counts: list[int]) -> torch.Tensor:
    """An uninitialised gradient buffer like `param` `(E, ...)` whose rows for experts without pairs are zero."""
    buffer = torch.empty_like(param)
    for e, n in enumerate(counts):
        if not n:
            buffer[e].zero_()
    return buffer
