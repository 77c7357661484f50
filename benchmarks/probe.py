"""One shape, one pass, ours against Inductor: host and GPU time per call, kernels from the profiler.

    python benchmarks/probe.py K N M [fwd|fwdbwd]     SwiGLU
    python benchmarks/probe.py norm D ROWS           gated norm, no-grad forward: each layer of
                                                     the compiled call, and cProfile of both sides
    python benchmarks/probe.py tritonop D ROWS       the same forward as a ``torch.library.triton_op``
                                                     (Inductor launches our kernel from its own code)
    python benchmarks/probe.py alloc                 host cost of the ways to allocate an output
"""
from __future__ import annotations

import sys
import time

import torch
from torch.profiler import ProfilerActivity, profile

import glu_fusion
import glu_fusion.patterns.routing
from _measure import GatedMLP, eager_gated_norm, per_call_us

glu_fusion.patterns.routing.ROUTE_BY_MEASUREMENT = False  # measure our path on every shape, not the routed default

def norm_layers(d: int, rows: int) -> None:
    import cProfile
    import pstats

    glu_fusion.config.rewrite_devices = ("cuda",)
    dt = torch.bfloat16
    x, z = (torch.randn(rows, d, device="cuda", dtype=dt) for _ in range(2))
    w = (1 + 0.1 * torch.randn(d, device="cuda")).to(dt)
    args = (x, z, w, 1e-6, None, True, "silu", 0.0, "none", False)
    op = torch.ops.glu_fusion.rms_norm_gated
    impl = glu_fusion.ops.rms_norm_gated.rms_norm_gated._init_fn
    inductor = torch.compile(eager_gated_norm, dynamic=False)
    ours = torch.compile(eager_gated_norm, dynamic=False, backend=glu_fusion.backend)
    with torch.no_grad():
        layers = {"implementation": lambda: impl(*args),
                  "twin via dispatcher": lambda: torch.ops.glu_fusion.rms_norm_gated_nograd.default(*args),
                  "op via dispatcher": lambda: op.default(*args),
                  "compiled inductor": lambda: inductor(x, z, w), "compiled ours": lambda: ours(x, z, w)}
        for name, fn in layers.items():
            print(f"{name:24s} {per_call_us(fn):7.1f} us/call")
        plan = next(iter(glu_fusion.ops.rms_norm_gated._FORWARD_PLANS._plans.values()))
        print(f"{'plan(x, z, w)':24s} {per_call_us(lambda: plan(x, z, w)):7.1f} us/call")
        y, rstd = torch.empty_like(x), torch.empty(rows, 1, device="cuda")
        from glu_fusion.kernels.norms import rms_norm_gated as norm_kernels
        from glu_fusion.ops import rms_norm_gated as norm_ops
        launch = norm_kernels.forward_plan(x, z, w, y, *norm_ops._forward_flags(
            x, w, 1e-6, None, True, "silu", 0.0, "none", False))
        print(f"{'kernel launch plan':24s} {per_call_us(lambda: launch(x, z, w, y, rstd)):7.1f} us/call")
        for name in ("compiled inductor", "compiled ours"):
            prof = cProfile.Profile()
            prof.enable()
            for _ in range(2000):
                layers[name]()
            prof.disable()
            print(f"--- cProfile {name}, 2000 calls")
            pstats.Stats(prof).sort_stats("tottime").print_stats(18)


def triton_op_norm(d: int, rows: int) -> None:
    """How much host time a compiled gated-norm forward would cost if Inductor launched our
    kernel itself: the forward kernel wrapped as a ``triton_op``, against the op and Inductor."""
    from torch.library import triton_op, wrap_triton

    from glu_fusion.kernels.norms.rms_norm_gated import forward_plan, rms_norm_gated_fwd_kernel
    from glu_fusion.ops.rms_norm_gated import _forward_flags

    @triton_op("glu_fusion_probe::norm_fwd", mutates_args=())
    def norm_fwd(x: torch.Tensor, z: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
        y = torch.empty_like(x)
        rstd = torch.empty(x.shape[0], 1, device=x.device, dtype=torch.float32)
        plan = forward_plan(x, z, w, y, *_forward_flags(x, w, 1e-6, None, True, "silu", 0.0, "none", False))
        wrap_triton(rms_norm_gated_fwd_kernel)[plan.grid](x, z, w, y, rstd, *plan.scalars, **plan.keywords)
        return y

    glu_fusion.config.rewrite_devices = ("cuda",)
    dt = torch.bfloat16
    x, z = (torch.randn(rows, d, device="cuda", dtype=dt) for _ in range(2))
    w = (1 + 0.1 * torch.randn(d, device="cuda")).to(dt)
    variants = {"compiled inductor": torch.compile(eager_gated_norm, dynamic=False),
                "compiled ours (op)": torch.compile(eager_gated_norm, dynamic=False, backend=glu_fusion.backend),
                "compiled triton_op": torch.compile(lambda x, z, w: norm_fwd(x, z, w), dynamic=False),
                "eager triton_op": norm_fwd}
    with torch.no_grad():
        want = eager_gated_norm(x, z, w).float()
        for name, fn in variants.items():
            err = (fn(x, z, w).float() - want).abs().max().item()
            print(f"{name:24s} {per_call_us(lambda: fn(x, z, w)):7.1f} us/call  (max abs diff {err:.1e})")


def allocations() -> None:
    """Host cost of the ways an op can allocate its output on the GPU."""
    x = torch.randn(32, 128, device="cuda", dtype=torch.bfloat16)
    shape, stride, device, dtype = (32, 128), (128, 1), x.device, x.dtype
    fast = torch._C._dynamo.guards._empty_strided_cuda
    ways = {"torch.empty(shape, device=, dtype=)": lambda: torch.empty(shape, device=device, dtype=dtype),
            "x.new_empty(shape)": lambda: x.new_empty(shape),
            "torch.empty_strided(shape, stride, device=, dtype=)":
                lambda: torch.empty_strided(shape, stride, device=device, dtype=dtype),
            "_empty_strided_cuda(shape, stride, dtype)": lambda: fast(shape, stride, dtype),
            "torch.cuda.current_device()": torch.cuda.current_device,
            "torch._C._cuda_getDevice()": torch._C._cuda_getDevice}
    for name, fn in ways.items():
        print(f"{name:55s} {per_call_us(fn, 20000):6.2f} us/call")


def main() -> None:
    if sys.argv[1] == "alloc":
        return allocations()
    if sys.argv[1] == "tritonop":
        return triton_op_norm(int(sys.argv[2]), int(sys.argv[3]))
    if sys.argv[1] == "norm":
        return norm_layers(int(sys.argv[2]), int(sys.argv[3]))
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
