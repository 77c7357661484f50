"""The expert gate's backward: ``dH = [dG | dU]`` [T, 2N] from the output gradient and the saved
pre-activations ``[g | u]``, zero on the rows of the padded tail (their output is a constant)."""
from __future__ import annotations

import triton
import triton.language as tl
from torch import Tensor

from ._elementwise import elementwise_plan, tile_2d


@triton.jit
def grouped_gate_grad_kernel(dout_ptr, pre_ptr, dh_ptr, offs_ptr, M, N, E,
                             stride_dm, stride_dn, stride_pm, stride_pn, stride_hm, stride_hn,
                             alpha, limit, ACT: tl.constexpr,
                             BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    rows, cols, mask = tile_2d(M, N, BLOCK_M, BLOCK_N)
    routed = tl.load(offs_ptr + E - 1).to(tl.int64)
    live = rows < routed
    g = tl.load(pre_ptr + rows * stride_pm + cols * stride_pn, mask=mask, other=0.0).to(tl.float32)
    u = tl.load(pre_ptr + rows * stride_pm + (cols + N) * stride_pn, mask=mask, other=0.0).to(tl.float32)
    d = tl.load(dout_ptr + rows * stride_dm + cols * stride_dn, mask=mask & live, other=0.0).to(tl.float32)
    if ACT == 0:
        sig = tl.sigmoid(g)
        d_g = d * u * sig * (1.0 + g * (1.0 - sig))
        d_u = d * g * sig
    else:
        gc = tl.minimum(g, limit)
        uc = tl.minimum(tl.maximum(u, -limit), limit)
        sig = tl.sigmoid(alpha * gc)
        d_g = tl.where(g <= limit, d * (uc + 1.0) * sig * (1.0 + alpha * gc * (1.0 - sig)), 0.0)
        d_u = tl.where((u >= -limit) & (u <= limit), d * gc * sig, 0.0)
    dtype = dh_ptr.dtype.element_ty
    tl.store(dh_ptr + rows * stride_hm + cols * stride_hn, d_g.to(dtype), mask=mask)
    tl.store(dh_ptr + rows * stride_hm + (cols + N) * stride_hn, d_u.to(dtype), mask=mask)


def grouped_gate_grad(dout: Tensor, preact: Tensor, offsets: Tensor, dh: Tensor, activation: int,
                      alpha: float, limit: float) -> None:
    """Write ``dH`` [T, 2N] (``[dG | dU]``); ``activation`` 0: silu, 1: gpt-oss's clamped gate."""
    m, n = dout.shape
    if m == 0 or n == 0:
        return
    plan = elementwise_plan(grouped_gate_grad_kernel, m, n,
                            (offsets.shape[0], *dout.stride(), *preact.stride(), *dh.stride(),
                             float(alpha), float(limit)), dout.device.index)
    plan.keywords = dict(plan.keywords, ACT=activation)
    plan(dout, preact, dh, offsets)
