"""The portable SwiGLU Triton kernels (pointer and TMA forward, gate, gate-grad) and the ops'
backward through Triton's CPU interpreter, against float64.

The interpreter is switched on for these tests only (``TRITON_INTERPRET=1`` while they run);
the kernels module is imported under it, so its ``@triton.jit`` functions are interpretable.
fp32 and fp16 only: the interpreter's bf16 ``tl.dot`` is wrong; bf16 is tested on the GPU.
"""
from __future__ import annotations

import pytest
import torch

from helpers.swiglu_cases import ALL_LAYOUTS, TOLERANCE, check_against_float64, make_problem, rel_error

pytestmark = pytest.mark.skipif(torch.cuda.is_available(),
                                reason="CUDA present: tests/test_gpu_swiglu.py runs these kernels compiled")


@pytest.fixture(autouse=True)
def interpreter(monkeypatch):
    """Kernels through the interpreter."""
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    torch.manual_seed(1234)
    yield


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("layout", ALL_LAYOUTS)
@pytest.mark.parametrize("bias", [False, True])
def test_layouts_forward_and_grads(layout, dtype, bias):
    problem = make_problem(layout, (33,), 48, 40, dtype, bias)
    check_against_float64(problem, TOLERANCE[dtype])


@pytest.mark.parametrize("lead,k,n", [((1,), 48, 24), ((7,), 100, 40), ((2, 5), 100, 24), ((33,), 17, 3)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_ragged_sizes(lead, k, n, dtype):
    check_against_float64(make_problem("separate", lead, k, n, dtype, bias=True), TOLERANCE[dtype])


def _kernel_inputs(m, k, n, dtype):
    x = torch.randn(m, k, dtype=dtype)
    wg = (torch.randn(n, k) * k ** -0.5).to(dtype)
    wu = (torch.randn(n, k) * k ** -0.5).to(dtype)
    bg, bu = torch.randn(n).to(dtype), torch.randn(n).to(dtype)
    return x, wg, wu, bg, bu


def _check_forward_writes_every_element(launch, m, k, n):
    """Run a forward launcher on NaN-poisoned outputs; return its inputs and pre-activations."""
    x, wg, wu, bg, bu = _kernel_inputs(m, k, n, torch.float32)
    out = torch.full((m, n), float("nan"))
    pre = torch.full((m, 2 * n), float("nan"))
    launch(x, wg, wu, bg, bu, out, pre, allow_tf32=False)
    g64 = x.double() @ wg.double().T + bg.double()
    u64 = x.double() @ wu.double().T + bu.double()
    assert rel_error(pre[:, :n], g64) < 1e-5 and rel_error(pre[:, n:], u64) < 1e-5
    assert rel_error(out, torch.nn.functional.silu(g64) * u64) < 1e-5
    return (x, wg, wu), pre


def _gate_grads64(dout, g, u):
    """float64 (dG, dU, h) of ``silu(g)·u``."""
    gf, uf = g.double(), u.double()
    sig = torch.sigmoid(gf)
    return dout.double() * uf * sig * (1 + gf * (1 - sig)), dout.double() * gf * sig, gf * sig * uf


def test_kernels_write_every_output_element():
    """Outputs are poisoned with NaN before each kernel: every element must be overwritten."""
    from glu_fusion.kernels.portable.swiglu_fwd import swiglu_forward
    from glu_fusion.kernels.portable.swiglu_gate_grad import swiglu_gate_grad

    m, k, n = 37, 50, 29
    _, pre = _check_forward_writes_every_element(swiglu_forward, m, k, n)

    dout = torch.randn(m, n)
    g, u = pre[:, :n], pre[:, n:]
    d_g, d_u, h = (torch.full((m, n), float("nan")) for _ in range(3))
    swiglu_gate_grad(dout, g, u, d_g, d_u, h)
    for got, want in zip((d_g, d_u, h), _gate_grads64(dout, g, u)):
        assert rel_error(got, want) < 1e-5


def test_gate_grad_writes_interleaved_columns_and_over_its_inputs():
    """dG and dU land in the interleaved columns of a packed dH, or over g and u themselves."""
    from glu_fusion.kernels.portable.swiglu_gate_grad import swiglu_gate_grad

    m, n = 40, 16
    dout, preact = torch.randn(m, n), torch.randn(m, 2 * n)
    want_g, want_u, _ = _gate_grads64(dout, preact[:, :n], preact[:, n:])
    dh = torch.full((m, 2 * n), float("nan"))
    swiglu_gate_grad(dout, preact[:, :n], preact[:, n:], dh[:, 0::2], dh[:, 1::2])
    assert rel_error(dh[:, 0::2], want_g) < 1e-5 and rel_error(dh[:, 1::2], want_u) < 1e-5
    swiglu_gate_grad(dout, preact[:, :n], preact[:, n:], preact[:, :n], preact[:, n:])
    assert rel_error(preact[:, :n], want_g) < 1e-5 and rel_error(preact[:, n:], want_u) < 1e-5


def test_strided_input_and_grad():
    """A transposed (non-contiguous) input and a non-contiguous upstream gradient."""
    x_t = torch.randn(48, 9).t().requires_grad_()       # [9, 48], strides (1, 9)
    problem = make_problem("separate", (9,), 48, 24, torch.float32, bias=False)
    problem.x = x_t
    out = problem.run()
    dout = torch.randn(24, 9).t()                        # non-contiguous
    grads = torch.autograd.grad(out, problem.leaves, dout)
    leaves64 = [t.detach().double().requires_grad_() for t in problem.leaves]
    out64 = problem.oracle(leaves64)
    grads64 = torch.autograd.grad(out64, leaves64, dout.double())
    assert rel_error(out, out64) < 1e-5
    for got, want in zip(grads, grads64):
        assert rel_error(got, want) < 1e-5


def test_recompute_matches_saved(monkeypatch):
    from glu_fusion import config

    problem = make_problem("concat", (2, 7), 40, 24, torch.float32, bias=True)
    monkeypatch.setattr(config, "recompute", True)
    check_against_float64(problem, TOLERANCE[torch.float32])


@pytest.mark.parametrize("frozen", ["x", "weights"])
def test_only_needed_grads(frozen):
    problem = make_problem("separate", (11,), 32, 16, torch.float32, bias=True)
    if frozen == "x":
        problem.x.requires_grad_(False)
        wanted = problem.weights + problem.biases
    else:
        for t in problem.weights + problem.biases:
            t.requires_grad_(False)
        wanted = [problem.x]
    out = problem.run()
    grads = torch.autograd.grad(out.sum(), wanted)
    assert all(gr is not None and torch.isfinite(gr).all() for gr in grads)


def test_empty_and_single_row():
    for lead in [(0,), (1,), (3, 0)]:
        problem = make_problem("interleaved", lead, 32, 16, torch.float32, bias=True)
        out = problem.run()
        assert out.shape == (*lead, 16)
        grads = torch.autograd.grad(out.sum(), problem.leaves)
        if out.numel() == 0:
            assert all(torch.count_nonzero(gr) == 0 for gr in grads[1:])
        else:
            check_against_float64(problem, 1e-5)


@pytest.mark.parametrize("layout", ["separate", "concat", "interleaved_up_first"])
@pytest.mark.parametrize("bias", [False, True])
def test_tma_forward(layout, bias, monkeypatch):
    """The persistent TMA forward (several tiles per program, ragged edges) matches float64."""
    from glu_fusion.kernels.portable.swiglu_fwd_tma import tma_eligible
    from glu_fusion.ops import swiglu as swiglu_ops

    from glu_fusion.kernels.portable import swiglu_fwd_tma

    monkeypatch.setattr(swiglu_ops, "_TMA_MIN_TOKENS", 1)
    # Plans built earlier for this signature chose the pointer kernel: start from none.
    monkeypatch.setattr(swiglu_ops, "_FORWARD_PLANS", swiglu_ops.PlanCache(swiglu_ops._build_forward_plan))
    calls = []
    real = swiglu_fwd_tma.tma_forward_plan
    monkeypatch.setattr(swiglu_fwd_tma, "tma_forward_plan", lambda *a: calls.append(1) or real(*a))
    problem = make_problem(layout, (70,), 48, 40, torch.float32, bias)
    assert tma_eligible(problem.x, *problem.weights), "the test must exercise the TMA path"
    check_against_float64(problem, TOLERANCE[torch.float32])
    assert calls, "the op did not take the TMA path"


@pytest.mark.parametrize("layout", ["separate", "concat_up_first", "interleaved"])
@pytest.mark.parametrize("bias", [False, True])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=str)
def test_cublas_forward_for_training(layout, bias, dtype, monkeypatch):
    """Training calls from _CUBLAS_MIN_TOKENS up: GEMMs into the saved pre-activations, then
    the gate kernel; forward and every gradient match float64, and inference keeps the fused
    kernel."""
    from glu_fusion.ops import swiglu as swiglu_ops

    from glu_fusion.kernels.portable import swiglu_gate as gate_kernel

    monkeypatch.setattr(swiglu_ops, "_CUBLAS_MIN_TOKENS", 1)
    monkeypatch.setattr(swiglu_ops, "_FORWARD_PLANS", swiglu_ops.PlanCache(swiglu_ops._build_forward_plan))
    calls = []
    real = gate_kernel.swiglu_gate
    monkeypatch.setattr(gate_kernel, "swiglu_gate", lambda *a: calls.append(1) or real(*a))
    problem = make_problem(layout, (3, 11), 40, 24, dtype, bias)
    check_against_float64(problem, TOLERANCE[dtype])
    assert calls, "the training call did not take the cuBLAS path"
    calls.clear()
    with torch.no_grad():
        problem.run()
    assert not calls, "an inference call took the cuBLAS path"


def test_tma_forward_writes_every_element():
    from glu_fusion.kernels.portable.swiglu_fwd_tma import swiglu_forward_tma

    _check_forward_writes_every_element(swiglu_forward_tma, 90, 64, 40)


def test_tma_forward_leaves_the_callers_triton_allocator():
    """The TMA forward sets Triton's allocator for its own launch only."""
    from triton.runtime import _allocation

    from glu_fusion.kernels.portable.swiglu_fwd_tma import swiglu_forward_tma

    def mine(size, alignment, stream):
        return torch.empty(size, dtype=torch.int8)

    token = _allocation._allocator.set(mine)
    try:
        x, wg, wu = torch.randn(20, 32), torch.randn(16, 32), torch.randn(16, 32)
        out = torch.full((20, 16), float("nan"))
        swiglu_forward_tma(x, wg, wu, None, None, out, None, False)
        assert _allocation._allocator.get() is mine
        torch.testing.assert_close(out, torch.nn.functional.silu(x @ wg.t()) * (x @ wu.t()), rtol=1e-4, atol=1e-4)
    finally:
        _allocation._allocator.reset(token)
