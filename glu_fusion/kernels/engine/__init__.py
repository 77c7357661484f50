"""The Hopper GEMM engine: Gluon kernels for sm_90 (H100, H200).

One persistent, warp-specialised main loop (``mainloop``): a one-warp TMA loader fills an
mbarrier ring that two consumer warpgroups drain with asynchronous wgmma, in one of two
schedules (both consumers on one tile, or ping-pong on alternate tiles).  What a tile does with
its accumulators is an epilogue function (``epilogues``); ``kernels`` holds one entry point per
epilogue (its buffers, then the loop) and ``host`` builds descriptors and launches.

Importing this package imports no Gluon: callers ask ``available()`` and import ``host`` only
where the engine can run, so an installation with another Triton never fails on it.
"""
from __future__ import annotations

import functools

import torch


@functools.lru_cache(maxsize=None)
def _gluon_hopper_api() -> bool:
    """Whether this Triton ships the Gluon Hopper API the engine is written against (3.6)."""
    try:
        from triton.experimental.gluon.language.nvidia.hopper import tma, warpgroup_mma  # noqa: F401
        from triton.experimental.gluon.nvidia.hopper import TensorDescriptor  # noqa: F401
    except ImportError:
        return False
    return hasattr(tma, "async_copy_global_to_shared") and hasattr(tma, "store_wait")


def available(device: torch.device) -> bool:
    """Whether the engine can run on ``device``: a CUDA device of compute capability 9.x, no
    Triton interpreter, and a Triton with the Gluon Hopper API."""
    if device.type != "cuda":
        return False
    from .._launch import interpreting
    if interpreting():
        return False
    index = device.index if device.index is not None else torch.cuda.current_device()
    return _capability(index)[0] == 9 and _gluon_hopper_api()


@functools.lru_cache(maxsize=None)
def _capability(index: int) -> tuple[int, int]:
    return torch.cuda.get_device_capability(index)
