"""Training step of third-party model code (Hugging Face transformers): plain ``torch.compile``
against ``torch.compile(..., backend=glu_fusion.backend)``, without and with recompute.

The models are built from configs with random weights (fixed seed, no download), in bf16, and
trained with AdamW (foreach) on fixed-seed random tokens, the loss computed by the model itself
(``labels=input_ids``).  Every variant starts from the same weights and sees the same batches:

* ``llama``       LlamaForCausalLM, hidden 2048, intermediate 8192, 16 heads (8 kv, head dim 128)
* ``qwen3``       Qwen3ForCausalLM, the same widths
* ``qwen3_0p6b``  Qwen3ForCausalLM at the 0.6B widths: hidden 1024, intermediate 3072,
                  16 heads, 8 kv heads, head dim 128
* ``qwen3_moe``   Qwen3MoeForCausalLM, hidden 2048, 64 experts of width 768, top-8,
                  32 heads (4 kv, head dim 128)

8 decoder layers (4 for the MoE), sequence 2048, vocabulary 32000, attention through SDPA;
8192 tokens a step (batch 4), 16384 for ``qwen3_0p6b`` (batch 8).  Each variant runs
``--warmup`` steps (the compile happens in the first) and then ``--steps`` timed steps; it
reports the median wall time of a step (synchronised), tokens/s, the peak of
``torch.cuda.max_memory_allocated`` (reset once the model is built; the other variants' models
are freed first), the loss of every step, and for our variants the rewrite counts of
``glu_fusion.report()`` and the largest loss difference from plain ``torch.compile``.

What is compiled (``--compile``): ``layers`` (default) compiles each decoder layer on its own
(``layer.compile(...)``, as per-block trainers do); the layers share one Dynamo graph, so a
variant compiles one forward and one backward, about 8x less compile work than the whole
model.  Embedding, final norm, LM head and loss then run eagerly, the same in every variant.
``model`` compiles the whole ``...ForCausalLM`` instead (slower to compile: the 8 layers are
inlined into one graph).  Rewrites are counted per compiled graph: with ``layers`` one graph
serves every layer, so ``swiglu 1`` means every layer's MLP; ``graphs_compiled`` in the JSON
counts Dynamo's graphs (more than one means recompiles or graph breaks).  Inductor's graph
caches are off in this process: a cache hit would skip our pass, and the rewrite counts would
read zero.

The MoE experts in transformers 5.17.0: ``Qwen3MoeExperts`` holds ``gate_up_proj [E, 2I, H]``
(gate rows first) and ``down_proj [E, H, I]`` as 3D parameters, and its forward is chosen by
``config._experts_implementation``.  With none requested, ``PreTrainedModel`` picks
``"grouped_mm"`` (``integrations/moe.py: grouped_mm_experts_forward``): the (token, expert)
pairs are sorted by expert, ``histc`` + ``cumsum`` give int32 offsets, one grouped GEMM
(``F.grouped_mm`` or ``torch._grouped_mm`` on the transposed ``gate_up_proj``) computes the
packed gate/up, ``chunk(2)`` then ``silu(gate) * up``, a second grouped GEMM the down
projection, then the routing weights, the inverse permutation and a sum over top-k.  Under
``torch.compile`` the grouped GEMM is taken only for bf16 weights; other dtypes (the CPU smoke
run's fp32) go through ``transformers::grouped_mm_fallback``, a custom op looping over experts.
``"batched_mm"`` gathers each pair's expert weights and runs ``bmm``; ``"eager"`` is the original
per-expert Python loop with data-dependent shapes.  This benchmark asks for ``grouped_mm``
(``--moe-experts-impl`` changes it).

transformers is not a dependency of glu_fusion; the benchmark pins it:

    pip install transformers==5.17.0
    python benchmarks/bench_hf.py --json hf.json --md hf.md
    python benchmarks/bench_hf.py --tiny --device cpu --json /tmp/hf.json --md /tmp/hf.md   # smoke
"""
from __future__ import annotations

import os
import sys


def _cpu_requested(argv: list[str]) -> bool:
    """Whether the command line asks for the CPU, read before Triton is imported."""
    for i, arg in enumerate(argv):
        if arg == "--device" and i + 1 < len(argv):
            return argv[i + 1] == "cpu"
        if arg == "--device=cpu":
            return True
    return False


if __name__ == "__main__" and _cpu_requested(sys.argv[1:]):
    # Our kernels run on CPU tensors through Triton's interpreter, which is read when a kernel
    # is decorated: set it before anything imports Triton.
    os.environ.setdefault("TRITON_INTERPRET", "1")

import argparse  # noqa: E402
import dataclasses  # noqa: E402
import datetime  # noqa: E402
import gc  # noqa: E402
import statistics  # noqa: E402
import time  # noqa: E402
import traceback  # noqa: E402
from typing import Callable, Optional  # noqa: E402

import torch  # noqa: E402
import triton  # noqa: E402

import glu_fusion  # noqa: E402
import glu_fusion.patterns.routing  # noqa: E402

glu_fusion.patterns.routing.ROUTE_BY_MEASUREMENT = False  # measure our path on every shape, not the routed default
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from _measure import environment, write_results  # noqa: E402

TRANSFORMERS_VERSION = "5.17.0"


@dataclasses.dataclass(frozen=True)
class ModelSpec:
    """The widths of one benchmarked model; ``experts > 0`` makes it a Qwen3-MoE."""

    name: str
    hf_class: str
    hidden: int
    intermediate: int
    heads: int
    kv_heads: int
    head_dim: int
    layers: int
    seq: int
    batch: int
    vocab: int = 32000
    experts: int = 0
    top_k: int = 0

    @property
    def tokens(self) -> int:
        return self.seq * self.batch


SPECS = {
    "llama": ModelSpec("llama", "LlamaForCausalLM", 2048, 8192, 16, 8, 128, 8, 2048, 4),
    "qwen3": ModelSpec("qwen3", "Qwen3ForCausalLM", 2048, 8192, 16, 8, 128, 8, 2048, 4),
    "qwen3_0p6b": ModelSpec("qwen3_0p6b", "Qwen3ForCausalLM", 1024, 3072, 16, 8, 128, 8, 2048, 8),
    "qwen3_moe": ModelSpec("qwen3_moe", "Qwen3MoeForCausalLM", 2048, 768, 32, 4, 128, 4, 2048, 4,
                           experts=64, top_k=8),
}

#: Widths for a CPU smoke run through the Triton interpreter (seconds, not hours).
TINY = {
    "llama": ModelSpec("llama", "LlamaForCausalLM", 64, 128, 4, 2, 16, 2, 32, 2, vocab=256),
    "qwen3": ModelSpec("qwen3", "Qwen3ForCausalLM", 64, 128, 4, 2, 16, 2, 32, 2, vocab=256),
    "qwen3_0p6b": ModelSpec("qwen3_0p6b", "Qwen3ForCausalLM", 32, 96, 4, 2, 16, 2, 32, 4, vocab=256),
    "qwen3_moe": ModelSpec("qwen3_moe", "Qwen3MoeForCausalLM", 64, 32, 4, 2, 16, 2, 32, 2, vocab=256,
                           experts=4, top_k=2),
}


@dataclasses.dataclass(frozen=True)
class Variant:
    name: str
    ours: bool
    recompute: bool


VARIANTS = (Variant("plain", False, False), Variant("glu_fusion", True, False),
            Variant("glu_fusion_recompute", True, True))


# --- the few places that touch glu_fusion's settings ----------------------------------------------

def set_recompute(on: bool) -> None:
    """Our ops save only their input and recompute the pre-activations in backward."""
    glu_fusion.config.recompute = on


def allow_rewrites_on(device_type: str) -> None:
    """The pass rewrites CUDA graphs by default; the CPU smoke run needs it on CPU graphs too."""
    devices = set(glu_fusion.config.rewrite_devices) | {device_type}
    glu_fusion.config.rewrite_devices = tuple(sorted(devices))


# --- models, data, one variant's training run ----------------------------------------------------

def check_transformers(allow_other: bool):
    try:
        import transformers
    except ImportError:
        sys.exit(f"bench_hf needs transformers: pip install transformers=={TRANSFORMERS_VERSION}")
    if transformers.__version__ != TRANSFORMERS_VERSION and not allow_other:
        sys.exit(f"bench_hf is pinned to transformers {TRANSFORMERS_VERSION}, found "
                 f"{transformers.__version__}: pip install transformers=={TRANSFORMERS_VERSION} "
                 f"(or pass --allow-other-transformers)")
    return transformers


def hf_config(spec: ModelSpec, transformers):
    """The model's config: the widths above, no KV cache (training), untied embeddings."""
    common = dict(vocab_size=spec.vocab, hidden_size=spec.hidden, num_hidden_layers=spec.layers,
                  num_attention_heads=spec.heads, num_key_value_heads=spec.kv_heads,
                  max_position_embeddings=spec.seq, use_cache=False, tie_word_embeddings=False)
    if spec.experts:
        config = transformers.Qwen3MoeConfig(moe_intermediate_size=spec.intermediate,
                                             num_experts=spec.experts, num_experts_per_tok=spec.top_k,
                                             norm_topk_prob=True, **common)
    elif spec.hf_class == "Qwen3ForCausalLM":
        config = transformers.Qwen3Config(intermediate_size=spec.intermediate, head_dim=spec.head_dim,
                                          **common)
    else:
        config = transformers.LlamaConfig(intermediate_size=spec.intermediate, head_dim=spec.head_dim,
                                          **common)
    config.head_dim = spec.head_dim  # Qwen3MoeConfig has no such argument; its attention reads it
    return config


def build_model(spec: ModelSpec, transformers, device: str, dtype: torch.dtype, experts_impl: str):
    """A randomly initialised model on ``device`` (seed 0, so every call builds the same one)."""
    cls = getattr(transformers, spec.hf_class)
    extra = {"experts_implementation": experts_impl} if spec.experts else {}
    torch.manual_seed(0)
    with torch.device(device):
        model = cls._from_config(hf_config(spec, transformers), attn_implementation="sdpa", dtype=dtype,
                                 **extra)
    return model.to(device=device, dtype=dtype).train()


def make_batches(spec: ModelSpec, count: int, device: str) -> list[torch.Tensor]:
    """Random token batches from a fixed CPU seed: the same on every device and in every variant."""
    gen = torch.Generator().manual_seed(1234)
    return [torch.randint(0, spec.vocab, (spec.batch, spec.seq), generator=gen).to(device)
            for _ in range(count)]


def compile_model(model: torch.nn.Module, backend: Optional[Callable], what: str) -> Callable:
    """Compile the decoder layers one by one (``layers``) or the whole model (``model``)."""
    kwargs = {} if backend is None else {"backend": backend}
    if what == "model":
        return torch.compile(model, **kwargs)
    for layer in model.model.layers:
        layer.compile(**kwargs)
    return model


def sync(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


def free_memory(device: str) -> None:
    gc.collect()
    if device == "cuda":
        torch.cuda.empty_cache()


def train(model: torch.nn.Module, step_fn: Callable, batches: list[torch.Tensor], warmup: int,
          device: str) -> dict:
    """Run every batch as one AdamW step; time the steps after ``warmup``."""
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4, foreach=True)
    if device == "cuda":
        torch.cuda.reset_peak_memory_stats()
    losses, times = [], []
    first_step_s = None
    for step, tokens in enumerate(batches):
        sync(device)
        start = time.perf_counter()
        loss = step_fn(input_ids=tokens, labels=tokens).loss
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        sync(device)
        elapsed = time.perf_counter() - start
        if step == 0:
            first_step_s = elapsed
        if step >= warmup:
            times.append(elapsed * 1e3)
        losses.append(loss.detach())
        del loss
        print(f"    step {step}: {elapsed * 1e3:.1f} ms", flush=True)
    step_ms = statistics.median(times)
    tokens = batches[0].numel()
    result = {"step_ms": step_ms, "step_ms_all": times, "tokens_per_s": tokens / (step_ms * 1e-3),
              "first_step_s": first_step_s,
              "peak_gib": torch.cuda.max_memory_allocated() / 2**30 if device == "cuda" else None,
              "losses": [float(x) for x in torch.stack(losses).float().cpu()]}
    del opt
    return result


def run_variant(spec: ModelSpec, variant: Variant, state: dict, batches: list[torch.Tensor],
                args, transformers) -> dict:
    """Build the model from ``state``, compile it for ``variant``, train, free everything."""
    torch._dynamo.reset()
    torch._dynamo.utils.counters.clear()
    glu_fusion.report().reset()
    set_recompute(variant.recompute)
    model = None
    try:
        model = build_model(spec, transformers, args.device, args.dtype, args.moe_experts_impl)
        model.load_state_dict(state)
        step_fn = compile_model(model, glu_fusion.backend if variant.ours else None, args.compile)
        result = train(model, step_fn, batches, args.warmup, args.device)
        result["graphs_compiled"] = int(torch._dynamo.utils.counters["stats"]["unique_graphs"])
        if variant.ours:
            result["rewrites"] = glu_fusion.report().counts()
        return result
    finally:
        set_recompute(False)
        del model
        torch._dynamo.reset()
        free_memory(args.device)


def run_model(spec: ModelSpec, args, transformers) -> dict:
    """Every variant of one model; a failing variant is recorded and the others still run."""
    record: dict = {"spec": dataclasses.asdict(spec), "tokens_per_step": spec.tokens, "variants": {}}
    print(f"== {spec.name}: {spec.hf_class}, hidden {spec.hidden}, intermediate {spec.intermediate}, "
          f"{spec.layers} layers, {spec.batch}x{spec.seq} tokens", flush=True)
    model = build_model(spec, transformers, args.device, args.dtype, args.moe_experts_impl)
    record["parameters"] = sum(p.numel() for p in model.parameters())
    if spec.experts:
        record["experts_implementation"] = model.config._experts_implementation
    state = {k: v.detach().to("cpu", copy=True) for k, v in model.state_dict().items()}
    del model
    free_memory(args.device)
    batches = make_batches(spec, args.warmup + args.steps, args.device)
    for variant in VARIANTS:
        start = time.perf_counter()
        print(f"  -- {spec.name} / {variant.name}", flush=True)
        try:
            result = run_variant(spec, variant, state, batches, args, transformers)
        except Exception as exc:  # one failure must not cost the other rows
            traceback.print_exc()
            result = {"error": f"{type(exc).__name__}: {exc}", "traceback": traceback.format_exc()}
        result["wall_s"] = time.perf_counter() - start
        record["variants"][variant.name] = result
        shown = {k: v for k, v in result.items() if k not in ("losses", "step_ms_all", "traceback")}
        print(f"  {spec.name} / {variant.name}: {shown}", flush=True)
    plain = record["variants"]["plain"]
    for name, result in record["variants"].items():
        if name != "plain" and "losses" in result and "losses" in plain:
            result["loss_max_diff"] = max(abs(a - b) for a, b in zip(plain["losses"], result["losses"]))
            result["speedup"] = plain["step_ms"] / result["step_ms"]
    return record


# --- reporting -----------------------------------------------------------------------------------

def _fmt(value, spec: str) -> str:
    return "–" if value is None else format(value, spec)


def markdown(results: dict, env: dict, args) -> str:
    lines = [f"Training step of transformers {env['transformers']} models ({args.compile} compiled, "
             f"{args.dtype_name}, AdamW, {args.steps} timed steps after {args.warmup}) on {env['device']}, "
             f"torch {env['torch']}, triton {env['triton']}, {env['date']}", "",
             "| model | tokens/step | plain compile ms | ours ms | ratio (tokens/s) | peak GiB plain | "
             "peak GiB ours | loss max diff | rewrites |",
             "|---|---|---|---|---|---|---|---|---|"]
    for key, record in results.items():
        if "variants" not in record:
            lines.append(f"| {key} | | | | | | | | failed: {record.get('error', '?')} |")
            continue
        plain = record["variants"]["plain"]
        for name, label in (("glu_fusion", key), ("glu_fusion_recompute", f"{key}, recompute")):
            ours = record["variants"].get(name, {})
            if "error" in plain or "error" in ours:
                err = plain.get("error") or ours.get("error")
                lines.append(f"| {label} | {record['tokens_per_step']} | | | | | | | failed: {err} |")
                continue
            rewrites = ", ".join(f"{k} {v}" for k, v in sorted(ours.get("rewrites", {}).items())) or "none"
            lines.append(f"| {label} | {record['tokens_per_step']} | {plain['step_ms']:.1f} | "
                         f"{ours['step_ms']:.1f} | {ours['speedup']:.3f}x | {_fmt(plain['peak_gib'], '.2f')} | "
                         f"{_fmt(ours['peak_gib'], '.2f')} | {ours['loss_max_diff']:.4f} | {rewrites} |")
    lines += ["", "First step (compile included), seconds: " + "; ".join(
        f"{key} " + "/".join(_fmt(v.get("first_step_s"), ".0f") for v in record["variants"].values())
        for key, record in results.items() if "variants" in record) + " (plain/ours/ours with recompute)"]
    return "\n".join(lines) + "\n"


def describe_environment(device: str, transformers) -> dict:
    if device == "cuda":
        env = environment()
    else:
        env = {"device": "cpu (Triton interpreter)", "torch": torch.__version__,
               "triton": triton.__version__, "date": datetime.date.today().isoformat()}
    env["transformers"] = transformers.__version__
    return env


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", default=",".join(SPECS), help=f"comma-separated, of {', '.join(SPECS)}")
    parser.add_argument("--steps", type=int, default=None, help="timed steps (default 20; 2 with --tiny)")
    parser.add_argument("--warmup", type=int, default=None, help="warm-up steps (default 3; 1 with --tiny)")
    parser.add_argument("--layers", type=int, default=None, help="decoder layers (default: the model's)")
    parser.add_argument("--compile", choices=("layers", "model"), default="layers")
    parser.add_argument("--moe-experts-impl", default="grouped_mm", choices=("grouped_mm", "batched_mm", "eager"))
    parser.add_argument("--device", choices=("cuda", "cpu"), default=None)
    parser.add_argument("--tiny", action="store_true", help="tiny widths, for a CPU smoke run")
    parser.add_argument("--allow-other-transformers", action="store_true")
    parser.add_argument("--json", required=True)
    parser.add_argument("--md", required=True)
    args = parser.parse_args(argv)
    args.device = args.device or ("cuda" if torch.cuda.is_available() and not args.tiny else "cpu")
    args.steps = args.steps if args.steps is not None else (2 if args.tiny else 20)
    args.warmup = args.warmup if args.warmup is not None else (1 if args.tiny else 3)
    # The interpreter's bf16 tl.dot is wrong, so CPU runs train in fp32.
    args.dtype = torch.bfloat16 if args.device == "cuda" else torch.float32
    args.dtype_name = str(args.dtype).replace("torch.", "")
    unknown = [m for m in args.models.split(",") if m not in SPECS]
    if unknown:
        parser.error(f"unknown models {unknown}; choose from {list(SPECS)}")
    return args


def main(argv=None) -> int:
    args = parse_args(argv)
    transformers = check_transformers(args.allow_other_transformers)
    import torch._functorch.config
    import torch._inductor.config
    torch._inductor.config.fx_graph_cache = False
    torch._functorch.config.enable_autograd_cache = False
    if args.device != "cuda":
        allow_rewrites_on(args.device)
    table = TINY if args.tiny else SPECS
    specs = [table[m] for m in args.models.split(",")]
    if args.layers is not None:
        specs = [dataclasses.replace(s, layers=args.layers) for s in specs]
    # Room for a recompile per layer should the layers' guards ever differ, without hiding it:
    # graphs_compiled in the results counts them.
    limit = max(torch._dynamo.config.recompile_limit, 2 * max(s.layers for s in specs) + 8)
    torch._dynamo.config.recompile_limit = limit
    env = describe_environment(args.device, transformers)
    print(f"bench_hf: {env}", flush=True)
    results = {}
    start = time.perf_counter()
    for spec in specs:
        try:
            results[spec.name] = run_model(spec, args, transformers)
        except Exception as exc:
            traceback.print_exc()
            results[spec.name] = {"error": f"{type(exc).__name__}: {exc}", "traceback": traceback.format_exc()}
        free_memory(args.device)
        print(f"  ({time.perf_counter() - start:.0f} s so far)", flush=True)
    options = {k: v for k, v in vars(args).items() if k not in ("dtype",)}
    text = markdown(results, env, args)
    write_results(args.json, args.md, {"env": env, "options": options, "results": results}, text)
    print(text, flush=True)
    failed = [k for k, r in results.items()
              if "error" in r or any("error" in v for v in r.get("variants", {}).values())]
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
