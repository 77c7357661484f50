"""The measured routing table: which MLP sites are rewritten on CUDA, which stay with Inductor."""
from __future__ import annotations

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

import glu_fusion
from glu_fusion.compile.pre_grad import GluPass
from glu_fusion.patterns import routing


@pytest.fixture
def routed(monkeypatch):
    monkeypatch.setattr(routing, "ROUTE_BY_MEASUREMENT", True)
    monkeypatch.setattr(glu_fusion.config, "recompute", False)


def test_cuda_training_is_left_to_inductor_unless_recompute_asks_for_memory(routed, monkeypatch):
    assert routing.mlp_rewrite_pays("cuda", 16384, training=True) is not None
    monkeypatch.setattr(glu_fusion.config, "recompute", True)
    assert routing.mlp_rewrite_pays("cuda", 16384, training=True) is None


def test_cuda_inference_is_rewritten_from_the_measured_token_count(routed):
    big = routing.CUDA_INFERENCE_MIN_TOKENS
    assert routing.mlp_rewrite_pays("cuda", big, training=False) is None
    assert routing.mlp_rewrite_pays("cuda", big - 1, training=False) is not None
    assert routing.mlp_rewrite_pays("cuda", None, training=False) is not None  # dynamic: unknown


def test_cpu_graphs_follow_the_users_device_setting_only(routed):
    assert routing.mlp_rewrite_pays("cpu", 1, training=True) is None


def test_switch_off_rewrites_every_site(monkeypatch):
    monkeypatch.setattr(routing, "ROUTE_BY_MEASUREMENT", False)
    assert routing.mlp_rewrite_pays("cuda", 1, training=True) is None


class MLP(nn.Module):
    def __init__(self):
        super().__init__()
        self.gate_proj = nn.Linear(16, 32, bias=False)
        self.up_proj = nn.Linear(16, 32, bias=False)
        self.down_proj = nn.Linear(32, 16, bias=False)

    def forward(self, x):
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))


def test_pass_leaves_a_routed_site_untouched(routed, cpu_rewrites, dynamo_graph, monkeypatch):
    """The pass consults the table: a site it sends to Inductor keeps the user's graph."""
    monkeypatch.setattr(routing, "mlp_rewrite_pays", lambda *a: "measured slower")
    from glu_fusion.patterns import swiglu as swiglu_patterns
    monkeypatch.setattr(swiglu_patterns, "mlp_rewrite_pays", routing.mlp_rewrite_pays)
    gm = dynamo_graph(MLP(), torch.randn(4, 16))
    before = [n.target for n in gm.graph.nodes]
    GluPass()(gm.graph)
    assert [n.target for n in gm.graph.nodes] == before
    assert not cpu_rewrites.rewrites


# --- the gated RMSNorm rows of the table ----------------------------------------------------------

GATED_OP = torch.ops.glu_fusion.rms_norm_gated.default


def test_gated_norm_cuda_training_is_left_and_inference_rewritten(routed):
    assert "0.88x" in routing.gated_norm_rewrite_pays("cuda", training=True)
    assert routing.gated_norm_rewrite_pays("cuda", training=False) is None
    assert routing.gated_norm_rewrite_pays("cpu", training=True) is None


def test_gated_norm_reading_an_upcast_gate_stays_with_inductor_on_cuda(routed):
    assert "fp32 copy of the gate" in routing.gated_norm_rewrite_pays("cuda", training=False, gate_upcast=True)
    assert routing.gated_norm_rewrite_pays("cpu", training=False, gate_upcast=True) is None


def test_gated_norm_switch_off_rewrites_every_site(monkeypatch):
    monkeypatch.setattr(routing, "ROUTE_BY_MEASUREMENT", False)
    assert routing.gated_norm_rewrite_pays("cuda", training=True) is None


class GatedNorm(nn.Module):
    """Qwen3-Next's RMSNormGated: norm, weight, then the silu gate in fp32."""

    def __init__(self, d=32, eps=1e-6):
        super().__init__()
        self.weight = nn.Parameter(1 + 0.1 * torch.randn(d))
        self.eps = eps

    def forward(self, x, z):
        dtype = x.dtype
        h = x.to(torch.float32)
        h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + self.eps)
        h = self.weight * h.to(dtype)
        return (h * F.silu(z.to(torch.float32))).to(dtype)


@pytest.fixture
def as_if_cuda(routed, monkeypatch):
    """The real table, asked as if the graph's tensors lived on CUDA (this machine has none)."""
    from glu_fusion.patterns import rms_norm_gated as gated_patterns
    real = routing.gated_norm_rewrite_pays
    monkeypatch.setattr(gated_patterns, "gated_norm_rewrite_pays",
                        lambda device_type, training, **kw: real("cuda", training, **kw))


def _gated_graph(dynamo_graph, training):
    model = GatedNorm().bfloat16().requires_grad_(training)
    x, z = torch.randn(2, 3, 32).bfloat16(), torch.randn(2, 3, 32).bfloat16()
    with torch.set_grad_enabled(training):
        return dynamo_graph(model, x.requires_grad_(training), z.requires_grad_(training))


def test_default_leaves_a_cuda_training_gated_norm_to_inductor(as_if_cuda, cpu_rewrites, dynamo_graph):
    gm = _gated_graph(dynamo_graph, training=True)
    before = [n.target for n in gm.graph.nodes]
    GluPass()(gm.graph)
    assert [n.target for n in gm.graph.nodes] == before
    (record,) = cpu_rewrites.graphs
    assert record.rewrites == []
    [left] = record.left
    assert left.family == "rms_norm_gated"
    assert left.reason.startswith("left to Inductor: CUDA training graph: forward+backward measured 0.88x")
    assert left.source and "test_routing.py" in left.source
    assert "rms_norm_gated-like site left: left to Inductor" in str(cpu_rewrites)


def test_default_rewrites_a_cuda_inference_gated_norm(as_if_cuda, cpu_rewrites, dynamo_graph):
    gm = _gated_graph(dynamo_graph, training=False)
    GluPass()(gm.graph)
    gm.graph.lint()
    assert [n for n in gm.graph.nodes if n.op == "call_function" and n.target is GATED_OP]
    assert cpu_rewrites.counts() == {"rms_norm_gated": 1} and cpu_rewrites.left == []


class UpcastGateNorm(nn.Module):
    """HF's MambaRMSNormGated as the Mamba-2 mixer calls it in a bf16 model: an fp32 x (the scan's
    output), a bf16 gate upcast by the norm, a bf16 weight."""

    def __init__(self, d=32, eps=1e-6):
        super().__init__()
        self.weight = nn.Parameter((1 + 0.1 * torch.randn(d)).bfloat16())
        self.eps = eps

    def forward(self, x, z):
        dtype = x.dtype
        h = x.to(torch.float32) * F.silu(z.to(torch.float32))
        h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * h.to(dtype)


def test_cuda_gated_norm_reading_an_upcast_gate_is_left_to_inductor(as_if_cuda, cpu_rewrites, dynamo_graph):
    """The op would read an fp32 copy of the gate, a pass Inductor folds into its kernel: not a
    measured win, so even an inference graph stays with Inductor on CUDA (rewritten on the CPU
    when asked: tests/test_rms_norm_gated_spellings.py)."""
    x, z = torch.randn(2, 3, 32), torch.randn(2, 3, 32).bfloat16()
    with torch.no_grad():
        gm = dynamo_graph(UpcastGateNorm(), x, z)
    GluPass()(gm.graph)
    assert not [n for n in gm.graph.nodes if n.op == "call_function" and n.target is GATED_OP]
    [left] = cpu_rewrites.left
    assert "fp32 copy of the gate" in left.reason


def test_training_gated_norm_left_to_inductor_still_computes_the_same(as_if_cuda, cpu_rewrites):
    """End to end: the site left to Inductor compiles and trains as eager does."""
    model = GatedNorm().bfloat16()
    x = torch.randn(2, 3, 32).bfloat16().requires_grad_()
    z = torch.randn(2, 3, 32).bfloat16().requires_grad_()
    got = torch.compile(model, backend=glu_fusion.backend)(x, z)
    assert cpu_rewrites.total == 0 and len(cpu_rewrites.left) == 1
    torch.testing.assert_close(got, model(x, z))
