"""The grouped kernels called directly (Triton interpreter): outputs poisoned with NaN before
each launch, so every element must be written; work list; determinism of the weight grad."""
from __future__ import annotations

import pytest
import torch

from glu_fusion import grouped_reference as ref
from glu_fusion.kernels.portable.grouped_gate import grouped_gate_grad
from glu_fusion.kernels.portable.grouped_gemm import (grouped_input_grad, grouped_swiglu_forward,
                                             grouped_weight_grad, work_list)
from helpers.grouped_cases import offsets_of

pytestmark = pytest.mark.skipif(torch.cuda.is_available(), reason="interpreter tests run on CPU-only hosts")

NAN = float("nan")


def poisoned(*shape):
    return torch.full(shape, NAN)


@pytest.mark.parametrize("counts,tail,block", [([0, 29, 0, 1], 0, 16), ([5, 0, 7], 5, 4),
                                                ([0, 0], 3, 16), ([16, 16, 1], 0, 16)])
def test_work_list_counts_tiles_on_device(counts, tail, block):
    offsets = offsets_of(counts)
    t = sum(counts) + tail
    ends, tile_cum, bound = work_list(offsets, t, block)
    groups = counts + [tail]
    assert ends.tolist() == torch.tensor(groups).cumsum(0).tolist()
    tiles = [-(-c // block) for c in groups]
    assert tile_cum.tolist() == torch.tensor(tiles).cumsum(0).tolist()
    assert tile_cum[-1] <= bound


def _problem(counts, tail, k, n, seed):
    g = torch.Generator().manual_seed(seed)
    e, t = len(counts), sum(counts) + tail
    x = torch.randn(t, k, generator=g)
    wg = torch.randn(e, n, k, generator=g) / k ** 0.5
    wu = torch.randn(e, n, k, generator=g) / k ** 0.5
    bg, bu = torch.randn(e, n, generator=g), torch.randn(e, n, generator=g)
    return x, offsets_of(counts), wg, wu, bg, bu


@pytest.mark.parametrize("activation", ["silu", "gptoss"])
@pytest.mark.parametrize("counts,tail", [([3, 0, 18, 1], 4), ([0, 0, 33], 0)])
def test_every_output_element_is_written(activation, counts, tail):
    k, n, limit = 40, 24, 1.25
    x, offsets, wg, wu, bg, bu = _problem(counts, tail, k, n, seed=5)
    t, e = x.shape[0], len(counts)
    code = {"silu": 0, "gptoss": 1}[activation]

    out, pre = poisoned(t, n), poisoned(t, 2 * n)
    grouped_swiglu_forward(x, offsets, wg, wu, bg, bu, out, pre, code, 1.702, limit, False)
    g64, u64 = ref.grouped_preact(x.double(), offsets, wg.double(), wu.double(), bg.double(), bu.double())
    torch.testing.assert_close(pre, torch.cat([g64, u64], 1).float(), atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(out, ref.gate(pre.double()[:, :n], pre.double()[:, n:], activation, 1.702,
                                             limit).float(), atol=1e-5, rtol=1e-5)

    dout = torch.randn(t, n)
    dh = poisoned(t, 2 * n)
    grouped_gate_grad(dout, pre, offsets, dh, code, 1.702, limit)
    d_g, d_u = ref.gate_grad(dout.double(), pre.double()[:, :n], pre.double()[:, n:], activation, 1.702, limit)
    want = torch.cat([d_g, d_u], 1)
    want[int(offsets[-1]):] = 0
    torch.testing.assert_close(dh, want.float(), atol=1e-5, rtol=1e-5)

    dx = poisoned(t, k)
    grouped_input_grad(dh, offsets, wg, wu, dx, False)
    torch.testing.assert_close(dx, ref.grouped_input_grad(dh.double(), offsets, wg.double(), wu.double()).float(),
                               atol=1e-5, rtol=1e-5)

    dwg, dwu, dbg, dbu = poisoned(e, n, k), poisoned(e, n, k), poisoned(e, n), poisoned(e, n)
    grouped_weight_grad(dh, x, offsets, dwg, dwu, dbg, dbu, False)
    dw64, db64 = ref.grouped_weight_grad(dh.double(), x.double(), offsets, e)
    torch.testing.assert_close(torch.cat([dwg, dwu], 1), dw64.float(), atol=1e-4, rtol=1e-5)
    torch.testing.assert_close(torch.cat([dbg, dbu], 1), db64.float(), atol=1e-4, rtol=1e-5)


def test_weight_grad_is_deterministic_and_bias_alone_matches():
    x, offsets, *_ = _problem([7, 0, 30, 2], 3, 24, 20, seed=8)
    e, n, k = 4, 20, 24
    dh = torch.randn(x.shape[0], 2 * n)
    runs = []
    for _ in range(2):
        dwg, dwu, dbg, dbu = poisoned(e, n, k), poisoned(e, n, k), poisoned(e, n), poisoned(e, n)
        grouped_weight_grad(dh, x, offsets, dwg, dwu, dbg, dbu, False)
        runs.append((dwg, dwu, dbg, dbu))
    for a, b in zip(*runs):
        assert torch.equal(a, b)
    dbg, dbu = poisoned(e, n), poisoned(e, n)
    grouped_weight_grad(dh, x, offsets, None, None, dbg, dbu, False)
    assert torch.equal(dbg, runs[0][2]) and torch.equal(dbu, runs[0][3])


def test_strided_outputs_and_transposed_weights():
    """Weights read through transposed views; outputs written through column-sliced views."""
    x, offsets, wg, wu, bg, bu = _problem([4, 9, 0], 2, 20, 16, seed=3)
    wg_t = wg.transpose(1, 2).contiguous().transpose(1, 2)      # [E, N, K] view of [E, K, N]
    out_big = poisoned(x.shape[0], 48)
    out = out_big[:, 8:24]
    grouped_swiglu_forward(x, offsets, wg_t, wu, bg, bu, out, None, 0, 1.702, 7.0, False)
    want = ref.grouped_swiglu(x.double(), offsets, wg.double(), wu.double(), bg.double(), bu.double())
    torch.testing.assert_close(out, want.float(), atol=1e-5, rtol=1e-5)
    assert out_big[:, :8].isnan().all() and out_big[:, 24:].isnan().all()


def test_persistent_programs_walk_several_tiles():
    """With fewer programs than tiles each program loops over the work list (the GPU's case)."""
    x, offsets, wg, wu, bg, bu = _problem([9, 0, 21, 1], 6, 24, 40, seed=11)
    t, k, n = x.shape[0], 24, 40
    full_out, full_pre = poisoned(t, n), poisoned(t, 2 * n)
    grouped_swiglu_forward(x, offsets, wg, wu, bg, bu, full_out, full_pre, 0, 1.702, 7.0, False)
    out, pre = poisoned(t, n), poisoned(t, 2 * n)
    grouped_swiglu_forward(x, offsets, wg, wu, bg, bu, out, pre, 0, 1.702, 7.0, False, programs=3)
    assert torch.equal(out, full_out) and torch.equal(pre, full_pre)
    dh = torch.randn(t, 2 * n)
    dx_full, dx = poisoned(t, k), poisoned(t, k)
    grouped_input_grad(dh, offsets, wg, wu, dx_full, False)
    grouped_input_grad(dh, offsets, wg, wu, dx, False, programs=2)
    assert torch.equal(dx, dx_full) and torch.isfinite(dx).all()
