"""SwiGLU written with matmuls: ``x @ W.t()`` (and ``W.T``, ``W.mT``, ``W.transpose(0, 1)``,
``W.permute(1, 0)``, ``torch.t(W)``), ``torch.matmul``, and weights stored ``[K, N]`` used as
``x @ W``, including a packed ``[K, 2N]`` weight cut by ``chunk``/``split`` and the whole MLP
block with its down projection spelled the same way.

Each spelling is rewritten exactly once into the op that reads the weights in place (the
parameter itself, or its ``.t()`` view: never a copy), and a compiled training step equals eager:
the output, the input gradient and the gradient of every parameter as it is stored.
"""
from __future__ import annotations

import dataclasses
import operator
from typing import Callable

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

import glu_fusion
from glu_fusion.compile.pre_grad import GluPass

from helpers.compiled_steps import train_step_matches

K, N, D = 16, 24, 12
OPS = {torch.ops.glu_fusion.swiglu.default: "swiglu",
       torch.ops.glu_fusion.swiglu_packed.default: "swiglu_packed",
       torch.ops.glu_fusion.mlp_block.default: "mlp_block",
       torch.ops.glu_fusion.mlp_block_packed.default: "mlp_block_packed"}
MATMULS = {operator.matmul, torch.matmul, torch.mm, "matmul"}


class Weights(nn.Module):
    """``wg``, ``wu`` ``[N, K]`` (as nn.Linear stores them), ``gk``, ``uk`` ``[K, N]``, packed
    ``p`` ``[2N, K]`` and ``pk`` ``[K, 2N]``, down weights ``wd`` ``[D, N]`` and ``dk`` ``[N, D]``."""

    def __init__(self, fn: Callable, seed: int = 0) -> None:
        super().__init__()
        g = torch.Generator().manual_seed(seed)
        make = lambda *s: nn.Parameter(torch.randn(*s, generator=g) / s[-1] ** 0.5)  # noqa: E731
        self.wg, self.wu, self.p = make(N, K), make(N, K), make(2 * N, K)
        self.gk, self.uk, self.pk = make(K, N), make(K, N), make(K, 2 * N)
        self.wd, self.dk = make(D, N), make(N, D)
        self.fn = fn

    def forward(self, x):
        return self.fn(self, x)


def _halves(y, how):
    if how == "chunk":
        return y.chunk(2, dim=-1)
    if how == "split":
        return y.split(N, dim=-1)
    if how == "split_sizes":
        return torch.split(y, [N, N], -1)
    raise ValueError(how)


def _swiglu(g, u):
    return F.silu(g) * u


@dataclasses.dataclass
class Case:
    name: str
    fn: Callable
    op: str
    spelling: str
    used: tuple = ()     # the parameters the op reads (the others are left untouched)
    layout: int = -1


CASES = [
    Case("t", lambda m, x: _swiglu(x @ m.wg.t(), x @ m.wu.t()), "swiglu", "matmul W.t() x2"),
    Case("T", lambda m, x: _swiglu(x @ m.wg.T, x @ m.wu.T), "swiglu", "matmul W.t() x2"),
    Case("mT", lambda m, x: _swiglu(x @ m.wg.mT, x @ m.wu.mT), "swiglu", "matmul W.t() x2"),
    Case("transpose", lambda m, x: _swiglu(x @ m.wg.transpose(0, 1), x @ m.wu.transpose(-1, -2)),
         "swiglu", "matmul W.t() x2"),
    Case("permute_torch_t", lambda m, x: _swiglu(x @ m.wg.permute(1, 0), x @ torch.t(m.wu)),
         "swiglu", "matmul W.t() x2"),
    Case("torch_matmul", lambda m, x: _swiglu(torch.matmul(x, m.wg.t()), x.matmul(m.wu.t())),
         "swiglu", "matmul W.t() x2"),
    Case("up_first", lambda m, x: (x @ m.wu.t()) * F.silu(x @ m.wg.t()), "swiglu", "matmul W.t() x2"),
    Case("linear_and_matmul", lambda m, x: _swiglu(F.linear(x, m.wg), x @ m.wu.t()), "swiglu",
         "linear + matmul W.t()"),
    Case("kn", lambda m, x: _swiglu(x @ m.gk, x @ m.uk), "swiglu", "matmul W[K,N] x2"),
    Case("kn_torch_matmul", lambda m, x: _swiglu(torch.matmul(x, m.gk), torch.matmul(x, m.uk)),
         "swiglu", "matmul W[K,N] x2"),
    Case("packed_t_chunk", lambda m, x: _swiglu(*_halves(x @ m.p.t(), "chunk")), "swiglu_packed",
         "packed matmul W.t() chunk gate-first", layout=0),
    Case("packed_kn_chunk", lambda m, x: _swiglu(*_halves(x @ m.pk, "chunk")), "swiglu_packed",
         "packed matmul W[K,N] chunk gate-first", layout=0),
    Case("packed_kn_split", lambda m, x: _swiglu(*_halves(torch.matmul(x, m.pk), "split")),
         "swiglu_packed", "packed matmul W[K,N] split gate-first", layout=0),
    Case("packed_kn_split_sizes_up_first",
         lambda m, x: (lambda u, g: F.silu(g) * u)(*_halves(x @ m.pk, "split_sizes")),
         "swiglu_packed", "packed matmul W[K,N] split up-first", layout=1),
    Case("packed_kn_interleaved", lambda m, x: (lambda y: F.silu(y[..., ::2]) * y[..., 1::2])(x @ m.pk),
         "swiglu_packed", "packed matmul W[K,N] interleaved gate-first", layout=2),
    Case("block_kn", lambda m, x: _swiglu(x @ m.gk, x @ m.uk) @ m.dk, "mlp_block",
         "matmul W[K,N] x2, silu(g)*u, down (matmul W[K,N])"),
    Case("block_t", lambda m, x: _swiglu(x @ m.wg.t(), x @ m.wu.t()) @ m.wd.t(), "mlp_block",
         "matmul W.t() x2, silu(g)*u, down (matmul W.t())"),
    Case("block_linear_down_matmul", lambda m, x: torch.matmul(_swiglu(F.linear(x, m.wg), F.linear(x, m.wu)), m.dk),
         "mlp_block", "linear x2, silu(g)*u, down (matmul W[K,N])"),
    Case("block_packed_kn_chunk", lambda m, x: _swiglu(*_halves(x @ m.pk, "chunk")) @ m.dk,
         "mlp_block_packed", "packed matmul W[K,N] chunk gate-first", layout=0),
    Case("block_packed_t_split_linear_down", lambda m, x: F.linear(_swiglu(*_halves(x @ m.p.T, "split")), m.wd),
         "mlp_block_packed", "packed matmul W.t() split gate-first", layout=0),
]




def _is_matmul(n: torch.fx.Node) -> bool:
    return n.op in ("call_function", "call_method") and n.target in MATMULS


def _weight_arg(a: torch.fx.Node) -> str:
    """How the op receives a weight: the parameter itself, or a ``t`` view of it."""
    if a.op == "placeholder":
        return "param"
    assert a.op == "call_function" and a.target is torch.t and a.args[0].op == "placeholder", a.format_node()
    return "t(param)"


@pytest.mark.parametrize("dynamic", [False, True], ids=["static", "dynamic"])
@pytest.mark.parametrize("lead", [(7,), (3, 5)], ids=["2d", "3d"])
@pytest.mark.parametrize("case", CASES, ids=lambda c: c.name)
def test_pass_rewrites_each_matmul_spelling_once(case, lead, dynamic, cpu_rewrites, dynamo_graph):
    gm = dynamo_graph(Weights(case.fn), torch.randn(*lead, K), dynamic=dynamic)
    GluPass()(gm.graph)
    gm.graph.lint()
    ops = [n for n in gm.graph.nodes if n.op == "call_function" and n.target in OPS]
    assert len(ops) == 1 and OPS[ops[0].target] == case.op
    assert not [n for n in gm.graph.nodes if _is_matmul(n)]
    # Weights are read where they live: the parameter, or its .t() view; no copy, no other node.
    op = ops[0]
    packed = case.op.endswith("packed")
    weights = [op.args[1]] if packed else list(op.args[1:3])
    if case.op.startswith("mlp_block"):
        weights.append(op.args[4 if packed else 5])
    kinds = {_weight_arg(w) for w in weights}
    assert kinds <= {"param", "t(param)"}
    if packed:
        assert op.args[3] == case.layout
    leftovers = [n for n in gm.graph.nodes if n.op in ("call_function", "call_method")
                 and n.target not in OPS and n.target not in (operator.getitem, torch.t)]
    assert not leftovers, [n.format_node() for n in leftovers]
    [rewrite] = cpu_rewrites.rewrites
    assert rewrite.family == ("mlp_block" if case.op.startswith("mlp") else "swiglu")
    assert rewrite.spelling.startswith(case.spelling), rewrite.spelling
    assert cpu_rewrites.left == []


@pytest.mark.parametrize("case", CASES, ids=lambda c: c.name)
def test_compiled_training_step_equals_eager(case, cpu_rewrites):
    train_step_matches(Weights(case.fn, seed=1), torch.randn(2, 3, K), tol=1e-5)
    assert cpu_rewrites.total == 1 and cpu_rewrites.left == []


@pytest.mark.parametrize("case", CASES, ids=lambda c: c.name)
def test_float64_training_step_is_exact(case, cpu_rewrites, monkeypatch):
    """The pass normally leaves float64 alone; let it rewrite so the reference path is compared
    with eager at float64 precision, every gradient included."""
    from glu_fusion.patterns import _common, swiglu
    wider = (*_common.REWRITE_DTYPES, torch.float64)
    monkeypatch.setattr(_common, "REWRITE_DTYPES", wider)
    monkeypatch.setattr(swiglu, "REWRITE_DTYPES", wider)
    got = train_step_matches(Weights(case.fn, seed=2).double(), torch.randn(3, 5, K, dtype=torch.float64),
                             tol=1e-12)
    assert got.dtype == torch.float64 and cpu_rewrites.total == 1


INTERPRETED = [c for c in CASES if c.name in ("kn", "packed_kn_chunk", "block_t", "block_packed_kn_chunk")]


@pytest.mark.parametrize("case", INTERPRETED, ids=lambda c: c.name)
def test_kernels_read_transposed_weight_views(case, cpu_rewrites, monkeypatch):
    """The Triton kernels (run by the interpreter on CPU) read the ``[N, K]`` views of weights
    stored ``[K, N]`` through their strides."""
    from glu_fusion.ops.dispatch import interpreter_active
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    if not interpreter_active():
        pytest.skip("the Triton interpreter is not active in this session")
    prev = torch.get_float32_matmul_precision()
    torch.set_float32_matmul_precision("highest")
    try:
        train_step_matches(Weights(case.fn, seed=3), torch.randn(2, 5, K), tol=1e-4)
    finally:
        torch.set_float32_matmul_precision(prev)
    assert cpu_rewrites.total == 1
