"""The RMSNorm pattern family: each real spelling rewritten once with the right flags (the residual
add moved into the op when there is one), compiled training steps equal to eager, look-alikes
left alone, and the family's switch and rewrite gate obeyed."""
from __future__ import annotations

import operator

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

import glu_fusion
import glu_fusion.patterns.rms_norm as family
from glu_fusion.compile.pre_grad import GluPass

from helpers.rms_norm_cases import LOOKALIKES

OP = torch.ops.glu_fusion.rms_norm.default
GATED = torch.ops.glu_fusion.rms_norm_gated.default
EPS = 1e-6
D = 32


@pytest.fixture
def norm_rewrites(cpu_rewrites, monkeypatch):
    """The pass rewrites CPU norms too (the gate's default keeps them for Inductor)."""
    monkeypatch.setattr(family, "REWRITE_DEVICE_TYPES", ("cuda", "cpu"))
    return cpu_rewrites


# --- spellings ------------------------------------------------------------------------------------

def hf_llama(h, w):
    input_dtype = h.dtype
    h = h.to(torch.float32)
    variance = h.pow(2).mean(-1, keepdim=True)
    h = h * torch.rsqrt(variance + EPS)
    return w * h.to(input_dtype)


def gemma(h, w):
    hf = h.float()
    out = hf * torch.rsqrt(hf.pow(2).mean(-1, keepdim=True) + EPS)
    out = out * (1.0 + w.float())
    return out.type_as(h)


def fp32_inv_sqrt(h, w):
    """Weight in fp32 before one downcast, written with ``x*x`` and ``1/sqrt``."""
    hf = h.float()
    return (hf * (1 / torch.sqrt((hf * hf).mean(-1, keepdim=True) + EPS)) * w.float()).to(h.dtype)


def rms_norm_fn(h, w):
    return F.rms_norm(h, (h.shape[-1],), w, EPS)


def rms_norm_no_weight(h, w):
    return F.rms_norm(h, (h.shape[-1],), eps=EPS)


# name -> (spelling, weight_offset, downcast for bf16)
SPELLINGS = {
    "hf_llama": (hf_llama, 0.0, "before_weight"),
    "gemma": (gemma, 1.0, "none"),
    "fp32_inv_sqrt": (fp32_inv_sqrt, 0.0, "after_weight"),  # the same values as "none"
    "rms_norm_fn": (rms_norm_fn, 0.0, "after_weight"),
    "rms_norm_no_weight": (rms_norm_no_weight, 0.0, "after_weight"),
}


def _layer(norm, residual: bool):
    """A decoder-layer slice: the sum feeds the norm and is also the next residual."""
    if residual:
        def fn(x, r, w):
            h = r + x
            return norm(h, w) * 2.0, h
    else:
        def fn(x, r, w):
            return norm(x, w) * 2.0
    return fn


def _inputs(dtype, offset=0.0, requires_grad=False):
    x = torch.randn(3, 5, D, dtype=dtype)
    r = torch.randn(3, 5, D, dtype=dtype)
    w = (0.1 * torch.randn(D) + (0.0 if offset else 1.0)).to(dtype)
    return [t.requires_grad_(requires_grad) for t in (x, r, w)]


def _ops(gm, target=OP):
    return [n for n in gm.graph.nodes if n.op == "call_function" and n.target is target]


@pytest.mark.parametrize("residual", [True, False], ids=["residual", "plain"])
@pytest.mark.parametrize("name", sorted(SPELLINGS))
def test_each_spelling_rewritten_once_with_its_flags(name, residual, norm_rewrites, dynamo_graph):
    norm, offset, downcast = SPELLINGS[name]
    gm = dynamo_graph(_layer(norm, residual), *_inputs(torch.bfloat16, offset))
    GluPass()(gm.graph)
    gm.graph.lint()
    [op] = _ops(gm)
    x, w, r, eps, got_offset, got_downcast = op.args
    assert (r is not None) == residual and eps == EPS
    assert (got_offset, got_downcast) == (offset, downcast)
    assert (w is None) == (name == "rms_norm_no_weight")
    [rewrite] = norm_rewrites.rewrites
    assert rewrite.family == "rms_norm" and rewrite.dtype == "bfloat16"
    assert not [n for n in gm.graph.nodes if n.op == "call_function" and n.target in (torch.rsqrt, F.rms_norm)]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("name", sorted(SPELLINGS))
def test_compiled_training_step_equals_eager(name, dtype, norm_rewrites):
    norm, offset, _ = SPELLINGS[name]
    fn = _layer(norm, residual=True)
    leaves = _inputs(dtype, offset, requires_grad=True)
    copies = [t.detach().clone().requires_grad_() for t in leaves]
    expected = fn(*leaves)
    got = torch.compile(fn, backend=glu_fusion.backend)(*copies)
    assert norm_rewrites.counts() == {"rms_norm": 1}
    # the reference path is the eager spelling; only ``1/sqrt`` (computed as rsqrt) may differ
    exact = dict(atol=0, rtol=0) if name != "fp32_inv_sqrt" else {}
    for a, b in zip(got, expected):
        torch.testing.assert_close(a, b, **exact)
    grads_out = [torch.randn_like(t) for t in expected]
    got_grads = torch.autograd.grad(got, copies, grads_out, allow_unused=True)
    expected_grads = torch.autograd.grad(expected, leaves, grads_out, allow_unused=True)
    for a, b in zip(got_grads, expected_grads):
        assert (a is None) == (b is None)
        if b is None:
            continue
        if dtype == torch.float32:
            torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)
        else:  # bf16 sums over rows (dw) round differently in eager autograd and in fp32
            scale = b.float().abs().max().clamp_min(1e-6)
            assert ((a.float() - b.float()).abs().max() / scale).item() <= 2e-2


def test_nn_rms_norm_with_default_eps(norm_rewrites, dynamo_graph):
    norm = nn.RMSNorm(D).bfloat16()
    x = torch.randn(4, D, dtype=torch.bfloat16)
    gm = dynamo_graph(lambda x: norm(x), x)
    GluPass()(gm.graph)
    [op] = _ops(gm)
    assert op.args[3] == torch.finfo(torch.float32).eps and op.args[5] == "after_weight"
    x = (1e-3 * torch.randn(4, D)).bfloat16()  # small enough for eps to matter
    torch.testing.assert_close(torch.compile(norm, backend=glu_fusion.backend)(x), norm(x), atol=0, rtol=0)


def test_h_read_before_the_norm_output_is_served_by_the_op(norm_rewrites):
    """A reader of the sum placed before the norm in the graph still gets the op's h."""
    def fn(x, r, w):
        h = x + r
        s = h.sum(-1, keepdim=True)
        return hf_llama(h, w) + s

    x, r, w = _inputs(torch.float32)
    torch.testing.assert_close(torch.compile(fn, backend=glu_fusion.backend)(x, r, w), fn(x, r, w))
    assert norm_rewrites.counts() == {"rms_norm": 1}


def test_gated_norm_stays_with_the_gated_family(norm_rewrites, dynamo_graph):
    def fn(x, z, w):
        return (hf_llama(x, w) * F.silu(z.float())).to(x.dtype)

    gm = dynamo_graph(fn, *_inputs(torch.bfloat16))
    GluPass()(gm.graph)
    assert len(_ops(gm, GATED)) == 1 and not _ops(gm)


# --- look-alikes ------------------------------------------------------------------------------------

def _broadcast_add(x, r, w):
    """The norm's input is a bias add (broadcast), not a residual: the add stays outside."""
    return hf_llama(x + r[0, 0], w)


NEGATIVES = LOOKALIKES


@pytest.mark.parametrize("fn", NEGATIVES, ids=lambda f: f.__name__)
def test_look_alikes_left_alone(fn, norm_rewrites, dynamo_graph):
    gm = dynamo_graph(fn, *_inputs(torch.bfloat16))
    before = len(gm.graph.nodes)
    GluPass()(gm.graph)
    assert not _ops(gm) and len(gm.graph.nodes) == before
    assert not norm_rewrites.rewrites


def test_broadcast_add_is_not_taken_as_residual(norm_rewrites, dynamo_graph):
    gm = dynamo_graph(_broadcast_add, *_inputs(torch.bfloat16))
    GluPass()(gm.graph)
    [op] = _ops(gm)
    assert op.args[2] is None and op.args[0].target in (torch.add, operator.add)


def test_switch_off_leaves_norms_to_inductor(norm_rewrites, dynamo_graph, monkeypatch):
    monkeypatch.setattr(family, "REWRITE_DEVICE_TYPES", ())
    gm = dynamo_graph(_layer(hf_llama, True), *_inputs(torch.bfloat16))
    GluPass()(gm.graph)
    assert not _ops(gm) and not norm_rewrites.rewrites


def test_default_gate_keeps_cpu_norms(cpu_rewrites, dynamo_graph):
    """Without the fixture's override the gate rewrites no CPU graph."""
    gm = dynamo_graph(_layer(hf_llama, True), *_inputs(torch.bfloat16))
    GluPass()(gm.graph)
    assert not _ops(gm) and not cpu_rewrites.rewrites


def test_gate_declines_wide_rows(norm_rewrites, dynamo_graph, monkeypatch):
    monkeypatch.setattr(family, "MAX_D", D - 1)
    gm = dynamo_graph(_layer(hf_llama, True), *_inputs(torch.bfloat16))
    GluPass()(gm.graph)
    assert not _ops(gm)


def test_dynamic_batch_is_rewritten(norm_rewrites):
    fn = _layer(hf_llama, True)
    compiled = torch.compile(fn, backend=glu_fusion.backend)
    w = torch.randn(D)
    for batch in (2, 3, 5):
        x, r = torch.randn(batch, 4, D), torch.randn(batch, 4, D)
        for a, b in zip(compiled(x, r, w), fn(x, r, w)):
            torch.testing.assert_close(a, b)
    assert [g.counts() for g in norm_rewrites.graphs] == [{"rms_norm": 1}] * 2


def test_compiled_code_calls_the_autograd_free_twins(norm_rewrites):
    """Inductor's generated forward and backward call ``rms_norm_nograd`` and
    ``rms_norm_backward_nograd`` (the post-grad swap), and nothing else of ours."""
    import re

    from torch._inductor.utils import run_and_get_code
    fn = _layer(hf_llama, True)
    x, r, w = _inputs(torch.float32, requires_grad=True)
    compiled = torch.compile(fn, backend=glu_fusion.backend)
    _, codes = run_and_get_code(lambda: torch.autograd.grad(sum(t.sum() for t in compiled(x, r, w)), (x, r, w)))
    calls = [c for code in codes for c in re.findall(r"torch\.ops\.glu_fusion\.(\w+)\.default\(", code)]
    assert calls == ["rms_norm_nograd", "rms_norm_backward_nograd"]


def test_two_layers_chain_their_residual_streams(norm_rewrites):
    """Layer 2's residual add reads layer 1's sum: both adds move into their ops, and layer 2's
    op reads layer 1's h."""
    w1, w2 = torch.randn(D), torch.randn(D)

    def fn(x, r):
        h1 = x + r
        y1 = hf_llama(h1, w1) * 3.0
        h2 = h1 + y1
        return hf_llama(h2, w2), h2

    x, r = torch.randn(2, 5, D), torch.randn(2, 5, D)
    got = torch.compile(fn, backend=glu_fusion.backend)(x, r)
    for a, b in zip(got, fn(x, r)):
        torch.testing.assert_close(a, b, rtol=0, atol=0)
    assert norm_rewrites.counts() == {"rms_norm": 2}
