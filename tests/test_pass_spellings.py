"""Every SwiGLU spelling the pass knows: rewritten exactly once, and equal to eager when compiled.

Each case is a tiny module; the pass runs directly on its Dynamo graph (fast structural check),
then the module is compiled with ``glu_fusion.backend`` and trained one step against eager.
"""
from __future__ import annotations

import dataclasses
import operator
from typing import Callable, Optional

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

import glu_fusion
from glu_fusion.compile.pre_grad import GluPass

from helpers.compiled_steps import train_step_matches

K, N = 16, 24
OPS = {torch.ops.glu_fusion.swiglu.default: "swiglu",
       torch.ops.glu_fusion.swiglu_packed.default: "swiglu_packed"}


class Site(nn.Module):
    """Weights for one SwiGLU (two ``[N, K]`` or one packed ``[2N, K]``) and a forward spelling."""

    def __init__(self, forward: Callable, packed: bool, bias: bool, seed: int = 0) -> None:
        super().__init__()
        g = torch.Generator().manual_seed(seed)
        rows = 2 * N if packed else N
        make = lambda *s: nn.Parameter(0.3 * torch.randn(*s, generator=g))  # noqa: E731
        if packed:
            self.w, self.b = make(rows, K), (make(rows) if bias else None)
        else:
            self.wg, self.wu = make(N, K), make(N, K)
            self.bg, self.bu = (make(N), make(N)) if bias else (None, None)
        self.act = nn.SiLU()
        self.fn = forward

    def forward(self, x):
        return self.fn(self, x)


def lin(x, w, b):
    return F.linear(x, w, b)


def _g(m, x):
    return F.linear(x, m.wg, m.bg)


def _u(m, x):
    return F.linear(x, m.wu, m.bu)


@dataclasses.dataclass
class Case:
    name: str
    fn: Callable
    packed: bool = False
    bias: bool = False
    layout: Optional[int] = None    # expected packed layout
    spelling: str = ""              # expected start of the report's spelling

    def module(self, seed: int = 0) -> Site:
        return Site(self.fn, self.packed, self.bias, seed)


def _gsig(g):
    return g * torch.sigmoid(g)


CASES = [
    # two weights -------------------------------------------------------------------------------
    Case("silu_mul", lambda m, x: F.silu(_g(m, x)) * _u(m, x), spelling="linear x2, silu(g)*u"),
    Case("bias", lambda m, x: F.silu(_g(m, x)) * _u(m, x), bias=True, spelling="linear x2 +bias"),
    Case("bias_kwarg", lambda m, x: F.silu(F.linear(x, m.wg, bias=m.bg)) * F.linear(x, m.wu, bias=m.bu),
         bias=True, spelling="linear x2 +bias"),
    Case("nn_silu", lambda m, x: m.act(_g(m, x)) * _u(m, x), spelling="linear x2, silu(g)*u"),
    Case("up_first_product", lambda m, x: _u(m, x) * F.silu(_g(m, x)), spelling="linear x2, u*silu(g)"),
    Case("torch_mul", lambda m, x: torch.mul(F.silu(_g(m, x)), _u(m, x))),
    Case("method_mul", lambda m, x: F.silu(_g(m, x)).mul(_u(m, x))),
    Case("g_sigmoid_g", lambda m, x: _gsig(_g(m, x)) * _u(m, x), spelling="linear x2, (g*sigmoid(g))*u"),
    Case("g_method_sigmoid", lambda m, x: (lambda g: g * g.sigmoid())(_g(m, x)) * _u(m, x)),
    Case("sigmoid_g_g", lambda m, x: (lambda g: torch.sigmoid(g) * g)(_g(m, x)) * _u(m, x),
         spelling="linear x2, (sigmoid(g)*g)*u"),
    Case("up_times_g_sigmoid_g", lambda m, x: _u(m, x).mul(_gsig(_g(m, x)))),
    # one packed weight ---------------------------------------------------------------------------
    Case("chunk", lambda m, x: (lambda g, u: F.silu(g) * u)(*lin(x, m.w, m.b).chunk(2, dim=-1)),
         packed=True, layout=0, spelling="packed chunk gate-first"),
    Case("chunk_bias", lambda m, x: (lambda g, u: F.silu(g) * u)(*lin(x, m.w, m.b).chunk(2, -1)),
         packed=True, bias=True, layout=0, spelling="packed chunk gate-first +bias"),
    Case("chunk_up_first", lambda m, x: (lambda u, g: u * F.silu(g))(*torch.chunk(lin(x, m.w, m.b), 2, -1)),
         packed=True, layout=1, spelling="packed chunk up-first"),
    Case("split", lambda m, x: (lambda g, u: F.silu(g) * u)(*lin(x, m.w, m.b).split(N, -1)),
         packed=True, layout=0, spelling="packed split gate-first"),
    Case("split_sizes",
         lambda m, x: (lambda g, u: _gsig(g) * u)(*torch.split(lin(x, m.w, m.b), [N, N], dim=-1)),
         packed=True, layout=0),
    Case("unbind_view", lambda m, x: (lambda gu: F.silu(gu[0]) * gu[1])(
        lin(x, m.w, m.b).view(*x.shape[:-1], 2, N).unbind(-2)), packed=True, layout=0,
        spelling="packed unbind gate-first"),
    Case("unbind_interleaved", lambda m, x: (lambda gu: F.silu(gu[0]) * gu[1])(
        lin(x, m.w, m.b).unflatten(-1, (N, 2)).unbind(-1)), packed=True, bias=True, layout=2,
        spelling="packed unbind interleaved gate-first +bias"),
    Case("interleaved", lambda m, x: (lambda y: F.silu(y[..., ::2]) * y[..., 1::2])(lin(x, m.w, m.b)),
         packed=True, layout=2, spelling="packed interleaved gate-first"),
    Case("interleaved_up_even",
         lambda m, x: (lambda y: y[..., 0::2] * F.silu(y[..., 1::2]))(lin(x, m.w, m.b)), packed=True, bias=True, layout=3, spelling="packed interleaved up-first +bias"),
]


def fused_ops(graph: torch.fx.Graph) -> list:
    return [n for n in graph.nodes if n.op == "call_function" and n.target in OPS]


def _linears(graph: torch.fx.Graph) -> list:
    return [n for n in graph.nodes if n.op == "call_function" and n.target is torch._C._nn.linear]


@pytest.mark.parametrize("dynamic", [False, True], ids=["static", "dynamic"])
@pytest.mark.parametrize("lead", [(7,), (3, 5)], ids=["2d", "3d"])
@pytest.mark.parametrize("case", CASES, ids=lambda c: c.name)
def test_pass_rewrites_each_spelling_once(case, lead, dynamic, cpu_rewrites, dynamo_graph):
    gm = dynamo_graph(case.module(), torch.randn(*lead, K), dynamic=dynamic)
    GluPass()(gm.graph)
    gm.graph.lint()
    ops = fused_ops(gm.graph)
    assert len(ops) == 1 and not _linears(gm.graph)
    op = ops[0]
    assert OPS[op.target] == ("swiglu_packed" if case.packed else "swiglu")
    if case.packed:
        assert op.args[3] == case.layout
        assert (op.args[2] is not None) == case.bias
    else:
        assert (op.args[3] is not None) == (op.args[4] is not None) == case.bias
    assert op.args[-1] is (not glu_fusion.config.recompute)
    users = list(op.users)
    assert len(users) == 1 and users[0].target is operator.getitem and users[0].args[1] == 0
    [rewrite] = cpu_rewrites.rewrites
    assert rewrite.family == "swiglu" and rewrite.dtype == "float32"
    assert rewrite.spelling.startswith(case.spelling), rewrite.spelling
    assert rewrite.source and "test_pass_spellings.py" in rewrite.source






@pytest.mark.parametrize("case", CASES, ids=lambda c: c.name)
def test_compiled_training_step_equals_eager(case, cpu_rewrites):
    shape = (4, K) if case.name.endswith(("mul", "chunk", "interleaved")) else (2, 3, K)
    train_step_matches(case.module(seed=1), torch.randn(*shape), tol=1e-5)
    assert cpu_rewrites.counts() == {"swiglu": 1}


LOW_PRECISION = [c for c in CASES if c.name in ("silu_mul", "bias", "chunk_bias", "interleaved_up_even",
                                                "g_sigmoid_g")]


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=str)
@pytest.mark.parametrize("case", LOW_PRECISION, ids=lambda c: c.name)
def test_low_precision_training_step(case, dtype, cpu_rewrites):
    module = case.module(seed=2).to(dtype)
    got = train_step_matches(module, torch.randn(2, 3, K, dtype=dtype), tol=2e-2)
    assert got.dtype == dtype
    [rewrite] = cpu_rewrites.rewrites
    assert rewrite.dtype == str(dtype).replace("torch.", "")
