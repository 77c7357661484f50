"""Measuring helpers shared by the benchmark scripts: timing, ceilings, memory, environment,
and writing results."""
from __future__ import annotations

import datetime
import json
from typing import Callable

import torch
import triton


def bench(fn: Callable[[], object], repeats: int = 3) -> float:
    """Median milliseconds over warm runs (CUDA events, ``triton.testing.do_bench``), the best of
    ``repeats`` such medians: host-bound calls slow down for whole stretches when the shared
    host is busy (small-shape times moved 2x between runs), and the best median is the call's
    own cost."""
    return min(triton.testing.do_bench(fn, warmup=25, rep=100, return_mode="median")
               for _ in range(repeats))


def copy_bandwidth() -> float:
    """Device-to-device copy of 1 GiB, bytes read plus written per second."""
    src = torch.randn(256 * 1024 * 1024, device="cuda")
    dst = torch.empty_like(src)
    ms = bench(lambda: dst.copy_(src))
    return 2 * src.numel() * src.element_size() / (ms * 1e-3)


def peak_mb(fn: Callable[[], object]) -> float:
    """The allocator's peak during one call, over what was allocated before it, in MiB."""
    torch.cuda.synchronize()
    base = torch.cuda.memory_allocated()
    torch.cuda.reset_peak_memory_stats()
    fn()
    torch.cuda.synchronize()
    return (torch.cuda.max_memory_allocated() - base) / 2**20


def time_phases(fwd: Callable[[], object], fwdbwd: Callable[[], object]) -> dict:
    """Warm both phases up (compiles and first launches stay out of the timed window), then
    return their median times and the forward+backward peak memory."""
    for _ in range(3):
        fwd(), fwdbwd()
    torch.cuda.synchronize()
    return {"fwd_ms": bench(fwd), "fwdbwd_ms": bench(fwdbwd), "peak_mb": peak_mb(fwdbwd)}


def environment() -> dict:
    return {"device": torch.cuda.get_device_name(), "torch": torch.__version__,
            "triton": triton.__version__, "date": datetime.date.today().isoformat()}


def write_results(json_path: str, md_path: str, payload: dict, table: str) -> None:
    with open(json_path, "w") as f:
        json.dump(payload, f, indent=1)
    with open(md_path, "w") as f:
        f.write(table)
