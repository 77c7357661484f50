"""RMSNorm kernels with the residual add fused, forward and backward.

Rows are the last dimension D of ``x`` (and ``residual``), addressed as ``row * stride`` with a
unit column stride.  A program owns ``BLOCK_M`` rows as a ``[BLOCK_M, BLOCK_N]`` tile
(``BLOCK_N = next_pow2(D)``, masked): many rows per program for prefill-sized calls, one row per
program with one or two warps for decode-sized ones (the caller picks, by row count).

Forward, fp32 math with optional roundings to the input dtype ``T``::

    h = x + residual     rounded to T and stored (the add eager code does in T)
    rstd = 1/sqrt(mean(h²) + eps)             (saved, fp32, one per row)
    n = h·rstd           [rounded to T if ROUND_NORMED]
    y = n·(w + offset)   [w + offset rounded to w's dtype if ROUND_W_EFF; y rounded if ROUND_WEIGHTED]

Backward recomputes ``n`` from the stored ``h`` and ``rstd`` and treats roundings as identity::

    dn = dy·(w + offset);   dh_total = (dn - n·mean(dn·n))·rstd + dh

``dh_total`` is both dx and dresidual.  The weight gradient ``Σ_rows dy·n`` is reduced
deterministically: each program accumulates its rows in fp32 and writes one row of an fp32
workspace ``[P, D]`` that the caller sums (no atomics).

Reductions use ``tl.reduce`` with a local combine function, so that the kernels also run in the
CPU interpreter when Triton was imported before ``TRITON_INTERPRET=1`` was set.
"""
from __future__ import annotations

from typing import Optional

import torch
import triton
import triton.language as tl
from torch import Tensor

from .._launch import LaunchPlan, interpreting
from .rms_norm_gated import (BWD_TILE_ELEMENTS, BWD_TILE_ELEMENTS_BY_WIDTH, FWD_TILE_ELEMENTS, _keywords,
                             _merged_stride, _programs, _tile)

#: Largest D the kernels take in one tile; wider rows run the reference.
MAX_D = 32768


@triton.jit
def _add(a, b):
    return a + b


@triton.jit
def rms_norm_fwd_kernel(
    x_ptr, r_ptr, w_ptr, y_ptr, h_ptr, rstd_ptr,
    M, N, sx, sr, stride_w, eps, w_offset,
    HAS_RES: tl.constexpr, HAS_W: tl.constexpr, ROUND_NORMED: tl.constexpr,
    ROUND_WEIGHTED: tl.constexpr, ROUND_W_EFF: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
):
    """y and h are contiguous ``[M, N]``; rstd is ``[M]`` fp32."""
    rows = (tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)).to(tl.int64)
    cols = tl.arange(0, BLOCK_N)
    mask_m = rows < M
    mask_n = cols < N
    mask = mask_m[:, None] & mask_n[None, :]
    dtype = y_ptr.dtype.element_ty
    h = tl.load(x_ptr + rows[:, None] * sx + cols[None, :], mask=mask, other=0.0).to(tl.float32)
    if HAS_RES:
        r = tl.load(r_ptr + rows[:, None] * sr + cols[None, :], mask=mask, other=0.0).to(tl.float32)
        h_low = (h + r).to(dtype)
        tl.store(h_ptr + rows[:, None] * N + cols[None, :], h_low, mask=mask)
        h = h_low.to(tl.float32)
    rstd = 1.0 / tl.sqrt(tl.reduce(h * h, 1, _add) / N + eps)
    n = h * rstd[:, None]
    if ROUND_NORMED:
        n = n.to(dtype).to(tl.float32)
    if HAS_W:
        w = tl.load(w_ptr + cols * stride_w, mask=mask_n, other=0.0)
        w_eff = w.to(tl.float32) + w_offset
        if ROUND_W_EFF:
            w_eff = w_eff.to(w.dtype).to(tl.float32)
        n = n * w_eff[None, :]
    if ROUND_WEIGHTED:
        n = n.to(dtype).to(tl.float32)
    tl.store(y_ptr + rows[:, None] * N + cols[None, :], n.to(dtype), mask=mask)
    tl.store(rstd_ptr + rows, rstd, mask=mask_m)


@triton.jit
def rms_norm_bwd_kernel(
    dy_ptr, dh_ptr, h_ptr, w_ptr, rstd_ptr, dx_ptr, dw_ptr,
    M, N, s_dy, s_dh, s_h, stride_w, w_offset,
    HAS_DH: tl.constexpr, HAS_W: tl.constexpr, NEED_W: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
):
    """Program ``p`` walks row blocks ``p, p + P, ...``; dx is contiguous ``[M, N]``;
    ``dw_ptr`` is the fp32 workspace ``[P, N]``."""
    pid = tl.program_id(0)
    num_progs = tl.num_programs(0)
    cols = tl.arange(0, BLOCK_N)
    mask_n = cols < N
    dtype = h_ptr.dtype.element_ty
    if HAS_W:
        w = tl.load(w_ptr + cols * stride_w, mask=mask_n, other=0.0).to(tl.float32) + w_offset
    dw_acc = tl.full((BLOCK_N,), 0.0, tl.float32)
    for blk in range(pid, (M + BLOCK_M - 1) // BLOCK_M, num_progs):
        rows = (blk * BLOCK_M + tl.arange(0, BLOCK_M)).to(tl.int64)
        mask_m = rows < M
        mask = mask_m[:, None] & mask_n[None, :]
        h = tl.load(h_ptr + rows[:, None] * s_h + cols[None, :], mask=mask, other=0.0).to(tl.float32)
        dy = tl.load(dy_ptr + rows[:, None] * s_dy + cols[None, :], mask=mask, other=0.0).to(tl.float32)
        rstd = tl.load(rstd_ptr + rows, mask=mask_m, other=0.0)
        n = h * rstd[:, None]
        if NEED_W:
            dw_acc += tl.reduce(dy * n, 0, _add)
        if HAS_W:
            dn = dy * w[None, :]
        else:
            dn = dy
        c = tl.reduce(dn * n, 1, _add) / N
        dx = (dn - n * c[:, None]) * rstd[:, None]
        if HAS_DH:
            dx += tl.load(dh_ptr + rows[:, None] * s_dh + cols[None, :], mask=mask, other=0.0).to(tl.float32)
        tl.store(dx_ptr + rows[:, None] * N + cols[None, :], dx.to(dtype), mask=mask)
    if NEED_W:
        tl.store(dw_ptr + pid.to(tl.int64) * N + cols, dw_acc, mask=mask_n)


# --- launch ---------------------------------------------------------------------------------------

def row_stride(t: Tensor) -> Optional[int]:
    """The stride between consecutive rows of ``t`` ([..., D]) read as ``[rows, D]`` in place, or
    None when its last stride is not 1 or its leading dimensions do not merge (copy it first)."""
    if t.stride(-1) != 1 and t.shape[-1] != 1:
        return None
    return _merged_stride(tuple(t.shape[:-1]), t.stride()[:-1])


def in_rows(t: Tensor) -> tuple[Tensor, int]:
    """``t`` (or a contiguous copy when it cannot be read in place) and its row stride."""
    stride = row_stride(t)
    if stride is None:
        t = t.contiguous()
        stride = row_stride(t)
    return t, stride


def decode_tile(block_n: int) -> tuple[int, int]:
    """One row per program, one warp up to 512 columns, two up to 2048, more only for wide rows
    (a warp holding a whole 8192-wide row would spill)."""
    warps = 1 if block_n <= 512 else (2 if block_n <= 2048 else min(8, block_n // 1024))
    return 1, (1 if interpreting() else warps)


def forward_plan(x: Tensor, weight: Optional[Tensor], residual: Optional[Tensor], eps: float,
                 weight_offset: float, round_normed: bool, round_weighted: bool, round_w_eff: bool,
                 per_row: bool) -> Optional[LaunchPlan]:
    """The forward launch for operands shaped, strided and typed like these (at least one row),
    called as ``plan(x, residual or x, weight or x, y, h or y, rstd)``; None when x or the
    residual would need a copy first.  ``per_row``: one row per program (decode-sized calls)."""
    sx = row_stride(x)
    sr = row_stride(residual) if residual is not None else 0
    if sx is None or sr is None:
        return None
    d = x.shape[-1]
    m = x.numel() // d
    block_n = triton.next_power_of_2(d)
    block_m, warps = decode_tile(block_n) if per_row else _tile(block_n, m, FWD_TILE_ELEMENTS)
    has_w = weight is not None
    scalars = (m, d, sx, sr, weight.stride(0) if has_w else 0, float(eps), float(weight_offset))
    flags = dict(HAS_RES=residual is not None, HAS_W=has_w, ROUND_NORMED=round_normed,
                 ROUND_WEIGHTED=round_weighted, ROUND_W_EFF=round_w_eff and has_w)
    return LaunchPlan(rms_norm_fwd_kernel, (triton.cdiv(m, block_m),), scalars,
                      _keywords(flags, block_m, block_n, warps), x.device.index)


def rms_norm_forward(x: Tensor, weight: Optional[Tensor], residual: Optional[Tensor], y: Tensor,
                     h: Optional[Tensor], rstd: Tensor, eps: float, weight_offset: float,
                     round_normed: bool, round_weighted: bool, round_w_eff: bool, per_row: bool) -> None:
    """Write y (contiguous, x's shape), h = x + residual (contiguous; with a residual only) and
    the fp32 ``rstd`` (contiguous, x's shape without D)."""
    if x.numel() == 0:
        return
    x, _ = in_rows(x)
    if residual is not None:
        residual, _ = in_rows(residual)
    plan = forward_plan(x, weight, residual, eps, weight_offset, round_normed, round_weighted,
                        round_w_eff, per_row)
    plan(x, residual if residual is not None else x, weight if weight is not None else x, y,
         h if h is not None else y, rstd)


def backward_plan(dy: Tensor, dh: Optional[Tensor], h: Tensor, weight: Optional[Tensor],
                  need_weight: bool, weight_offset: float) -> Optional[tuple[LaunchPlan, int]]:
    """The backward launch for operands like these (at least one row) and its program count,
    the rows of the fp32 weight-gradient workspace.  Called as ``plan(dy, dh or dy, h,
    weight or h, rstd, dx, workspace or rstd)``; None when a tensor would need a copy first."""
    s_dy, s_h = row_stride(dy), row_stride(h)
    s_dh = row_stride(dh) if dh is not None else 0
    if s_dy is None or s_h is None or s_dh is None:
        return None
    d = h.shape[-1]
    m = h.numel() // d
    block_n = triton.next_power_of_2(d)
    block_m, warps = _tile(block_n, m, BWD_TILE_ELEMENTS_BY_WIDTH.get(block_n, BWD_TILE_ELEMENTS))
    progs = _programs(h, triton.cdiv(m, block_m), 1)
    has_w = weight is not None
    scalars = (m, d, s_dy, s_dh, s_h, weight.stride(0) if has_w else 0, float(weight_offset))
    flags = dict(HAS_DH=dh is not None, HAS_W=has_w, NEED_W=need_weight and has_w)
    return (LaunchPlan(rms_norm_bwd_kernel, (progs,), scalars, _keywords(flags, block_m, block_n, warps),
                       h.device.index), progs)


def rms_norm_backward(dy: Tensor, dh: Optional[Tensor], h: Tensor, weight: Optional[Tensor], rstd: Tensor,
                      dx: Tensor, need_weight: bool, weight_offset: float) -> Optional[Tensor]:
    """Write ``dx`` (contiguous, h's shape: the gradient of x and of the residual) and return the
    fp32 weight gradient ``[D]`` when ``need_weight``."""
    d = h.shape[-1]
    need_weight = need_weight and weight is not None
    if h.numel() == 0:
        return h.new_zeros((d,), dtype=torch.float32) if need_weight else None
    dy, _ = in_rows(dy)
    h, _ = in_rows(h)
    if dh is not None:
        dh, _ = in_rows(dh)
    plan, progs = backward_plan(dy, dh, h, weight, need_weight, weight_offset)
    ws = torch.empty((progs, d), device=h.device, dtype=torch.float32) if need_weight else rstd
    plan(dy, dh if dh is not None else dy, h, weight if weight is not None else h, rstd, dx, ws)
    return ws.sum(0) if need_weight else None
