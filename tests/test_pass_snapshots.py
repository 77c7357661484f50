"""Graph snapshots: what the pass leaves in the Dynamo graph, and what AOTAutograd makes of it.

Graphs are rendered without node names, placeholder names, shapes or comments: each call is
``target(args)`` where an argument produced by another node shows that node's target (``in``
for a graph input), so the text is the same on every supported torch version.
Regenerate with ``EXPECTTEST_ACCEPT=1 python -m pytest tests/test_pass_snapshots.py``.
"""
from __future__ import annotations


import expecttest
import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

import glu_fusion
from glu_fusion.compile.report import REPORT
from helpers.graphs import Captured, capture_training_graphs
from helpers.models import GatedNormQwen3Next


class LlamaMLP(nn.Module):
    def __init__(self, k=16, n=32):
        super().__init__()
        self.gate_proj = nn.Linear(k, n, bias=False)
        self.up_proj = nn.Linear(k, n, bias=False)
        self.down_proj = nn.Linear(n, k, bias=False)

    def forward(self, x):
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))


class LlamaMLPBiasedDown(LlamaMLP):
    def __init__(self):
        super().__init__()
        self.down_proj = nn.Linear(32, 16, bias=True)


class LlamaMLPWithProbe(LlamaMLP):
    """h has a second user, so the down projection cannot take it over."""

    def forward(self, x):
        h = F.silu(self.gate_proj(x)) * self.up_proj(x)
        return self.down_proj(h) + h.sum(-1, keepdim=True)


class SwiGLU(nn.Module):
    """Only the SwiGLU, so the AOT graphs hold nothing but our ops and their plumbing."""

    def __init__(self, k=16, n=32):
        super().__init__()
        self.w1 = nn.Linear(k, n, bias=False)
        self.w3 = nn.Linear(k, n, bias=False)

    def forward(self, x):
        return F.silu(self.w1(x)) * self.w3(x)


class PackedMLP(nn.Module):
    def __init__(self, k=16, n=32, interleaved=False):
        super().__init__()
        self.fc1 = nn.Linear(k, 2 * n)
        self.act = nn.SiLU()
        self.interleaved = interleaved

    def forward(self, x):
        y = self.fc1(x)
        if self.interleaved:
            return y[..., 1::2] * self.act(y[..., ::2])
        g, u = y.chunk(2, dim=-1)
        return self.act(g) * u


class GeGLU(nn.Module):
    def __init__(self, k=16, n=32):
        super().__init__()
        self.w = nn.Linear(k, 2 * n, bias=False)

    def forward(self, x):
        g, u = self.w(x).chunk(2, -1)
        return F.gelu(g) * u


@pytest.fixture
def capture(cpu_rewrites, monkeypatch):
    monkeypatch.setattr(glu_fusion.config, "recompute", False)
    return capture_training_graphs


class TestSnapshots(expecttest.TestCase):
    @pytest.fixture(autouse=True)
    def _capture(self, capture):
        self.run_graphs = capture

    def test_llama_mlp(self):
        cap = self.run_graphs(LlamaMLP(), torch.randn(2, 3, 16))
        self.assertExpectedInline(cap.pre_grad, """\
glu_fusion.mlp_block.default(in, in, in, None, None, in, None, True)
getitem(glu_fusion.mlp_block.default, 0)
return (getitem)""")
        assert REPORT.counts() == {"mlp_block": 1}

    def test_mlp_block_training_graphs(self):
        """The whole block: the forward saves the pre-activations (not h); the backward computes
        dH and h in one op, then plain GEMMs."""
        cap = self.run_graphs(LlamaMLPBiasedDown(), torch.randn(2, 3, 16))
        self.assertExpectedInline(cap.pre_grad, """\
glu_fusion.mlp_block.default(in, in, in, None, None, in, in, True)
getitem(glu_fusion.mlp_block.default, 0)
return (getitem)""")
        self.assertExpectedInline(cap.forward, """\
glu_fusion.mlp_block.default(in, in, in, None, None, in, in, True)
getitem(glu_fusion.mlp_block.default, 0)
getitem(glu_fusion.mlp_block.default, 1)
return (getitem, in, in, in, in, getitem)""")
        self.assertExpectedInline(cap.backward, """\
aten.view.default(in, [#, #])
glu_fusion.mlp_dgated.default(aten.view.default, in, in, 0)
getitem(glu_fusion.mlp_dgated.default, 0)
getitem(glu_fusion.mlp_dgated.default, 1)
aten.t.default(aten.view.default)
aten.mm.default(aten.t.default, getitem)
aten.sum.dim_IntList(aten.view.default, [#])
aten.view.default(in, [#, #])
aten.slice.Tensor(getitem, #, #, #)
aten.mm.default(aten.slice.Tensor, in)
aten.slice.Tensor(getitem, #, #, #)
aten.addmm.default(aten.mm.default, aten.slice.Tensor, in)
aten.view.default(aten.addmm.default, [#, #, #])
aten.slice.Tensor(getitem, #, #, #)
aten.t.default(aten.slice.Tensor)
aten.mm.default(aten.t.default, aten.view.default)
aten.slice.Tensor(getitem, #, #, #)
aten.t.default(aten.slice.Tensor)
aten.mm.default(aten.t.default, aten.view.default)
return (aten.mm.default, aten.view.default, aten.mm.default, aten.mm.default, aten.sum.dim_IntList)""")

    def test_block_falls_back_to_swiglu_when_h_has_another_user(self):
        cap = self.run_graphs(LlamaMLPWithProbe(), torch.randn(2, 3, 16))
        self.assertExpectedInline(cap.pre_grad, """\
glu_fusion.swiglu.default(in, in, in, None, None, True)
getitem(glu_fusion.swiglu.default, 0)
linear(getitem, in, None)
.sum(getitem, -1, keepdim=True)
add(linear, .sum)
return (add)""")
        assert REPORT.counts() == {"swiglu": 1}

    def test_two_weights_training_graphs(self):
        cap = self.run_graphs(SwiGLU(), torch.randn(2, 3, 16))
        self.assertExpectedInline(cap.pre_grad, """\
glu_fusion.swiglu.default(in, in, in, None, None, True)
getitem(glu_fusion.swiglu.default, 0)
return (getitem)""")
        self.assertExpectedInline(cap.forward, """\
glu_fusion.swiglu.default(in, in, in, None, None, True)
getitem(glu_fusion.swiglu.default, 0)
getitem(glu_fusion.swiglu.default, 1)
return (getitem, in, in, in, getitem)""")
        self.assertExpectedInline(cap.backward, """\
glu_fusion.swiglu_dh.default(in, in, 0)
aten.view.default(in, [#, #])
aten.slice.Tensor(glu_fusion.swiglu_dh.default, #, #, #)
aten.mm.default(aten.slice.Tensor, in)
aten.slice.Tensor(glu_fusion.swiglu_dh.default, #, #, #)
aten.addmm.default(aten.mm.default, aten.slice.Tensor, in)
aten.view.default(aten.addmm.default, [#, #, #])
aten.slice.Tensor(glu_fusion.swiglu_dh.default, #, #, #)
aten.t.default(aten.slice.Tensor)
aten.mm.default(aten.t.default, aten.view.default)
aten.slice.Tensor(glu_fusion.swiglu_dh.default, #, #, #)
aten.t.default(aten.slice.Tensor)
aten.mm.default(aten.t.default, aten.view.default)
return (aten.mm.default, aten.view.default, aten.mm.default)""")

    def test_packed_chunk_with_bias(self):
        cap = self.run_graphs(PackedMLP(), torch.randn(4, 16))
        self.assertExpectedInline(cap.pre_grad, """\
glu_fusion.swiglu_packed.default(in, in, in, 0, True)
getitem(glu_fusion.swiglu_packed.default, 0)
return (getitem)""")
        self.assertExpectedInline(cap.forward, """\
glu_fusion.swiglu_packed.default(in, in, in, 0, True)
getitem(glu_fusion.swiglu_packed.default, 0)
getitem(glu_fusion.swiglu_packed.default, 1)
return (getitem, in, in, getitem)""")
        self.assertExpectedInline(cap.backward, """\
glu_fusion.swiglu_dh.default(in, in, 0)
aten.view.default(in, [#, #])
aten.mm.default(glu_fusion.swiglu_dh.default, in)
aten.view.default(aten.mm.default, [#, #])
aten.t.default(glu_fusion.swiglu_dh.default)
aten.mm.default(aten.t.default, aten.view.default)
aten.sum.dim_IntList(glu_fusion.swiglu_dh.default, [#])
return (aten.mm.default, aten.sum.dim_IntList, aten.view.default)""")

    def test_packed_interleaved_up_times_act(self):
        cap = self.run_graphs(PackedMLP(interleaved=True), torch.randn(2, 3, 16))
        self.assertExpectedInline(cap.pre_grad, """\
glu_fusion.swiglu_packed.default(in, in, in, 2, True)
getitem(glu_fusion.swiglu_packed.default, 0)
return (getitem)""")

    def test_recompute_saves_no_preactivation(self):
        glu_fusion.config.recompute = True  # restored by the fixture's monkeypatch
        cap = self.run_graphs(SwiGLU(), torch.randn(2, 3, 16))
        self.assertExpectedInline(cap.forward, """\
glu_fusion.swiglu.default(in, in, in, None, None, False)
getitem(glu_fusion.swiglu.default, 0)
return (getitem, in, in, in)""")
        self.assertExpectedInline(cap.backward, """\
glu_fusion.swiglu_preact.default(in, in, in, None, None)
auto_functionalized(glu_fusion.swiglu_dh_inplace.default, dout=in, preact=glu_fusion.swiglu_preact.default)
getitem(auto_functionalized, 1)
aten.view.default(in, [#, #])
aten.slice.Tensor(getitem, #, #, #)
aten.mm.default(aten.slice.Tensor, in)
aten.slice.Tensor(getitem, #, #, #)
aten.addmm.default(aten.mm.default, aten.slice.Tensor, in)
aten.view.default(aten.addmm.default, [#, #, #])
aten.slice.Tensor(getitem, #, #, #)
aten.t.default(aten.slice.Tensor)
aten.mm.default(aten.t.default, aten.view.default)
aten.slice.Tensor(getitem, #, #, #)
aten.t.default(aten.slice.Tensor)
aten.mm.default(aten.t.default, aten.view.default)
return (aten.mm.default, aten.view.default, aten.mm.default)""")

    def test_inference_saves_no_preactivation(self):
        cap = Captured()
        with torch.no_grad():
            torch.compile(SwiGLU(), backend=cap, fullgraph=True)(torch.randn(2, 3, 16))
        self.assertExpectedInline(cap.pre_grad, """\
glu_fusion.swiglu.default(in, in, in, None, None, False)
getitem(glu_fusion.swiglu.default, 0)
return (getitem)""")
        self.assertExpectedInline(cap.forward, """\
glu_fusion.swiglu.default(in, in, in, None, None, False)
getitem(glu_fusion.swiglu.default, 0)
return (getitem)""")

    def test_geglu_unchanged(self):
        cap = self.run_graphs(GeGLU(), torch.randn(2, 3, 16))
        self.assertExpectedInline(cap.pre_grad, """\
linear(in, in, None)
.chunk(linear, 2, -1)
getitem(.chunk, 0)
getitem(.chunk, 1)
gelu(getitem)
mul(gelu, getitem)
return (mul)""")
        assert REPORT.total == 0


class MatmulMLP(nn.Module):
    """Weights stored ``[K, N]`` used as ``x @ W`` (the down projection ``[N, D]`` too)."""

    def __init__(self, k=16, n=32, transposed=False):
        super().__init__()
        self.transposed = transposed
        shape = (lambda rows, cols: (cols, rows)) if transposed else (lambda rows, cols: (rows, cols))
        self.wg = nn.Parameter(torch.randn(*shape(k, n)) / k ** 0.5)
        self.wu = nn.Parameter(torch.randn(*shape(k, n)) / k ** 0.5)
        self.wd = nn.Parameter(torch.randn(*shape(n, k)) / n ** 0.5)

    def forward(self, x):
        if self.transposed:  # [N, K] weights as nn.Linear stores them, used as x @ W.t()
            return (F.silu(x @ self.wg.t()) * (x @ self.wu.T)) @ self.wd.t()
        return (F.silu(x @ self.wg) * torch.matmul(x, self.wu)) @ self.wd


class PackedMatmulSwiGLU(nn.Module):
    """One packed ``[K, 2N]`` weight used as ``x @ W``, then cut by ``chunk``."""

    def __init__(self, k=16, n=32):
        super().__init__()
        self.w = nn.Parameter(torch.randn(k, 2 * n) / k ** 0.5)

    def forward(self, x):
        g, u = (x @ self.w).chunk(2, -1)
        return F.silu(g) * u


class TestMatmulSnapshots(expecttest.TestCase):
    @pytest.fixture(autouse=True)
    def _capture(self, capture):
        self.run_graphs = capture

    def test_transposed_weights_are_passed_as_they_are(self):
        cap = self.run_graphs(MatmulMLP(transposed=True), torch.randn(2, 3, 16))
        self.assertExpectedInline(cap.pre_grad, """\
glu_fusion.mlp_block.default(in, in, in, None, None, in, None, True)
getitem(glu_fusion.mlp_block.default, 0)
return (getitem)""")
        assert REPORT.counts() == {"mlp_block": 1} and REPORT.left == []

    def test_kn_weights_training_graphs(self):
        """[K, N] weights reach the op as t() views; their gradients go back through the views."""
        cap = self.run_graphs(MatmulMLP(), torch.randn(2, 3, 16))
        self.assertExpectedInline(cap.pre_grad, """\
t(in)
t(in)
t(in)
glu_fusion.mlp_block.default(in, t, t, None, None, t, None, True)
getitem(glu_fusion.mlp_block.default, 0)
return (getitem)""")
        self.assertExpectedInline(cap.forward, """\
aten.t.default(in)
aten.t.default(in)
aten.t.default(in)
glu_fusion.mlp_block.default(in, aten.t.default, aten.t.default, None, None, aten.t.default, None, True)
getitem(glu_fusion.mlp_block.default, 0)
getitem(glu_fusion.mlp_block.default, 1)
return (getitem, in, aten.t.default, aten.t.default, aten.t.default, getitem)""")
        self.assertExpectedInline(cap.backward, """\
aten.view.default(in, [#, #])
glu_fusion.mlp_dgated.default(aten.view.default, in, in, 0)
getitem(glu_fusion.mlp_dgated.default, 0)
getitem(glu_fusion.mlp_dgated.default, 1)
aten.t.default(aten.view.default)
aten.mm.default(aten.t.default, getitem)
aten.view.default(in, [#, #])
aten.slice.Tensor(getitem, #, #, #)
aten.mm.default(aten.slice.Tensor, in)
aten.slice.Tensor(getitem, #, #, #)
aten.addmm.default(aten.mm.default, aten.slice.Tensor, in)
aten.view.default(aten.addmm.default, [#, #, #])
aten.slice.Tensor(getitem, #, #, #)
aten.t.default(aten.slice.Tensor)
aten.mm.default(aten.t.default, aten.view.default)
aten.slice.Tensor(getitem, #, #, #)
aten.t.default(aten.slice.Tensor)
aten.mm.default(aten.t.default, aten.view.default)
aten.t.default(aten.mm.default)
aten.t.default(aten.mm.default)
aten.t.default(aten.mm.default)
return (aten.t.default, aten.view.default, aten.t.default, aten.t.default)""")
        assert REPORT.counts() == {"mlp_block": 1} and REPORT.left == []

    def test_packed_kn_chunk(self):
        cap = self.run_graphs(PackedMatmulSwiGLU(), torch.randn(4, 16))
        self.assertExpectedInline(cap.pre_grad, """\
t(in)
glu_fusion.swiglu_packed.default(in, t, None, 0, True)
getitem(glu_fusion.swiglu_packed.default, 0)
return (getitem)""")
        self.assertExpectedInline(cap.backward, """\
glu_fusion.swiglu_dh.default(in, in, 0)
aten.view.default(in, [#, #])
aten.mm.default(glu_fusion.swiglu_dh.default, in)
aten.view.default(aten.mm.default, [#, #])
aten.t.default(glu_fusion.swiglu_dh.default)
aten.mm.default(aten.t.default, aten.view.default)
aten.t.default(aten.mm.default)
return (aten.t.default, aten.view.default)""")

    def test_matmul_geglu_unchanged(self):
        class MatmulGeGLU(MatmulMLP):
            def forward(self, x):
                return F.gelu(x @ self.wg) * (x @ self.wu)

        cap = self.run_graphs(MatmulGeGLU(), torch.randn(2, 3, 16))
        self.assertExpectedInline(cap.pre_grad, """\
matmul(in, in)
gelu(matmul)
matmul(in, in)
mul(gelu, matmul)
return (mul)""")
        assert REPORT.total == 0
        [left] = REPORT.left
        assert left.reason == "the activation is gelu (a GeGLU), and the ops compute silu"


class L2NormGate(nn.Module):
    """Looks like the gated norm but sums instead of averaging: must stay as it is."""

    def __init__(self, d=16):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(d))

    def forward(self, x):
        h, z = x.chunk(2, -1)
        hf = h.float()
        return (hf * torch.rsqrt(hf.pow(2).sum(-1, keepdim=True) + 1e-6) * self.weight
                * F.silu(z.float())).to(x.dtype)


class TestGatedNormSnapshots(expecttest.TestCase):
    @pytest.fixture(autouse=True)
    def _capture(self, capture):
        self.run_graphs = capture

    def test_qwen3_next_gated_norm_training_graphs(self):
        cap = self.run_graphs(GatedNormQwen3Next(), torch.randn(2, 3, 32))
        self.assertExpectedInline(cap.pre_grad, """\
.chunk(in, 2, -1)
getitem(.chunk, 0)
getitem(.chunk, 1)
glu_fusion.rms_norm_gated.default(getitem, getitem, in, 1e-06, None, True, 'silu', 0.0, 'none', False)
getitem(glu_fusion.rms_norm_gated.default, 0)
return (getitem)""")
        self.assertExpectedInline(cap.forward, """\
aten.split.Tensor(in, #, #)
getitem(aten.split.Tensor, 0)
getitem(aten.split.Tensor, 1)
glu_fusion.rms_norm_gated.default(getitem, getitem, in, 1e-06, None, True, 'silu', 0.0, 'none', False)
getitem(glu_fusion.rms_norm_gated.default, 0)
getitem(glu_fusion.rms_norm_gated.default, 1)
return (getitem, in, getitem, getitem, getitem)""")
        self.assertExpectedInline(cap.backward, """\
glu_fusion.rms_norm_gated_backward.default(in, in, in, in, in, None, True, 'silu', 0.0, True, True, True)
getitem(glu_fusion.rms_norm_gated_backward.default, 0)
getitem(glu_fusion.rms_norm_gated_backward.default, 1)
getitem(glu_fusion.rms_norm_gated_backward.default, 2)
aten.cat.default([getitem, getitem], #)
return (aten.cat.default, getitem)""")
        assert REPORT.counts() == {"rms_norm_gated": 1}

    def test_qwen3_next_gated_norm_bf16_keeps_its_rounding_point(self):
        """In bf16 the downcast before the weight is real: the op is told so."""
        cap = self.run_graphs(GatedNormQwen3Next().bfloat16(), torch.randn(2, 3, 32, dtype=torch.bfloat16))
        self.assertExpectedInline(cap.pre_grad, """\
.chunk(in, 2, -1)
getitem(.chunk, 0)
getitem(.chunk, 1)
glu_fusion.rms_norm_gated.default(getitem, getitem, in, 1e-06, None, True, 'silu', 0.0, 'before_weight', False)
getitem(glu_fusion.rms_norm_gated.default, 0)
return (getitem)""")

    def test_l2_norm_gate_unchanged(self):
        cap = self.run_graphs(L2NormGate(), torch.randn(2, 3, 32))
        self.assertExpectedInline(cap.pre_grad, """\
.chunk(in, 2, -1)
getitem(.chunk, 0)
getitem(.chunk, 1)
.float(getitem)
.pow(.float, 2)
.sum(.pow, -1, keepdim=True)
add(.sum, 1e-06)
rsqrt(add)
mul(.float, rsqrt)
mul(mul, in)
.float(getitem)
silu(.float)
mul(mul, silu)
.to(mul, float32)
return (.to)""")
        assert REPORT.total == 0
