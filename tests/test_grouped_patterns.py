"""The expert family on Dynamo graphs: every grouped-GEMM spelling becomes one grouped op; the
look-alikes stay exactly as they were; compiled training steps equal eager.

``torch._grouped_mm`` takes bf16 only on the CPU, so these graphs are bf16 and the ops run their
reference path there (the ``cpu_rewrites`` fixture).
"""
from __future__ import annotations

import copy
import dataclasses
from typing import Callable

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

import glu_fusion
import glu_fusion.ops  # noqa: F401  (registers the ops named below)
from glu_fusion.compile.pre_grad import GluPass


@pytest.fixture(autouse=True)
def experts_rewrite_on(monkeypatch):
    """The expert family is off by default (not measured faster); these tests switch it on."""
    from glu_fusion.patterns import experts
    monkeypatch.setattr(experts, "REWRITE_DEVICE_TYPES", ("cpu", "cuda"))

pytestmark = pytest.mark.skipif(not hasattr(torch, "_grouped_mm"), reason="needs torch._grouped_mm")

E, K, N = 3, 16, 8
COUNTS = [4, 0, 7]          # an empty expert; every row routed (grouped_mm leaves a tail unwritten)
T = sum(COUNTS)
BF16 = torch.bfloat16
OPS = {torch.ops.glu_fusion.grouped_swiglu.default: "grouped_swiglu",
       torch.ops.glu_fusion.grouped_swiglu_packed.default: "grouped_swiglu_packed"}
mm = torch._grouped_mm


class Experts(nn.Module):
    """w1/w3: [E, N, K] (torchtitan); w13: [E, 2N, K]; gate_up: [E, K, 2N] (gpt-oss storage)."""

    def __init__(self, forward: Callable, seed: int = 0) -> None:
        super().__init__()
        g = torch.Generator().manual_seed(seed)

        def p(*shape):
            return nn.Parameter((torch.randn(*shape, generator=g) * K ** -0.5 * 2).to(BF16))
        self.w1, self.w3 = p(E, N, K), p(E, N, K)
        self.w13 = p(E, 2 * N, K)
        self.gate_up = p(E, K, 2 * N)
        self.fn = forward

    def forward(self, x, offs):
        return self.fn(self, x, offs)


def gptoss_gate(gate, up, limit=7.0, alpha=1.702):
    gate = gate.clamp(min=None, max=limit)
    up = up.clamp(min=-limit, max=limit)
    glu = gate * torch.sigmoid(gate * alpha)
    return (up + 1) * glu


@dataclasses.dataclass
class Case:
    name: str
    fn: Callable
    op: str
    spelling: str
    activation: str = "silu"


CASES = [
    Case("torchtitan", lambda m, x, o: F.silu(mm(x, m.w1.transpose(-2, -1), offs=o))
         * mm(x, m.w3.transpose(-2, -1), offs=o), "grouped_swiglu", "grouped_mm x2, silu(g)*u"),
    Case("up_times_sigmoid_form", lambda m, x, o: mm(x, m.w3.mT, offs=o)
         * (lambda g: g * torch.sigmoid(g))(mm(x, m.w1.mT, offs=o)), "grouped_swiglu", "grouped_mm x2"),
    Case("packed_chunk", lambda m, x, o: (lambda g, u: F.silu(g) * u)(
        *mm(x, m.w13.transpose(-2, -1), offs=o).chunk(2, dim=-1)),
         "grouped_swiglu_packed", "grouped_mm packed chunk"),
    Case("packed_split_storage_k_first", lambda m, x, o: (lambda g, u: F.silu(g) * u)(
        *torch.split(mm(x, m.gate_up, offs=o), N, dim=-1)),
         "grouped_swiglu_packed", "grouped_mm packed split"),
    Case("packed_interleaved", lambda m, x, o: (lambda y: F.silu(y[..., ::2]) * y[..., 1::2])(
        mm(x, m.gate_up, offs=o)), "grouped_swiglu_packed", "grouped_mm packed interleaved"),
    Case("gptoss_interleaved", lambda m, x, o: (lambda y: gptoss_gate(y[..., ::2], y[..., 1::2]))(
        mm(x, m.gate_up, offs=o)), "grouped_swiglu_packed", "grouped_mm packed interleaved, gpt-oss",
         "gptoss"),
    Case("gptoss_two_mms_small_limit", lambda m, x, o: gptoss_gate(
        mm(x, m.w1.transpose(-2, -1), offs=o), mm(x, m.w3.transpose(-2, -1), offs=o), limit=0.75),
         "grouped_swiglu", "grouped_mm x2, gpt-oss", "gptoss"),
]
if hasattr(F, "grouped_mm"):
    CASES.append(Case("functional_grouped_mm", lambda m, x, o: F.silu(F.grouped_mm(x, m.w1.mT, offs=o))
                      * F.grouped_mm(x, m.w3.mT, offs=o), "grouped_swiglu", "grouped_mm x2"))


def _inputs(seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(T, K, generator=g).to(BF16)
    offs = torch.tensor(COUNTS).cumsum(0).to(torch.int32)
    return x, offs


def fused_ops(graph):
    return [n for n in graph.nodes if n.op == "call_function" and n.target in OPS]


def _grouped_mms(graph):
    return [n for n in graph.nodes if n.op == "call_function" and "grouped_mm" in str(n.target)]


@pytest.mark.parametrize("case", CASES, ids=lambda c: c.name)
def test_each_spelling_becomes_one_op(case, cpu_rewrites, dynamo_graph):
    gm = dynamo_graph(Experts(case.fn), *_inputs())
    GluPass()(gm.graph)
    gm.graph.lint()
    [op] = fused_ops(gm.graph)
    assert OPS[op.target] == case.op and not _grouped_mms(gm.graph)
    activation_index = 6 if case.op == "grouped_swiglu" else 5
    assert op.args[activation_index] == case.activation
    if case.name == "gptoss_two_mms_small_limit":
        assert op.args[activation_index + 2] == 0.75
    [rewrite] = cpu_rewrites.rewrites
    assert rewrite.family == "experts" and rewrite.dtype == "bfloat16"
    assert rewrite.spelling.startswith(case.spelling), rewrite.spelling


def _close(got, want, name, tol=3e-2):
    scale = want.detach().float().abs().max().item()
    torch.testing.assert_close(got.float(), want.float(), atol=tol * max(scale, 1e-3), rtol=tol,
                               msg=lambda m: f"{name}: {m}")


@pytest.mark.parametrize("case", [c for c in CASES if c.name in ("torchtitan", "gptoss_interleaved",
                                                                 "packed_chunk")], ids=lambda c: c.name)
def test_compiled_training_step_equals_eager(case, cpu_rewrites):
    eager = Experts(case.fn, seed=1)
    compiled = copy.deepcopy(eager)
    x, offs = _inputs(seed=2)
    xe, xc = x.clone().requires_grad_(), x.clone().requires_grad_()
    want = eager(xe, offs)
    got = torch.compile(compiled, backend=glu_fusion.backend)(xc, offs)
    assert cpu_rewrites.counts() == {"experts": 1}
    _close(got, want, "out")
    dout = torch.randn_like(want)
    want.backward(dout)
    got.backward(dout)
    _close(xc.grad, xe.grad, "x")
    params = dict(compiled.named_parameters())
    for name, p in eager.named_parameters():
        if p.grad is None:
            assert params[name].grad is None, name
        else:
            _close(params[name].grad, p.grad, name)


# --- look-alikes ---------------------------------------------------------------------------------

NEGATIVE = {
    "gelu_glu": lambda m, x, o: F.gelu(mm(x, m.w1.mT, offs=o)) * mm(x, m.w3.mT, offs=o),
    "sigmoid_glu": lambda m, x, o: torch.sigmoid(mm(x, m.w1.mT, offs=o)) * mm(x, m.w3.mT, offs=o),
    "clamp_limits_disagree": lambda m, x, o: (lambda y: (y[..., 1::2].clamp(min=-5.0, max=5.0) + 1)
                                              * (lambda g: g * torch.sigmoid(g * 1.702))(
                                                  y[..., ::2].clamp(min=None, max=7.0)))(mm(x, m.gate_up, offs=o)),
    "gate_clamped_below_too": lambda m, x, o: (lambda y: (y[..., 1::2].clamp(min=-7.0, max=7.0) + 1)
                                               * (lambda g: g * torch.sigmoid(g * 1.702))(
                                                   y[..., ::2].clamp(min=-7.0, max=7.0)))(mm(x, m.gate_up, offs=o)),
    "routing_weight_inside": lambda m, x, o: F.silu(mm(x, m.w1.mT, offs=o))
    * (mm(x, m.w3.mT, offs=o) * x[:, :1]),
    "different_offsets": lambda m, x, o: F.silu(mm(x, m.w1.mT, offs=o))
    * mm(x, m.w3.mT, offs=o.flip(0).cummax(0).values),
    "different_inputs": lambda m, x, o: F.silu(mm(x, m.w1.mT, offs=o)) * mm(x * 2, m.w3.mT, offs=o),
    "packed_output_used_elsewhere": lambda m, x, o: (lambda y: F.silu(y[..., :N]) * y[..., N:] + y.sum())(
        mm(x, m.gate_up, offs=o)),
    "gate_used_elsewhere": lambda m, x, o: (lambda g: F.silu(g) * mm(x, m.w3.mT, offs=o) + g)(
        mm(x, m.w1.mT, offs=o)),
    "dense_linear_swiglu_is_not_an_expert": lambda m, x, o: F.silu(F.linear(x, m.w1[0]))
    * F.linear(x, m.w3[0]) * 0 + 1,
}


def _graph_text(gm):
    return str(gm.graph)


@pytest.mark.parametrize("name", sorted(NEGATIVE))
def test_look_alikes_are_left_alone(name, cpu_rewrites, dynamo_graph):
    gm = dynamo_graph(Experts(NEGATIVE[name]), *_inputs())
    before = _graph_text(gm)
    GluPass()(gm.graph)
    if name == "dense_linear_swiglu_is_not_an_expert":   # the dense SwiGLU family takes it instead
        assert not fused_ops(gm.graph) and cpu_rewrites.counts().get("experts", 0) == 0
        return
    assert _graph_text(gm) == before
    assert cpu_rewrites.total == 0


def test_expert_blocks_stay_with_inductor_by_default(cpu_rewrites, dynamo_graph, monkeypatch):
    from glu_fusion.patterns import experts
    monkeypatch.setattr(experts, "REWRITE_DEVICE_TYPES", ())
    case = CASES[0]
    gm = dynamo_graph(Experts(case.fn), *_inputs())
    GluPass()(gm.graph)
    assert not cpu_rewrites.rewrites
