"""One shape, one pass, ours against Inductor: host and GPU time per call, kernels from the profiler.

    python benchmarks/probe.py K N M [fwd|fwdbwd]
"""
from __future__ import annotations

import sys
import time

import torch
from torch.profiler import ProfilerActivity, profile

import glu_fusion
from bench_swiglu import GatedMLP


def main() -> None:
    k, n, m = (int(a) for a in sys.argv[1:4])
    phase = sys.argv[4] if len(sys.argv) > 4 else "fwd"
    glu_fusion.config.rewrite_devices = ("cuda",)
    dt = torch.bfloat16
    module = GatedMLP((torch.randn(n, k, device="cuda") * k ** -0.5).to(dt),
                      (torch.randn(n, k, device="cuda") * k ** -0.5).to(dt))
    x = torch.randn(m, k, device="cuda", dtype=dt, requires_grad=True)
    dout = torch.randn(m, n, device="cuda", dtype=dt)
    fns = {"inductor": torch.compile(module, dynamic=False),
           "ours": torch.compile(module, dynamic=False, backend=glu_fusion.backend),
           "ours_op": lambda x: glu_fusion.swiglu(x, module.wg, module.wu)}
    for name, fn in fns.items():
        if phase == "fwd":
            def call(fn=fn):
                with torch.no_grad():
                    return fn(x)
        else:
            def call(fn=fn):
                return torch.autograd.grad(fn(x), (x, module.wg, module.wu), dout)
        for _ in range(5):
            call()
        torch.cuda.synchronize()
        start = time.perf_counter()
        for _ in range(50):
            call()
        host = (time.perf_counter() - start) / 50 * 1e6
        torch.cuda.synchronize()
        wall = (time.perf_counter() - start) / 50 * 1e6
        with profile(activities=[ProfilerActivity.CUDA, ProfilerActivity.CPU]) as prof:
            for _ in range(5):
                call()
            torch.cuda.synchronize()
        print(f"--- {name} {k}->{n} M={m} {phase}: host {host:.1f} us/call (launch loop), wall {wall:.1f} us/call")
        print(prof.key_averages().table(sort_by="self_cuda_time_total", row_limit=12, max_name_column_width=60))
    print("rewrites:", glu_fusion.report().counts())


if __name__ == "__main__":
    main()
