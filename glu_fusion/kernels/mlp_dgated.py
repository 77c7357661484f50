"""MLP-block backward for Hopper: the down projection's input-grad GEMM with the SwiGLU backward
in its epilogue.

For ``out = down(silu(g) · u)`` the gradient of ``h = silu(g)·u`` is ``dh = dOut·Wd`` ([M, N]).
This kernel computes ``dh`` tile by tile in registers and, in the same program, reads the saved
``g``, ``u`` tiles and writes::

    dG = dh · u · σ(g) · (1 + g·(1 − σ(g)))      dU = dh · g · σ(g)      (and optionally h)

so ``dh`` never touches memory and the elementwise pass after the GEMM disappears.  ``dh`` is
rounded to the input dtype before the gate's backward, as the unfused graph rounds the GEMM
output; ``h`` is recomputed exactly as the forward's gate computed it, for ``dWd = dOutᵀ·h``.
``dG``/``dU`` may be the very tensors ``g``/``u`` (each tile reads its elements before writing
them), so the gradient can take the pre-activations' memory.

Persistent grid, operands through device-built TMA descriptors (``swiglu_fwd_tma``'s
conventions); callers check ``tma_eligible`` and take the unfused route otherwise.
"""
from __future__ import annotations

from typing import Callable, Optional

import triton
import triton.language as tl
from torch import Tensor

from ._launch import LaunchPlan, interpreting, precision
from .swiglu_fwd import _swizzle
from .swiglu_fwd_tma import _num_programs, with_tma_scratch


@triton.jit
def _dgated_epilogue(dh_acc, g_desc, u_desc, dg_desc, du_desc, h_desc, off_m, off_n,
                     WRITE_H: tl.constexpr, dtype: tl.constexpr):
    """One [BLOCK_M, width] slice of the epilogue: read g, u; write dG, dU (and h)."""
    dh = dh_acc.to(dtype).to(tl.float32)
    gf = g_desc.load([off_m, off_n]).to(tl.float32)
    uf = u_desc.load([off_m, off_n]).to(tl.float32)
    sig = tl.sigmoid(gf)
    silu = gf * sig
    dg_desc.store([off_m, off_n], (dh * uf * sig * (1.0 + gf * (1.0 - sig))).to(dtype))
    du_desc.store([off_m, off_n], (dh * silu).to(dtype))
    if WRITE_H:
        h_desc.store([off_m, off_n], (silu * uf).to(dtype))


@triton.jit
def mlp_dgated_kernel(
    dout_ptr, wd_ptr, g_ptr, u_ptr, dg_ptr, du_ptr, h_ptr,
    M, N, D, stride_dm, stride_wd, stride_g, stride_u, stride_dg, stride_du, stride_h,
    WRITE_H: tl.constexpr, PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, GROUP_M: tl.constexpr,
    NUM_PROGRAMS: tl.constexpr, SUBTILES: tl.constexpr, FLATTEN: tl.constexpr,
    W_TRANSPOSED: tl.constexpr,
):
    # SUBTILES: the epilogue runs over the accumulator in 1, 2 or 4 column slices, so the fp32
    # temporaries of the gate's backward stay in registers next to the accumulator.
    # W_TRANSPOSED: ``wd_ptr`` holds Wdᵀ [N, D] (K-major B tiles) instead of Wd [D, N].
    SUB_N: tl.constexpr = BLOCK_N // SUBTILES
    dout_desc = tl.make_tensor_descriptor(dout_ptr, [M, D], [stride_dm, 1], [BLOCK_M, BLOCK_K])
    if W_TRANSPOSED:
        wd_desc = tl.make_tensor_descriptor(wd_ptr, [N, D], [stride_wd, 1], [BLOCK_N, BLOCK_K])
    else:
        wd_desc = tl.make_tensor_descriptor(wd_ptr, [D, N], [stride_wd, 1], [BLOCK_K, BLOCK_N])
    g_desc = tl.make_tensor_descriptor(g_ptr, [M, N], [stride_g, 1], [BLOCK_M, SUB_N])
    u_desc = tl.make_tensor_descriptor(u_ptr, [M, N], [stride_u, 1], [BLOCK_M, SUB_N])
    dg_desc = tl.make_tensor_descriptor(dg_ptr, [M, N], [stride_dg, 1], [BLOCK_M, SUB_N])
    du_desc = tl.make_tensor_descriptor(du_ptr, [M, N], [stride_du, 1], [BLOCK_M, SUB_N])
    h_desc = tl.make_tensor_descriptor(h_ptr, [M, N], [stride_h, 1], [BLOCK_M, SUB_N])
    dtype = dg_ptr.dtype.element_ty
    num_m = tl.cdiv(M, BLOCK_M)
    num_n = tl.cdiv(N, BLOCK_N)
    k_tiles = tl.cdiv(D, BLOCK_K)
    for tile in tl.range(tl.program_id(0), num_m * num_n, NUM_PROGRAMS, flatten=FLATTEN):
        pid_m, pid_n = _swizzle(tile, num_m, num_n, GROUP_M)
        off_m = pid_m * BLOCK_M
        off_n = pid_n * BLOCK_N
        acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
        for ki in range(k_tiles):
            off_k = ki * BLOCK_K
            a = dout_desc.load([off_m, off_k])
            if W_TRANSPOSED:
                acc = tl.dot(a, wd_desc.load([off_n, off_k]).T, acc, input_precision=PRECISION)
            else:
                acc = tl.dot(a, wd_desc.load([off_k, off_n]), acc, input_precision=PRECISION)
        if SUBTILES == 1:
            _dgated_epilogue(acc, g_desc, u_desc, dg_desc, du_desc, h_desc, off_m, off_n, WRITE_H, dtype)
        elif SUBTILES == 2:
            acc = tl.permute(tl.reshape(acc, (BLOCK_M, 2, SUB_N)), (0, 2, 1))
            acc0, acc1 = tl.split(acc)
            _dgated_epilogue(acc0, g_desc, u_desc, dg_desc, du_desc, h_desc, off_m, off_n, WRITE_H, dtype)
            _dgated_epilogue(acc1, g_desc, u_desc, dg_desc, du_desc, h_desc, off_m, off_n + SUB_N,
                             WRITE_H, dtype)
        else:
            acc = tl.permute(tl.reshape(acc, (BLOCK_M, 2, 2, SUB_N)), (0, 3, 2, 1))
            first_half, second_half = tl.split(acc)
            acc0, acc1 = tl.split(first_half)
            acc2, acc3 = tl.split(second_half)
            _dgated_epilogue(acc0, g_desc, u_desc, dg_desc, du_desc, h_desc, off_m, off_n, WRITE_H, dtype)
            _dgated_epilogue(acc1, g_desc, u_desc, dg_desc, du_desc, h_desc, off_m, off_n + SUB_N,
                             WRITE_H, dtype)
            _dgated_epilogue(acc2, g_desc, u_desc, dg_desc, du_desc, h_desc, off_m, off_n + 2 * SUB_N,
                             WRITE_H, dtype)
            _dgated_epilogue(acc3, g_desc, u_desc, dg_desc, du_desc, h_desc, off_m, off_n + 3 * SUB_N,
                             WRITE_H, dtype)


# Tiles: 128x128 output tiles, 64-wide K steps, 3 stages (the forward TMA kernel's table,
# measured there); the epilogue's two extra input tiles fit beside the pipeline's buffers.
_COMMON = dict(GROUP_M=8, SUBTILES=2, FLATTEN=False)
_GPU_META = dict(BLOCK_M=128, BLOCK_N=128, BLOCK_K=64, num_stages=3, num_warps=8, **_COMMON)
_GPU_META_FP32 = dict(BLOCK_M=128, BLOCK_N=64, BLOCK_K=32, num_stages=3, num_warps=8, **_COMMON)
_INTERPRETER_META = dict(BLOCK_M=16, BLOCK_N=16, BLOCK_K=16, GROUP_M=4, SUBTILES=2, FLATTEN=False)


def dgated_plan(dout: Tensor, w_down: Tensor, g: Tensor, u: Tensor, d_g: Tensor, d_u: Tensor,
                h: Optional[Tensor], allow_tf32: bool,
                meta: Optional[dict] = None) -> Callable[..., None]:
    """The launch for operands shaped, strided and typed like these; call it with
    ``(dout, w_down, g, u, d_g, d_u, h_or_d_g)``.  ``meta`` overrides the tile table."""
    m, d = dout.shape
    if meta is None:
        if interpreting():
            meta = _INTERPRETER_META
        else:
            meta = _GPU_META_FP32 if dout.element_size() == 4 else _GPU_META
    meta = {"W_TRANSPOSED": False, **meta}
    n = w_down.shape[0] if meta["W_TRANSPOSED"] else w_down.shape[1]
    h_or = h if h is not None else d_g
    tiles = triton.cdiv(m, meta["BLOCK_M"]) * triton.cdiv(n, meta["BLOCK_N"])
    programs = _num_programs(tiles)
    scalars = (m, n, d, dout.stride(0), w_down.stride(0), g.stride(0), u.stride(0),
               d_g.stride(0), d_u.stride(0), h_or.stride(0))
    keywords = dict(WRITE_H=h is not None, PRECISION=precision(allow_tf32), NUM_PROGRAMS=programs, **meta)
    plan = LaunchPlan(mlp_dgated_kernel, (programs,), scalars, keywords, dout.device.index)
    return with_tma_scratch(plan)


def mlp_dgated(dout: Tensor, w_down: Tensor, g: Tensor, u: Tensor, d_g: Tensor, d_u: Tensor,
               h: Optional[Tensor], allow_tf32: bool, meta: Optional[dict] = None) -> None:
    """``d_g, d_u (, h) <- dgated(dout·w_down, g, u)``; all 2-D, ``tma_eligible`` checked by the
    caller.  ``dout`` [M, D], ``w_down`` [D, N] (or Wdᵀ [N, D] with ``W_TRANSPOSED`` in ``meta``),
    the rest [M, N] (``d_g``/``d_u`` may alias ``g``/``u``)."""
    if dout.shape[0] == 0 or g.shape[1] == 0:
        return
    launch = dgated_plan(dout, w_down, g, u, d_g, d_u, h, allow_tf32, meta)
    launch(dout, w_down, g, u, d_g, d_u, h if h is not None else d_g)
