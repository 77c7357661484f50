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
