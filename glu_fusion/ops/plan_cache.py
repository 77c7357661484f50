"""Per-signature host plans: an op's checks, layouts and kernel launch plans, built once.

``GLU_FUSION_CACHED_LAUNCH=0`` (a benchmark A/B switch, not a user setting) turns plans and the
kernels' direct binary launch off; anything else keeps them on.  ``set_cached_launch`` flips both
at runtime.
"""
from __future__ import annotations

import os
from typing import Callable, Optional

from torch import Tensor

from .dispatch import interpreter_active

_CACHED_LAUNCH: bool = os.environ.get("GLU_FUSION_CACHED_LAUNCH", "1").strip() != "0"


def set_cached_launch(on: bool) -> None:
    """Use per-signature plans and direct binary launches (True), or Triton's ordinary launch."""
    global _CACHED_LAUNCH
    _CACHED_LAUNCH = bool(on)
    from ..kernels._launch import LaunchPlan
    LaunchPlan.direct = _CACHED_LAUNCH


def cached_launch() -> bool:
    """Whether per-signature plans and direct launches are on."""
    return _CACHED_LAUNCH


def tensor_key(t: Optional[Tensor]):
    """What an op's host-side plan depends on for one tensor argument."""
    return None if t is None else (t.shape, t.stride(), t.dtype, t.device)


def plans_enabled(t: Tensor) -> bool:
    """Whether a call may use the cached per-signature plans: the switch is on and the kernels
    serve the tensor's device (CUDA, or the CPU through the interpreter, which tests use)."""
    return _CACHED_LAUNCH and (t.is_cuda or (t.device.type == "cpu" and interpreter_active()))


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


if not _CACHED_LAUNCH:
    set_cached_launch(False)
