"""The rewrite report and log, and the pass's refusal to let a surprise break a compile."""
from __future__ import annotations

import logging

import torch
import torch.nn as nn
import torch.nn.functional as F

import glu_fusion
from glu_fusion.compile.pre_grad import GluPass
from glu_fusion.patterns import swiglu as swiglu_family
from glu_fusion.compile.report import Report, Rewrite


class MLP(nn.Module):
    def __init__(self):
        super().__init__()
        self.gate = nn.Linear(16, 24, bias=False)
        self.up = nn.Linear(16, 24, bias=False)

    def forward(self, x):
        return F.silu(self.gate(x)) * self.up(x)  # the line the report points at


def test_report_records_logs_and_resets(cpu_rewrites, dynamo_graph, caplog):
    assert glu_fusion.report() is cpu_rewrites
    gm = dynamo_graph(MLP(), torch.randn(2, 5, 16))
    with caplog.at_level(logging.INFO, logger="glu_fusion"):
        GluPass()(gm.graph)
    [record] = cpu_rewrites.graphs
    assert record.counts() == {"swiglu": 1} and record.seconds > 0
    [rewrite] = record.rewrites
    assert rewrite == Rewrite("swiglu", "linear x2, silu(g)*u", ("x[2,5,16]", "w[24,16]", "w[24,16]"),
                              "float32", rewrite.source, module=None)
    assert rewrite.source.endswith("F.silu(self.gate(x)) * self.up(x)  # the line the report points at")
    assert "test_pass_report.py:" in rewrite.source
    [line] = [r.getMessage() for r in caplog.records if r.name == "glu_fusion"]
    assert line.startswith("rewrote swiglu: linear x2, silu(g)*u x[2,5,16] w[24,16] w[24,16] float32  at ")
    text = str(cpu_rewrites)
    assert "1 rewrite(s) in 1 graph(s)" in text and "graph 0: swiglu=1" in text
    assert cpu_rewrites.counts() == {"swiglu": 1} and cpu_rewrites.total == 1
    cpu_rewrites.reset()
    assert cpu_rewrites.graphs == [] and cpu_rewrites.total == 0


def test_report_names_the_module_of_each_site(cpu_rewrites):
    class Model(nn.Module):
        def __init__(self):
            super().__init__()
            self.blocks = nn.ModuleList(nn.ModuleDict({"mlp": MLP()}) for _ in range(2))

        def forward(self, x):
            for block in self.blocks:
                x = x + block["mlp"](x)[..., :16]
            return x

    torch.compile(Model(), backend=glu_fusion.backend)(torch.randn(3, 16))
    assert sorted(r.module for r in cpu_rewrites.rewrites) == ["blocks.0.mlp", "blocks.1.mlp"]
    assert "in blocks.0.mlp" in str(cpu_rewrites)


def test_graph_without_rewrites_is_recorded_as_such(cpu_rewrites, dynamo_graph):
    gm = dynamo_graph(lambda x: torch.sigmoid(x) * x, torch.randn(4))
    GluPass()(gm.graph)
    [record] = cpu_rewrites.graphs
    assert record.rewrites == [] and record.counts() == {}
    assert "nothing rewritten" in str(cpu_rewrites)


def test_rewrite_outside_a_pass_run_gets_its_own_record():
    report = Report()
    report.add(Rewrite("swiglu", "s", ("x[1]",), "float32"))
    assert len(report.graphs) == 1 and report.counts() == {"swiglu": 1}


def test_an_unexpected_error_leaves_the_site_alone(cpu_rewrites, monkeypatch, caplog):
    def broken(*_):
        raise RuntimeError("unforeseen")

    monkeypatch.setattr(swiglu_family, "_resolve", broken)
    model = MLP()
    x = torch.randn(3, 16)
    with caplog.at_level(logging.WARNING, logger="glu_fusion"):
        got = torch.compile(model, backend=glu_fusion.backend)(x)
    torch.testing.assert_close(got, model(x))
    assert cpu_rewrites.total == 0
    assert any("left alone" in r.getMessage() for r in caplog.records)
