"""What every benchmark script shares: the eager reference spellings, the timers, ceilings,
memory, the A/B switches, environment, and writing results.

Two clocks, one each: ``bench`` is GPU time (CUDA events through ``triton.testing.do_bench``);
``host_ms_per_call`` is wall time per call over a block of calls between two synchronisations
(``per_call_us`` and the paired benchmark build on it).
"""
from __future__ import annotations

import datetime
import json
import time
from typing import Callable

import torch
import torch.nn.functional as F
import triton

EPS = 1e-6


# --- the eager spellings every benchmark compares against ----------------------------------------

def eager_swiglu(x, wg, wu):
    """Llama's MLP gate: two projections, ``silu`` of the first times the second."""
    return F.silu(F.linear(x, wg)) * F.linear(x, wu)


def eager_gated_norm(x, z, w, eps: float = EPS):
    """The gated RMSNorm as FLA/Qwen3-Next write it: fp32 math, one rounding at the end."""
    xf = x.float()
    y = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps) * w.float()
    return (y * F.silu(z.float())).to(x.dtype)


class GatedMLP(torch.nn.Module):
    """The two projections as parameters, as models hold them: CUDA graphs then treat the
    weights as static instead of copying them into the graph's input buffers on every replay."""

    def __init__(self, wg: torch.Tensor, wu: torch.Tensor) -> None:
        super().__init__()
        self.wg, self.wu = torch.nn.Parameter(wg), torch.nn.Parameter(wu)

    def forward(self, x):
        return eager_swiglu(x, self.wg, self.wu)


# --- A/B switches -------------------------------------------------------------------------------

def apply_switches(switches: dict) -> dict:
    """Set glu_fusion's user settings and private A/B switches by short name (``recompute``,
    ``forward``, ``forward_tma``, ``graph_ops``, ``cached_launch``); returns the
    previous values, to pass back in afterwards."""
    import glu_fusion
    from glu_fusion.compile import post_grad
    from glu_fusion.ops import plan_cache
    from glu_fusion.ops import swiglu as swiglu_ops

    where = {"forward": (swiglu_ops, "_FORWARD"),
             "forward_tma": (swiglu_ops, "_FORWARD_TMA"), "graph_ops": (post_grad, "_GRAPH_OPS"),
             "recompute": (glu_fusion.config, "recompute")}
    previous = {}
    for name, value in switches.items():
        if name == "cached_launch":
            previous[name] = plan_cache.cached_launch()
            plan_cache.set_cached_launch(value)
            continue
        module, attr = where[name]
        previous[name] = getattr(module, attr)
        setattr(module, attr, value)
    return previous


# --- timers -------------------------------------------------------------------------------------


def bench(fn: Callable[[], object], repeats: int = 3) -> float:
    """Median milliseconds over warm runs (CUDA events, ``triton.testing.do_bench``), the best of
    ``repeats`` such medians: host-bound calls slow down for whole stretches when the shared
    host is busy (small-shape times moved 2x between runs), and the best median is the call's
    own cost."""
    return min(triton.testing.do_bench(fn, warmup=25, rep=100, return_mode="median")
               for _ in range(repeats))


def host_ms_per_call(fn: Callable[[], object], calls: int) -> float:
    """Wall milliseconds per call over ``calls`` back-to-back calls, the device drained before
    and after: host cost where the host is the bottleneck, device cost where it is not."""
    torch.cuda.synchronize()
    start = time.perf_counter()
    for _ in range(calls):
        fn()
    torch.cuda.synchronize()
    return (time.perf_counter() - start) / calls * 1e3


def per_call_us(fn: Callable[[], object], n: int = 1000, reps: int = 5) -> float:
    """Best of ``reps`` blocks of ``n`` calls, in microseconds: the host is shared, and the
    minimum is the call's own cost."""
    for _ in range(50):
        fn()
    return min(host_ms_per_call(fn, n) for _ in range(reps)) * 1e3


# --- ceilings, memory, environment, results -------------------------------------------------------

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
