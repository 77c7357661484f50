"""What the SwiGLU elementwise kernels (the gate, the gate's backward) share: their 2-D tile of
an [M, N] problem and its launch plan."""
from __future__ import annotations

import triton
import triton.language as tl

from .._launch import LaunchPlan, interpreting


@triton.jit
def tile_2d(M, N, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    """This program's rows [BLOCK_M, 1] and columns [1, BLOCK_N] (int64) and their bounds mask."""
    offs_m = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    mask = (offs_m < M)[:, None] & (offs_n < N)[None, :]
    return offs_m.to(tl.int64)[:, None], offs_n.to(tl.int64)[None, :], mask


def elementwise_plan(kernel, m: int, n: int, scalars: tuple, device: int, **constexprs) -> LaunchPlan:
    """The launch of an elementwise kernel over [M, N] (M, N positive) whose runtime scalars
    are ``(M, N, *scalars)``: one program per 32×128 tile (16×16 in the interpreter); further
    constexprs by keyword."""
    block_m, block_n = (16, 16) if interpreting() else (32, 128)
    grid = (triton.cdiv(m, block_m), triton.cdiv(n, block_n))
    return LaunchPlan(kernel, grid, (m, n, *scalars), dict(BLOCK_M=block_m, BLOCK_N=block_n, **constexprs),
                      device)
