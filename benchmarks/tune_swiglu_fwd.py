"""Time tile/schedule variants of the two SwiGLU forward kernels on a CUDA device.

Each variant is checked against a cuBLAS-based forward before it is timed; failures to compile
(shared memory, unsupported options) are recorded, not fatal.  The fastest variant per shape is
what goes into the kernels' tile tables; the table this prints is kept in NOTES.md.

    python benchmarks/tune_swiglu_fwd.py --json tune.json
"""
from __future__ import annotations

import argparse
import json
import sys

import torch
import torch.nn.functional as F
import triton

from _measure import bench
from glu_fusion.kernels.portable.swiglu_fwd import swiglu_fwd_kernel
from glu_fusion.kernels.portable.swiglu_fwd_tma import swiglu_forward_tma

TMA_SHAPES = [(4096, 14336, 16384), (4096, 14336, 4096), (2048, 8192, 16384), (1024, 3072, 16384)]
POINTER_SHAPES = [(4096, 14336, 1), (4096, 14336, 16), (4096, 14336, 128), (2048, 8192, 1024),
                  (1024, 3072, 1024)]


def tma_variants():
    base = dict(BLOCK_M=128, BLOCK_N=128, BLOCK_K=64, GROUP_M=8, num_stages=4, num_warps=8,
                FLATTEN=False, WARP_SPECIALIZE=False)
    yield "base", base
    yield "stages3", {**base, "num_stages": 3}
    yield "stages5", {**base, "num_stages": 5}
    yield "flatten", {**base, "FLATTEN": True}
    yield "ws", {**base, "WARP_SPECIALIZE": True}
    yield "ws_flatten", {**base, "WARP_SPECIALIZE": True, "FLATTEN": True}
    yield "bn64_bk128", {**base, "BLOCK_N": 64, "BLOCK_K": 128, "num_stages": 4}
    yield "bm64_w4", {**base, "BLOCK_M": 64, "num_warps": 4}
    yield "group16", {**base, "GROUP_M": 16}
    yield "bk128_s3", {**base, "BLOCK_K": 128, "num_stages": 3}


def pointer_variants(m):
    for bm in ((16,) if m <= 64 else (64, 128)):
        for bn, bk, stages, warps in ((64, 128, 4, 4), (32, 128, 4, 4), (64, 256, 3, 4), (128, 64, 4, 8),
                                      (64, 64, 5, 4), (128, 128, 3, 8)):
            yield f"bm{bm}_bn{bn}_bk{bk}_s{stages}_w{warps}", dict(
                BLOCK_M=bm, BLOCK_N=bn, BLOCK_K=bk, GROUP_M=1 if m <= 64 else 8,
                num_stages=stages, num_warps=warps)


def pointer_launch(x, wg, wu, out, pre, meta):
    m, k = x.shape
    n = wg.shape[0]
    grid = (triton.cdiv(m, meta["BLOCK_M"]) * triton.cdiv(n, meta["BLOCK_N"]),)
    swiglu_fwd_kernel[grid](x, wg, wu, out, out, out, pre, m, n, k, x.stride(0), x.stride(1),
                            wg.stride(0), wg.stride(1), wu.stride(0), wu.stride(1), 1, 1,
                            out.stride(0), out.stride(1), pre.stride(0), pre.stride(1),
                            HAS_BIAS=False, SAVE_PREACT=True, PRECISION="tf32", **meta)


def measure(kind, k, n, m):
    x = torch.randn(m, k, device="cuda", dtype=torch.bfloat16)
    wg = (torch.randn(n, k, device="cuda") * k ** -0.5).to(torch.bfloat16)
    wu = (torch.randn(n, k, device="cuda") * k ** -0.5).to(torch.bfloat16)
    w_cat = torch.cat([wg, wu])
    want = F.silu(x @ wg.t()) * (x @ wu.t())
    floor = bench(lambda: x @ w_cat.t())
    rows = []
    variants = tma_variants() if kind == "tma" else pointer_variants(m)
    for name, meta in variants:
        out = torch.full((m, n), float("nan"), device="cuda", dtype=torch.bfloat16)
        pre = torch.empty((m, 2 * n), device="cuda", dtype=torch.bfloat16)
        if kind == "tma":
            def run():
                swiglu_forward_tma(x, wg, wu, None, None, out, pre, True, meta)
        else:
            def run():
                pointer_launch(x, wg, wu, out, pre, meta)
        try:
            run()
            torch.cuda.synchronize()
            err = ((out.float() - want.float()).norm() / want.float().norm()).item()
            ms = bench(run) if err < 2e-2 else float("nan")
        except Exception as exc:  # noqa: BLE001 - recorded, the sweep goes on
            err, ms = float("nan"), float("nan")
            name += f" (failed: {type(exc).__name__}: {str(exc)[:80]})"
        rows.append({"kind": kind, "K": k, "N": n, "M": m, "variant": name, "ms": ms,
                     "floor_ms": floor, "ratio": ms / floor, "rel_err": err})
        print(f"{kind} K={k} N={n} M={m} {name}: {ms:.3f} ms, {ms / floor:.3f}x floor, err {err:.1e}",
              flush=True)
    return rows


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--json", required=True)
    args = parser.parse_args(argv)
    torch.manual_seed(0)
    rows = []
    for k, n, m in TMA_SHAPES:
        rows += measure("tma", k, n, m)
    for k, n, m in POINTER_SHAPES:
        rows += measure("pointer", k, n, m)
    with open(args.json, "w") as f:
        json.dump(rows, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
