"""Weight gradient ``dW = dHᵀ·x`` (and ``db = Σₘ dH``) for Hopper: a persistent TMA GEMM whose
reduction runs over tokens, split over tokens when the output tiles alone cannot fill the GPU.

``dH`` is ``[M, R]`` (R = 2N for a packed gate/up weight, or any weight's output width), ``x`` is
``[M, K]``; ``dW`` is ``[R, K]``.  Each work item is one ``[BLOCK_R, BLOCK_K]`` output tile and one
token split; with one split the tile is written in the output dtype straight from fp32
accumulators, with several each split writes fp32 partials and a second kernel adds them in a
fixed order (deterministic, no atomics).  The bias gradient comes from the same ``dH`` tiles, by
the programs of the first K column of tiles.
"""
from __future__ import annotations

from typing import Optional

import torch
import triton
import triton.language as tl
from torch import Tensor

from ._launch import LaunchPlan, interpreter_quiet, interpreting, multiprocessors, precision
from .swiglu_fwd_tma import with_tma_scratch


@triton.jit
def weight_grad_tma_kernel(
    dh_ptr, x_ptr, dw_ptr, part_ptr, db_ptr, dbpart_ptr,
    M, R, K, stride_dh, stride_x, stride_dw, stride_db, tokens_per_split,
    SPLITS: tl.constexpr, HAS_BIAS: tl.constexpr, PRECISION: tl.constexpr,
    BLOCK_R: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_M: tl.constexpr, GROUP_R: tl.constexpr,
    NUM_PROGRAMS: tl.constexpr,
):
    dh_desc = tl.make_tensor_descriptor(dh_ptr, [M, R], [stride_dh, 1], [BLOCK_M, BLOCK_R])
    x_desc = tl.make_tensor_descriptor(x_ptr, [M, K], [stride_x, 1], [BLOCK_M, BLOCK_K])
    if SPLITS == 1:
        dw_desc = tl.make_tensor_descriptor(dw_ptr, [R, K], [stride_dw, 1], [BLOCK_R, BLOCK_K])
    dtype = dh_ptr.dtype.element_ty
    num_r = tl.cdiv(R, BLOCK_R)
    num_k = tl.cdiv(K, BLOCK_K)
    tiles = num_r * num_k
    for item in tl.range(tl.program_id(0), tiles * SPLITS, NUM_PROGRAMS, flatten=False):
        split = item // tiles
        tile = item % tiles
        # Grouped order over R so that neighbouring programs share x tiles in L2.
        width = GROUP_R * num_k
        group = tile // width
        first_r = group * GROUP_R
        size_r = tl.minimum(num_r - first_r, GROUP_R)
        pid_r = first_r + (tile % width) % size_r
        pid_k = (tile % width) // size_r
        off_r = pid_r * BLOCK_R
        off_k = pid_k * BLOCK_K
        start = split * tokens_per_split
        stop = tl.minimum(start + tokens_per_split, M)
        acc = tl.zeros((BLOCK_R, BLOCK_K), dtype=tl.float32)
        bias_acc = tl.zeros((BLOCK_R,), dtype=tl.float32)
        for off_m in range(start, stop, BLOCK_M):
            # Splits are whole token tiles long, so only the last ends inside a tile, at M,
            # where the copy engine fills zeros.
            a = dh_desc.load([off_m, off_r])
            b = x_desc.load([off_m, off_k])
            acc = tl.dot(a.T, b, acc, input_precision=PRECISION)
            if HAS_BIAS:
                if pid_k == 0:
                    bias_acc += tl.sum(a.to(tl.float32), axis=0)
        cols_r = off_r + tl.arange(0, BLOCK_R)
        if SPLITS == 1:
            dw_desc.store([off_r, off_k], acc.to(dtype))
            if HAS_BIAS:
                if pid_k == 0:
                    tl.store(db_ptr + cols_r * stride_db, bias_acc.to(dtype), mask=cols_r < R)
        else:
            cols_k = off_k + tl.arange(0, BLOCK_K)
            mask = (cols_r < R)[:, None] & (cols_k < K)[None, :]
            part_rows = split.to(tl.int64) * R + cols_r.to(tl.int64)   # int64: the workspace may pass 2^31
            tl.store(part_ptr + part_rows[:, None] * K + cols_k[None, :], acc, mask=mask)
            if HAS_BIAS:
                if pid_k == 0:
                    tl.store(dbpart_ptr + split * R + cols_r, bias_acc, mask=cols_r < R)


@triton.jit
def split_sum_kernel(part_ptr, out_ptr, n_cols, total, stride_out, SPLITS: tl.constexpr, BLOCK: tl.constexpr):
    """out[i] = Σ_s part[s, i] in split order, for ``total`` elements of an [rows, n_cols] output."""
    # int64 offsets: a split workspace holds SPLITS·total elements, past 2^31 for large weights.
    offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < total
    acc = tl.zeros((BLOCK,), dtype=tl.float32)
    part = part_ptr + offs
    for s in range(SPLITS):
        acc += tl.load(part, mask=mask, other=0.0)
        part += total
    row = offs // n_cols
    col = offs % n_cols
    tl.store(out_ptr + row * stride_out + col, acc.to(out_ptr.dtype.element_ty), mask=mask)


# 128x256 output tiles, 3 stages: the fastest of four tables at 4096→14336 widths (H200,
# benchmarks/NOTES.md, "GEMM kernels").
_GPU_META = dict(BLOCK_R=128, BLOCK_K=256, BLOCK_M=64, GROUP_R=8, num_stages=3, num_warps=8)
_GPU_META_FP32 = dict(BLOCK_R=128, BLOCK_K=64, BLOCK_M=32, GROUP_R=8, num_stages=3, num_warps=8)
_INTERPRETER_META = dict(BLOCK_R=16, BLOCK_K=16, BLOCK_M=16, GROUP_R=4)


def token_splits(m: int, tiles: int, block_m: int, programs: int) -> int:
    """How many token splits: one when the output tiles fill two waves of programs; otherwise
    enough to reach about two waves, keeping each split at least four token tiles long and at
    most eight splits (their fp32 partials cost memory traffic)."""
    if tiles >= 2 * programs:
        return 1
    want = triton.cdiv(2 * programs, max(tiles, 1))
    most = max(1, m // (4 * block_m))
    return max(1, min(want, most, 8))


def weight_grad(dh: Tensor, x: Tensor, dw: Tensor, db: Optional[Tensor], allow_tf32: bool,
                meta: Optional[dict] = None, splits: Optional[int] = None) -> None:
    """``dw <- dhᵀ·x`` and ``db <- Σₘ dh``; ``dh`` [M, R], ``x`` [M, K], ``dw`` [R, K] (unit last
    stride, TMA-addressable: the caller checks ``tma_eligible``), ``db`` [R] contiguous or None.
    ``splits`` overrides the token-split count (tests and tuning)."""
    m, r = dh.shape
    k = x.shape[1]
    if r == 0 or k == 0:
        if db is not None:
            db.zero_()
        return
    if m == 0:
        dw.zero_()
        if db is not None:
            db.zero_()
        return
    if meta is None:
        meta = _INTERPRETER_META if interpreting() else (_GPU_META_FP32 if dh.element_size() == 4 else _GPU_META)
    meta = dict(meta)
    tiles = triton.cdiv(r, meta["BLOCK_R"]) * triton.cdiv(k, meta["BLOCK_K"])
    sms = 3 if interpreting() else multiprocessors(dh.device.index)
    if splits is None:
        splits = token_splits(m, tiles, meta["BLOCK_M"], sms)
    tokens_per_split = triton.cdiv(triton.cdiv(m, splits), meta["BLOCK_M"]) * meta["BLOCK_M"]
    splits = triton.cdiv(m, tokens_per_split)
    programs = min(tiles * splits, sms) if not interpreting() else min(tiles * splits, 3)
    part = dh.new_empty((splits, r, k), dtype=torch.float32) if splits > 1 else dw
    dbpart = dh.new_empty((splits, r), dtype=torch.float32) if (splits > 1 and db is not None) else dw
    db_arg = db if db is not None else dw
    scalars = (m, r, k, dh.stride(0), x.stride(0), dw.stride(0), db_arg.stride(0), tokens_per_split)
    keywords = dict(SPLITS=splits, HAS_BIAS=db is not None, PRECISION=precision(allow_tf32),
                    NUM_PROGRAMS=programs, **meta)
    launch = with_tma_scratch(LaunchPlan(weight_grad_tma_kernel, (programs,), scalars, keywords, dh.device.index))
    launch(dh, x, dw, part, db_arg, dbpart)
    if splits > 1:
        block = 1024
        total = r * k
        with interpreter_quiet():
            split_sum_kernel[(triton.cdiv(total, block),)](part, dw, k, total, dw.stride(0), SPLITS=splits, BLOCK=block)
        if db is not None:
            with interpreter_quiet():
                split_sum_kernel[(triton.cdiv(r, block),)](dbpart, db, r, r, 0, SPLITS=splits, BLOCK=block)

