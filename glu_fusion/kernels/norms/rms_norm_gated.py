"""Gated RMSNorm forward and backward kernels.

Each row of ``x``/``z`` (last dimension D) is cut into ``G = D / N`` groups of ``N`` columns,
normalised separately.  A program owns one group of ``BLOCK_M`` rows as a ``[BLOCK_M, BLOCK_N]``
tile (``BLOCK_N = next_pow2(N)``): many rows per program for small N, one row for large N.

Forward, fp32 math with optional roundings to the input dtype ``T`` (``.to(T)`` in eager)::

    g = act(z)                          [rounded to T if GATE_LOW]
    s = x            (norm before gate) | x·g  [rounded to T if GATE_LOW]  (gate before norm)
    rstd = 1/sqrt(mean(s²) + eps)       (saved, fp32, one per row and group)
    h = s·rstd       [rounded to T if ROUND_NORMED]
    h = h·(w + offset)   [w + offset rounded to w's dtype if ROUND_W_EFF; h rounded if ROUND_WEIGHTED]
    y = h·g (norm before gate) | h

Backward uses the same fp32 values without the roundings (a rounding's derivative is taken as 1,
as eager autograd does for ``.to``).  The weight gradient is reduced deterministically: each
program accumulates its rows in fp32 registers and writes one partial row of an fp32 workspace
``[P, D]`` that the caller sums.

Rows are addressed as ``(r // M_INNER) * stride_outer + (r % M_INNER) * stride_inner`` so that
strided views with up to two non-mergeable leading dimensions are read in place.

Reductions use ``tl.reduce`` with a local combine function rather than ``tl.sum``: Triton's
own ``@jit`` helpers cannot run in the CPU interpreter when Triton was imported before
``TRITON_INTERPRET=1`` was set, and these kernels should run there regardless.
"""
from __future__ import annotations

import math
from typing import Optional

import torch
import triton
import triton.language as tl
from torch import Tensor

from .._launch import LaunchPlan, interpreting, multiprocessors

ACT_SILU = 0
ACT_SIGMOID = 1
DOWNCAST_NONE = 0
DOWNCAST_BEFORE_WEIGHT = 1
DOWNCAST_AFTER_WEIGHT = 2

#: Largest group size the kernels take in one tile; larger groups run the reference.
MAX_GROUP = 32768


@triton.jit
def _act(z, ACT: tl.constexpr):
    """silu or sigmoid in fp32, spelled as eager computes them (``z / (1 + exp(-z))``)."""
    if ACT == 0:
        out = z / (1.0 + tl.exp(-z))
    else:
        out = 1.0 / (1.0 + tl.exp(-z))
    return out


@triton.jit
def _act_grad(z, ACT: tl.constexpr):
    sig = 1.0 / (1.0 + tl.exp(-z))
    if ACT == 0:
        out = sig * (1.0 + z * (1.0 - sig))
    else:
        out = sig * (1.0 - sig)
    return out


@triton.jit
def _add(a, b):
    return a + b


@triton.jit
def _row_offsets(rows, M_INNER, s_outer, s_inner):
    return (rows // M_INNER) * s_outer + (rows % M_INNER) * s_inner


@triton.jit
def rms_norm_gated_fwd_kernel(
    x_ptr, z_ptr, w_ptr, y_ptr, rstd_ptr,
    M, N, G, M_INNER,
    sxo, sxi, szo, szi, syo, syi, stride_w,
    eps, w_offset,
    HAS_W: tl.constexpr, NORM_BEFORE_GATE: tl.constexpr, ACT: tl.constexpr,
    GATE_LOW: tl.constexpr, ROUND_NORMED: tl.constexpr, ROUND_WEIGHTED: tl.constexpr,
    ROUND_W_EFF: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
):
    grp = tl.program_id(1)
    rows = (tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)).to(tl.int64)
    offs = tl.arange(0, BLOCK_N)
    mask_m = rows < M
    mask_n = offs < N
    mask = mask_m[:, None] & mask_n[None, :]
    cols = (grp * N + offs).to(tl.int64)

    x_ptrs = x_ptr + _row_offsets(rows, M_INNER, sxo, sxi)[:, None] + cols[None, :]
    z_ptrs = z_ptr + _row_offsets(rows, M_INNER, szo, szi)[:, None] + cols[None, :]
    dtype = y_ptr.dtype.element_ty
    x = tl.load(x_ptrs, mask=mask, other=0.0).to(tl.float32)
    z = tl.load(z_ptrs, mask=mask, other=0.0).to(tl.float32)
    g = _act(z, ACT)
    if GATE_LOW:
        g = g.to(dtype).to(tl.float32)
    if not NORM_BEFORE_GATE:
        x = x * g
        if GATE_LOW:
            x = x.to(dtype).to(tl.float32)
        x = tl.where(mask, x, 0.0)
    rstd = 1.0 / tl.sqrt(tl.reduce(x * x, 1, _add) / N + eps)
    h = x * rstd[:, None]
    if ROUND_NORMED:
        h = h.to(dtype).to(tl.float32)
    if HAS_W:
        w = tl.load(w_ptr + cols * stride_w, mask=mask_n, other=0.0)
        w_eff = w.to(tl.float32) + w_offset
        if ROUND_W_EFF:
            w_eff = w_eff.to(w.dtype).to(tl.float32)
        h = h * w_eff[None, :]
    if ROUND_WEIGHTED:
        h = h.to(dtype).to(tl.float32)
    if NORM_BEFORE_GATE:
        h = h * g
    y_ptrs = y_ptr + _row_offsets(rows, M_INNER, syo, syi)[:, None] + cols[None, :]
    tl.store(y_ptrs, h.to(dtype), mask=mask)
    tl.store(rstd_ptr + rows * G + grp, rstd, mask=mask_m)


@triton.jit
def rms_norm_gated_bwd_kernel(
    dy_ptr, x_ptr, z_ptr, w_ptr, rstd_ptr, dx_ptr, dz_ptr, dw_ptr,
    M, N, G, M_INNER,
    sdo, sdi, sxo, sxi, szo, szi, sgo, sgi, stride_w,
    w_offset,
    HAS_W: tl.constexpr, NORM_BEFORE_GATE: tl.constexpr, ACT: tl.constexpr,
    NEED_X: tl.constexpr, NEED_Z: tl.constexpr, NEED_W: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
):
    """Programs ``(p, grp)`` walk row blocks ``p, p + P, ...`` of group ``grp``; dx and dz are
    contiguous (strides ``sgo, sgi``); ``dw_ptr`` is the fp32 workspace ``[P, G * N]``."""
    pid = tl.program_id(0)
    num_progs = tl.num_programs(0)
    grp = tl.program_id(1)
    offs = tl.arange(0, BLOCK_N)
    mask_n = offs < N
    cols = (grp * N + offs).to(tl.int64)
    dtype = x_ptr.dtype.element_ty
    if HAS_W:
        w = tl.load(w_ptr + cols * stride_w, mask=mask_n, other=0.0).to(tl.float32) + w_offset
    dw_acc = tl.full((BLOCK_N,), 0.0, tl.float32)
    for blk in range(pid, (M + BLOCK_M - 1) // BLOCK_M, num_progs):
        rows = (blk * BLOCK_M + tl.arange(0, BLOCK_M)).to(tl.int64)
        mask_m = rows < M
        mask = mask_m[:, None] & mask_n[None, :]
        x = tl.load(x_ptr + _row_offsets(rows, M_INNER, sxo, sxi)[:, None] + cols[None, :],
                    mask=mask, other=0.0).to(tl.float32)
        z = tl.load(z_ptr + _row_offsets(rows, M_INNER, szo, szi)[:, None] + cols[None, :],
                    mask=mask, other=0.0).to(tl.float32)
        dy = tl.load(dy_ptr + _row_offsets(rows, M_INNER, sdo, sdi)[:, None] + cols[None, :],
                     mask=mask, other=0.0).to(tl.float32)
        rstd = tl.load(rstd_ptr + rows * G + grp, mask=mask_m, other=0.0)
        g = _act(z, ACT)
        if NORM_BEFORE_GATE:
            n = x * rstd[:, None]
            dn = dy * g
            if NEED_W:
                dw_acc += tl.reduce(dn * n, 0, _add)
            if HAS_W:
                h = n * w[None, :]
                dn = dn * w[None, :]
            else:
                h = n
            if NEED_Z:
                dz = dy * h * _act_grad(z, ACT)
        else:
            n = x * g * rstd[:, None]
            if NEED_W:
                dw_acc += tl.reduce(dy * n, 0, _add)
            if HAS_W:
                dn = dy * w[None, :]
            else:
                dn = dy
        c = tl.reduce(dn * n, 1, _add) / N
        ds = (dn - n * c[:, None]) * rstd[:, None]
        out_offs = _row_offsets(rows, M_INNER, sgo, sgi)[:, None] + cols[None, :]
        if NORM_BEFORE_GATE:
            dx = ds
        else:
            dx = ds * g
            if NEED_Z:
                dz = ds * x * _act_grad(z, ACT)
        if NEED_X:
            tl.store(dx_ptr + out_offs, dx.to(dtype), mask=mask)
        if NEED_Z:
            tl.store(dz_ptr + out_offs, dz.to(dtype), mask=mask)
    if NEED_W:
        tl.store(dw_ptr + pid.to(tl.int64) * G * N + cols, dw_acc, mask=mask_n)


# --- launch ---------------------------------------------------------------------------------------

def _merged_stride(shape, strides) -> Optional[int]:
    """The single stride that walks these dimensions as one flattened index, or None."""
    dims = [(n, s) for n, s in zip(shape, strides) if n != 1]
    if not dims:
        return 0
    for (_, s0), (n1, s1) in zip(dims, dims[1:]):
        if s0 != s1 * n1:
            return None
    return dims[-1][1]


def row_layout(tensors: list) -> tuple[list, int, list]:
    """Express row r of every ``[..., D]`` tensor as ``(r // inner)*so + (r % inner)*si``.

    Returns ``(tensors, inner, [(so, si), ...])``; a tensor whose last stride is not 1, or whose
    leading dimensions fit no common two-level split, is copied (the only copies made here).
    """
    tensors = [t if t.stride(-1) == 1 or t.shape[-1] == 1 else t.contiguous() for t in tensors]
    lead = tuple(tensors[0].shape[:-1])
    for attempt in range(2):
        for k in range(len(lead), -1, -1):
            inner = math.prod(lead[k:])
            strides = []
            for t in tensors:
                so = _merged_stride(lead[:k], t.stride()[:k])
                si = _merged_stride(lead[k:], t.stride()[k:-1])
                if so is None or si is None:
                    break
                strides.append((so, si))
            else:
                return tensors, max(inner, 1), strides
        tensors = [t.contiguous() for t in tensors]
    raise AssertionError("contiguous tensors always have a row layout")


# Elements per program tile, forward and backward, by the swept optimum at 524288 rows on the
# H100 (benchmarks/tune_norm_bwd.py, NOTES.md run 12): the backward is 15-17% faster with 2048
# elements than with 4096 at D=128 and D=1024, while D=256 (block width 256) prefers 4096.
FWD_TILE_ELEMENTS = 4096
BWD_TILE_ELEMENTS = 2048
BWD_TILE_ELEMENTS_BY_WIDTH = {256: 4096}


def _tile(n_block: int, rows: int, target: int) -> tuple[int, int]:
    """Rows per program and warps: about ``target`` elements per tile."""
    block_m = max(1, min(target // n_block, triton.next_power_of_2(max(rows, 1))))
    warps = min(16, max(4, block_m * n_block // 1024))
    return block_m, (1 if interpreting() else warps)


def _keywords(flags: dict, block_m: int, block_n: int, warps: int) -> dict:
    keywords = dict(flags, BLOCK_M=block_m, BLOCK_N=block_n)
    if not interpreting():
        keywords["num_warps"] = warps
    return keywords


def _unchanged(before: list, after: list) -> bool:
    return all(a is b for a, b in zip(before, after))


def _forward_plan(x: Tensor, z: Tensor, weight: Optional[Tensor], y: Tensor, inner: int, strides: list,
                  eps: float, group: int, norm_before_gate: bool, act: int, weight_offset: float,
                  gate_low: bool, round_normed: bool, round_weighted: bool, round_w_eff: bool) -> LaunchPlan:
    d = x.shape[-1]
    m = x.numel() // d
    (sxo, sxi), (szo, szi), (syo, syi) = strides
    n_groups = d // group
    block_n = triton.next_power_of_2(group)
    block_m, warps = _tile(block_n, m, FWD_TILE_ELEMENTS)
    has_w = weight is not None
    scalars = (m, group, n_groups, inner, sxo, sxi, szo, szi, syo, syi,
               weight.stride(0) if has_w else 0, float(eps), float(weight_offset))
    flags = dict(HAS_W=has_w, NORM_BEFORE_GATE=norm_before_gate, ACT=act, GATE_LOW=gate_low,
                 ROUND_NORMED=round_normed, ROUND_WEIGHTED=round_weighted,
                 ROUND_W_EFF=round_w_eff and has_w)
    return LaunchPlan(rms_norm_gated_fwd_kernel, (triton.cdiv(m, block_m), n_groups), scalars,
                      _keywords(flags, block_m, block_n, warps), x.device.index)


def forward_plan(x: Tensor, z: Tensor, weight: Optional[Tensor], y: Tensor, *flags) -> Optional[LaunchPlan]:
    """The forward launch for operands shaped, strided and typed like these (at least one row),
    called as ``plan(x, z, weight or x, y, rstd)``; None when a tensor would need a copy first.
    ``flags`` are ``rms_norm_gated_forward``'s arguments after ``rstd``."""
    tensors, inner, strides = row_layout([x, z, y])
    if not _unchanged([x, z, y], tensors):
        return None
    return _forward_plan(x, z, weight, y, inner, strides, *flags)


def rms_norm_gated_forward(x: Tensor, z: Tensor, weight: Optional[Tensor], y: Tensor, rstd: Tensor,
                           eps: float, group: int, norm_before_gate: bool, act: int,
                           weight_offset: float, gate_low: bool, round_normed: bool,
                           round_weighted: bool, round_w_eff: bool) -> None:
    """Write the gated RMSNorm of ``x``, ``z`` ([..., D], unit last stride preferred) into ``y``
    (same shape) and the fp32 ``rstd`` ([..., D // group], contiguous)."""
    d = x.shape[-1]
    m = x.numel() // d if d else 0
    if m == 0:
        return
    (x, z, y), inner, strides = row_layout([x, z, y])
    plan = _forward_plan(x, z, weight, y, inner, strides, eps, group, norm_before_gate, act,
                         weight_offset, gate_low, round_normed, round_weighted, round_w_eff)
    plan(x, z, weight if weight is not None else x, y, rstd)


_WORKSPACE_BYTES = 4 << 20


def _programs(x: Tensor, row_blocks: int, n_groups: int) -> int:
    """Row programs per group.  One program per row block keeps many loads in flight (a few
    programs walking many blocks each left the D=128 backward latency-bound: 1.10 ms against
    Inductor's 0.67 at 524288 rows, benchmarks/NOTES.md); the fp32 weight-gradient workspace
    ``[programs, D]`` caps that at about 4 MB (the sweep's best against 1 and 16 MB), and never
    fewer than four waves of programs."""
    if interpreting() or not x.is_cuda:
        return min(row_blocks, 2)
    d = x.shape[-1]
    cap = max(4 * multiprocessors(x.device.index or 0) // n_groups, _WORKSPACE_BYTES // (4 * d))
    return max(1, min(row_blocks, cap))


def _backward_plan(dy: Tensor, x: Tensor, z: Tensor, weight: Optional[Tensor], out: Tensor,
                   inner: int, strides: list, need_x: bool, need_z: bool, need_weight: bool,
                   group: int, norm_before_gate: bool, act: int,
                   weight_offset: float) -> tuple[LaunchPlan, int]:
    d = x.shape[-1]
    m = x.numel() // d
    (sdo, sdi), (sxo, sxi), (szo, szi), (sgo, sgi) = strides
    n_groups = d // group
    block_n = triton.next_power_of_2(group)
    block_m, warps = _tile(block_n, m, BWD_TILE_ELEMENTS_BY_WIDTH.get(block_n, BWD_TILE_ELEMENTS))
    progs = _programs(x, triton.cdiv(m, block_m), n_groups)
    has_w = weight is not None
    scalars = (m, group, n_groups, inner, sdo, sdi, sxo, sxi, szo, szi, sgo, sgi,
               weight.stride(0) if has_w else 0, float(weight_offset))
    flags = dict(HAS_W=has_w, NORM_BEFORE_GATE=norm_before_gate, ACT=act, NEED_X=need_x,
                 NEED_Z=need_z, NEED_W=need_weight and has_w)
    plan = LaunchPlan(rms_norm_gated_bwd_kernel, (progs, n_groups), scalars,
                      _keywords(flags, block_m, block_n, warps), x.device.index)
    return plan, progs


def backward_plan(dy: Tensor, x: Tensor, z: Tensor, weight: Optional[Tensor], out: Tensor,
                  *flags) -> Optional[tuple[LaunchPlan, int]]:
    """The backward launch for operands like these (at least one row; ``out`` is x-shaped and
    contiguous, the layout of dx and dz), and its program count, the rows of the fp32 weight
    gradient workspace.  Called as ``plan(dy, x, z, weight or x, rstd, dx or out, dz or out,
    workspace or rstd)``; None when a tensor would need a copy first.  ``flags`` are
    ``need_x, need_z, need_weight, group, norm_before_gate, act, weight_offset``."""
    tensors, inner, strides = row_layout([dy, x, z, out])
    if not _unchanged([dy, x, z, out], tensors):
        return None
    return _backward_plan(dy, x, z, weight, out, inner, strides, *flags)


def rms_norm_gated_backward(dy: Tensor, x: Tensor, z: Tensor, weight: Optional[Tensor], rstd: Tensor,
                            dx: Optional[Tensor], dz: Optional[Tensor], need_weight: bool,
                            group: int, norm_before_gate: bool, act: int,
                            weight_offset: float) -> Optional[Tensor]:
    """Write dx and dz (contiguous, x's shape; None = not needed) and return the fp32 weight
    gradient ``[D]`` when ``need_weight``."""
    d = x.shape[-1]
    m = x.numel() // d if d else 0
    has_w = weight is not None
    need_weight = need_weight and has_w
    if m == 0:
        return x.new_zeros((d,), dtype=torch.float32) if need_weight else None
    out = dx if dx is not None else (dz if dz is not None else torch.empty_like(x))
    (dy, x, z, out), inner, strides = row_layout([dy, x, z, out])
    plan, progs = _backward_plan(dy, x, z, weight, out, inner, strides, dx is not None, dz is not None,
                                 need_weight, group, norm_before_gate, act, weight_offset)
    ws = torch.empty((progs, d), device=x.device, dtype=torch.float32) if need_weight else rstd
    plan(dy, x, z, weight if has_w else x, rstd, dx if dx is not None else out,
         dz if dz is not None else out, ws)
    return ws.sum(0) if need_weight else None
