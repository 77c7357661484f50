"""Python's augmented assignments (``t *= 2``, ``t += b``...) write into a tensor: a site whose
span holds one is left alone, except the gated norm's own ``h *= act(z)`` on its intermediate."""
from __future__ import annotations

import operator

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

import glu_fusion
from glu_fusion.compile.pre_grad import GluPass

K, N = 16, 24


class TwoLinears(nn.Module):
    """A SwiGLU whose input is changed in place, through a view, between its two projections:
    both projections read the same graph value, so only the mutation check can tell."""

    def __init__(self, in_place) -> None:
        super().__init__()
        g = torch.Generator().manual_seed(0)
        self.wg = nn.Parameter(0.3 * torch.randn(N, K, generator=g))
        self.wu = nn.Parameter(0.3 * torch.randn(N, K, generator=g))
        self.in_place = in_place

    def forward(self, x):
        alias = x.view(-1)
        g = F.linear(x, self.wg)
        alias = self.in_place(alias)
        return F.silu(g) * F.linear(x, self.wu)


def _imul(t):
    t *= 2.0
    return t


def _iadd(t):
    t += 1.0
    return t


def _isub(t):
    t -= 0.5
    return t


def _itruediv(t):
    t /= 3.0
    return t


IN_PLACE = {"imul": _imul, "iadd": _iadd, "isub": _isub, "itruediv": _itruediv}


@pytest.mark.parametrize("name", sorted(IN_PLACE))
def test_swiglu_with_input_changed_in_place_between_linears_is_left_alone(name, cpu_rewrites, dynamo_graph):
    module = TwoLinears(IN_PLACE[name])
    gm = dynamo_graph(module, torch.randn(2, 3, K))
    targets = {n.target for n in gm.graph.nodes if n.op == "call_function"}
    assert getattr(operator, name) in targets  # the graph really holds the augmented assignment
    before = str(gm.graph)
    GluPass()(gm.graph)
    assert str(gm.graph) == before
    assert cpu_rewrites.total == 0


@pytest.mark.parametrize("name", ["imul", "iadd"])
def test_swiglu_with_input_changed_in_place_compiles_to_eager_results(name, cpu_rewrites):
    module = TwoLinears(IN_PLACE[name])
    x = torch.randn(2, 3, K)
    x_eager, x_compiled = x.clone(), x.clone()
    with torch.no_grad():
        expected = module(x_eager)
        got = torch.compile(module, backend=glu_fusion.backend)(x_compiled)
    torch.testing.assert_close(got, expected)
    torch.testing.assert_close(x_compiled, x_eager)  # the input mutation itself is kept
    assert cpu_rewrites.total == 0


def test_in_place_gate_product_on_the_norm_intermediate_is_still_fused(cpu_rewrites):
    """The gated norm's accepted spelling: ``h *= silu(z)`` on its own single-use intermediate."""
    def fn(x, z, w):
        h = x.float()
        h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + 1e-6)
        h = w * h.to(x.dtype)
        h *= F.silu(z)
        return h

    x, z = torch.randn(5, K), torch.randn(5, K)
    w = 1 + 0.2 * torch.randn(K)
    got = torch.compile(fn, backend=glu_fusion.backend)(x, z, w)
    torch.testing.assert_close(got, fn(x, z, w), atol=1e-5, rtol=1e-5)
    assert cpu_rewrites.counts() == {"rms_norm_gated": 1}
