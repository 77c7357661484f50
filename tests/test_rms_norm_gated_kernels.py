"""The gated RMSNorm Triton kernels through Triton's CPU interpreter (fp32, fp16).

The interpreter is on while these tests run (``TRITON_INTERPRET=1``); the kernels module is
first imported under it.  bf16 runs on the GPU (tests/test_gpu_rms_norm_gated.py).
"""
from __future__ import annotations

import pytest
import torch

from glu_fusion import reference
from glu_fusion.functional import rms_norm_gated as rms_norm_gated_api

from helpers.norm_cases import (EPS, SPELLINGS, TOLERANCE, all_flag_sets, check_against_float64,
                                       flag_id, make_inputs, op_kwargs, ulps)

pytestmark = pytest.mark.skipif(torch.cuda.is_available(),
                                reason="CUDA present: tests/test_gpu_rms_norm_gated.py runs these kernels compiled")


@pytest.fixture(autouse=True)
def interpreter(monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    _interpretable_kernels()
    torch.manual_seed(4321)
    yield


def _interpretable_kernels():
    """Import (or re-import) the kernels module under the interpreter: ``@triton.jit`` reads
    ``TRITON_INTERPRET`` when it decorates, and another test may have imported it without."""
    import importlib
    import sys
    name = "glu_fusion.kernels.norms.rms_norm_gated"
    module = sys.modules.get(name) or importlib.import_module(name)
    if type(module.rms_norm_gated_fwd_kernel).__name__ != "InterpretedFunction":
        importlib.reload(module)


def _kernels():
    from glu_fusion.kernels.norms import rms_norm_gated as kernels
    return kernels


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("flags", all_flag_sets(), ids=flag_id)
def test_every_flag_combination_against_float64(flags, dtype):
    x, z, w, offset = make_inputs((19,), 48, dtype, flags["wmode"])
    check_against_float64(x, z, w, op_kwargs(flags, offset), TOLERANCE[dtype])


@pytest.mark.parametrize("dtype", [torch.float16])
@pytest.mark.parametrize("flags", all_flag_sets(), ids=flag_id)
def test_rounding_points_match_reference(flags, dtype):
    """Same flags, same dtype: the kernel lands within one rounding step of the reference
    (two where the flags put a rounding inside the computation)."""
    x, z, w, offset = make_inputs((23,), 64, dtype, flags["wmode"])
    kw = op_kwargs(flags, offset)
    got = rms_norm_gated_api(x, z, w, EPS, **kw)
    expected, _ = reference.rms_norm_gated(x.detach(), z.detach(), w, EPS, **kw)
    inner_rounding = flags["downcast"] != "none" or (flags["gate_in_input_dtype"] and not flags["norm_before_gate"])
    bound = 16.0 if dtype == torch.float32 else (2.0 if inner_rounding else 1.0)
    assert ulps(got, expected) <= bound


@pytest.mark.parametrize("spelling", SPELLINGS, ids=lambda s: s.name)
def test_eager_spellings_within_one_rounding(spelling):
    x, z = torch.randn(40, 64).half(), (2 * torch.randn(40, 64)).half()
    w = (0.1 * torch.randn(64) + (0.0 if spelling.kwargs["weight_offset"] else 1.0)).half()
    got = rms_norm_gated_api(x, z, w, EPS, **spelling.kwargs)
    assert ulps(got, spelling.fn(x, z, w, EPS)) <= 2.0


@pytest.mark.parametrize("lead,d,group", [((1,), 2, None), ((5,), 3, None), ((67,), 100, None),
                                          ((2, 7), 130, 65), ((9,), 257, None), ((3,), 1000, 250),
                                          ((33,), 96, 32), ((1,), 8192, None), ((2,), 8192, 1024)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_ragged_sizes(lead, d, group, dtype):
    for nbg in (True, False):
        x, z, w, _ = make_inputs(lead, d, dtype)
        check_against_float64(x, z, w, dict(group_size=group, norm_before_gate=nbg), TOLERANCE[dtype])


def test_kernels_write_every_output_element():
    """Outputs are poisoned with NaN before each kernel: every element must be overwritten."""
    k = _kernels()
    m, d, group = 37, 96, 32
    x, z, w = torch.randn(m, d), torch.randn(m, d), torch.randn(d)
    for nbg in (True, False):
        y = torch.full((m, d), float("nan"))
        rstd = torch.full((m, d // group), float("nan"))
        k.rms_norm_gated_forward(x, z, w, y, rstd, EPS, group, nbg, k.ACT_SILU, 0.0, False, False, False, False)
        y_ref, rstd_ref = reference.rms_norm_gated(x, z, w, EPS, group, nbg)
        assert torch.allclose(y, y_ref, rtol=1e-5, atol=1e-6)
        assert torch.allclose(rstd, rstd_ref, rtol=1e-6)
        dy = torch.randn(m, d)
        dx = torch.full((m, d), float("nan"))
        dz = torch.full((m, d), float("nan"))
        dw = k.rms_norm_gated_backward(dy, x, z, w, rstd, dx, dz, True, group, nbg, k.ACT_SILU, 0.0)
        dx_ref, dz_ref, dw_ref = reference.rms_norm_gated_backward(dy, x, z, w, rstd_ref, group, nbg, "silu", 0.0)
        for got, exp in ((dx, dx_ref), (dz, dz_ref), (dw, dw_ref)):
            assert torch.allclose(got, exp, rtol=1e-4, atol=1e-5)


def test_weight_gradient_is_deterministic():
    x, z, w, _ = make_inputs((301,), 64, torch.float32)
    dy = torch.randn(301, 64)
    y = rms_norm_gated_api(x, z, w, EPS)
    first = torch.autograd.grad(y, w, dy, retain_graph=True)[0]
    assert torch.equal(first, torch.autograd.grad(y, w, dy)[0])


def test_strided_views_are_read_in_place():
    """x and z as slices of a packed projection, with non-mergeable leading dims."""
    k = _kernels()
    b, t, d = 3, 5, 32
    packed = torch.randn(t, b, 3 * d)                           # [T, B, 3D]
    x = packed[..., :d].transpose(0, 1).requires_grad_(False)   # [B, T, D], strides (3D, B*3D, 1)
    z = packed[..., 2 * d:].transpose(0, 1)
    tensors, inner, strides = k.row_layout([x, z])
    assert tensors[0] is x and tensors[1] is z and inner == t
    w = torch.randn(d, requires_grad=True)
    xl, zl = x.clone().requires_grad_(), z.clone().requires_grad_()
    xs = x.detach().requires_grad_()
    y = rms_norm_gated_api(xs, z, w, EPS, group_size=8)
    y_ref = rms_norm_gated_api(xl, zl, w, EPS, group_size=8)
    assert torch.allclose(y, y_ref, rtol=1e-6, atol=1e-6)
    dy = torch.randn(t, b, d).transpose(0, 1)                   # a strided gradient too
    assert torch.allclose(torch.autograd.grad(y, xs, dy)[0], torch.autograd.grad(y_ref, xl, dy)[0],
                          rtol=1e-5, atol=1e-6)


def test_expanded_gradient():
    x, z, w, _ = make_inputs((6, 4), 32, torch.float32)
    check = rms_norm_gated_api(x, z, w, EPS)
    check.sum().backward()                                       # dy has stride 0 everywhere
    x64, z64, w64 = (t.detach().double().requires_grad_() for t in (x, z, w))
    reference.rms_norm_gated(x64, z64, w64, EPS)[0].sum().backward()
    for got, exp in ((x.grad, x64.grad), (z.grad, z64.grad), (w.grad, w64.grad)):
        assert torch.allclose(got.double(), exp, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("lead", [(0,), (1,), (4, 0)])
def test_empty_and_single_rows(lead):
    x, z, w, _ = make_inputs(lead, 40, torch.float32)
    check = rms_norm_gated_api(x, z, w, EPS, group_size=20)
    assert check.shape == x.shape
    check.sum().backward()
    assert w.grad.shape == (40,) and x.grad.shape == x.shape


def test_group_larger_than_kernel_tile_falls_back_to_reference():
    k = _kernels()
    d = 2 * k.MAX_GROUP
    x, z, w, _ = make_inputs((2,), d, torch.float32)
    check_against_float64(x, z, w, {}, TOLERANCE[torch.float32])


def test_compile_calls_the_kernels():
    torch._dynamo.reset()

    def fn(x, z, w):
        return rms_norm_gated_api(x, z, w, EPS, downcast="before_weight")

    compiled = torch.compile(fn, dynamic=True, fullgraph=True)
    for rows in (5, 17):
        x, z, w, _ = make_inputs((rows,), 64, torch.float16)
        y = compiled(x, z, w)
        assert torch.equal(y, fn(x, z, w))
        dy = torch.randn_like(y)
        got = torch.autograd.grad(y, (x, z, w), dy)
        y2 = fn(x, z, w)
        exp = torch.autograd.grad(y2, (x, z, w), dy)
        for a, b in zip(got, exp):
            assert torch.equal(a, b)
