"""Launch helpers shared by the kernels: interpreter detection, tile tables, dot precision."""
from __future__ import annotations

import functools
import os

import torch


def interpreting() -> bool:
    """True when kernels run through Triton's CPU interpreter (small fixed tiles, no tuning)."""
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


def precision(allow_tf32: bool) -> str:
    """``tl.dot`` input precision for fp32 operands (ignored for fp16/bf16)."""
    return "tf32" if allow_tf32 else "ieee"


def tile_config(table: dict, dtype: torch.dtype, m: int) -> dict:
    """Pick a kernel's launch meta-parameters from its table, keyed by operand width and the
    token count: ``table[(wide, small_m)]`` with ``wide`` for 4-byte operands and ``small_m``
    for M <= 64 (decode-like calls, which want narrow row tiles and many column tiles).

    A fixed table keeps the first call and compile time short (no autotuning sweep), and the
    fp32 entries stay inside Hopper's 227 KB of shared memory per program.
    """
    return dict(table[(dtype == torch.float32, m <= 64)])


@functools.lru_cache(maxsize=None)
def multiprocessors(device_index: int) -> int:
    """Streaming multiprocessors of a CUDA device (cached: the query costs microseconds)."""
    return torch.cuda.get_device_properties(device_index).multi_processor_count
