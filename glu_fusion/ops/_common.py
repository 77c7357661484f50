"""Helpers shared by the custom ops: device dispatch, argument checks, autocast."""
from __future__ import annotations

import os
from typing import Callable, Optional, Sequence

import torch
from torch import Tensor

from .. import config

KERNEL_DTYPES = (torch.float32, torch.float16, torch.bfloat16)
SUPPORTED_DTYPES = KERNEL_DTYPES + (torch.float64,)


def interpreter_active() -> bool:
    """True when Triton runs kernels through its CPU interpreter (``TRITON_INTERPRET=1``)."""
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


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


def empty_like_nothing(like: Tensor) -> Tensor:
    """The placeholder an op returns for an output it was told not to compute."""
    return like.new_empty((0,))


def register_autocast_follow(op_name: str, device_types: Sequence[str] = ("cuda", "cpu")) -> None:
    """Cast floating inputs to the active autocast dtype, as autocast does for ``F.linear``.

    ``torch.library.register_autocast`` fixes one dtype at registration; this follows whatever
    dtype the surrounding ``torch.autocast`` region asks for.
    """
    lib = torch.library.Library("glu_fusion", "IMPL")
    _LIBS.append(lib)
    for device_type in device_types:
        key = "AutocastCUDA" if device_type == "cuda" else "AutocastCPU"
        lib.impl(op_name, _autocast_kernel(op_name, device_type), key)


def register_autocast_passthrough(op_name: str) -> None:
    """Run the op on the dtypes it is given under autocast: a fallthrough past the autocast keys."""
    lib = torch.library.Library("glu_fusion", "IMPL")
    _LIBS.append(lib)
    for key in ("AutocastCUDA", "AutocastCPU"):
        lib.impl(op_name, torch.library.fallthrough_kernel, key)


_LIBS: list = []


def _autocast_kernel(op_name: str, device_type: str) -> Callable:
    def kernel(*args):
        dtype = torch.get_autocast_dtype(device_type)
        cast = [a.to(dtype) if isinstance(a, Tensor) and a.is_floating_point() else a for a in args]
        op = getattr(torch.ops.glu_fusion, op_name).default
        with torch.autocast(device_type, enabled=False):
            return op(*cast)

    return kernel


def register_cuda_fast_path(*ops) -> None:
    """Register each custom op's own implementation directly for the CUDA dispatch key.

    ``torch.library.custom_op`` routes every call through a generic Python wrapper that checks
    its outputs for aliasing; on the H100 with torch 2.11 that wrapper cost about 0.35 ms of host
    time per call (benchmarks/NOTES.md), more than the GPU work of a small layer.  Our
    implementations allocate every output themselves, so the check has nothing to find; the
    direct registration keeps the op's schema, fake implementation, autograd formula and autocast
    rule, and only skips the wrapper for CUDA tensors.  CPU calls keep the default path.
    """
    lib = torch.library.Library("glu_fusion", "IMPL")
    _LIBS.append(lib)
    for op in ops:
        impl = getattr(op, "_init_fn", None)
        if impl is None:  # a torch without this attribute: keep the default path
            continue
        lib.impl(op._name, impl, "CUDA")


#: Each op's autograd-free twin (OpOverload -> OpOverload), for the graphs Inductor compiles
#: after AOTAutograd: ``graph_ops.use_graph_ops`` points their calls at it.
GRAPH_TWINS: dict = {}

TWIN_SUFFIX = "_nograd"


def register_graph_twins(*ops) -> None:
    """Define ``<name>_nograd`` beside each custom op: its schema, implementation and fake
    implementation, with autograd a fallthrough and no autocast rule.

    A call of a ``torch.library`` custom op always passes the op's Python autograd layer, which
    in compiled code only finds that no graph is wanted and redispatches: host time on every
    call (benchmarks/NOTES.md, run 20).  Nothing differentiates a graph Inductor compiles after
    AOTAutograd (its own kernels have no autograd either), and autocast was applied when it was
    traced, so there the twin computes the same thing with neither layer in the way.  Eager
    code must keep calling the op itself: the twin records no autograd graph.
    """
    lib = torch.library.Library("glu_fusion", "FRAGMENT")
    _LIBS.append(lib)
    for op in ops:
        impl, fake = getattr(op, "_init_fn", None), getattr(op, "_abstract_fn", None)
        if impl is None or fake is None:  # a torch without these attributes: no twin
            continue
        name = op._name.split("::")[-1]
        original = getattr(torch.ops.glu_fusion, name).default
        twin_name = name + TWIN_SUFFIX
        schema = str(original._schema).split("::", 1)[1]
        lib.define(twin_name + schema[len(name):], tags=tuple(original.tags))
        for key in ("CUDA", "CPU"):
            lib.impl(twin_name, impl, key)
        lib.impl(twin_name, torch.library.fallthrough_kernel, "Autograd")
        torch.library.register_fake(f"glu_fusion::{twin_name}", fake, lib=lib)
        GRAPH_TWINS[original] = getattr(torch.ops.glu_fusion, twin_name).default


def tensor_key(t: Optional[Tensor]):
    """What an op's host-side plan depends on for one tensor argument."""
    return None if t is None else (t.shape, t.stride(), t.dtype, t.device)


def plans_enabled(t: Tensor) -> bool:
    """Whether a call may use the cached per-signature plans: the setting is on and the kernels
    serve the tensor's device (CUDA, or the CPU through the interpreter, which tests use)."""
    return config.cached_launch and (t.is_cuda or (t.device.type == "cpu" and interpreter_active()))


class PlanCache:
    """An op's host work for one argument signature (checks, layouts, launch plans), built once.

    ``get(key, *args)`` returns ``build(*args)``, cached by ``key``: shapes, strides, dtypes and
    devices of the tensors plus every flag the build reads.  A build that raises (bad input)
    caches nothing, so the error repeats on every call; a build may return None for signatures
    that take the op's general path.  The cache is emptied when it reaches ``limit`` entries
    (shapes that change on every call).
    """

    def __init__(self, build: Callable, limit: int = 1024):
        self._build = build
        self._plans: dict = {}
        self._limit = limit

    def get(self, key, *args):
        plans = self._plans
        if key in plans:
            return plans[key]
        plan = self._build(*args)
        if len(plans) >= self._limit:
            plans.clear()
        plans[key] = plan
        return plan
