"""The post-grad pass that points compiled calls at the ops' autograd-free twins
(``glu_fusion.graph_ops``): which calls it swaps, that the compiled code calls the twins, that
results and gradients stay exact, and that the twins match their ops."""
from __future__ import annotations

import re

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

import glu_fusion
from glu_fusion.compile import post_grad
from glu_fusion.compile.post_grad import GraphOpsPass, use_graph_ops
from glu_fusion.ops.graph_twins import GRAPH_TWINS
from helpers.models import Packed, TwoWeights

OPS = torch.ops.glu_fusion


class GatedNorm(nn.Module):
    def __init__(self, d=16):
        super().__init__()
        self.weight = nn.Parameter(torch.randn(d))

    def forward(self, x, z):
        xf = x.float()
        y = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + 1e-6)
        return (self.weight * y * F.silu(z.float())).to(x.dtype)


def _compiled_calls(code: str) -> list:
    """The ``glu_fusion`` ops the generated code calls, in order."""
    return re.findall(r"^\s*(?:\w+ = )?torch\.ops\.glu_fusion\.(\w+)\.default\(", code, re.MULTILINE)


def _run(module, inputs):
    """(forward code, backward code, compiled grads, float64 grads) of one compiled step."""
    from torch._inductor.utils import run_and_get_code
    params = list(module.parameters())
    ref_inputs = [t.detach().double().requires_grad_() for t in inputs]
    ref = torch.autograd.grad(module.double()(*ref_inputs).sum(), [*ref_inputs, *module.parameters()])
    module.float()
    compiled = torch.compile(module, backend=glu_fusion.backend)
    got, codes = run_and_get_code(lambda: torch.autograd.grad(compiled(*inputs).sum(), [*inputs, *params]))
    return codes, got, ref


def _assert_close(got, ref):
    for g, r in zip(got, ref, strict=True):
        torch.testing.assert_close(g.double(), r, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("recompute", [False, True])
def test_compiled_swiglu_calls_twins(cpu_rewrites, monkeypatch, recompute):
    monkeypatch.setattr(glu_fusion.config, "recompute", recompute)
    x = torch.randn(2, 5, 16, requires_grad=True)
    codes, got, ref = _run(TwoWeights(), [x])
    forward, backward = (_compiled_calls(c) for c in codes)
    assert forward == ["swiglu_nograd"]
    if recompute:  # the in-place dH inside auto_functionalized keeps its op (Inductor rewrites it)
        assert backward == ["swiglu_preact_nograd", "swiglu_dh_inplace"]
    else:  # the saved pre-activations are donated: SavedPreactPass ran first
        assert backward == ["swiglu_dh_inplace_nograd"]
    _assert_close(got, ref)


def test_compiled_packed_and_norm_call_twins(cpu_rewrites):
    x = torch.randn(6, 16, requires_grad=True)
    codes, got, ref = _run(Packed(), [x])
    assert [_compiled_calls(c) for c in codes] == [["swiglu_packed_nograd"], ["swiglu_dh_inplace_nograd"]]
    _assert_close(got, ref)
    torch._dynamo.reset()
    x, z = torch.randn(6, 16, requires_grad=True), torch.randn(6, 16, requires_grad=True)
    codes, got, ref = _run(GatedNorm(), [x, z])
    assert [_compiled_calls(c) for c in codes] == [["rms_norm_gated_nograd"], ["rms_norm_gated_backward_nograd"]]
    _assert_close(got, ref)


def test_setting_off_keeps_the_ops(cpu_rewrites, monkeypatch):
    monkeypatch.setattr(post_grad, "_GRAPH_OPS", False)
    x = torch.randn(2, 5, 16, requires_grad=True)
    codes, got, ref = _run(TwoWeights(), [x])
    assert [_compiled_calls(c) for c in codes] == [["swiglu"], ["swiglu_dh_inplace"]]
    _assert_close(got, ref)


def test_inference_graph_calls_twin(cpu_rewrites):
    from torch._inductor.utils import run_and_get_code
    module = TwoWeights()
    x = torch.randn(3, 16)
    with torch.no_grad():
        got, codes = run_and_get_code(torch.compile(module, backend=glu_fusion.backend), x)
    assert [_compiled_calls(c) for c in codes] == [["swiglu_nograd"]]
    torch.testing.assert_close(got, module(x))


def test_swaps_direct_calls_only():
    """Each direct call is swapped; a call inside ``auto_functionalized`` and other ops stay."""
    graph = torch.fx.Graph()
    x, w = graph.placeholder("x"), graph.placeholder("w")
    fwd = graph.call_function(OPS.swiglu.default, (x, w, w, None, None, True))
    mm = graph.call_function(torch.ops.aten.mm.default, (x, w))
    functionalized = graph.call_function(torch.ops.higher_order.auto_functionalized,
                                         (OPS.swiglu_dh_inplace.default,), {"dout": x, "preact": w})
    graph.output((fwd, mm, functionalized))
    assert use_graph_ops(graph) == 1
    assert fwd.target is OPS.swiglu_nograd.default
    assert mm.target is torch.ops.aten.mm.default
    assert functionalized.args[0] is OPS.swiglu_dh_inplace.default


def test_uuid_follows_the_setting(monkeypatch):
    on = GraphOpsPass().uuid()
    monkeypatch.setattr(post_grad, "_GRAPH_OPS", False)
    assert GraphOpsPass().uuid() != on


def test_every_op_has_a_twin_with_its_schema():
    names = {op.name() for op in GRAPH_TWINS}
    assert names == {f"glu_fusion::{n}" for n in (
        "swiglu", "swiglu_packed", "swiglu_preact", "swiglu_dh", "swiglu_dh_inplace", "rms_norm_gated", "rms_norm_gated_backward", "grouped_swiglu",
        "grouped_swiglu_packed", "grouped_swiglu_dh", "grouped_swiglu_dx", "grouped_swiglu_dw", "grouped_down_combine",
        "mlp_block", "mlp_block_packed", "mlp_dgated", "mlp_dgated_inplace",
        "rms_norm", "rms_norm_backward")}
    for op, twin in GRAPH_TWINS.items():
        assert twin.name() == op.name() + "_nograd"
        assert str(twin._schema).replace("_nograd(", "(", 1) == str(op._schema)


def test_twin_computes_what_the_op_does_and_records_no_graph(monkeypatch):
    """Same values as the op (on the reference path here), without the op's autograd node: why
    only compiled graphs, which nothing differentiates, may call it."""
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    x = torch.randn(4, 8, requires_grad=True)
    wg, wu = torch.randn(6, 8), torch.randn(6, 8)
    out, preact = OPS.swiglu.default(x, wg, wu, None, None, True)
    twin_out, twin_preact = OPS.swiglu_nograd.default(x, wg, wu, None, None, True)
    torch.testing.assert_close(twin_out, out, rtol=0, atol=0)
    torch.testing.assert_close(twin_preact, preact, rtol=0, atol=0)
    assert "glu_fusion_swiglu" in type(out.grad_fn).__name__
    assert twin_out.grad_fn is None or "glu_fusion" not in type(twin_out.grad_fn).__name__


def test_twins_pass_opcheck_schema_and_fake(monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    x, wg, wu = torch.randn(4, 8), torch.randn(6, 8), torch.randn(6, 8)
    torch.library.opcheck(OPS.swiglu_nograd.default, (x, wg, wu, None, None, True),
                          test_utils=("test_schema", "test_faketensor"))
    preact, dout = torch.randn(4, 12), torch.randn(4, 6)
    torch.library.opcheck(OPS.swiglu_dh_inplace_nograd.default, (dout, preact),
                          test_utils=("test_schema", "test_faketensor"))
    z, w = torch.randn(4, 8), torch.randn(8)
    torch.library.opcheck(OPS.rms_norm_gated_nograd.default, (x, z, w, 1e-6, None, True, "silu", 0.0, "none", False),
                          test_utils=("test_schema", "test_faketensor"))
