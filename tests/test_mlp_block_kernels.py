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


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("m,r,k,splits", [(100, 48, 40, None), (37, 16, 24, 1), (130, 40, 17 * 8, 3),
                                          (5, 24, 16, 2), (0, 16, 16, None)])
@pytest.mark.parametrize("bias", [False, True])
def test_weight_grad_gemm_with_token_splits(dtype, m, r, k, splits, bias):
    from glu_fusion.kernels.weight_grad_tma import weight_grad
    dh = torch.randn(m, r, dtype=dtype)
    x = torch.randn(m, k, dtype=dtype)
    dw = torch.full((r, k), float("nan"), dtype=dtype)
    db = torch.full((r,), float("nan"), dtype=dtype) if bias else None
    weight_grad(dh, x, dw, db, allow_tf32=False, splits=splits)
    want = dh.double().t() @ x.double()
    assert torch.isfinite(dw).all()
    if m:
        assert _rel(dw, want) < TOLERANCE[dtype]
        if bias:
            assert _rel(db, dh.double().sum(0)) < TOLERANCE[dtype]
    else:
        assert (dw == 0).all() and (not bias or (db == 0).all())


def test_token_splits_fill_two_waves_only_when_tiles_do_not():
    from glu_fusion.kernels.weight_grad_tma import token_splits
    assert token_splits(16384, 224 * 32, 64, 132) == 1       # 4096→14336: tiles fill the GPU
    assert token_splits(16384, 12 * 16, 64, 132) == 2        # 192 tiles: under two waves
    assert token_splits(16384, 8, 64, 132) == 8              # a narrow expert: capped
    assert token_splits(256, 8, 64, 132) == 1                # too few tokens to split


@pytest.mark.parametrize("subtiles", [1, 2, 4])
@pytest.mark.parametrize("w_transposed", [False, True])
def test_dgated_epilogue_slices_and_weight_layouts(subtiles, w_transposed):
    """Every epilogue slicing and both weight layouts write the same gradients."""
    from glu_fusion.kernels.mlp_dgated import mlp_dgated
    m, d, n = 45, 40, 72
    dout = torch.randn(m, d)
    w_down = torch.randn(d, n) * d ** -0.5
    preact = torch.randn(m, 2 * n)
    g, u = preact[:, :n], preact[:, n:]
    dh = torch.full((m, 2 * n), float("nan"))
    h = torch.full((m, n), float("nan"))
    meta = dict(BLOCK_M=16, BLOCK_N=32, BLOCK_K=16, GROUP_M=4, SUBTILES=subtiles, FLATTEN=False,
                W_TRANSPOSED=w_transposed)
    weight = w_down.t().contiguous() if w_transposed else w_down
    mlp_dgated(dout, weight, g, u, dh[:, :n], dh[:, n:], h, allow_tf32=False, meta=meta)
    d_g, d_u, h64 = _expected(dout, w_down, g, u)
    assert _rel(dh[:, :n], d_g) < 1e-5 and _rel(dh[:, n:], d_u) < 1e-5 and _rel(h, h64) < 1e-5
