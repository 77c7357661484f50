"""Graph snapshots of the RMSNorm family, rendered as in tests/test_pass_snapshots.py: the
decoder-layer residual + norm, Gemma's norm, ``nn.RMSNorm``, and look-alikes that must stay; and
of gated norms inside model code: HF's Mamba-2 mixer in a bf16 model, groups given by their count
(``einops.rearrange``'s graph), a packed ``[x | z]`` projection's halves, and their look-alikes.
Regenerate with ``EXPECTTEST_ACCEPT=1 python -m pytest tests/test_rms_norm_snapshots.py``."""
from __future__ import annotations

import expecttest
import pytest
import torch
import torch.nn as nn

import glu_fusion.patterns.rms_norm as family
from glu_fusion.compile.report import REPORT

from helpers.graphs import capture_training_graphs
from helpers.norm_cases import GroupCountGatedNorm, GroupedRMSNormGated, Mamba2MixerNorm, PackedGateProjection


class LlamaRMSNorm(nn.Module):
    """HF Llama / Qwen3 ``RMSNorm``."""

    def __init__(self, d=16, eps=1e-6):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(d))
        self.variance_epsilon = eps

    def forward(self, hidden_states):
        input_dtype = hidden_states.dtype
        hidden_states = hidden_states.to(torch.float32)
        variance = hidden_states.pow(2).mean(-1, keepdim=True)
        hidden_states = hidden_states * torch.rsqrt(variance + self.variance_epsilon)
        return self.weight * hidden_states.to(input_dtype)


class GemmaRMSNorm(nn.Module):
    """HF Gemma ``RMSNorm``: zero-centred weight, ``(1 + w)`` in fp32."""

    def __init__(self, d=16, eps=1e-6):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.zeros(d))

    def forward(self, x):
        xf = x.float()
        output = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + self.eps)
        output = output * (1.0 + self.weight.float())
        return output.type_as(x)


class DecoderSlice(nn.Module):
    """The residual add, the norm, a projection, and the sum carried on as the next residual."""

    def __init__(self, norm, d=16):
        super().__init__()
        self.norm = norm
        self.proj = nn.Linear(d, d, bias=False)

    def forward(self, x):
        residual = x
        hidden = x * 2.0  # stands in for the attention block
        hidden = residual + hidden
        residual = hidden
        return residual + self.proj(self.norm(hidden))


class L2Norm(nn.Module):
    def __init__(self, d=16):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(d))

    def forward(self, x):
        xf = x.float()
        return (xf * torch.rsqrt(xf.pow(2).sum(-1, keepdim=True) + 1e-6) * self.weight).to(x.dtype)


class NormedReused(LlamaRMSNorm):
    """The normalised value has another user before the weight."""

    def forward(self, x):
        xf = x.float()
        n = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + self.variance_epsilon)
        return self.weight * n.to(x.dtype) + n.mean()


@pytest.fixture
def capture(cpu_rewrites, monkeypatch):
    monkeypatch.setattr(family, "REWRITE_DEVICE_TYPES", ("cuda", "cpu"))
    return capture_training_graphs


class TestRMSNormSnapshots(expecttest.TestCase):
    @pytest.fixture(autouse=True)
    def _capture(self, capture):
        self.run_graphs = capture

    def test_llama_residual_norm_training_graphs(self):
        cap = self.run_graphs(DecoderSlice(LlamaRMSNorm()), torch.randn(2, 3, 16))
        self.assertExpectedInline(cap.pre_grad, """\
mul(in, 2.0)
glu_fusion.rms_norm.default(in, in, mul, 1e-06, 0.0, 'none')
getitem(glu_fusion.rms_norm.default, 0)
getitem(glu_fusion.rms_norm.default, 1)
linear(getitem, in, None)
add(getitem, linear)
return (add)""")
        self.assertExpectedInline(cap.forward, """\
aten.mul.Tensor(in, 2.0)
glu_fusion.rms_norm.default(in, in, aten.mul.Tensor, 1e-06, 0.0, 'none')
getitem(glu_fusion.rms_norm.default, 0)
getitem(glu_fusion.rms_norm.default, 1)
getitem(glu_fusion.rms_norm.default, 2)
aten.detach.default(getitem)
aten.t.default(in)
aten.view.default(getitem, [#, #])
aten.mm.default(aten.view.default, aten.t.default)
aten._unsafe_view.default(aten.mm.default, [#, #, #])
aten.add.Tensor(getitem, aten._unsafe_view.default)
return (aten.add.Tensor, in, getitem, aten.detach.default, aten.t.default, aten.view.default)""")
        self.assertExpectedInline(cap.backward, """\
aten.view.default(in, [#, #])
aten.t.default(aten.view.default)
aten.mm.default(aten.t.default, in)
aten.t.default(aten.mm.default)
aten.t.default(in)
aten.mm.default(aten.view.default, aten.t.default)
aten.view.default(aten.mm.default, [#, #, #])
aten.t.default(aten.t.default)
aten.detach.default(in)
glu_fusion.rms_norm_backward.default(aten.view.default, in, aten.detach.default, in, in, 0.0, True)
getitem(glu_fusion.rms_norm_backward.default, 0)
getitem(glu_fusion.rms_norm_backward.default, 1)
aten.mul.Tensor(getitem, 2.0)
aten.add.Tensor(getitem, aten.mul.Tensor)
return (aten.add.Tensor, getitem, aten.t.default)""")
        assert REPORT.counts() == {"rms_norm": 1}

    def test_gemma_bf16(self):
        cap = self.run_graphs(DecoderSlice(GemmaRMSNorm()).bfloat16(), torch.randn(2, 3, 16, dtype=torch.bfloat16))
        self.assertExpectedInline(cap.pre_grad, """\
mul(in, 2.0)
glu_fusion.rms_norm.default(in, in, mul, 1e-06, 1.0, 'none')
getitem(glu_fusion.rms_norm.default, 0)
getitem(glu_fusion.rms_norm.default, 1)
linear(getitem, in, None)
add(getitem, linear)
return (add)""")

    def test_nn_rms_norm_without_residual(self):
        cap = self.run_graphs(nn.RMSNorm(16, eps=1e-5), torch.randn(2, 3, 16))
        self.assertExpectedInline(cap.pre_grad, """\
glu_fusion.rms_norm.default(in, in, None, 1e-05, 0.0, 'none')
getitem(glu_fusion.rms_norm.default, 0)
return (getitem)""")
        self.assertExpectedInline(cap.backward, """\
aten.detach.default(in)
glu_fusion.rms_norm_backward.default(in, None, in, in, aten.detach.default, 0.0, True)
getitem(glu_fusion.rms_norm_backward.default, 0)
getitem(glu_fusion.rms_norm_backward.default, 1)
return (getitem, getitem)""")

    def test_layer_norm_unchanged(self):
        cap = self.run_graphs(DecoderSlice(nn.LayerNorm(16)), torch.randn(2, 3, 16))
        self.assertExpectedInline(cap.pre_grad, """\
mul(in, 2.0)
add(in, mul)
layer_norm(add, (#), in, in, 1e-05)
linear(layer_norm, in, None)
add(add, linear)
return (add)""")
        assert REPORT.total == 0

    def test_l2_norm_unchanged(self):
        cap = self.run_graphs(L2Norm(), torch.randn(2, 3, 16))
        self.assertExpectedInline(cap.pre_grad, """\
.float(in)
.pow(.float, 2)
.sum(.pow, -1, keepdim=True)
add(.sum, 1e-06)
rsqrt(add)
mul(.float, rsqrt)
mul(mul, in)
.to(mul, float32)
return (.to)""")
        assert REPORT.total == 0

    def test_normalised_value_with_another_user_unchanged(self):
        cap = self.run_graphs(NormedReused(), torch.randn(2, 3, 16))
        self.assertExpectedInline(cap.pre_grad, """\
.float(in)
.pow(.float, 2)
.mean(.pow, -1, keepdim=True)
add(.mean, 1e-06)
rsqrt(add)
mul(.float, rsqrt)
.to(mul, float32)
mul(in, .to)
.mean(mul)
add(mul, .mean)
return (add)""")
        assert REPORT.total == 0


@pytest.fixture
def gated_capture(cpu_rewrites):
    """The gated family on CPU graphs; the plain norm family stays off, as by default."""
    return capture_training_graphs


def _bf16(*shape):
    return torch.randn(*shape, dtype=torch.bfloat16)


class TestGatedNormSpellingSnapshots(expecttest.TestCase):
    @pytest.fixture(autouse=True)
    def _capture(self, gated_capture):
        self.run_graphs = gated_capture

    def test_mamba2_mixer_bf16_training_graphs(self):
        """The fp32 scan output normalised with the bf16 gate: the op reads the norm's fp32 upcast
        of the gate, and backward rounds dz to bf16 on the way back to the projection."""
        cap = self.run_graphs(Mamba2MixerNorm().bfloat16(), _bf16(2, 3, 32))
        self.assertExpectedInline(cap.pre_grad, """\
linear(in, in, None)
.split(linear, [64, 64], dim=-1)
getitem(.split, 0)
getitem(.split, 1)
.reshape(getitem, 2, 3, 8, -1)
.float(.reshape)
getitem(in, (Ellipsis, None))
mul(getitem, .float)
.reshape(mul, 2, 3, -1)
.to(getitem, float32)
glu_fusion.rms_norm_gated.default(.reshape, .to, in, 1e-06, 16, False, 'silu', 0.0, 'none', False)
getitem(glu_fusion.rms_norm_gated.default, 0)
.to(getitem, bfloat16)
linear(.to, in, None)
return (linear)""")
        self.assertExpectedInline(cap.forward, """\
aten.t.default(in)
aten.view.default(in, [#, #])
aten.mm.default(aten.view.default, aten.t.default)
aten._unsafe_view.default(aten.mm.default, [#, #, #])
aten.split_with_sizes.default(aten._unsafe_view.default, [#, #], #)
getitem(aten.split_with_sizes.default, 0)
getitem(aten.split_with_sizes.default, 1)
aten.view.default(getitem, [#, #, #, #])
aten._to_copy.default(aten.view.default, dtype=float32)
aten.unsqueeze.default(in, #)
aten.mul.Tensor(aten.unsqueeze.default, aten._to_copy.default)
aten.view.default(aten.mul.Tensor, [#, #, #])
aten._to_copy.default(getitem, dtype=float32)
glu_fusion.rms_norm_gated.default(aten.view.default, aten._to_copy.default, in, 1e-06, 16, False, 'silu', 0.0, 'none', False)
getitem(glu_fusion.rms_norm_gated.default, 0)
getitem(glu_fusion.rms_norm_gated.default, 1)
aten._to_copy.default(getitem, dtype=bfloat16)
aten.t.default(in)
aten.view.default(aten._to_copy.default, [#, #])
aten.mm.default(aten.view.default, aten.t.default)
aten._unsafe_view.default(aten.mm.default, [#, #, #])
return (aten._unsafe_view.default, in, aten.t.default, aten.view.default, aten._to_copy.default, aten.unsqueeze.default, aten.view.default, aten._to_copy.default, getitem, aten.t.default, aten.view.default)""")
        self.assertExpectedInline(cap.backward, """\
aten.view.default(in, [#, #])
aten.t.default(aten.view.default)
aten.mm.default(aten.t.default, in)
aten.t.default(aten.mm.default)
aten.t.default(in)
aten.mm.default(aten.view.default, aten.t.default)
aten.view.default(aten.mm.default, [#, #, #])
aten.t.default(aten.t.default)
aten._to_copy.default(aten.view.default, dtype=float32, layout=torch.strided, device=device(type='cpu'))
glu_fusion.rms_norm_gated_backward.default(aten._to_copy.default, in, in, in, in, 16, False, 'silu', 0.0, True, True, True)
getitem(glu_fusion.rms_norm_gated_backward.default, 0)
getitem(glu_fusion.rms_norm_gated_backward.default, 1)
getitem(glu_fusion.rms_norm_gated_backward.default, 2)
aten._to_copy.default(getitem, dtype=bfloat16, layout=torch.strided, device=device(type='cpu'))
aten.view.default(getitem, [#, #, #, #])
aten.mul.Tensor(aten.view.default, in)
aten.mul.Tensor(aten.view.default, in)
aten.sum.dim_IntList(aten.mul.Tensor, [#, #, #], True)
aten.view.default(aten.sum.dim_IntList, [#, #])
aten._to_copy.default(aten.view.default, dtype=bfloat16)
aten.squeeze.dim(aten._to_copy.default, #)
aten._to_copy.default(aten.mul.Tensor, dtype=bfloat16, layout=torch.strided, device=device(type='cpu'))
aten.view.default(aten._to_copy.default, [#, #, #])
aten.cat.default([aten._to_copy.default, aten.view.default], #)
aten.view.default(aten.cat.default, [#, #])
aten.t.default(aten.view.default)
aten.mm.default(aten.t.default, in)
aten.t.default(aten.mm.default)
aten.t.default(in)
aten.mm.default(aten.view.default, aten.t.default)
aten.view.default(aten.mm.default, [#, #, #])
aten.t.default(aten.t.default)
return (aten.view.default, aten.t.default, aten.squeeze.dim, getitem, aten.t.default)""")
        assert REPORT.counts() == {"rms_norm_gated": 1}

    def test_groups_by_count(self):
        """``rearrange(x, "... (g d) -> ... g d", g=4)`` as Dynamo records it (the spelling test
        checks einops records the same graph)."""
        cap = self.run_graphs(GroupCountGatedNorm().bfloat16(), _bf16(2, 3, 64), _bf16(2, 3, 64))
        self.assertExpectedInline(cap.pre_grad, """\
glu_fusion.rms_norm_gated.default(in, in, in, 1e-05, 16, False, 'silu', 0.0, 'after_weight', False)
getitem(glu_fusion.rms_norm_gated.default, 0)
return (getitem)""")
        assert REPORT.counts() == {"rms_norm_gated": 1}

    def test_sliced_packed_projection_training_graphs(self):
        cap = self.run_graphs(PackedGateProjection(GroupedRMSNormGated(), how="slice").bfloat16(), _bf16(2, 3, 32))
        self.assertExpectedInline(cap.pre_grad, """\
linear(in, in, None)
getitem(linear, (Ellipsis, slice(None, 64, None)))
getitem(linear, (Ellipsis, slice(64, None, None)))
glu_fusion.rms_norm_gated.default(getitem, getitem, in, 1e-06, 16, False, 'silu', 0.0, 'before_weight', False)
getitem(glu_fusion.rms_norm_gated.default, 0)
return (getitem)""")
        self.assertExpectedInline(cap.backward, """\
glu_fusion.rms_norm_gated_backward.default(in, in, in, in, in, 16, False, 'silu', 0.0, True, True, True)
getitem(glu_fusion.rms_norm_gated_backward.default, 0)
getitem(glu_fusion.rms_norm_gated_backward.default, 1)
getitem(glu_fusion.rms_norm_gated_backward.default, 2)
aten.slice_backward.default(getitem, [#, #, #], #, #, #, #)
aten.slice_backward.default(getitem, [#, #, #], #, #, #, #)
aten.add.Tensor(aten.slice_backward.default, aten.slice_backward.default)
aten.view.default(aten.add.Tensor, [#, #])
aten.t.default(aten.view.default)
aten.mm.default(aten.t.default, in)
aten.t.default(aten.mm.default)
aten.t.default(in)
aten.mm.default(aten.view.default, aten.t.default)
aten.view.default(aten.mm.default, [#, #, #])
aten.t.default(aten.t.default)
return (aten.t.default, aten.view.default, getitem)""")
        assert REPORT.counts() == {"rms_norm_gated": 1}

    def test_mamba2_mixer_gate_rounded_to_bf16_unchanged(self):
        """``silu(gate.float()).to(bf16)`` times an fp32 x: a rounding the op does not make."""
        cap = self.run_graphs(Mamba2MixerNorm(gate="silu_rounded").bfloat16(), _bf16(2, 3, 32))
        self.assertExpectedInline(cap.pre_grad, """\
linear(in, in, None)
.split(linear, [64, 64], dim=-1)
getitem(.split, 0)
getitem(.split, 1)
.reshape(getitem, 2, 3, 8, -1)
.float(.reshape)
getitem(in, (Ellipsis, None))
mul(getitem, .float)
.reshape(mul, 2, 3, -1)
.to(.reshape, float32)
.to(getitem, float32)
silu(.to)
.to(silu, bfloat16)
mul(.to, .to)
.view(mul, 2, 3, 4, 16)
.pow(.view, 2)
.mean(.pow, -1, keepdim=True)
add(.mean, 1e-06)
rsqrt(add)
mul(.view, rsqrt)
.view(mul, 2, 3, 64)
.to(.view, float32)
mul(in, .to)
.to(mul, bfloat16)
linear(.to, in, None)
return (linear)""")
        assert REPORT.total == 0

    def test_interleaved_groups_unchanged(self):
        """``"... (d g) -> ... g d"``: each group takes every G-th column, not a contiguous run."""
        model = GroupCountGatedNorm(split="... (d g) -> ... g d").bfloat16()
        cap = self.run_graphs(model, _bf16(2, 3, 64), _bf16(2, 3, 64))
        self.assertExpectedInline(cap.pre_grad, """\
.float(in)
.float(in)
.float(in)
silu(.float)
mul(.float, silu)
.reshape(mul, [2, 3, 16, 4])
.permute(.reshape, [0, 1, 3, 2])
.square(.permute)
.mean(.square, dim=-1, keepdim=True)
add(.mean, 1e-05)
sqrt(add)
truediv(#, sqrt)
mul(.permute, truediv)
.reshape(mul, [2, 3, 64])
mul(.reshape, .float)
.to(mul, bfloat16)
return (.to)""")
        assert REPORT.total == 0
