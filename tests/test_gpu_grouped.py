"""Grouped expert SwiGLU kernels compiled for the GPU: Qwen3-MoE and gpt-oss widths at small
token counts, every dtype, skewed routings, against float64; no host sync on the routing; the
weight-grad store's parity on the device.

Each error must be within the dtype's bound and no worse than twice the error of the eager
per-expert loop (``F.linear`` per expert in the input dtype) against the same float64 oracle, or
than the rounding error of an fp32 accumulation as long as the longest reduction: cuBLAS's fp32
GEMM can land far below that (1e-6 and less, by summing in a tree), and a kernel that accumulates
tile after tile along the reduction, as ours do, is still exactly as accurate as fp32 allows.
"""
from __future__ import annotations

import pytest
import torch

from glu_fusion import grouped_reference
from glu_fusion.weight_grad_store import WeightGradStore
from helpers.grouped_cases import TOLERANCE, check_against_float64, make_problem, offsets_of, rel_error

FP32_UNIT_ROUNDOFF = 2.0 ** -24


def fp32_accumulation_bound(length: int) -> float:
    """Relative error of a length-``length`` fp32 sum accumulated in sequence: ``u·√length``, the
    probabilistic bound for recursive summation (Higham and Mary, SIAM J. Sci. Comput. 2019)."""
    return FP32_UNIT_ROUNDOFF * length ** 0.5

pytestmark = [pytest.mark.gpu,
              pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")]

QWEN3_MOE = (2048, 768)    # hidden, expert MLP width
GPT_OSS = (2880, 2880)


def skewed_counts(tokens: int, experts: int, seed: int) -> list[int]:
    """A routing with one hot expert (half the tokens), several empty ones, a one-token one."""
    g = torch.Generator().manual_seed(seed)
    hot = tokens // 2
    rest = torch.multinomial(torch.ones(experts), tokens - hot - 1, replacement=True, generator=g)
    counts = torch.bincount(rest, minlength=experts)
    counts[2:5] = 0
    counts[1] = 1
    counts[0] = tokens - counts[1:].sum()
    return counts.tolist()


CASES = [
    # (widths, experts, tokens, tail, dtype, form, activation, bias)
    (QWEN3_MOE, 16, 4096, 0, torch.bfloat16, "separate", "silu", False),
    (QWEN3_MOE, 16, 3001, 77, torch.float16, "concat", "silu", False),
    (QWEN3_MOE, 8, 1000, 5, torch.float32, "separate", "silu", False),
    (GPT_OSS, 8, 1500, 0, torch.bfloat16, "transposed_interleaved", "gptoss", True),
    (GPT_OSS, 8, 777, 13, torch.float16, "interleaved", "gptoss", True),
    (GPT_OSS, 8, 300, 0, torch.float32, "transposed_interleaved", "gptoss", True),
]


@pytest.fixture(params=["portable", "engine"])
def forward_kernel(request, monkeypatch):
    """The unfused route (torch's grouped GEMM for bf16 on Hopper, the portable kernels otherwise),
    or the Hopper engine's grouped kernels where they serve the operands (the forward, and dX of a
    packed weight's halves)."""
    if request.param == "engine":
        from glu_fusion.kernels import engine
        from glu_fusion.ops import grouped_swiglu
        if not engine.available(torch.device("cuda")):
            pytest.skip("the engine runs on Hopper GPUs")
        monkeypatch.setattr(grouped_swiglu, "ENGINE_GROUPED", True)
    return request.param


@pytest.mark.parametrize("widths,experts,tokens,tail,dtype,form,activation,bias", CASES)
def test_against_float64_and_eager(widths, experts, tokens, tail, dtype, form, activation, bias, forward_kernel):
    torch.manual_seed(0)
    k, n = widths
    problem = make_problem(None, k=k, n=n, dtype=dtype, form=form, bias=bias, activation=activation,
                           counts=skewed_counts(tokens, experts, seed=tokens), tail=tail, device="cuda")
    errors = check_against_float64(problem, TOLERANCE[dtype])

    # Eager's own error, the same way: the per-expert loop in the input dtype.
    out = problem.oracle(problem.leaves)
    dout = torch.randn_like(out)
    torch.manual_seed(0)
    grads = torch.autograd.grad(out, problem.leaves, dout)
    leaves64 = [t.detach().double().requires_grad_() for t in problem.leaves]
    out64 = problem.oracle(leaves64)
    grads64 = torch.autograd.grad(out64, leaves64, dout.double())
    eager = [rel_error(a, b) for a, b in zip([out, *grads], [out64, *grads64])]
    # the longest reduction: K for the projections, 2N for dx, an expert's tokens for the weight grads
    floor = fp32_accumulation_bound(max(k, 2 * n, max(skewed_counts(tokens, experts, seed=tokens))))
    for (name, ours), theirs in zip(errors.items(), eager):
        assert ours <= max(2 * theirs, floor), f"{name}: ours {ours:.3g} vs eager {theirs:.3g}, floor {floor:.3g}"


def test_no_host_sync_on_the_routing():
    k, n = QWEN3_MOE
    problem = make_problem(None, k=k, n=n, dtype=torch.bfloat16, counts=skewed_counts(2048, 16, 1),
                           tail=3, device="cuda")
    from glu_fusion.functional import grouped_swiglu as grouped_swiglu_api
    out = grouped_swiglu_api(problem.x, problem.offsets, *problem.weights)   # compile the kernels
    out.backward(torch.ones_like(out))
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        out = grouped_swiglu_api(problem.x, problem.offsets, *problem.weights)
        out.backward(torch.ones_like(out))
    finally:
        torch.cuda.set_sync_debug_mode("default")
    torch.cuda.synchronize()


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_no_tokens(dtype):
    for counts, tail in (([0] * 8, 0), ([0] * 8, 100)):
        problem = make_problem(None, k=256, n=128, dtype=dtype, bias=True, counts=counts, tail=tail,
                               device="cuda")
        out = problem.run()
        grads = torch.autograd.grad(out, problem.leaves, torch.randn_like(out))
        assert out.shape == (tail, 128) and (out == 0).all()
        assert all((g == 0).all() for g in grads)


@pytest.mark.parametrize("form", ["separate", "transposed_interleaved"])
def test_store_parity_on_device(form):
    torch.manual_seed(3)
    k, n = QWEN3_MOE
    problem = make_problem(None, k=k, n=n, dtype=torch.bfloat16, form=form, bias=True,
                           activation="gptoss" if form != "separate" else "silu",
                           counts=skewed_counts(3000, 16, 2), tail=7, device="cuda")
    dout = torch.randn(problem.x.shape[0], n, device="cuda", dtype=torch.bfloat16)
    out = problem.run()
    out.backward(dout)
    want = [t.grad.clone() for t in problem.leaves]
    for t in problem.leaves:
        t.grad = None
    store = WeightGradStore()
    with store:
        out_on = problem.run()
        out_on.backward(dout)
    assert torch.equal(out_on, out)
    assert all(w.grad is None for w in problem.weights)
    assert torch.equal(problem.x.grad, want[0])
    store.flush()
    n_w = len(problem.weights)
    for w, g in zip(problem.weights, want[1:1 + n_w]):
        assert torch.equal(w.grad, g)
    for b, g in zip(problem.biases, want[1 + n_w:]):
        assert rel_error(b.grad, g) <= TOLERANCE[torch.bfloat16]


def test_kernels_match_grouped_mm_where_available():
    """Against torch._grouped_mm (bf16, sm90) for the projections, where this torch has it."""
    if not hasattr(torch, "_grouped_mm") or torch.cuda.get_device_capability() < (9, 0):
        pytest.skip("torch._grouped_mm needs torch >= 2.8 and sm90")
    k, n = QWEN3_MOE
    e = 16
    counts = skewed_counts(4096, e, 4)
    offsets = offsets_of(counts).cuda()
    x = torch.randn(4096, k, device="cuda", dtype=torch.bfloat16)
    w = torch.randn(e, 2 * n, k, device="cuda", dtype=torch.bfloat16) / k ** 0.5
    from glu_fusion.functional import grouped_swiglu_packed as grouped_swiglu_packed_api
    ours = grouped_swiglu_packed_api(x, offsets, w)
    h = torch._grouped_mm(x, w.transpose(-2, -1), offs=offsets)
    g, u = h.chunk(2, dim=-1)
    theirs = grouped_reference.swiglu_gate(g, u)
    assert rel_error(ours, theirs) <= 2 * TOLERANCE[torch.bfloat16]


@pytest.fixture(params=["unfused", "engine"])
def combine_kernel(request, monkeypatch):
    """The down projection and combine through cuBLAS's grouped GEMM and torch's ops, or through
    the Hopper engine's grouped GEMM scattering each row to its token slot."""
    if request.param == "engine":
        from glu_fusion.kernels import engine
        from glu_fusion.ops import grouped_combine, grouped_swiglu
        if not engine.available(torch.device("cuda")):
            pytest.skip("the engine runs on Hopper GPUs")
        monkeypatch.setattr(grouped_combine, "ENGINE_COMBINE", True)
        monkeypatch.setattr(grouped_swiglu, "ENGINE_GROUPED", True)  # dX of w_down's halves too
    return request.param


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
@pytest.mark.parametrize("bias,tail_tokens,topk", [(False, 0, 8), (True, 5, 4), (True, 0, 1)])
def test_down_combine_against_float64_and_eager(dtype, bias, tail_tokens, topk, combine_kernel):
    from helpers.combine_cases import outputs_and_grads, problem, rel, run_eager, run_ours
    tokens, experts, n, d = 700, 16, 256, 512
    leaves, offsets, perm = problem(dtype, tokens=tokens, experts=experts, topk=topk, n=n, d=d, bias=bias,
                                    tail_tokens=tail_tokens, seed=topk, device="cuda")
    leaves64 = [t.detach().double().requires_grad_() if t is not None else None for t in leaves]
    dout = torch.randn(tokens, d, device="cuda", generator=torch.Generator("cuda").manual_seed(3))
    ref = outputs_and_grads(run_eager, leaves64, offsets, perm, topk, dout.double())
    ours = outputs_and_grads(run_ours, leaves, offsets, perm, topk, dout)
    eager = outputs_and_grads(run_eager, leaves, offsets, perm, topk, dout)
    names = ["out", "h", "w_down"] + (["bias_down"] if bias else []) + ["row_weights"]
    floor = {torch.float32: 1e-5, torch.float16: 1e-4, torch.bfloat16: 1e-3}[dtype]
    for name, o, e, r in zip(names, ours, eager, ref):
        assert torch.isfinite(o).all(), name
        assert rel(o, r) <= 2 * rel(e, r) + floor, (name, rel(o, r), rel(e, r))
