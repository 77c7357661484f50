"""SwiGLU benchmark on a CUDA device: eager, Inductor default, our op, our backend, the floor.

Every figure is the median of ``triton.testing.do_bench`` over warm runs on random inputs.
Floors measured in the same run: one cuBLAS GEMM ``x·[Wg;Wu]ᵀ`` (forward), the three GEMMs of a
forward+backward (``x·Wᵀ``, ``dH·W``, ``dHᵀ·x``), and for small M the weight bytes over the
measured device-copy bandwidth.  Peak memory is the allocator's peak over the inputs' baseline
during one forward+backward.

    python benchmarks/bench_swiglu.py --json out.json --md out.md [--quick]
"""
from __future__ import annotations

import argparse
import functools
import json
import sys

import torch

import glu_fusion
import glu_fusion.patterns.routing
from _measure import (GatedMLP, apply_switches, bench, copy_bandwidth, eager_swiglu, environment, time_phases,
                      write_results)

glu_fusion.patterns.routing.ROUTE_BY_MEASUREMENT = False  # measure our path on every shape, not the routed default
SHAPES = [(4096, 14336), (1024, 3072), (2048, 8192)]
TOKENS = [1, 16, 128, 1024, 4096, 16384]
QUICK_SHAPES = [(4096, 14336), (1024, 3072)]
QUICK_TOKENS = [1, 4096, 16384]
CUDA_GRAPH_MAX_TOKENS = 1024
# The pass rewrites CUDA graphs only by default; make sure this run measures the rewritten path.
glu_fusion.config.rewrite_devices = ("cuda",)
# Each shape compiles one module up to ten times (variants x grad modes); past Dynamo's
# recompile limit a variant would silently run eager.
for _limit in ("cache_size_limit", "recompile_limit"):
    if hasattr(torch._dynamo.config, _limit):
        setattr(torch._dynamo.config, _limit, 64)


DEFAULTS = {"forward_tma": True, "recompute": False}


def measure_shape(k: int, n: int, m: int, bandwidth: float) -> dict:
    dtype = torch.bfloat16
    x = torch.randn(m, k, device="cuda", dtype=dtype, requires_grad=True)
    module = GatedMLP((torch.randn(n, k, device="cuda") * k ** -0.5).to(dtype),
                      (torch.randn(n, k, device="cuda") * k ** -0.5).to(dtype))
    wg, wu = module.wg, module.wu
    variants = make_variants(m, module)
    w_cat = torch.cat([wg, wu]).detach()
    dout = torch.randn(m, n, device="cuda", dtype=dtype)
    dh = torch.randn(m, 2 * n, device="cuda", dtype=dtype)
    xd = x.detach()
    row = {"K": k, "N": n, "M": m}

    row["floor_fwd_ms"] = bench(lambda: xd @ w_cat.t())
    row["floor_fwdbwd_ms"] = row["floor_fwd_ms"] + bench(lambda: dh @ w_cat) + bench(lambda: dh.t() @ xd)
    row["weight_read_floor_ms"] = 2 * n * k * 2 / bandwidth * 1e3
    for name, (fn, settings) in variants.items():
        apply_switches({**DEFAULTS, **settings})

        def fwd():
            with torch.no_grad():
                return fn(x, wg, wu)

        def fwdbwd():
            out = fn(x, wg, wu)
            return torch.autograd.grad(out, (x, wg, wu), dout)

        row.update({f"{name}_{key}": value for key, value in time_phases(fwd, fwdbwd).items()})
    apply_switches(DEFAULTS)
    return row


def ours_op(x, wg, wu):
    return glu_fusion.swiglu(x, wg, wu)


def make_variants(m: int, module: GatedMLP) -> dict:
    """name -> (function of (x, wg, wu), switches (``_measure.apply_switches``) while it compiles and runs).
    Compiled variants compile the module, whose parameters are ``wg`` and ``wu``."""
    torch._dynamo.reset()

    def compiled(**options):
        model = torch.compile(module, dynamic=False, **options)
        return lambda x, wg, wu: model(x)

    def ours_compiled(**patches):
        # A distinct backend object per variant: Dynamo reuses a compiled frame for the same
        # code and backend, which would hide a setting such as recompute.
        return compiled(backend=functools.partial(glu_fusion.backend, config_patches=patches))

    variants = {
        "eager": (eager_swiglu, {}),
        "inductor": (compiled(), {}),
        "ours_backend": (ours_compiled(), {}),
        "ours_backend_recompute": (ours_compiled(), {"recompute": True}),
        "ours_op": (ours_op, {}),
        "ours_op_ptrfwd": (ours_op, {"forward_tma": False}),
    }
    if m <= CUDA_GRAPH_MAX_TOKENS:  # launch-bound sizes: both sides also with CUDA graphs
        variants["inductor_cg"] = (compiled(mode="reduce-overhead"), {})
        variants["ours_backend_cg"] = (ours_compiled(**{"triton.cudagraphs": True}), {})
    return variants


def markdown(rows: list, env: dict) -> str:
    names = []
    for r in rows:
        names += [k[:-7] for k in r if k.endswith("_fwd_ms") and not k.startswith("floor") and k[:-7] not in names]
    lines = [f"SwiGLU bf16 on {env['device']}, torch {env['torch']}, triton {env['triton']}, "
             f"{env['date']}; copy bandwidth {env['copy_TBps']:.2f} TB/s. Medians in ms. floor: one cuBLAS "
             "GEMM x·[Wg;Wu]ᵀ (fwd) or the three GEMMs of fwd+bwd; wread: weight bytes over copy "
             "bandwidth. ours = ours_backend (pass + ops); ratios below 1 mean faster. cg = CUDA graphs.", ""]
    ratio_cols = ["ours/floor", "ours/wread", "ours/inductor", "ours_cg/inductor_cg"]
    header = "| K→N | M | pass | floor | wread | " + " | ".join(names) + " | " + " | ".join(ratio_cols) + " |"
    lines += [header, "|" + "---|" * (header.count("|") - 1)]

    def cell(r, key, fmt="{:.3f}"):
        return fmt.format(r[key]) if key in r else "–"

    for r in rows:
        for phase, floor_key in (("fwd", "floor_fwd_ms"), ("fwdbwd", "floor_fwdbwd_ms")):
            ours = r[f"ours_backend_{phase}_ms"]
            wread = r["weight_read_floor_ms"] if phase == "fwd" else None
            ratios = [f"{ours / r[floor_key]:.2f}", f"{ours / wread:.2f}" if wread else "–",
                      f"{ours / r[f'inductor_{phase}_ms']:.2f}",
                      f"{r[f'ours_backend_cg_{phase}_ms'] / r[f'inductor_cg_{phase}_ms']:.2f}"
                      if f"inductor_cg_{phase}_ms" in r else "–"]
            lines.append(f"| {r['K']}→{r['N']} | {r['M']} | {phase} | {r[floor_key]:.3f} | "
                         f"{f'{wread:.3f}' if wread else '–'} | "
                         + " | ".join(cell(r, f"{nm}_{phase}_ms") for nm in names) + " | " + " | ".join(ratios) + " |")
    lines += ["", "Peak memory over inputs during one forward+backward (MB):", "",
              "| K→N | M | " + " | ".join(names) + " | ours/inductor | ours_recompute/inductor |",
              "|" + "---|" * (len(names) + 4)]
    for r in rows:
        ind = max(r["inductor_peak_mb"], 1e-9)
        lines.append(f"| {r['K']}→{r['N']} | {r['M']} | " + " | ".join(cell(r, f"{nm}_peak_mb", "{:.0f}") for nm in names)
                     + f" | {r['ours_backend_peak_mb'] / ind:.2f} | {r['ours_backend_recompute_peak_mb'] / ind:.2f} |")
    return "\n".join(lines) + "\n"


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--json", required=True)
    parser.add_argument("--md", required=True)
    parser.add_argument("--quick", action="store_true", help="fewer shapes")
    args = parser.parse_args(argv)
    torch.manual_seed(0)
    env = environment()
    env["copy_TBps"] = copy_bandwidth() / 1e12
    rows = []
    shapes = QUICK_SHAPES if args.quick else SHAPES
    tokens = QUICK_TOKENS if args.quick else TOKENS
    for k, n in shapes:
        for m in tokens:
            # Fresh compiled functions per shape: no recompile limit, no dynamic-shape fallback.
            rows.append(measure_shape(k, n, m, env["copy_TBps"] * 1e12))
            print(json.dumps(rows[-1]), file=sys.stderr, flush=True)
            write(args, env, rows)  # after every shape: a cut-off run keeps what it measured
    print(markdown(rows, env))
    return 0


def write(args, env: dict, rows: list) -> None:
    write_results(args.json, args.md, {"env": env, "rows": rows}, markdown(rows, env))


if __name__ == "__main__":
    sys.exit(main())
