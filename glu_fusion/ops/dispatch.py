"""Which implementation serves a call, the argument checks every op shares, and the CUDA fast path."""
from __future__ import annotations

from typing import Optional, Sequence

import torch
from torch import Tensor

from .libraries import new_library

KERNEL_DTYPES = (torch.float32, torch.float16, torch.bfloat16)
SUPPORTED_DTYPES = KERNEL_DTYPES + (torch.float64,)


def interpreter_active() -> bool:
    """Whether Triton runs kernels on the CPU (its interpreter); the kernels own that test."""
    from ..kernels._launch import interpreting
    return interpreting()


def use_kernels(t: Tensor) -> bool:
    """Whether the Triton kernels serve this tensor, or the plain-torch reference must.

    CUDA tensors of fp32/fp16/bf16 run the kernels; CPU tensors run them only through the
    Triton interpreter; float64 (used by gradcheck) always takes the reference.
    """
    if t.dtype not in KERNEL_DTYPES:
        return False
    if t.is_cuda:
        return True
    return t.device.type == "cpu" and interpreter_active()


def use_gemm_kernels(t: Tensor) -> bool:
    """``use_kernels`` for kernels built on ``tl.dot``.  Triton's interpreter computes a bf16
    ``tl.dot`` wrongly (values around 1e20 from triton 3.9 on), so bf16 CPU tensors take the
    reference there instead of returning garbage; fp32 and fp16 dots are right."""
    if t.dtype == torch.bfloat16 and not t.is_cuda:
        return False
    return use_kernels(t)


def allow_tf32() -> bool:
    """fp32 dots may use tf32 only when the user allows it for ordinary matmuls too."""
    return torch.get_float32_matmul_precision() != "highest"


def check_same(name_ref: str, ref: Tensor, named: Sequence[tuple[str, Optional[Tensor]]]) -> None:
    """Raise a clear error when a tensor's dtype or device differs from the reference tensor's."""
    if ref.dtype not in SUPPORTED_DTYPES:
        raise TypeError(f"glu_fusion: {name_ref} has dtype {ref.dtype}; "
                        "supported: float32, float16, bfloat16 (float64 on the reference path)")
    for name, t in named:
        if t is None:
            continue
        if t.device != ref.device:
            raise ValueError(f"glu_fusion: {name} is on {t.device} but {name_ref} is on {ref.device}")
        if t.dtype != ref.dtype:
            raise TypeError(f"glu_fusion: {name} has dtype {t.dtype} but {name_ref} has {ref.dtype}")


def rows_2d(t: Tensor, width: Optional[int] = None) -> Tensor:
    """``t`` as ``[rows, width]`` (``width``: its last dimension), the row count spelled out:
    ``reshape(-1, 0)`` cannot infer it when the width is 0 (K = 0 features)."""
    width = t.shape[-1] if width is None else width
    rows = 1
    for d in t.shape[:-1]:
        rows = rows * d
    return t.reshape(rows, width)


def empty_like_nothing(like: Tensor) -> Tensor:
    """The placeholder an op returns for an output it was told not to compute."""
    return like.new_empty((0,))


def register_cuda_fast_path(*ops) -> None:
    """Register each custom op's own implementation directly for the CUDA dispatch key.

    ``torch.library.custom_op`` routes every call through a generic Python wrapper that checks
    its outputs for aliasing; on the H100 with torch 2.11 that wrapper cost about 0.35 ms of host
    time per call (benchmarks/NOTES.md), more than the GPU work of a small layer.  Our
    implementations allocate every output themselves, so the check has nothing to find; the
    direct registration keeps the op's schema, fake implementation, autograd formula and autocast
    rule, and only skips the wrapper for CUDA tensors.  CPU calls keep the default path.
    """
    lib = new_library("IMPL")
    for op in ops:
        impl = getattr(op, "_init_fn", None)
        if impl is None:  # a torch without this attribute: keep the default path
            continue
        lib.impl(op._name, impl, "CUDA")
