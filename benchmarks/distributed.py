"""The fusion pass inside a data-parallel trainer: FSDP2 or DDP, our backend against plain compile.

Launch one process per device::

    torchrun --nproc-per-node 2 benchmarks/distributed.py --mode fsdp2 --json out.json --md out.md
    torchrun --nproc-per-node 2 benchmarks/distributed.py --mode ddp --device cpu --tiny

Each backend trains the same Llama-style model (``glu_fusion.demo.TinyLlama``: plain RMSNorm,
attention and SwiGLU MLP modules) from the same initial weights on the same synthetic batches:

* ``fsdp2``: every block is ``fully_shard``-ed and compiled on its own (optionally wrapped in
  activation checkpointing first), then the root; bf16 parameters, fp32 gradient reduction.
* ``ddp``: ``DistributedDataParallel`` around the compiled model; bf16 through autocast.

Per rank it records the loss curve, the gradients of the first step, the median step time,
tokens/s and peak memory, how many times the fused ops ran in one profiled step, and
``glu_fusion.report().counts()``.  Rank 0 compares the backends (loss and first-step gradient
differences, and eager's difference from plain compile as the precision's noise floor), writes
JSON and markdown, and the exit status is non-zero when a check fails.

On CPU (``--device cpu``, gloo) the fused ops run through Triton's interpreter, in fp32 by default
(the interpreter's bf16 dot products are wrong).
"""
from __future__ import annotations

import argparse
import dataclasses
import datetime
import gc
import json
import math
import os
import statistics
import sys
import time
import traceback

# NVLink multicast stays off on shared hosts; set before NCCL or PyTorch's symmetric memory load.
os.environ["NCCL_NVLS_ENABLE"] = "0"
os.environ["TORCH_SYMM_MEM_DISABLE_MULTICAST"] = "1"
os.environ["NVSHMEM_DISABLE_NVLS"] = "1"

PRESETS = {
    # Llama-ish block at a size where the MLP dominates, for two H200s.
    "default": dict(vocab=32768, dim=2048, hidden=8192, heads=16, layers=8, seq=2048, batch=2),
    # Small enough for Triton's CPU interpreter.
    "tiny": dict(vocab=128, dim=32, hidden=64, heads=2, layers=2, seq=16, batch=2),
}
TOLERANCES = {  # (loss, first-step gradient): max abs diff of loss, max |dg| / max |g| per tensor
    "fp32": (1e-4, 1e-3),
    "fp16": (2e-2, 5e-2),
    "bf16": (5e-2, 1e-1),
}


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--mode", default="fsdp2",
                   help="fsdp2, ddp, or both as a comma list (one process start for both)")
    p.add_argument("--device", choices=("cuda", "cpu"), default=None,
                   help="default: cuda when available")
    p.add_argument("--tiny", action="store_true", help="the small CPU-sized preset")
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--warmup", type=int, default=None,
                   help="steps left out of the timing (default: min(5, steps // 2))")
    p.add_argument("--ac", action="store_true", help="activation checkpointing per block")
    p.add_argument("--dtype", choices=("bf16", "fp16", "fp32"), default=None,
                   help="compute dtype (default: bf16 on cuda, fp32 on cpu)")
    p.add_argument("--backends", default=None,
                   help="comma list of eager,inductor,glu_fusion (default: eager,inductor,glu_fusion "
                        "on cuda, inductor,glu_fusion on cpu); the first compiled one is the reference")
    p.add_argument("--lr", type=float, default=None, help="AdamW learning rate (default 3e-4; tiny 3e-3)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--timeout", type=int, default=300,
                   help="collective timeout, seconds (a rank that failed alone stops the others then)")
    p.add_argument("--bucket-mb", type=float, default=None,
                   help="DDP bucket_cap_mb (default: DDP's 25); Dynamo's DDP optimizer splits the graph there")
    p.add_argument("--ddp-split", action="store_true",
                   help="keep Dynamo's DDP optimizer (graph split at bucket boundaries) for compiled runs")
    p.add_argument("--no-profile", action="store_true", help="skip the profiled step that counts op calls")
    p.add_argument("--json", default=None)
    p.add_argument("--md", default=None)
    for key in PRESETS["default"]:
        p.add_argument(f"--{key}", type=int, default=None)
    args = p.parse_args(argv)
    args.modes = [m.strip() for m in args.mode.split(",") if m.strip()]
    if not args.modes or set(args.modes) - {"fsdp2", "ddp"}:
        p.error(f"--mode takes fsdp2, ddp or fsdp2,ddp; got {args.mode!r}")
    preset = PRESETS["tiny" if args.tiny else "default"]
    for key, value in preset.items():
        if getattr(args, key) is None:
            setattr(args, key, value)
    return args


ARGS = parse_args() if __name__ == "__main__" else None
# A cache hit skips the pre-grad pass, and then the report of that rank would stay empty.
os.environ.setdefault("TORCHINDUCTOR_FORCE_DISABLE_CACHES", "1")

import torch  # noqa: E402

if ARGS is not None and (ARGS.device == "cpu" or not torch.cuda.is_available()):
    # Read when Triton decorates a kernel: set before glu_fusion's kernels are imported.
    os.environ.setdefault("TRITON_INTERPRET", "1")

import torch.distributed as dist  # noqa: E402
import torch.nn.functional as F  # noqa: E402

import glu_fusion  # noqa: E402
import glu_fusion.patterns.routing  # noqa: E402
from glu_fusion.demo import DemoConfig, TinyLlama  # noqa: E402

glu_fusion.patterns.routing.ROUTE_BY_MEASUREMENT = False  # measure our path on every shape, not the routed default
DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}
# Forward ops of the SwiGLU family, as the profiler names them (graph twins end in "_nograd").
FORWARD_OPS = ("glu_fusion::swiglu", "glu_fusion::swiglu_packed", "glu_fusion::swiglu_preact",
               "glu_fusion::mlp_block", "glu_fusion::mlp_block_packed")
#: Report families that fuse an MLP (the whole block, or the SwiGLU alone).
MLP_FAMILIES = ("mlp_block", "swiglu")


@dataclasses.dataclass
class RunResult:
    """One backend's training run on one rank."""

    backend: str
    losses: list = dataclasses.field(default_factory=list)
    step_ms: list = dataclasses.field(default_factory=list)
    median_step_ms: float = float("nan")
    tokens_per_s: float = float("nan")          # this rank's tokens per second
    peak_mem_gib: float = float("nan")
    start_mem_gib: float = float("nan")         # allocated when the run began (earlier runs' leftovers)
    report_counts: dict = dataclasses.field(default_factory=dict)
    report_graphs: int = 0
    op_calls: dict = dataclasses.field(default_factory=dict)   # glu_fusion op events, one step
    forward_swiglu_calls: int = -1
    error: str = ""


# --- set-up ------------------------------------------------------------------------------------

def init(args) -> tuple[int, int, torch.device]:
    if args.device is None:
        args.device = "cuda" if torch.cuda.is_available() else "cpu"
    if args.dtype is None:
        args.dtype = "bf16" if args.device == "cuda" else "fp32"
    if args.backends is None:
        args.backends = "eager,inductor,glu_fusion" if args.device == "cuda" else "inductor,glu_fusion"
    if args.lr is None:
        args.lr = 3e-3 if args.tiny else 3e-4
    if args.warmup is None:
        args.warmup = min(5, args.steps // 2)
    if glu_fusion.config.enabled:
        # GLU_FUSION=1 would put the pass into the plain-compile baseline too.
        glu_fusion.disable()
    if args.device == "cuda":
        local = int(os.environ.get("LOCAL_RANK", "0"))
        torch.cuda.set_device(local)
        device = torch.device("cuda", local)
        backend = "nccl"
    else:
        device = torch.device("cpu")
        backend = "gloo"
        glu_fusion.config.rewrite_devices = ("cpu", "cuda")
    if device.type == "cuda":
        dist.init_process_group(backend, timeout=datetime.timedelta(seconds=args.timeout),
                                device_id=device)
    else:
        dist.init_process_group(backend, timeout=datetime.timedelta(seconds=args.timeout))
    return dist.get_rank(), dist.get_world_size(), device


def model_config(args) -> DemoConfig:
    return DemoConfig(vocab=args.vocab, dim=args.dim, hidden=args.hidden, heads=args.heads,
                      layers=args.layers, seq=args.seq, batch=args.batch)


def batch(args, rank: int, step: int, device) -> tuple[torch.Tensor, torch.Tensor]:
    """Learnable synthetic sequences (arithmetic progressions mod vocab), different on every rank
    and step, identical for every backend."""
    g = torch.Generator().manual_seed(args.seed * 1_000_003 + rank * 10_007 + step)
    start = torch.randint(0, args.vocab, (args.batch, 1), generator=g)
    stride = torch.randint(1, 8, (args.batch, 1), generator=g)
    seq = (start + stride * torch.arange(args.seq + 1)) % args.vocab
    seq = seq.to(device)
    return seq[:, :-1].contiguous(), seq[:, 1:].contiguous()


def build(args, cfg: DemoConfig, backend: str, device):
    """The model, wrapped and compiled for ``backend``, from the same initial weights every time."""
    torch.manual_seed(args.seed)
    with torch.device(device):  # built in place: fp32 master weights, same seed on every rank
        model = TinyLlama(cfg)
    compile_kw = None
    if backend == "inductor":
        compile_kw = {}
    elif backend == "glu_fusion":
        compile_kw = {"backend": glu_fusion.backend}
    if args.ac:
        from torch.distributed.algorithms._checkpoint.checkpoint_wrapper import checkpoint_wrapper
        for i, block in enumerate(model.layers):
            model.layers[i] = checkpoint_wrapper(block)
    if args.mode == "fsdp2":
        from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard
        dtype = DTYPES[args.dtype]
        mp = MixedPrecisionPolicy(param_dtype=dtype if dtype != torch.float32 else None,
                                  reduce_dtype=torch.float32)
        for block in model.layers:
            fully_shard(block, mp_policy=mp)
            if compile_kw is not None:
                block.compile(**compile_kw)
        fully_shard(model, mp_policy=mp)
        wrapped = model
    else:
        from torch.nn.parallel import DistributedDataParallel as DDP
        # Dynamo's DDP optimizer cuts the graph at bucket boundaries and compiles each piece on
        # its own; a 25 MiB bucket closes after every large linear, so gate, up and down land in
        # different pieces and no MLP can be fused.  Off (for every compiled backend alike)
        # unless asked for: one graph, gradients all-reduced after the compiled backward.
        torch._dynamo.config.optimize_ddp = bool(args.ddp_split)
        inner = torch.compile(model, **compile_kw) if compile_kw is not None else model
        kw = {} if args.bucket_mb is None else {"bucket_cap_mb": args.bucket_mb}
        wrapped = DDP(inner, device_ids=[device.index] if device.type == "cuda" else None, **kw)
    opt = torch.optim.AdamW(model.parameters(), lr=args.lr, weight_decay=0.0)
    return model, wrapped, opt


def autocast(args, device):
    if args.mode == "ddp" and args.dtype != "fp32":
        return torch.autocast(device.type, dtype=DTYPES[args.dtype])
    import contextlib
    return contextlib.nullcontext()


def local_grads(model) -> dict[str, torch.Tensor]:
    """This rank's gradients (its shard under FSDP2), detached fp32 copies in host memory."""
    out = {}
    for name, p in model.named_parameters():
        if p.grad is None:
            continue
        g = p.grad
        if hasattr(g, "to_local"):
            g = g.to_local()
        # Kept on the host: copies left on the device by an earlier backend's run would count
        # in the next backend's peak memory (a full fp32 gradient set under DDP).
        out[name.replace("_checkpoint_wrapped_module.", "")] = g.detach().to("cpu", torch.float32, copy=True)
    return out


def sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


# --- one backend's run ---------------------------------------------------------------------------

def train(args, cfg, backend: str, rank: int, world: int, device):
    """Train ``args.steps`` steps; returns the result and the first step's gradients."""
    res = RunResult(backend)
    torch._dynamo.reset()
    glu_fusion.report().reset()
    if device.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)
        res.start_mem_gib = torch.cuda.memory_allocated(device) / 2**30
    model, wrapped, opt = build(args, cfg, backend, device)
    first_grads = None
    for step in range(args.steps):
        tokens, targets = batch(args, rank, step, device)
        sync(device)
        start = time.perf_counter()
        with autocast(args, device):
            logits = wrapped(tokens)
        loss = F.cross_entropy(logits.float().flatten(0, 1), targets.flatten())
        loss.backward()
        if step == 0:
            first_grads = local_grads(model)
        opt.step()
        opt.zero_grad(set_to_none=True)
        sync(device)
        res.step_ms.append((time.perf_counter() - start) * 1e3)
        res.losses.append(float(loss.detach()))
    timed = res.step_ms[args.warmup:] or res.step_ms
    res.median_step_ms = statistics.median(timed)
    res.tokens_per_s = args.batch * args.seq / (res.median_step_ms / 1e3)
    if device.type == "cuda":
        res.peak_mem_gib = torch.cuda.max_memory_allocated(device) / 2**30
    res.report_counts = dict(glu_fusion.report().counts())
    res.report_graphs = len(glu_fusion.report().graphs)
    if not args.no_profile:
        res.op_calls = profile_op_calls(args, wrapped, opt, rank, device)
        res.forward_swiglu_calls = sum(n for name, n in res.op_calls.items()
                                       if name.removesuffix("_nograd") in FORWARD_OPS)
    del model, wrapped, opt
    gc.collect()
    return res, first_grads


def profile_op_calls(args, wrapped, opt, rank, device) -> dict[str, int]:
    """How often each ``glu_fusion`` op ran in one more training step (learning rate zero)."""
    from torch.profiler import ProfilerActivity, profile
    tokens, targets = batch(args, rank, args.steps, device)
    for group in opt.param_groups:
        group["lr"] = 0.0
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        with autocast(args, device):
            logits = wrapped(tokens)
        F.cross_entropy(logits.float().flatten(0, 1), targets.flatten()).backward()
        sync(device)
    opt.zero_grad(set_to_none=True)
    counts: dict[str, int] = {}
    for ev in prof.events():
        if ev.name.startswith("glu_fusion::"):
            counts[ev.name] = counts.get(ev.name, 0) + 1
    return counts


# --- comparing and reporting ---------------------------------------------------------------------

def grad_diff(a: dict, b: dict) -> tuple[float, str]:
    """Worst ``max |a - b| / max |b|`` over the parameters, and the parameter it occurs at."""
    worst, where = 0.0, "-"
    for name, gb in b.items():
        ga = a.get(name)
        if ga is None:
            return float("inf"), f"{name} (no gradient)"
        if gb.numel() == 0:
            continue
        err = float((ga - gb).abs().max() / gb.abs().max().clamp_min(1e-12))
        if not math.isfinite(err) or err > worst:
            worst, where = err, name
    if set(a) != set(b):
        return float("inf"), f"parameters with gradients differ: {sorted(set(a) ^ set(b))[:4]}"
    return worst, where


def compare(args, results: dict, grads: dict) -> dict:
    """Per-rank differences of every backend from the reference compiled backend."""
    names = list(results)
    ref = "inductor" if "inductor" in names else names[0]
    out = {"reference": ref, "pairs": {}}
    for name in names:
        if name == ref or results[name].error or results[ref].error:
            continue
        la, lb = results[name].losses, results[ref].losses
        loss_diff = max((abs(x - y) for x, y in zip(la, lb)), default=float("nan"))
        g_err, g_where = grad_diff(grads[name], grads[ref])
        out["pairs"][name] = {"max_loss_diff": loss_diff, "grad_rel_diff": g_err, "grad_worst": g_where}
    return out


def verdict(args, world: int, gathered: list) -> dict:
    """Checks over all ranks: parity of glu_fusion with plain compile, rewrites on every rank."""
    loss_tol, grad_tol = TOLERANCES[args.dtype]
    checks = {}
    failures = []
    for rank, per in enumerate(gathered):
        for name, res in per["results"].items():
            if res["error"]:
                failures.append(f"rank {rank} {name}: {res['error'].splitlines()[-1]}")
        pairs = per["compare"]["pairs"]
        if "glu_fusion" in pairs:
            pair = pairs["glu_fusion"]
            # Eager's distance from plain compile is the noise of this precision; allow 3x of it.
            noise = pairs.get("eager", {})
            lt = max(loss_tol, 3 * noise.get("max_loss_diff", 0.0))
            gt = max(grad_tol, 3 * noise.get("grad_rel_diff", 0.0))
            ok_loss = pair["max_loss_diff"] <= lt
            ok_grad = pair["grad_rel_diff"] <= gt
            checks[f"rank{rank}_loss_parity"] = ok_loss
            checks[f"rank{rank}_grad_parity"] = ok_grad
            if not ok_loss:
                failures.append(f"rank {rank}: loss diff {pair['max_loss_diff']:.3g} > {lt:.3g}")
            if not ok_grad:
                failures.append(f"rank {rank}: gradient diff {pair['grad_rel_diff']:.3g} > {gt:.3g} "
                                f"at {pair['grad_worst']}")
        glu = per["results"].get("glu_fusion")
        if glu and not glu["error"]:
            rewritten = mlp_rewrites(glu["report_counts"]) >= 1
            checks[f"rank{rank}_pass_rewrote_mlp"] = rewritten
            if not rewritten:
                failures.append(f"rank {rank}: the pass rewrote no MLP (report {glu['report_counts']})")
            if glu["forward_swiglu_calls"] >= 0:
                every = glu["forward_swiglu_calls"] >= args.layers
                checks[f"rank{rank}_every_mlp_fused"] = every
                if not every:
                    failures.append(f"rank {rank}: {glu['forward_swiglu_calls']} fused MLP forward "
                                    f"call(s) in a step, model has {args.layers} MLPs")
        base = per["results"].get("inductor")
        if base and not base["error"] and base["op_calls"]:
            checks[f"rank{rank}_baseline_untouched"] = False
            failures.append(f"rank {rank}: plain compile ran glu_fusion ops {base['op_calls']}")
    if len(gathered) != world:
        failures.append(f"results from {len(gathered)} of {world} ranks")
    return {"ok": not failures and bool(checks), "checks": checks, "failures": failures,
            "tolerances": {"loss_abs": loss_tol, "grad_rel": grad_tol}}


def mlp_rewrites(counts: dict) -> int:
    """MLP sites the report lists as fused: whole blocks and SwiGLUs without a down projection."""
    return sum(counts.get(f, 0) for f in MLP_FAMILIES)


def markdown(args, world: int, gathered: list, summary: dict) -> str:
    title = (f"{args.mode.upper()} on {world} x {gathered[0]['device_name']}, {args.dtype}"
             f"{', activation checkpointing' if args.ac else ''}")
    lines = [f"### {title}", "",
             f"Model: dim {args.dim}, MLP {args.hidden}, {args.layers} layers, {args.heads} heads, "
             f"vocab {args.vocab}; seq {args.seq} x batch {args.batch} per rank; {args.steps} steps "
             f"(median over steps {args.warmup}+), AdamW lr {args.lr}. torch {torch.__version__}."
             + (f" Dynamo's DDP graph split {'on' if args.ddp_split else 'off'}"
                f", bucket {args.bucket_mb or 25:g} MiB." if args.mode == "ddp" else ""), "",
             "| rank | backend | loss first -> last | max loss diff vs inductor | grad rel diff (step 0) "
             "| median step ms | tokens/s (rank) | peak GiB | MLP rewrites (report) | fused MLP fwd calls/step |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    for rank, per in enumerate(gathered):
        pairs = per["compare"]["pairs"]
        for name, r in per["results"].items():
            if r["error"]:
                lines.append(f"| {rank} | {name} | error: {r['error'].splitlines()[-1][:80]} |||||||||")
                continue
            pair = pairs.get(name, {})
            ld = f"{pair['max_loss_diff']:.2e}" if pair else "ref" if name == per["compare"]["reference"] else "-"
            gd = f"{pair['grad_rel_diff']:.2e}" if pair else "-"
            mem = f"{r['peak_mem_gib']:.1f}" if math.isfinite(r["peak_mem_gib"]) else "-"
            calls = r["forward_swiglu_calls"] if r["forward_swiglu_calls"] >= 0 else "-"
            lines.append(f"| {rank} | {name} | {r['losses'][0]:.4f} -> {r['losses'][-1]:.4f} | {ld} | {gd} "
                         f"| {r['median_step_ms']:.1f} | {r['tokens_per_s']:.0f} | {mem} "
                         f"| {mlp_rewrites(r['report_counts'])} | {calls} |")
    speed = []
    base = [p["results"].get("inductor") for p in gathered]
    if all(x and not x["error"] for x in base):
        speed.append(f"inductor: {sum(x['tokens_per_s'] for x in base):.0f} tokens/s over all ranks")
    for name in ("eager", "glu_fusion"):
        a = [p["results"].get(name) for p in gathered]
        b = [p["results"].get("inductor") for p in gathered]
        if all(x and not x["error"] for x in a + b):
            ratio = statistics.mean(y["median_step_ms"] for y in b) / statistics.mean(x["median_step_ms"] for x in a)
            total = sum(x["tokens_per_s"] for x in a)
            speed.append(f"{name}: {ratio:.3f}x the speed of inductor (mean step time over ranks), "
                         f"{total:.0f} tokens/s over all ranks")
    lines += ["", *[f"- {x}" for x in speed], "",
              f"Checks: {'PASS' if summary['ok'] else 'FAIL'} "
              f"({sum(summary['checks'].values())}/{len(summary['checks'])}); "
              f"tolerances loss {summary['tolerances']['loss_abs']:g} abs, "
              f"grad {summary['tolerances']['grad_rel']:g} rel (or 3x eager's noise)."]
    lines += [f"- {f}" for f in summary["failures"]]
    return "\n".join(lines) + "\n"


def run_mode(args, rank: int, world: int, device) -> list:
    """Every backend under one wrapping (``args.mode``); this rank's results gathered on all ranks."""
    cfg = model_config(args)
    results, grads = {}, {}
    for name in [b.strip() for b in args.backends.split(",") if b.strip()]:
        if name not in ("eager", "inductor", "glu_fusion"):
            raise SystemExit(f"unknown backend {name!r}")
        try:
            res, g = train(args, cfg, name, rank, world, device)
        except Exception:  # keep going: the report says what failed
            res, g = RunResult(name, error=traceback.format_exc()), {}
            print(f"[rank {rank}] {args.mode} {name} failed:\n{res.error}", file=sys.stderr, flush=True)
        results[name], grads[name] = res, g
        if rank == 0:
            print(f"[rank 0] {args.mode} {name}: losses {[round(x, 4) for x in res.losses]} "
                  f"median {res.median_step_ms:.1f} ms, report {res.report_counts}, "
                  f"op calls {res.op_calls}", flush=True)
    local = {"rank": rank,
             "device_name": torch.cuda.get_device_name(device) if device.type == "cuda" else "CPU",
             "results": {k: dataclasses.asdict(v) for k, v in results.items()},
             "compare": compare(args, results, grads)}
    del grads
    gathered = [None] * world
    dist.all_gather_object(gathered, local)
    return gathered


def main(args) -> int:
    rank, world, device = init(args)
    runs, text, ok = [], [], True
    for mode in args.modes:
        margs = argparse.Namespace(**{**vars(args), "mode": mode})
        gathered = run_mode(margs, rank, world, device)
        if rank == 0:
            summary = verdict(margs, world, gathered)
            ok = ok and summary["ok"]
            runs.append({"mode": mode, "summary": summary, "ranks": gathered})
            text.append(markdown(margs, world, gathered, summary))
    status = 0
    if rank == 0:
        doc = {"args": vars(args), "world_size": world, "torch": torch.__version__,
               "ok": ok, "runs": runs}
        if args.json:
            with open(args.json, "w") as f:
                json.dump(doc, f, indent=1, default=str)
        md = "\n".join(text)
        if args.md:
            with open(args.md, "w") as f:
                f.write(md)
        print(md, flush=True)
        status = 0 if ok else 1
    flag = torch.tensor([status], dtype=torch.int32, device=device)
    dist.broadcast(flag, 0)
    dist.destroy_process_group()
    return int(flag.item())


if __name__ == "__main__":
    sys.exit(main(ARGS))
