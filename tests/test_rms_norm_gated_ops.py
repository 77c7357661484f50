"""The gated RMSNorm ops on the reference path: eager equality, gradcheck, opcheck, compile, errors."""
from __future__ import annotations

import pytest
import torch

from glu_fusion.functional import rms_norm_gated as rms_norm_gated_api

from helpers.norm_cases import (EPS, SPELLINGS, TOLERANCE, all_flag_sets, check_against_float64,
                                       flag_id, make_inputs, op_kwargs)

OP = torch.ops.glu_fusion.rms_norm_gated.default
BWD = torch.ops.glu_fusion.rms_norm_gated_backward.default


@pytest.fixture(autouse=True)
def reference_path(monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    torch.manual_seed(7)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("spelling", SPELLINGS, ids=lambda s: s.name)
def test_reference_equals_eager_spelling_bitwise(spelling, dtype):
    x = torch.randn(6, 5, 64).to(dtype)
    z = (2 * torch.randn(6, 5, 64)).to(dtype)
    w = (0.1 * torch.randn(64) + (0.0 if spelling.kwargs["weight_offset"] else 1.0)).to(dtype)
    expected = spelling.fn(x, z, w, EPS)
    got = rms_norm_gated_api(x, z, w, EPS, **spelling.kwargs)
    assert got.dtype == expected.dtype
    assert torch.equal(got, expected), (got - expected).abs().max()


def test_fp32_weight_with_bf16_input_follows_type_promotion():
    """HF spelling with an fp32 master weight: the weight product stays fp32 (no rounding)."""
    from helpers.norm_cases import hf_qwen3_next
    x, z = torch.randn(4, 32).bfloat16(), torch.randn(4, 32).bfloat16()
    w = torch.randn(32)
    got = rms_norm_gated_api(x, z, w, EPS, downcast="before_weight")
    assert torch.equal(got, hf_qwen3_next(x, z, w, EPS))


@pytest.mark.parametrize("flags", [f for f in all_flag_sets() if not f["gate_in_input_dtype"]
                                   and f["downcast"] == "none"], ids=flag_id)
def test_gradcheck_float64(flags):
    x, z, w, offset = make_inputs((3,), 32, torch.float64, flags["wmode"])
    kw = op_kwargs(flags, offset)
    leaves = (x, z) + ((w,) if w is not None else ())

    def fn(*ls):
        return rms_norm_gated_api(ls[0], ls[1], ls[2] if len(ls) > 2 else None, EPS, **kw)

    assert torch.autograd.gradcheck(fn, leaves)


@pytest.mark.parametrize("flags", all_flag_sets()[::5], ids=flag_id)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_reference_path_against_float64(flags, dtype):
    x, z, w, offset = make_inputs((2, 9), 48, dtype, flags["wmode"])
    check_against_float64(x, z, w, op_kwargs(flags, offset), TOLERANCE[dtype])


@pytest.mark.parametrize("group,nbg,act,wmode", [(None, True, "silu", "plain"), (8, False, "sigmoid", "offset"),
                                                 (None, False, "silu", "none")])
def test_opcheck(group, nbg, act, wmode):
    x, z, w, offset = make_inputs((5,), 32, torch.float32, wmode)
    args = (x, z, w, EPS, group, nbg, act, offset, "before_weight", False)
    torch.library.opcheck(OP, args)
    n_groups = 32 // (group or 32)
    rstd = torch.rand(5, n_groups) + 0.5
    for needs in ((True, True, True), (False, True, False), (True, False, True)):
        torch.library.opcheck(BWD, (torch.randn(5, 32), x.detach(), z.detach(), w.detach() if w is not None
                                     else None, rstd, group, nbg, act, offset, *needs))


def test_only_needed_gradients_are_computed():
    x, z, w, _ = make_inputs((4,), 16, torch.float32)
    dy = torch.randn(4, 16)
    rstd = torch.rand(4, 1) + 0.5
    dx, dz, dw = BWD(dy, x.detach(), z.detach(), w.detach(), rstd, None, True, "silu", 0.0, False, True, False)
    assert dx.numel() == 0 and dz.shape == (4, 16) and dw.numel() == 0
    z2 = z.detach().requires_grad_()
    y = rms_norm_gated_api(x.detach(), z2, w.detach(), EPS)
    (gz,) = torch.autograd.grad(y, z2, dy)
    assert gz.shape == z2.shape


def test_autocast_leaves_dtypes_alone():
    """Eager gated norms have no autocast-listed op: the fused op must not cast either."""
    x, z, w, _ = make_inputs((4,), 32, torch.float32)
    ref = rms_norm_gated_api(x, z, w, EPS)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        got = rms_norm_gated_api(x, z, w, EPS)
    assert got.dtype == torch.float32 and torch.equal(got, ref)


@pytest.mark.parametrize("lead", [(0,), (1,), (0, 3), (1, 1)])
def test_empty_and_single_rows(lead):
    x, z, w, _ = make_inputs(lead, 24, torch.float32)
    y = rms_norm_gated_api(x, z, w, EPS, group_size=8)
    assert y.shape == x.shape
    y.sum().backward()
    assert x.grad.shape == x.shape and w.grad.shape == w.shape
    if x.numel() == 0:
        assert torch.equal(w.grad, torch.zeros_like(w))


def test_compile_dynamic_shapes():
    torch._dynamo.reset()

    def fn(x, z, w):
        return rms_norm_gated_api(x, z, w, EPS, group_size=8, norm_before_gate=False, activation="sigmoid")

    compiled = torch.compile(fn, dynamic=True, fullgraph=True)
    for rows in (3, 11):
        x, z, w, _ = make_inputs((rows,), 32, torch.float32)
        y = compiled(x, z, w)
        y_ref = fn(x, z, w)
        assert torch.allclose(y, y_ref, rtol=1e-6, atol=1e-6)
        dy = torch.randn_like(y)
        g = torch.autograd.grad(y, (x, z, w), dy)
        g_ref = torch.autograd.grad(y_ref, (x, z, w), dy)
        for a, b in zip(g, g_ref):
            assert torch.allclose(a, b, rtol=1e-5, atol=1e-6)


def _bad(**over):
    args = dict(x=torch.randn(3, 8), z=torch.randn(3, 8), weight=torch.randn(8), eps=EPS, group_size=None,
                norm_before_gate=True, activation="silu")
    args.update(over)
    return args


@pytest.mark.parametrize("args,exc,match", [
    (_bad(z=torch.randn(3, 4)), ValueError, "z has shape"),
    (_bad(z=torch.randn(3, 8).double()), TypeError, "z has dtype"),
    (_bad(weight=torch.randn(4)), ValueError, "weight must have shape"),
    (_bad(weight=torch.randn(8).double()), TypeError, "weight has dtype"),
    (_bad(group_size=3), ValueError, "group_size=3"),
    (_bad(group_size=0), ValueError, "group_size=0"),
    (_bad(activation="gelu"), ValueError, "activation must be one of"),
    (_bad(eps=-1.0), ValueError, "eps must be"),
    (_bad(x=torch.randint(0, 3, (3, 8)), z=torch.randint(0, 3, (3, 8))), TypeError, "x has dtype"),
], ids=["z-shape", "z-dtype", "w-shape", "w-dtype", "group", "group0", "act", "eps", "int"])
def test_bad_input_errors(args, exc, match):
    with pytest.raises(exc, match=match):
        rms_norm_gated_api(**args)


def test_bad_downcast_error():
    with pytest.raises(ValueError, match="downcast must be one of"):
        rms_norm_gated_api(torch.randn(2, 4), torch.randn(2, 4), downcast="late")
