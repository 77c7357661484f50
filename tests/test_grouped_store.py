"""WeightGradStore with the grouped ops: store on against off gives equal outputs and
gradients, weight gradients bit for bit, and none before the flush."""
from __future__ import annotations

import pytest
import torch

from glu_fusion.weight_grad_store import WeightGradStore
from helpers.grouped_cases import make_problem


@pytest.fixture(autouse=True)
def seed():
    torch.manual_seed(77)


def _fresh_leaves(problem):
    for t in problem.leaves:
        t.grad = None


def _backward(problem, dout):
    out = problem.run()
    out.backward(dout)
    return out.detach()


@pytest.mark.parametrize("form", ["separate", "concat", "transposed_interleaved"])
def test_store_on_and_off_agree(form):
    problem = make_problem("padded_tail", k=16, n=16, dtype=torch.float32, form=form, bias=True,
                           activation="gptoss" if form == "transposed_interleaved" else "silu")
    dout = torch.randn(problem.x.shape[0], 16)

    out_off = _backward(problem, dout)
    grads_off = [t.grad.clone() for t in problem.leaves]
    _fresh_leaves(problem)

    store = WeightGradStore()
    with store:
        out_on = _backward(problem, dout)
    assert torch.equal(out_on, out_off)
    assert len(store) == 1
    assert all(w.grad is None for w in problem.weights), "weight grads must wait for the flush"
    torch.testing.assert_close(problem.x.grad, grads_off[0], rtol=0, atol=0)
    n_w = len(problem.weights)
    for b, want in zip(problem.biases, grads_off[1 + n_w:]):
        torch.testing.assert_close(b.grad, want, rtol=1e-6, atol=1e-6)

    store.flush()
    assert len(store) == 0
    for w, want in zip(problem.weights, grads_off[1:1 + n_w]):
        assert w.grad is not None and torch.equal(w.grad, want), "weight grads differ after the flush"


def test_pop_runs_micro_batches_in_order_and_accumulates():
    problem = make_problem("hot_expert", k=16, n=16, dtype=torch.float32, bias=False)
    douts = [torch.randn(30, 16), torch.randn(30, 16)]

    _backward(problem, douts[0])
    first = [w.grad.clone() for w in problem.weights]
    _backward(problem, douts[1])
    both = [w.grad.clone() for w in problem.weights]
    _fresh_leaves(problem)

    store = WeightGradStore()
    with store:
        for d in douts:
            _backward(problem, d)
    assert len(store) == 2 and all(w.grad is None for w in problem.weights)
    store.pop()
    assert all(torch.equal(w.grad, want) for w, want in zip(problem.weights, first))
    store.pop()
    assert all(torch.equal(w.grad, want) for w, want in zip(problem.weights, both))
    with pytest.raises(IndexError):
        store.pop()


def test_weights_that_are_not_leaves_get_grads_at_once():
    """A weight computed from a parameter (not a view of one) cannot be filled by a flush."""
    problem = make_problem("uneven", k=16, n=16, dtype=torch.float32)
    scale = torch.tensor(2.0, requires_grad=True)
    from glu_fusion.functional import grouped_swiglu as grouped_swiglu_api
    store = WeightGradStore()
    with store:
        out = grouped_swiglu_api(problem.x, problem.offsets, problem.weights[0] * scale, problem.weights[1])
        out.sum().backward()
    assert len(store) == 0
    assert scale.grad is not None and problem.weights[0].grad is not None


def test_compiled_backward_ignores_the_store(monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    problem = make_problem("uneven", k=8, n=8, dtype=torch.float32)
    torch._dynamo.reset()
    fn = torch.compile(lambda *a: problem.run(list(a)), backend="aot_eager", fullgraph=True)
    store = WeightGradStore()
    with store:
        fn(*problem.leaves).sum().backward()
    torch._dynamo.reset()
    assert len(store) == 0
    assert all(w.grad is not None for w in problem.weights)


def test_frozen_weight_does_not_block_deferral():
    problem = make_problem("uneven", k=16, n=16, dtype=torch.float32)
    problem.weights[1].requires_grad_(False)
    store = WeightGradStore()
    with store:
        problem.run().sum().backward()
    assert len(store) == 1 and problem.weights[0].grad is None
    store.flush()
    assert problem.weights[0].grad is not None and problem.weights[1].grad is None


# --- accumulate_dtype: sums kept by the store, cast once ----------------------------------------

@pytest.mark.parametrize("form", ["separate", "concat", "transposed_interleaved"])
def test_fp32_sums_of_fp32_weights_equal_the_plain_store(form):
    """With fp32 weights the sums are in the weights' own dtype, so ``write_grads`` must give the
    plain store's ``.grad`` bit for bit: the views (packed halves, transposed storage) land on the
    right elements of the sum, and nothing reaches ``.grad`` before it."""
    problem = make_problem("padded_tail", k=16, n=16, dtype=torch.float32, form=form, bias=True)
    douts = [torch.randn(problem.x.shape[0], 16) for _ in range(3)]
    plain = WeightGradStore()
    with plain:
        for d in douts:
            _backward(problem, d)
    plain.flush()
    want = [w.grad.clone() for w in problem.weights]
    _fresh_leaves(problem)

    store = WeightGradStore(accumulate_dtype=torch.float32)
    with store:
        for d in douts:
            _backward(problem, d)
    store.flush()
    assert all(w.grad is None for w in problem.weights), "the sums must stay in the store"
    sums = store.accumulated_grads()
    assert [id(leaf) for leaf, _ in sums] == [id(w) for w in problem.weights]
    assert all(total.dtype == torch.float32 and total.shape == leaf.shape for leaf, total in sums)
    store.write_grads()
    assert not store.accumulated_grads()
    for w, g in zip(problem.weights, want):
        assert torch.equal(w.grad, g)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_fp32_sums_of_half_weights_are_closer_to_float64(dtype, monkeypatch):
    """bf16 (reference path) and fp16 (the Triton kernel, in the interpreter, writing its fp32
    accumulator as it is) over eight micro-batches: the fp32 sum is the float64 sum to fp32
    precision, cast once; the plain store rounds every micro-batch's gradient and every partial
    sum to the weight's dtype."""
    from glu_fusion.kernels.portable import grouped_gemm
    written = []
    kernel = grouped_gemm.grouped_weight_grad

    def spy(dh, x, offsets, dw_gate, *rest):
        written.append(None if dw_gate is None else dw_gate.dtype)
        return kernel(dh, x, offsets, dw_gate, *rest)

    monkeypatch.setattr(grouped_gemm, "grouped_weight_grad", spy)
    problem = make_problem("uneven", k=16, n=16, dtype=dtype, form="concat")
    douts = [torch.randn(problem.x.shape[0], 16).to(dtype) for _ in range(8)]
    oracle = WeightGradStore(accumulate_dtype=torch.float64)
    fp32 = WeightGradStore(accumulate_dtype=torch.float32)
    plain = WeightGradStore()
    for store in (oracle, fp32, plain):
        _fresh_leaves(problem)
        with store:
            for d in douts:
                _backward(problem, d)
        store.flush()
    exact = oracle.accumulated_grads()[0][1]
    assert exact.dtype == torch.float64
    total = fp32.accumulated_grads()[0][1]
    assert total.dtype == torch.float32
    scale = exact.abs().max()
    err_fp32 = float((total.double() - exact).abs().max() / scale)
    assert err_fp32 < 2 ** -18, err_fp32
    err_plain = float((problem.weights[0].grad.double() - exact).abs().max() / scale)
    assert err_plain > 256 * err_fp32
    if dtype == torch.float16:  # the kernel wrote fp32 weight gradients from fp16 inputs
        assert torch.float32 in written and torch.float16 in written
    _fresh_leaves(problem)
    fp32.write_grads()  # the single cast
    assert torch.equal(problem.weights[0].grad, total.to(dtype))


def test_accumulate_dtype_checks_and_clear():
    with pytest.raises(ValueError, match="accumulate_dtype"):
        WeightGradStore(accumulate_dtype=torch.bfloat16)
    problem = make_problem("uneven", k=16, n=16, dtype=torch.float32)
    store = WeightGradStore(accumulate_dtype=torch.float64)
    with store:
        _backward(problem, torch.randn(problem.x.shape[0], 16))
    store.flush()
    assert store.accumulated_grads()[0][1].dtype == torch.float64
    store.clear()
    assert len(store) == 0 and not store.accumulated_grads()
    with pytest.raises(TypeError, match="fully_shard"):
        store.reduce_fsdp(torch.nn.Linear(2, 2))
