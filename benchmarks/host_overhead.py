"""Host time of one call at a tiny size, where the GPU work is negligible: where does it go?

Times forward and forward+backward of both ops against their eager spellings (wall clock over
many calls, synchronised), then prints a cProfile of our forward+backward by internal time.

    python benchmarks/host_overhead.py
"""
from __future__ import annotations

import cProfile
import pstats
import time

import torch
import torch.nn.functional as F

import glu_fusion


def per_call_us(fn, n: int = 2000) -> float:
    for _ in range(50):
        fn()
    torch.cuda.synchronize()
    start = time.perf_counter()
    for _ in range(n):
        fn()
    torch.cuda.synchronize()
    return (time.perf_counter() - start) / n * 1e6


def main() -> None:
    dev, dt = "cuda", torch.bfloat16
    x = torch.randn(16, 128, device=dev, dtype=dt, requires_grad=True)
    z = torch.randn_like(x, requires_grad=True)
    w = torch.randn(128, device=dev, dtype=dt, requires_grad=True)
    dy = torch.randn_like(x)

    def norm_eager(x, z, w):
        xf = x.float()
        return (xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + 1e-6) * w.float() * F.silu(z.float())).to(x.dtype)

    wg = torch.randn(256, 128, device=dev, dtype=dt, requires_grad=True)
    wu = torch.randn_like(wg, requires_grad=True)
    dout = torch.randn(16, 256, device=dev, dtype=dt)

    def swiglu_eager(x, wg, wu):
        return F.silu(F.linear(x, wg)) * F.linear(x, wu)

    cases = {
        "norm eager": (lambda: norm_eager(x, z, w), (x, z, w), dy),
        "norm ours": (lambda: glu_fusion.rms_norm_gated(x, z, w), (x, z, w), dy),
        "swiglu eager": (lambda: swiglu_eager(x, wg, wu), (x, wg, wu), dout),
        "swiglu ours": (lambda: glu_fusion.swiglu(x, wg, wu), (x, wg, wu), dout),
    }
    for name, (fwd, leaves, grad) in cases.items():
        with torch.no_grad():
            f_us = per_call_us(fwd)
        fb_us = per_call_us(lambda: torch.autograd.grad(fwd(), leaves, grad), 1000)
        print(f"{name:14s} fwd {f_us:7.1f} us   fwd+bwd {fb_us:7.1f} us")
    for name in ("swiglu ours", "norm ours"):
        fwd, leaves, grad = cases[name]
        prof = cProfile.Profile()
        prof.enable()
        for _ in range(500):
            torch.autograd.grad(fwd(), leaves, grad)
        torch.cuda.synchronize()
        prof.disable()
        print(f"\n--- {name}: 500 forward+backward calls, by internal time")
        pstats.Stats(prof).sort_stats("tottime").print_stats(14)


if __name__ == "__main__":
    main()
