"""Failures the differential fuzzer (``test_fuzz_pass.py``) found, each kept as a named test.

A test marked ``xfail(strict=True)`` records a defect not fixed yet: it starts failing (XPASS)
once the fix lands, and the marker and any matching exception in
``helpers.fuzz_grammar.known_missed_rewrite`` should then be removed.
"""
from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

import glu_fusion

from helpers.fuzz_grammar import Case, rewriting_cpu_graphs, run_case


class QwenNextGatedNorm(nn.Module):
    """The Hugging Face Qwen3-Next gated norm, with its eps held as a module attribute."""

    def __init__(self, d: int, eps: float = 1e-6) -> None:
        super().__init__()
        self.weight = nn.Parameter(1 + 0.2 * torch.randn(d))
        self.variance_epsilon = eps

    def forward(self, x, gate):
        dtype = x.dtype
        h = x.to(torch.float32)
        h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + self.variance_epsilon)
        h = self.weight * h.to(dtype)
        return (h * F.silu(gate.to(torch.float32))).to(dtype)


def test_gated_norm_with_eps_attribute_is_rewritten_under_dynamic_true(monkeypatch):
    """Under ``dynamic=True`` the eps attribute reaches the graph as ``.item()`` of a tensor input
    (a SymFloat).  The op's float argument makes Dynamo specialise it and trace the frame again;
    the graph it keeps holds the fused op, and a changed eps is honoured (guarded, recompiled)."""
    monkeypatch.setenv("TRITON_INTERPRET", "0")  # the plain-torch reference: the pattern is under test
    torch.manual_seed(0)
    model = QwenNextGatedNorm(32)
    x, gate = 0.05 * torch.randn(6, 32), torch.randn(6, 32)
    with rewriting_cpu_graphs():
        torch._dynamo.reset()
        glu_fusion.report().reset()
        compiled = torch.compile(model, backend=glu_fusion.backend, dynamic=True)
        got = compiled(x, gate)
        kept = glu_fusion.report().graphs[-1].counts()
        torch.testing.assert_close(got, model(x, gate), atol=1e-5, rtol=1e-5)
        assert kept == {"rms_norm_gated": 1}
        model.variance_epsilon = 1e-2  # large against mean(x^2) ~ 2.5e-3: a stale eps would show
        glu_fusion.report().reset()
        got = compiled(x, gate)
        kept = glu_fusion.report().graphs[-1].counts()
    torch.testing.assert_close(got, model(x, gate), atol=1e-5, rtol=1e-5)
    assert kept == {"rms_norm_gated": 1}


def test_gated_norm_with_eps_attribute_is_rewritten_with_mark_dynamic(monkeypatch):
    """The same model with only the batch marked dynamic keeps its eps constant and is fused."""
    monkeypatch.setenv("TRITON_INTERPRET", "0")  # the plain-torch reference: the pattern is under test
    torch.manual_seed(0)
    model = QwenNextGatedNorm(32)
    x, gate = torch.randn(6, 32), torch.randn(6, 32)
    torch._dynamo.mark_dynamic(x, 0)
    torch._dynamo.mark_dynamic(gate, 0)
    with rewriting_cpu_graphs():
        torch._dynamo.reset()
        glu_fusion.report().reset()
        got = torch.compile(model, backend=glu_fusion.backend)(x, gate)
        counts = glu_fusion.report().counts()
    torch.testing.assert_close(got, model(x, gate), atol=1e-5, rtol=1e-5)
    assert counts == {"rms_norm_gated": 1}


def _grouped_gated_norm(x, z, w, eps=1e-5, group=8):
    """Mamba-2's gated norm over groups of columns, norm first, written with x's own shape."""
    xf = x.float()
    xg = xf.view(*xf.shape[:-1], -1, group)
    y = (xg * torch.rsqrt(xg.pow(2).mean(-1, keepdim=True) + eps)).view(xf.shape) * w.float()
    return (y * F.silu(z.float())).to(x.dtype)


def test_grouped_gated_norm_is_rewritten_with_a_dynamic_batch(monkeypatch):
    """With a symbolic batch ``.view(xf.shape)`` reads ``xf.size()``: a metadata-only reader,
    which is no second user of the upcast input."""
    monkeypatch.setenv("TRITON_INTERPRET", "0")  # the plain-torch reference: the pattern is under test
    torch.manual_seed(0)
    x, z = torch.randn(13, 32), torch.randn(13, 32)
    w = nn.Parameter(1 + 0.2 * torch.randn(32))
    torch._dynamo.mark_dynamic(x, 0)
    torch._dynamo.mark_dynamic(z, 0)
    with rewriting_cpu_graphs():
        torch._dynamo.reset()
        glu_fusion.report().reset()
        got = torch.compile(_grouped_gated_norm, backend=glu_fusion.backend)(x, z, w)
        counts = glu_fusion.report().counts()
    torch.testing.assert_close(got, _grouped_gated_norm(x, z, w), atol=1e-5, rtol=1e-5)
    assert counts == {"rms_norm_gated": 1}


def test_grouped_gated_norm_is_rewritten_with_a_static_batch():
    """The fuzz case minus the dynamic batch: fused, and training matches eager."""
    run_case(Case("rms_norm_gated", k=32, lead=(13,), spelling="grouped8_norm_first", kernels=False))


def test_grouped_gated_norm_is_rewritten_under_dynamic_true(monkeypatch):
    """Found by the fuzzer: with every size symbolic the width D is a symbol, the group's size
    is traced as ``D // (D // 16)`` and the module's weight keeps its static width; the grouped
    walk takes the provably constant group and the weight's width through the merged value."""
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    case = Case("rms_norm_gated", k=32, n=24, lead=(3, 1), dtype=torch.float16,
                spelling="grouped16_norm_first", grad="train", dynamic="dynamic", kernels=False, seed=21713)
    with rewriting_cpu_graphs():
        counts = run_case(case)
    assert counts.get("rms_norm_gated", 0) >= 1

