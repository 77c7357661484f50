"""Graphs that look like SwiGLU but are not (or cannot be fused safely): left exactly as they were.

Each case runs the pass directly on its Dynamo graph; the graph must print the same before and
after, and the report must hold no rewrite.  A few cases also compile with the backend and
compare against eager, since the point of refusing is never to give a wrong result.
"""
from __future__ import annotations

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

import glu_fusion
from glu_fusion.graph_pass import GluPass

K, N = 16, 24


class Weights(nn.Module):
    def __init__(self, forward, rows: int = N, packed_rows: int = 2 * N) -> None:
        super().__init__()
        g = torch.Generator().manual_seed(0)
        self.wg = nn.Parameter(0.3 * torch.randn(rows, K, generator=g))
        self.wu = nn.Parameter(0.3 * torch.randn(rows, K, generator=g))
        self.bu = nn.Parameter(0.3 * torch.randn(rows, generator=g))
        self.w = nn.Parameter(0.3 * torch.randn(packed_rows, K, generator=g))
        self.fn = forward

    def forward(self, *xs):
        return self.fn(self, *xs)


def _mutated_between(m, x):
    x = x.clone()
    g = F.linear(x, m.wg)
    x.mul_(2.0)
    return F.silu(g) * F.linear(x, m.wu)


def _mutated_up(m, x):
    u = F.linear(x, m.wu)
    u.add_(1.0)
    return F.silu(F.linear(x, m.wg)) * u


def _gpt_oss(m, x, limit=7.0, alpha=1.702):
    y = F.linear(x, m.w)
    g, u = y[..., ::2], y[..., 1::2]
    g = g.clamp(max=limit)
    u = u.clamp(min=-limit, max=limit)
    return (u + 1) * (g * torch.sigmoid(g * alpha))


NEGATIVE = {
    "gate_used_elsewhere": lambda m, x: (lambda g: F.silu(g) * F.linear(x, m.wu) + g)(F.linear(x, m.wg)),
    "up_used_elsewhere": lambda m, x: (lambda u: F.silu(F.linear(x, m.wg)) * u + u)(F.linear(x, m.wu)),
    "activation_used_elsewhere": lambda m, x: (lambda a: a * F.linear(x, m.wu) + a)(F.silu(F.linear(x, m.wg))),
    "intermediate_returned": lambda m, x: (lambda g: (F.silu(g) * F.linear(x, m.wu), g))(F.linear(x, m.wg)),
    "packed_output_used_elsewhere": lambda m, x: (lambda y: (lambda g, u: F.silu(g) * u)(*y.chunk(2, -1)) + y.sum())(
        F.linear(x, m.w)),
    "packed_half_used_elsewhere": lambda m, x: (lambda g, u: F.silu(g) * u + u)(*F.linear(x, m.w).chunk(2, -1)),
    "mutation_between": _mutated_between,
    "mutated_up": _mutated_up,
    # [..., 1] * [..., 2N-1] broadcasts, so eager accepts these unequal halves
    "unequal_split": lambda m, x: (lambda g, u: F.silu(g) * u)(*F.linear(x, m.w).split([1, 2 * N - 1], -1)),
    "unequal_chunk": lambda m, x: (lambda g, u: F.silu(g) * u)(*F.linear(x, m.w)[..., :3].chunk(2, -1)),
    "split_three_use_two": lambda m, x: (lambda parts: F.silu(parts[0]) * parts[1])(
        F.linear(x, m.w).split(2 * N // 3, -1)),
    "chunk_wrong_dim": lambda m, x: (lambda g, u: F.silu(g) * u)(*F.linear(x, m.w).chunk(2, dim=0)),
    "different_inputs": lambda m, x: F.silu(F.linear(x, m.wg)) * F.linear(x + 1, m.wu),
    "bias_on_one_side": lambda m, x: F.silu(F.linear(x, m.wg)) * F.linear(x, m.wu, m.bu),
    "geglu_tanh": lambda m, x: F.gelu(F.linear(x, m.wg), approximate="tanh") * F.linear(x, m.wu),
    "geglu": lambda m, x: F.gelu(F.linear(x, m.wg)) * F.linear(x, m.wu),
    "sigmoid_glu": lambda m, x: torch.sigmoid(F.linear(x, m.wg)) * F.linear(x, m.wu),
    "scaled_sigmoid_gate": lambda m, x: (lambda g: g * torch.sigmoid(1.702 * g))(F.linear(x, m.wg)) * F.linear(x, m.wu),
    "gpt_oss_gate": _gpt_oss,
    "silu_of_input": lambda m, x: F.silu(x.repeat(1, 1, 2)[..., :N]) * F.linear(x, m.wu),
    "silu_times_itself": lambda m, x: (lambda g: F.silu(g) * g)(F.linear(x, m.wg)),
}


def _graph_text(gm) -> str:
    return str(gm.graph)


@pytest.mark.parametrize("name", sorted(NEGATIVE))
def test_not_rewritten(name, cpu_rewrites, dynamo_graph):
    x = torch.randn(2, 3, K)
    module = Weights(NEGATIVE[name])
    gm = dynamo_graph(module, x)
    before = _graph_text(gm)
    GluPass()(gm.graph)
    assert _graph_text(gm) == before
    assert cpu_rewrites.total == 0 and len(cpu_rewrites.graphs) == 1


@pytest.mark.parametrize("name", ["mutation_between", "gate_used_elsewhere", "gpt_oss_gate", "chunk_wrong_dim"])
def test_refused_sites_still_compile_to_eager_results(name, cpu_rewrites):
    module = Weights(NEGATIVE[name])
    x = torch.randn(4, 3, K) if name == "chunk_wrong_dim" else torch.randn(2, 3, K)
    with torch.no_grad():  # eager itself refuses backward through the mutated input
        expected = module(x)
        got = torch.compile(module, backend=glu_fusion.backend)(x)
    torch.testing.assert_close(got, expected)
    assert cpu_rewrites.total == 0


def test_float64_is_left_alone(cpu_rewrites, dynamo_graph):
    module = Weights(lambda m, x: F.silu(F.linear(x, m.wg)) * F.linear(x, m.wu)).double()
    gm = dynamo_graph(module, torch.randn(2, K, dtype=torch.float64))
    before = _graph_text(gm)
    GluPass()(gm.graph)
    assert _graph_text(gm) == before and cpu_rewrites.total == 0


def test_device_type_not_listed_is_left_alone(cpu_rewrites, dynamo_graph, monkeypatch):
    monkeypatch.setattr(glu_fusion.config, "rewrite_devices", ("cuda",))
    module = Weights(lambda m, x: F.silu(F.linear(x, m.wg)) * F.linear(x, m.wu))
    gm = dynamo_graph(module, torch.randn(2, K))
    before = _graph_text(gm)
    GluPass()(gm.graph)
    assert _graph_text(gm) == before and cpu_rewrites.total == 0


@pytest.mark.parametrize("which", ["dtype", "device"])
def test_mixed_weight_dtype_or_device_is_left_alone(which, cpu_rewrites, dynamo_graph):
    module = Weights(lambda m, x: F.silu(F.linear(x, m.wg)) * F.linear(x, m.wu))
    gm = dynamo_graph(module, torch.randn(2, K))
    weights = [n for n in gm.graph.find_nodes(op="placeholder") if "wu" in n.name]
    assert len(weights) == 1
    value = weights[0].meta["example_value"]
    # Dynamo only records what eager allowed; make the traced value disagree to prove the check.
    weights[0].meta["example_value"] = (torch.empty(value.shape, dtype=torch.float16) if which == "dtype"
                                        else torch.empty(value.shape, device="meta"))
    before = _graph_text(gm)
    GluPass()(gm.graph)
    assert _graph_text(gm) == before and cpu_rewrites.total == 0


def test_mixed_dtypes_under_autocast_are_left_alone(cpu_rewrites, dynamo_graph):
    module = Weights(lambda m, x: F.silu(F.linear(x, m.wg)) * F.linear(x, m.wu))
    module.wu.data = module.wu.data.to(torch.bfloat16)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        gm = dynamo_graph(module, torch.randn(2, K))
        before = _graph_text(gm)
        GluPass()(gm.graph)
    assert _graph_text(gm) == before and cpu_rewrites.total == 0
