"""The grouped (expert) SwiGLU ops through the Triton interpreter (fp32/fp16) and the reference
path: forward and every gradient against float64, on skewed routings and every weight storage."""
from __future__ import annotations

import pytest
import torch

from glu_fusion import functional
from helpers.grouped_cases import FORMS, ROUTINGS, TOLERANCE, check_against_float64, make_problem, offsets_of

# Triton's interpreter only runs when the suite has no GPU (conftest.py): then these tests run
# the kernels; on a CUDA machine the CPU tensors take the reference path.
interpreted = pytest.mark.skipif(torch.cuda.is_available(), reason="interpreter tests run on CPU-only hosts")


@pytest.fixture(autouse=True)
def seed():
    torch.manual_seed(1234)


@interpreted
@pytest.mark.parametrize("routing", sorted(ROUTINGS))
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_silu_routings(routing, dtype):
    problem = make_problem(routing, k=24, n=20, dtype=dtype, bias=(routing == "padded_tail"))
    check_against_float64(problem, TOLERANCE[dtype])


@interpreted
@pytest.mark.parametrize("form", FORMS)
@pytest.mark.parametrize("activation", ["silu", "gptoss"])
def test_weight_storages(form, activation):
    problem = make_problem("hot_expert", k=20, n=18, dtype=torch.float32, form=form, bias=True,
                           activation=activation)
    check_against_float64(problem, TOLERANCE[torch.float32])


@interpreted
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_gptoss_gate_clamps_both_halves(dtype):
    problem = make_problem("uneven", k=32, n=16, dtype=dtype, form="transposed_interleaved", bias=True,
                           activation="gptoss")
    with torch.no_grad():
        out = problem.run()
    assert torch.isfinite(out).all()
    check_against_float64(problem, TOLERANCE[dtype])


@interpreted
def test_no_tokens_at_all():
    """T = 0, and T > 0 with every row in the padded tail: zeros, zero weight grads."""
    for counts, tail in (([0, 0, 0], 0), ([0, 0], 7)):
        problem = make_problem(None, k=16, n=16, dtype=torch.float32, bias=True, counts=counts, tail=tail)
        out = problem.run()
        assert out.shape == (tail, 16)
        grads = torch.autograd.grad(out, problem.leaves, torch.randn_like(out))
        assert all((g == 0).all() for g in grads)


@interpreted
def test_offsets_int64_and_recompute(monkeypatch):
    """int64 offsets; with ``recompute`` the backward recomputes the pre-activations."""
    import glu_fusion.config
    monkeypatch.setattr(glu_fusion.config, "recompute", True)
    problem = make_problem("uneven", k=16, n=16, dtype=torch.float32, form="concat", bias=True)
    problem.offsets = problem.offsets.long()
    check_against_float64(problem, TOLERANCE[torch.float32])


@interpreted
def test_only_some_inputs_need_grad():
    problem = make_problem("padded_tail", k=16, n=16, dtype=torch.float32, bias=True)
    problem.x.requires_grad_(False)
    for b in problem.biases:
        b.requires_grad_(False)
    out = problem.run()
    dwg, dwu = torch.autograd.grad(out, problem.weights, torch.randn_like(out))
    assert torch.isfinite(dwg).all() and torch.isfinite(dwu).all()


@interpreted
def test_autocast_follows_region_dtype():
    problem = make_problem("uneven", k=16, n=16, dtype=torch.float32)
    with torch.autocast("cpu", dtype=torch.float16):
        out = problem.run()
    assert out.dtype == torch.float16


# --- reference path (no interpreter) ------------------------------------------------------------

@pytest.fixture
def reference_path(monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "0")


@pytest.mark.parametrize("activation", ["silu", "gptoss"])
@pytest.mark.parametrize("form", ["separate", "transposed_interleaved"])
def test_gradcheck_float64(reference_path, activation, form):
    problem = make_problem("padded_tail", k=6, n=4, dtype=torch.float64, form=form, bias=True,
                           activation=activation)
    assert torch.autograd.gradcheck(lambda *leaves: problem.run(list(leaves)), problem.leaves)


def test_reference_path_matches_float64(reference_path):
    problem = make_problem("hot_expert", k=12, n=8, dtype=torch.float32, form="interleaved", bias=True,
                           activation="gptoss")
    check_against_float64(problem, TOLERANCE[torch.float32])


def test_opcheck(reference_path):
    x = torch.randn(9, 8)
    offsets = offsets_of([2, 0, 5])
    wg, wu = torch.randn(3, 6, 8), torch.randn(3, 6, 8)
    bg, bu = torch.randn(3, 6), torch.randn(3, 6)
    packed, pbias = torch.randn(3, 12, 8), torch.randn(3, 12)
    for save in (True, False):
        torch.library.opcheck(torch.ops.glu_fusion.grouped_swiglu.default,
                              (x, offsets, wg, wu, bg, bu, "silu", 1.702, 7.0, save))
        torch.library.opcheck(torch.ops.glu_fusion.grouped_swiglu_packed.default,
                              (x, offsets, packed, pbias, 2, "gptoss", 1.702, 0.5, save))
    dout, preact, dh = torch.randn(9, 6), torch.randn(9, 12), torch.randn(9, 12)
    torch.library.opcheck(torch.ops.glu_fusion.grouped_swiglu_dh.default, (dout, preact, offsets, "gptoss", 1.702, 0.5))
    torch.library.opcheck(torch.ops.glu_fusion.grouped_swiglu_dx.default, (dh, offsets, wg, wu))
    for want_w, want_b in ((True, True), (True, False), (False, True)):
        torch.library.opcheck(torch.ops.glu_fusion.grouped_swiglu_dw.default, (dh, x, offsets, 2, want_w, want_b))


def test_compiled_with_dynamic_shapes_matches_eager(reference_path):
    """The fake implementations hold under symbolic token counts (AOTAutograd traces them)."""
    torch._dynamo.reset()
    fn = torch.compile(functional.grouped_swiglu, backend="aot_eager", dynamic=True, fullgraph=True)
    for counts, tail in (([3, 0, 4], 2), ([1, 9, 0], 0)):
        problem = make_problem(None, k=8, n=8, dtype=torch.float32, bias=True, counts=counts, tail=tail)
        args = (problem.x, problem.offsets, *problem.weights, *problem.biases)
        out = fn(*args)
        grads = torch.autograd.grad(out, problem.leaves, torch.ones_like(out))
        want = problem.run()
        want_grads = torch.autograd.grad(want, problem.leaves, torch.ones_like(want))
        torch.testing.assert_close(out, want)
        for g, w in zip(grads, want_grads):
            torch.testing.assert_close(g, w)
    torch._dynamo.reset()


def test_bad_arguments(reference_path):
    x = torch.randn(4, 8)
    w = torch.randn(2, 4, 8)
    with pytest.raises(ValueError, match="offsets"):
        functional.grouped_swiglu(x, offsets_of([1, 1, 2]), w, w)
    with pytest.raises(TypeError, match="int32 or int64"):
        functional.grouped_swiglu(x, torch.tensor([1.0, 4.0]), w, w)
    with pytest.raises(ValueError, match="activation"):
        functional.grouped_swiglu(x, offsets_of([1, 3]), w, w, activation="gelu")
    with pytest.raises(ValueError, match="K=8"):
        functional.grouped_swiglu(torch.randn(4, 6), offsets_of([1, 3]), w, w)
    with pytest.raises(ValueError, match="layout"):
        functional.grouped_swiglu_packed(x, offsets_of([1, 3]), torch.randn(2, 8, 8), layout="zigzag")


def test_stacked_halves_finds_one_packed_weight_only():
    from glu_fusion.ops.grouped_swiglu import stacked_halves
    w = torch.randn(3, 8, 5)  # [E, 2N, K], gate rows first
    stacked = stacked_halves(w[:, :4], w[:, 4:])
    assert stacked is not None and torch.equal(stacked, w)
    t = torch.randn(3, 5, 8).transpose(1, 2)  # an [E, K, 2N] storage: halves follow along dim 1 too
    assert torch.equal(stacked_halves(t[:, :4], t[:, 4:]), t)
    assert stacked_halves(w[:, 4:], w[:, :4]) is None  # up first
    assert stacked_halves(torch.randn(3, 4, 5), torch.randn(3, 4, 5)) is None  # separate weights
    assert stacked_halves(w[:, 0::2], w[:, 1::2]) is None  # interleaved rows
    assert torch.equal(stacked_halves(w[:, :3], w[:, 3:6]), w[:, :6])  # rows past the halves are no matter
    base = torch.randn(80)
    gate = torch.as_strided(base, (3, 4, 5), (20, 5, 1))
    up = torch.as_strided(base, (3, 4, 5), (20, 5, 1), 20)  # each expert's up half is the next one's gate
    assert stacked_halves(gate, up) is None


@pytest.mark.parametrize("weights", ["packed", "separate", "transposed"])
def test_backward_gemms_on_torch_grouped_mm(weights, monkeypatch):
    """dX and dW through ``torch._grouped_mm`` (the bf16 route on Hopper, run here on its CPU
    kernel): equal to the reference within bf16 rounding, zeros for the padded tail's rows and
    for experts without rows; interleaved halves it cannot read are refused."""
    if not hasattr(torch, "_grouped_mm"):
        pytest.skip("needs torch._grouped_mm")
    from glu_fusion import grouped_reference
    from glu_fusion.ops import grouped_swiglu as ops
    monkeypatch.setattr(ops, "TORCH_GROUPED_MM_DEVICES", ("cpu",))
    e, n, k, t = 4, 16, 24, 48
    offsets = torch.tensor([10, 10, 30, 40], dtype=torch.int32)   # an empty expert, 8 tail rows
    gen = torch.Generator().manual_seed(0)
    dh = torch.randn(t, 2 * n, generator=gen).bfloat16()
    dh[40:] = 0   # the gate's backward zeroes the tail
    x = torch.randn(t, k, generator=gen).bfloat16()
    if weights == "packed":
        w = torch.randn(e, 2 * n, k, generator=gen).bfloat16()
        wg, wu = w[:, :n], w[:, n:]
    elif weights == "separate":
        wg, wu = torch.randn(e, n, k, generator=gen).bfloat16(), torch.randn(e, n, k, generator=gen).bfloat16()
    else:  # an [E, K, 2N] storage, gate columns first
        w = torch.randn(e, k, 2 * n, generator=gen).bfloat16()
        wg, wu = w[:, :, :n].transpose(1, 2), w[:, :, n:].transpose(1, 2)
    dx = ops._torch_grouped_mm_dx(dh, offsets, wg, wu)
    want = grouped_reference.grouped_input_grad(dh.double(), offsets, wg.double(), wu.double())
    assert dx is not None and torch.equal(dx[40:], torch.zeros_like(dx[40:]))
    torch.testing.assert_close(dx.double(), want, rtol=2e-2, atol=2e-2 * want.abs().max().item())
    dw = ops._torch_grouped_mm_dw(dh, x, offsets)
    want_w, _ = grouped_reference.grouped_weight_grad(dh.double(), x.double(), offsets, e)
    assert torch.equal(dw[1], torch.zeros_like(dw[1]))
    torch.testing.assert_close(dw.double(), want_w, rtol=2e-2, atol=2e-2 * want_w.abs().max().item())
    w2 = torch.randn(e, k, 2 * n, generator=gen).bfloat16()
    assert ops._torch_grouped_mm_dx(dh, offsets, w2[:, :, ::2].transpose(1, 2), w2[:, :, 1::2].transpose(1, 2)) is None


@pytest.mark.parametrize("form", ["concat", "interleaved", "separate", "transposed_interleaved"])
@pytest.mark.parametrize("activation,bias", [("silu", False), ("gptoss", True)])
def test_forward_on_torch_grouped_mm(form, activation, bias, monkeypatch):
    """The forward through ``torch._grouped_mm`` and a separate gate (the bf16 route on Hopper,
    run here on its CPU kernel) against the reference: ``out`` and ``preact = [g | u]``, zeros
    for the padded tail."""
    if not hasattr(torch, "_grouped_mm"):
        pytest.skip("needs torch._grouped_mm")
    from glu_fusion import grouped_reference
    from glu_fusion.ops import grouped_swiglu as ops
    monkeypatch.setattr(ops, "TORCH_GROUPED_MM_DEVICES", ("cpu",))
    e, n, k, t = 4, 16, 24, 48
    offsets = torch.tensor([10, 10, 30, 40], dtype=torch.int32)
    gen = torch.Generator().manual_seed(1)
    x = torch.randn(t, k, generator=gen).bfloat16()
    if form == "separate":
        wg, wu = (torch.randn(e, n, k, generator=gen).bfloat16() for _ in range(2))
    elif form == "transposed_interleaved":  # gpt-oss's [E, K, 2N]
        w = torch.randn(e, k, 2 * n, generator=gen).bfloat16()
        wg, wu = w[:, :, 0::2].transpose(1, 2), w[:, :, 1::2].transpose(1, 2)
    else:
        w = torch.randn(e, 2 * n, k, generator=gen).bfloat16()
        wg, wu = (w[:, :n], w[:, n:]) if form == "concat" else (w[:, 0::2], w[:, 1::2])
    bg, bu = (torch.randn(e, n, generator=gen).bfloat16() for _ in range(2)) if bias else (None, None)
    found = ops._torch_grouped_mm_forward(x, offsets, wg, wu, bg, bu, activation, 1.702, 7.0)
    assert found is not None  # every packed form is one GEMM over the whole weight
    out, preact = found
    g64, u64 = grouped_reference.grouped_preact(x.double(), offsets, wg.double(), wu.double(),
                                                None if bg is None else bg.double(), None if bu is None else bu.double())
    h64 = grouped_reference.gate(g64, u64, activation, 1.702, 7.0)
    for got, want in ((out, h64), (preact, torch.cat([g64, u64], dim=1))):
        assert torch.equal(got[40:], torch.zeros_like(got[40:]))
        torch.testing.assert_close(got.double(), want, rtol=2e-2, atol=2e-2 * want.abs().max().item())
