"""The gated norm with its gate applied in place (``out *= F.silu(z)``), as some model code
writes it: rewritten like the out-of-place product, and left alone when the tensor multiplied in
place is not the norm's own intermediate."""
from __future__ import annotations

import torch
import torch.nn.functional as F

import glu_fusion
import glu_fusion.ops  # noqa: F401  (registers the ops named below)
from glu_fusion.graph_pass import GluPass

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
