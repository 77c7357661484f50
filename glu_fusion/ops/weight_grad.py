"""Weight-gradient GEMMs ``dW = dHᵀ·x`` (and ``db = Σₘ dH``) of the backward formulas: our
persistent TMA kernel where it was measured at least as fast as cuBLAS, cuBLAS elsewhere.

H200, bf16 (benchmarks/NOTES.md, "GEMM kernels"): at 16384 tokens and output tiles that fill
the GPU many times over, the kernel ran at 1.00-1.03x cuBLAS's speed; at 4096 tokens, or with
fewer output tiles than two waves, cuBLAS was faster, so it keeps those shapes.
"""
from __future__ import annotations

from typing import Optional

from torch import Tensor

from .dispatch import allow_tf32, use_kernels

#: Our kernel takes shapes with at least this many tokens and output tiles for two waves.
MIN_TOKENS = 16384
#: The benchmarks turn our kernel off to compare.
ENABLED = True


def _ours_serves(dh: Tensor, x: Tensor) -> bool:
    if not (ENABLED and dh.is_cuda and use_kernels(dh)) or dh.shape[0] < MIN_TOKENS:
        return False
    from ..kernels import tma_eligible
    from ..kernels._launch import multiprocessors
    r, k = dh.shape[1], x.shape[1]
    tiles = (r // 128) * (k // 256)
    return tiles >= 2 * multiprocessors(dh.device.index) and tma_eligible(dh, x)


def weight_grad(dh: Tensor, x2d: Tensor, want_bias: bool) -> tuple[Tensor, Optional[Tensor]]:
    """``(dHᵀ·x, Σₘ dH or None)`` for ``dh`` [M, R] and ``x2d`` [M, K]."""
    if _ours_serves(dh, x2d):
        from ..kernels.weight_grad_tma import weight_grad as launch
        dw = dh.new_empty((dh.shape[1], x2d.shape[1]))
        db = dh.new_empty((dh.shape[1],)) if want_bias else None
        launch(dh, x2d, dw, db, allow_tf32())
        return dw, db
    return dh.t() @ x2d, (dh.sum(0) if want_bias else None)

