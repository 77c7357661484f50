"""The engine's host-side pieces that need no Hopper GPU: the split reduction's second kernel
(plain Triton, run here through Triton's interpreter) and the split count."""
from __future__ import annotations

import pytest
import torch

pytestmark = pytest.mark.skipif(torch.cuda.is_available(), reason="the interpreter path is CI's")


@pytest.mark.parametrize("m,n,splits,stacked_rows", [(5, 7, 1, 128), (130, 260, 3, 256), (1, 128, 4, 128)])
@pytest.mark.parametrize("out_dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_sum_splits_sums_each_split_once_in_order(m, n, splits, stacked_rows, out_dtype):
    from glu_fusion.kernels.engine.reduce import sum_splits
    torch.manual_seed(m + n)
    stack = torch.randn(splits * stacked_rows, n)
    padding = torch.ones(stacked_rows, dtype=torch.bool)
    padding[:m] = False
    stack.view(splits, stacked_rows, n)[:, padding] = float("nan")  # rows past M must never be read
    out = torch.full((n, m), float("nan"), dtype=out_dtype).t()     # a transposed output view
    sum_splits(stack, out, splits, stacked_rows)
    want = stack.view(splits, stacked_rows, n)[:, :m].sum(0)
    torch.testing.assert_close(out.float(), want.to(out_dtype).float(), rtol=0, atol=0) if out_dtype == torch.float32 \
        else torch.testing.assert_close(out, want.to(out_dtype))


def test_sum_splits_refuses_a_stack_of_the_wrong_shape():
    from glu_fusion.kernels.engine.reduce import sum_splits
    with pytest.raises(ValueError, match="fp32"):
        sum_splits(torch.zeros(3, 4), torch.zeros(2, 4), 2, 2)


@pytest.mark.parametrize("k,splits,owning", [(64, 4, 1), (128, 4, 2), (640, 4, 4), (576, 4, 3), (4096, 7, 7)])
def test_split_steps_counts_only_splits_that_own_steps(k, splits, owning):
    """576 = 9 steps of 64: cut in 4, three splits of 3 steps own all of them (the fourth none)."""
    from glu_fusion.kernels.engine import host
    assert host.split_steps(k, host.WEIGHT_GRAD_SPLIT, splits) == owning


def test_grouped_matmul_serves_only_what_the_kernel_reads():
    from glu_fusion.kernels.engine import host
    bf = torch.bfloat16
    a, out = torch.randn(64, 64, dtype=bf), torch.empty(64, 32, dtype=bf)
    w = torch.randn(4, 32, 64, dtype=bf)
    dest, scale = torch.arange(64, dtype=torch.int32), torch.ones(64)
    assert host.grouped_matmul_serves(a, w, out)
    assert host.grouped_matmul_serves(a, w, out, dest, scale)
    assert host.grouped_matmul_serves(a, torch.randn(4, 64, 32, dtype=bf).transpose(1, 2), out)  # [E, K, N] storage
    assert not host.grouped_matmul_serves(a, w, out, dest.long())  # slots are int32
    assert not host.grouped_matmul_serves(a, w, out, dest[:32])  # one slot per row
    assert not host.grouped_matmul_serves(a, w, out, dest, scale.to(bf))  # routing weights in fp32
    assert not host.grouped_matmul_serves(a, w, out, dest, scale[:32])  # one weight per row
    assert not host.grouped_matmul_serves(a, w.float(), out)  # operands of one dtype
    assert not host.grouped_matmul_serves(a, torch.randn(32, 4, 64, dtype=bf).transpose(0, 1), out)  # experts interleaved
    assert not host.grouped_matmul_serves(a[:0], w, out)
