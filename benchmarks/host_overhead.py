"""Host time of one call at a tiny size, where the GPU work is negligible: where does it go?

Three views, all wall clock per call over many synchronised calls on random inputs:

1. layers of one no-grad forward: the dispatcher call, our implementation called directly, the
   kernel-level launch function, and the bare Triton launch (ordinary and cached);
2. the ops against their eager spellings, forward and forward+backward, with the cached launch
   on and off;
3. ``torch.compile`` with our backend against Inductor, forward and forward+backward, and a
   cProfile of ours by internal time.

    python benchmarks/host_overhead.py
"""
from __future__ import annotations

import cProfile
import pstats

import torch
import torch.nn as nn
import torch.nn.functional as F

import glu_fusion
import glu_fusion.patterns.routing
from _measure import apply_switches, eager_gated_norm as norm_eager, eager_swiglu as swiglu_eager, per_call_us
from glu_fusion.compile.report import REPORT
from glu_fusion.kernels.portable import swiglu_fwd
from glu_fusion.ops import rms_norm_gated as norm_ops
from glu_fusion.ops import swiglu as swiglu_ops

glu_fusion.patterns.routing.ROUTE_BY_MEASUREMENT = False  # measure our path on every shape, not the routed default
DEV, DT = "cuda", torch.bfloat16
ROWS, D, N = 16, 128, 256


class NormModule(nn.Module):
    def __init__(self):
        super().__init__()
        self.weight = nn.Parameter(torch.randn(D, device=DEV, dtype=DT))

    def forward(self, x, z):
        xf = x.float()
        y = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + 1e-6)
        return self.weight * y.to(x.dtype) * F.silu(z.float()).to(x.dtype)


class SwigluModule(nn.Module):
    def __init__(self):
        super().__init__()
        self.gate = nn.Linear(D, N, bias=False, device=DEV, dtype=DT)
        self.up = nn.Linear(D, N, bias=False, device=DEV, dtype=DT)

    def forward(self, x):
        return F.silu(self.gate(x)) * self.up(x)


def layers() -> None:
    x = torch.randn(ROWS, D, device=DEV, dtype=DT)
    z = torch.randn_like(x)
    w = torch.randn(D, device=DEV, dtype=DT)
    wg = torch.randn(N, D, device=DEV, dtype=DT)
    wu = torch.randn(N, D, device=DEV, dtype=DT)
    out = torch.empty(ROWS, N, device=DEV, dtype=DT)
    norm_args = (x, z, w, 1e-6, None, True, "silu", 0.0, "none", False)
    fwd_args = (x, wg, wu, None, None, False)
    operands = swiglu_fwd.forward_operands(x, wg, wu, None, None, out, None)
    plan = swiglu_fwd.forward_plan(x, wg, wu, None, None, out, None, False)
    plan(*operands)   # compiles, then keeps the binary
    grid = plan.grid
    scalars, keywords = plan.scalars, plan.keywords

    def general(fn):
        def call():
            apply_switches({"cached_launch": False})
            try:
                return fn()
            finally:
                apply_switches({"cached_launch": True})
        return call

    rows = {
        "torch.empty (reference)": lambda: torch.empty(ROWS, N, device=DEV, dtype=DT),
        "torch.mm (reference)": lambda: torch.mm(x, wg.t()),
        "swiglu: kernel[grid] (Triton)": lambda: swiglu_fwd.swiglu_fwd_kernel[grid](*operands, *scalars, **keywords),
        "swiglu: launch plan, cached binary": lambda: plan(*operands),
        "swiglu: implementation, plan": lambda: swiglu_ops._forward(*fwd_args),
        "swiglu: implementation, general": general(lambda: swiglu_ops._forward(*fwd_args)),
        "swiglu: torch.ops dispatcher, plan": lambda: torch.ops.glu_fusion.swiglu.default(*fwd_args),
        "swiglu: torch.ops dispatcher, general": general(lambda: torch.ops.glu_fusion.swiglu.default(*fwd_args)),
        "norm: implementation, plan": lambda: norm_ops.rms_norm_gated._init_fn(*norm_args),
        "norm: implementation, general": general(lambda: norm_ops.rms_norm_gated._init_fn(*norm_args)),
        "norm: torch.ops dispatcher, plan": lambda: torch.ops.glu_fusion.rms_norm_gated.default(*norm_args),
        "norm: torch.ops dispatcher, general": general(
            lambda: torch.ops.glu_fusion.rms_norm_gated.default(*norm_args)),
    }
    print(f"--- layers of one no-grad forward ({ROWS}x{D}, N={N}, bf16), us per call, best of 5")
    with torch.no_grad():
        for name, fn in rows.items():
            print(f"{name:40s} {per_call_us(fn):8.1f}")


def triton_cdiv(a: int, b: int) -> int:
    return -(-a // b)


def ops_against_eager() -> None:
    x = torch.randn(ROWS, D, device=DEV, dtype=DT, requires_grad=True)
    z = torch.randn_like(x, requires_grad=True)
    w = torch.randn(D, device=DEV, dtype=DT, requires_grad=True)
    dy = torch.randn_like(x)
    wg = torch.randn(N, D, device=DEV, dtype=DT, requires_grad=True)
    wu = torch.randn_like(wg, requires_grad=True)
    dout = torch.randn(ROWS, N, device=DEV, dtype=DT)
    cases = {
        "norm eager": (lambda: norm_eager(x, z, w), (x, z, w), dy),
        "norm ours": (lambda: glu_fusion.rms_norm_gated(x, z, w), (x, z, w), dy),
        "swiglu eager": (lambda: swiglu_eager(x, wg, wu), (x, wg, wu), dout),
        "swiglu ours": (lambda: glu_fusion.swiglu(x, wg, wu), (x, wg, wu), dout),
    }
    print("\n--- ops against their eager spellings, us per call")
    for cached in (True, False):
        apply_switches({"cached_launch": cached})
        for name, (fwd, leaves, grad) in cases.items():
            if "eager" in name and not cached:
                continue
            with torch.no_grad():
                f_us = per_call_us(fwd)
            fb_us = per_call_us(lambda: torch.autograd.grad(fwd(), leaves, grad))
            label = name + ("" if "eager" in name else (" plans" if cached else " general"))
            print(f"{label:22s} fwd {f_us:7.1f}   fwd+bwd {fb_us:7.1f}")
    apply_switches({"cached_launch": True})


def compiled() -> None:
    torch._dynamo.config.cache_size_limit = 64
    x = torch.randn(ROWS, D, device=DEV, dtype=DT, requires_grad=True)
    z = torch.randn_like(x, requires_grad=True)
    norm, swiglu = NormModule(), SwigluModule()
    cases = {}
    REPORT.reset()
    for backend in ("inductor", glu_fusion.backend):
        label = "inductor" if backend == "inductor" else "ours"
        torch._dynamo.reset()
        cn = torch.compile(norm, backend=backend)
        cs = torch.compile(swiglu, backend=backend)
        cases[f"norm {label}"] = (lambda cn=cn: cn(x, z), lambda cn=cn: cn(x, z).sum().backward())
        cases[f"swiglu {label}"] = (lambda cs=cs: cs(x), lambda cs=cs: cs(x).sum().backward())
        for name in (f"norm {label}", f"swiglu {label}"):
            fwd, fwd_bwd = cases[name]
            fwd_bwd()
            with torch.no_grad():
                fwd()
    counts = REPORT.counts()
    assert counts.get("swiglu") and counts.get("rms_norm_gated"), f"the pass did not rewrite both: {counts}"
    print(f"\nrewrites by our pass: {counts}")
    print("--- torch.compile, us per call")
    for name, (fwd, fwd_bwd) in cases.items():
        with torch.no_grad():
            f_us = per_call_us(fwd)
        fb_us = per_call_us(fwd_bwd)
        print(f"{name:22s} fwd {f_us:7.1f}   fwd+bwd {fb_us:7.1f}")
    for name, grad in (("swiglu ours", False), ("swiglu ours", True), ("swiglu inductor", True),
                       ("norm ours", True), ("norm inductor", True)):
        fwd, fwd_bwd = cases[name]
        prof = cProfile.Profile()
        with torch.set_grad_enabled(grad):
            prof.enable()
            for _ in range(500):
                (fwd_bwd if grad else fwd)()
            torch.cuda.synchronize()
            prof.disable()
        what = "forward+backward" if grad else "no-grad forward"
        print(f"\n--- compiled {name}: 500 {what} calls, by internal time")
        pstats.Stats(prof).sort_stats("tottime").print_stats(22)


def main() -> None:
    layers()
    ops_against_eager()
    compiled()


if __name__ == "__main__":
    main()
