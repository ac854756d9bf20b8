"""Grouped matmuls for the experts, and the dtype every expert matmul runs in.

A grouped matmul multiplies consecutive row blocks of one matrix by one weight each (rows sorted by expert,
block sizes given as cumulative int32 offsets on the device), so all experts of a layer take one call per
projection and no count crosses to the host. Two kernels:

- "torch": `F.grouped_mm`. Fused (CUTLASS) on CUDA compute capability ≥ 9.0; below that PyTorch copies the
  offsets to the host and runs one matmul per group, i.e. it synchronises.
- "triton": DeepSpeed's Triton grouped GEMM (`deepspeed.ops.triton_ops.group_gemm_triton`, forward and
  backward), one fused kernel with no host synchronisation on Ampere (sm 8.x). Needs deepspeed and Triton
  (CUDA builds of torch ship Triton); imported only when used.

Expert matmuls run in `compute_dtype(x)`: autocast's dtype where autocast is on for x's device (float32
master weights are cast, as `F.linear` does under autocast), else x's dtype.
"""

from __future__ import annotations

import functools

import torch
import torch.nn.functional as F


def compute_dtype(x: torch.Tensor) -> torch.dtype:
    """The dtype expert matmuls run in: autocast's where it is enabled for x's device, else x's own."""
    device = x.device.type
    return torch.get_autocast_dtype(device) if torch.is_autocast_enabled(device) else x.dtype


def cast(t: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """`t` in `dtype`, the very tensor when it already is (no op touches it, so decoding reads only chosen experts)."""
    return t if t.dtype == dtype else t.to(dtype)


def aligned(x: torch.Tensor, *weights: torch.Tensor) -> bool:
    """Whether grouped kernels can take these weights' rows in x's compute dtype (16-byte aligned strides)."""
    size = compute_dtype(x).itemsize
    return all(n * size % 16 == 0 for w in weights for n in w.shape[-2:])


@functools.cache
def triton_kernel_available() -> bool:
    """Whether DeepSpeed's Triton grouped GEMM can run here (deepspeed installed, Triton with an active GPU)."""
    try:
        from deepspeed.ops.triton_ops._triton import is_triton_available
    except Exception:  # deepspeed missing or failing to import: the kernel is not available
        return False
    return bool(is_triton_available())


def grouped_matmul(kernel: str, rows: torch.Tensor, weight: torch.Tensor, offsets: torch.Tensor) -> torch.Tensor:
    """`rows[group e] @ weight[e].T` for every group: rows `(M, K)` sorted by group, weight `(E, N, K)` in the
    `nn.Linear` layout, offsets `(E,)` int32 cumulative ends → `(M, N)`."""
    if kernel == "triton":
        from deepspeed.ops.triton_ops.group_gemm_triton import group_gemm_triton

        return group_gemm_triton(rows, weight.contiguous(), offsets, trans_b=True)
    if rows.dtype != torch.bfloat16 and torch.compiler.is_compiling():
        return _eager_grouped_mm(rows, weight.transpose(-2, -1), offs=offsets)
    return F.grouped_mm(rows, weight.transpose(-2, -1), offs=offsets)


# torch.compile traces `grouped_mm` in bfloat16 only (its meta function rejects other dtypes): in any other dtype
# it runs eagerly, outside the compiled graph (one graph break per call; docs/benchmarks.md, torch.compile).
_eager_grouped_mm = torch.compiler.disable(F.grouped_mm)
