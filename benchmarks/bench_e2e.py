"""End-to-end training step: a Llama-style model, ``torch.compile`` default vs our backend.

Hidden 2048, intermediate 8192, 8 layers, sequence 2048, batch 4, bf16 weights, AdamW; both
runs start from the same weights and see the same batches.  Reports the median step time,
tokens/s, peak memory and the loss curve of each.

    python benchmarks/bench_e2e.py --json e2e.json --md e2e.md [--steps 20]
"""
from __future__ import annotations

import argparse
import copy
import functools
import sys
import time

import torch
import torch.nn.functional as F

import glu_fusion
import glu_fusion.patterns.routing
from _measure import environment, write_results
from glu_fusion.demo import DemoConfig, TinyLlama

glu_fusion.patterns.routing.ROUTE_BY_MEASUREMENT = False  # measure our path on every shape, not the routed default
CONFIG = DemoConfig(vocab=8192, dim=2048, hidden=8192, heads=16, layers=8, seq=2048, batch=4)


def train(model: torch.nn.Module, backend, steps: int, cfg: DemoConfig) -> dict:
    compiled = torch.compile(model, backend=backend) if backend is not None else torch.compile(model)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4, foreach=True)
    gen = torch.Generator(device="cuda").manual_seed(1)
    losses, times = [], []
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    compile_start = time.perf_counter()
    for step in range(steps + 1):
        tokens = torch.randint(0, cfg.vocab, (cfg.batch, cfg.seq + 1), device="cuda", generator=gen)
        torch.cuda.synchronize()
        start = time.perf_counter()
        logits = compiled(tokens[:, :-1])
        loss = F.cross_entropy(logits.float().view(-1, cfg.vocab), tokens[:, 1:].reshape(-1))
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        torch.cuda.synchronize()
        if step == 0:
            first_step_s = time.perf_counter() - compile_start
        else:
            times.append((time.perf_counter() - start) * 1e3)
        losses.append(loss.item())
    times.sort()
    step_ms = times[len(times) // 2]
    return {"step_ms": step_ms, "tokens_per_s": cfg.batch * cfg.seq / (step_ms * 1e-3),
            "peak_gb": torch.cuda.max_memory_allocated() / 2**30, "first_step_s": first_step_s,
            "losses": losses}


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--json", required=True)
    parser.add_argument("--md", required=True)
    parser.add_argument("--steps", type=int, default=20)
    args = parser.parse_args(argv)
    torch.manual_seed(0)
    base = TinyLlama(CONFIG).to(device="cuda", dtype=torch.bfloat16)
    results = {}
    # The recompute run saves no [tokens, 2·intermediate] pre-activations per layer (one more GEMM).
    for name, backend, recompute in (("inductor", None, False), ("glu_fusion", glu_fusion.backend, False),
                                     ("glu_fusion_recompute", functools.partial(glu_fusion.backend), True)):
        torch._dynamo.reset()
        glu_fusion.report().reset()
        glu_fusion.config.recompute = recompute
        results[name] = train(copy.deepcopy(base), backend, args.steps, CONFIG)
        glu_fusion.config.recompute = False
        results[name]["rewrites"] = glu_fusion.report().counts()
        print(name, {k: v for k, v in results[name].items() if k != "losses"}, file=sys.stderr, flush=True)
    a, b = results["inductor"], results["glu_fusion"]
    max_loss_diff = max(abs(x - y) for x, y in zip(a["losses"], b["losses"]))
    env = environment()
    lines = [f"End-to-end training step ({CONFIG.layers} layers, hidden {CONFIG.dim}, intermediate "
             f"{CONFIG.hidden}, seq {CONFIG.seq}, batch {CONFIG.batch}, bf16, AdamW) on {env['device']}, "
             f"torch {env['torch']}, triton {env['triton']}, {env['date']}", "",
             "| backend | step ms (median) | tokens/s | peak GiB | first step s |", "|---|---|---|---|---|"]
    for name, r in results.items():
        lines.append(f"| {name} | {r['step_ms']:.1f} | {r['tokens_per_s']:.0f} | {r['peak_gb']:.2f} | {r['first_step_s']:.1f} |")
    c = results["glu_fusion_recompute"]
    recompute_loss_diff = max(abs(x - y) for x, y in zip(a["losses"], c["losses"]))
    lines += ["", f"rewrites by our pass: {b['rewrites']}", f"speed-up {a['step_ms'] / b['step_ms']:.3f}x; largest loss difference over "
              f"{args.steps + 1} steps {max_loss_diff:.4f} (losses {a['losses'][0]:.3f} -> {a['losses'][-1]:.3f})",
              f"peak memory {b['peak_gb'] / a['peak_gb']:.2f}x Inductor's; with recompute "
              f"{c['peak_gb'] / a['peak_gb']:.2f}x at {a['step_ms'] / c['step_ms']:.3f}x its speed "
              f"(largest loss difference {recompute_loss_diff:.4f})"]
    table = "\n".join(lines) + "\n"
    write_results(args.json, args.md, {"env": env, "results": results}, table)
    print(table)
    return 0


if __name__ == "__main__":
    sys.exit(main())
