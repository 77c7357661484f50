"""Ours against Inductor where the host sets the pace: paired, interleaved wall-clock timing.

At small shapes a call costs what the host spends launching it, and the shared host's speed
drifts: ``do_bench`` medians of the same kernel moved by up to 2x between variants measured a
few seconds apart (RESULTS.md).  Here the variants take turns: each round times a block of
calls of every variant (synchronising around each block, rotating their order every round), and
keeps each variant's time relative to Inductor's in the same round.  A slow stretch of the host
slows both sides of a round alike; the median ratio over the rounds and its quartiles are the
comparison.  Times are wall clock per call, what a caller waits: host or GPU, whichever is slower.

Variants: ``inductor`` (``torch.compile`` default), ``ours`` (our backend), ``ours_ops`` (our
backend with the ``graph_ops`` switch off: compiled code calls the ops themselves), and for up to
1024 tokens both sides with CUDA graphs (``_cg``).

    python benchmarks/paired.py --json out.json --md out.md
"""
from __future__ import annotations

import argparse
import functools
import json
import statistics
import sys

import torch

import glu_fusion
import glu_fusion.patterns.routing
from _measure import GatedMLP, apply_switches, eager_gated_norm, environment, host_ms_per_call, write_results

glu_fusion.patterns.routing.ROUTE_BY_MEASUREMENT = False  # measure our path on every shape, not the routed default
SWIGLU_CASES = [(1024, 3072, m) for m in (1, 16, 128, 1024, 4096)] + [(4096, 14336, 1), (4096, 14336, 16)]
NORM_CASES = [(128, 32), (128, 4096), (128, 131072)]
CUDA_GRAPH_MAX_TOKENS = 1024
BLOCK, ROUNDS = 20, 30
for _limit in ("cache_size_limit", "recompile_limit"):
    if hasattr(torch._dynamo.config, _limit):
        setattr(torch._dynamo.config, _limit, 64)


def paired_times(fns: dict, block: int = BLOCK, rounds: int = ROUNDS) -> dict:
    """name -> per-round milliseconds per call; every round times every variant once."""
    names = list(fns)
    times = {n: [] for n in names}
    for r in range(rounds):
        for n in names[r % len(names):] + names[:r % len(names)]:
            times[n].append(host_ms_per_call(fns[n], block))
    return times


def summary(times: dict, base: str) -> dict:
    """Median ms of each variant, and each one's median (q1, q3) ratio to ``base`` per round."""
    out = {}
    for n, ts in times.items():
        out[f"{n}_ms"] = statistics.median(ts)
        if n != base:
            ratios = [t / b for t, b in zip(ts, times[base])]
            q1, med, q3 = statistics.quantiles(ratios, n=4)
            out[f"{n}_ratio"] = (med, q1, q3)
    return out


def compiled(module, settings: dict, **options):
    """``module`` compiled with glu_fusion ``settings`` in force while it compiles (its first
    calls, made by the caller under each grad mode)."""
    fn = torch.compile(module, dynamic=False, **options)

    def call(*args):
        saved = apply_switches(settings)
        try:
            return fn(*args)
        finally:
            apply_switches(saved)
    return call


def variants(module, cuda_graphs: bool) -> dict:
    torch._dynamo.reset()
    ours = lambda **patches: functools.partial(glu_fusion.backend, config_patches=patches)  # noqa: E731
    out = {"inductor": compiled(module, {}),
           "ours": compiled(module, {"graph_ops": True}, backend=ours()),
           "ours_ops": compiled(module, {"graph_ops": False}, backend=ours())}
    if cuda_graphs:
        out["inductor_cg"] = compiled(module, {}, mode="reduce-overhead")
        out["ours_cg"] = compiled(module, {"graph_ops": True}, backend=ours(**{"triton.cudagraphs": True}))
    return out


def measure(label: str, module, inputs: tuple, grad_out, cuda_graphs: bool) -> list:
    rows = []
    fns = variants(module, cuda_graphs)
    wrt = tuple(t for t in (*inputs, *module.parameters()) if t.requires_grad)
    for phase in ("fwd", "fwdbwd"):
        def make(fn):
            if phase == "fwd":
                def fwd():
                    with torch.no_grad():
                        return fn(*inputs)
                return fwd
            return lambda: torch.autograd.grad(fn(*inputs), wrt, grad_out)
        calls = {n: make(fn) for n, fn in fns.items()}
        for fn in calls.values():  # compile and warm up, each variant under its own settings
            for _ in range(3):
                fn()
        row = {"case": label, "phase": phase, **summary(paired_times(calls), "inductor")}
        if cuda_graphs:
            cg = summary(paired_times({"inductor_cg": calls["inductor_cg"], "ours_cg": calls["ours_cg"]}),
                         "inductor_cg")
            row.update(cg)
        rows.append(row)
        print(json.dumps(row), file=sys.stderr, flush=True)
    return rows


def run() -> list:
    torch.manual_seed(0)
    glu_fusion.config.rewrite_devices = ("cuda",)
    dt = torch.bfloat16
    rows = []
    for k, n, m in SWIGLU_CASES:
        module = GatedMLP((torch.randn(n, k, device="cuda") * k ** -0.5).to(dt),
                          (torch.randn(n, k, device="cuda") * k ** -0.5).to(dt))
        x = torch.randn(m, k, device="cuda", dtype=dt, requires_grad=True)
        dout = torch.randn(m, n, device="cuda", dtype=dt)
        rows += measure(f"SwiGLU {k}->{n}, M={m}", module, (x,), dout, m <= CUDA_GRAPH_MAX_TOKENS)
    for d, r in NORM_CASES:
        module = _GatedNorm(d)
        x, z = (torch.randn(r, d, device="cuda", dtype=dt, requires_grad=True) for _ in range(2))
        rows += measure(f"gated norm D={d}, {r} rows", module, (x, z), torch.randn(r, d, device="cuda", dtype=dt),
                        r <= 4096)
    return rows


class _GatedNorm(torch.nn.Module):
    def __init__(self, d: int):
        super().__init__()
        self.weight = torch.nn.Parameter((1 + 0.1 * torch.randn(d, device="cuda")).to(torch.bfloat16))

    def forward(self, x, z):
        return eager_gated_norm(x, z, self.weight)


def markdown(rows: list, env: dict) -> str:
    def ratio(r, key):
        if f"{key}_ratio" not in r:
            return "–"
        med, q1, q3 = r[f"{key}_ratio"]
        return f"{med:.2f} [{q1:.2f}, {q3:.2f}]"

    def ms(r, key):
        return f"{r[f'{key}_ms']:.3f}" if f"{key}_ms" in r else "–"

    lines = [f"Paired timing on {env['device']}, torch {env['torch']}, triton {env['triton']}, {env['date']}. "
             f"Wall-clock ms per call (median of {ROUNDS} rounds of {BLOCK} calls, variants interleaved); "
             "ratios to Inductor within each round: median [quartiles], below 1 is faster. ours_ops: our "
             "backend with the compiled calls going to the ops themselves (graph_ops off). cg: CUDA graphs "
             "on both sides.", "",
             "| case | pass | inductor | ours | ours_ops | ours/inductor | ours_ops/inductor | inductor_cg | "
             "ours_cg | ours_cg/inductor_cg |", "|" + "---|" * 10]
    for r in rows:
        lines.append(f"| {r['case']} | {r['phase']} | {ms(r, 'inductor')} | {ms(r, 'ours')} | {ms(r, 'ours_ops')} | "
                     f"{ratio(r, 'ours')} | {ratio(r, 'ours_ops')} | {ms(r, 'inductor_cg')} | {ms(r, 'ours_cg')} | "
                     f"{ratio(r, 'ours_cg')} |")
    return "\n".join(lines) + "\n"


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--json", required=True)
    parser.add_argument("--md", required=True)
    args = parser.parse_args(argv)
    env = environment()
    rows = run()
    write_results(args.json, args.md, {"env": env, "rows": rows}, markdown(rows, env))
    print(markdown(rows, env))
    return 0


if __name__ == "__main__":
    sys.exit(main())
