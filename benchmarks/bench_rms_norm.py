"""Residual + RMSNorm benchmark on a CUDA device: Inductor default against our pass and op.

``h = x + residual; y = w · rmsnorm(h)`` in bf16, written as HF Llama / Qwen3 write it, returning
both y and h (the next residual).  Variants:

* ``inductor``: ``torch.compile`` default;
* ``ours_backend``: the same function compiled with ``glu_fusion.backend`` (the pass rewrites it
  into ``glu_fusion::rms_norm``);
* ``ours_op``: the functional op called eagerly (no compile; host time included).

Compiled functions are built once per D with the row dimension marked dynamic (what
``torch.compile`` settles on after a second row count), so the run stays within about three
minutes; ``--static`` compiles every shape on its own instead (slower).

The floor is the bytes the fused computation must move over the measured device-copy
bandwidth: forward reads x, residual and writes y, h (4 passes); forward+backward adds reading
dy, dh, h and writing dx (8 passes; dx also serves the residual).  ``copy`` is one device copy
moving the same bytes, timed like the ops.  Times: median ms of ``triton.testing.do_bench``.

    python benchmarks/bench_rms_norm.py --json out.json --md out.md [--quick] [--static]
"""
from __future__ import annotations

import argparse
import json
import sys

import torch

import glu_fusion
from _measure import bench, copy_bandwidth, environment, write_results

from glu_fusion.functional import rms_norm as rms_norm_api
from glu_fusion.patterns import rms_norm as norm_patterns

DIMS = (128, 1024, 2048, 4096, 8192)
ROWS = (1, 32, 2048, 16384, 131072)
QUICK_ROWS = (32, 16384)
MAX_TENSOR_BYTES = 2 << 30
EPS = 1e-6


def residual_norm(x, residual, w):
    """HF Llama decoder: the residual add in bf16, the norm in fp32, weight after the downcast."""
    h = x + residual
    input_dtype = h.dtype
    hf = h.to(torch.float32)
    variance = hf.pow(2).mean(-1, keepdim=True)
    hf = hf * torch.rsqrt(variance + EPS)
    return w * hf.to(input_dtype), h


def ours_op(x, residual, w):
    return rms_norm_api(x, w, EPS, residual, downcast="before_weight")


def make_variants(static: bool) -> dict:
    torch._dynamo.reset()
    dynamic = False if static else None
    return {"inductor": torch.compile(residual_norm, dynamic=dynamic),
            "ours_backend": torch.compile(residual_norm, backend=glu_fusion.backend, dynamic=dynamic),
            "ours_op": ours_op}


def _copy_ms(numel: int, dtype: torch.dtype) -> float:
    src = torch.empty(numel, device="cuda", dtype=dtype).normal_()
    dst = torch.empty_like(src)
    return bench(lambda: dst.copy_(src), repeats=1)


def measure(d: int, rows: int, bandwidth: float, variants: dict, static: bool) -> dict:
    dtype = torch.bfloat16
    x = torch.randn(rows, d, device="cuda", dtype=dtype, requires_grad=True)
    r = torch.randn(rows, d, device="cuda", dtype=dtype, requires_grad=True)
    w = (1 + 0.1 * torch.randn(d, device="cuda")).to(dtype).requires_grad_()
    if not static and rows > 1:  # sizes 0 and 1 are always specialised
        for t in (x, r):
            torch._dynamo.mark_dynamic(t, 0)
    dy, dh = torch.randn(rows, d, device="cuda", dtype=dtype), torch.randn(rows, d, device="cuda", dtype=dtype)
    tensor_bytes = rows * d * x.element_size()
    row = {"D": d, "rows": rows}
    for phase, passes in (("fwd", 4), ("fwdbwd", 8)):
        row[f"floor_{phase}_ms"] = passes * tensor_bytes / bandwidth * 1e3
        row[f"copy_{phase}_ms"] = _copy_ms(passes * rows * d // 2, dtype)
    for name, fn in variants.items():
        def fwd():
            with torch.no_grad():
                return fn(x, r, w)

        def fwdbwd():
            return torch.autograd.grad(fn(x, r, w), (x, r, w), (dy, dh))

        for _ in range(2):
            fwd(), fwdbwd()
        torch.cuda.synchronize()
        row[f"{name}_fwd_ms"] = bench(fwd, repeats=1)
        row[f"{name}_fwdbwd_ms"] = bench(fwdbwd, repeats=1)
    return row


def markdown(rows: list, env: dict) -> str:
    lines = [f"Residual + RMSNorm bf16 (HF Llama spelling, y and h returned) on {env['device']}, "
             f"torch {env['torch']}, triton {env['triton']}, {env['date']}; copy bandwidth "
             f"{env['copy_TBps']:.2f} TB/s; compiled {'per shape' if env['static'] else 'once per D, rows dynamic'}. "
             "Median ms. floor = bytes moved / copy bandwidth; copy = one device copy of the same bytes. "
             "speedup = inductor / ours_backend (> 1: ours faster).", "",
             "| D | rows | pass | floor | copy | inductor | ours_backend | ours_op | speedup | backend/floor |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        for phase in ("fwd", "fwdbwd"):
            ind, ours, op = (r[f"{n}_{phase}_ms"] for n in ("inductor", "ours_backend", "ours_op"))
            floor = r[f"floor_{phase}_ms"]
            lines.append(f"| {r['D']} | {r['rows']} | {phase} | {floor:.4f} | {r[f'copy_{phase}_ms']:.4f} | "
                         f"{ind:.4f} | {ours:.4f} | {op:.4f} | {ind / ours:.2f} | {ours / floor:.2f} |")
    return "\n".join(lines) + "\n"


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--json", required=True)
    parser.add_argument("--md", required=True)
    parser.add_argument("--quick", action="store_true", help="two row counts")
    parser.add_argument("--static", action="store_true", help="compile every shape on its own")
    args = parser.parse_args(argv)
    torch.manual_seed(0)
    env = environment()
    env["copy_TBps"] = copy_bandwidth() / 1e12
    env["static"] = args.static
    glu_fusion.config.rewrite_devices = ("cuda",)
    norm_patterns.REWRITE_DEVICE_TYPES = ("cuda",)  # the rewrite under test, off by default
    results: list = []
    for d in DIMS:
        variants = None if args.static else make_variants(False)
        glu_fusion.report().reset()
        for rows in (QUICK_ROWS if args.quick else ROWS):
            if rows * d * 2 > MAX_TENSOR_BYTES:
                continue
            if args.static:
                glu_fusion.report().reset()
            results.append(measure(d, rows, env["copy_TBps"] * 1e12,
                                   make_variants(True) if args.static else variants, args.static))
            results[-1]["rewrites"] = glu_fusion.report().counts()  # so far for this D (dynamic)
            print(json.dumps(results[-1]), file=sys.stderr, flush=True)
    table = markdown(results, env)
    write_results(args.json, args.md, {"env": env, "rows": results}, table)
    print(table)
    return 0


if __name__ == "__main__":
    sys.exit(main())
