"""Shared fixtures for the pass tests: rewrite on CPU, a clean report, a Dynamo graph grabber."""
from __future__ import annotations

import pytest
import torch

import glu_fusion
from glu_fusion.report import REPORT


@pytest.fixture
def cpu_rewrites(monkeypatch):
    """Let the pass rewrite CPU graphs, on the reference path, with a fresh Dynamo and report."""
    monkeypatch.setattr(glu_fusion.config, "rewrite_devices", ("cpu",))
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    torch._dynamo.reset()
    REPORT.reset()
    yield REPORT
    torch._dynamo.reset()
    REPORT.reset()


@pytest.fixture
def dynamo_graph():
    """``grab(fn, *args, dynamic=False) -> GraphModule``: the single Dynamo graph of ``fn``
    (before any Inductor pass), for running the pass on it directly."""
    def grab(fn, *args, dynamic=False):
        graphs = []

        def keep(gm, example_inputs):
            graphs.append(gm)
            return gm.forward

        torch._dynamo.reset()
        torch.compile(fn, backend=keep, fullgraph=True, dynamic=dynamic)(*args)
        assert len(graphs) == 1
        return graphs[0]

    return grab
