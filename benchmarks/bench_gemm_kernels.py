"""Our GEMM kernels alone against cuBLAS on a CUDA device, with a small sweep of tile tables.

* ``dgated``: the MLP block's backward GEMM ``dOut·Wd`` with the SwiGLU backward in its
  epilogue, against cuBLAS's ``dOut·Wd`` alone (the floor) and against the unfused route
  (that GEMM, then the elementwise gate-grad kernel).
* ``wgrad``: the weight gradient ``dHᵀ·x`` (persistent TMA, token splits), against cuBLAS.

Speed = cuBLAS time / ours (> 1: ours faster).  GPU time: ``triton.testing.do_bench`` medians.

    python benchmarks/bench_gemm_kernels.py --json out.json --md out.md
"""
from __future__ import annotations

import argparse
import json
import sys

import torch

from _measure import bench, environment, write_results
from glu_fusion.kernels.mlp_dgated import mlp_dgated
from glu_fusion.kernels.swiglu_bwd import swiglu_gate_grad
from glu_fusion.kernels.weight_grad_tma import weight_grad
from glu_fusion.kernels._launch import multiprocessors

DGATED_SHAPES = [(16384, 4096, 14336), (4096, 4096, 14336), (16384, 1024, 3072), (4096, 1024, 3072),
                 (8192, 2048, 8192)]
_BASE = dict(BLOCK_M=128, BLOCK_N=128, BLOCK_K=64, GROUP_M=8, num_stages=3, num_warps=8, FLATTEN=False,
             W_TRANSPOSED=False)
DGATED_METAS = [
    dict(_BASE, SUBTILES=1),
    dict(_BASE, SUBTILES=2),
    dict(_BASE, SUBTILES=4),
    dict(_BASE, SUBTILES=2, num_stages=4),
    dict(_BASE, SUBTILES=2, W_TRANSPOSED=True),
    dict(_BASE, SUBTILES=2, FLATTEN=True),
    dict(_BASE, SUBTILES=4, BLOCK_N=256),
    dict(_BASE, SUBTILES=2, BLOCK_M=64, num_warps=4, num_stages=4),
]
# (M tokens, R = output rows, K): Llama widths, 0.6B widths, an expert-sized weight (fewer
# output tiles than two waves of SMs).
WGRAD_SHAPES = [(16384, 28672, 4096), (16384, 4096, 14336), (16384, 6144, 1024), (4096, 6144, 1024),
                (16384, 1536, 2048), (8192, 1024, 2048)]
_WBASE = dict(BLOCK_R=128, BLOCK_K=128, BLOCK_M=64, GROUP_R=8, num_stages=4, num_warps=8)
WGRAD_METAS = [  # (tile table, token splits or None for the default choice)
    (_WBASE, None),
    (dict(_WBASE, BLOCK_K=256, num_stages=3), None),
    (dict(_WBASE, BLOCK_R=256, BLOCK_K=128, num_stages=3), None),
    (dict(_WBASE, BLOCK_K=256, num_stages=4, BLOCK_M=32), None),
    (_WBASE, 2),
    (_WBASE, 4),
    (_WBASE, 8),
    (dict(_WBASE, BLOCK_K=256, num_stages=3), 2),
]


def dgated_rows() -> list:
    rows = []
    dtype = torch.bfloat16
    for m, d, n in DGATED_SHAPES:
        dout = torch.randn(m, d, device="cuda", dtype=dtype)
        w_down = torch.randn(d, n, device="cuda", dtype=dtype) * d ** -0.5
        preact = torch.randn(m, 2 * n, device="cuda", dtype=dtype)
        g, u = preact[:, :n], preact[:, n:]
        dh = torch.empty_like(preact)
        h = torch.empty(m, n, device="cuda", dtype=dtype)
        w_down_t = w_down.t().contiguous()
        cublas = bench(lambda: dout @ w_down)

        def unfused():
            dh_h = dout @ w_down
            swiglu_gate_grad(dh_h, g, u, dh[:, :n], dh[:, n:], h)

        row = {"M": m, "D": d, "N": n, "cublas_gemm_ms": cublas, "unfused_ms": bench(unfused)}
        best = None
        for i, meta in enumerate(DGATED_METAS):
            try:
                w = w_down_t if meta["W_TRANSPOSED"] else w_down
                t = bench(lambda: mlp_dgated(dout, w, g, u, dh[:, :n], dh[:, n:], h, False, meta))
            except Exception as err:  # a table that does not fit: recorded, not fatal
                row[f"meta{i}_error"] = repr(err)[:200]
                continue
            row[f"meta{i}_ms"] = t
            if best is None or t < best[0]:
                best = (t, i)
        row["fused_default_ms"] = bench(lambda: mlp_dgated(dout, w_down, g, u, dh[:, :n], dh[:, n:], h, False))
        row["fused_best_ms"], row["fused_best_meta"] = best
        rows.append(row)
        print(json.dumps(row), file=sys.stderr, flush=True)
    return rows


def wgrad_rows() -> list:
    rows = []
    dtype = torch.bfloat16
    sms = multiprocessors(torch.cuda.current_device())
    for m, r, k in WGRAD_SHAPES:
        dh = torch.randn(m, r, device="cuda", dtype=dtype)
        x = torch.randn(m, k, device="cuda", dtype=dtype)
        dw = torch.empty(r, k, device="cuda", dtype=dtype)
        row = {"M": m, "R": r, "K": k, "tiles_128": (r // 128) * (k // 128), "sms": sms,
               "cublas_ms": bench(lambda: dh.t() @ x)}
        best = None
        for i, (meta, splits) in enumerate(WGRAD_METAS):
            try:
                t = bench(lambda: weight_grad(dh, x, dw, None, False, meta, splits))
            except Exception as err:
                row[f"meta{i}_error"] = repr(err)[:200]
                continue
            row[f"meta{i}_ms"] = t
            if best is None or t < best[0]:
                best = (t, i)
        row["ours_default_ms"] = bench(lambda: weight_grad(dh, x, dw, None, False))
        row["ours_best_ms"], row["ours_best_meta"] = best
        ref = (dh.float().t() @ x.float())
        row["rel_err"] = ((dw.float() - ref).norm() / ref.norm()).item()
        rows.append(row)
        print(json.dumps(row), file=sys.stderr, flush=True)
    return rows


def markdown(env: dict, dg: list, wg: list) -> str:
    lines = [f"GEMM kernels, bf16, {env['device']}, torch {env['torch']}, triton {env['triton']}, {env['date']}. "
             "Times in ms (GPU, do_bench medians); speed = cuBLAS / ours.", "",
             "dgated (dOut·Wd with the SwiGLU backward in the epilogue):", "",
             "| M | D→N | cuBLAS GEMM alone | unfused (GEMM + gate-grad) | fused default | fused best (table) | "
             "default vs unfused | default vs GEMM alone |", "|" + "---|" * 8]
    for r in dg:
        lines.append(f"| {r['M']} | {r['D']}→{r['N']} | {r['cublas_gemm_ms']:.3f} | {r['unfused_ms']:.3f} | "
                     f"{r['fused_default_ms']:.3f} | {r['fused_best_ms']:.3f} ({r['fused_best_meta']}) | "
                     f"{r['unfused_ms'] / r['fused_default_ms']:.3f} | {r['cublas_gemm_ms'] / r['fused_default_ms']:.3f} |")
    lines += ["", "Weight gradient dHᵀ·x:", "",
              "| M | R×K | 128² tiles / SMs | cuBLAS | ours default | ours best (table) | speed default | speed best | rel err |",
              "|" + "---|" * 9]
    for r in wg:
        lines.append(f"| {r['M']} | {r['R']}×{r['K']} | {r['tiles_128']}/{r['sms']} | {r['cublas_ms']:.3f} | "
                     f"{r['ours_default_ms']:.3f} | {r['ours_best_ms']:.3f} ({r['ours_best_meta']}) | "
                     f"{r['cublas_ms'] / r['ours_default_ms']:.3f} | {r['cublas_ms'] / r['ours_best_ms']:.3f} | "
                     f"{r['rel_err']:.1e} |")
    return "\n".join(lines) + "\n"


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--json", required=True)
    parser.add_argument("--md", required=True)
    args = parser.parse_args(argv)
    torch.manual_seed(0)
    env = environment()
    dg = dgated_rows()
    wg = wgrad_rows()
    text = markdown(env, dg, wg)
    write_results(args.json, args.md, {"env": env, "dgated": dg, "wgrad": wg}, text)
    print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
