"""What the report says when nothing was rewritten: the graph lived on a device type the settings
leave alone, or it was served from Inductor's cache (the ops its code calls are counted)."""
from __future__ import annotations

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
    rep.add_cached({"swiglu_packed": 1, "swiglu_preact": 1, "swiglu_dh": 1, "weight_grad": 2,
                    "grouped_swiglu_packed": 1, "grouped_swiglu_dw": 1, "rms_norm_gated": 1,
                    "rms_norm_gated_backward": 1})
    assert rep.cached_counts() == {"mlp_block": 1, "swiglu": 2, "experts": 1, "rms_norm_gated": 1}
    assert "served from Inductor's cache: 2 fused site(s) (mlp_block=1, swiglu=1)" in str(rep)


def test_every_op_of_ours_has_its_place_in_the_report():
    """A new op must be named a forward op of a family, or a backward op, for cached counts."""
    import glu_fusion.ops  # noqa: F401  (registers them)
    from glu_fusion.ops import grouped_swiglu, mlp_block, rms_norm, rms_norm_gated, swiglu  # noqa: F401
    from glu_fusion.compile.report import BACKWARD_OPS, FORWARD_OP_FAMILY
    from glu_fusion.patterns import experts, rms_norm as norm_pattern, rms_norm_gated as gated_pattern
    from glu_fusion.patterns import swiglu as swiglu_pattern
    ours = {name.split("::")[1].split(".")[0] for name in torch._C._dispatch_get_all_op_names()
            if name.startswith("glu_fusion::") and not name.split(".")[0].endswith("_nograd")}
    assert ours == set(FORWARD_OP_FAMILY) | BACKWARD_OPS
    families = {experts.NAME, norm_pattern.NAME, gated_pattern.NAME, swiglu_pattern.NAME, swiglu_pattern.BLOCK_NAME}
    assert set(FORWARD_OP_FAMILY.values()) == families
