"""The RMSNorm ops on the reference path: eager equality, gradcheck, opcheck, errors."""
from __future__ import annotations

import pytest
import torch

import glu_fusion.ops  # noqa: F401  (registers the ops named below)
from glu_fusion.functional import rms_norm as rms_norm_api

from helpers.rms_norm_cases import EPS, SPELLINGS, TOLERANCE, check_against_float64, make_inputs

OP = torch.ops.glu_fusion.rms_norm.default
BWD = torch.ops.glu_fusion.rms_norm_backward.default


@pytest.fixture(autouse=True)
def reference_path(monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    torch.manual_seed(11)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16], ids=str)
@pytest.mark.parametrize("spelling", SPELLINGS, ids=lambda s: s.name)
def test_reference_equals_eager_spelling_bitwise(spelling, dtype):
    x, r = torch.randn(4, 3, 64).to(dtype), torch.randn(4, 3, 64).to(dtype)
    offset = spelling.kwargs.get("weight_offset", 0.0)
    w = (0.1 * torch.randn(64) + (0.0 if offset else 1.0)).to(dtype)
    y, h = rms_norm_api(x, w, EPS, r, **spelling.kwargs)
    expected = spelling.fn(x + r, w, EPS)
    assert torch.equal(h, x + r)
    assert y.dtype == expected.dtype and torch.equal(y, expected)


def test_nn_rms_norm_default_eps_is_fp32_epsilon():
    """``nn.RMSNorm(eps=None)`` uses the fp32 machine epsilon for bf16 inputs too."""
    norm = torch.nn.RMSNorm(64).bfloat16()
    x = (1e-3 * torch.randn(8, 64)).bfloat16()
    y, _ = rms_norm_api(x, norm.weight, torch.finfo(torch.float32).eps, downcast="after_weight")
    assert torch.equal(y, norm(x))


def test_fp32_weight_with_bf16_input_is_not_rounded_after_the_weight():
    from helpers.rms_norm_cases import hf_llama
    x, w = torch.randn(4, 32).bfloat16(), torch.randn(32)
    assert torch.equal(rms_norm_api(x, w, EPS, downcast="before_weight")[0].float(),
                       hf_llama(x, w, EPS).to(torch.bfloat16).float())


@pytest.mark.parametrize("residual", [False, True])
@pytest.mark.parametrize("offset", [0.0, 1.0])
def test_gradcheck_float64(residual, offset):
    x, r, w = make_inputs(3, 16, torch.float64, residual, bool(offset))

    def fn(x, w, *r):
        y, h = rms_norm_api(x, w, EPS, r[0] if r else None, weight_offset=offset)
        return (y, h) if r else y

    assert torch.autograd.gradcheck(fn, (x, w) + ((r,) if residual else ()))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("residual", [False, True])
def test_reference_path_against_float64(dtype, residual):
    x, r, w = make_inputs(9, 48, dtype, residual, False)
    check_against_float64(x, r, w, dict(downcast="before_weight"), TOLERANCE[dtype])


@pytest.mark.parametrize("residual", [False, True])
def test_opcheck(residual):
    x, r, w = make_inputs(5, 32, torch.float32, residual, False)
    torch.library.opcheck(OP, (x, w, r, EPS, 0.0, "before_weight"))
    h = torch.randn(5, 32)
    rstd = torch.rand(5) + 0.5
    for dh, need_w in ((torch.randn(5, 32), True), (None, False)):
        torch.library.opcheck(BWD, (torch.randn(5, 32), dh, h, w.detach(), rstd, 1.0, need_w))


def test_compiled_op_equals_eager_op():
    import torch._dynamo
    torch._dynamo.reset()

    def fn(x, w, r):
        y, h = rms_norm_api(x, w, EPS, r, downcast="before_weight")
        return y * 2 + h

    x, r, w = make_inputs(6, 32, torch.bfloat16, True, False)
    got = torch.compile(fn, fullgraph=True)(x, w, r)
    expected = fn(x, w, r)
    torch.testing.assert_close(got, expected, rtol=0, atol=0)
    dy = torch.randn_like(got)
    for a, b in zip(torch.autograd.grad(got, (x, w, r), dy), torch.autograd.grad(expected, (x, w, r), dy)):
        torch.testing.assert_close(a, b)


@pytest.mark.parametrize("bad,error", [
    (dict(w=torch.ones(31)), ValueError),
    (dict(r=torch.ones(5, 31)), ValueError),
    (dict(r=torch.ones(5, 32, dtype=torch.float16)), TypeError),
    (dict(downcast="sometimes"), ValueError),
    (dict(eps=-1.0), ValueError),
])
def test_bad_arguments_raise(bad, error):
    x = torch.randn(5, 32)
    args = dict(w=torch.ones(32), r=None, downcast="none", eps=EPS)
    args.update(bad)
    with pytest.raises(error):
        rms_norm_api(x, args["w"], args["eps"], args["r"], downcast=args["downcast"])
