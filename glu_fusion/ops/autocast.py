"""Autocast rules for the ops: follow the region's dtype (as ``F.linear`` does), or pass through."""
from __future__ import annotations

from typing import Callable, Sequence

import torch
from torch import Tensor

from .libraries import new_library


def register_autocast_follow(op_name: str, device_types: Sequence[str] = ("cuda", "cpu")) -> None:
    """Cast floating inputs to the active autocast dtype, as autocast does for ``F.linear``.

    ``torch.library.register_autocast`` fixes one dtype at registration; this follows whatever
    dtype the surrounding ``torch.autocast`` region asks for.
    """
    lib = new_library("IMPL")
    for device_type in device_types:
        key = "AutocastCUDA" if device_type == "cuda" else "AutocastCPU"
        lib.impl(op_name, _autocast_kernel(op_name, device_type), key)


def register_autocast_passthrough(op_name: str) -> None:
    """Run the op on the dtypes it is given under autocast: a fallthrough past the autocast keys."""
    lib = new_library("IMPL")
    for key in ("AutocastCUDA", "AutocastCPU"):
        lib.impl(op_name, torch.library.fallthrough_kernel, key)


def _autocast_kernel(op_name: str, device_type: str) -> Callable:
    def kernel(*args):
        dtype = torch.get_autocast_dtype(device_type)
        cast = [a.to(dtype) if isinstance(a, Tensor) and a.is_floating_point() else a for a in args]
        op = getattr(torch.ops.glu_fusion, op_name).default
        with torch.autocast(device_type, enabled=False):
            return op(*cast)

    return kernel
