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
from glu_fusion.compile.pre_grad import GluPass

K, N = 16, 24


class Weights(nn.Module):
    def __init__(self, forward, rows: int = N, packed_rows: int = 2 * N) -> None:
        super().__init__()
        g = torch.Generator().manual_seed(0)
        self.wg = nn.Parameter(0.3 * torch.randn(rows, K, generator=g))
        self.wu = nn.Parameter(0.3 * torch.randn(rows, K, generator=g))
        self.bu = nn.Parameter(0.3 * torch.randn(rows, generator=g))
        self.w = nn.Parameter(0.3 * torch.randn(packed_rows, K, generator=g))
        # matmul spellings: [K, N] weights, 1-D vectors, batched [B, K, N] weights
        self.gk = nn.Parameter(0.3 * torch.randn(K, rows, generator=g))
        self.uk = nn.Parameter(0.3 * torch.randn(K, rows, generator=g))
        self.vg = nn.Parameter(0.3 * torch.randn(K, generator=g))
        self.vu = nn.Parameter(0.3 * torch.randn(K, generator=g))
        self.g3 = nn.Parameter(0.3 * torch.randn(2, K, rows, generator=g))
        self.u3 = nn.Parameter(0.3 * torch.randn(2, K, rows, generator=g))
        self.fn = forward

    def forward(self, *xs):
        return self.fn(self, *xs)


# Each case: ``fn(m, x)`` with ``m`` holding wg, wu (two weights), bu, and w (packed, 2N rows).

def gate_used_elsewhere(m, x):
    g = F.linear(x, m.wg)
    return F.silu(g) * F.linear(x, m.wu) + g


def up_used_elsewhere(m, x):
    u = F.linear(x, m.wu)
    return F.silu(F.linear(x, m.wg)) * u + u


def activation_used_elsewhere(m, x):
    a = F.silu(F.linear(x, m.wg))
    return a * F.linear(x, m.wu) + a


def intermediate_returned(m, x):
    g = F.linear(x, m.wg)
    return F.silu(g) * F.linear(x, m.wu), g


def packed_output_used_elsewhere(m, x):
    y = F.linear(x, m.w)
    g, u = y.chunk(2, -1)
    return F.silu(g) * u + y.sum()


def packed_half_used_elsewhere(m, x):
    g, u = F.linear(x, m.w).chunk(2, -1)
    return F.silu(g) * u + u


def mutation_between(m, x):
    x = x.clone()
    g = F.linear(x, m.wg)
    x.mul_(2.0)
    return F.silu(g) * F.linear(x, m.wu)


def mutated_up(m, x):
    u = F.linear(x, m.wu)
    u.add_(1.0)
    return F.silu(F.linear(x, m.wg)) * u


def unequal_split(m, x):
    g, u = F.linear(x, m.w).split([1, 2 * N - 1], -1)  # [..., 1] * [..., 2N-1] broadcasts
    return F.silu(g) * u


def unequal_chunk(m, x):
    g, u = F.linear(x, m.w)[..., :3].chunk(2, -1)  # widths 2 and 1
    return F.silu(g) * u


def split_three_use_two(m, x):
    parts = F.linear(x, m.w).split(2 * N // 3, -1)
    return F.silu(parts[0]) * parts[1]


def chunk_wrong_dim(m, x):
    g, u = F.linear(x, m.w).chunk(2, dim=0)
    return F.silu(g) * u


def different_inputs(m, x):
    return F.silu(F.linear(x, m.wg)) * F.linear(x + 1, m.wu)


def bias_on_one_side(m, x):
    return F.silu(F.linear(x, m.wg)) * F.linear(x, m.wu, m.bu)


def geglu_tanh(m, x):
    return F.gelu(F.linear(x, m.wg), approximate="tanh") * F.linear(x, m.wu)


def geglu(m, x):
    return F.gelu(F.linear(x, m.wg)) * F.linear(x, m.wu)


def sigmoid_glu(m, x):
    return torch.sigmoid(F.linear(x, m.wg)) * F.linear(x, m.wu)


def scaled_sigmoid_gate(m, x):
    g = F.linear(x, m.wg)
    return g * torch.sigmoid(1.702 * g) * F.linear(x, m.wu)


def gpt_oss_gate(m, x, limit=7.0, alpha=1.702):
    y = F.linear(x, m.w)
    g, u = y[..., ::2], y[..., 1::2]
    g = g.clamp(max=limit)
    u = u.clamp(min=-limit, max=limit)
    return (u + 1) * (g * torch.sigmoid(g * alpha))


def silu_of_input(m, x):
    return F.silu(x.repeat(1, 1, 2)[..., :N]) * F.linear(x, m.wu)


def silu_times_itself(m, x):
    g = F.linear(x, m.wg)
    return F.silu(g) * g


# matmul look-alikes --------------------------------------------------------------------------

def matmul_vector_weight(m, x):
    """``x @ v`` with a 1-D v is a matrix-vector product: no projection of x's features."""
    return F.silu(x @ m.vg) * (x @ m.vu)


def matmul_batched_weight(m, x):
    """3-D weights ``[B, K, N]``: a batched matmul, not one projection."""
    return F.silu(x @ m.g3) * (x @ m.u3)


def matmul_activation_operand(m, x):
    """The second operand is computed from the input (attention-like), not a stored weight."""
    y = torch.tanh(x[0])  # [S, K]
    return F.silu(x @ y.t()) * (x @ y.t().exp())


def matmul_weight_first(m, x):
    """``W @ xᵀ``: the weight is the first operand, the projection runs over x's tokens."""
    return F.silu(m.wg @ x.mT) * (m.wu @ x.mT)


def matmul_different_inputs(m, x):
    return F.silu(x @ m.wg.t()) * ((x + 1) @ m.wu.t())


def matmul_kn_different_inputs(m, x):
    return F.silu(x @ m.gk) * (x.flip(-1) @ m.uk)


def matmul_geglu(m, x):
    return F.gelu(x @ m.gk) * (x @ m.uk)


def matmul_sigmoid_glu(m, x):
    return torch.sigmoid(x @ m.wg.t()) * (x @ m.wu.t())


def matmul_gate_used_elsewhere(m, x):
    g = x @ m.gk
    return F.silu(g) * (x @ m.uk) + g


def matmul_unequal_split(m, x):
    g, u = (x @ m.w.t()).split([N - 1, N + 1], -1)
    return F.silu(g) * u[..., 2:]


NEGATIVE = {fn.__name__: fn for fn in [
    gate_used_elsewhere, up_used_elsewhere, activation_used_elsewhere, intermediate_returned,
    packed_output_used_elsewhere, packed_half_used_elsewhere, mutation_between, mutated_up,
    unequal_split, unequal_chunk, split_three_use_two, chunk_wrong_dim, different_inputs,
    bias_on_one_side, geglu_tanh, geglu, sigmoid_glu, scaled_sigmoid_gate, gpt_oss_gate,
    silu_of_input, silu_times_itself, matmul_vector_weight, matmul_batched_weight,
    matmul_activation_operand, matmul_weight_first, matmul_different_inputs, matmul_kn_different_inputs,
    matmul_geglu, matmul_sigmoid_glu, matmul_gate_used_elsewhere, matmul_unequal_split]}


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


@pytest.mark.parametrize("name", ["mutation_between", "gate_used_elsewhere", "gpt_oss_gate",
                                  "chunk_wrong_dim", "matmul_activation_operand", "matmul_batched_weight",
                                  "matmul_weight_first"])
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
