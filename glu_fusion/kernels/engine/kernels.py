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

#: The work list of a dense problem: one group, no B offset (``mainloop.run``'s ``work``).
DENSE = gl.constexpr((0, 0, 1, 0))


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
        gl.constexpr(epilogues.no_begin), gl.constexpr(epilogues.plain_end), CONSUMER_REGS, DENSE, False, 1)


@gluon.jit
def swiglu_kernel(a_desc, bg_desc, bu_desc, h_desc, g_desc, u_desc, bg_ptr, bu_ptr, bg_stride, bu_stride,
                  M, N, K, HAS_BIAS: gl.constexpr, SAVE_PREACT: gl.constexpr, B_KMAJOR: gl.constexpr,
                  PINGPONG: gl.constexpr, STAGES: gl.constexpr, STORE_BUFS: gl.constexpr,
                  GROUP_M: gl.constexpr, CONSUMER_REGS: gl.constexpr):
    """``h = silu(x·Wgᵀ + bg)·(x·Wuᵀ + bu)``, and ``g``, ``u`` when ``SAVE_PREACT``."""
    staging = _staging(h_desc, CONSUMERS * STORE_BUFS)
    run(a_desc, bg_desc, bu_desc, M, N, K, 1, (h_desc, g_desc, u_desc, staging, bg_ptr, bu_ptr, bg_stride, bu_stride,
                                            gl.constexpr(HAS_BIAS), gl.constexpr(SAVE_PREACT), gl.constexpr(0), 0.0, 0.0,
                                            gl.constexpr(False), (0, 0, 0), (0, 0), 0, 1), 2, True, B_KMAJOR, PINGPONG,
        STAGES, GROUP_M, gl.constexpr(epilogues.no_begin), gl.constexpr(epilogues.swiglu_end), CONSUMER_REGS, DENSE,
        False, 1)


@gluon.jit
def grouped_swiglu_kernel(a_desc, bg_desc, bu_desc, h_desc, g_desc, u_desc, h_ptr, g_ptr, u_ptr, h_stride, pre_stride,
                          bg_ptr, bu_ptr, bg_stride, bu_stride, bias_expert_stride, ends_ptr, tile_cum_ptr, groups,
                          b_group_rows, alpha, limit, T, N, K, HAS_BIAS: gl.constexpr, SAVE_PREACT: gl.constexpr,
                          ACT: gl.constexpr, B_KMAJOR: gl.constexpr, STAGES: gl.constexpr, STORE_BUFS: gl.constexpr,
                          GROUP_M: gl.constexpr, GROUP_POW2: gl.constexpr, CONSUMER_REGS: gl.constexpr):
    """The expert SwiGLU forward: rows of x sorted by expert, ``groups`` = experts + the padded
    tail (work list of ``portable.grouped_gemm.work_list``), each expert's gate and up weights
    ``b_group_rows`` rows of the B descriptors apart."""
    staging = _staging(h_desc, CONSUMERS * STORE_BUFS)
    run(a_desc, bg_desc, bu_desc, T, N, K, 1, (h_desc, g_desc, u_desc, staging, bg_ptr, bu_ptr, bg_stride, bu_stride,
                                            gl.constexpr(HAS_BIAS), gl.constexpr(SAVE_PREACT), gl.constexpr(ACT), alpha,
                                            limit, gl.constexpr(True), (h_ptr, g_ptr, u_ptr), (h_stride, pre_stride),
                                            bias_expert_stride, groups - 1), 2, True, B_KMAJOR, False,
        STAGES, GROUP_M, gl.constexpr(epilogues.no_begin), gl.constexpr(epilogues.swiglu_end), CONSUMER_REGS,
        (ends_ptr, tile_cum_ptr, groups, b_group_rows), True, GROUP_POW2)


@gluon.jit
def grouped_gemm_kernel(a_desc, b_desc, c_desc, c_ptr, c_stride, bias_ptr, bias_stride, bias_expert_stride, dest_ptr,
                        scale_ptr, ends_ptr, tile_cum_ptr, groups, b_group_rows, T, N, K, HAS_BIAS: gl.constexpr,
                        SCATTER: gl.constexpr, HAS_SCALE: gl.constexpr, B_KMAJOR: gl.constexpr,
                        STAGES: gl.constexpr, STORE_BUFS: gl.constexpr, GROUP_M: gl.constexpr,
                        GROUP_POW2: gl.constexpr, CONSUMER_REGS: gl.constexpr):
    """Each expert's rows times its weight (+ its bias): rows of A sorted by expert, the work
    list of ``portable.grouped_gemm.work_list``, each expert's weight ``b_group_rows`` rows of
    the B descriptor apart; with ``SCATTER`` each output row goes to row ``dest[r]`` of C,
    scaled by ``scale[r]`` when ``HAS_SCALE``."""
    staging = _staging(c_desc, CONSUMERS * STORE_BUFS)
    run(a_desc, b_desc, b_desc, T, N, K, 1, (c_desc, staging, c_ptr, c_stride, bias_ptr, bias_stride,
                                          bias_expert_stride, groups - 1, gl.constexpr(HAS_BIAS),
                                          gl.constexpr(SCATTER), gl.constexpr(HAS_SCALE), dest_ptr, scale_ptr),
        1, True, B_KMAJOR, False, STAGES, GROUP_M, gl.constexpr(epilogues.no_begin),
        gl.constexpr(epilogues.grouped_end), CONSUMER_REGS, (ends_ptr, tile_cum_ptr, groups, b_group_rows), True,
        GROUP_POW2)


@gluon.jit
def dgated_kernel(a_desc, b_desc, g_desc, u_desc, dg_desc, du_desc, h_desc, M, N, K, B_KMAJOR: gl.constexpr, STAGES: gl.constexpr,
                  GROUP_M: gl.constexpr, CONSUMER_REGS: gl.constexpr):
    """``dh = dOut·Wd`` with the SwiGLU backward in the epilogue (cooperative schedule: the
    prefetched g and u tiles per consumer leave no room for ping-pong's second ring).  g and u
    arrive as whole tiles; the outputs leave in pieces of their block's width."""
    bars = gl.allocate_shared_memory(gl.int64, [CONSUMERS, 1], mbarrier.MBarrierLayout())
    for i in gl.static_range(CONSUMERS):
        mbarrier.init(bars.index(i), count=1)
    gu_bufs = _staging(g_desc, CONSUMERS * 2)
    spares = _staging(du_desc, CONSUMERS)
    run(a_desc, b_desc, b_desc, M, N, K, 1, (g_desc, u_desc, dg_desc, du_desc, h_desc, gu_bufs, spares, bars), 1, True,
        B_KMAJOR, False, STAGES, GROUP_M, gl.constexpr(epilogues.dgated_begin), gl.constexpr(epilogues.dgated_end),
        CONSUMER_REGS, DENSE, False, 1)
