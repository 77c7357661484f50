"""Gated-norm spellings found in third-party model code:

* the gate applied in place (``out *= F.silu(z)``): rewritten like the out-of-place product,
  and left alone when the tensor multiplied in place is not the norm's own intermediate;
* the weight applied while the value is still grouped (``w.view(G, D // G) * normed`` before
  the merge back to ``[..., D]``)."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

import glu_fusion
import glu_fusion.ops  # noqa: F401  (registers the ops named below)
from glu_fusion.compile.pre_grad import GluPass

OP = torch.ops.glu_fusion.rms_norm_gated.default
EPS = 1e-6


def gate_in_place(x, z, w):
    xf = x.float()
    out = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + EPS)
    out = w * out.to(x.dtype)
    out *= F.silu(z)
    return out


def gate_tensor_mutated(x, z, w):
    """The gate is multiplied in place by the norm: the norm's value is not the one mutated."""
    xf = x.float()
    out = w * (xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + EPS)).to(x.dtype)
    g = F.silu(z)
    g *= out
    return g


def _inputs(requires_grad=False):
    x, z = torch.randn(3, 5, 32).bfloat16(), (2 * torch.randn(3, 5, 32)).bfloat16()
    w = (1 + 0.1 * torch.randn(32)).bfloat16()
    return [t.requires_grad_(requires_grad) for t in (x, z, w)]


def test_in_place_gate_is_rewritten(cpu_rewrites, dynamo_graph):
    gm = dynamo_graph(gate_in_place, *_inputs())
    GluPass()(gm.graph)
    gm.graph.lint()
    [op] = [n for n in gm.graph.nodes if n.op == "call_function" and n.target is OP]
    assert tuple(op.args[5:]) == (True, "silu", 0.0, "before_weight", True)
    assert cpu_rewrites.counts() == {"rms_norm_gated": 1}


def test_in_place_gate_compiled_equals_eager(cpu_rewrites):
    leaves = _inputs(requires_grad=True)
    copies = [t.detach().clone().requires_grad_() for t in leaves]
    expected = gate_in_place(*leaves)
    got = torch.compile(gate_in_place, backend=glu_fusion.backend)(*copies)
    assert cpu_rewrites.counts() == {"rms_norm_gated": 1}
    torch.testing.assert_close(got, expected, rtol=0, atol=0)
    dy = torch.randn_like(expected)
    for a, b in zip(torch.autograd.grad(got, copies, dy), torch.autograd.grad(expected, leaves, dy)):
        scale = b.float().abs().max().clamp_min(1e-6)
        assert ((a.float() - b.float()).abs().max() / scale).item() <= 2e-2


def test_gate_mutated_in_place_is_left_alone(cpu_rewrites, dynamo_graph):
    gm = dynamo_graph(gate_tensor_mutated, *_inputs())
    GluPass()(gm.graph)
    assert not [n for n in gm.graph.nodes if n.op == "call_function" and n.target is OP]
    assert not cpu_rewrites.rewrites


GROUP = 8


def grouped_weight_gate_first(x, z, w):
    """Mamba-2-style: gate first in fp32, groups of 8, weight in the grouped view, one downcast."""
    xf = x.float() * F.silu(z.float())
    xg = xf.view(*xf.shape[:-1], -1, GROUP)
    yg = xg * torch.rsqrt(xg.pow(2).mean(-1, keepdim=True) + EPS)
    yg = w.float().view(-1, GROUP) * yg
    return yg.reshape(xf.shape).to(x.dtype)


def grouped_weight_gate_after(x, z, w):
    xf = x.float()
    xg = xf.view(*xf.shape[:-1], -1, GROUP)
    yg = (xg * torch.rsqrt(xg.pow(2).mean(-1, keepdim=True) + EPS)) * w.view(-1, GROUP)
    return (yg.flatten(-2) * F.silu(z.float())).to(x.dtype)


# The one downcast comes right after the fp32 weight ("after_weight") or after the gate ("none"):
# the same values either way.
@pytest.mark.parametrize("fn,norm_before_gate,downcast", [(grouped_weight_gate_first, False, "after_weight"),
                                                          (grouped_weight_gate_after, True, "none")])
def test_weight_in_grouped_view_is_rewritten(fn, norm_before_gate, downcast, cpu_rewrites, dynamo_graph):
    gm = dynamo_graph(fn, *_inputs())
    GluPass()(gm.graph)
    gm.graph.lint()
    [op] = [n for n in gm.graph.nodes if n.op == "call_function" and n.target is OP]
    assert op.args[2] is not None and op.args[4] == GROUP and op.args[5] is norm_before_gate
    assert op.args[8] == downcast


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("fn", [grouped_weight_gate_first, grouped_weight_gate_after], ids=lambda f: f.__name__)
def test_weight_in_grouped_view_compiled_equals_eager(fn, dtype, cpu_rewrites):
    leaves = [t.to(dtype).detach().requires_grad_() for t in _inputs()]
    copies = [t.detach().clone().requires_grad_() for t in leaves]
    expected = fn(*leaves)
    got = torch.compile(fn, backend=glu_fusion.backend)(*copies)
    assert cpu_rewrites.counts() == {"rms_norm_gated": 1}
    torch.testing.assert_close(got, expected, rtol=0, atol=0)
    dy = torch.randn_like(expected)
    tol = 1e-5 if dtype == torch.float32 else 2e-2
    for a, b in zip(torch.autograd.grad(got, copies, dy), torch.autograd.grad(expected, leaves, dy)):
        scale = b.float().abs().max().clamp_min(1e-6)
        assert ((a.float() - b.float()).abs().max() / scale).item() <= tol


def test_grouped_weight_of_another_shape_is_left_alone(cpu_rewrites, dynamo_graph):
    """A per-group scale ``[G, 1]`` broadcast over the group is not the op's weight."""
    def fn(x, z, w):
        xf = x.float() * F.silu(z.float())
        xg = xf.view(*xf.shape[:-1], -1, GROUP)
        yg = xg * torch.rsqrt(xg.pow(2).mean(-1, keepdim=True) + EPS)
        yg = w[:4].float().view(4, 1) * yg
        return yg.reshape(xf.shape).to(x.dtype)

    gm = dynamo_graph(fn, *_inputs())
    GluPass()(gm.graph)
    assert not [n for n in gm.graph.nodes if n.op == "call_function" and n.target is OP]
