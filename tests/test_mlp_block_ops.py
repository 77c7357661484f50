"""The MLP-block ops (``down(silu(gate(x)) * up(x))``) against float64 autograd: forward and every
gradient (x, the gate/up weights, the down weight, all biases), for separate and packed weights,
saved and recomputed pre-activations, through Triton's interpreter (fp32/fp16) and the
plain-torch path."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from helpers.swiglu_cases import ALL_LAYOUTS, TOLERANCE, make_problem, rel_error

import glu_fusion.ops  # noqa: F401  (registers the ops)
from glu_fusion.layouts import LAYOUTS

pytestmark = pytest.mark.skipif(torch.cuda.is_available(),
                                reason="CUDA present: the GPU tests run the block op compiled")


def _run_block(problem, leaves, w_down, b_down, save_preact):
    x, *rest = leaves
    nw = len(problem.weights)
    weights, biases = rest[:nw], rest[nw:]
    if problem.layout == "separate":
        bg, bu = biases if biases else (None, None)
        out, _ = torch.ops.glu_fusion.mlp_block(x, *weights, bg, bu, w_down, b_down, save_preact)
    else:
        out, _ = torch.ops.glu_fusion.mlp_block_packed(x, weights[0], biases[0] if biases else None,
                                                       LAYOUTS[problem.layout], w_down, b_down, save_preact)
    return out


def _check(problem, d, down_bias, save_preact, tol):
    n = problem.weights[0].shape[0] // (1 if problem.layout == "separate" else 2)
    dtype = problem.x.dtype
    w_down = (torch.randn(d, n) * n ** -0.5).to(dtype).requires_grad_()
    b_down = (torch.randn(d) * 0.5).to(dtype).requires_grad_() if down_bias else None
    leaves = [*problem.leaves, w_down] + ([b_down] if down_bias else [])
    out = _run_block(problem, problem.leaves, w_down, b_down, save_preact)
    dout = torch.randn_like(out)
    grads = torch.autograd.grad(out, leaves, dout)
    leaves64 = [t.detach().double().requires_grad_() for t in leaves]
    n_in = len(problem.leaves)
    h64 = problem.oracle(leaves64[:n_in])
    out64 = F.linear(h64, leaves64[n_in], leaves64[n_in + 1] if down_bias else None)
    grads64 = torch.autograd.grad(out64, leaves64, dout.double())
    errors = {}
    for i, (got, want) in enumerate(zip([out, *grads], [out64, *grads64])):
        assert got.shape == want.shape and got.dtype == dtype
        errors[i] = rel_error(got, want)
    bad = {k: v for k, v in errors.items() if not v <= tol}
    assert not bad, f"errors over {tol} (0 = output, then leaves in order): {bad}"


@pytest.fixture
def interpreter(monkeypatch):
    """Kernels through the interpreter."""
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    torch.manual_seed(99)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("layout", ALL_LAYOUTS)
@pytest.mark.parametrize("save_preact", [True, False])
def test_block_kernels_forward_and_every_gradient(interpreter, layout, dtype, save_preact):
    problem = make_problem(layout, (2, 9), 24, 32, dtype, bias=True)
    _check(problem, 40, True, save_preact, 1.5 * TOLERANCE[dtype])


@pytest.mark.parametrize("lead,k,n,d", [((1,), 16, 8, 16), ((37,), 40, 24, 17), ((5, 3), 17, 40, 8)])
def test_block_kernels_ragged_sizes_without_biases(interpreter, lead, k, n, d):
    _check(make_problem("separate", lead, k, n, torch.float32, bias=False), d, False, True, 2e-5)


@pytest.mark.parametrize("layout", ["separate", "interleaved"])
@pytest.mark.parametrize("save_preact", [True, False])
def test_block_reference_path_float64(monkeypatch, layout, save_preact):
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    _check(make_problem(layout, (11,), 24, 16, torch.float64, bias=True), 20, True, save_preact, 1e-12)


def test_block_rejects_mismatched_down_weight():
    x, wg, wu = torch.randn(4, 8), torch.randn(6, 8), torch.randn(6, 8)
    with pytest.raises(ValueError, match="w_down must be"):
        torch.ops.glu_fusion.mlp_block(x, wg, wu, None, None, torch.randn(5, 7), None, True)
    with pytest.raises(ValueError, match="bias_down must have shape"):
        torch.ops.glu_fusion.mlp_block(x, wg, wu, None, None, torch.randn(5, 6), torch.randn(6), True)


def test_block_opcheck(interpreter):
    x = torch.randn(6, 16, requires_grad=True)
    wg, wu = torch.randn(8, 16, requires_grad=True), torch.randn(8, 16, requires_grad=True)
    wd = torch.randn(16, 8, requires_grad=True)
    torch.library.opcheck(torch.ops.glu_fusion.mlp_block.default, (x, wg, wu, None, None, wd, None, True))
    dout, preact = torch.randn(6, 16), torch.randn(6, 16)
    torch.library.opcheck(torch.ops.glu_fusion.mlp_dgated.default, (dout, preact, torch.randn(16, 8), 0))
