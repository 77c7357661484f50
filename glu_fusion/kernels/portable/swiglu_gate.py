"""The SwiGLU gate alone: ``out = silu(g) * u`` from pre-activations computed elsewhere.

Used where two cuBLAS GEMMs write the pre-activations that training saves anyway, and the gate
runs as one elementwise pass (``ops.swiglu``'s ``cublas`` forward).  fp32 math, one rounding to
the output dtype, as the fused kernel's epilogue."""
from __future__ import annotations

import triton
import triton.language as tl
from torch import Tensor

from ._elementwise import elementwise_plan, tile_2d
from .._launch import LaunchPlan


@triton.jit
def swiglu_gate_kernel(
    g_ptr, u_ptr, out_ptr, M, N,
    stride_gm, stride_gn, stride_um, stride_un, stride_om, stride_on,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
):
    rows, cols, mask = tile_2d(M, N, BLOCK_M, BLOCK_N)
    g = tl.load(g_ptr + rows * stride_gm + cols * stride_gn, mask=mask, other=0.0).to(tl.float32)
    u = tl.load(u_ptr + rows * stride_um + cols * stride_un, mask=mask, other=0.0).to(tl.float32)
    out = g * tl.sigmoid(g) * u
    tl.store(out_ptr + rows * stride_om + cols * stride_on, out.to(out_ptr.dtype.element_ty), mask=mask)


def gate_plan(g: Tensor, u: Tensor, out: Tensor) -> LaunchPlan:
    """The gate launch for [M, N] operands (M, N positive) strided and typed like these;
    call it with ``(g, u, out)``."""
    m, n = g.shape
    strides = (g.stride(0), g.stride(1), u.stride(0), u.stride(1), out.stride(0), out.stride(1))
    return elementwise_plan(swiglu_gate_kernel, m, n, strides, g.device.index)


def swiglu_gate(g: Tensor, u: Tensor, out: Tensor) -> None:
    """Write ``silu(g) * u`` into ``out``; all [M, N], any strides."""
    if g.shape[0] == 0 or g.shape[1] == 0:
        return
    gate_plan(g, u, out)(g, u, out)
