"""RMSNorm (+ residual) kernels compiled for the GPU: every dtype, model widths and row counts
from decode to prefill, against float64.

Each error (y, h and the gradients of x, the weight and the residual, taken through both
outputs) must be within the dtype's bound and no worse than twice eager's own error against the
same float64 reference.
"""
from __future__ import annotations

import pytest
import torch

from glu_fusion import reference
from glu_fusion.ops import rms_norm as op_module
from glu_fusion.functional import rms_norm as rms_norm_api

from helpers.rms_norm_cases import EPS, SPELLINGS, TOLERANCE, rel_error

pytestmark = [pytest.mark.gpu,
              pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")]

SPELLING = {s.name: s for s in SPELLINGS}


def _eager(spelling, x, w, r):
    h = x + r if r is not None else x
    return spelling.fn(h, w, EPS), h


def check(dtype, d, rows, spelling_name="hf_llama", residual=True):
    torch.manual_seed(d + rows)
    spelling = SPELLING[spelling_name]
    offset = spelling.kwargs.get("weight_offset", 0.0)
    x = torch.randn(rows, d, device="cuda", dtype=dtype, requires_grad=True)
    r = torch.randn(rows, d, device="cuda", dtype=dtype, requires_grad=True) if residual else None
    w = (0.1 * torch.randn(d, device="cuda") + (0.0 if offset else 1.0)).to(dtype).requires_grad_()
    leaves = [t for t in (x, w, r) if t is not None]
    dy = torch.randn(rows, d, device="cuda", dtype=dtype)
    dh = torch.randn_like(dy)

    def grads(run, ls):
        y, h = run(*ls)
        outs, gouts = ([y, h], [dy, dh]) if residual else ([y], [dy])
        return (y, h) + torch.autograd.grad(outs, ls, [g.to(y.dtype) for g in gouts])

    ours = grads(lambda x, w, *r: rms_norm_api(x, w, EPS, r[0] if r else None, **spelling.kwargs), leaves)
    eager_leaves = [t.detach().clone().requires_grad_() for t in leaves]
    eager = grads(lambda x, w, *r: _eager(spelling, x, w, r[0] if r else None), eager_leaves)
    ref_leaves = [t.detach().double().requires_grad_() for t in leaves]
    ref = grads(lambda x, w, *r: reference.rms_norm(x, w, r[0] if r else None, EPS, offset)[:2], ref_leaves)
    tol = TOLERANCE[dtype]
    names = ["y", "h", "dx", "dw", "dres"]
    for name, o, e, f in zip(names, ours, eager, ref):
        err, eager_err = rel_error(o, f), rel_error(e, f)
        assert err < tol and err <= max(2 * eager_err, tol / 4), \
            f"{name}: ours {err:.3e}, eager {eager_err:.3e}, bound {tol}"


@pytest.mark.parametrize("rows", [1, 7, 32, 65, 4099, 16384])
@pytest.mark.parametrize("d", [128, 1000, 2048, 4096, 8192])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32], ids=str)
def test_against_float64_and_eager(dtype, d, rows):
    check(dtype, d, rows)


@pytest.mark.parametrize("spelling", sorted(SPELLING))
@pytest.mark.parametrize("residual", [False, True])
@pytest.mark.parametrize("rows", [3, 2048])
def test_spellings(spelling, residual, rows):
    check(torch.bfloat16, 2048, rows, spelling, residual)


@pytest.mark.parametrize("rows", [1, 64, 65, 131072])
def test_both_launches_give_the_same_result(rows, monkeypatch):
    """The one-row-per-program launch and the tiled one agree (their sums may be ordered
    differently: within one bf16 rounding)."""
    x = torch.randn(rows, 4096, device="cuda", dtype=torch.bfloat16)
    r, w = torch.randn_like(x), torch.randn(4096, device="cuda", dtype=torch.bfloat16)
    results = []
    for limit in (0, 1 << 30):
        monkeypatch.setattr(op_module, "DECODE_MAX_ROWS", limit)
        results.append(rms_norm_api(x, w, EPS, r, downcast="before_weight"))
    for a, b in zip(*results):
        torch.testing.assert_close(a, b, rtol=2 ** -7, atol=1e-5)


def test_wide_rows():
    check(torch.bfloat16, 16384, 1024)
    check(torch.bfloat16, 40000, 8)   # wider than one tile: the reference path


def test_weight_gradient_is_deterministic():
    x = torch.randn(65536, 4096, device="cuda", dtype=torch.bfloat16)
    w = torch.randn(4096, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    y, _ = rms_norm_api(x, w, EPS)
    dy = torch.randn_like(y)
    first = torch.autograd.grad(y, w, dy, retain_graph=True)[0]
    assert torch.equal(first, torch.autograd.grad(y, w, dy)[0])


@pytest.mark.parametrize("dynamic", [False, True])
def test_compiled_decoder_slice_through_the_pass(dynamic, monkeypatch):
    """The HF Llama residual + norm compiled with our backend on the GPU (the rewrite switched on
    for CUDA): rewritten once, and forward and gradients as close to float64 as eager's."""
    import glu_fusion
    from glu_fusion.compile.report import REPORT
    from glu_fusion.patterns import rms_norm as family
    from helpers.rms_norm_cases import hf_llama

    monkeypatch.setattr(family, "REWRITE_DEVICE_TYPES", ("cuda",))

    def fn(x, r, w):
        h = r + x
        return hf_llama(h, w, EPS), h

    torch._dynamo.reset()
    REPORT.reset()
    compiled = torch.compile(fn, backend=glu_fusion.backend, dynamic=dynamic)
    for rows in (4, 4099):
        torch.manual_seed(rows)
        x = torch.randn(rows, 2048, device="cuda", dtype=torch.bfloat16, requires_grad=True)
        r = torch.randn_like(x, requires_grad=True)
        w = (1 + 0.1 * torch.randn(2048, device="cuda")).to(torch.bfloat16).requires_grad_()
        gouts = (torch.randn_like(x), torch.randn_like(x))
        got = compiled(x, r, w)
        got_grads = torch.autograd.grad(got, (x, r, w), gouts)
        leaves = [t.detach().double().requires_grad_() for t in (x, r, w)]
        exp = fn(*leaves)
        exp_grads = torch.autograd.grad(exp, leaves, [g.double() for g in gouts])
        for a, b in zip(list(got) + list(got_grads), list(exp) + list(exp_grads)):
            assert rel_error(a, b) < TOLERANCE[torch.bfloat16]
    assert REPORT.counts().get("rms_norm", 0) >= 1
