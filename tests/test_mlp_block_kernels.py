"""The MLP block's backward GEMM (``dOut·Wd`` with the SwiGLU backward in its epilogue) through
Triton's CPU interpreter, against float64.

fp32 and fp16 only: the interpreter's bf16 ``tl.dot`` is wrong; bf16 runs in the GPU tests.
"""
from __future__ import annotations

import pytest
import torch

pytestmark = pytest.mark.skipif(torch.cuda.is_available(),
                                reason="CUDA present: the GPU tests run this kernel compiled")

TOLERANCE = {torch.float32: 1e-5, torch.float16: 4e-3}


@pytest.fixture(autouse=True)
def interpreter(monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    torch.manual_seed(4321)


def _expected(dout, w_down, g, u):
    """float64 gradients with the GEMM output rounded to the input dtype, as eager rounds it."""
    dh = (dout.double() @ w_down.double()).to(dout.dtype).double()
    gf, uf = g.double(), u.double()
    sig = torch.sigmoid(gf)
    return dh * uf * sig * (1 + gf * (1 - sig)), dh * gf * sig, gf * sig * uf


def _rel(a, b):
    return ((a.double() - b).norm() / b.norm().clamp_min(1e-30)).item()


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("m,d,n", [(33, 40, 24), (1, 16, 16), (50, 17 * 8, 40), (16, 8, 8)])
def test_dgated_writes_gradients_and_h(dtype, m, d, n):
    from glu_fusion.kernels.mlp_dgated import mlp_dgated
    dout = torch.randn(m, d, dtype=dtype)
    w_down = (torch.randn(d, n) * d ** -0.5).to(dtype)
    preact = torch.randn(m, 2 * n, dtype=dtype)
    g, u = preact[:, :n], preact[:, n:]
    dh = torch.full((m, 2 * n), float("nan"), dtype=dtype)
    h = torch.full((m, n), float("nan"), dtype=dtype)
    mlp_dgated(dout, w_down, g, u, dh[:, :n], dh[:, n:], h, allow_tf32=False)
    d_g, d_u, h64 = _expected(dout, w_down, g, u)
    tol = TOLERANCE[dtype]
    assert _rel(dh[:, :n], d_g) < tol and _rel(dh[:, n:], d_u) < tol and _rel(h, h64) < tol


def test_dgated_overwrites_preactivations_in_place():
    """dG and dU may take the memory of g and u: every tile reads its inputs before writing."""
    from glu_fusion.kernels.mlp_dgated import mlp_dgated
    m, d, n = 37, 24, 40
    dout = torch.randn(m, d)
    w_down = torch.randn(d, n) * d ** -0.5
    preact = torch.randn(m, 2 * n)
    d_g, d_u, _ = _expected(dout, w_down, preact[:, :n].clone(), preact[:, n:].clone())
    g, u = preact[:, :n], preact[:, n:]
    mlp_dgated(dout, w_down, g, u, g, u, None, allow_tf32=False)
    assert _rel(preact[:, :n], d_g) < 1e-5 and _rel(preact[:, n:], d_u) < 1e-5
