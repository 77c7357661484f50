"""Gated RMSNorm benchmark on a CUDA device: eager, Inductor default, our op, the copy floor.

``y = rmsnorm(x)·w·silu(z)`` in bf16 (fp32 math, the FLA/torchtitan spelling), timed as the
median of ``triton.testing.do_bench``.  The floor is the bytes the fused computation must move
over the measured device-copy bandwidth: forward reads x, z and writes y (3 passes); forward +
backward adds reading x, z, dy and writing dx, dz (8 passes in all; the forward output itself
is not needed by backward).  ``copy`` is one device copy moving those same bytes, timed like the
ops.  Peak memory is the allocator's peak over the inputs during one
forward+backward.

    python benchmarks/bench_rms_norm_gated.py --json out.json --md out.md [--quick]
"""
from __future__ import annotations

import argparse
import json
import sys

import torch

import glu_fusion
from _measure import EPS, bench, copy_bandwidth, eager_gated_norm, environment, time_phases, write_results


DIMS = (128, 256, 1024)
ROWS = (32, 4096, 131072, 524288)
QUICK_ROWS = (4096, 524288)


def ours(x, z, w):
    return glu_fusion.rms_norm_gated(x, z, w, EPS)


def measure(d: int, rows: int, bandwidth: float, variants: dict) -> dict:
    dtype = torch.bfloat16
    x = torch.randn(rows, d, device="cuda", dtype=dtype, requires_grad=True)
    z = torch.randn(rows, d, device="cuda", dtype=dtype, requires_grad=True)
    w = (1 + 0.1 * torch.randn(d, device="cuda")).to(dtype).requires_grad_()
    dy = torch.randn(rows, d, device="cuda", dtype=dtype)
    tensor_bytes = rows * d * x.element_size()
    row = {"D": d, "rows": rows,
           "floor_fwd_ms": 3 * tensor_bytes / bandwidth * 1e3,
           "floor_fwdbwd_ms": 8 * tensor_bytes / bandwidth * 1e3}
    # The same bytes moved by one device copy, timed like the ops: a floor that pays the same
    # launch, ramp-up and tail as a kernel of this size (the bandwidth floor above does not).
    for phase, passes in (("fwd", 3), ("fwdbwd", 8)):
        row[f"copy_{phase}_ms"] = _copy_ms(passes * rows * d // 2, dtype)
    for name, fn in variants.items():
        def fwd():
            with torch.no_grad():
                return fn(x, z, w)

        def fwdbwd():
            return torch.autograd.grad(fn(x, z, w), (x, z, w), dy)

        row.update({f"{name}_{key}": value for key, value in time_phases(fwd, fwdbwd).items()})
    return row


def _copy_ms(numel: int, dtype: torch.dtype) -> float:
    src = torch.randn(numel, device="cuda").to(dtype)
    dst = torch.empty_like(src)
    return bench(lambda: dst.copy_(src))


def make_variants() -> dict:
    """Fresh compiled functions (static shapes) for each shape; ours_backend is the whole path:
    our pass finds the eager spelling above and rewrites it into the fused op."""
    torch._dynamo.reset()
    return {"eager": eager_gated_norm, "inductor": torch.compile(eager_gated_norm, dynamic=False),
            "ours_op": ours,
            "ours_backend": torch.compile(eager_gated_norm, backend=glu_fusion.backend, dynamic=False)}


def markdown(rows: list, env: dict) -> str:
    names = [k[:-7] for k in rows[0] if k.endswith("_fwd_ms") and not k.startswith(("floor", "copy"))]
    lines = [f"Gated RMSNorm bf16 `rmsnorm(x)·w·silu(z)` on {env['device']}, torch {env['torch']}, "
             f"triton {env['triton']}, {env['date']}; copy bandwidth {env['copy_TBps']:.2f} TB/s. "
             "Median ms; floor = bytes moved / copy bandwidth; copy = one device copy moving the same "
             "bytes, timed like the ops. ours_op: the functional op called "
             "eagerly; ours_backend: the eager spelling compiled with our backend (pass + op).", ""]
    header = ("| D | rows | pass | floor | copy | " + " | ".join(names)
              + " | op/floor | op/copy | op/inductor | backend/inductor |")
    lines += [header, "|" + "---|" * (header.count("|") - 1)]
    for r in rows:
        for phase in ("fwd", "fwdbwd"):
            floor = r[f"floor_{phase}_ms"]
            cells = [f"{r[f'{nm}_{phase}_ms']:.4f}" for nm in names]
            mine = r[f"ours_op_{phase}_ms"]
            ind = r[f"inductor_{phase}_ms"]
            copy = r.get(f"copy_{phase}_ms", float("nan"))
            lines.append(f"| {r['D']} | {r['rows']} | {phase} | {floor:.4f} | {copy:.4f} | " + " | ".join(cells)
                         + f" | {mine / floor:.2f} | {mine / copy:.2f} | {mine / ind:.2f} | "
                         f"{r[f'ours_backend_{phase}_ms'] / ind:.2f} |")
    lines += ["", "Peak memory over inputs during one forward+backward (MB):", "",
              "| D | rows | " + " | ".join(names) + " |", "|" + "---|" * (len(names) + 2)]
    for r in rows:
        lines.append(f"| {r['D']} | {r['rows']} | "
                     + " | ".join(f"{r[f'{nm}_peak_mb']:.1f}" for nm in names) + " |")
    return "\n".join(lines) + "\n"


def run(report_rows: list, quick: bool = False) -> dict:
    """Measure every shape, appending one dict per (D, rows) to ``report_rows``; returns the env."""
    torch.manual_seed(0)
    env = environment()
    env["copy_TBps"] = copy_bandwidth() / 1e12
    glu_fusion.config.rewrite_devices = ("cuda",)
    for d in DIMS:
        for rows in (QUICK_ROWS if quick else ROWS):
            glu_fusion.report().reset()
            report_rows.append(measure(d, rows, env["copy_TBps"] * 1e12, make_variants()))
            report_rows[-1]["rewrites"] = glu_fusion.report().counts()
            print(json.dumps(report_rows[-1]), file=sys.stderr, flush=True)
    return env


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--json", required=True)
    parser.add_argument("--md", required=True)
    parser.add_argument("--quick", action="store_true", help="fewer row counts")
    args = parser.parse_args(argv)
    rows: list = []
    env = run(rows, quick=args.quick)
    table = markdown(rows, env)
    write_results(args.json, args.md, {"env": env, "rows": rows}, table)
    print(table)
    return 0


if __name__ == "__main__":
    sys.exit(main())
