"""The RMSNorm (+ residual) Triton kernels through Triton's CPU interpreter (fp32, fp16).

Both launches are covered: one row per program (decode-sized calls) and multi-row tiles.
bf16 runs on the GPU (tests/test_gpu_rms_norm.py).
"""
from __future__ import annotations

import pytest
import torch

from glu_fusion import reference
from glu_fusion.ops import rms_norm as op_module
from glu_fusion.functional import rms_norm as rms_norm_api

from helpers.rms_norm_cases import EPS, SPELLINGS, TOLERANCE, check_against_float64, make_inputs
from helpers.norm_cases import ulps

pytestmark = pytest.mark.skipif(torch.cuda.is_available(),
                                reason="CUDA present: tests/test_gpu_rms_norm.py runs these kernels compiled")


@pytest.fixture(autouse=True)
def interpreter(monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    _interpretable_kernels()
    torch.manual_seed(2468)
    yield


def _interpretable_kernels():
    """(Re-)import the kernels module under the interpreter (``@triton.jit`` reads
    ``TRITON_INTERPRET`` when it decorates)."""
    import importlib
    import sys
    name = "glu_fusion.kernels.norms.rms_norm"
    module = sys.modules.get(name) or importlib.import_module(name)
    if type(module.rms_norm_fwd_kernel).__name__ != "InterpretedFunction":
        importlib.reload(module)


def _kernels():
    from glu_fusion.kernels.norms import rms_norm as kernels
    return kernels


@pytest.mark.parametrize("launch,rows,d", [("per_row", 1, 40), ("per_row", 7, 100), ("tiled", 5, 40),
                                           ("tiled", 37, 100)])
@pytest.mark.parametrize("offset", [False, True], ids=["w", "1+w"])
@pytest.mark.parametrize("residual", [False, True], ids=["plain", "residual"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=str)
def test_forward_and_gradients_against_float64(dtype, residual, offset, rows, d, launch, monkeypatch):
    monkeypatch.setattr(op_module, "DECODE_MAX_ROWS", 64 if launch == "per_row" else 0)
    x, r, w = make_inputs(rows, d, dtype, residual, offset)
    check_against_float64(x, r, w, dict(weight_offset=1.0 if offset else 0.0), TOLERANCE[dtype])


@pytest.mark.parametrize("downcast", ["none", "before_weight", "after_weight"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=str)
def test_downcast_modes_against_float64(dtype, downcast):
    x, r, w = make_inputs(9, 48, dtype, True, False, lead=(3, 3))  # 9 rows: one row per program
    check_against_float64(x, r, w, dict(downcast=downcast), TOLERANCE[dtype])


@pytest.mark.parametrize("spelling", SPELLINGS, ids=lambda s: s.name)
@pytest.mark.parametrize("residual", [False, True], ids=["plain", "residual"])
def test_eager_spellings_within_one_rounding(spelling, residual):
    """fp16, the same rounding points as eager: at most one unit in the last place apart."""
    x, r = torch.randn(21, 64).half(), torch.randn(21, 64).half()
    offset = spelling.kwargs.get("weight_offset", 0.0)
    w = (0.1 * torch.randn(64) + (0.0 if offset else 1.0)).half()
    y, h = rms_norm_api(x, w, EPS, r if residual else None, **spelling.kwargs)
    h_eager = x + r if residual else x
    assert torch.equal(h, h_eager)
    assert ulps(y, spelling.fn(h_eager, w, EPS)) <= 1.0


@pytest.mark.parametrize("per_row", [True, False])
def test_kernels_write_every_output_element(per_row):
    """Outputs are poisoned with NaN before each kernel: every element must be overwritten."""
    k = _kernels()
    m, d = 37, 100
    x, r, w = torch.randn(m, d), torch.randn(m, d), torch.randn(d)
    y, h, rstd = torch.full((m, d), float("nan")), torch.full((m, d), float("nan")), torch.full((m,), float("nan"))
    k.rms_norm_forward(x, w, r, y, h, rstd, EPS, 0.0, False, False, False, per_row)
    y_ref, h_ref, rstd_ref = reference.rms_norm(x, w, r, EPS)
    torch.testing.assert_close(h, h_ref, rtol=0, atol=0)
    torch.testing.assert_close(y, y_ref, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(rstd, rstd_ref, rtol=1e-6, atol=0)
    dy, dh = torch.randn(m, d), torch.randn(m, d)
    dx = torch.full((m, d), float("nan"))
    dw = k.rms_norm_backward(dy, dh, h, w, rstd, dx, True, 0.0)
    dx_ref, dw_ref = reference.rms_norm_backward(dy, dh, h_ref, w, rstd_ref, 0.0)
    torch.testing.assert_close(dx, dx_ref, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(dw, dw_ref, rtol=1e-4, atol=1e-5)


def test_weight_gradient_is_deterministic():
    x, r, w = make_inputs(70, 64, torch.float32, True, False)
    y, _ = rms_norm_api(x, w, EPS, r)
    dy = torch.randn_like(y)
    first = torch.autograd.grad(y, w, dy, retain_graph=True)[0]
    assert torch.equal(first, torch.autograd.grad(y, w, dy)[0])


def test_strided_rows_are_read_in_place():
    """x and the residual as column slices of wider tensors: read with their row stride."""
    k = _kernels()
    packed = torch.randn(2, 6, 3 * 32)
    x, r = packed[..., :32], packed[..., 64:]
    assert k.row_stride(x) == 96 and k.row_stride(r) == 96
    w = torch.randn(32, requires_grad=True)
    xs, rs = x.clone().requires_grad_(), r.clone().requires_grad_()
    y, h = rms_norm_api(x, w, EPS, r)
    y_ref, h_ref = rms_norm_api(xs, w, EPS, rs)
    torch.testing.assert_close(y, y_ref, rtol=0, atol=0)
    torch.testing.assert_close(h, h_ref, rtol=0, atol=0)
    dy = torch.randn(6, 2, 32).transpose(0, 1)                    # a gradient that needs a copy
    torch.testing.assert_close(torch.autograd.grad(y, w, dy)[0], torch.autograd.grad(y_ref, w, dy)[0])


@pytest.mark.parametrize("lead", [(0,), (1,), (4, 0)])
def test_empty_and_single_rows(lead):
    x, r, w = make_inputs(1, 40, torch.float32, True, False, lead=lead)
    y, h = rms_norm_api(x, w, EPS, r)
    assert y.shape == x.shape and h.shape == x.shape
    (y.sum() + h.sum()).backward()
    assert w.grad.shape == (40,) and x.grad.shape == x.shape and r.grad.shape == x.shape


def test_wide_rows_fall_back_to_reference():
    k = _kernels()
    x, r, w = make_inputs(2, 2 * k.MAX_D, torch.float32, True, False)
    check_against_float64(x, r, w, {}, TOLERANCE[torch.float32])


def test_only_the_h_output_used():
    """The next residual uses h while y is dropped: the gradient flows through h only."""
    x, r, w = make_inputs(5, 32, torch.float32, True, False)
    _, h = rms_norm_api(x, w, EPS, r)
    dh = torch.randn_like(h)
    gx, gr = torch.autograd.grad(h, (x, r), dh)
    torch.testing.assert_close(gx, dh, rtol=0, atol=0)
    torch.testing.assert_close(gr, dh, rtol=0, atol=0)
