"""SwiGLU forward for Hopper: TMA tensor descriptors and a persistent grid.

Same contract as ``swiglu_fwd.swiglu_forward``.  Each of ``NUM_PROGRAMS`` programs (one per
multiprocessor) walks output tiles in grouped order; operand tiles arrive through the copy
engine (tensor descriptors the kernel builds), which also zero-fills ragged edges and clips
ragged stores, so the main loop carries no masks.  Usable only when every tensor is
TMA-addressable (unit last stride, 16-byte aligned base and row strides); ``tma_eligible`` says
so, callers fall back to the pointer kernel otherwise.
"""
from __future__ import annotations

from typing import Callable, Optional

import torch
import triton
import triton.language as tl
from torch import Tensor
from triton.runtime._allocation import _allocator

from .._launch import LaunchPlan, interpreting, multiprocessors, precision
from .swiglu_fwd import _swizzle, forward_operands


@triton.jit
def swiglu_fwd_tma_kernel(
    x_ptr, wg_ptr, wu_ptr, out_ptr, pre_ptr, bg_ptr, bu_ptr,
    M, N, K, stride_xm, stride_wg, stride_wu, stride_om, stride_pm, stride_bg, stride_bu,
    HAS_BIAS: tl.constexpr, SAVE_PREACT: tl.constexpr, PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, GROUP_M: tl.constexpr,
    NUM_PROGRAMS: tl.constexpr, FLATTEN: tl.constexpr, WARP_SPECIALIZE: tl.constexpr,
):
    # Descriptors built on the device, once per program: the launch passes plain pointers, so
    # it goes through the cached binary like every other kernel of ours (no per-call encoding
    # of six descriptors on the host: benchmarks/NOTES.md, runs 21-22).
    x_desc = tl.make_tensor_descriptor(x_ptr, [M, K], [stride_xm, 1], [BLOCK_M, BLOCK_K])
    wg_desc = tl.make_tensor_descriptor(wg_ptr, [N, K], [stride_wg, 1], [BLOCK_N, BLOCK_K])
    wu_desc = tl.make_tensor_descriptor(wu_ptr, [N, K], [stride_wu, 1], [BLOCK_N, BLOCK_K])
    out_desc = tl.make_tensor_descriptor(out_ptr, [M, N], [stride_om, 1], [BLOCK_M, BLOCK_N])
    if SAVE_PREACT:
        g_desc = tl.make_tensor_descriptor(pre_ptr, [M, N], [stride_pm, 1], [BLOCK_M, BLOCK_N])
        u_desc = tl.make_tensor_descriptor(pre_ptr + N, [M, N], [stride_pm, 1], [BLOCK_M, BLOCK_N])
    dtype = out_ptr.dtype.element_ty
    num_m = tl.cdiv(M, BLOCK_M)
    num_n = tl.cdiv(N, BLOCK_N)
    k_tiles = tl.cdiv(K, BLOCK_K)
    for tile in tl.range(tl.program_id(0), num_m * num_n, NUM_PROGRAMS, flatten=FLATTEN,
                         warp_specialize=WARP_SPECIALIZE):
        pid_m, pid_n = _swizzle(tile, num_m, num_n, GROUP_M)
        off_m = pid_m * BLOCK_M
        off_n = pid_n * BLOCK_N
        acc_g = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
        acc_u = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
        for ki in range(k_tiles):
            off_k = ki * BLOCK_K
            a = x_desc.load([off_m, off_k])
            b_g = wg_desc.load([off_n, off_k])
            b_u = wu_desc.load([off_n, off_k])
            acc_g = tl.dot(a, b_g.T, acc_g, input_precision=PRECISION)
            acc_u = tl.dot(a, b_u.T, acc_u, input_precision=PRECISION)
        if HAS_BIAS:
            cols = off_n + tl.arange(0, BLOCK_N)
            mask_n = cols < N
            acc_g += tl.load(bg_ptr + cols * stride_bg, mask=mask_n, other=0.0).to(tl.float32)[None, :]
            acc_u += tl.load(bu_ptr + cols * stride_bu, mask=mask_n, other=0.0).to(tl.float32)[None, :]
        g = acc_g.to(dtype)
        u = acc_u.to(dtype)
        gf = g.to(tl.float32)
        out_desc.store([off_m, off_n], (gf * tl.sigmoid(gf) * u.to(tl.float32)).to(dtype))
        if SAVE_PREACT:
            g_desc.store([off_m, off_n], g)
            u_desc.store([off_m, off_n], u)


def _addressable(t: Tensor) -> bool:
    size = t.element_size()
    return (t.dim() == 2 and t.stride(1) == 1 and t.data_ptr() % 16 == 0
            and (t.stride(0) * size) % 16 == 0)


def tma_eligible(*tensors: Optional[Tensor]) -> bool:
    """Whether the copy engine can address every given 2-D tensor (None entries are skipped)."""
    if not interpreting():
        if not torch.cuda.is_available() or torch.cuda.get_device_capability()[0] < 9:
            return False
    return all(_addressable(t) for t in tensors if t is not None)


_COMMON = dict(GROUP_M=8, FLATTEN=False, WARP_SPECIALIZE=False)
_GPU_META = {
    # 3 stages measured 5% faster than 4 at 4096→14336, M=16384 (benchmarks/NOTES.md).
    torch.bfloat16: dict(BLOCK_M=128, BLOCK_N=128, BLOCK_K=64, num_stages=3, num_warps=8, **_COMMON),
    torch.float16: dict(BLOCK_M=128, BLOCK_N=128, BLOCK_K=64, num_stages=3, num_warps=8, **_COMMON),
    torch.float32: dict(BLOCK_M=128, BLOCK_N=64, BLOCK_K=32, num_stages=3, num_warps=8, **_COMMON),
}
_INTERPRETER_META = dict(BLOCK_M=16, BLOCK_N=16, BLOCK_K=16, GROUP_M=4, FLATTEN=False, WARP_SPECIALIZE=False)


def _num_programs(tiles: int) -> int:
    if interpreting():
        return min(tiles, 3)
    sms = multiprocessors(torch.cuda.current_device())
    return min(tiles, sms)


def _scratch(size: int, alignment: int, stream) -> Tensor:
    """Global memory for the descriptors the kernel builds on the device (Triton asks per launch)."""
    return torch.empty(size, device="cuda", dtype=torch.int8)


def _interpreter_scratch(size: int, alignment: int, stream) -> Tensor:
    return torch.empty(size, dtype=torch.int8)


def tma_forward_plan(x: Tensor, w_gate: Tensor, w_up: Tensor, b_gate: Optional[Tensor],
                     b_up: Optional[Tensor], out: Tensor, preact: Optional[Tensor], allow_tf32: bool,
                     meta: Optional[dict] = None) -> Callable[..., None]:
    """The launch for operands shaped, strided and typed like these; call it with
    ``forward_operands(...)``.  ``meta`` overrides the tile table (the tuning script uses it)."""
    m, k = x.shape
    n = w_gate.shape[0]
    if meta is None:
        meta = _INTERPRETER_META if interpreting() else _GPU_META[x.dtype]
    meta = dict(meta)
    x, w_gate, w_up, bg, bu, out, pre = forward_operands(x, w_gate, w_up, b_gate, b_up, out, preact)
    tiles = triton.cdiv(m, meta["BLOCK_M"]) * triton.cdiv(n, meta["BLOCK_N"])
    programs = _num_programs(tiles)
    scalars = (m, n, k, x.stride(0), w_gate.stride(0), w_up.stride(0), out.stride(0), pre.stride(0),
               bg.stride(0), bu.stride(0))
    keywords = dict(HAS_BIAS=b_gate is not None, SAVE_PREACT=preact is not None,
                    PRECISION=precision(allow_tf32), NUM_PROGRAMS=programs, **meta)
    plan = with_tma_scratch(LaunchPlan(swiglu_fwd_tma_kernel, (programs,), scalars, keywords,
                                       x.device.index))

    def launch(x, w_gate, w_up, bg, bu, out, pre) -> None:
        plan(x, w_gate, w_up, out, pre, bg, bu)
    return launch


def with_tma_scratch(plan: LaunchPlan) -> Callable[..., None]:
    """Wrap a launch of a kernel that builds tensor descriptors on the device: Triton asks its
    allocator for their global scratch, and reads the allocator from a per-thread context
    variable (autograd runs other threads), so set ours for this launch and restore whatever
    the caller had set afterwards."""
    scratch = _interpreter_scratch if interpreting() else _scratch

    def launch(*tensors) -> None:
        token = _allocator.set(scratch)
        try:
            plan(*tensors)
        finally:
            _allocator.reset(token)
    return launch


def swiglu_forward_tma(x: Tensor, w_gate: Tensor, w_up: Tensor, b_gate: Optional[Tensor],
                       b_up: Optional[Tensor], out: Tensor, preact: Optional[Tensor],
                       allow_tf32: bool, meta: Optional[dict] = None) -> None:
    """Like ``swiglu_forward``; the caller has checked ``tma_eligible`` on every operand.
    ``meta`` overrides the tile table (the tuning script uses it)."""
    launch = tma_forward_plan(x, w_gate, w_up, b_gate, b_up, out, preact, allow_tf32, meta)
    launch(*forward_operands(x, w_gate, w_up, b_gate, b_up, out, preact))
