"""Grouped linear: one matmul per expert over contiguous row slices, in one kernel where possible.

`torch.nn.functional.grouped_mm` serves all experts in one call (CPU fp32/bf16/fp16, CUDA bf16 on
SM80+, forward and backward). Where the device/dtype/shape does not support it (other accelerators such
as Ascend NPUs, odd strides) we fall back to a loop over the non-empty slices. Support is probed once
per (device type, dtype) with a tiny forward+backward, so no CUDA-only call runs without a fallback.
"""

from __future__ import annotations

import threading

import torch
import torch.nn.functional as F

_SUPPORT: dict[tuple[str, torch.dtype], bool] = {}


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

        # On its own thread: autograd state (grad mode, activation-checkpointing hooks) is thread-local, so
        # the probe leaves no trace in a forward pass that happens to trigger it.
        thread = threading.Thread(target=attempt)
        thread.start()
        thread.join()
    return _SUPPORT[key]


def grouped_mm_available(x: torch.Tensor, weight: torch.Tensor) -> bool:
    """True when `F.grouped_mm` can serve `x @ weight[g].T` here (16-byte aligned rows, supported dtype)."""
    if not hasattr(F, "grouped_mm") or x.dtype != weight.dtype:
        return False
    row_bytes = (weight.shape[-1] * weight.element_size(), weight.shape[-2] * weight.element_size())
    if any(n % 16 for n in row_bytes):
        return False
    return _probe(x.device, x.dtype)


def grouped_linear(x: torch.Tensor, weight: torch.Tensor, counts: list[int], offsets: torch.Tensor | None) -> torch.Tensor:
    """Rows of `x` sorted by group, times each group's weight.

    Args:
        x: `(M, K)` rows, the first `counts[0]` for group 0, the next `counts[1]` for group 1, ...
        weight: `(G, N, K)` one `nn.Linear`-layout matrix per group.
        counts: rows per group (host ints, sum = M).
        offsets: int32 cumulative row ends `(G,)` on x's device, or None to force the loop.

    Returns:
        `(M, N)`.
    """
    if offsets is not None and grouped_mm_available(x, weight):
        return F.grouped_mm(x, weight.transpose(-2, -1), offs=offsets)  # (M, N)
    outs, start = [], 0
    for g, n in enumerate(counts):
        if n:
            outs.append(F.linear(x[start : start + n], weight[g]))  # (n, N)
        start += n
    if not outs:
        return x.new_zeros(0, weight.shape[-2])
    return torch.cat(outs)
