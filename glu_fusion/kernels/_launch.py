"""Launch helpers shared by the kernels: config choice for GPU vs interpreter, M buckets."""
from __future__ import annotations

import os

import triton


def interpreting() -> bool:
    """True when kernels run through Triton's CPU interpreter (small fixed tiles, no tuning)."""
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


def m_bucket(m: int) -> int:
    """Tuning key for the token count: the next power of two, so dynamic batches reuse configs."""
    return 1 if m <= 1 else triton.next_power_of_2(m)


def precision(allow_tf32: bool) -> str:
    """``tl.dot`` input precision for fp32 operands (ignored for fp16/bf16)."""
    return "tf32" if allow_tf32 else "ieee"
