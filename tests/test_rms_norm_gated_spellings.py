"""Gated-norm spellings found in third-party model code:

* the gate applied in place (``out *= F.silu(z)``): rewritten like the out-of-place product,
  and left alone when the tensor multiplied in place is not the norm's own intermediate;
* the weight applied while the value is still grouped (``w.view(G, D // G) * normed`` before
  the merge back to ``[..., D]``);
* mamba_ssm's ``RMSNormGated`` (gate first, groups, fp32 upcasts, ``1/sqrt``), with its groups
  formed by reshapes (what Dynamo traces einops' ``rearrange`` to) or by einops itself where it is
  installed, and a gate split off the input projection (``split``/``chunk`` of ``in_proj(u)``):
  result and every gradient against eager and float64, with their look-alikes left alone."""
from __future__ import annotations

import operator

import pytest
import torch
import torch.nn.functional as F

import glu_fusion
import glu_fusion.ops  # noqa: F401  (registers the ops named below)
from glu_fusion.compile.pre_grad import GluPass

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

    def forward(self, x, z):
        dtype = x.dtype
        weight = self.weight.float()
        bias = self.bias.float() if self.bias is not None else None
        x, z = x.float(), z.float()
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
    """``xz = in_proj(u); x, z = xz.split([d, d], -1)`` (or ``chunk``), then Qwen3-Next's gated
    norm of x with gate z; ``norm_first``: the look-alike that normalises the whole projection
    and only then splits it."""

    def __init__(self, d=D_MODEL, how="split", norm_first=False):
        super().__init__()
        self.in_proj = torch.nn.Linear(d, 2 * d, bias=False)
        self.weight = torch.nn.Parameter(1 + 0.1 * torch.randn(d))
        self.d, self.how, self.norm_first = d, how, norm_first

    def _norm(self, h):
        dtype = h.dtype
        hf = h.to(torch.float32)
        return (hf * torch.rsqrt(hf.pow(2).mean(-1, keepdim=True) + EPS)).to(dtype)

    def forward(self, u):
        xz = self.in_proj(u)
        if self.norm_first:
            x, z = self._norm(xz).chunk(2, dim=-1)
            return (self.weight * x * F.silu(z.to(torch.float32))).to(u.dtype)
        x, z = xz.split([self.d, self.d], dim=-1) if self.how == "split" else xz.chunk(2, dim=-1)
        h = self.weight * self._norm(x)
        return (h * F.silu(z.to(torch.float32))).to(x.dtype)


def _bf16_inputs(*shapes):
    return [(2 * torch.randn(*s)).bfloat16() for s in shapes]


def _ops(gm):
    return [n for n in gm.graph.nodes if n.op == "call_function" and n.target is OP]


def _against_eager_and_float64(model, inputs, counts):
    """Compile the bf16 model with our backend: the rewrite count, then its result and every
    gradient (inputs and parameters) against eager bf16 and the float64 model."""
    import copy
    model = model.bfloat16()
    model64 = copy.deepcopy(model).double()
    ours = [t.detach().clone().requires_grad_() for t in inputs]
    eager_in = [t.detach().clone().requires_grad_() for t in inputs]
    in64 = [t.detach().double().requires_grad_() for t in inputs]
    got = torch.compile(model, backend=glu_fusion.backend)(*ours)
    assert glu_fusion.report().counts() == counts
    eager_model = copy.deepcopy(model)
    expected, exact = eager_model(*eager_in), model64(*in64)
    # The op rounds once where eager rounds once (1/sqrt computed as rsqrt): within one step of
    # eager, and no further from float64 than eager plus that step.
    torch.testing.assert_close(got, expected, atol=0.0, rtol=2 ** -7)
    step = 2 ** -7 * exact.abs().max().item()
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


@pytest.mark.parametrize("how", ["split", "chunk"])
def test_gate_split_off_the_input_projection_is_rewritten(how, cpu_rewrites, dynamo_graph):
    gm = dynamo_graph(SplitProjectionGate(how=how).bfloat16(), *_bf16_inputs((2, 3, D_MODEL)))
    GluPass()(gm.graph)
    gm.graph.lint()
    [op] = _ops(gm)
    x, z = op.args[:2]
    assert x.target is operator.getitem and z.target is operator.getitem and x.args[0] is z.args[0]
    assert (x.args[1], z.args[1]) == (0, 1)
    assert tuple(op.args[5:9]) == (True, "silu", 0.0, "before_weight")


@pytest.mark.parametrize("how", ["split", "chunk"])
def test_gate_split_off_the_input_projection_equals_eager_and_float64(how, cpu_rewrites):
    _against_eager_and_float64(SplitProjectionGate(how=how), _bf16_inputs((2, 3, D_MODEL)), {"rms_norm_gated": 1})


def test_norm_of_the_whole_projection_then_split_is_left_alone(cpu_rewrites, dynamo_graph):
    """Normalised over both halves, then split and gated: a norm of width 2D, not the op's."""
    gm = dynamo_graph(SplitProjectionGate(norm_first=True).bfloat16(), *_bf16_inputs((2, 3, D_MODEL)))
    GluPass()(gm.graph)
    assert not _ops(gm) and not cpu_rewrites.rewrites
