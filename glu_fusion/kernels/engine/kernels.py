"""The engine's entry points, one per epilogue: each allocates its epilogue's buffers in shared
memory and runs the one main loop (``mainloop.run``) with that epilogue.

Tile sizes come from the descriptors' block shapes: A's block is one consumer's rows (a whole
tile in ping-pong), B's block one column tile, an output's block one stored piece.
"""
from triton.experimental import gluon
from triton.experimental.gluon import language as gl
from triton.experimental.gluon.language.nvidia.hopper import mbarrier

from . import epilogues
from .mainloop import CONSUMERS, run


@gluon.jit
def _staging(desc, COUNT: gl.constexpr):
    return gl.allocate_shared_memory(desc.dtype, [COUNT, desc.block_type.shape[0], desc.block_type.shape[1]],
                                     desc.layout)


@gluon.jit
def gemm_kernel(a_desc, b_desc, c_desc, bias_ptr, bias_stride, M, N, K, splits,
                HAS_BIAS: gl.constexpr, A_KMAJOR: gl.constexpr, B_KMAJOR: gl.constexpr,
                PINGPONG: gl.constexpr, STAGES: gl.constexpr, STORE_BUFS: gl.constexpr,
                GROUP_M: gl.constexpr, CONSUMER_REGS: gl.constexpr):
    """``C = A·B (+ bias)``; with ``splits`` > 1, each split's fp32 partial into its slice of a
    stacked ``C`` (``splits`` row blocks of ``cdiv(M, BM)·BM`` rows), which ``reduce`` sums."""
    staging = _staging(c_desc, CONSUMERS * STORE_BUFS)
    run(a_desc, b_desc, b_desc, M, N, K, splits, (c_desc, staging, bias_ptr, bias_stride, gl.constexpr(HAS_BIAS)), 1, A_KMAJOR, B_KMAJOR, PINGPONG, STAGES, GROUP_M,
        gl.constexpr(epilogues.no_begin), gl.constexpr(epilogues.plain_end), CONSUMER_REGS)


@gluon.jit
def swiglu_kernel(a_desc, bg_desc, bu_desc, h_desc, g_desc, u_desc, bg_ptr, bu_ptr, bg_stride, bu_stride,
                  M, N, K, HAS_BIAS: gl.constexpr, SAVE_PREACT: gl.constexpr, B_KMAJOR: gl.constexpr,
                  PINGPONG: gl.constexpr, STAGES: gl.constexpr, STORE_BUFS: gl.constexpr,
                  GROUP_M: gl.constexpr, CONSUMER_REGS: gl.constexpr):
    """``h = silu(x·Wgᵀ + bg)·(x·Wuᵀ + bu)``, and ``g``, ``u`` when ``SAVE_PREACT``."""
    staging = _staging(h_desc, CONSUMERS * STORE_BUFS)
    run(a_desc, bg_desc, bu_desc, M, N, K, 1, (h_desc, g_desc, u_desc, staging, bg_ptr, bu_ptr, bg_stride, bu_stride,
                                            gl.constexpr(HAS_BIAS), gl.constexpr(SAVE_PREACT)), 2, True, B_KMAJOR, PINGPONG, STAGES, GROUP_M,
        gl.constexpr(epilogues.no_begin), gl.constexpr(epilogues.swiglu_end), CONSUMER_REGS)


@gluon.jit
def dgated_kernel(a_desc, b_desc, g_desc, u_desc, dg_desc, du_desc, h_desc, M, N, K, B_KMAJOR: gl.constexpr, STAGES: gl.constexpr,
                  GROUP_M: gl.constexpr, CONSUMER_REGS: gl.constexpr):
    """``dh = dOut·Wd`` with the SwiGLU backward in the epilogue (cooperative schedule: its
    three staging tiles per consumer leave no room for ping-pong's second ring)."""
    bars = gl.allocate_shared_memory(gl.int64, [CONSUMERS, 1], mbarrier.MBarrierLayout())
    for i in gl.static_range(CONSUMERS):
        mbarrier.init(bars.index(i), count=1)
    staging = _staging(g_desc, CONSUMERS * 3)
    run(a_desc, b_desc, b_desc, M, N, K, 1, (g_desc, u_desc, dg_desc, du_desc, h_desc, staging, bars), 1, True, B_KMAJOR, False, STAGES, GROUP_M,
        gl.constexpr(epilogues.dgated_begin), gl.constexpr(epilogues.dgated_end), CONSUMER_REGS)
