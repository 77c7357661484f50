"""GPU time of every kernel in one forward+backward, ours against Inductor, from the profiler.

Where a call is host-bound, ``do_bench`` reports host time; the profiler's CUDA kernel durations
are what each side costs the GPU, and with the bytes or FLOPs they give achieved bandwidth.

    python benchmarks/kernel_times.py [--out FILE]
"""
from __future__ import annotations

import argparse
from collections import defaultdict

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.profiler import ProfilerActivity, profile

import glu_fusion
from glu_fusion.report import REPORT

DT = torch.bfloat16


class GatedNorm(nn.Module):
    def __init__(self, d: int):
        super().__init__()
        self.weight = nn.Parameter(torch.randn(d, device="cuda", dtype=DT))

    def forward(self, x, z):
        xf = x.float()
        y = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + 1e-6)
        return self.weight * y.to(x.dtype) * F.silu(z.float()).to(x.dtype)


class SwiGLU(nn.Module):
    def __init__(self, k: int, n: int):
        super().__init__()
        self.gate = nn.Linear(k, n, bias=False, device="cuda", dtype=DT)
        self.up = nn.Linear(k, n, bias=False, device="cuda", dtype=DT)

    def forward(self, x):
        return F.silu(self.gate(x)) * self.up(x)


def kernel_times_us(step, reps: int = 5) -> dict:
    """Mean CUDA time per step of each kernel name over ``reps`` profiled steps."""
    for _ in range(3):
        step()
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        for _ in range(reps):
            step()
        torch.cuda.synchronize()
    totals: dict = defaultdict(float)
    for event in prof.events():
        if event.device_type == torch.autograd.DeviceType.CUDA:
            totals[event.name] += event.device_time / reps
    return dict(totals)


def report(title: str, cases: dict, bytes_moved: float, lines: list) -> None:
    lines.append(f"\n--- {title}")
    for label, step in cases.items():
        times = kernel_times_us(step)
        total = sum(times.values())
        lines.append(f"{label}: {total:9.1f} us of GPU time per forward+backward"
                     + (f", {bytes_moved / (total * 1e-6) / 1e12:.2f} TB/s over the minimal bytes" if bytes_moved else ""))
        for name, us in sorted(times.items(), key=lambda kv: -kv[1])[:8]:
            lines.append(f"    {us:9.1f} us  {name[:110]}")


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--out", default=None)
    args = parser.parse_args()
    torch._dynamo.config.cache_size_limit = 64
    REPORT.reset()
    lines = [f"{torch.cuda.get_device_name()}, torch {torch.__version__}"]
    for d in (128, 1024):
        rows = 524288
        x = torch.randn(rows, d, device="cuda", dtype=DT, requires_grad=True)
        z = torch.randn_like(x, requires_grad=True)
        dy = torch.randn_like(x)
        module = GatedNorm(d)
        cases = {}
        for label, backend in (("inductor", "inductor"), ("ours_backend", glu_fusion.backend)):
            torch._dynamo.reset()
            compiled = torch.compile(module, backend=backend)
            cases[label] = (lambda c=compiled: c(x, z).backward(dy))
        cases["ours_op"] = lambda: glu_fusion.rms_norm_gated(x, z, module.weight).backward(dy)
        # Minimal traffic: forward reads x, z and writes y; backward reads dy, x, z, writes dx, dz.
        report(f"gated norm D={d}, {rows} rows", cases, 8 * x.numel() * x.element_size(), lines)
    k, n, m = 4096, 14336, 16384
    x = torch.randn(m, k, device="cuda", dtype=DT, requires_grad=True)
    dout = torch.randn(m, n, device="cuda", dtype=DT)
    module = SwiGLU(k, n)
    cases = {}
    for label, backend in (("inductor", "inductor"), ("ours_backend", glu_fusion.backend)):
        torch._dynamo.reset()
        compiled = torch.compile(module, backend=backend)
        cases[label] = (lambda c=compiled: c(x).backward(dout))
    report(f"SwiGLU {k}->{n}, M={m}", cases, 0, lines)
    lines.append(f"\nrewrites by our pass: {REPORT.counts()}")
    text = "\n".join(lines)
    print(text)
    if args.out:
        with open(args.out, "w") as f:
            f.write(text + "\n")


if __name__ == "__main__":
    main()
