"""The SwiGLU gate's backward: an elementwise kernel from ``dout`` and the saved pre-activations
``g``, ``u`` (fp32 math, rounded to the input dtype as the reference does)::

    dG = dout · u · σ(g) · (1 + g·(1 − σ(g)))        dU = dout · g · σ(g)

The backward's GEMMs (``dX = dH·W``, ``dW = dHᵀ·x``) run outside it, on ``dH = [dG | dU]``.
"""
from __future__ import annotations

from typing import Optional

import triton
import triton.language as tl
from torch import Tensor

from ._elementwise import elementwise_plan, tile_2d
from .._launch import LaunchPlan


@triton.jit
def _gate_grads(d_ptrs, g_ptrs, u_ptrs, mask):
    """Load one [rows, N-block] tile of dout, g, u and return (dG, dU) in the input dtype."""
    d = tl.load(d_ptrs, mask=mask, other=0.0)
    dtype = d.dtype
    df = d.to(tl.float32)
    gf = tl.load(g_ptrs, mask=mask, other=0.0).to(tl.float32)
    uf = tl.load(u_ptrs, mask=mask, other=0.0).to(tl.float32)
    sig = tl.sigmoid(gf)
    d_g = df * uf * sig * (1.0 + gf * (1.0 - sig))
    d_u = df * gf * sig
    return d_g.to(dtype), d_u.to(dtype)


@triton.jit
def swiglu_gate_grad_kernel(
    d_ptr, g_ptr, u_ptr, dg_ptr, du_ptr, h_ptr, M, N,
    stride_dm, stride_dn, stride_gm, stride_gn, stride_um, stride_un,
    stride_dgm, stride_dgn, stride_dum, stride_dun, stride_hm, stride_hn,
    WRITE_H: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
):
    """Elementwise: write dG and dU (through their strides, e.g. into a packed dH), and with
    ``WRITE_H`` also ``h = silu(g)·u`` (written first: dG/dU may overwrite g and u)."""
    rows, cols, mask = tile_2d(M, N, BLOCK_M, BLOCK_N)
    g_ptrs = g_ptr + rows * stride_gm + cols * stride_gn
    u_ptrs = u_ptr + rows * stride_um + cols * stride_un
    if WRITE_H:
        gf = tl.load(g_ptrs, mask=mask, other=0.0).to(tl.float32)
        uf = tl.load(u_ptrs, mask=mask, other=0.0).to(tl.float32)
        h = gf * tl.sigmoid(gf) * uf
        tl.store(h_ptr + rows * stride_hm + cols * stride_hn, h.to(h_ptr.dtype.element_ty), mask=mask)
    d_g, d_u = _gate_grads(d_ptr + rows * stride_dm + cols * stride_dn, g_ptrs, u_ptrs, mask)
    tl.store(dg_ptr + rows * stride_dgm + cols * stride_dgn, d_g, mask=mask)
    tl.store(du_ptr + rows * stride_dum + cols * stride_dun, d_u, mask=mask)


def gate_grad_plan(dout: Tensor, g: Tensor, u: Tensor, d_g: Tensor, d_u: Tensor,
                   h: Optional[Tensor] = None) -> LaunchPlan:
    """The gate-grad launch for [M, N] operands (M, N positive) strided and typed like these;
    call it with ``(dout, g, u, d_g, d_u, h if given else d_g)``."""
    m, n = dout.shape
    h_or = h if h is not None else d_g
    strides = (dout.stride(0), dout.stride(1), g.stride(0), g.stride(1), u.stride(0), u.stride(1),
               d_g.stride(0), d_g.stride(1), d_u.stride(0), d_u.stride(1), h_or.stride(0), h_or.stride(1))
    return elementwise_plan(swiglu_gate_grad_kernel, m, n, strides, dout.device.index,
                            WRITE_H=h is not None)


def swiglu_gate_grad(dout: Tensor, g: Tensor, u: Tensor, d_g: Tensor, d_u: Tensor,
                     h: Optional[Tensor] = None) -> None:
    """Write the gate's backward ``dG``, ``dU`` [M, N] (any strides) from dout, g, u, and
    ``h = silu(g)·u`` when given (``d_g``/``d_u`` may be ``g``/``u``)."""
    m, n = dout.shape
    if m == 0 or n == 0:
        return
    gate_grad_plan(dout, g, u, d_g, d_u, h)(dout, g, u, d_g, d_u, h if h is not None else d_g)
