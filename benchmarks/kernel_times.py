"""GPU time of every kernel in one forward+backward, ours against Inductor, from the profiler.

Where a call is host-bound, ``do_bench`` reports host time; the profiler's CUDA kernel durations
are what each side costs the GPU, and with the bytes or FLOPs they give achieved bandwidth.
Gradients are returned (``torch.autograd.grad``), not accumulated into ``.grad``, as in the
benchmarks.  For SwiGLU it also breaks peak memory down: what the forward leaves alive (its
output and the tensors saved for backward) and the peak of the whole forward+backward.

    python benchmarks/kernel_times.py [--out FILE]
"""
from __future__ import annotations

import argparse
import functools
from collections import defaultdict

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.profiler import ProfilerActivity, profile

import glu_fusion
import glu_fusion.patterns.routing
from glu_fusion.compile.report import REPORT

glu_fusion.patterns.routing.ROUTE_BY_MEASUREMENT = False  # measure our path on every shape, not the routed default
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


def memory_breakdown(label: str, forward, inputs: tuple, grad_out, lines: list) -> None:
    """MiB over the inputs: held after the forward (output + saved), and the fwd+bwd peak."""
    for _ in range(2):
        torch.autograd.grad(forward(), inputs, grad_out)
    torch.cuda.synchronize()
    base = torch.cuda.memory_allocated()
    torch.cuda.reset_peak_memory_stats()
    out = forward()
    torch.cuda.synchronize()
    held = torch.cuda.memory_allocated() - base
    fwd_peak = torch.cuda.max_memory_allocated() - base
    grads = torch.autograd.grad(out, inputs, grad_out)
    torch.cuda.synchronize()
    peak = torch.cuda.max_memory_allocated() - base
    del grads, out
    mib = 2 ** 20
    lines.append(f"{label:24s} held after forward {held / mib:7.0f}   forward peak {fwd_peak / mib:7.0f}   "
                 f"forward+backward peak {peak / mib:7.0f} MiB")


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
        inputs = (x, z, module.weight)
        for label, backend in (("inductor", "inductor"), ("ours_backend", glu_fusion.backend)):
            torch._dynamo.reset()
            compiled = torch.compile(module, backend=backend)
            cases[label] = (lambda c=compiled: torch.autograd.grad(c(x, z), inputs, dy))
        cases["ours_op"] = lambda: torch.autograd.grad(glu_fusion.rms_norm_gated(x, z, module.weight), inputs, dy)
        # Minimal traffic: forward reads x, z and writes y; backward reads dy, x, z, writes dx, dz.
        report(f"gated norm D={d}, {rows} rows", cases, 8 * x.numel() * x.element_size(), lines)
    for k, n, m in ((1024, 3072, 16384), (4096, 14336, 16384)):  # the memory breakdown: the last
        x = torch.randn(m, k, device="cuda", dtype=DT, requires_grad=True)
        dout = torch.randn(m, n, device="cuda", dtype=DT)
        module = SwiGLU(k, n)
        inputs = (x, module.gate.weight, module.up.weight)
        cases = {}
        compiled = {}
        for label, backend in (("inductor", "inductor"), ("ours_backend", glu_fusion.backend)):
            torch._dynamo.reset()
            compiled[label] = torch.compile(module, backend=backend)
            cases[label] = (lambda c=compiled[label]: torch.autograd.grad(c(x), inputs, dout))
        report(f"SwiGLU {k}->{n}, M={m}", cases, 0, lines)
    lines.append(f"\n--- SwiGLU {k}->{n}, M={m}: memory (x {x.numel() * 2 / 2**20:.0f} MiB, "
                 f"output {m * n * 2 / 2**20:.0f} MiB, pre-activations {2 * m * n * 2 / 2**20:.0f} MiB)")
    for label, c in compiled.items():
        memory_breakdown(label, lambda c=c: c(x), inputs, dout, lines)
    glu_fusion.config.recompute = True
    torch._dynamo.reset()
    recompute = torch.compile(module, backend=functools.partial(glu_fusion.backend))
    memory_breakdown("ours_backend_recompute", lambda: recompute(x), inputs, dout, lines)
    glu_fusion.config.recompute = False
    memory_breakdown("eager", lambda: module(x), inputs, dout, lines)
    lines.append(f"\nrewrites by our pass: {REPORT.counts()}")
    text = "\n".join(lines)
    print(text)
    if args.out:
        with open(args.out, "w") as f:
            f.write(text + "\n")


if __name__ == "__main__":
    main()
