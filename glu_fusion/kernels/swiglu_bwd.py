"""SwiGLU backward kernels: input grad (dX) and 3D-tiled weight grad (dW).

Both compute the gate's backward inside their operand loads from ``dout`` and the saved
pre-activations ``g``, ``u`` (fp32 math, rounded to the input dtype as the reference does)::

    dG = dout · u · σ(g) · (1 + g·(1 − σ(g)))        dU = dout · g · σ(g)
    dX = dG·Wg + dU·Wu                              dWg = dGᵀ·x,  dWu = dUᵀ·x,  db = Σₘ dG, Σₘ dU
"""
from __future__ import annotations

from typing import Optional

import torch
import triton
import triton.language as tl
from torch import Tensor

from ._elementwise import elementwise_plan, tile_2d
from ._launch import LaunchPlan, interpreter_quiet, interpreting, multiprocessors, precision, tile_config


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
def swiglu_dx_kernel(
    d_ptr, g_ptr, u_ptr, wg_ptr, wu_ptr, dx_ptr,
    M, N, K,
    stride_dm, stride_dn, stride_gm, stride_gn, stride_um, stride_un,
    stride_wgn, stride_wgk, stride_wun, stride_wuk, stride_xm, stride_xk,
    PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, GROUP_M: tl.constexpr,
):
    """One program: a [BLOCK_M, BLOCK_K] tile of dX, reducing over N."""
    pid = tl.program_id(0)
    num_m = tl.cdiv(M, BLOCK_M)
    num_k = tl.cdiv(K, BLOCK_K)
    width = GROUP_M * num_k
    first_m = (pid // width) * GROUP_M
    size_m = tl.minimum(num_m - first_m, GROUP_M)
    pid_m = first_m + (pid % width) % size_m
    pid_k = (pid % width) // size_m

    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_k = pid_k * BLOCK_K + tl.arange(0, BLOCK_K)
    offs_n = tl.arange(0, BLOCK_N)
    mask_m = offs_m < M
    mask_k = offs_k < K
    rows = offs_m.to(tl.int64)
    cols = offs_k.to(tl.int64)

    d_ptrs = d_ptr + rows[:, None] * stride_dm + offs_n[None, :] * stride_dn
    g_ptrs = g_ptr + rows[:, None] * stride_gm + offs_n[None, :] * stride_gn
    u_ptrs = u_ptr + rows[:, None] * stride_um + offs_n[None, :] * stride_un
    wg_ptrs = wg_ptr + offs_n[:, None].to(tl.int64) * stride_wgn + cols[None, :] * stride_wgk
    wu_ptrs = wu_ptr + offs_n[:, None].to(tl.int64) * stride_wun + cols[None, :] * stride_wuk
    acc = tl.zeros((BLOCK_M, BLOCK_K), dtype=tl.float32)
    for n0 in range(0, N, BLOCK_N):
        mask_n = offs_n < N - n0
        d_g, d_u = _gate_grads(d_ptrs, g_ptrs, u_ptrs, mask_m[:, None] & mask_n[None, :])
        w_mask = mask_n[:, None] & mask_k[None, :]
        w_g = tl.load(wg_ptrs, mask=w_mask, other=0.0)
        w_u = tl.load(wu_ptrs, mask=w_mask, other=0.0)
        acc = tl.dot(d_g, w_g, acc, input_precision=PRECISION)
        acc = tl.dot(d_u, w_u, acc, input_precision=PRECISION)
        d_ptrs += BLOCK_N * stride_dn
        g_ptrs += BLOCK_N * stride_gn
        u_ptrs += BLOCK_N * stride_un
        wg_ptrs += BLOCK_N * stride_wgn
        wu_ptrs += BLOCK_N * stride_wun

    out = dx_ptr + rows[:, None] * stride_xm + cols[None, :] * stride_xk
    tl.store(out, acc.to(dx_ptr.dtype.element_ty), mask=mask_m[:, None] & mask_k[None, :])


@triton.jit
def swiglu_dw_kernel(
    d_ptr, g_ptr, u_ptr, x_ptr, dwg_ptr, dwu_ptr, dbg_ptr, dbu_ptr,
    M, N, K, ROWS_PER_SPLIT,
    stride_dm, stride_dn, stride_gm, stride_gn, stride_um, stride_un, stride_xm, stride_xk,
    stride_ws, stride_wgn, stride_wgk, stride_wun, stride_wuk,
    stride_bs, stride_bg, stride_bu,
    HAS_BIAS: tl.constexpr, PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
):
    """Grid (token splits, N tiles, K tiles): one program reduces its split's rows into a
    [BLOCK_N, BLOCK_K] tile of dWg and dWu.  With several splits the outputs are per-split fp32
    slices (``stride_ws``) summed afterwards, a deterministic two-stage reduction."""
    pid_s = tl.program_id(0)
    pid_n = tl.program_id(1)
    pid_k = tl.program_id(2)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_k = pid_k * BLOCK_K + tl.arange(0, BLOCK_K)
    offs_m = tl.arange(0, BLOCK_M)
    mask_n = offs_n < N
    mask_k = offs_k < K
    ncols = offs_n.to(tl.int64)
    kcols = offs_k.to(tl.int64)
    m_start = pid_s * ROWS_PER_SPLIT
    m_end = tl.minimum(M, m_start + ROWS_PER_SPLIT)
    rows = m_start + offs_m.to(tl.int64)

    d_ptrs = d_ptr + rows[:, None] * stride_dm + ncols[None, :] * stride_dn
    g_ptrs = g_ptr + rows[:, None] * stride_gm + ncols[None, :] * stride_gn
    u_ptrs = u_ptr + rows[:, None] * stride_um + ncols[None, :] * stride_un
    x_ptrs = x_ptr + rows[:, None] * stride_xm + kcols[None, :] * stride_xk
    acc_g = tl.zeros((BLOCK_N, BLOCK_K), dtype=tl.float32)
    acc_u = tl.zeros((BLOCK_N, BLOCK_K), dtype=tl.float32)
    sum_g = tl.zeros((BLOCK_N,), dtype=tl.float32)
    sum_u = tl.zeros((BLOCK_N,), dtype=tl.float32)
    for m0 in range(m_start, m_end, BLOCK_M):
        mask_m = offs_m < m_end - m0
        d_g, d_u = _gate_grads(d_ptrs, g_ptrs, u_ptrs, mask_m[:, None] & mask_n[None, :])
        a = tl.load(x_ptrs, mask=mask_m[:, None] & mask_k[None, :], other=0.0)
        acc_g = tl.dot(tl.trans(d_g), a, acc_g, input_precision=PRECISION)
        acc_u = tl.dot(tl.trans(d_u), a, acc_u, input_precision=PRECISION)
        if HAS_BIAS:
            sum_g += tl.sum(d_g.to(tl.float32), axis=0)
            sum_u += tl.sum(d_u.to(tl.float32), axis=0)
        d_ptrs += BLOCK_M * stride_dm
        g_ptrs += BLOCK_M * stride_gm
        u_ptrs += BLOCK_M * stride_um
        x_ptrs += BLOCK_M * stride_xm

    mask = mask_n[:, None] & mask_k[None, :]
    split = pid_s.to(tl.int64) * stride_ws
    out_g = dwg_ptr + split + ncols[:, None] * stride_wgn + kcols[None, :] * stride_wgk
    out_u = dwu_ptr + split + ncols[:, None] * stride_wun + kcols[None, :] * stride_wuk
    tl.store(out_g, acc_g.to(dwg_ptr.dtype.element_ty), mask=mask)
    tl.store(out_u, acc_u.to(dwu_ptr.dtype.element_ty), mask=mask)
    if HAS_BIAS:
        if pid_k == 0:
            bsplit = pid_s.to(tl.int64) * stride_bs
            tl.store(dbg_ptr + bsplit + ncols * stride_bg, sum_g.to(dbg_ptr.dtype.element_ty), mask=mask_n)
            tl.store(dbu_ptr + bsplit + ncols * stride_bu, sum_u.to(dbu_ptr.dtype.element_ty), mask=mask_n)


# --- launchers ----------------------------------------------------------------------------------

# Meta-parameters by (4-byte operands, M <= 64); see _launch.tile_config.
_GPU_DX = {
    (False, False): dict(BLOCK_M=128, BLOCK_N=64, BLOCK_K=128, GROUP_M=8, num_stages=2, num_warps=8),
    (False, True): dict(BLOCK_M=16, BLOCK_N=64, BLOCK_K=128, GROUP_M=1, num_stages=4, num_warps=4),
    (True, False): dict(BLOCK_M=64, BLOCK_N=32, BLOCK_K=64, GROUP_M=8, num_stages=3, num_warps=4),
    (True, True): dict(BLOCK_M=16, BLOCK_N=32, BLOCK_K=64, GROUP_M=1, num_stages=3, num_warps=4),
}
_GPU_DW = {
    (False, False): dict(BLOCK_M=64, BLOCK_N=128, BLOCK_K=128, num_stages=3, num_warps=8),
    (False, True): dict(BLOCK_M=16, BLOCK_N=128, BLOCK_K=128, num_stages=3, num_warps=8),
    (True, False): dict(BLOCK_M=32, BLOCK_N=64, BLOCK_K=64, num_stages=3, num_warps=4),
    (True, True): dict(BLOCK_M=16, BLOCK_N=64, BLOCK_K=64, num_stages=3, num_warps=4),
}
_INTERPRETER_DX = {"BLOCK_M": 16, "BLOCK_N": 16, "BLOCK_K": 16, "GROUP_M": 4}
_INTERPRETER_DW = {"BLOCK_M": 16, "BLOCK_N": 16, "BLOCK_K": 16}


def swiglu_input_grad(dout: Tensor, g: Tensor, u: Tensor, w_gate: Tensor, w_up: Tensor,
                      dx: Tensor, allow_tf32: bool) -> None:
    """Write ``dX = dG·Wg + dU·Wu`` into ``dx`` [M, K]; dout, g, u are [M, N], any strides."""
    m, n = dout.shape
    k = dx.shape[1]
    if m == 0 or k == 0:
        return
    if n == 0:
        dx.zero_()
        return
    args = (dout, g, u, w_gate, w_up, dx, m, n, k,
            dout.stride(0), dout.stride(1), g.stride(0), g.stride(1), u.stride(0), u.stride(1),
            w_gate.stride(0), w_gate.stride(1), w_up.stride(0), w_up.stride(1),
            dx.stride(0), dx.stride(1))

    meta = _INTERPRETER_DX if interpreting() else tile_config(_GPU_DX, dout.dtype, m)
    grid = (triton.cdiv(m, meta["BLOCK_M"]) * triton.cdiv(k, meta["BLOCK_K"]),)
    with interpreter_quiet():
        swiglu_dx_kernel[grid](*args, PRECISION=precision(allow_tf32), **meta)


def _num_splits(m: int, tiles: int, block_m: int) -> int:
    """Token splits for the dW grid: enough programs to fill the device when the weight has few
    tiles, never more splits than row blocks."""
    if interpreting():
        return 2 if m > block_m else 1   # exercise the two-stage reduction in CPU tests
    sms = multiprocessors(torch.cuda.current_device())
    want = triton.cdiv(2 * sms, tiles)
    return max(1, min(want, triton.cdiv(m, 4 * block_m), 64))


def swiglu_weight_grad(dout: Tensor, g: Tensor, u: Tensor, x: Tensor, dw_gate: Tensor,
                       dw_up: Tensor, db_gate: Optional[Tensor], db_up: Optional[Tensor],
                       allow_tf32: bool) -> None:
    """Write dWg, dWu [N, K] (any strides, e.g. views of a packed gradient) and the bias grads.

    The split reduction is always two-stage through an fp32 workspace, so it is deterministic."""
    m, n = dout.shape
    k = x.shape[1]
    has_bias = db_gate is not None
    if n == 0 or k == 0:
        return
    if m == 0:
        dw_gate.zero_(), dw_up.zero_()
        if has_bias:
            db_gate.zero_(), db_up.zero_()
        return
    meta = _INTERPRETER_DW if interpreting() else tile_config(_GPU_DW, dout.dtype, m)
    tiles = triton.cdiv(n, meta["BLOCK_N"]) * triton.cdiv(k, meta["BLOCK_K"])
    splits = _num_splits(m, tiles, meta["BLOCK_M"])
    rows_per_split = triton.cdiv(triton.cdiv(m, splits), meta["BLOCK_M"]) * meta["BLOCK_M"]
    splits = triton.cdiv(m, rows_per_split)
    if splits == 1:
        tg, tu, split_stride = dw_gate, dw_up, 0
        bg, bu = (db_gate, db_up) if has_bias else (dw_gate, dw_up)
        bias_split_stride = 0
    else:
        work = torch.empty((splits, 2, n, k), device=x.device, dtype=torch.float32)
        tg, tu, split_stride = work[:, 0], work[:, 1], work.stride(0)
        bwork = torch.empty((splits, 2, n), device=x.device, dtype=torch.float32)
        bg, bu, bias_split_stride = bwork[:, 0], bwork[:, 1], bwork.stride(0)
    wg_s = tg.stride()[-2:]
    wu_s = tu.stride()[-2:]
    grid = (splits, triton.cdiv(n, meta["BLOCK_N"]), triton.cdiv(k, meta["BLOCK_K"]))
    with interpreter_quiet():
        swiglu_dw_kernel[grid](
            dout, g, u, x, tg, tu, bg, bu, m, n, k, rows_per_split,
            dout.stride(0), dout.stride(1), g.stride(0), g.stride(1), u.stride(0), u.stride(1),
            x.stride(0), x.stride(1), split_stride, wg_s[0], wg_s[1], wu_s[0], wu_s[1],
            bias_split_stride, bg.stride(-1), bu.stride(-1),
            HAS_BIAS=has_bias, PRECISION=precision(allow_tf32), **meta)
    if splits > 1:
        dw_gate.copy_(tg.sum(0))
        dw_up.copy_(tu.sum(0))
        if has_bias:
            db_gate.copy_(bg.sum(0))
            db_up.copy_(bu.sum(0))


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
