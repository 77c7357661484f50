"""What the report says when nothing was rewritten: the graph lived on a device type the settings
leave alone, or it was served from Inductor's cache (the ops its code calls are counted)."""
from __future__ import annotations

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

import glu_fusion
from glu_fusion.compile.cache_watch import count_op_calls
from glu_fusion.compile.pre_grad import GluPass
from glu_fusion.compile.report import Report


class MLP(nn.Module):
    def __init__(self):
        super().__init__()
        self.gate = nn.Linear(16, 24, bias=False)
        self.up = nn.Linear(16, 24, bias=False)

    def forward(self, x):
        return F.silu(self.gate(x)) * self.up(x)


def test_a_cpu_graph_left_alone_by_default_says_how_to_include_it(cpu_rewrites, dynamo_graph, monkeypatch):
    monkeypatch.setattr(glu_fusion.config, "rewrite_devices", ("cuda",))  # the default
    gm = dynamo_graph(MLP(), torch.randn(2, 16))
    GluPass()(gm.graph)
    (record,) = cpu_rewrites.graphs
    assert record.rewrites == [] and record.skipped_devices == ("cpu",)
    text = str(cpu_rewrites)
    assert "the graph is on cpu" in text and "GLU_FUSION_DEVICES=cpu,cuda" in text


def test_a_searched_graph_with_no_match_gives_no_device_hint(cpu_rewrites, dynamo_graph):
    gm = dynamo_graph(lambda x: torch.sigmoid(x) * x, torch.randn(2, 16))
    GluPass()(gm.graph)
    (record,) = cpu_rewrites.graphs
    assert record.skipped_devices == () and record.summary() == "nothing rewritten"


GENERATED = """
        # Topologically Sorted Source Nodes: [mlp_block_default], Original ATen: [glu_fusion.mlp_block]
        buf14 = torch.ops.glu_fusion.mlp_block_nograd.default(buf13, primals_9, None, True)
        assert_size_stride(buf15, (2, 32, 64), (2048, 64, 1), 'torch.ops.glu_fusion.mlp_block_nograd.default')
        # buffer buf15 (op: torch.ops.glu_fusion.mlp_block_nograd.default) is assumed to be not aligned
        buf5 = torch.ops.glu_fusion.mlp_dgated_inplace_nograd.default(buf4, getitem_3, primals_11)
        buf6 = torch.ops.glu_fusion.swiglu.default(buf1, buf2, None)
        buf7 = torch.ops.aten.mm.default(buf1, buf2)
"""


def test_op_calls_are_counted_in_generated_code_and_nothing_else():
    assert count_op_calls(GENERATED) == {"mlp_block": 1, "mlp_dgated_inplace": 1, "swiglu": 1}


def test_cached_graphs_in_the_report():
    rep = Report()
    rep.add_cached({"mlp_block": 2, "mlp_dgated": 2})
    rep.add_cached({})
    assert [g.total for g in rep.cached_graphs] == [2, 0]
    assert rep.cached_counts() == {"mlp_block": 2}
    assert rep.cached_graphs[0].op_calls == {"mlp_block": 2, "mlp_dgated": 2}  # the detail stays
    text = str(rep)
    assert "2 graph(s) served from Inductor's cache" in text
    assert "served from Inductor's cache: 2 fused site(s) (mlp_block=2)" in text
    rep.reset()
    assert rep.cached_graphs == [] and rep.cached_counts() == {}


def test_cached_sites_count_in_the_rewrites_vocabulary():
    """A forward op and its backward ops are the one site of the family the pass rewrote."""
    rep = Report()
    rep.add_cached(count_op_calls(GENERATED))  # mlp_block, its backward op, and a swiglu forward
    rep.add_cached({"swiglu_packed": 1, "swiglu_preact": 1, "swiglu_dh": 1,
                    "grouped_swiglu_packed": 1, "grouped_swiglu_dw": 1, "rms_norm_gated": 1,
                    "rms_norm_gated_backward": 1})
    assert rep.cached_counts() == {"mlp_block": 1, "swiglu": 2, "experts": 1, "rms_norm_gated": 1}
    assert "served from Inductor's cache: 2 fused site(s) (mlp_block=1, swiglu=1)" in str(rep)


def test_every_op_of_ours_has_its_place_in_the_report():
    """A new op must be named a forward op of a family, or a backward op, for cached counts."""
    import glu_fusion.ops  # noqa: F401  (registers them)
    from glu_fusion.ops import grouped_swiglu, mlp_block, rms_norm, rms_norm_gated, swiglu  # noqa: F401
    from glu_fusion.compile.report import BACKWARD_OPS, FORWARD_OP_FAMILY
    from glu_fusion.patterns import expert_combine, experts, rms_norm as norm_pattern, rms_norm_gated as gated_pattern
    from glu_fusion.patterns import swiglu as swiglu_pattern
    ours = {name.split("::")[1].split(".")[0] for name in torch._C._dispatch_get_all_op_names()
            if name.startswith("glu_fusion::") and not name.split(".")[0].endswith("_nograd")}
    assert ours == set(FORWARD_OP_FAMILY) | BACKWARD_OPS
    families = {experts.NAME, expert_combine.NAME, norm_pattern.NAME, gated_pattern.NAME, swiglu_pattern.NAME,
                swiglu_pattern.BLOCK_NAME}
    assert set(FORWARD_OP_FAMILY.values()) == families


    

# --- SwiGLU-like sites the pass leaves: each is reported with its reason ---------------------------

K, N = 16, 24


class Lookalike(nn.Module):
    def __init__(self, fn):
        super().__init__()
        self.wg, self.wu = nn.Parameter(torch.randn(N, K)), nn.Parameter(torch.randn(N, K))
        self.gk, self.uk = nn.Parameter(torch.randn(K, N)), nn.Parameter(torch.randn(K, N))
        self.g3, self.u3 = nn.Parameter(torch.randn(2, K, N)), nn.Parameter(torch.randn(2, K, N))
        self.vg, self.vu = nn.Parameter(torch.randn(K)), nn.Parameter(torch.randn(K))
        self.pk = nn.Parameter(torch.randn(K, 2 * N))
        self.fn = fn

    def forward(self, x):
        return self.fn(self, x)


def _gate_reused(m, x):
    g = x @ m.gk
    return F.silu(g) * (x @ m.uk) + g


LEFT = {
    "geglu": (lambda m, x: F.gelu(x @ m.gk) * (x @ m.uk),
              "the activation is gelu (a GeGLU), and the ops compute silu"),
    "geglu_tanh": (lambda m, x: F.gelu(F.linear(x, m.wg), approximate="tanh") * F.linear(x, m.wu),
                   "the activation is gelu (a GeGLU), and the ops compute silu"),
    "sigmoid_glu": (lambda m, x: torch.sigmoid(x @ m.wg.t()) * (x @ m.wu.t()),
                    "the activation is sigmoid (a sigmoid GLU), and the ops compute silu"),
    "different_inputs": (lambda m, x: F.silu(x @ m.wg.t()) * ((x + 1) @ m.wu.t()),
                         "gate and up project different inputs"),
    "activation_operand": (lambda m, x: (lambda y: F.silu(x @ y.t()) * (x @ m.wu.t()))(torch.tanh(x.reshape(-1, K).repeat(4, 1))),
                           "the second operand of x @ W (tanh) is computed in the graph, not a stored weight"),
    "batched_weight": (lambda m, x: F.silu(x @ m.g3) * (x @ m.u3),
                       "x @ W with a 3-D W[2,16,24] is a batched matmul, not a projection by a [K, N] weight"),
    "vector_weight": (lambda m, x: F.silu(x @ m.vg) * (x @ m.vu),
                      "x @ v with a 1-D v[16] is a matrix-vector product, not a projection"),
    "gate_reused": (_gate_reused, "the gate projection has another user"),
    "activation_reused": (lambda m, x: (lambda a: a * (x @ m.uk) + a)(F.silu(x @ m.gk)),
                          "the activation has another user"),
    "unequal_split": (lambda m, x: (lambda g, u: F.silu(g) * u[..., 2:])(*(x @ m.pk).split([N - 1, N + 1], -1)),
                      "gate and up are neither two projections of one input nor the two equal halves "
                      "of one projection's last dimension"),
    "packed_reused": (lambda m, x: (lambda y: (lambda g, u: F.silu(g) * u + y[..., :N])(*y.chunk(2, -1)))(x @ m.pk),
                      "the packed projection has another user"),
}


@pytest.mark.parametrize("name", sorted(LEFT))
def test_each_swiglu_like_site_left_is_reported_with_its_reason(name, cpu_rewrites, dynamo_graph):
    fn, reason = LEFT[name]
    gm = dynamo_graph(Lookalike(fn), torch.randn(2, 3, K))
    GluPass()(gm.graph)
    (record,) = cpu_rewrites.graphs
    assert record.rewrites == []
    [left] = record.left
    assert left.family == "swiglu" and left.reason == reason
    assert left.source and "test_report_hints.py" in left.source
    assert record.summary() == "nothing rewritten; 1 look-alike site(s) left"
    assert f"swiglu-like site left: {reason}" in str(cpu_rewrites)


def test_float64_site_is_reported(cpu_rewrites, dynamo_graph):
    gm = dynamo_graph(Lookalike(lambda m, x: F.silu(x @ m.gk) * (x @ m.uk)).double(),
                      torch.randn(2, K, dtype=torch.float64))
    GluPass()(gm.graph)
    [left] = cpu_rewrites.left
    assert left.reason == ("its dtype float64 is not one the ops are rewritten for "
                           "(float32, float16, bfloat16)")


def test_rewritten_sites_and_unrelated_products_are_not_reported(cpu_rewrites, dynamo_graph):
    def fn(m, x):
        h = F.silu(x @ m.gk) * (x @ m.uk)              # rewritten
        gated = torch.sigmoid(x) * x                   # no projection: not SwiGLU-like
        return h.sum(-1) + F.silu(x[..., 0]) * x[..., 1] + gated.sum(-1)

    gm = dynamo_graph(Lookalike(fn), torch.randn(2, 3, K))
    GluPass()(gm.graph)
    (record,) = cpu_rewrites.graphs
    assert record.counts() == {"swiglu": 1} and record.left == []
    assert record.summary() == "swiglu=1"
