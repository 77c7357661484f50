"""The gated RMSNorm pattern family: each real spelling rewritten once with the right flags and
equal to eager when compiled; look-alikes left alone."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

import glu_fusion
from glu_fusion.graph_pass import GluPass

from test_rms_norm_gated_cases import EPS, SPELLINGS

OP = torch.ops.glu_fusion.rms_norm_gated.default
D = 64

# spelling -> (norm_before_gate, activation, weight_offset, downcast, gate_in_input_dtype) for bf16
EXPECTED_BF16 = {
    "hf_qwen3_next": (True, "silu", 0.0, "before_weight", False),
    "fp32_weight_gate": (True, "silu", 0.0, "none", False),
    "rms_norm_fn_then_silu": (True, "silu", 0.0, "after_weight", True),
    "llama_module_then_silu": (True, "silu", 0.0, "before_weight", True),
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


NEGATIVES = [_l2_gate, _plain_rms, _intermediate_reused, _gate_not_from_norm, _low_precision_norm, _gelu_gate,
             SPELLINGS[-2].fn]  # grouped (Mamba-2) spelling: not matched yet


@pytest.mark.parametrize("fn", NEGATIVES, ids=lambda f: getattr(f, "__name__", "grouped"))
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
    from test_pass_snapshots import GatedNormQwen3Next

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
