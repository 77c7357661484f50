"""The Gluon GEMM engine against cuBLAS on one GPU (H200): every GEMM of one MLP forward and
backward, the SwiGLU forward epilogue and the dgated backward epilogue against cuBLAS plus
Inductor's elementwise kernel.  Each engine configuration is checked against a float32
reference before it is timed (and again after, on a poisoned output); times are CUDA-event
medians (``triton.testing.do_bench``), GPU time only.

    python benchmarks/bench_engine.py --json out/engine.json --md out/engine.md [--quick]
"""
from __future__ import annotations

import argparse
import json
import statistics
import time

import torch
import triton
from triton.testing import do_bench

from glu_fusion.kernels.engine import host
from glu_fusion.kernels.engine.host import Config

WIDTHS = [(1024, 3072), (2048, 8192), (4096, 14336)]  # (D, N): hidden -> MLP width
TOKENS = [4096, 16384]

GEMM_CONFIGS = [
    Config(128, 256, 64, 3),
    Config(128, 256, 64, 4, store_n=64, store_bufs=2),
    Config(128, 128, 64, 3, pingpong=True, store_n=64),
    Config(128, 128, 64, 2, pingpong=True, store_n=64, store_bufs=2),
    Config(128, 128, 64, 5),
]
SPLIT_CONFIGS = [host.WEIGHT_GRAD_SPLIT, Config(128, 128, 64, 4, store_n=64)]
SPLITS = [2, 3, 4, 6]
SWIGLU_CONFIGS = [
    Config(128, 128, 64, 4),
    Config(128, 128, 64, 4, store_n=64, store_bufs=2),
    Config(128, 128, 64, 3),
    Config(64, 128, 64, 2, pingpong=True, store_n=64, store_bufs=2),
]
DGATED_CONFIGS = [host.DGATED, host.DGATED_WIDE]


def warm_up(seconds: float = 2.0) -> None:
    """Large GEMMs for a while first, so that the first shape does not time a GPU still raising
    its clocks."""
    a = torch.randn(8192, 8192, device="cuda", dtype=torch.bfloat16)
    end = time.perf_counter() + seconds
    while time.perf_counter() < end:
        for _ in range(10):
            a @ a
        torch.cuda.synchronize()


def bench(fn) -> float:
    return do_bench(fn, warmup=25, rep=100, return_mode="median") * 1e3  # µs


def relerr(x: torch.Tensor, ref: torch.Tensor) -> float:
    return ((x.float() - ref).norm() / ref.norm().clamp_min(1e-30)).item()


def try_config(run, check, poison) -> tuple[float, float] | tuple[None, str]:
    """(µs, error) for a configuration that runs and is right; (None, why) otherwise."""
    try:
        poison()
        run()
        torch.cuda.synchronize()
    except Exception as e:  # a configuration that does not fit or does not compile
        return None, f"{type(e).__name__}: {str(e)[:160]}"
    err = check()
    if not err < 1e-2:
        return None, f"wrong: relerr {err:.2e}"
    t = bench(run)
    poison()
    run()
    err2 = check()
    if not err2 < 1e-2:
        return None, f"wrong after timing: relerr {err2:.2e}"
    return t, max(err, err2)


def gemm_cases(m: int, d: int, n: int):
    """(name, a, b) with out = a·b, in the layouts one MLP forward and backward read."""
    bf = torch.bfloat16
    x = torch.randn(m, d, device="cuda", dtype=bf)
    wgu = torch.randn(2 * n, d, device="cuda", dtype=bf) / d ** 0.5
    wd = torch.randn(d, n, device="cuda", dtype=bf) / n ** 0.5
    h = torch.randn(m, n, device="cuda", dtype=bf)
    dy = torch.randn(m, d, device="cuda", dtype=bf)
    dgu = torch.randn(m, 2 * n, device="cuda", dtype=bf) / n ** 0.5
    return [
        ("gate/up x·Wᵀ", x, wgu.t()),
        ("down h·Wdᵀ", h, wd.t()),
        ("down dX dY·Wd", dy, wd),
        ("gate/up dX dH·W", dgu, wgu),
        ("down dW dYᵀ·h", dy.t(), h),
        ("gate/up dW dHᵀ·x", dgu.t(), x),
    ]


def run_gemms(rows: list, quick: bool) -> None:
    for d, n in WIDTHS:
        for m in TOKENS[-1:] if quick else TOKENS:
            for name, a, b in gemm_cases(m, d, n):
                ref = a.float() @ b.float()
                out = torch.empty(a.shape[0], b.shape[1], device="cuda", dtype=torch.bfloat16)
                t_cublas = bench(lambda: torch.mm(a, b, out=out))
                best = None
                tried = {}
                # a weight gradient (tokens as the reduction) also tries its reduction in splits
                choices = [(cfg, 1) for cfg in GEMM_CONFIGS]
                if "dW" in name:
                    choices += [(cfg, s) for cfg in SPLIT_CONFIGS for s in SPLITS]
                for cfg, splits in choices:
                    t, info = try_config(lambda: host.matmul(a, b, out, cfg=cfg, splits=splits),
                                         lambda: relerr(out, ref), lambda: out.fill_(float("nan")))
                    label = cfg.name + (f"_split{splits}" if splits > 1 else "")
                    tried[label] = round(t, 1) if t is not None else info
                    if t is not None and (best is None or t < best[0]):
                        best = (t, label)
                flops = 2.0 * a.shape[0] * a.shape[1] * b.shape[1]
                row = dict(kind="gemm", op=name, M=m, D=d, N=n, shape=[a.shape[0], b.shape[1], a.shape[1]],
                           cublas_us=round(t_cublas, 1), cublas_tflops=round(flops / t_cublas / 1e6, 1),
                           engine_us=round(best[0], 1) if best else None, config=best[1] if best else None,
                           ratio=round(t_cublas / best[0], 3) if best else None, tried=tried)
                rows.append(row)
                print(f"gemm {name:18s} M={m:5d} {d}->{n}: cuBLAS {t_cublas:8.1f} us  engine "
                      f"{row['engine_us']} us  cuBLAS/engine {row['ratio']}  {row['config']}", flush=True)
                del ref, out
            torch.cuda.empty_cache()


def run_epilogues(rows: list, quick: bool) -> None:
    """Each fused kernel against what Inductor runs for the same work in a model: cuBLAS GEMMs
    and one fused elementwise kernel.  The forward's baseline is the faster of two spellings,
    separate gate and up weights (two GEMMs, as Llama's ``gate_proj``/``up_proj``) and one packed
    ``[2N, K]`` weight (one GEMM, then ``chunk``); the dgated baseline is ``dY·Wd`` and the gate's
    backward writing dG, dU and h as three tensors, as Inductor's backward graph does."""
    bf = torch.bfloat16
    silu = torch.nn.functional.silu

    @torch.compile
    def gate_separate(x, wg, wu):
        return silu(x @ wg.t()) * (x @ wu.t())

    @torch.compile
    def gate_packed(x, wgu):
        g, u = (x @ wgu.t()).chunk(2, dim=-1)
        return silu(g) * u

    @torch.compile
    def dgated_unfused(dy, wd, g, u):
        dh = (dy @ wd).float()
        g, u = g.float(), u.float()
        sig = torch.sigmoid(g)
        return ((dh * u * sig * (1 + g * (1 - sig))).to(bf), (dh * g * sig).to(bf), (g * sig * u).to(bf))

    for d, n in WIDTHS:
        for m in TOKENS[-1:] if quick else TOKENS:
            x = torch.randn(m, d, device="cuda", dtype=bf)
            wgu = torch.randn(2 * n, d, device="cuda", dtype=bf) / d ** 0.5
            wg, wu = wgu[:n], wgu[n:]
            wg_own, wu_own = wg.clone(), wu.clone()
            gu_ref = x.float() @ wgu.float().t()
            g_ref, u_ref = gu_ref[:, :n], gu_ref[:, n:]
            h_ref = torch.nn.functional.silu(g_ref) * u_ref
            t_separate = bench(lambda: gate_separate(x, wg_own, wu_own))
            t_packed = bench(lambda: gate_packed(x, wgu))
            t_base = min(t_separate, t_packed)
            h = torch.empty(m, n, device="cuda", dtype=bf)
            pre = torch.empty(m, 2 * n, device="cuda", dtype=bf)
            for save in (False, True):
                best, tried = None, {}
                for cfg in SWIGLU_CONFIGS:
                    outs = (pre[:, :n], pre[:, n:]) if save else (None, None)

                    def check():
                        e = relerr(h, h_ref)
                        if save:
                            e = max(e, relerr(pre[:, :n], g_ref), relerr(pre[:, n:], u_ref))
                        return e

                    def poison():
                        h.fill_(float("nan"))
                        pre.fill_(float("nan"))
                    t, info = try_config(lambda: host.swiglu_forward(x, wg, wu, None, None, h, *outs, cfg=cfg),
                                         check, poison)
                    tried[cfg.name] = round(t, 1) if t is not None else info
                    if t is not None and (best is None or t < best[0]):
                        best = (t, cfg.name)
                row = dict(kind="swiglu_fwd", op="h, g, u" if save else "h", M=m, D=d, N=n,
                           baseline_us=round(t_base, 1), baseline_separate_us=round(t_separate, 1),
                           baseline_packed_us=round(t_packed, 1), engine_us=round(best[0], 1) if best else None,
                           config=best[1] if best else None, ratio=round(t_base / best[0], 3) if best else None,
                           tried=tried)
                rows.append(row)
                print(f"swiglu fwd ({row['op']:7s}) M={m:5d} {d}->{n}: cuBLAS+Inductor {t_base:8.1f} us  engine "
                      f"{row['engine_us']} us  ratio {row['ratio']}  {row['config']}", flush=True)
            # backward: dh = dY·Wd with the gate's backward in the epilogue
            dy = torch.randn(m, d, device="cuda", dtype=bf)
            wd = torch.randn(d, n, device="cuda", dtype=bf) / n ** 0.5
            gu = (x @ wgu.t())
            dh_ref = dy.float() @ wd.float()
            g32, u32 = gu[:, :n].float(), gu[:, n:].float()
            sig = torch.sigmoid(g32)
            dg_ref, du_ref, hh_ref = dh_ref * u32 * sig * (1 + g32 * (1 - sig)), dh_ref * g32 * sig, g32 * sig * u32
            del sig, g32, u32, dh_ref
            g_own, u_own = gu[:, :n].contiguous(), gu[:, n:].contiguous()
            t_base = min(bench(lambda: dgated_unfused(dy, wd, gu[:, :n], gu[:, n:])),
                         bench(lambda: dgated_unfused(dy, wd, g_own, u_own)))
            del g_own, u_own
            dgu = torch.empty(m, 2 * n, device="cuda", dtype=bf)
            hh = torch.empty(m, n, device="cuda", dtype=bf)
            best, tried = None, {}
            for cfg in DGATED_CONFIGS:
                def check():
                    return max(relerr(dgu[:, :n], dg_ref), relerr(dgu[:, n:], du_ref), relerr(hh, hh_ref))

                def poison():
                    dgu.fill_(float("nan"))
                    hh.fill_(float("nan"))
                t, info = try_config(lambda: host.dgated(dy, wd, gu[:, :n], gu[:, n:], dgu[:, :n], dgu[:, n:], hh,
                                                         cfg=cfg), check, poison)
                tried[cfg.name] = round(t, 1) if t is not None else info
                if t is not None and (best is None or t < best[0]):
                    best = (t, cfg.name)
            row = dict(kind="dgated", op="dG, dU, h", M=m, D=d, N=n, baseline_us=round(t_base, 1),
                       engine_us=round(best[0], 1) if best else None, config=best[1] if best else None,
                       ratio=round(t_base / best[0], 3) if best else None, tried=tried)
            rows.append(row)
            print(f"dgated             M={m:5d} {d}->{n}: cuBLAS+Inductor {t_base:8.1f} us  engine "
                  f"{row['engine_us']} us  ratio {row['ratio']}  {row['config']}", flush=True)
            del x, wgu, wg_own, wu_own, gu_ref, g_ref, u_ref, h_ref, h, pre, dy, wd, gu, dg_ref, du_ref, hh_ref, dgu, hh
            torch.cuda.empty_cache()


def markdown(meta: dict, rows: list) -> str:
    lines = [f"# Engine against cuBLAS ({meta['gpu']}, torch {meta['torch']}, triton {meta['triton']}, "
             f"{meta['date']})", "",
             "GPU time, CUDA-event medians in µs. Ratio = baseline time / engine time: above 1 the engine is "
             "faster.", "",
             "## Plain GEMMs of one MLP forward and backward (baseline: cuBLAS)", "",
             "| GEMM | M | D→N | out×K | cuBLAS µs | engine µs | ratio | config |", "|---|---|---|---|---|---|---|---|"]
    gemm = [r for r in rows if r["kind"] == "gemm"]
    for r in gemm:
        mm, nn, kk = r["shape"]
        lines.append(f"| {r['op']} | {r['M']} | {r['D']}→{r['N']} | {mm}×{nn}×{kk} | {r['cublas_us']} | "
                     f"{r['engine_us']} | {r['ratio']} | {r['config']} |")
    ratios = [r["ratio"] for r in gemm if r["ratio"]]
    if ratios:
        lines += ["", f"Median ratio {statistics.median(ratios):.3f}, minimum {min(ratios):.3f} "
                  f"({len(ratios)} GEMMs)."]
    lines += ["", "## Fused epilogues (baseline: cuBLAS GEMM + Inductor's elementwise kernel)", "",
              "| epilogue | writes | M | D→N | baseline µs | engine µs | ratio | config |",
              "|---|---|---|---|---|---|---|---|"]
    for r in rows:
        if r["kind"] != "gemm":
            lines.append(f"| {r['kind']} | {r['op']} | {r['M']} | {r['D']}→{r['N']} | {r['baseline_us']} | "
                         f"{r['engine_us']} | {r['ratio']} | {r['config']} |")
    return "\n".join(lines) + "\n"


def plot(meta: dict, rows: list, path: str) -> None:
    """One bar per GEMM or epilogue: baseline time / engine time (above 1: the engine is
    faster), with the 0.98 and 1.0 lines of the targets."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    done = [r for r in rows if r.get("ratio")]
    labels = [f"{r['op']} {r['D']}→{r['N']} M={r['M']}" if r["kind"] == "gemm"
              else f"{r['kind']} ({r['op']}) {r['D']}→{r['N']} M={r['M']}" for r in done]
    fig, ax = plt.subplots(figsize=(max(8, 0.28 * len(done)), 4.8))
    ax.bar(range(len(done)), [r["ratio"] for r in done],
           color=["tab:blue" if r["kind"] == "gemm" else "tab:orange" for r in done])
    for y in (0.98, 1.0):
        ax.axhline(y, color="black", linewidth=0.6, linestyle=":" if y < 1 else "-")
    ax.set_xticks(range(len(done)), labels, rotation=75, ha="right", fontsize=6)
    ax.set_ylabel("baseline time / engine time")
    ax.set_title(f"Engine vs cuBLAS (blue) and cuBLAS + Inductor's elementwise kernel (orange); "
                 f"{meta['gpu']}, torch {meta['torch']}, triton {meta['triton']}, {meta['date']}", fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--json", required=True)
    parser.add_argument("--md", required=True)
    parser.add_argument("--png", help="a bar plot of every ratio")
    parser.add_argument("--quick", action="store_true", help="M = 16384 only")
    parser.add_argument("--only", choices=("gemm", "epilogues"), default=None)
    parser.add_argument("--widths", help="D->N widths in this order, as 4096x14336,1024x3072 (default: all)")
    args = parser.parse_args()
    if args.widths:
        WIDTHS[:] = [tuple(int(v) for v in w.split("x")) for w in args.widths.split(",")]
    torch.manual_seed(0)
    meta = dict(gpu=torch.cuda.get_device_name(), torch=torch.__version__, triton=triton.__version__,
                date=time.strftime("%Y-%m-%d"))
    print(meta, flush=True)
    warm_up()
    rows: list = []
    if args.only in (None, "gemm"):
        run_gemms(rows, args.quick)
    if args.only in (None, "epilogues"):
        run_epilogues(rows, args.quick)
    with open(args.json, "w") as f:
        json.dump(dict(meta=meta, rows=rows), f, indent=1)
    with open(args.md, "w") as f:
        f.write(markdown(meta, rows))
    if args.png:
        plot(meta, rows, args.png)
    print(markdown(meta, rows))


if __name__ == "__main__":
    main()
