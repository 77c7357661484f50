"""``glu_fusion::grouped_down_combine`` against transformers' ``grouped_mm`` experts after the
gate (the down grouped GEMM, the per-row expert bias added after it, the routing-weight multiply,
the inverse permutation, the sum over each token's top-k rows), in float64 and in the dtype:
forward and every gradient, with routings that leave experts empty and a padded tail."""
from __future__ import annotations

import pytest
import torch

import glu_fusion
from helpers.combine_cases import outputs_and_grads, problem, rel, run_eager, run_ours

#: An absolute floor on the relative error, per dtype, for outputs eager computes exactly; the
#: bound is twice eager's own error against float64.
FLOOR = {torch.float32: 1e-6, torch.float16: 1e-4, torch.bfloat16: 1e-3}


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("bias", [False, True])
@pytest.mark.parametrize("tail_tokens", [0, 4])
@pytest.mark.parametrize("topk", [1, 2, 4])
def test_matches_float64_and_eager(dtype, bias, tail_tokens, topk):
    leaves, offsets, perm = problem(dtype, topk=topk, bias=bias, tail_tokens=tail_tokens, seed=topk)
    leaves64 = [t.detach().double().requires_grad_() if t is not None else None for t in leaves]
    dout = torch.randn(leaves[0].shape[0] // topk, leaves[1].shape[1], generator=torch.Generator().manual_seed(3))
    ref = outputs_and_grads(run_eager, leaves64, offsets, perm, topk, dout.double())
    ours = outputs_and_grads(run_ours, leaves, offsets, perm, topk, dout)
    eager = outputs_and_grads(run_eager, leaves, offsets, perm, topk, dout)
    names = ["out", "h", "w_down"] + (["bias_down"] if bias else []) + ["row_weights"]
    for name, o, e, r in zip(names, ours, eager, ref):
        assert o.dtype == e.dtype and o.shape == e.shape, name
        assert torch.isfinite(o).all(), name
        assert rel(o, r) <= 2 * rel(e, r) + FLOOR[dtype], (name, rel(o, r), rel(e, r))


@pytest.mark.parametrize("bias", [False, True])
@pytest.mark.parametrize("d", [6, 5])  # an odd D takes the reference's grouped GEMMs
def test_gradcheck_float64(bias, d):
    leaves, offsets, perm = problem(torch.float64, tokens=9, experts=4, topk=2, n=6, d=d, bias=bias, tail_tokens=2)
    present = [t for t in leaves if t is not None]

    def fn(*xs):
        it = iter(xs)
        return run_ours([next(it) if t is not None else None for t in leaves], offsets, perm, 2)

    assert torch.autograd.gradcheck(fn, present)


def test_backward_saves_nothing_of_rows_by_width():
    """The down projection's output [S, D] is not kept for the routing weights' gradient."""
    leaves, offsets, perm = problem(torch.float32, tokens=16, topk=2, n=24, d=16)
    s, d = leaves[0].shape[0], leaves[1].shape[1]
    shapes = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: shapes.append(tuple(t.shape)) or t, lambda t: t):
        run_ours(leaves, offsets, perm, 2)
    assert (s, d) not in shapes, shapes
    shapes.clear()
    with torch.autograd.graph.saved_tensors_hooks(lambda t: shapes.append(tuple(t.shape)) or t, lambda t: t):
        run_eager(leaves, offsets, perm, 2)
    assert (s, d) in shapes  # eager keeps it: the saving is real


def test_opcheck():
    leaves, offsets, perm = problem(torch.float32, tokens=6, experts=3, topk=2, n=8, d=4, tail_tokens=1)
    h, w, b, rw = (t.detach() for t in leaves)
    for bias in (b, None):
        torch.library.opcheck(torch.ops.glu_fusion.grouped_down_combine.default, (h, offsets, w, bias, rw, perm, 2))


def test_compiled_with_dynamic_shapes_matches_eager():
    torch._dynamo.reset()
    fn = torch.compile(glu_fusion.grouped_down_combine, backend="aot_eager", dynamic=True, fullgraph=True)
    for tokens, tail in ((11, 0), (17, 3)):
        leaves, offsets, perm = problem(torch.float32, tokens=tokens, topk=2, tail_tokens=tail, seed=tokens)
        h, w, b, rw = leaves
        out = fn(h, offsets, w, rw, perm, 2, b)
        grads = torch.autograd.grad(out, [h, w, b, rw], torch.ones_like(out))
        want = run_ours(leaves, offsets, perm, 2)
        want_grads = torch.autograd.grad(want, [h, w, b, rw], torch.ones_like(want))
        torch.testing.assert_close(out, want)
        for g, wg in zip(grads, want_grads):
            torch.testing.assert_close(g, wg)
    torch._dynamo.reset()


def test_bad_arguments():
    leaves, offsets, perm = problem(torch.float32, tokens=6, experts=3, topk=2, n=8, d=4)
    h, w, b, rw = (t.detach() for t in leaves)
    call = glu_fusion.grouped_down_combine
    with pytest.raises(ValueError, match="permutation"):
        call(h, offsets, w, rw, torch.zeros_like(perm), 2)
    with pytest.raises(ValueError, match="divisor"):
        call(h, offsets, w, rw, perm, 5)
    with pytest.raises(TypeError, match="row_weights"):
        call(h, offsets, w, rw.double(), perm, 2)
    with pytest.raises(ValueError, match=r"\[E, D, N\]"):
        call(h, offsets, w.transpose(1, 2), rw, perm, 2)
    with pytest.raises(ValueError, match="bias_down"):
        call(h, offsets, w, rw, perm, 2, bias_down=b[:, :2])
    with pytest.raises(ValueError, match="one per row"):
        call(h, offsets, w, rw[:4], perm, 2)
    with pytest.raises(TypeError, match="topk must be an int"):
        call(h, offsets, w, rw, perm, 2.0)
    with pytest.raises(TypeError, match="slots must be int32 or int64"):
        call(h, offsets, w, rw, perm.float(), 2)
