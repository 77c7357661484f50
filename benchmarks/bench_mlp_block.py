"""MLP-block benchmark on a CUDA device: ``down(silu(gate(x)) * up(x))`` through our backend
against ``torch.compile``'s default, in the same run.

Variants (bf16, weights as module parameters, as models hold them):

* ``inductor``: ``torch.compile(module)``.
* ``ours``: ``torch.compile(module, backend=glu_fusion.backend)``: the whole-block op.
* ``ours_swiglu``: the pass with the block rewrite off (SwiGLU op, the down projection left to
  Inductor), the previous default.
* ``ours``'s backward runs the down projection's input-grad GEMM ``dOut·Wd`` with the gate's
  backward (dG, dU and h) in its epilogue on Hopper (the engine), elsewhere cuBLAS's GEMM and
  one elementwise pass.
* ``ours_recompute``: the block op saving only ``x`` (peak memory).
* for M ≤ 16 also ``inductor_cg`` / ``ours_cg``: both under CUDA graphs (``reduce-overhead``), the
  decode case.

Times: ``wall`` is host wall time per call (perf_counter over a loop of calls, synchronised at
its ends: what a user feels without CUDA graphs); ``gpu`` is the median of CUDA-event timings
(``triton.testing.do_bench``).  Floors: the GEMMs alone (cuBLAS: ``x·[Wg;Wu]ᵀ`` and ``h·Wdᵀ``
forward, six GEMMs forward+backward) and, for the decode rows, the weight bytes over the measured
copy bandwidth.

    python benchmarks/bench_mlp_block.py --json out.json --md out.md [--quick] [--profile]
"""
from __future__ import annotations

import argparse
import functools
import json
import os
import sys

# Variants differ by pattern switches that are not all part of Inductor's cache key.
os.environ.setdefault("TORCHINDUCTOR_FORCE_DISABLE_CACHES", "1")

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

import glu_fusion  # noqa: E402
import glu_fusion.patterns.routing  # noqa: E402
from _measure import bench, copy_bandwidth, environment, host_ms_per_call, peak_mb, write_results  # noqa: E402

glu_fusion.patterns.routing.ROUTE_BY_MEASUREMENT = False  # measure our path on every shape, not the routed default
SHAPES = [(4096, 14336), (1024, 3072), (2048, 8192)]
TOKENS = [1, 16, 128, 1024, 4096, 16384]
QUICK_TOKENS = [16, 4096, 16384]
CUDA_GRAPH_MAX_TOKENS = 16
for _limit in ("cache_size_limit", "recompile_limit"):
    if hasattr(torch._dynamo.config, _limit):
        setattr(torch._dynamo.config, _limit, 64)


class MLP(torch.nn.Module):
    """A Llama-style MLP block, spelled as HF transformers spells it."""

    def __init__(self, k: int, n: int, dtype: torch.dtype) -> None:
        super().__init__()
        self.gate_proj = torch.nn.Linear(k, n, bias=False, device="cuda", dtype=dtype)
        self.up_proj = torch.nn.Linear(k, n, bias=False, device="cuda", dtype=dtype)
        self.down_proj = torch.nn.Linear(n, k, bias=False, device="cuda", dtype=dtype)

    def forward(self, x):
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))


def wall_ms(fn, calls: int = 50) -> float:
    """Host wall time per call over a loop of calls, best of three loops (the host is shared)."""
    return min(host_ms_per_call(fn, calls) for _ in range(3))


def _set_block(on: bool) -> None:
    from glu_fusion.patterns import swiglu as swiglu_patterns
    swiglu_patterns.REWRITE_BLOCK = on


def variants(module: MLP, m: int) -> dict:
    """name -> (compiled callable, setup applied before compiling and running it)."""
    torch._dynamo.reset()

    def ours(**patches):
        return torch.compile(module, backend=functools.partial(glu_fusion.backend, config_patches=patches))

    table = {
        "inductor": (torch.compile(module), {}),
        "ours": (ours(), {}),
        "ours_swiglu": (ours(), {"block": False}),
        "ours_recompute": (ours(), {"recompute": True}),
    }
    if m <= CUDA_GRAPH_MAX_TOKENS:
        table["inductor_cg"] = (torch.compile(module, mode="reduce-overhead"), {})
        table["ours_cg"] = (ours(**{"triton.cudagraphs": True}), {})
    return table


def _apply(setup: dict) -> None:
    _set_block(setup.get("block", True))
    glu_fusion.config.recompute = setup.get("recompute", False)


def measure(k: int, n: int, m: int, bandwidth: float) -> dict:
    dtype = torch.bfloat16
    torch.manual_seed(0)
    module = MLP(k, n, dtype)
    x = torch.randn(m, k, device="cuda", dtype=dtype, requires_grad=True)
    dout = torch.randn(m, k, device="cuda", dtype=dtype)
    params = [x, *module.parameters()]
    w_cat = torch.cat([module.gate_proj.weight, module.up_proj.weight]).detach()
    wd = module.down_proj.weight.detach()
    xd, h, dh = x.detach(), torch.randn(m, n, device="cuda", dtype=dtype), torch.randn(m, 2 * n, device="cuda", dtype=dtype)
    row = {"K": k, "N": n, "M": m}
    row["floor_fwd_ms"] = bench(lambda: xd @ w_cat.t()) + bench(lambda: h @ wd.t())
    row["floor_fwdbwd_ms"] = (row["floor_fwd_ms"] + bench(lambda: dout @ wd) + bench(lambda: dout.t() @ h)
                              + bench(lambda: dh @ w_cat) + bench(lambda: dh.t() @ xd))
    row["weight_read_floor_ms"] = 3 * n * k * 2 / bandwidth * 1e3
    for name, (fn, setup) in variants(module, m).items():
        _apply(setup)

        def fwd():
            with torch.no_grad():
                return fn(x)

        def fwdbwd():
            return torch.autograd.grad(fn(x), params, dout)

        phases = {"fwd": fwd} if name.endswith("_cg") else {"fwd": fwd, "fwdbwd": fwdbwd}
        for phase, call in phases.items():
            for _ in range(3):
                call()
            row[f"{name}_{phase}_wall_ms"] = wall_ms(call)
            row[f"{name}_{phase}_gpu_ms"] = bench(call)
            if phase == "fwdbwd":
                row[f"{name}_peak_mb"] = peak_mb(call)
    _apply({})
    return row


def profile(k: int, n: int, m: int) -> str:
    """Per-kernel GPU time of one forward+backward, Inductor against ours."""
    from torch.profiler import ProfilerActivity, profile as torch_profile
    module = MLP(k, n, torch.bfloat16)
    x = torch.randn(m, k, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    dout = torch.randn(m, k, device="cuda", dtype=torch.bfloat16)
    text = []
    for name, (fn, setup) in variants(module, m + CUDA_GRAPH_MAX_TOKENS + 1).items():
        if name not in ("inductor", "ours", "ours_swiglu"):
            continue
        _apply(setup)
        for _ in range(3):
            torch.autograd.grad(fn(x), [x, *module.parameters()], dout)
        torch.cuda.synchronize()
        with torch_profile(activities=[ProfilerActivity.CUDA, ProfilerActivity.CPU]) as prof:
            for _ in range(5):
                torch.autograd.grad(fn(x), [x, *module.parameters()], dout)
            torch.cuda.synchronize()
        text.append(f"== {name}, {k}->{n}, M={m}, 5 forward+backward calls")
        text.append(prof.key_averages().table(sort_by="cuda_time_total", row_limit=14, max_name_column_width=70))
        text.append(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=12, max_name_column_width=70))
    _apply({})
    return "\n".join(text)


def markdown(rows: list, env: dict) -> str:
    lines = [f"MLP block bf16 on {env['device']}, torch {env['torch']}, triton {env['triton']}, {env['date']}; "
             f"copy {env['copy_TBps']:.2f} TB/s. Times in ms; speed-up = Inductor time / ours (> 1: faster). "
             "wall: host time per call without CUDA graphs; gpu: CUDA-event median.", "",
             "| K→N | M | phase | floor | inductor wall | ours wall | speed-up wall | inductor gpu | ours gpu | "
             "speed-up gpu | ours_swiglu gpu | ours/floor |",
             "|" + "---|" * 12]
    for r in rows:
        for phase in ("fwd", "fwdbwd"):
            floor = r[f"floor_{phase}_ms"]
            iw, ow = r[f"inductor_{phase}_wall_ms"], r[f"ours_{phase}_wall_ms"]
            ig, og = r[f"inductor_{phase}_gpu_ms"], r[f"ours_{phase}_gpu_ms"]
            lines.append(f"| {r['K']}→{r['N']} | {r['M']} | {phase} | {floor:.3f} | {iw:.3f} | {ow:.3f} | "
                         f"{iw / ow:.3f} | {ig:.3f} | {og:.3f} | {ig / og:.3f} | "
                         f"{r[f'ours_swiglu_{phase}_gpu_ms']:.3f} | "
                         f"{og / floor:.2f} |")
    lines += ["", "Peak memory over the inputs during one forward+backward (MB):", "",
              "| K→N | M | inductor | ours | ours_swiglu | ours_recompute | ours/inductor | recompute/inductor |",
              "|" + "---|" * 8]
    for r in rows:
        ind = max(r["inductor_peak_mb"], 1e-9)
        lines.append(f"| {r['K']}→{r['N']} | {r['M']} | {r['inductor_peak_mb']:.0f} | {r['ours_peak_mb']:.0f} | "
                     f"{r['ours_swiglu_peak_mb']:.0f} | {r['ours_recompute_peak_mb']:.0f} | "
                     f"{r['ours_peak_mb'] / ind:.2f} | {r['ours_recompute_peak_mb'] / ind:.2f} |")
    cg = [r for r in rows if "inductor_cg_fwd_gpu_ms" in r]
    if cg:
        lines += ["", "Decode (inference forward) under CUDA graphs (ms):", "",
                  "| K→N | M | weight-read floor | inductor_cg | ours_cg | speed-up | ours_cg/floor |", "|" + "---|" * 7]
        for r in cg:
            i, o, f = r["inductor_cg_fwd_gpu_ms"], r["ours_cg_fwd_gpu_ms"], r["weight_read_floor_ms"]
            lines.append(f"| {r['K']}→{r['N']} | {r['M']} | {f:.4f} | {i:.4f} | {o:.4f} | {i / o:.3f} | {o / f:.2f} |")
    return "\n".join(lines) + "\n"


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--json", required=True)
    parser.add_argument("--md", required=True)
    parser.add_argument("--quick", action="store_true", help="fewer token counts")
    parser.add_argument("--profile", help="write per-kernel profiles of the large shapes to this file")
    parser.add_argument("--shapes", help="K->N widths to run, as 4096x14336,1024x3072 (default: all)")
    parser.add_argument("--tokens", help="token counts to run, as 4096,16384 (default: by --quick)")
    args = parser.parse_args(argv)
    shapes = [tuple(int(v) for v in s.split("x")) for s in args.shapes.split(",")] if args.shapes else SHAPES
    tokens = [int(v) for v in args.tokens.split(",")] if args.tokens else (QUICK_TOKENS if args.quick else TOKENS)
    glu_fusion.config.rewrite_devices = ("cuda",)
    env = environment()
    env["copy_TBps"] = copy_bandwidth() / 1e12
    rows = []
    for k, n in shapes:
        for m in tokens:
            rows.append(measure(k, n, m, env["copy_TBps"] * 1e12))
            print(json.dumps(rows[-1]), file=sys.stderr, flush=True)
            write_results(args.json, args.md, {"env": env, "rows": rows}, markdown(rows, env))
    print(markdown(rows, env))
    if args.profile:
        with open(args.profile, "w") as f:
            f.write("\n\n".join(profile(k, n, m) for k, n in shapes[:2] for m in (16, 16384)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
