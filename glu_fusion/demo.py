"""A small Llama-style model written the ordinary way, and the check ``python -m glu_fusion`` runs.

Nothing in the model knows about glu_fusion: RMSNorm, attention and the SwiGLU MLP are plain
``nn.Module`` code, so the demo shows the pass finding the MLPs on its own.  ``check`` compiles
any model with the backend, compares the output and every gradient with eager, and returns the
numbers; ``time_train_step`` compares step time with ``torch.compile``'s default.
"""
from __future__ import annotations

import copy
import dataclasses
import time
from typing import Any, Callable, Optional, Sequence

import torch
import torch.nn as nn
import torch.nn.functional as F

__all__ = ["DemoConfig", "TinyLlama", "build", "check", "CheckResult", "time_train_step"]


@dataclasses.dataclass(frozen=True)
class DemoConfig:
    vocab: int = 256
    dim: int = 64
    hidden: int = 176
    heads: int = 4
    layers: int = 4
    seq: int = 32
    batch: int = 2


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float = 1e-6) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.eps = eps

    def forward(self, x):
        h = x.float()
        h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * h.to(x.dtype)


class Attention(nn.Module):
    def __init__(self, dim: int, heads: int) -> None:
        super().__init__()
        self.heads = heads
        self.q_proj = nn.Linear(dim, dim, bias=False)
        self.k_proj = nn.Linear(dim, dim, bias=False)
        self.v_proj = nn.Linear(dim, dim, bias=False)
        self.o_proj = nn.Linear(dim, dim, bias=False)

    def forward(self, x):
        b, t, d = x.shape
        q, k, v = (p(x).view(b, t, self.heads, d // self.heads).transpose(1, 2)
                   for p in (self.q_proj, self.k_proj, self.v_proj))
        y = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        return self.o_proj(y.transpose(1, 2).reshape(b, t, d))


class MLP(nn.Module):
    def __init__(self, dim: int, hidden: int) -> None:
        super().__init__()
        self.gate_proj = nn.Linear(dim, hidden, bias=False)
        self.up_proj = nn.Linear(dim, hidden, bias=False)
        self.down_proj = nn.Linear(hidden, dim, bias=False)
        self.act_fn = nn.SiLU()

    def forward(self, x):
        return self.down_proj(self.act_fn(self.gate_proj(x)) * self.up_proj(x))


class Block(nn.Module):
    def __init__(self, cfg: DemoConfig) -> None:
        super().__init__()
        self.input_norm = RMSNorm(cfg.dim)
        self.attn = Attention(cfg.dim, cfg.heads)
        self.post_attn_norm = RMSNorm(cfg.dim)
        self.mlp = MLP(cfg.dim, cfg.hidden)

    def forward(self, x):
        x = x + self.attn(self.input_norm(x))
        return x + self.mlp(self.post_attn_norm(x))


class TinyLlama(nn.Module):
    def __init__(self, cfg: DemoConfig = DemoConfig()) -> None:
        super().__init__()
        self.embed = nn.Embedding(cfg.vocab, cfg.dim)
        self.layers = nn.ModuleList(Block(cfg) for _ in range(cfg.layers))
        self.norm = RMSNorm(cfg.dim)
        self.lm_head = nn.Linear(cfg.dim, cfg.vocab, bias=False)

    def forward(self, tokens):
        x = self.embed(tokens)
        for layer in self.layers:
            x = layer(x)
        return self.lm_head(self.norm(x))


def build(device: str = "cpu", dtype: torch.dtype = torch.float32, cfg: DemoConfig = DemoConfig(),
          seed: int = 0) -> tuple[nn.Module, tuple[torch.Tensor, ...]]:
    """The demo model and one batch of token ids."""
    torch.manual_seed(seed)
    model = TinyLlama(cfg).to(device=device, dtype=dtype)
    tokens = torch.randint(0, cfg.vocab, (cfg.batch, cfg.seq), device=device)
    return model, (tokens,)


@dataclasses.dataclass
class CheckResult:
    """Largest differences between compiled and eager, relative to the eager magnitude."""

    output_error: float
    grad_error: float           # worst over all parameters
    worst_param: str
    tolerance: float
    compile_seconds: float      # first forward and backward: compiling both, running once

    @property
    def ok(self) -> bool:
        return self.output_error <= self.tolerance and self.grad_error <= self.tolerance


def _float_leaves(out: Any) -> list[torch.Tensor]:
    if isinstance(out, torch.Tensor):
        return [out] if out.is_floating_point() else []
    if isinstance(out, dict):
        out = list(out.values())
    if isinstance(out, (list, tuple)):
        return [t for o in out for t in _float_leaves(o)]
    return []


def _rel_error(a: torch.Tensor, b: torch.Tensor) -> float:
    scale = b.detach().float().abs().max().clamp_min(1e-6)
    return float(((a.detach().float() - b.detach().float()).abs().max() / scale).item())


def _loss(out: Any) -> torch.Tensor:
    leaves = _float_leaves(out)
    if not leaves:
        raise ValueError("glu_fusion: the model returned no floating-point tensor to compare")
    return sum((t.float() * torch.linspace(-1, 1, t.numel(), device=t.device).view(t.shape)).sum()
               for t in leaves)


def check(model: nn.Module, inputs: Sequence[Any], backend: Callable,
          tolerance: Optional[float] = None) -> CheckResult:
    """Compile a copy of ``model`` with ``backend``; one forward and backward of each against eager."""
    eager = model
    compiled_model = copy.deepcopy(model)
    dtype = next((p.dtype for p in model.parameters() if p.is_floating_point()), torch.float32)
    if tolerance is None:
        tolerance = {torch.float32: 1e-4, torch.float16: 2e-2, torch.bfloat16: 5e-2}.get(dtype, 1e-4)
    expected = eager(*inputs)
    compiled = torch.compile(compiled_model, backend=backend)
    _loss(expected).backward()
    start = time.perf_counter()
    got = compiled(*inputs)
    _loss(got).backward()
    compile_seconds = time.perf_counter() - start
    pairs = zip(_float_leaves(got), _float_leaves(expected))
    out_err = max((_rel_error(g, e) for g, e in pairs), default=0.0)
    grads = dict(compiled_model.named_parameters())
    worst, worst_name = 0.0, "-"
    for name, p in eager.named_parameters():
        q = grads[name]
        if p.grad is None and q.grad is None:
            continue
        if p.grad is None or q.grad is None:
            err = float("inf")
        else:
            err = _rel_error(q.grad, p.grad)
        if err > worst:
            worst, worst_name = err, name
    return CheckResult(out_err, worst, worst_name, tolerance, compile_seconds)


def time_train_step(model: nn.Module, inputs: Sequence[Any], backend: Any, steps: int = 20,
                    warmup: int = 3) -> float:
    """Median milliseconds of a compiled forward+backward on CUDA."""
    compiled = torch.compile(copy.deepcopy(model), backend=backend)
    times = []
    for i in range(warmup + steps):
        torch.cuda.synchronize()
        start = time.perf_counter()
        _loss(compiled(*inputs)).backward()
        torch.cuda.synchronize()
        if i >= warmup:
            times.append((time.perf_counter() - start) * 1e3)
    times.sort()
    return times[len(times) // 2]
