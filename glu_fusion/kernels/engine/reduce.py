"""The second half of a split reduction: the fp32 partials of every split summed, in split
order (so the result is the same on every run), and rounded once into the output.

A plain Triton kernel (no Gluon): it runs wherever Triton does, Triton's CPU interpreter
included, so its indexing is tested without a GPU.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl
from torch import Tensor

_BLOCK_M = 32
_BLOCK_N = 128


@triton.jit
def _sum_splits_kernel(stack_ptr, out_ptr, M, N, stacked_rows, splits, out_stride_m, out_stride_n,
                       BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    rows = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    cols = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    mask = (rows[:, None] < M) & (cols[None, :] < N)
    acc = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
    for split in range(splits):
        src = (split * stacked_rows + rows).to(tl.int64)[:, None] * N + cols[None, :]
        acc += tl.load(stack_ptr + src, mask=mask, other=0.0)
    dst = rows.to(tl.int64)[:, None] * out_stride_m + cols.to(tl.int64)[None, :] * out_stride_n
    tl.store(out_ptr + dst, acc.to(out_ptr.dtype.element_ty), mask=mask)


def sum_splits(stack: Tensor, out: Tensor, splits: int, stacked_rows: int) -> None:
    """``out[M, N] = Σ_s stack[s·stacked_rows : s·stacked_rows + M]`` (``stack`` contiguous
    fp32, ``splits·stacked_rows`` rows of N)."""
    m, n = out.shape
    if stack.dtype != torch.float32 or not stack.is_contiguous() or stack.shape != (splits * stacked_rows, n):
        raise ValueError(f"glu_fusion engine: split partials must be a contiguous fp32 [{splits}·{stacked_rows}, {n}]"
                         f" stack; got {stack.dtype} {tuple(stack.shape)}")
    if m == 0 or n == 0:
        return
    grid = (triton.cdiv(m, _BLOCK_M), triton.cdiv(n, _BLOCK_N))
    from .._launch import interpreter_quiet
    with interpreter_quiet():
        _sum_splits_kernel[grid](stack, out, m, n, stacked_rows, splits, out.stride(0), out.stride(1),
                                 BLOCK_M=_BLOCK_M, BLOCK_N=_BLOCK_N)
