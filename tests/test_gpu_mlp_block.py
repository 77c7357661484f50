"""The MLP-block ops on the GPU: forward and every gradient (x, gate/up weights, the down
weight, all biases) against float64 and no worse than twice eager's own error, in bf16, fp16 and
fp32, at real widths, ragged sizes and packed gate/up layouts; and the block compiled through the
backend."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from helpers.swiglu_cases import TOLERANCE, make_problem, rel_error

import glu_fusion
from glu_fusion.layouts import LAYOUTS

pytestmark = [pytest.mark.gpu,
              pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")]

CASES = [
    # (layout, M, K, N, dtype, bias, save_preact)
    ("separate", 4096, 4096, 14336, torch.bfloat16, False, True),
    ("separate", 16384, 1024, 3072, torch.bfloat16, False, True),
    ("separate", 16384, 1024, 3072, torch.bfloat16, False, False),
    ("separate", 1, 4096, 14336, torch.bfloat16, False, False),
    ("concat", 2048, 1024, 3072, torch.float16, False, True),
    ("separate", 1024, 1024, 3072, torch.float32, False, True),
] + [(layout, m, 1000, 432, dtype, True, save)
     for layout in ("separate", "concat", "concat_up_first", "interleaved", "interleaved_up_first")
     for m in (1, 333)
     for dtype in (torch.bfloat16, torch.float16, torch.float32)
     for save in (True, False)]


def _block_op(problem, leaves, save_preact):
    x, *rest = leaves
    nw = len(problem.weights)
    weights, biases, (w_down, b_down) = rest[:nw], rest[nw:-2], rest[-2:]
    if problem.layout == "separate":
        bg, bu = biases if biases else (None, None)
        return torch.ops.glu_fusion.mlp_block(x, *weights, bg, bu, w_down, b_down, save_preact)[0]
    return torch.ops.glu_fusion.mlp_block_packed(x, weights[0], biases[0] if biases else None,
                                                 LAYOUTS[problem.layout], w_down, b_down, save_preact)[0]


def _eager(problem, leaves):
    *inputs, w_down, b_down = leaves
    x, wg, wu, bg, bu = problem.unpack(inputs)
    return F.linear(F.silu(F.linear(x, wg, bg)) * F.linear(x, wu, bu), w_down, b_down)


def _oracle(problem, leaves):
    *inputs, w_down, b_down = leaves
    return F.linear(problem.oracle(inputs), w_down, b_down)


def _grads(fn, leaves, dout):
    out = fn(leaves)
    return [out, *torch.autograd.grad(out, leaves, dout)]


def _leaves(problem, k, n, dtype):
    w_down = (torch.randn(k, n, device="cuda") * n ** -0.5).to(dtype).requires_grad_()
    b_down = (torch.randn(k, device="cuda") * 0.5).to(dtype).requires_grad_()
    return [*problem.leaves, w_down, b_down]


@pytest.mark.parametrize("layout,m,k,n,dtype,bias,save", CASES,
                         ids=[f"{c[0]}-M{c[1]}-K{c[2]}N{c[3]}-{str(c[4])[6:]}-{'b' if c[5] else 'nob'}-"
                              f"{'save' if c[6] else 'recompute'}" for c in CASES])
def test_block_against_float64_and_eager(layout, m, k, n, dtype, bias, save):
    torch.manual_seed(m + k + n)
    problem = make_problem(layout, (m,), k, n, dtype, bias, device="cuda")
    leaves = _leaves(problem, k, n, dtype)
    dout = torch.randn(m, k, device="cuda", dtype=dtype)
    ours = _grads(lambda ls: _block_op(problem, ls, save), leaves, dout)
    eager = _grads(lambda ls: _eager(problem, ls), [t.detach().clone().requires_grad_() for t in leaves], dout)
    ref = _grads(lambda ls: _oracle(problem, ls), [t.detach().double().requires_grad_() for t in leaves],
                 dout.double())
    slack = max(k, n) ** 0.5 * torch.finfo(dtype).eps / 2
    report = []
    for i, (o, e, r) in enumerate(zip(ours, eager, ref)):
        err, eager_err = rel_error(o, r), rel_error(e, r)
        report.append(f"{i}: ours {err:.2e} eager {eager_err:.2e}")
        assert o.dtype == dtype
        assert err <= 1.5 * TOLERANCE[dtype], report
        assert err <= 2 * eager_err + slack, report


def test_block_through_the_backend_rewrites_and_trains():
    class MLP(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.gate_proj = torch.nn.Linear(1024, 3072, bias=False)
            self.up_proj = torch.nn.Linear(1024, 3072, bias=False)
            self.down_proj = torch.nn.Linear(3072, 1024, bias=False)

        def forward(self, x):
            return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))

    torch.manual_seed(0)
    model = MLP().cuda().to(torch.bfloat16)
    x = torch.randn(4, 512, 1024, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    torch._dynamo.reset()
    glu_fusion.report().reset()
    compiled = torch.compile(model, backend=glu_fusion.backend)
    out = compiled(x)
    assert glu_fusion.report().counts().get("mlp_block") == 1
    grads = torch.autograd.grad(out.float().square().mean(), [x, *model.parameters()])
    ref_out = model(x)
    ref = torch.autograd.grad(ref_out.float().square().mean(), [x, *model.parameters()])
    assert rel_error(out, ref_out) < 2e-2
    for g, r in zip(grads, ref):
        assert rel_error(g, r) < 3e-2
