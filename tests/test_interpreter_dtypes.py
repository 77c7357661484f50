"""Every public function, every kernel dtype, on the CPU path the conftest sets up (Triton's
interpreter): forward and every gradient against float64.

Triton's interpreter computes a bf16 ``tl.dot`` wrongly (values near 1e20), so bf16 GEMM ops
must not reach it; whatever the ops choose instead, the numbers must be right.
"""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

import glu_fusion
from glu_fusion import grouped_reference

pytestmark = pytest.mark.skipif(torch.cuda.is_available(), reason="the CPU path (Triton's interpreter) is CI's")

# bf16: 8 bits of mantissa, rounded at each op boundary as eager does
TOLERANCE = {torch.float32: 1e-4, torch.float16: 5e-3, torch.bfloat16: 3e-2}
DTYPES = sorted(TOLERANCE, key=str)


def _leaf(*shape, dtype, scale=1.0):
    return (torch.randn(*shape) * scale).to(dtype).requires_grad_()


def _swiglu64(x, wg, wu):
    return F.silu(x @ wg.t()) * (x @ wu.t())


def _grouped64(x, offsets, wg, wu):
    g, u = grouped_reference.grouped_preact(x, offsets, wg, wu, None, None)
    return grouped_reference.gate(g, u, "silu", 0.0, 0.0)


def _rms64(x, w):
    return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + 1e-6) * w


def _gated64(x, z, w):
    return _rms64(x, w) * F.silu(z)


CASES = {
    "swiglu": (lambda x, wg, wu: glu_fusion.swiglu(x, wg, wu), _swiglu64,
               lambda dt: (_leaf(12, 32, dtype=dt), _leaf(24, 32, dtype=dt, scale=0.2), _leaf(24, 32, dtype=dt, scale=0.2))),
    "mlp_block": (lambda x, wg, wu, wd: glu_fusion.mlp_block(x, wg, wu, wd),
                  lambda x, wg, wu, wd: _swiglu64(x, wg, wu) @ wd.t(),
                  lambda dt: (_leaf(12, 32, dtype=dt), _leaf(24, 32, dtype=dt, scale=0.2),
                              _leaf(24, 32, dtype=dt, scale=0.2), _leaf(32, 24, dtype=dt, scale=0.2))),
    "grouped_swiglu": (lambda x, wg, wu: glu_fusion.grouped_swiglu(x, OFFSETS, wg, wu),
                       lambda x, wg, wu: _grouped64(x, OFFSETS, wg, wu),
                       lambda dt: (_leaf(11, 32, dtype=dt), _leaf(3, 16, 32, dtype=dt, scale=0.2),
                                   _leaf(3, 16, 32, dtype=dt, scale=0.2))),
    "rms_norm": (lambda x, w: glu_fusion.rms_norm(x, w)[0], _rms64,
                 lambda dt: (_leaf(12, 64, dtype=dt), _leaf(64, dtype=dt))),
    "rms_norm_gated": (lambda x, z, w: glu_fusion.rms_norm_gated(x, z, w), _gated64,
                       lambda dt: (_leaf(12, 64, dtype=dt), _leaf(12, 64, dtype=dt), _leaf(64, dtype=dt))),
}
OFFSETS = torch.tensor([4, 4, 11], dtype=torch.int32)


def _rel(got, want):
    return ((got.double() - want).norm() / want.norm()).item()


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("name", sorted(CASES))
def test_cpu_path_is_right_in_every_dtype(name, dtype):
    torch.manual_seed(0)
    ours_fn, ref_fn, make = CASES[name]
    leaves = make(dtype)
    out = ours_fn(*leaves)
    assert out.dtype == dtype
    dout = torch.randn_like(out)
    grads = torch.autograd.grad(out, leaves, dout)
    leaves64 = [t.detach().double().requires_grad_() for t in leaves]
    want = ref_fn(*leaves64)
    want_grads = torch.autograd.grad(want, leaves64, dout.double())
    for what, got, ref in zip(("out", *(f"grad {i}" for i in range(len(leaves)))), (out, *grads), (want, *want_grads)):
        assert torch.isfinite(got).all(), f"{name} {what}: not finite"
        assert _rel(got, ref) < TOLERANCE[dtype], f"{name} {what}: relative error {_rel(got, ref):.3g}"
