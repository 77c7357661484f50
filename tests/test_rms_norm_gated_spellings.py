"""Gated-norm spellings found in third-party model code:

* the gate applied in place (``out *= F.silu(z)``): rewritten like the out-of-place product,
  and left alone when the tensor multiplied in place is not the norm's own intermediate;
* the weight applied while the value is still grouped (``w.view(G, D // G) * normed`` before
  the merge back to ``[..., D]``);
* mamba_ssm's ``RMSNormGated`` (gate first, groups, fp32 upcasts, ``1/sqrt``), with its groups
  formed by reshapes (what Dynamo traces einops' ``rearrange`` to) or by einops itself where it is
  installed, and a gate split off the input projection (``split``/``chunk``/slices of
  ``in_proj(u)``);
* HF's Mamba-2 mixer in a bf16 model, whose grouped ``MambaRMSNormGated`` gets the scan's fp32
  output and a bf16 gate (the op takes the norm's fp32 upcast of the gate), and that module
  under ``dynamic=True``;
* groups given by their count (``rearrange(x, "... (g d) -> ... g d", g=G)``), with einops and
  with the plain-torch calls Dynamo records for it;
* HF's grouped norm on the two halves of one packed ``[x | z]`` projection, either half first:
  result and every gradient against eager and float64, with their look-alikes left alone."""
from __future__ import annotations

import operator

import pytest
import torch
import torch.nn.functional as F

import glu_fusion
import glu_fusion.ops  # noqa: F401  (registers the ops named below)
from glu_fusion.compile.pre_grad import GluPass

from helpers.norm_cases import (GROUPS_MERGE, GROUPS_SPLIT, TOLERANCE, GroupCountGatedNorm, GroupedRMSNormGated,
                                Mamba2MixerNorm, PackedGateProjection, float64_oracle, rearrange_like, rel_error,
                                set_upcast, upcast)
from helpers.norm_cases import EPS as ORACLE_EPS

OP = torch.ops.glu_fusion.rms_norm_gated.default
EPS = 1e-6


def gate_in_place(x, z, w):
    xf = x.float()
    out = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + EPS)
    out = w * out.to(x.dtype)
    out *= F.silu(z)
    return out


def gate_tensor_mutated(x, z, w):
    """The gate is multiplied in place by the norm: the norm's value is not the one mutated."""
    xf = x.float()
    out = w * (xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + EPS)).to(x.dtype)
    g = F.silu(z)
    g *= out
    return g


def _inputs(requires_grad=False):
    x, z = torch.randn(3, 5, 32).bfloat16(), (2 * torch.randn(3, 5, 32)).bfloat16()
    w = (1 + 0.1 * torch.randn(32)).bfloat16()
    return [t.requires_grad_(requires_grad) for t in (x, z, w)]


def test_in_place_gate_is_rewritten(cpu_rewrites, dynamo_graph):
    gm = dynamo_graph(gate_in_place, *_inputs())
    GluPass()(gm.graph)
    gm.graph.lint()
    [op] = [n for n in gm.graph.nodes if n.op == "call_function" and n.target is OP]
    assert tuple(op.args[5:]) == (True, "silu", 0.0, "before_weight", True)
    assert cpu_rewrites.counts() == {"rms_norm_gated": 1}


def test_in_place_gate_compiled_equals_eager(cpu_rewrites):
    leaves = _inputs(requires_grad=True)
    copies = [t.detach().clone().requires_grad_() for t in leaves]
    expected = gate_in_place(*leaves)
    got = torch.compile(gate_in_place, backend=glu_fusion.backend)(*copies)
    assert cpu_rewrites.counts() == {"rms_norm_gated": 1}
    torch.testing.assert_close(got, expected, rtol=0, atol=0)
    dy = torch.randn_like(expected)
    for a, b in zip(torch.autograd.grad(got, copies, dy), torch.autograd.grad(expected, leaves, dy)):
        scale = b.float().abs().max().clamp_min(1e-6)
        assert ((a.float() - b.float()).abs().max() / scale).item() <= 2e-2


def test_gate_mutated_in_place_is_left_alone(cpu_rewrites, dynamo_graph):
    gm = dynamo_graph(gate_tensor_mutated, *_inputs())
    GluPass()(gm.graph)
    assert not [n for n in gm.graph.nodes if n.op == "call_function" and n.target is OP]
    assert not cpu_rewrites.rewrites


GROUP = 8


def grouped_weight_gate_first(x, z, w):
    """Mamba-2-style: gate first in fp32, groups of 8, weight in the grouped view, one downcast."""
    xf = x.float() * F.silu(z.float())
    xg = xf.view(*xf.shape[:-1], -1, GROUP)
    yg = xg * torch.rsqrt(xg.pow(2).mean(-1, keepdim=True) + EPS)
    yg = w.float().view(-1, GROUP) * yg
    return yg.reshape(xf.shape).to(x.dtype)


def grouped_weight_gate_after(x, z, w):
    xf = x.float()
    xg = xf.view(*xf.shape[:-1], -1, GROUP)
    yg = (xg * torch.rsqrt(xg.pow(2).mean(-1, keepdim=True) + EPS)) * w.view(-1, GROUP)
    return (yg.flatten(-2) * F.silu(z.float())).to(x.dtype)


# The one downcast comes right after the fp32 weight ("after_weight") or after the gate ("none"):
# the same values either way.
@pytest.mark.parametrize("fn,norm_before_gate,downcast", [(grouped_weight_gate_first, False, "after_weight"),
                                                          (grouped_weight_gate_after, True, "none")])
def test_weight_in_grouped_view_is_rewritten(fn, norm_before_gate, downcast, cpu_rewrites, dynamo_graph):
    gm = dynamo_graph(fn, *_inputs())
    GluPass()(gm.graph)
    gm.graph.lint()
    [op] = [n for n in gm.graph.nodes if n.op == "call_function" and n.target is OP]
    assert op.args[2] is not None and op.args[4] == GROUP and op.args[5] is norm_before_gate
    assert op.args[8] == downcast


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("fn", [grouped_weight_gate_first, grouped_weight_gate_after], ids=lambda f: f.__name__)
def test_weight_in_grouped_view_compiled_equals_eager(fn, dtype, cpu_rewrites):
    leaves = [t.to(dtype).detach().requires_grad_() for t in _inputs()]
    copies = [t.detach().clone().requires_grad_() for t in leaves]
    expected = fn(*leaves)
    got = torch.compile(fn, backend=glu_fusion.backend)(*copies)
    assert cpu_rewrites.counts() == {"rms_norm_gated": 1}
    torch.testing.assert_close(got, expected, rtol=0, atol=0)
    dy = torch.randn_like(expected)
    tol = 1e-5 if dtype == torch.float32 else 2e-2
    for a, b in zip(torch.autograd.grad(got, copies, dy), torch.autograd.grad(expected, leaves, dy)):
        scale = b.float().abs().max().clamp_min(1e-6)
        assert ((a.float() - b.float()).abs().max() / scale).item() <= tol


def test_grouped_weight_of_another_shape_is_left_alone(cpu_rewrites, dynamo_graph):
    """A per-group scale ``[G, 1]`` broadcast over the group is not the op's weight."""
    def fn(x, z, w):
        xf = x.float() * F.silu(z.float())
        xg = xf.view(*xf.shape[:-1], -1, GROUP)
        yg = xg * torch.rsqrt(xg.pow(2).mean(-1, keepdim=True) + EPS)
        yg = w[:4].float().view(4, 1) * yg
        return yg.reshape(xf.shape).to(x.dtype)

    gm = dynamo_graph(fn, *_inputs())
    GluPass()(gm.graph)
    assert not [n for n in gm.graph.nodes if n.op == "call_function" and n.target is OP]


# --- Mamba-2's RMSNormGated, its einops grouping, and a gate split off the input projection ----------
#
# mamba_ssm's ``RMSNormGated(hidden, group_size, norm_before_gate=False)`` computes, in its
# reference (``rms_norm_ref`` with ``upcast=True``): the weight, x and z upcast to fp32, the gate
# applied before the norm, the groups formed with ``rearrange(x, "... (g d) -> ... g d",
# d=group_size)``, ``1 / sqrt(square().mean() + eps)``, the merge back with ``rearrange(...,
# "... g d -> ... (g d)")``, the fp32 weight, one downcast at the end.  Dynamo traces each
# ``rearrange`` to a ``reshape``, which is how the module below spells it; the einops test runs the
# module with einops itself where it is installed.

try:
    import einops
except ImportError:  # optional: only the einops variant needs it
    einops = None

D_MODEL, MAMBA_GROUP = 64, 16


def _split_groups(x, group, interleaved=False):
    """``rearrange(x, "... (g d) -> ... g d", d=group)`` as Dynamo traces it (``interleaved``:
    ``"... (d g) -> ... g d"``, the column order a look-alike uses)."""
    *lead, width = x.shape
    if interleaved:
        return x.reshape(*lead, group, width // group).transpose(-1, -2)
    return x.reshape(*lead, width // group, group)


def _merge_groups(x):
    """``rearrange(x, "... g d -> ... (g d)")`` as Dynamo traces it."""
    return x.reshape(*x.shape[:-2], x.shape[-2] * x.shape[-1])


class MambaRMSNormGated(torch.nn.Module):
    """mamba_ssm's ``RMSNormGated`` (norm_before_gate=False) as its fp32 reference computes it."""

    def __init__(self, d=D_MODEL, group_size=MAMBA_GROUP, eps=1e-5, grouping="reshape", bias=False):
        super().__init__()
        self.weight = torch.nn.Parameter(1 + 0.1 * torch.randn(d))
        self.bias = torch.nn.Parameter(0.1 * torch.randn(d)) if bias else None
        self.group_size, self.eps, self.grouping = group_size, eps, grouping
        self.upcast = torch.float32

    def forward(self, x, z):
        dtype = x.dtype
        weight = upcast(self.weight, self.upcast)
        bias = upcast(self.bias, self.upcast) if self.bias is not None else None
        x, z = upcast(x, self.upcast), upcast(z, self.upcast)
        x = x * F.silu(z)
        if self.grouping == "einops":
            x_group = einops.rearrange(x, "... (g d) -> ... g d", d=self.group_size)
        elif self.grouping == "einops_interleaved":
            x_group = einops.rearrange(x, "... (d g) -> ... g d", d=self.group_size)
        else:
            x_group = _split_groups(x, self.group_size, interleaved=self.grouping == "interleaved")
        rstd = 1 / torch.sqrt(x_group.square().mean(dim=-1, keepdim=True) + self.eps)
        if self.grouping.startswith("einops"):
            out = einops.rearrange(x_group * rstd, "... g d -> ... (g d)") * weight
        else:
            out = _merge_groups(x_group * rstd) * weight
        if bias is not None:
            out = out + bias
        return out.to(dtype)


class SplitProjectionGate(torch.nn.Module):
    """``xz = in_proj(u); x, z = xz.split([d, d], -1)`` (or ``chunk``, or the slices
    ``xz[..., :d]`` and ``xz[..., d:]``), then Qwen3-Next's gated norm of x with gate z;
    ``norm_first``: the look-alike that normalises the whole projection and only then splits it."""

    def __init__(self, d=D_MODEL, how="split", norm_first=False):
        super().__init__()
        self.in_proj = torch.nn.Linear(d, 2 * d, bias=False)
        self.weight = torch.nn.Parameter(1 + 0.1 * torch.randn(d))
        self.d, self.how, self.norm_first = d, how, norm_first
        self.upcast = torch.float32

    def _norm(self, h):
        dtype = h.dtype
        hf = h.to(self.upcast)
        return (hf * torch.rsqrt(hf.pow(2).mean(-1, keepdim=True) + EPS)).to(dtype)

    def _halves(self, xz):
        if self.how == "split":
            return xz.split([self.d, self.d], dim=-1)
        if self.how == "slice":
            return xz[..., :self.d], xz[..., self.d:]
        return xz.chunk(2, dim=-1)

    def forward(self, u):
        xz = self.in_proj(u)
        if self.norm_first:
            x, z = self._norm(xz).chunk(2, dim=-1)
            return (self.weight * x * F.silu(z.to(self.upcast))).to(u.dtype)
        x, z = self._halves(xz)
        h = self.weight * self._norm(x)
        return (h * F.silu(z.to(self.upcast))).to(x.dtype)


def _bf16_inputs(*shapes):
    return [(2 * torch.randn(*s)).bfloat16() for s in shapes]


def _ops(gm):
    return [n for n in gm.graph.nodes if n.op == "call_function" and n.target is OP]


def _against_eager_and_float64(model, inputs, counts, steps=1):
    """Compile the bf16 model with our backend: the rewrite count, then its result and every
    gradient (inputs and parameters) against eager bf16 and the float64 model (its norm computed
    in float64: see ``set_upcast``).  ``steps``: the rounding steps the result may be from eager."""
    import copy
    model = model.bfloat16()
    model64 = set_upcast(copy.deepcopy(model).double(), torch.float64)
    ours = [t.detach().clone().requires_grad_() for t in inputs]
    eager_in = [t.detach().clone().requires_grad_() for t in inputs]
    in64 = [t.detach().double().requires_grad_() for t in inputs]
    got = torch.compile(model, backend=glu_fusion.backend)(*ours)
    assert glu_fusion.report().counts() == counts
    eager_model = copy.deepcopy(model)
    expected, exact = eager_model(*eager_in), model64(*in64)
    # The op rounds once where eager rounds once (1/sqrt computed as rsqrt): within one step of
    # eager, and no further from float64 than eager plus that step.
    torch.testing.assert_close(got, expected, atol=0.0, rtol=steps * 2 ** -7)
    step = steps * 2 ** -7 * exact.abs().max().item()
    assert (got.double() - exact).abs().max().item() <= (expected.double() - exact).abs().max().item() + step
    dy = torch.randn_like(expected)
    grads = torch.autograd.grad(got, ours + list(model.parameters()), dy)
    eager_grads = torch.autograd.grad(expected, eager_in + list(eager_model.parameters()), dy)
    exact_grads = torch.autograd.grad(exact, in64 + list(model64.parameters()), dy.double())
    assert len(grads) == len(exact_grads) >= 3
    for a, b, c in zip(grads, eager_grads, exact_grads):
        scale = c.abs().max().clamp_min(1e-6)
        err = ((a.double() - c).abs().max() / scale).item()
        assert err <= max(2e-2, 2 * ((b.double() - c).abs().max() / scale).item())
        assert ((a.float() - b.float()).abs().max() / scale.float()).item() <= 2e-2


def test_mamba2_rms_norm_gated_module_is_rewritten(cpu_rewrites, dynamo_graph):
    x, z = _bf16_inputs((2, 3, D_MODEL), (2, 3, D_MODEL))
    gm = dynamo_graph(MambaRMSNormGated().bfloat16(), x, z)
    GluPass()(gm.graph)
    gm.graph.lint()
    [op] = _ops(gm)
    # group, gate before the norm, silu, no weight offset, one downcast after the fp32 weight
    assert tuple(op.args[4:9]) == (MAMBA_GROUP, False, "silu", 0.0, "after_weight")
    assert cpu_rewrites.counts() == {"rms_norm_gated": 1}
    assert "gate-first" in cpu_rewrites.rewrites[0].spelling and f"groups of {MAMBA_GROUP}" in \
        cpu_rewrites.rewrites[0].spelling


def test_mamba2_rms_norm_gated_module_equals_eager_and_float64(cpu_rewrites):
    _against_eager_and_float64(MambaRMSNormGated(), _bf16_inputs((2, 3, D_MODEL), (2, 3, D_MODEL)),
                               {"rms_norm_gated": 1})


@pytest.mark.parametrize("grouping", ["interleaved", "bias"])
def test_mamba2_look_alikes_are_left_alone(grouping, cpu_rewrites, dynamo_graph):
    """Groups taken from interleaved columns (``"... (d g) -> ... g d"``) normalise other
    columns together; a bias added in fp32 before the downcast is not part of the op."""
    model = MambaRMSNormGated(grouping="reshape" if grouping == "bias" else grouping, bias=grouping == "bias")
    x, z = _bf16_inputs((2, 3, D_MODEL), (2, 3, D_MODEL))
    gm = dynamo_graph(model.bfloat16(), x, z)
    GluPass()(gm.graph)
    assert not _ops(gm) and not cpu_rewrites.rewrites


needs_einops = pytest.mark.skipif(einops is None, reason="einops is not installed (pip install einops)")


@needs_einops
def test_einops_grouping_traces_to_the_reshape_spelling(dynamo_graph):
    """What the tests above stand on: Dynamo traces einops' grouping to reshapes, no einops call."""
    x, z = _bf16_inputs((2, 3, D_MODEL), (2, 3, D_MODEL))
    gm = dynamo_graph(MambaRMSNormGated(grouping="einops").bfloat16(), x, z)
    reshapes = [n for n in gm.graph.nodes if n.op == "call_method" and n.target == "reshape"]
    assert len(reshapes) == 2
    assert not [n for n in gm.graph.nodes if "einops" in str(n.target)]


@needs_einops
def test_einops_grouping_is_rewritten_and_equals_eager_and_float64(cpu_rewrites):
    _against_eager_and_float64(MambaRMSNormGated(grouping="einops"),
                               _bf16_inputs((2, 3, D_MODEL), (2, 3, D_MODEL)), {"rms_norm_gated": 1})


@needs_einops
def test_einops_interleaved_grouping_is_left_alone(cpu_rewrites, dynamo_graph):
    x, z = _bf16_inputs((2, 3, D_MODEL), (2, 3, D_MODEL))
    gm = dynamo_graph(MambaRMSNormGated(grouping="einops_interleaved").bfloat16(), x, z)
    GluPass()(gm.graph)
    assert not _ops(gm) and not cpu_rewrites.rewrites


def _halves_of_one_tensor(x, z, gate_first=False):
    """x and z read two halves of one tensor: ``getitem`` 0 and 1 of its split or chunk, or the
    slices ``[..., :d]`` and ``[..., d:]`` of it (z first with ``gate_first``)."""
    assert x.target is operator.getitem and z.target is operator.getitem and x.args[0] is z.args[0]
    first, second = (z, x) if gate_first else (x, z)
    if isinstance(x.args[1], int):
        assert (first.args[1], second.args[1]) == (0, 1)
    else:
        (_, head), (_, tail) = first.args[1], second.args[1]
        assert head.start is None and head.stop == tail.start and tail.stop is None


@pytest.mark.parametrize("how", ["split", "chunk", "slice"])
def test_gate_split_off_the_input_projection_is_rewritten(how, cpu_rewrites, dynamo_graph):
    gm = dynamo_graph(SplitProjectionGate(how=how).bfloat16(), *_bf16_inputs((2, 3, D_MODEL)))
    GluPass()(gm.graph)
    gm.graph.lint()
    [op] = _ops(gm)
    _halves_of_one_tensor(*op.args[:2])
    assert tuple(op.args[5:9]) == (True, "silu", 0.0, "before_weight")


@pytest.mark.parametrize("how", ["split", "chunk", "slice"])
def test_gate_split_off_the_input_projection_equals_eager_and_float64(how, cpu_rewrites):
    _against_eager_and_float64(SplitProjectionGate(how=how), _bf16_inputs((2, 3, D_MODEL)), {"rms_norm_gated": 1})


def test_norm_of_the_whole_projection_then_split_is_left_alone(cpu_rewrites, dynamo_graph):
    """Normalised over both halves, then split and gated: a norm of width 2D, not the op's."""
    gm = dynamo_graph(SplitProjectionGate(norm_first=True).bfloat16(), *_bf16_inputs((2, 3, D_MODEL)))
    GluPass()(gm.graph)
    assert not _ops(gm) and not cpu_rewrites.rewrites


# --- HF's Mamba-2 mixer in a bf16 model: an fp32 x, a bf16 gate ------------------------------------
#
# ``Mamba2Mixer.torch_forward`` (what Dynamo traces) upcasts the scan's inputs, so the norm gets an
# fp32 x while the gate is a bf16 slice of the input projection; the norm upcasts the gate itself
# (``silu(gate.to(float32))``).  The op takes that upcast as its z.

MIXER_IN, MIXER_INNER, MIXER_GROUP = 32, 64, 16


def _node_dtype(node):
    return node.meta["example_value"].dtype


def test_mamba2_mixer_norm_in_a_bf16_model_takes_the_gate_upcast(cpu_rewrites, dynamo_graph):
    gm = dynamo_graph(Mamba2MixerNorm().bfloat16(), *_bf16_inputs((2, 3, MIXER_IN)))
    GluPass()(gm.graph)
    gm.graph.lint()
    [op] = _ops(gm)
    x, z, w = op.args[:3]
    assert _node_dtype(x) == torch.float32 and _node_dtype(w) == torch.bfloat16
    # z: the norm's fp32 upcast of the projection's bf16 gate half, kept in the graph
    assert z.op == "call_method" and z.target == "to" and _node_dtype(z) == torch.float32
    assert z.args[0].target is operator.getitem and _node_dtype(z.args[0]) == torch.bfloat16
    # groups, gate before the norm, silu, no offset, fp32 throughout (x is fp32), an fp32 gate
    assert tuple(op.args[4:]) == (MIXER_GROUP, False, "silu", 0.0, "none", False)
    [rewrite] = cpu_rewrites.rewrites
    assert rewrite.dtype == "float32" and "bfloat16 gate upcast" in rewrite.spelling


def test_mamba2_mixer_in_a_bf16_model_equals_eager_and_float64(cpu_rewrites):
    _against_eager_and_float64(Mamba2MixerNorm(), _bf16_inputs((2, 3, MIXER_IN)), {"rms_norm_gated": 1})


def test_fp32_norm_of_a_bf16_gate_equals_eager_and_float64(cpu_rewrites):
    """The norm alone, x fp32 with a bf16 gate and weight: the result and dx, dz, dw against eager
    and against the op's reference in float64."""
    norm = GroupedRMSNormGated(MIXER_INNER, MIXER_GROUP, eps=ORACLE_EPS).bfloat16()
    x = torch.randn(3, 5, MIXER_INNER, requires_grad=True)
    z = (2 * torch.randn(3, 5, MIXER_INNER)).bfloat16().requires_grad_()
    ours = [t.detach().clone().requires_grad_() for t in (x, z)]
    got = torch.compile(norm, backend=glu_fusion.backend)(*ours)
    assert cpu_rewrites.counts() == {"rms_norm_gated": 1}
    expected = norm(x, z)
    assert got.dtype == expected.dtype == torch.float32
    torch.testing.assert_close(got, expected, rtol=0, atol=0)  # the reference path is the eager spelling
    dy = torch.randn_like(expected)
    grads = torch.autograd.grad(got, ours + [norm.weight], dy)
    eager = torch.autograd.grad(expected, [x, z, norm.weight], dy)
    kw = dict(group_size=MIXER_GROUP, norm_before_gate=False, activation="silu", weight_offset=0.0,
              downcast="none", gate_in_input_dtype=False)
    y64, exact = float64_oracle(x, z, norm.weight, kw, dy)
    assert rel_error(got, y64) < TOLERANCE[torch.float32]
    for g, e, g64, leaf in zip(grads, eager, exact, (x, z, norm.weight)):
        assert g.dtype == leaf.dtype
        tol = TOLERANCE[leaf.dtype]
        assert rel_error(g, g64) < tol and rel_error(g, e) < tol


def test_fp32_rms_norm_fn_with_a_bf16_gate_upcast_is_rewritten(cpu_rewrites, dynamo_graph):
    """The same gate on the ``F.rms_norm`` anchor: an fp32 norm times ``silu(z.float())``."""
    def fn(x, z, w):
        return F.rms_norm(x, (x.shape[-1],), w, EPS) * F.silu(z.float())

    x, w = torch.randn(3, 5, 32), 1 + 0.1 * torch.randn(32)
    gm = dynamo_graph(fn, x, (2 * torch.randn(3, 5, 32)).bfloat16(), w)
    GluPass()(gm.graph)
    gm.graph.lint()
    [op] = _ops(gm)
    assert op.args[1].target == "float" and tuple(op.args[5:]) == (True, "silu", 0.0, "none", False)


@pytest.mark.parametrize("gate", ["gelu", "silu_rounded", "silu_low"])
def test_mamba2_mixer_look_alikes_are_left_alone(gate, cpu_rewrites, dynamo_graph):
    """A gelu gate; silu of the upcast gate rounded back to bf16; silu computed in bf16: the op
    computes silu, and in fp32 where x is fp32, so none of these is its computation."""
    gm = dynamo_graph(Mamba2MixerNorm(gate=gate).bfloat16(), *_bf16_inputs((2, 3, MIXER_IN)))
    before = len(gm.graph.nodes)
    GluPass()(gm.graph)
    assert not _ops(gm) and len(gm.graph.nodes) == before and not cpu_rewrites.rewrites


def test_grouped_hf_norm_under_dynamic_true_is_rewritten(cpu_rewrites, dynamo_graph):
    """Every size symbolic: the output of ``weight * h.to(dt)`` has the static weight's width,
    proven equal to x's symbolic one only through the merged value."""
    x, z = _bf16_inputs((2, 3, MIXER_INNER), (2, 3, MIXER_INNER))
    gm = dynamo_graph(GroupedRMSNormGated().bfloat16(), x, z, dynamic=True)
    GluPass()(gm.graph)
    gm.graph.lint()
    [op] = _ops(gm)
    assert tuple(op.args[4:]) == (MIXER_GROUP, False, "silu", 0.0, "before_weight", False)


def test_grouped_hf_norm_under_dynamic_true_equals_eager(cpu_rewrites):
    norm = GroupedRMSNormGated().bfloat16()
    compiled = torch.compile(norm, backend=glu_fusion.backend, dynamic=True)
    for lead in ((2, 3), (5, 4)):
        x, z = _bf16_inputs((*lead, MIXER_INNER), (*lead, MIXER_INNER))
        torch.testing.assert_close(compiled(x, z), norm(x, z), rtol=0, atol=0)
    # Inductor may run the pass more than once on a dynamic graph: each run rewrites the site
    assert cpu_rewrites.graphs and all(g.counts() == {"rms_norm_gated": 1} for g in cpu_rewrites.graphs)


# --- groups given by their count: rearrange(x, "... (g d) -> ... g d", g=G) -------------------------

N_GROUPS = 4
REARRANGES = [pytest.param(rearrange_like, id="plain_torch"),
              pytest.param("einops", id="einops", marks=pytest.mark.skipif(einops is None,
                                                                           reason="einops is not installed"))]


def _rearrange(which):
    return einops.rearrange if which == "einops" else which


@pytest.mark.parametrize("rearrange", REARRANGES)
def test_groups_by_count_are_rewritten(rearrange, cpu_rewrites, dynamo_graph):
    x, z = _bf16_inputs((2, 3, D_MODEL), (2, 3, D_MODEL))
    gm = dynamo_graph(GroupCountGatedNorm(D_MODEL, N_GROUPS, rearrange=_rearrange(rearrange)).bfloat16(), x, z)
    GluPass()(gm.graph)
    gm.graph.lint()
    [op] = _ops(gm)
    assert tuple(op.args[4:]) == (D_MODEL // N_GROUPS, False, "silu", 0.0, "after_weight", False)


@pytest.mark.parametrize("rearrange", REARRANGES)
def test_groups_by_count_equal_eager_and_float64(rearrange, cpu_rewrites):
    _against_eager_and_float64(GroupCountGatedNorm(D_MODEL, N_GROUPS, rearrange=_rearrange(rearrange)),
                               _bf16_inputs((2, 3, D_MODEL), (2, 3, D_MODEL)), {"rms_norm_gated": 1})


LOOK_ALIKE_GROUPINGS = {
    "interleaved_groups": ("... (d g) -> ... g d", GROUPS_MERGE),  # columns g, g + G, ... together
    "merged_transposed": (GROUPS_SPLIT, "... g d -> ... (d g)"),   # the groups' columns come back shuffled
}


@pytest.mark.parametrize("rearrange", REARRANGES)
@pytest.mark.parametrize("grouping", sorted(LOOK_ALIKE_GROUPINGS))
def test_groups_by_count_look_alikes_are_left_alone(grouping, rearrange, cpu_rewrites, dynamo_graph):
    split, merge = LOOK_ALIKE_GROUPINGS[grouping]
    model = GroupCountGatedNorm(D_MODEL, N_GROUPS, rearrange=_rearrange(rearrange), split=split, merge=merge)
    gm = dynamo_graph(model.bfloat16(), *_bf16_inputs((2, 3, D_MODEL), (2, 3, D_MODEL)))
    GluPass()(gm.graph)
    assert not _ops(gm) and not cpu_rewrites.rewrites


def _groups_without_weight(by_count):
    """Groups of 16 columns given by their count (4 of D = 64) or by their size, and no weight.
    The sizes are literals: an int Dynamo reads from a container is a symbol under
    ``dynamic=True``, and a symbolic group size is left alone."""
    def fn(x, z):
        h = x.float() * F.silu(z.float())
        hg = rearrange_like(h, GROUPS_SPLIT, g=4) if by_count else rearrange_like(h, GROUPS_SPLIT, d=16)
        hg = hg * torch.rsqrt(hg.pow(2).mean(-1, keepdim=True) + EPS)
        return rearrange_like(hg, GROUPS_MERGE).to(x.dtype)
    return fn


@pytest.mark.parametrize("model,rewritten", [
    pytest.param(lambda: GroupCountGatedNorm(D_MODEL, N_GROUPS).bfloat16(), True, id="count_with_weight"),
    pytest.param(lambda: _groups_without_weight(by_count=False), True, id="size_without_weight"),
    pytest.param(lambda: _groups_without_weight(by_count=True), False, id="count_without_weight"),
])
def test_groups_under_dynamic_true(model, rewritten, cpu_rewrites, dynamo_graph):
    """Every size symbolic: groups given by their size stay constant; given by their count, the
    size is ``D // G``, constant only where the static weight's width fixes D."""
    gm = dynamo_graph(model(), *_bf16_inputs((2, 3, D_MODEL), (2, 3, D_MODEL)), dynamic=True)
    GluPass()(gm.graph)
    gm.graph.lint()
    ops = _ops(gm)
    assert len(ops) == int(rewritten)
    assert all(op.args[4] == D_MODEL // N_GROUPS for op in ops)


@needs_einops
@pytest.mark.parametrize("dynamic", [False, True], ids=["static", "dynamic"])
@pytest.mark.parametrize("split,merge", [(GROUPS_SPLIT, GROUPS_MERGE), *LOOK_ALIKE_GROUPINGS.values()])
def test_einops_traces_like_the_plain_torch_rearrange(split, merge, dynamic, dynamo_graph):
    """The plain-torch tests above stand for einops: Dynamo records the same graph for both
    (reshapes with list sizes, a permute where axes move; no einops call)."""
    from helpers.graphs import render

    x, z = _bf16_inputs((2, 3, D_MODEL), (2, 3, D_MODEL))
    graphs = []
    for rearrange in (einops.rearrange, rearrange_like):
        model = GroupCountGatedNorm(D_MODEL, N_GROUPS, rearrange=rearrange, split=split, merge=merge)
        graphs.append(render(dynamo_graph(model.bfloat16(), x, z, dynamic=dynamic).graph))
    assert graphs[0] == graphs[1] and "einops" not in graphs[0]


# --- HF's grouped norm on the halves of one packed [x | z] projection -------------------------------

@pytest.mark.parametrize("gate_first", [False, True], ids=["x_first", "gate_first"])
@pytest.mark.parametrize("how", ["split", "chunk", "slice"])
def test_packed_projection_halves_are_rewritten(how, gate_first, cpu_rewrites, dynamo_graph):
    model = PackedGateProjection(GroupedRMSNormGated(), D_MODEL // 2, D_MODEL, how=how, gate_first=gate_first)
    gm = dynamo_graph(model.bfloat16(), *_bf16_inputs((2, 3, D_MODEL // 2)))
    GluPass()(gm.graph)
    gm.graph.lint()
    [op] = _ops(gm)
    _halves_of_one_tensor(*op.args[:2], gate_first=gate_first)
    assert tuple(op.args[4:]) == (MIXER_GROUP, False, "silu", 0.0, "before_weight", False)


@pytest.mark.parametrize("gate_first", [False, True], ids=["x_first", "gate_first"])
@pytest.mark.parametrize("how", ["split", "chunk", "slice"])
def test_packed_projection_halves_equal_eager_and_float64(how, gate_first, cpu_rewrites):
    model = PackedGateProjection(GroupedRMSNormGated(), D_MODEL // 2, D_MODEL, how=how, gate_first=gate_first)
    _against_eager_and_float64(model, _bf16_inputs((2, 3, D_MODEL // 2)), {"rms_norm_gated": 1})


class WholeRowStatistics(torch.nn.Module):
    """The halves of the packed projection gate each other, but the norm's statistics are those
    of the whole packed row: not a norm of x."""

    def __init__(self, d=D_MODEL):
        super().__init__()
        self.in_proj = torch.nn.Linear(d // 2, 2 * d, bias=False)
        self.weight = torch.nn.Parameter(1 + 0.1 * torch.randn(d))

    def forward(self, u):
        xz = self.in_proj(u)
        x, z = xz.chunk(2, dim=-1)
        rstd = torch.rsqrt(xz.float().pow(2).mean(-1, keepdim=True) + EPS)
        return (self.weight * (x.float() * rstd).to(u.dtype) * F.silu(z.float())).to(u.dtype)


@pytest.mark.parametrize("model", [
    pytest.param(lambda: PackedGateProjection(GroupedRMSNormGated(), D_MODEL // 2, D_MODEL, how="row_gate"),
                 id="one_gate_value_per_row"),
    pytest.param(lambda: PackedGateProjection(GroupedRMSNormGated(gate="gelu"), D_MODEL // 2, D_MODEL),
                 id="gelu_gate_half"),
    pytest.param(WholeRowStatistics, id="whole_row_statistics"),
])
def test_packed_projection_look_alikes_are_left_alone(model, cpu_rewrites, dynamo_graph):
    gm = dynamo_graph(model().bfloat16(), *_bf16_inputs((2, 3, D_MODEL // 2)))
    before = len(gm.graph.nodes)
    GluPass()(gm.graph)
    assert not _ops(gm) and len(gm.graph.nodes) == before and not cpu_rewrites.rewrites


@pytest.mark.parametrize("model,inputs", [
    pytest.param(lambda: Mamba2MixerNorm(), (2, 3, MIXER_IN), id="mixer_gate_upcast"),
    pytest.param(lambda: PackedGateProjection(GroupedRMSNormGated(), D_MODEL // 2, D_MODEL, how="slice",
                                              gate_first=True), (2, 3, D_MODEL // 2), id="packed_slices"),
])
def test_new_spellings_through_the_kernels(model, inputs, cpu_rewrites, monkeypatch):
    """The same models on the Triton kernels (the interpreter on CPU): strided halves read in
    place, the fp32 upcast of a bf16 gate, dz rounded back by autograd.  Within two rounding
    steps of eager: the packed norm rounds to bf16 twice (before and after the weight), and on
    the kernels each rounding may land one step from eager's."""
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    _against_eager_and_float64(model(), _bf16_inputs(inputs), {"rms_norm_gated": 1}, steps=2)
