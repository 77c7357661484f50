"""Mixture-of-experts benchmark on a CUDA device: the expert block (gate/up grouped GEMMs, the
gate, the down grouped GEMM) forward+backward, ``torch.compile`` default against the same model
code compiled with the glu_fusion backend (which rewrites it into the grouped op) and against
the op called directly; then the grouped GEMMs alone against ``torch._grouped_mm``; then the
down projection and combine (``glu_fusion.grouped_down_combine``) against Inductor's.

Routing: ``tokens`` tokens each pick ``topk`` of ``experts`` experts uniformly at random, sorted
by expert (``T = tokens · topk`` rows).  bf16; medians of ``triton.testing.do_bench``; peak
memory is the allocator's peak over the inputs during one forward+backward.

    python benchmarks/bench_moe.py --json out.json --md out.md [--quick]
"""
from __future__ import annotations

import argparse
import json
import sys
import traceback

import torch
import torch.nn as nn
import torch.nn.functional as F

import glu_fusion
from glu_fusion.patterns import experts as expert_patterns
from _measure import bench, environment, peak_mb, write_results

glu_fusion.config.rewrite_devices = ("cuda",)

expert_patterns.REWRITE_DEVICE_TYPES = ("cuda",)  # the rewrite under test, off by default
for _limit in ("cache_size_limit", "recompile_limit"):
    if hasattr(torch._dynamo.config, _limit):
        setattr(torch._dynamo.config, _limit, 64)

# name: (hidden K, expert width N, experts, top-k, tokens, activation)
CONFIGS = {
    "qwen3-30b-a3b": (2048, 768, 128, 8, 16384, "silu"),
    "gpt-oss": (2880, 2880, 32, 4, 8192, "gptoss"),
}
QUICK_TOKENS = 4096
mm = torch._grouped_mm


def routing(tokens: int, experts: int, topk: int, skew: float = 0.0) -> torch.Tensor:
    """Cumulative rows per expert: each token picks ``topk`` distinct experts, uniformly, or
    (``skew`` > 0) with expert probabilities drawn from a Dirichlet(``skew``) distribution."""
    if skew > 0:
        probs = torch.distributions.Dirichlet(torch.full((experts,), skew)).sample().to("cuda")
        choice = torch.multinomial(probs.expand(tokens, experts), topk, replacement=False).flatten()
    else:
        choice = torch.rand(tokens, experts, device="cuda").topk(topk, dim=1).indices.flatten()
    return torch.bincount(choice, minlength=experts).cumsum(0).to(torch.int32)


def gptoss_gate(gate, up, limit=7.0, alpha=1.702):
    gate = gate.clamp(min=None, max=limit)
    up = up.clamp(min=-limit, max=limit)
    return (up + 1) * (gate * torch.sigmoid(gate * alpha))


class GroupedExperts(nn.Module):
    """torchtitan's spelling (silu) or gpt-oss's (packed interleaved ``[E, K, 2N]``, clamped gate)."""

    def __init__(self, k: int, n: int, e: int, activation: str) -> None:
        super().__init__()
        self.activation = activation

        def p(*shape):
            return nn.Parameter(torch.randn(*shape, device="cuda", dtype=torch.bfloat16) * shape[-1] ** -0.5)
        if activation == "silu":
            self.w1, self.w3 = p(e, n, k), p(e, n, k)
        else:
            self.gate_up = p(e, k, 2 * n)
        self.w2 = p(e, k, n)

    def forward(self, x, offs):
        if self.activation == "silu":
            h = F.silu(mm(x, self.w1.transpose(-2, -1), offs=offs)) * mm(x, self.w3.transpose(-2, -1), offs=offs)
        else:
            y = mm(x, self.gate_up, offs=offs)
            h = gptoss_gate(y[..., ::2], y[..., 1::2])
        return mm(h, self.w2.transpose(-2, -1), offs=offs)


def ours_op(module: GroupedExperts):
    """The block through the functional API (no compile): our op, then grouped_mm for the down."""
    from glu_fusion.functional import grouped_swiglu as grouped_swiglu_api, grouped_swiglu_packed as grouped_swiglu_packed_api

    def run(x, offs):
        if module.activation == "silu":
            h = grouped_swiglu_api(x, offs, module.w1, module.w3)
        else:
            h = grouped_swiglu_packed_api(x, offs, module.gate_up.transpose(-2, -1), layout="interleaved",
                                          activation="gptoss")
        return mm(h, module.w2.transpose(-2, -1), offs=offs)
    return run


def _phases(fn, x, offs, dout) -> dict:
    def fwd():
        with torch.no_grad():
            fn(x, offs)

    def fwdbwd():
        fn(x, offs).backward(dout)

    for _ in range(3):
        fwd(), fwdbwd()
    torch.cuda.synchronize()
    return {"fwd_ms": bench(fwd), "fwdbwd_ms": bench(fwdbwd), "peak_mb": peak_mb(fwdbwd)}


def measure_block(name: str, tokens: int) -> dict:
    k, n, e, topk, _, activation = CONFIGS[name]
    offs = routing(tokens, e, topk)
    t = tokens * topk
    module = GroupedExperts(k, n, e, activation)
    x = torch.randn(t, k, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    dout = torch.randn(t, k, device="cuda", dtype=torch.bfloat16)
    row = {"config": name, "K": k, "N": n, "E": e, "topk": topk, "tokens": tokens, "rows": t}
    torch._dynamo.reset()
    glu_fusion.report().reset()
    variants = {"inductor": torch.compile(module),
                "ours_backend": torch.compile(module, backend=glu_fusion.backend),
                "ours_op": ours_op(module)}
    for variant, fn in variants.items():
        try:
            for key, value in _phases(fn, x, offs, dout).items():
                row[f"{variant}_{key}"] = value
        except Exception as err:  # keep measuring the others; the table shows the gap
            row[f"{variant}_error"] = repr(err)[:300]
            traceback.print_exc()
        x.grad = None
        for p in module.parameters():
            p.grad = None
    row["ours_backend_rewrites"] = glu_fusion.report().counts().get("experts", 0)
    return row


def measure_gemms(name: str, tokens: int, skew: float = 0.0) -> dict:
    """Our grouped kernels alone against torch._grouped_mm on the same operands (silu weights):
    the portable kernels, and on Hopper the engine's grouped forward and down projection
    (``*_engine``; ``down_scatter``: each row to its token slot times its routing weight, against
    grouped_mm and Inductor's multiply and ``index_copy``); the dense cuBLAS GEMM of the same
    FLOPs as a reference point."""
    from glu_fusion.kernels import engine
    from glu_fusion.kernels.portable.grouped_gemm import grouped_input_grad, grouped_swiglu_forward, grouped_weight_grad
    k, n, e, topk, _, _ = CONFIGS[name]
    offs = routing(tokens, e, topk, skew)
    t = tokens * topk
    x = torch.randn(t, k, device="cuda", dtype=torch.bfloat16)
    w13 = torch.randn(e, 2 * n, k, device="cuda", dtype=torch.bfloat16) * k ** -0.5
    w1, w3 = w13[:, :n], w13[:, n:]
    dh = torch.randn(t, 2 * n, device="cuda", dtype=torch.bfloat16)
    out = torch.empty(t, n, device="cuda", dtype=torch.bfloat16)
    pre = torch.empty(t, 2 * n, device="cuda", dtype=torch.bfloat16)
    dx = torch.empty(t, k, device="cuda", dtype=torch.bfloat16)
    dw = torch.empty(e, 2 * n, k, device="cuda", dtype=torch.bfloat16)
    cases = {
        "fwd_gated": (lambda: grouped_swiglu_forward(x, offs, w1, w3, None, None, out, None, 0, 1.702, 7.0, True),
                      lambda: mm(x, w13.transpose(-2, -1), offs=offs)),
        "fwd_gated_saving_preact": (lambda: grouped_swiglu_forward(x, offs, w1, w3, None, None, out, pre, 0,
                                                                   1.702, 7.0, True),
                                    lambda: mm(x, w13.transpose(-2, -1), offs=offs)),
        "dx": (lambda: grouped_input_grad(dh, offs, w1, w3, dx, True), lambda: mm(dh, w13, offs=offs)),
        "dw": (lambda: grouped_weight_grad(dh, x, offs, dw[:, :n], dw[:, n:], None, None, True),
               lambda: mm(dh.t(), x, offs=offs)),
    }
    if engine.available(x.device):
        from glu_fusion.kernels.engine import host
        cases["fwd_gated_engine"] = (lambda: host.grouped_swiglu_forward(x, offs, w1, w3, None, None, out, None, None),
                                     cases["fwd_gated"][1])
        cases["fwd_gated_saving_preact_engine"] = (
            lambda: host.grouped_swiglu_forward(x, offs, w1, w3, None, None, out, pre[:, :n], pre[:, n:]),
            cases["fwd_gated"][1])
    # the down projection [T, N] -> [T, K]: in place, and scattered to token slots times the routing
    # weights (the combine's scale and unpermute; baseline: grouped_mm, then Inductor's multiply and
    # index_copy)
    w2 = torch.randn(e, k, n, device="cuda", dtype=torch.bfloat16) * n ** -0.5
    down_out = torch.empty(t, k, device="cuda", dtype=torch.bfloat16)
    dest = torch.randperm(t, device="cuda").to(torch.int32)
    dest_long, row_weights = dest.long(), torch.rand(t, device="cuda")
    slots = torch.empty(t, k, device="cuda", dtype=torch.bfloat16)

    @torch.compile
    def scale_scatter(y, weights, index, into):
        return into.index_copy_(0, index, (y.float() * weights.unsqueeze(1)).to(y.dtype))

    down_mm = lambda: mm(out, w2.transpose(-2, -1), offs=offs)
    cases["down"] = (None, down_mm)
    cases["down_scatter"] = (None, lambda: scale_scatter(down_mm(), row_weights, dest_long, slots))
    if engine.available(x.device):
        cases["dx_engine"] = (lambda: host.grouped_matmul(dh, offs, w13.transpose(1, 2), dx), cases["dx"][1])
        cases["down_engine"] = (lambda: host.grouped_matmul(out, offs, w2, down_out), down_mm)
        cases["down_scatter_engine"] = (
            lambda: host.grouped_matmul(out, offs, w2, slots, dest=dest, scale=row_weights),
            cases["down_scatter"][1])
    x_dense, w_dense = x, torch.randn(2 * n, k, device="cuda", dtype=torch.bfloat16)
    row = {"config": name, "tokens": tokens, "rows": t, "skew": skew,
           "dense_gate_up_ms": bench(lambda: x_dense @ w_dense.t())}
    for case, (ours, theirs) in cases.items():
        for who, fn in (("ours", ours), ("grouped_mm", theirs)):
            if fn is None:  # a baseline-only case (the portable kernels have no down projection)
                continue
            try:
                fn()
                torch.cuda.synchronize()
                row[f"{case}_{who}_ms"] = bench(fn)
            except Exception as err:
                row[f"{case}_{who}_error"] = repr(err)[:300]
    return row


def measure_combine(name: str, tokens: int) -> dict:
    """The down projection and combine (transformers' grouped_mm experts after the gate: grouped
    GEMM, routing-weight multiply, inverse permutation, per-token sum over the top-k rows),
    forward and forward+backward with peak memory: ``torch.compile`` of those steps against
    ``glu_fusion.grouped_down_combine``, unfused inside and on the engine (``ENGINE_COMBINE``)."""
    from glu_fusion.kernels import engine
    from glu_fusion.ops import grouped_combine, grouped_swiglu
    k, n, e, topk, _, _ = CONFIGS[name]
    s = tokens * topk
    choice = torch.rand(tokens, e, device="cuda").topk(topk, dim=1).indices.flatten()
    _ids, perm = torch.sort(choice)
    offs = torch.bincount(choice, minlength=e).cumsum(0).to(torch.int32)
    h = torch.randn(s, n, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    w2 = (torch.randn(e, k, n, device="cuda", dtype=torch.bfloat16) * n ** -0.5).requires_grad_()
    weights = torch.rand(s, device="cuda", dtype=torch.bfloat16).requires_grad_()
    dout = torch.randn(tokens, k, device="cuda", dtype=torch.bfloat16)

    @torch.compile
    def steps(h, offs, w2, weights, perm):
        weighted = mm(h, w2.transpose(-2, -1), offs=offs) * weights.unsqueeze(-1)
        inv_perm = torch.empty_like(perm)
        inv_perm[perm] = torch.arange(perm.shape[0], device=perm.device)
        return weighted[inv_perm].view(tokens, topk, k).sum(dim=1)

    def ours(h, offs, w2, weights, perm):
        return glu_fusion.grouped_down_combine(h, offs, w2, weights, perm, topk)

    row = {"config": name, "tokens": tokens, "topk": topk}
    variants = {"inductor": (steps, False), "ours_unfused": (ours, False)}
    if engine.available(h.device):
        variants["ours_engine"] = (ours, True)
    for variant, (fn, on_engine) in variants.items():
        grouped_combine.ENGINE_COMBINE = grouped_swiglu.ENGINE_GROUPED = on_engine
        try:
            for key, value in _phases(lambda x, o: fn(x, o, w2, weights, perm), h, offs, dout).items():
                row[f"{variant}_{key}"] = value
        except Exception as err:
            row[f"{variant}_error"] = repr(err)[:300]
            traceback.print_exc()
        for t in (h, w2, weights):
            t.grad = None
    grouped_combine.ENGINE_COMBINE = grouped_swiglu.ENGINE_GROUPED = False
    return row


def markdown(blocks: list, gemms: list, env: dict, combines: list = ()) -> str:
    lines = [f"MoE expert block, bf16, {env['device']}, torch {env['torch']}, triton {env['triton']}, "
             f"{env['date']}. Medians in ms; speedup = inductor / ours (above 1: ours faster).", "",
             "| config | tokens×topk | phase | inductor | ours_backend | ours_op | speedup (backend) | speedup (op) |",
             "|---|---|---|---|---|---|---|---|"]

    def cell(r, key):
        return f"{r[key]:.3f}" if key in r else "–"

    def ratio(r, a, b):
        return f"{r[a] / r[b]:.2f}" if a in r and b in r else "–"

    for r in blocks:
        for phase in ("fwd", "fwdbwd"):
            lines.append(f"| {r['config']} | {r['tokens']}×{r['topk']} | {phase} | {cell(r, f'inductor_{phase}_ms')} | "
                         f"{cell(r, f'ours_backend_{phase}_ms')} | {cell(r, f'ours_op_{phase}_ms')} | "
                         f"{ratio(r, f'inductor_{phase}_ms', f'ours_backend_{phase}_ms')} | "
                         f"{ratio(r, f'inductor_{phase}_ms', f'ours_op_{phase}_ms')} |")
    lines += ["", "Peak memory over inputs, forward+backward (MB); rewrites the backend made:", "",
              "| config | inductor | ours_backend | ours_op | rewrites |", "|---|---|---|---|---|"]
    for r in blocks:
        lines.append(f"| {r['config']} | {cell(r, 'inductor_peak_mb')} | {cell(r, 'ours_backend_peak_mb')} | "
                     f"{cell(r, 'ours_op_peak_mb')} | {r.get('ours_backend_rewrites', '–')} |")
    lines += ["", "Grouped GEMMs alone: ours vs torch._grouped_mm (ratio = grouped_mm / ours, above 1: ours "
              "faster; the forward's gate writes [T, N] where grouped_mm writes [T, 2N]):", "",
              "| config | kernel | ours | grouped_mm | ratio |", "|---|---|---|---|---|"]
    for r in gemms:
        routed = f"skewed (Dirichlet {r['skew']})" if r.get("skew") else "balanced"
        for case in ("fwd_gated", "fwd_gated_saving_preact", "fwd_gated_engine", "fwd_gated_saving_preact_engine",
                     "dx", "dx_engine", "dw", "down", "down_engine", "down_scatter", "down_scatter_engine"):
            if any(f"{case}_{who}_{what}" in r for who in ("ours", "grouped_mm") for what in ("ms", "error")):
                lines.append(f"| {r['config']} {routed} | {case} | {cell(r, f'{case}_ours_ms')} | "
                             f"{cell(r, f'{case}_grouped_mm_ms')} | {ratio(r, f'{case}_grouped_mm_ms', f'{case}_ours_ms')} |")
        lines.append(f"| {r['config']} {routed} | dense cuBLAS gate/up, same FLOPs | – | {cell(r, 'dense_gate_up_ms')} | – |")
    if combines:
        lines += ["", "Down projection and combine (ms; peak MB; speedup = inductor / ours):", "",
                  "| config | tokens×topk | phase | inductor | ours unfused | ours engine | speedup (engine) | "
                  "peak inductor | peak ours (engine) |", "|---|---|---|---|---|---|---|---|---|"]
        for r in combines:
            for phase in ("fwd", "fwdbwd"):
                lines.append(f"| {r['config']} | {r['tokens']}×{r['topk']} | {phase} | {cell(r, f'inductor_{phase}_ms')} | "
                             f"{cell(r, f'ours_unfused_{phase}_ms')} | {cell(r, f'ours_engine_{phase}_ms')} | "
                             f"{ratio(r, f'inductor_{phase}_ms', f'ours_engine_{phase}_ms')} | "
                             f"{cell(r, 'inductor_peak_mb')} | {cell(r, 'ours_engine_peak_mb')} |")
    errors = [(r["config"], key, v) for r in [*blocks, *gemms, *combines] for key, v in r.items()
              if key.endswith("_error")]
    if errors:
        lines += ["", "Errors:", ""] + [f"- {c} {k}: `{v}`" for c, k, v in errors]
    return "\n".join(lines) + "\n"


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--json", required=True)
    parser.add_argument("--md", required=True)
    parser.add_argument("--quick", action="store_true", help=f"{QUICK_TOKENS} tokens per config")
    parser.add_argument("--gemms-only", action="store_true", help="the grouped GEMMs alone, no expert block")
    parser.add_argument("--skew", type=float, default=0.3,
                        help="Dirichlet concentration of the skewed routing the GEMMs also run (0: none)")
    args = parser.parse_args(argv)
    torch.manual_seed(0)
    env = environment()
    blocks, gemms, combines = [], [], []
    for name, (*_, tokens, _act) in CONFIGS.items():
        tokens = QUICK_TOKENS if args.quick else tokens
        if not args.gemms_only:
            blocks.append(measure_block(name, tokens))
            print(json.dumps(blocks[-1]), file=sys.stderr, flush=True)
        for skew in (0.0, args.skew) if args.skew > 0 else (0.0,):
            gemms.append(measure_gemms(name, tokens, skew))
            print(json.dumps(gemms[-1]), file=sys.stderr, flush=True)
        combines.append(measure_combine(name, tokens))
        print(json.dumps(combines[-1]), file=sys.stderr, flush=True)
        write_results(args.json, args.md, {"env": env, "blocks": blocks, "gemms": gemms, "combines": combines},
                      markdown(blocks, gemms, env, combines))
    print(markdown(blocks, gemms, env, combines))
    return 0


if __name__ == "__main__":
    sys.exit(main())
