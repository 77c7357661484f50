"""The gated RMSNorm pattern family: each real spelling rewritten once with the right flags and
equal to eager when compiled; look-alikes left alone."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

import glu_fusion
from glu_fusion.compile.pre_grad import GluPass

from helpers.norm_cases import EPS, SPELLINGS

OP = torch.ops.glu_fusion.rms_norm_gated.default
D = 64

# spelling -> (norm_before_gate, activation, weight_offset, downcast, gate_in_input_dtype) for bf16
EXPECTED_BF16 = {
    "hf_qwen3_next": (True, "silu", 0.0, "before_weight", False),
    "fp32_weight_gate": (True, "silu", 0.0, "none", False),
    "rms_norm_fn_then_silu": (True, "silu", 0.0, "after_weight", True),
    "llama_module_then_silu": (True, "silu", 0.0, "before_weight", True),
    "llama_module_then_fp32_silu": (True, "silu", 0.0, "before_weight", True),
    "gated_before_norm_hf": (False, "silu", 0.0, "before_weight", False),
    "offset_sigmoid": (True, "sigmoid", 1.0, "none", False),
}
MATCHED = [s for s in SPELLINGS if s.name in EXPECTED_BF16]


def _ops(gm):
    return [n for n in gm.graph.nodes if n.op == "call_function" and n.target is OP]


def _inputs(dtype, offset=False):
    x = torch.randn(3, 5, D, dtype=dtype)
    z = (2 * torch.randn(3, 5, D)).to(dtype)
    w = (0.1 * torch.randn(D) + (0.0 if offset else 1.0)).to(dtype)
    return x, z, w


@pytest.mark.parametrize("spelling", MATCHED, ids=lambda s: s.name)
def test_each_spelling_rewritten_once_with_its_flags(spelling, cpu_rewrites, dynamo_graph):
    x, z, w = _inputs(torch.bfloat16)
    gm = dynamo_graph(lambda x, z, w: spelling.fn(x, z, w, EPS), x, z, w)
    GluPass()(gm.graph)
    gm.graph.lint()
    [op] = _ops(gm)
    assert op.args[3] == EPS and op.args[4] is None
    assert tuple(op.args[5:]) == EXPECTED_BF16[spelling.name]
    [rewrite] = cpu_rewrites.rewrites
    assert rewrite.family == "rms_norm_gated" and rewrite.dtype == "bfloat16"


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("spelling", MATCHED, ids=lambda s: s.name)
def test_compiled_training_step_equals_eager(spelling, dtype, cpu_rewrites):
    offset = spelling.kwargs["weight_offset"] != 0.0
    leaves = [t.requires_grad_() for t in _inputs(dtype, offset)]
    copies = [t.detach().clone().requires_grad_() for t in leaves]
    fn = lambda x, z, w: spelling.fn(x, z, w, EPS)  # noqa: E731
    expected = fn(*leaves)
    got = torch.compile(fn, backend=glu_fusion.backend)(*copies)
    assert cpu_rewrites.counts() == {"rms_norm_gated": 1}
    tol = dict(atol=1e-5, rtol=1e-5) if dtype == torch.float32 else dict(atol=2e-2, rtol=2e-2)
    torch.testing.assert_close(got, expected, atol=0, rtol=0)  # the reference path is the eager spelling
    dy = torch.randn_like(expected)
    for a, b in zip(torch.autograd.grad(got, copies, dy), torch.autograd.grad(expected, leaves, dy)):
        if dtype == torch.float32:
            torch.testing.assert_close(a, b, **tol)
        else:
            # bf16 gradients summed over rows (dw) round differently in eager (bf16 autograd)
            # and in the op (fp32 accumulation): compare relative to the tensor's scale, not
            # element by element, where one cancelling sum can differ by several percent.
            scale = b.float().abs().max().clamp_min(1e-6)
            assert ((a.float() - b.float()).abs().max() / scale).item() <= tol["rtol"], (a, b)


def _l2_gate(x, z, w, eps):
    xf = x.float()
    return (xf * torch.rsqrt(xf.pow(2).sum(-1, keepdim=True) + eps) * w * F.silu(z.float())).to(x.dtype)


def _plain_rms(x, z, w, eps):
    xf = x.float()
    return (xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps) * w).to(x.dtype) + z


def _intermediate_reused(x, z, w, eps):
    xf = x.float()
    n = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps)
    return (n * w * F.silu(z.float())).to(x.dtype), n.sum()


def _gate_not_from_norm(x, z, w, eps):
    xf = x.float()
    n = (xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps) * w).to(x.dtype)
    return n + x * F.silu(z)


def _low_precision_norm(x, z, w, eps):
    return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps) * w * F.silu(z)


def _gelu_gate(x, z, w, eps):
    xf = x.float()
    return (xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps) * w * F.gelu(z.float())).to(x.dtype)


NEGATIVES = [_l2_gate, _plain_rms, _intermediate_reused, _gate_not_from_norm, _low_precision_norm, _gelu_gate]


def test_reference_grouped_spelling_rewritten_with_its_group(cpu_rewrites, dynamo_graph):
    """The Mamba-2 reference spelling of the op tests (groups of 16, gate first)."""
    grouped = next(s for s in SPELLINGS if s.name == "mamba2_grouped")
    x, z, w = _inputs(torch.bfloat16)
    gm = dynamo_graph(lambda x, z, w: grouped.fn(x, z, w, EPS), x, z, w)
    GluPass()(gm.graph)
    gm.graph.lint()
    [op] = _ops(gm)
    assert op.args[3] == EPS and op.args[4] == 16 and op.args[5] is False


@pytest.mark.parametrize("fn", NEGATIVES, ids=lambda f: f.__name__)
def test_look_alikes_left_alone(fn, cpu_rewrites, dynamo_graph):
    x, z, w = _inputs(torch.bfloat16)
    gm = dynamo_graph(lambda x, z, w: fn(x, z, w, EPS), x, z, w)
    before = len(gm.graph.nodes)
    GluPass()(gm.graph)
    assert not _ops(gm) and len(gm.graph.nodes) == before
    assert not cpu_rewrites.rewrites


def test_dynamic_batch_is_rewritten(cpu_rewrites):
    """torch.compile's automatic dynamic shapes (a second batch size recompiles with a symbolic
    batch) and mark_dynamic both keep the rewrite; outputs match eager."""
    from helpers.models import GatedNormQwen3Next

    model = GatedNormQwen3Next()
    compiled = torch.compile(model, backend=glu_fusion.backend)
    for batch in (2, 3, 5):
        x = torch.randn(batch, 3, 32)
        torch.testing.assert_close(compiled(x), model(x))
    assert [g.counts() for g in cpu_rewrites.graphs] == [{"rms_norm_gated": 1}] * 2
    x = torch.randn(4, 7, 32)
    torch._dynamo.mark_dynamic(x, 0)
    torch._dynamo.reset()
    cpu_rewrites.reset()
    torch.testing.assert_close(torch.compile(model, backend=glu_fusion.backend)(x), model(x))
    assert cpu_rewrites.counts() == {"rms_norm_gated": 1}


def _mamba2_grouped(x, z, w, eps, group=8, norm_before_gate=False):
    """Mamba-2's gated norm written out: fp32, groups of ``group`` columns, 1/sqrt."""
    dtype = x.dtype
    w, x, z = w.float(), x.float(), z.float()
    if not norm_before_gate:
        x = x * F.silu(z)
    xg = x.view(*x.shape[:-1], -1, group)
    rstd = 1 / torch.sqrt(xg.square().mean(dim=-1, keepdim=True) + eps)
    out = (xg * rstd).view(*x.shape[:-1], x.shape[-1]) * w
    if norm_before_gate:
        out = out * F.silu(z)
    return out.to(dtype)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("norm_before_gate", [False, True])
def test_grouped_mamba2_spelling(norm_before_gate, dtype, cpu_rewrites):
    x = torch.randn(3, 5, 32, dtype=dtype, requires_grad=True)
    z = torch.randn_like(x, requires_grad=True)
    w = (1 + 0.1 * torch.randn(32)).to(dtype).requires_grad_()
    fn = lambda x, z, w: _mamba2_grouped(x, z, w, EPS, norm_before_gate=norm_before_gate)  # noqa: E731
    got = torch.compile(fn, backend=glu_fusion.backend)(x, z, w)
    assert cpu_rewrites.counts() == {"rms_norm_gated": 1}
    assert "groups of 8" in cpu_rewrites.rewrites[0].spelling
    expected = fn(x, z, w)
    # within one rounding step: the op computes 1/sqrt as rsqrt
    step = dict(atol=1e-6, rtol=1e-6) if dtype == torch.float32 else dict(atol=0.0, rtol=2 ** -7)
    torch.testing.assert_close(got, expected, **step)
    dy = torch.randn_like(expected)
    tol = 1e-5 if dtype == torch.float32 else 2e-2
    for a, b in zip(torch.autograd.grad(got, (x, z, w), dy), torch.autograd.grad(expected, (x, z, w), dy)):
        scale = b.float().abs().max().clamp_min(1e-6)
        assert ((a.float() - b.float()).abs().max() / scale).item() <= tol


def test_grouped_norm_not_merged_back_is_left_alone(cpu_rewrites):
    """Groups normalised but returned grouped: not the op's shape, so no rewrite."""
    def fn(x, z, w):
        xg = (x.float() * F.silu(z.float())).view(*x.shape[:-1], -1, 8)
        return xg * torch.rsqrt(xg.pow(2).mean(-1, keepdim=True) + EPS)

    x, z = torch.randn(4, 32), torch.randn(4, 32)
    torch.testing.assert_close(torch.compile(fn, backend=glu_fusion.backend)(x, z, None), fn(x, z, None))
    assert cpu_rewrites.total == 0
