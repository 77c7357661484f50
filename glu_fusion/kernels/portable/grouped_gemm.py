"""Grouped (mixture-of-experts) GEMMs for the expert SwiGLU: forward with the gate in the
epilogue, the input gradient, and the per-expert weight gradient.

Tokens ``x`` [T, K] are sorted by expert; ``offsets`` [E] (int32 or int64) holds the cumulative
token counts, so expert ``e`` owns rows ``offsets[e-1]:offsets[e]``.  Rows from ``offsets[-1]``
to ``T`` (a padded tail) form one more group whose outputs are written as zeros.

No kernel here reads the routing on the host: ``work_list`` launches one small program that
turns ``offsets`` into each group's row end and the running count of row tiles, both on the
device.  The GEMMs then run over an over-provisioned, persistent list of ``cdiv(T, BLOCK_M) +
E + 1`` row tiles (a bound on the tiles any routing needs); each program finds the group and
first row of its tile in that list and leaves tiles past the last group idle.

The weight gradient needs no work list: one program per (expert, row tile of the weight,
column tile) walks its expert's tokens in a fixed order, so the result is deterministic (no
atomics) and experts without tokens get exact zeros.
"""
from __future__ import annotations

from typing import Optional

import torch
import triton
import triton.language as tl
from torch import Tensor

from .._launch import interpreter_quiet, interpreting, multiprocessors, precision


# --- the device-built work list ------------------------------------------------------------------

@triton.jit
def _work_list_kernel(offs_ptr, ends_ptr, tile_cum_ptr, E, T,
                      BLOCK_M: tl.constexpr, G_POW2: tl.constexpr):
    """``ends[g]``: last row (exclusive) of group g (experts, then the tail, which ends at T);
    ``tile_cum[g]``: row tiles of groups 0..g together."""
    idx = tl.arange(0, G_POW2)
    end = tl.load(offs_ptr + idx, mask=idx < E, other=T).to(tl.int32)
    start = tl.load(offs_ptr + idx - 1, mask=(idx > 0) & (idx <= E), other=0).to(tl.int32)
    start = tl.minimum(tl.maximum(start, 0), T)
    end = tl.minimum(tl.maximum(end, start), T)
    tiles = (end - start + BLOCK_M - 1) // BLOCK_M
    groups = E + 1
    tl.store(ends_ptr + idx, end, mask=idx < groups)
    tl.store(tile_cum_ptr + idx, tl.cumsum(tiles, 0), mask=idx < groups)


def work_list(offsets: Tensor, t: int, block_m: int) -> tuple[Tensor, Tensor, int]:
    """``(ends, tile_cum, max_tiles)`` for row tiles of ``block_m`` rows, built on the device;
    ``max_tiles`` is a host-side bound on ``tile_cum[-1]`` that depends on shapes only."""
    e = offsets.shape[0]
    ends = torch.empty(e + 1, device=offsets.device, dtype=torch.int32)
    tile_cum = torch.empty(e + 1, device=offsets.device, dtype=torch.int32)
    _work_list_kernel[(1,)](offsets, ends, tile_cum, e, t, BLOCK_M=block_m,
                            G_POW2=triton.next_power_of_2(e + 1))
    return ends, tile_cum, triton.cdiv(t, block_m) + e + 1


@triton.jit
def _locate(mt, ends_ptr, tile_cum_ptr, G, BLOCK_M: tl.constexpr, G_POW2: tl.constexpr):
    """Group, first row and row end of global row tile ``mt``; group G: no tile (idle)."""
    idx = tl.arange(0, G_POW2)
    cum = tl.load(tile_cum_ptr + idx, mask=idx < G, other=2147483647)
    group = tl.sum((cum <= mt).to(tl.int32), axis=0)
    prev = tl.maximum(group - 1, 0)
    tile_start = tl.where(group > 0, tl.load(tile_cum_ptr + prev), 0)
    row_start = tl.where(group > 0, tl.load(ends_ptr + prev), 0)
    row_end = tl.load(ends_ptr + tl.minimum(group, G - 1))
    return group, row_start + (mt - tile_start) * BLOCK_M, row_end


@triton.jit
def _gate(g, u, alpha, limit, ACT: tl.constexpr):
    """ACT 0: ``silu(g)·u``; ACT 1: gpt-oss's clamped gate.  fp32 in and out."""
    if ACT == 0:
        out = g * tl.sigmoid(g) * u
    else:
        gc = tl.minimum(g, limit)
        uc = tl.minimum(tl.maximum(u, -limit), limit)
        out = (uc + 1.0) * gc * tl.sigmoid(alpha * gc)
    return out


# --- forward: both projections and the gate --------------------------------------------------------

@triton.jit
def grouped_swiglu_fwd_kernel(
    x_ptr, wg_ptr, wu_ptr, bg_ptr, bu_ptr, out_ptr, pre_ptr, ends_ptr, tile_cum_ptr,
    N, K, G, max_tiles,
    stride_xm, stride_xk, stride_wge, stride_wgn, stride_wgk, stride_wue, stride_wun, stride_wuk,
    stride_bge, stride_bgn, stride_bue, stride_bun, stride_om, stride_on, stride_pm, stride_pn,
    alpha, limit,
    ACT: tl.constexpr, HAS_BIAS: tl.constexpr, SAVE_PREACT: tl.constexpr, PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, G_POW2: tl.constexpr,
):
    num_n = tl.cdiv(N, BLOCK_N)
    dtype = out_ptr.dtype.element_ty
    # Row tiles vary fastest: consecutive programs share one expert's weight tile in L2.
    for w in range(tl.program_id(0), max_tiles * num_n, tl.num_programs(0)):
        mt = w % max_tiles
        nt = w // max_tiles
        group, first, row_end = _locate(mt, ends_ptr, tile_cum_ptr, G, BLOCK_M, G_POW2)
        if group < G:
            rows = first + tl.arange(0, BLOCK_M)
            cols = nt * BLOCK_N + tl.arange(0, BLOCK_N)
            mask = (rows < row_end)[:, None] & (cols < N)[None, :]
            rows64 = rows.to(tl.int64)
            cols64 = cols.to(tl.int64)
            out_ptrs = out_ptr + rows64[:, None] * stride_om + cols64[None, :] * stride_on
            pre_ptrs = pre_ptr + rows64[:, None] * stride_pm + cols64[None, :] * stride_pn
            if group == G - 1:  # the padded tail: zeros
                zero = tl.zeros((BLOCK_M, BLOCK_N), dtype=dtype)
                tl.store(out_ptrs, zero, mask=mask)
                if SAVE_PREACT:
                    tl.store(pre_ptrs, zero, mask=mask)
                    tl.store(pre_ptrs + N * stride_pn, zero, mask=mask)
            else:
                e64 = group.to(tl.int64)
                offs_k = tl.arange(0, BLOCK_K)
                x_ptrs = x_ptr + rows64[:, None] * stride_xm + offs_k[None, :] * stride_xk
                wg_ptrs = (wg_ptr + e64 * stride_wge + cols64[None, :] * stride_wgn
                           + offs_k[:, None] * stride_wgk)
                wu_ptrs = (wu_ptr + e64 * stride_wue + cols64[None, :] * stride_wun
                           + offs_k[:, None] * stride_wuk)
                mask_m = rows < row_end
                mask_n = cols < N
                acc_g = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
                acc_u = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
                for k0 in range(0, K, BLOCK_K):
                    mask_k = offs_k < K - k0
                    a = tl.load(x_ptrs, mask=mask_m[:, None] & mask_k[None, :], other=0.0)
                    w_mask = mask_k[:, None] & mask_n[None, :]
                    acc_g = tl.dot(a, tl.load(wg_ptrs, mask=w_mask, other=0.0), acc_g,
                                   input_precision=PRECISION)
                    acc_u = tl.dot(a, tl.load(wu_ptrs, mask=w_mask, other=0.0), acc_u,
                                   input_precision=PRECISION)
                    x_ptrs += BLOCK_K * stride_xk
                    wg_ptrs += BLOCK_K * stride_wgk
                    wu_ptrs += BLOCK_K * stride_wuk
                if HAS_BIAS:
                    acc_g += tl.load(bg_ptr + e64 * stride_bge + cols64 * stride_bgn, mask=mask_n,
                                     other=0.0).to(tl.float32)[None, :]
                    acc_u += tl.load(bu_ptr + e64 * stride_bue + cols64 * stride_bun, mask=mask_n,
                                     other=0.0).to(tl.float32)[None, :]
                g = acc_g.to(dtype)   # rounded as eager rounds each projection
                u = acc_u.to(dtype)
                out = _gate(g.to(tl.float32), u.to(tl.float32), alpha, limit, ACT)
                tl.store(out_ptrs, out.to(dtype), mask=mask)
                if SAVE_PREACT:
                    tl.store(pre_ptrs, g, mask=mask)
                    tl.store(pre_ptrs + N * stride_pn, u, mask=mask)


# --- input gradient: dX = dG·Wg + dU·Wu per expert ------------------------------------------------

@triton.jit
def grouped_dx_kernel(
    dh_ptr, wg_ptr, wu_ptr, dx_ptr, ends_ptr, tile_cum_ptr,
    N, K, G, max_tiles,
    stride_hm, stride_hn, stride_wge, stride_wgn, stride_wgk, stride_wue, stride_wun, stride_wuk,
    stride_xm, stride_xk,
    PRECISION: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
    G_POW2: tl.constexpr,
):
    num_k = tl.cdiv(K, BLOCK_K)
    dtype = dx_ptr.dtype.element_ty
    for w in range(tl.program_id(0), max_tiles * num_k, tl.num_programs(0)):
        mt = w % max_tiles
        kt = w // max_tiles
        group, first, row_end = _locate(mt, ends_ptr, tile_cum_ptr, G, BLOCK_M, G_POW2)
        if group < G:
            rows = first + tl.arange(0, BLOCK_M)
            ks = kt * BLOCK_K + tl.arange(0, BLOCK_K)
            mask_m = rows < row_end
            mask_k = ks < K
            rows64 = rows.to(tl.int64)
            ks64 = ks.to(tl.int64)
            dx_ptrs = dx_ptr + rows64[:, None] * stride_xm + ks64[None, :] * stride_xk
            mask = mask_m[:, None] & mask_k[None, :]
            if group == G - 1:
                tl.store(dx_ptrs, tl.zeros((BLOCK_M, BLOCK_K), dtype=dtype), mask=mask)
            else:
                e64 = group.to(tl.int64)
                offs_n = tl.arange(0, BLOCK_N)
                h_ptrs = dh_ptr + rows64[:, None] * stride_hm + offs_n[None, :] * stride_hn
                wg_ptrs = (wg_ptr + e64 * stride_wge + offs_n[:, None] * stride_wgn
                           + ks64[None, :] * stride_wgk)
                wu_ptrs = (wu_ptr + e64 * stride_wue + offs_n[:, None] * stride_wun
                           + ks64[None, :] * stride_wuk)
                acc = tl.zeros((BLOCK_M, BLOCK_K), dtype=tl.float32)
                for n0 in range(0, N, BLOCK_N):
                    mask_n = offs_n < N - n0
                    h_mask = mask_m[:, None] & mask_n[None, :]
                    w_mask = mask_n[:, None] & mask_k[None, :]
                    d_g = tl.load(h_ptrs, mask=h_mask, other=0.0)
                    d_u = tl.load(h_ptrs + N * stride_hn, mask=h_mask, other=0.0)
                    acc = tl.dot(d_g, tl.load(wg_ptrs, mask=w_mask, other=0.0), acc,
                                 input_precision=PRECISION)
                    acc = tl.dot(d_u, tl.load(wu_ptrs, mask=w_mask, other=0.0), acc,
                                 input_precision=PRECISION)
                    h_ptrs += BLOCK_N * stride_hn
                    wg_ptrs += BLOCK_N * stride_wgn
                    wu_ptrs += BLOCK_N * stride_wun
                tl.store(dx_ptrs, acc.to(dtype), mask=mask)


# --- weight gradient: dWₑ = dHₑᵀ·xₑ and dbₑ = Σ dHₑ, a jagged reduction per expert ---------------

@triton.jit
def grouped_dw_kernel(
    dh_ptr, x_ptr, offs_ptr, dwg_ptr, dwu_ptr, dbg_ptr, dbu_ptr,
    T, N, K,
    stride_hm, stride_hn, stride_xm, stride_xk,
    stride_dge, stride_dgn, stride_dgk, stride_due, stride_dun, stride_duk,
    stride_bge, stride_bgn, stride_bue, stride_bun,
    WANT_W: tl.constexpr, WANT_BIAS: tl.constexpr, PRECISION: tl.constexpr,
    BLOCK_T: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
):
    e = tl.program_id(0)
    num_n = tl.cdiv(N, BLOCK_N)
    half = tl.program_id(1) // num_n          # 0: gate rows, 1: up rows
    nt = tl.program_id(1) % num_n
    kt = tl.program_id(2)
    end = tl.minimum(tl.load(offs_ptr + e).to(tl.int32), T)
    start = tl.where(e > 0, tl.load(offs_ptr + tl.maximum(e - 1, 0)).to(tl.int32), 0)
    start = tl.minimum(tl.maximum(start, 0), T)

    cols = nt * BLOCK_N + tl.arange(0, BLOCK_N)
    ks = kt * BLOCK_K + tl.arange(0, BLOCK_K)
    mask_n = cols < N
    mask_k = ks < K
    cols64 = cols.to(tl.int64)
    ks64 = ks.to(tl.int64)
    offs_t = tl.arange(0, BLOCK_T)
    acc = tl.zeros((BLOCK_N, BLOCK_K), dtype=tl.float32)
    acc_b = tl.zeros((BLOCK_N,), dtype=tl.float32)
    for r0 in range(start, end, BLOCK_T):   # fixed order: deterministic
        rows = r0 + offs_t
        mask_t = rows < end
        rows64 = rows.to(tl.int64)
        h = tl.load(dh_ptr + rows64[:, None] * stride_hm + (half * N + cols64)[None, :] * stride_hn,
                    mask=mask_t[:, None] & mask_n[None, :], other=0.0)
        if WANT_W:
            xt = tl.load(x_ptr + rows64[:, None] * stride_xm + ks64[None, :] * stride_xk,
                         mask=mask_t[:, None] & mask_k[None, :], other=0.0)
            acc = tl.dot(tl.trans(h), xt, acc, input_precision=PRECISION)
        if WANT_BIAS:
            acc_b += tl.sum(h.to(tl.float32), axis=0)

    e64 = e.to(tl.int64)
    mask = mask_n[:, None] & mask_k[None, :]
    if half == 0:
        if WANT_W:
            tl.store(dwg_ptr + e64 * stride_dge + cols64[:, None] * stride_dgn + ks64[None, :] * stride_dgk,
                     acc.to(dwg_ptr.dtype.element_ty), mask=mask)
        if WANT_BIAS:
            if kt == 0:
                tl.store(dbg_ptr + e64 * stride_bge + cols64 * stride_bgn,
                         acc_b.to(dbg_ptr.dtype.element_ty), mask=mask_n)
    else:
        if WANT_W:
            tl.store(dwu_ptr + e64 * stride_due + cols64[:, None] * stride_dun + ks64[None, :] * stride_duk,
                     acc.to(dwu_ptr.dtype.element_ty), mask=mask)
        if WANT_BIAS:
            if kt == 0:
                tl.store(dbu_ptr + e64 * stride_bue + cols64 * stride_bun,
                         acc_b.to(dbu_ptr.dtype.element_ty), mask=mask_n)


# --- launch functions ------------------------------------------------------------------------------

# (BLOCK_M, BLOCK_N, BLOCK_K, num_warps, num_stages) by 4-byte operands; untuned starting points
# sized to stay inside Hopper's 227 KB of shared memory per program (the dX kernel loads four
# tiles per stage: dG, dU, Wg, Wu, hence two stages for 2-byte operands).
_GPU_FWD = {False: (128, 128, 64, 8, 3), True: (64, 64, 32, 4, 3)}
_GPU_DX = {False: (128, 64, 128, 8, 2), True: (64, 32, 64, 4, 3)}
_GPU_DW = {False: (64, 128, 128, 8, 3), True: (32, 64, 64, 4, 3)}
_INTERPRETER_TILE = (16, 16, 16, 1, 1)


def _tiles(table: dict, dtype: torch.dtype) -> tuple:
    return _INTERPRETER_TILE if interpreting() else table[dtype == torch.float32]


def _persistent_grid(work: int, device: torch.device, programs: Optional[int]) -> int:
    """Programs of a persistent launch: ``programs`` when given (tests make each program walk
    several tiles), else one per tile in the interpreter and four per SM on the GPU."""
    if programs is not None:
        return max(1, min(work, programs))
    if interpreting() or device.type != "cuda":
        return max(1, work)
    return max(1, min(work, 4 * multiprocessors(device.index)))


def _strides3(t: Tensor) -> tuple:
    return tuple(t.stride())


def _strides2(t: Optional[Tensor]) -> tuple:
    return (0, 0) if t is None else tuple(t.stride())


def grouped_swiglu_forward(x: Tensor, offsets: Tensor, w_gate: Tensor, w_up: Tensor,
                           b_gate: Optional[Tensor], b_up: Optional[Tensor], out: Tensor,
                           preact: Optional[Tensor], activation: int, alpha: float, limit: float,
                           allow_tf32: bool, programs: Optional[int] = None) -> None:
    """Write the gated output into ``out`` [T, N] and, if given, ``[g | u]`` into ``preact``
    [T, 2N]; rows of the padded tail become zeros.  Weights [E, N, K] and biases [E, N] may
    have any strides (views of packed or transposed storage).  ``activation``: 0 silu, 1 gpt-oss."""
    t, k = x.shape
    e, n = w_gate.shape[0], w_gate.shape[1]
    if t == 0 or n == 0:
        return
    block_m, block_n, block_k, warps, stages = _tiles(_GPU_FWD, x.dtype)
    ends, tile_cum, max_tiles = work_list(offsets, t, block_m)
    work = max_tiles * triton.cdiv(n, block_n)
    pre = preact if preact is not None else out
    bg = b_gate if b_gate is not None else out
    bu = b_up if b_up is not None else out
    with interpreter_quiet():
        grouped_swiglu_fwd_kernel[(_persistent_grid(work, x.device, programs),)](
            x, w_gate, w_up, bg, bu, out, pre, ends, tile_cum,
            n, k, e + 1, max_tiles,
            *x.stride(), *_strides3(w_gate), *_strides3(w_up), *_strides2(b_gate), *_strides2(b_up),
            *out.stride(), *pre.stride(), float(alpha), float(limit),
            ACT=activation, HAS_BIAS=b_gate is not None, SAVE_PREACT=preact is not None,
            PRECISION=precision(allow_tf32), BLOCK_M=block_m, BLOCK_N=block_n, BLOCK_K=block_k,
            G_POW2=triton.next_power_of_2(e + 1), num_warps=warps, num_stages=stages)


def grouped_input_grad(dh: Tensor, offsets: Tensor, w_gate: Tensor, w_up: Tensor, dx: Tensor,
                       allow_tf32: bool, programs: Optional[int] = None) -> None:
    """Write ``dX`` [T, K] = ``dGₑ·Wgₑ + dUₑ·Wuₑ`` per expert (``dH = [dG | dU]`` [T, 2N]);
    rows of the padded tail become zeros."""
    t, k = dx.shape
    e, n = w_gate.shape[0], w_gate.shape[1]
    if t == 0 or k == 0:
        return
    block_m, block_n, block_k, warps, stages = _tiles(_GPU_DX, dh.dtype)
    ends, tile_cum, max_tiles = work_list(offsets, t, block_m)
    work = max_tiles * triton.cdiv(k, block_k)
    with interpreter_quiet():
        grouped_dx_kernel[(_persistent_grid(work, dx.device, programs),)](
            dh, w_gate, w_up, dx, ends, tile_cum, n, k, e + 1, max_tiles,
            *dh.stride(), *_strides3(w_gate), *_strides3(w_up), *dx.stride(),
            PRECISION=precision(allow_tf32), BLOCK_M=block_m, BLOCK_N=block_n, BLOCK_K=block_k,
            G_POW2=triton.next_power_of_2(e + 1), num_warps=warps, num_stages=stages)


def grouped_weight_grad(dh: Tensor, x: Tensor, offsets: Tensor, dw_gate: Optional[Tensor],
                        dw_up: Optional[Tensor], db_gate: Optional[Tensor], db_up: Optional[Tensor],
                        allow_tf32: bool) -> None:
    """Write ``dWₑ = dHₑᵀ·xₑ`` into ``dw_gate``/``dw_up`` [E, N, K] and the column sums of
    ``dHₑ`` into ``db_gate``/``db_up`` [E, N] (either pair may be None), every expert in full:
    experts without tokens get zeros.  Deterministic: a fixed reduction order, no atomics."""
    t, k = x.shape
    n = dh.shape[1] // 2
    want_w, want_b = dw_gate is not None, db_gate is not None
    like = dw_gate if want_w else db_gate
    if like is None or n == 0:
        return
    e = like.shape[0]
    if e == 0:
        return
    if want_w and k == 0:
        want_w = False
        if not want_b:
            return
    block_t, block_n, block_k, warps, stages = _tiles(_GPU_DW, x.dtype)
    grid = (e, 2 * triton.cdiv(n, block_n), triton.cdiv(k, block_k) if want_w else 1)
    dwg = dw_gate if want_w else like
    dwu = dw_up if want_w else like
    dbg = db_gate if want_b else like
    dbu = db_up if want_b else like
    with interpreter_quiet():
        grouped_dw_kernel[grid](
            dh, x, offsets, dwg, dwu, dbg, dbu, t, n, k, *dh.stride(), *x.stride(),
            *(_strides3(dwg) if want_w else (0, 0, 0)), *(_strides3(dwu) if want_w else (0, 0, 0)),
            *(_strides2(dbg) if want_b else (0, 0)), *(_strides2(dbu) if want_b else (0, 0)),
            WANT_W=want_w, WANT_BIAS=want_b, PRECISION=precision(allow_tf32),
            BLOCK_T=block_t, BLOCK_N=block_n, BLOCK_K=block_k, num_warps=warps, num_stages=stages)
