"""Norm benchmark in GPU time: Inductor's generated kernels against our pass and ops, per shape.

Three spellings, bf16, as models write them:

* ``gated``: Qwen3-Next's ``RMSNormGated`` (fp32 norm, weight after the downcast, ``silu`` gate in
  fp32, one rounding at the end), ``y = rmsnorm(x)·w·silu(z)``;
* ``llama``: HF Llama / Qwen3 residual + RMSNorm, ``h = x + r; y = w · rmsnorm(h)``, returning y and h;
* ``gemma``: the same with Gemma's ``(1 + w.float())`` in fp32 and ``type_as``.

Each shape is compiled on its own (static shapes, ``torch._dynamo.reset()`` between shapes), once
with ``torch.compile``'s default (``inductor``) and once with ``backend=glu_fusion.backend`` with
the rewrite forced on (``ours``: the routing table and the plain-norm device list switched so
that every site is rewritten; the row's ``rewrites`` says what the pass did).  Both phases:
``fwd`` (under ``no_grad``: an inference graph) and ``fwdbwd`` (``autograd.grad`` of every input
and the weight).

Two clocks per variant:

* ``graph``: GPU time per call with CUDA graphs on both sides: ``k`` calls captured in one
  ``torch.cuda.CUDAGraph``, replayed and timed with CUDA events (median replay / k), so host
  overhead is gone and the launch gaps between kernels are what the GPU sees at decode;
* ``wall``: wall time per call without CUDA graphs, over a block of calls between two
  synchronisations (best of three blocks): what an eager-launched compiled model pays.

``copy``: one device copy moving the bytes the fused computation must move, timed with CUDA
graphs like the variants: forward reads x and z (or the residual) and writes y (and h) once; the
backward adds dy (dh), the saved input(s) read and dx, dz written (8 tensor passes in all).

Ratios: ``inductor / ours`` per clock (> 1: ours faster); ``ours / copy`` (1 is the floor).

D = 128 is a per-head norm over ``[tokens, heads, 128]`` (16 and 32 heads); D >= 1024 a hidden
norm over ``[tokens, D]``.  ``--quick`` runs a shape list sized for one device call; the run stops
taking new shapes when ``--budget-s`` would be passed (what was skipped is listed in the output),
and the JSON and markdown are rewritten after every shape, so a cut-off run keeps its rows.

    python benchmarks/bench_norms.py --quick --json norms.json --md norms.md
    python benchmarks/bench_norms.py --family gated --json norm.json --md norm.md
    python benchmarks/bench_norms.py --device cpu --tiny --json /tmp/n.json --md /tmp/n.md   # logic only
"""
from __future__ import annotations

import argparse
import json
import math
import statistics
import sys
import time
from typing import Callable, Optional

import torch
import torch.nn.functional as F

EPS = 1e-6

# --- the spellings ----------------------------------------------------------------------------------


def gated(x, z, w):
    """Qwen3-Next ``RMSNormGated``."""
    dtype = x.dtype
    h = x.to(torch.float32)
    h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + EPS)
    h = w * h.to(dtype)
    h = h * F.silu(z.to(torch.float32))
    return h.to(dtype)


def llama(x, r, w):
    """HF Llama decoder: the residual add in bf16, the norm in fp32, the weight after the downcast."""
    h = x + r
    dtype = h.dtype
    hf = h.to(torch.float32)
    hf = hf * torch.rsqrt(hf.pow(2).mean(-1, keepdim=True) + EPS)
    return w * hf.to(dtype), h


def gemma(x, r, w):
    """Gemma: ``(1 + w)`` in fp32, then ``type_as``."""
    h = x + r
    hf = h.float()
    out = hf * torch.rsqrt(hf.pow(2).mean(-1, keepdim=True) + EPS)
    out = out * (1.0 + w.float())
    return out.type_as(h), h


#: family -> (function, report family, tensor passes moved in fwd, in fwd+bwd)
FAMILIES = {"gated": (gated, "rms_norm_gated", 3, 8),
            "llama": (llama, "rms_norm", 4, 8),
            "gemma": (gemma, "rms_norm", 4, 8)}

# --- shapes -----------------------------------------------------------------------------------------

HEAD_DIM = 128
WIDE = (1024, 2048, 4096, 8192)
MAX_ROWS = 131072
MAX_TENSOR_BYTES = 2 << 30


def _heads(tokens_per_heads) -> list:
    return [(HEAD_DIM, (t, h)) for h, toks in tokens_per_heads for t in toks]


#: (D, leading shape) in priority order: the quick list first (decode and large for every D).
QUICK_SHAPES = (_heads([(16, (1, 64, MAX_ROWS // 16)), (32, (8, MAX_ROWS // 32))])
                + [(d, (t,)) for d in WIDE for t in (8, 16384)])
FULL_SHAPES = QUICK_SHAPES + [s for s in (
    _heads([(16, (8, 512, 4096)), (32, (1, 64, 512))])
    + [(d, (t,)) for d in WIDE for t in (1, 64, 1024, 32768, MAX_ROWS)]) if s not in QUICK_SHAPES]
TINY_SHAPES = [(HEAD_DIM, (2, 4)), (1024, (8,))]


def rows_of(lead) -> int:
    return math.prod(lead)


# --- clocks -----------------------------------------------------------------------------------------


def _sync(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


def wall_ms(fn: Callable[[], object], device: str, target_ms: float = 10.0) -> float:
    """Wall milliseconds per call without CUDA graphs: best of three blocks of back-to-back calls,
    the device drained before and after each block (a block lasts about ``target_ms``)."""
    for _ in range(5):  # first calls after a compile run slower (lazy loads, allocator growth)
        fn()
    _sync(device)
    start = time.perf_counter()
    fn()
    _sync(device)
    one = max(time.perf_counter() - start, 1e-6) * 1e3
    calls = int(min(200, max(3, target_ms / one)))
    best = float("inf")
    for _ in range(3):
        _sync(device)
        start = time.perf_counter()
        for _ in range(calls):
            fn()
        _sync(device)
        best = min(best, (time.perf_counter() - start) * 1e3 / calls)
    return best


def graph_ms(fn: Callable[[], object], estimate_ms: float, target_ms: float = 20.0) -> float:
    """GPU milliseconds per call with CUDA graphs: ``k`` calls captured in one graph (warmed on a
    side stream first, as capture requires), the median over timed replays, divided by ``k``."""
    k = int(min(50, max(1, math.ceil(0.5 / max(estimate_ms, 1e-4)))))
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        for _ in range(3):
            fn()
    torch.cuda.current_stream().wait_stream(stream)
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        for _ in range(k):
            fn()
    graph.replay()
    torch.cuda.synchronize()
    replays = int(min(50, max(5, target_ms / max(k * estimate_ms, 1e-3))))
    times = []
    for _ in range(replays):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        graph.replay()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end) / k)
    del graph
    return statistics.median(times)


def timed(fn: Callable[[], object], device: str) -> dict:
    """Both clocks for one warm callable (``graph_ms`` is None off CUDA)."""
    wall = wall_ms(fn, device)
    if device != "cuda":
        return {"wall_ms": wall, "graph_ms": None}
    try:
        return {"wall_ms": wall, "graph_ms": graph_ms(fn, wall)}
    except Exception as err:  # a capture that fails shows in the row (n/a), the run goes on
        torch.cuda.synchronize()
        return {"wall_ms": wall, "graph_ms": None, "graph_error": repr(err)[:300]}


# --- one shape --------------------------------------------------------------------------------------


def _variants(fn) -> dict:
    import glu_fusion
    torch._dynamo.reset()
    return {"inductor": torch.compile(fn, dynamic=False),
            "ours": torch.compile(fn, backend=glu_fusion.backend, dynamic=False)}


def measure(family: str, d: int, lead: tuple, device: str) -> dict:
    import glu_fusion
    fn, report_family, fwd_passes, bwd_passes = FAMILIES[family]
    dtype = torch.bfloat16
    shape = (*lead, d)
    x = torch.randn(shape, device=device, dtype=dtype, requires_grad=True)
    other = (2 * torch.randn(shape, device=device)).to(dtype).requires_grad_()
    w = (0.1 * torch.randn(d, device=device) + (0.0 if family == "gemma" else 1.0)).to(dtype).requires_grad_()
    cot = [torch.randn(shape, device=device, dtype=dtype) for _ in range(1 if family == "gated" else 2)]
    inputs = (x, other, w)
    row = {"family": family, "D": d, "shape": list(shape), "rows": rows_of(lead)}
    numel = rows_of(lead) * d
    for phase, passes in (("fwd", fwd_passes), ("fwdbwd", bwd_passes)):
        src = torch.randn(passes * numel // 2 + 1, device=device).to(dtype)
        dst = torch.empty_like(src)
        row[f"copy_{phase}"] = timed(lambda: dst.copy_(src), device)
        del src, dst
    for name, compiled in _variants(fn).items():
        def fwd():
            with torch.no_grad():
                return compiled(*inputs)

        def fwdbwd():
            out = compiled(*inputs)
            return torch.autograd.grad(out if family == "gated" else list(out), inputs, cot)

        glu_fusion.report().reset()
        for _ in range(2):  # compile both graphs (inference, training) outside the timed windows
            fwd(), fwdbwd()
        _sync(device)
        if name == "ours":
            counts = glu_fusion.report().counts()
            row["rewrites"] = counts
            row["rewritten"] = counts.get(report_family, 0) == 2  # one site in each graph
        for phase, call in (("fwd", fwd), ("fwdbwd", fwdbwd)):
            row[f"{name}_{phase}"] = timed(call, device)
    return row


# --- results ----------------------------------------------------------------------------------------


def _us(v: Optional[float]) -> str:
    return "n/a" if v is None else f"{v * 1e3:.1f}"


def _ratio(a: Optional[float], b: Optional[float]) -> str:
    return "n/a" if a is None or b is None or b <= 0 else f"{a / b:.2f}"


def markdown(rows: list, env: dict) -> str:
    lines = [f"Norms, bf16, on {env['device']}, torch {env['torch']}, triton {env.get('triton', '?')}, {env['date']}; "
             "every shape compiled on its own (static shapes).  inductor: `torch.compile` default; ours: "
             "`backend=glu_fusion.backend` with the rewrite forced on.  Times in microseconds per call.  "
             "graph: GPU time with CUDA graphs on both sides (captured calls, replay timed with events); "
             "wall: wall time per call without CUDA graphs.  copy: one device copy of the bytes the fused "
             "computation moves (inputs read, outputs written once; fwdbwd adds the backward's tensors).  "
             "**ratio = inductor time / ours (> 1: ours faster)**; ours/copy: 1 is the floor.  D = 128 rows "
             "are per-head norms over [tokens, heads, 128].", ""]
    if env.get("skipped"):
        lines += [f"Not measured (time budget of {env.get('budget_s')} s reached): "
                  + ", ".join(env["skipped"]), ""]
    header = ("| family | D | shape | rows | pass | copy graph | inductor graph | ours graph | ratio graph | "
              "inductor wall | ours wall | ratio wall | ours/copy (graph) | rewritten |")
    lines += [header, "|" + "---|" * (header.count("|") - 1)]
    for r in rows:
        for phase in ("fwd", "fwdbwd"):
            cp, ind, ours = r[f"copy_{phase}"], r[f"inductor_{phase}"], r[f"ours_{phase}"]
            lines.append(
                f"| {r['family']} | {r['D']} | {'x'.join(map(str, r['shape']))} | {r['rows']} | {phase} | "
                f"{_us(cp['graph_ms'])} | {_us(ind['graph_ms'])} | {_us(ours['graph_ms'])} | "
                f"{_ratio(ind['graph_ms'], ours['graph_ms'])} | {_us(ind['wall_ms'])} | {_us(ours['wall_ms'])} | "
                f"{_ratio(ind['wall_ms'], ours['wall_ms'])} | {_ratio(ours['graph_ms'], cp['graph_ms'])} | "
                f"{'yes' if r.get('rewritten') else 'NO: ' + json.dumps(r.get('rewrites'))} |")
    return "\n".join(lines) + "\n"


def environment(device: str) -> dict:
    import datetime
    env = {"device": torch.cuda.get_device_name() if device == "cuda" else "cpu", "torch": torch.__version__,
           "date": datetime.date.today().isoformat()}
    try:
        import triton
        env["triton"] = triton.__version__
    except ImportError:
        pass
    return env


def write(json_path: str, md_path: str, rows: list, env: dict) -> str:
    table = markdown(rows, env)
    with open(json_path, "w") as f:
        json.dump({"env": env, "rows": rows}, f, indent=1)
    with open(md_path, "w") as f:
        f.write(table)
    return table


def force_rewrites(device: str) -> None:
    """Every matched norm site rewritten on ``device``: what ``ours`` measures."""
    import glu_fusion
    from glu_fusion.patterns import rms_norm as norm_patterns
    from glu_fusion.patterns import routing
    glu_fusion.config.rewrite_devices = (device,)
    routing.ROUTE_BY_MEASUREMENT = False  # the gated norm's training graphs too
    norm_patterns.REWRITE_DEVICE_TYPES = (device,)  # the plain norm, off by default


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--json", required=True)
    parser.add_argument("--md", required=True)
    parser.add_argument("--family", default="gated,llama,gemma", help="comma-separated: gated, llama, gemma")
    parser.add_argument("--quick", action="store_true", help="the shape list sized for one device call")
    parser.add_argument("--tiny", action="store_true", help="two tiny shapes: a check of the script's logic")
    parser.add_argument("--device", default="cuda", choices=("cuda", "cpu"))
    parser.add_argument("--budget-s", type=float, default=400.0,
                        help="take no new shape once this many seconds would be passed")
    args = parser.parse_args(argv)
    families = [f for f in args.family.split(",") if f]
    unknown = set(families) - set(FAMILIES)
    if unknown:
        parser.error(f"unknown family {sorted(unknown)}")
    torch.manual_seed(0)
    force_rewrites(args.device)
    shapes = TINY_SHAPES if args.tiny else (QUICK_SHAPES if args.quick else FULL_SHAPES)
    env = environment(args.device)
    env.update(budget_s=args.budget_s, families=families, skipped=[])
    start, slowest, rows = time.perf_counter(), 0.0, []
    for d, lead in shapes:
        if rows_of(lead) > MAX_ROWS or rows_of(lead) * d * 2 > MAX_TENSOR_BYTES:
            continue
        for family in families:
            label = f"{family} {'x'.join(map(str, (*lead, d)))}"
            if time.perf_counter() - start + slowest > args.budget_s:
                env["skipped"].append(label)
                continue
            began = time.perf_counter()
            rows.append(measure(family, d, lead, args.device))
            slowest = max(slowest, time.perf_counter() - began)
            rows[-1]["seconds"] = round(time.perf_counter() - began, 1)
            print(json.dumps(rows[-1]), file=sys.stderr, flush=True)
            write(args.json, args.md, rows, env)
        if args.device == "cuda":
            torch.cuda.empty_cache()
    env["seconds"] = round(time.perf_counter() - start, 1)
    print(write(args.json, args.md, rows, env))
    return 0


if __name__ == "__main__":
    sys.exit(main())
