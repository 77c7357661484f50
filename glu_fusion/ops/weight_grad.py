"""Weight-gradient GEMMs ``dW = dHᵀ·x`` (and ``db = Σₘ dH``) of the backward formulas: cuBLAS by
default, our persistent TMA kernel (``kernels.weight_grad_tma``) where it is switched on.

H200, bf16 (benchmarks/NOTES.md, "GEMM kernels"): at 16384 tokens and output tiles that fill
the GPU many times over, the kernel ran at 0.96-1.03x cuBLAS's speed over two runs; at 4096
tokens, or with fewer output tiles than two waves, 0.5-0.85x.  It is not measured at least as
fast anywhere, so cuBLAS stays the default (``ENABLED``).  The kernel runs inside the op
``glu_fusion::weight_grad``, because the autograd formulas that call this are traced with fake
tensors.
"""
from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor

from .autocast import register_autocast_passthrough
from .dispatch import allow_tf32, register_cuda_fast_path, use_gemm_kernels
from .graph_twins import register_graph_twins

#: Our kernel takes shapes with at least this many tokens and output tiles for two waves.
MIN_TOKENS = 16384
#: Off by default (measured no faster than cuBLAS); the benchmarks switch it on to compare.
ENABLED = False


def _ours_serves(dh: Tensor, x: Tensor) -> bool:
    if not (dh.is_cuda and use_gemm_kernels(dh)):
        return False
    from ..kernels import tma_eligible
    from ..kernels._launch import multiprocessors
    tiles = (dh.shape[1] // 128) * (x.shape[1] // 256)
    return tiles >= 2 * multiprocessors(dh.device.index) and tma_eligible(dh, x)


@torch.library.custom_op("glu_fusion::weight_grad", mutates_args=())
def weight_grad_op(dh: Tensor, x2d: Tensor, want_bias: bool) -> tuple[Tensor, Tensor]:
    """``(dHᵀ·x, Σₘ dH)`` (an empty bias grad unless ``want_bias``) through our kernel where it
    serves, cuBLAS otherwise."""
    if _ours_serves(dh, x2d):
        from ..kernels.weight_grad_tma import weight_grad as launch
        dw = dh.new_empty((dh.shape[1], x2d.shape[1]))
        db = dh.new_empty((dh.shape[1],)) if want_bias else None
        launch(dh, x2d, dw, db, allow_tf32())
        return dw, db if want_bias else dh.new_empty((0,))
    return dh.t() @ x2d, dh.sum(0) if want_bias else dh.new_empty((0,))


@weight_grad_op.register_fake
def _(dh, x2d, want_bias):
    return dh.new_empty((dh.shape[1], x2d.shape[1])), dh.new_empty((dh.shape[1] if want_bias else 0,))


def weight_grad(dh: Tensor, x2d: Tensor, want_bias: bool) -> tuple[Tensor, Optional[Tensor]]:
    """``(dHᵀ·x, Σₘ dH or None)`` for ``dh`` [M, R] and ``x2d`` [M, K], as plain torch ops unless
    our kernel is switched on and the token count (known when traced) is large enough."""
    m = dh.shape[0]
    if ENABLED and isinstance(m, int) and m >= MIN_TOKENS:
        dw, db = torch.ops.glu_fusion.weight_grad(dh, x2d, want_bias)
        return dw, db if want_bias else None
    return dh.t() @ x2d, (dh.sum(0) if want_bias else None)


register_autocast_passthrough("weight_grad")
register_cuda_fast_path(weight_grad_op)
register_graph_twins(weight_grad_op)
