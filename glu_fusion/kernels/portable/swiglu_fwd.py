"""SwiGLU forward: both projections over one K loop, the gate applied in the epilogue.

``out[m, n] = silu(g) * u`` with ``g = x[m]·Wg[n] + bg[n]`` and ``u = x[m]·Wu[n] + bu[n]``,
accumulated in fp32, rounded to the input dtype (as eager rounds each linear), and gated in
fp32.  The weights are read through their strides, so packed ``[2N, K]`` weights (concatenated
or interleaved halves) are read in place.  Optionally writes the pre-activations ``[g | u]``.
"""
from __future__ import annotations

from typing import Optional

import triton
import triton.language as tl
from torch import Tensor

from .._launch import LaunchPlan, interpreting, precision, tile_config


@triton.jit
def _swizzle(pid, num_m, num_n, GROUP_M: tl.constexpr):
    """Grouped launch order: consecutive programs share weight tiles in L2."""
    width = GROUP_M * num_n
    group = pid // width
    first_m = group * GROUP_M
    size_m = tl.minimum(num_m - first_m, GROUP_M)
    pid_m = first_m + (pid % width) % size_m
    pid_n = (pid % width) // size_m
    return pid_m, pid_n


@triton.jit
def swiglu_fwd_kernel(
    x_ptr, wg_ptr, wu_ptr, bg_ptr, bu_ptr, out_ptr, pre_ptr,
    M, N, K,
    stride_xm, stride_xk, stride_wgn, stride_wgk, stride_wun, stride_wuk,
    stride_bg, stride_bu, stride_om, stride_on, stride_pm, stride_pn,
    HAS_BIAS: tl.constexpr, SAVE_PREACT: tl.constexpr, PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, GROUP_M: tl.constexpr,
):
    pid_m, pid_n = _swizzle(tl.program_id(0), tl.cdiv(M, BLOCK_M), tl.cdiv(N, BLOCK_N), GROUP_M)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_k = tl.arange(0, BLOCK_K)
    mask_m = offs_m < M
    mask_n = offs_n < N
    rows = offs_m.to(tl.int64)
    cols = offs_n.to(tl.int64)

    x_ptrs = x_ptr + rows[:, None] * stride_xm + offs_k[None, :] * stride_xk
    wg_ptrs = wg_ptr + cols[None, :] * stride_wgn + offs_k[:, None] * stride_wgk
    wu_ptrs = wu_ptr + cols[None, :] * stride_wun + offs_k[:, None] * stride_wuk
    acc_g = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    acc_u = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):
        mask_k = offs_k < K - k0
        a = tl.load(x_ptrs, mask=mask_m[:, None] & mask_k[None, :], other=0.0)
        w_mask = mask_k[:, None] & mask_n[None, :]
        b_g = tl.load(wg_ptrs, mask=w_mask, other=0.0)
        b_u = tl.load(wu_ptrs, mask=w_mask, other=0.0)
        acc_g = tl.dot(a, b_g, acc_g, input_precision=PRECISION)
        acc_u = tl.dot(a, b_u, acc_u, input_precision=PRECISION)
        x_ptrs += BLOCK_K * stride_xk
        wg_ptrs += BLOCK_K * stride_wgk
        wu_ptrs += BLOCK_K * stride_wuk

    if HAS_BIAS:
        acc_g += tl.load(bg_ptr + cols * stride_bg, mask=mask_n, other=0.0).to(tl.float32)[None, :]
        acc_u += tl.load(bu_ptr + cols * stride_bu, mask=mask_n, other=0.0).to(tl.float32)[None, :]
    dtype = out_ptr.dtype.element_ty
    g = acc_g.to(dtype)
    u = acc_u.to(dtype)
    gf = g.to(tl.float32)
    out = gf * tl.sigmoid(gf) * u.to(tl.float32)

    mask = mask_m[:, None] & mask_n[None, :]
    tl.store(out_ptr + rows[:, None] * stride_om + cols[None, :] * stride_on, out.to(dtype), mask=mask)
    if SAVE_PREACT:
        pre = pre_ptr + rows[:, None] * stride_pm + cols[None, :] * stride_pn
        tl.store(pre, g, mask=mask)
        tl.store(pre + N * stride_pn, u, mask=mask)


# Meta-parameters by (4-byte operands, M <= 64); see _launch.tile_config.
_GPU_META = {
    (False, False): dict(BLOCK_M=128, BLOCK_N=128, BLOCK_K=64, GROUP_M=8, num_stages=4, num_warps=8),
    (False, True): dict(BLOCK_M=16, BLOCK_N=64, BLOCK_K=128, GROUP_M=1, num_stages=4, num_warps=4),
    (True, False): dict(BLOCK_M=64, BLOCK_N=64, BLOCK_K=32, GROUP_M=8, num_stages=3, num_warps=4),
    (True, True): dict(BLOCK_M=16, BLOCK_N=64, BLOCK_K=64, GROUP_M=1, num_stages=3, num_warps=4),
}
_INTERPRETER_META = {"BLOCK_M": 16, "BLOCK_N": 16, "BLOCK_K": 16, "GROUP_M": 4}


def forward_operands(x: Tensor, w_gate: Tensor, w_up: Tensor, b_gate: Optional[Tensor],
                     b_up: Optional[Tensor], out: Tensor, preact: Optional[Tensor]) -> tuple:
    """The kernel's tensor arguments, with ``out`` standing in for absent ones."""
    return (x, w_gate, w_up, b_gate if b_gate is not None else out, b_up if b_up is not None else out,
            out, preact if preact is not None else out)


def forward_plan(x: Tensor, w_gate: Tensor, w_up: Tensor, b_gate: Optional[Tensor],
                 b_up: Optional[Tensor], out: Tensor, preact: Optional[Tensor],
                 allow_tf32: bool) -> LaunchPlan:
    """The launch for operands shaped, strided and typed like these (M and N positive);
    call it with ``forward_operands(...)``."""
    m, k = x.shape
    n = w_gate.shape[0]
    x, w_gate, w_up, bg, bu, out, pre = forward_operands(x, w_gate, w_up, b_gate, b_up, out, preact)
    scalars = (m, n, k, x.stride(0), x.stride(1), w_gate.stride(0), w_gate.stride(1),
               w_up.stride(0), w_up.stride(1), bg.stride(0), bu.stride(0),
               out.stride(0), out.stride(1), pre.stride(0), pre.stride(1))
    meta = _INTERPRETER_META if interpreting() else tile_config(_GPU_META, x.dtype, m)
    grid = (triton.cdiv(m, meta["BLOCK_M"]) * triton.cdiv(n, meta["BLOCK_N"]),)
    keywords = dict(HAS_BIAS=b_gate is not None, SAVE_PREACT=preact is not None,
                    PRECISION=precision(allow_tf32), **meta)
    return LaunchPlan(swiglu_fwd_kernel, grid, scalars, keywords, x.device.index)


def swiglu_forward(x: Tensor, w_gate: Tensor, w_up: Tensor, b_gate: Optional[Tensor],
                   b_up: Optional[Tensor], out: Tensor, preact: Optional[Tensor],
                   allow_tf32: bool) -> None:
    """Write ``silu(x·Wgᵀ+bg)·(x·Wuᵀ+bu)`` into ``out`` [M, N] and, if given, ``[g | u]`` into
    ``preact`` [M, 2N].  ``x`` is [M, K]; weights [N, K] with any strides."""
    m, k = x.shape
    n = w_gate.shape[0]
    if m == 0 or n == 0:
        return
    # K = 0 runs the kernel too: its K loop is empty, so the projections are the biases alone.
    plan = forward_plan(x, w_gate, w_up, b_gate, b_up, out, preact, allow_tf32)
    plan(*forward_operands(x, w_gate, w_up, b_gate, b_up, out, preact))
