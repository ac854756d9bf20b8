"""Grouped matmuls for the stacked experts on accelerators, and the dtype every expert matmul runs in.

`F.grouped_mm` serves all experts of a group in one call per projection (fewer launches, offsets stay on
the device). Support is probed once per (device type, dtype) with a tiny forward+backward, so no CUDA-only
call runs without a fallback; where it fails (e.g. Ascend NPUs, odd strides), and always on CPU, the
per-expert loop of `looped.py` serves instead: on CPU a matmul costs the same inside or outside
`grouped_mm`, and the loop saves the element-wise passes and fresh allocations over all routed rows at once
(docs/benchmarks.md §1).

Expert matmuls run in `compute_dtype(x)`: autocast's dtype where autocast is on for x's device (float32
master weights are cast, as `F.linear` does under autocast), else x's dtype.
"""

from __future__ import annotations

import threading

import torch
import torch.nn.functional as F
from torch import nn

_SUPPORT: dict[tuple[str, torch.dtype], bool] = {}


def compute_dtype(x: torch.Tensor) -> torch.dtype:
    """The dtype expert matmuls run in: autocast's where it is enabled for x's device, else x's own."""
    device = x.device.type
    return torch.get_autocast_dtype(device) if torch.is_autocast_enabled(device) else x.dtype


def cast(t: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """`t` in `dtype`, the very tensor when it already is (no op touches it, so decoding reads only chosen experts)."""
    return t if t.dtype == dtype else t.to(dtype)


def _probe(device: torch.device, dtype: torch.dtype) -> bool:
    key = (device.type, dtype)
    if key not in _SUPPORT:

        def attempt() -> None:
            try:
                a = torch.randn(6, 8, device=device, dtype=dtype, requires_grad=True)
                b = torch.randn(2, 8, 8, device=device, dtype=dtype, requires_grad=True)
                offs = torch.tensor([2, 6], device=device, dtype=torch.int32)
                F.grouped_mm(a, b, offs=offs).square().sum().backward()
                _SUPPORT[key] = True
            except Exception:  # any failure means "use the loop": unsupported device, dtype or build
                _SUPPORT[key] = False

        # On its own thread: autograd state (grad mode, autocast, activation-checkpointing hooks) is
        # thread-local, so the probe leaves no trace in a forward pass that happens to trigger it.
        thread = threading.Thread(target=attempt)
        thread.start()
        thread.join()
    return _SUPPORT[key]


def grouped_mm_available(x: torch.Tensor, weight: torch.Tensor) -> bool:
    """True when `F.grouped_mm` can serve `x @ weight[g].T` here (16-byte aligned rows, supported dtype)."""
    if not hasattr(F, "grouped_mm"):
        return False
    dtype = compute_dtype(x)
    if any(n * dtype.itemsize % 16 for n in weight.shape[-2:]):
        return False
    return _probe(x.device, dtype)


def use_grouped_mm(x: torch.Tensor, weight: torch.Tensor) -> bool:
    """Whether expert matmuls here take `grouped_mm`: off CPU where it is available (module docstring)."""
    return x.device.type != "cpu" and grouped_mm_available(x, weight)


def grouped_mlps(
    xs: torch.Tensor,
    counts: list[int],
    gate_up: torch.Tensor,
    down: torch.Tensor,
    gate_up_bias: torch.Tensor | None,
    down_bias: torch.Tensor | None,
    act_fn: nn.Module,
) -> torch.Tensor:
    """Gated MLPs, one `grouped_mm` per projection: rows `(M, H)` sorted by expert → outputs `(M, H)`.

    `counts[e]` rows belong to expert e; `gate_up` `(E, 2I, H)` rows [gate; up], `down` `(E, H, I)`, biases
    `(E, 2I)` / `(E, H)` or None. The result is in `compute_dtype(xs)`.
    """
    dtype = compute_dtype(xs)
    gate_up, down = cast(gate_up, dtype), cast(down, dtype)  # under autocast this copies every expert
    xs = xs.to(dtype)
    sizes = torch.tensor(counts, device=xs.device)  # (E,)
    offsets = sizes.cumsum(0).to(torch.int32)  # (E,)
    h = F.grouped_mm(xs, gate_up.transpose(-2, -1), offs=offsets)  # (M, 2I)
    if gate_up_bias is not None:
        h = h + cast(gate_up_bias, dtype).repeat_interleave(sizes, dim=0, output_size=xs.shape[0])
    gate, up = h.chunk(2, dim=-1)  # (M, I) each
    y = F.grouped_mm(act_fn(gate) * up, down.transpose(-2, -1), offs=offsets)  # (M, H)
    if down_bias is not None:
        y = y + cast(down_bias, dtype).repeat_interleave(sizes, dim=0, output_size=xs.shape[0])
    return y
