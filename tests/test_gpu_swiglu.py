"""SwiGLU kernels compiled for the GPU: real model shapes, every dtype, against float64.

Each error must be within the dtype's bound and no worse than twice eager's own error against
the same float64 reference (eager = two ``F.linear`` calls, ``F.silu`` and a product).
"""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from helpers.swiglu_cases import TOLERANCE, make_problem, rel_error

pytestmark = [pytest.mark.gpu,
              pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")]

LLAMA3_8B = (4096, 14336)
QWEN3_06B = (1024, 3072)
ODD = (1000, 431)

CASES = [
    # (layout, M, (K, N), dtype, bias)
    ("separate", 1, LLAMA3_8B, torch.bfloat16, False),
    ("separate", 16384, LLAMA3_8B, torch.bfloat16, False),
    ("separate", 1, LLAMA3_8B, torch.float16, False),
    ("concat", 2048, LLAMA3_8B, torch.float16, False),
    ("separate", 1, LLAMA3_8B, torch.float32, False),
    ("separate", 2048, LLAMA3_8B, torch.float32, False),
    ("separate", 16384, QWEN3_06B, torch.bfloat16, False),
    ("separate", 1, QWEN3_06B, torch.bfloat16, False),
    ("concat", 16384, QWEN3_06B, torch.float16, False),
    ("interleaved", 4096, QWEN3_06B, torch.float32, False),
] + [(layout, m, ODD, dtype, True)
     for layout in ("separate", "concat", "concat_up_first", "interleaved", "interleaved_up_first")
     for m in (1, 333)
     for dtype in (torch.bfloat16, torch.float16, torch.float32)]


def _eager(problem, leaves):
    """The unfused spelling models use, in the input dtype."""
    x, wg, wu, bg, bu = problem.unpack(leaves)
    return F.silu(F.linear(x, wg, bg)) * F.linear(x, wu, bu)


def _grads(fn, leaves, dout):
    out = fn(leaves)
    return [out, *torch.autograd.grad(out, leaves, dout)]


@pytest.mark.parametrize("layout,m,kn,dtype,bias", CASES,
                         ids=[f"{c[0]}-M{c[1]}-K{c[2][0]}N{c[2][1]}-{str(c[3])[6:]}-{'b' if c[4] else 'nob'}"
                              for c in CASES])
def test_against_float64_and_eager(layout, m, kn, dtype, bias):
    torch.manual_seed(m + kn[0] + kn[1])
    k, n = kn
    problem = make_problem(layout, (m,), k, n, dtype, bias, device="cuda")
    dout = torch.randn(m, n, device="cuda", dtype=dtype)
    ours = _grads(problem.run, problem.leaves, dout)
    eager_leaves = [t.detach().clone().requires_grad_() for t in problem.leaves]
    eager = _grads(lambda ls: _eager(problem, ls), eager_leaves, dout)
    leaves64 = [t.detach().double().requires_grad_() for t in problem.leaves]
    ref = _grads(problem.oracle, leaves64, dout.double())
    names = ["out", "x"] + [f"w{i}" for i in range(len(problem.weights))] + \
        [f"b{i}" for i in range(len(problem.biases))]
    # Where eager is far more accurate than the dtype needs (cuBLAS splits short fp32 dot
    # products), allow the usual bound of a length-K dot product: sqrt(K) unit roundoffs.
    slack = k ** 0.5 * torch.finfo(dtype).eps / 2
    report = []
    for name, o, e, r in zip(names, ours, eager, ref):
        err, eager_err = rel_error(o, r), rel_error(e, r)
        report.append(f"{name}: ours {err:.2e} eager {eager_err:.2e}")
        assert err <= TOLERANCE[dtype], report
        assert err <= 2 * eager_err + slack, report
    print(" | ".join(report))


@pytest.mark.parametrize("forward", ["auto", "fused"])
def test_training_forward_paths_agree(forward, monkeypatch):
    """The training forward through cuBLAS + gate (auto, threshold lowered to take it) and
    through the fused TMA kernel: both within the bf16 bound of float64, forward and gradients."""
    from glu_fusion.ops import swiglu as swiglu_ops

    monkeypatch.setattr(swiglu_ops, "_FORWARD", forward)
    monkeypatch.setattr(swiglu_ops, "_CUBLAS_MIN_TOKENS", 1)
    monkeypatch.setattr(swiglu_ops, "_FORWARD_PLANS", swiglu_ops.PlanCache(swiglu_ops._build_forward_plan))
    torch.manual_seed(7)
    problem = make_problem("separate", (4096,), 1024, 3072, torch.bfloat16, False, device="cuda")
    dout = torch.randn(4096, 3072, device="cuda", dtype=torch.bfloat16)
    ours = _grads(problem.run, problem.leaves, dout)
    leaves64 = [t.detach().double().requires_grad_() for t in problem.leaves]
    ref = _grads(problem.oracle, leaves64, dout.double())
    for name, o, r in zip(["out", "x", "wg", "wu"], ours, ref):
        assert rel_error(o, r) <= TOLERANCE[torch.bfloat16], (forward, name)

