"""Dynamo's DDP optimizer and the pass: it splits the Dynamo graph at gradient-bucket boundaries
and runs the backend on each piece, so the pass only ever sees one piece at a time.

A bucket closes once its parameters reach the cap (25 MiB by default); with large weights every
linear closes one, and the gate, up and down projections of one MLP fall into different pieces.
These tests drive the optimizer in one process (no process group is needed for the split) and
pin both sides: one bucket keeps the MLP whole and fused, small buckets cut it apart.
"""
from __future__ import annotations

import copy

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

import glu_fusion

DDPOptimizer = pytest.importorskip("torch._dynamo.backends.distributed").DDPOptimizer

K, N = 16, 40


class MLP(nn.Module):
    def __init__(self):
        super().__init__()
        self.gate_proj = nn.Linear(K, N, bias=False)
        self.up_proj = nn.Linear(K, N, bias=False)
        self.down_proj = nn.Linear(N, K, bias=False)

    def forward(self, x):
        return x + self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))


def _compile_split(model, cap_bytes: int):
    splitter = DDPOptimizer(bucket_bytes_cap=cap_bytes, backend_compile_fn=glu_fusion.backend,
                            first_bucket_cap=cap_bytes)
    return torch.compile(model, backend=splitter.compile_fn), splitter


def _train_matches_eager(model, compiled, autocast_dtype):
    x = torch.randn(2, 5, K)
    xe, xc = x.clone().requires_grad_(), x.clone().requires_grad_()
    with torch.autocast("cpu", dtype=autocast_dtype, enabled=autocast_dtype is not None):
        expected, got = model(xe), compiled(xc)
    tol = dict(atol=3e-2, rtol=3e-2) if autocast_dtype is not None else dict(atol=1e-5, rtol=1e-5)
    assert got.dtype == expected.dtype
    torch.testing.assert_close(got, expected, **tol)
    expected.float().square().sum().backward()
    got.float().square().sum().backward()
    torch.testing.assert_close(xc.grad, xe.grad, **tol)
    for (name, p), q in zip(model.named_parameters(), compiled.parameters()):
        torch.testing.assert_close(q.grad, p.grad, **tol, msg=lambda m: f"{name}: {m}")


@pytest.mark.parametrize("autocast_dtype", [None, torch.bfloat16], ids=["fp32", "autocast-bf16"])
def test_one_bucket_keeps_the_mlp_whole_and_fused(cpu_rewrites, autocast_dtype):
    """The benchmark's DDP setting in small: fp32 weights, optionally bf16 autocast around the
    compiled call (the dtype mix autocast makes is not what stops the rewrite)."""
    model = MLP()
    compiled, splitter = _compile_split(copy.deepcopy(model), cap_bytes=1 << 30)
    _train_matches_eager(model, compiled, autocast_dtype)
    assert len(splitter.buckets) == 1
    assert cpu_rewrites.counts() == {"mlp_block": 1}


def test_a_bucket_per_weight_cuts_the_mlp_apart(cpu_rewrites):
    """Each weight (2.5 KiB) fills a 1 KiB bucket: the pieces hold a linear each, the pass runs on
    every piece and finds no whole MLP; results still match eager."""
    model = MLP()
    compiled, splitter = _compile_split(copy.deepcopy(model), cap_bytes=1024)
    _train_matches_eager(model, compiled, None)
    assert len(splitter.buckets) >= 2
    assert len(cpu_rewrites.graphs) == len(splitter.buckets)  # the pass saw each piece
    assert cpu_rewrites.counts() == {}
