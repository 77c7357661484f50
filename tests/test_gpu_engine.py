"""The Gluon GEMM engine on a Hopper GPU, against float64: every operand orientation, ragged
sizes (not multiples of a tile), bias on and off, bf16 and fp16, both schedules, outputs
poisoned with NaN before each launch.  The bound is cuBLAS's own error on the same inputs (both
round the same fp32-accumulated result to the output dtype), with headroom for another
summation order."""
from __future__ import annotations

import pytest
import torch

pytestmark = pytest.mark.gpu

if not torch.cuda.is_available():
    pytest.skip("needs a CUDA device", allow_module_level=True)

from glu_fusion.kernels import engine  # noqa: E402

if not engine.available(torch.device("cuda")):
    pytest.fail("the engine must run on this GPU (Hopper, triton with Gluon)", pytrace=False)

from glu_fusion.kernels.engine import host  # noqa: E402
from glu_fusion.kernels.engine.host import Config  # noqa: E402

SCHEDULES = {"coop": host.GEMM, "coop_subtiled": Config(128, 256, 64, 4, store_n=64, store_bufs=2),
             "pingpong": Config(128, 128, 64, 3, pingpong=True, store_n=64)}
# M, N, K: N and K multiples of 8 (16 bytes), so that TMA reads every operand in either
# orientation; M = 300 is not, so an M-major A (a weight gradient's dYᵀ over 300 tokens) cannot be
# read by TMA there and must be refused, while M = 296 can
SIZES = [(300, 200, 136), (296, 200, 136), (1000, 520, 1032), (64, 24, 8), (4096, 1024, 512)]


def rel(x: torch.Tensor, ref: torch.Tensor) -> float:
    return ((x.double() - ref).norm() / ref.norm()).item()


def oriented(t: torch.Tensor, row_major: bool) -> torch.Tensor:
    """The same values stored row by row, or column by column (a transposed contiguous copy)."""
    return t if row_major else t.t().contiguous().t()


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("size", SIZES)
@pytest.mark.parametrize("a_rows,b_rows", [(True, False), (True, True), (False, True), (False, False)])
@pytest.mark.parametrize("bias", [False, True])
@pytest.mark.parametrize("schedule", sorted(SCHEDULES))
def test_matmul(dtype, size, a_rows, b_rows, bias, schedule):
    m, n, k = size
    torch.manual_seed(m + n + k)
    a = oriented(torch.randn(m, k, device="cuda", dtype=dtype), a_rows)
    b = oriented(torch.randn(k, n, device="cuda", dtype=dtype) / k ** 0.5, b_rows)
    bias_t = torch.randn(n, device="cuda", dtype=dtype) if bias else None
    ref = a.double() @ b.double() + (bias_t.double() if bias else 0)
    out = torch.full((m, n), float("nan"), device="cuda", dtype=dtype)
    if not a_rows and (m * a.element_size()) % 16:
        with pytest.raises(ValueError, match="cannot be read by TMA"):
            host.matmul(a, b, out, bias_t, cfg=SCHEDULES[schedule])
        return
    host.matmul(a, b, out, bias_t, cfg=SCHEDULES[schedule])
    eager = torch.addmm(bias_t, a, b) if bias else a @ b
    assert not out.isnan().any()
    assert rel(out, ref) <= 2 * rel(eager, ref) + 1e-4


SWIGLU_CONFIGS = {"infer": host.SWIGLU_INFER, "train": host.SWIGLU_TRAIN,
                  "pingpong": Config(64, 128, 64, 2, pingpong=True, store_n=64, store_bufs=2)}


def packed(weight: torch.Tensor, layout: str):
    n = weight.shape[0] // 2
    return (weight[:n], weight[n:]) if layout == "concat" else (weight[0::2], weight[1::2])


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("size", [(300, 200, 136), (1000, 264, 520), (4096, 1024, 1024)])
@pytest.mark.parametrize("layout", ["concat", "interleaved"])
@pytest.mark.parametrize("bias", [False, True])
@pytest.mark.parametrize("save", [False, True])
@pytest.mark.parametrize("config", sorted(SWIGLU_CONFIGS))
def test_swiglu_forward(dtype, size, layout, bias, save, config):
    m, n, k = size
    torch.manual_seed(m + n)
    x = torch.randn(m, k, device="cuda", dtype=dtype)
    weight = torch.randn(2 * n, k, device="cuda", dtype=dtype) / k ** 0.5
    wg, wu = packed(weight, layout)
    bias_t = torch.randn(2 * n, device="cuda", dtype=dtype) if bias else None
    bg, bu = packed(bias_t, layout) if bias else (None, None)
    g64 = x.double() @ wg.double().t() + (bg.double() if bias else 0)
    u64 = x.double() @ wu.double().t() + (bu.double() if bias else 0)
    h_ref = torch.nn.functional.silu(g64) * u64
    h = torch.full((m, n), float("nan"), device="cuda", dtype=dtype)
    pre = torch.full((m, 2 * n), float("nan"), device="cuda", dtype=dtype)
    outs = (pre[:, :n], pre[:, n:]) if save else (None, None)
    host.swiglu_forward(x, wg, wu, bg, bu, h, *outs, cfg=SWIGLU_CONFIGS[config])
    g_e = torch.nn.functional.linear(x, wg, bg)
    u_e = torch.nn.functional.linear(x, wu, bu)
    h_e = torch.nn.functional.silu(g_e) * u_e
    assert not h.isnan().any()
    assert rel(h, h_ref) <= 2 * rel(h_e, h_ref) + 1e-4
    if save:
        assert rel(pre[:, :n], g64) <= 2 * rel(g_e, g64) + 1e-4
        assert rel(pre[:, n:], u64) <= 2 * rel(u_e, u64) + 1e-4


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("size", [(300, 200, 136), (1000, 264, 520), (4096, 3072, 1024)])
@pytest.mark.parametrize("wd_rows", [True, False])
@pytest.mark.parametrize("in_place", [False, True])
@pytest.mark.parametrize("cfg", ["DGATED", "DGATED_WIDE"])
def test_dgated(dtype, size, wd_rows, in_place, cfg):
    m, n, d = size
    torch.manual_seed(m + n + d)
    dout = torch.randn(m, d, device="cuda", dtype=dtype)
    wd = oriented(torch.randn(d, n, device="cuda", dtype=dtype) / n ** 0.5, wd_rows)
    pre = torch.randn(m, 2 * n, device="cuda", dtype=dtype)
    g64, u64 = pre[:, :n].double(), pre[:, n:].double()
    dh64 = dout.double() @ wd.double()
    sig = torch.sigmoid(g64)
    refs = (dh64 * u64 * sig * (1 + g64 * (1 - sig)), dh64 * g64 * sig, g64 * sig * u64)
    # eager: the GEMM rounded to the dtype, then the gate's backward in fp32
    dh_e = (dout @ wd).float()
    g32, u32 = pre[:, :n].float(), pre[:, n:].float()
    s32 = torch.sigmoid(g32)
    eager = (dh_e * u32 * s32 * (1 + g32 * (1 - s32)), dh_e * g32 * s32, g32 * s32 * u32)
    eager = tuple(t.to(dtype) for t in eager)
    source = pre.clone()
    if in_place:
        d_g, d_u = source[:, :n], source[:, n:]
    else:
        dgu = torch.full((m, 2 * n), float("nan"), device="cuda", dtype=dtype)
        d_g, d_u = dgu[:, :n], dgu[:, n:]
    h = torch.full((m, n), float("nan"), device="cuda", dtype=dtype)
    host.dgated(dout, wd, source[:, :n], source[:, n:], d_g, d_u, h, cfg=getattr(host, cfg))
    for got, ref, e in zip((d_g, d_u, h), refs, eager):
        assert not got.isnan().any()
        assert rel(got, ref) <= 2 * rel(e, ref) + 1e-4


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("size", [(1000, 520, 4104), (296, 200, 136), (4096, 1024, 16384)])
@pytest.mark.parametrize("a_rows", [True, False])
@pytest.mark.parametrize("splits", [2, 3, 4, 7])
def test_split_reduction(dtype, size, a_rows, splits):
    """A weight gradient's reduction cut into splits: right against float64, every split's
    partial counted once (rows and tiles not multiples of the tile), the same bits every run."""
    m, n, k = size
    torch.manual_seed(m + n + k + splits)
    a = oriented(torch.randn(m, k, device="cuda", dtype=dtype), a_rows)
    b = torch.randn(k, n, device="cuda", dtype=dtype) / k ** 0.5
    ref = a.double() @ b.double()
    cfg = host.WEIGHT_GRAD_SPLIT
    outs = []
    for _ in range(2):
        out = torch.full((m, n), float("nan"), device="cuda", dtype=dtype)
        host.matmul(a, b, out, cfg=cfg, splits=splits)
        outs.append(out)
    assert host.split_steps(k, cfg, splits) > 1 or triton_cdiv(k, cfg.block_k) == 1
    assert not outs[0].isnan().any()
    assert rel(outs[0], ref) <= 2 * rel(a @ b, ref) + 1e-4
    assert torch.equal(outs[0], outs[1])


def triton_cdiv(a: int, b: int) -> int:
    return -(-a // b)


def test_split_reduction_takes_no_bias():
    a = torch.randn(256, 512, device="cuda", dtype=torch.bfloat16)
    b = torch.randn(512, 256, device="cuda", dtype=torch.bfloat16)
    out = torch.empty(256, 256, device="cuda", dtype=torch.bfloat16)
    with pytest.raises(ValueError, match="no bias"):
        host.matmul(a, b, out, torch.zeros(256, device="cuda", dtype=torch.bfloat16), cfg=host.WEIGHT_GRAD_SPLIT,
                    splits=2)


# --- grouped (expert) SwiGLU forward ----------------------------------------------------------------

def _routing(t: int, e: int, kind: str) -> torch.Tensor:
    """Cumulative rows per expert (int32): balanced, skewed with empty experts, or a padded tail."""
    if kind == "balanced":
        counts = [t // e + (i < t % e) for i in range(e)]
    elif kind == "skewed":  # most rows on two experts, some experts empty, one of 1 row
        counts = [0] * e
        counts[1], counts[-1], counts[e // 2] = t // 2 + 3, 1, t - (t // 2 + 3) - 1 - 50
    else:  # "tail": 50 rows past the last expert give zeros
        counts = [(t - 50) // e] * e
        counts[0] += (t - 50) - sum(counts)
    return torch.tensor(counts, device="cuda").cumsum(0).to(torch.int32)


def _expert_weights(e: int, n: int, k: int, dtype, layout: str):
    """(gate, up) [E, N, K] views: separate contiguous weights, the halves of a packed
    ``[E, 2N, K]`` (gate rows first), or a transposed ``[E, K, 2N]`` storage (N-major)."""
    if layout == "separate":
        return [torch.randn(e, n, k, device="cuda", dtype=dtype) / k ** 0.5 for _ in range(2)]
    if layout == "packed":
        w = torch.randn(e, 2 * n, k, device="cuda", dtype=dtype) / k ** 0.5
        return w[:, :n], w[:, n:]
    w = torch.randn(e, k, 2 * n, device="cuda", dtype=dtype) / k ** 0.5
    return w[:, :, :n].transpose(1, 2), w[:, :, n:].transpose(1, 2)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("routing", ["balanced", "skewed", "tail"])
@pytest.mark.parametrize("layout", ["separate", "packed", "transposed"])
@pytest.mark.parametrize("variant", ["infer", "train", "train_bias_gptoss"])
def test_grouped_swiglu(dtype, routing, layout, variant):
    from glu_fusion import grouped_reference
    t, e, n, k = 1000, 8, 264, 512
    torch.manual_seed(t + e + n)
    x = torch.randn(t, k, device="cuda", dtype=dtype)
    offsets = _routing(t, e, routing)
    wg, wu = _expert_weights(e, n, k, dtype, layout)
    bias = variant == "train_bias_gptoss"
    bg = torch.randn(e, n, device="cuda", dtype=dtype) if bias else None
    bu = torch.randn(e, n, device="cuda", dtype=dtype) if bias else None
    activation, alpha, limit = ("gptoss", 1.702, 7.0) if bias else ("silu", 0.0, 0.0)
    save = variant != "infer"
    assert host.grouped_serves(x, wg, wu, torch.empty(t, n, device="cuda", dtype=dtype))
    h = torch.full((t, n), float("nan"), device="cuda", dtype=dtype)
    pre = torch.full((t, 2 * n), float("nan"), device="cuda", dtype=dtype)
    g, u = (pre[:, :n], pre[:, n:]) if save else (None, None)
    host.grouped_swiglu_forward(x, offsets, wg, wu, bg, bu, h, g, u, 1 if bias else 0, alpha, limit)
    # float64 reference and eager (the projections rounded to the dtype, then the gate)
    g64, u64 = grouped_reference.grouped_preact(x.double(), offsets, wg.double(), wu.double(),
                                                None if bg is None else bg.double(), None if bu is None else bu.double())
    h64 = grouped_reference.gate(g64, u64, activation, alpha, limit)
    g_e, u_e = grouped_reference.grouped_preact(x, offsets, wg, wu, bg, bu)
    h_e = grouped_reference.gate(g_e, u_e, activation, alpha, limit)
    end = int(offsets[-1])
    assert not h.isnan().any()
    assert rel(h[:end], h64[:end]) <= 2 * rel(h_e[:end], h64[:end]) + 1e-4
    assert torch.equal(h[end:], torch.zeros_like(h[end:]))  # the padded tail
    if save:
        assert not pre.isnan().any()
        assert rel(g[:end], g64[:end]) <= 2 * rel(g_e[:end], g64[:end]) + 1e-4
        assert rel(u[:end], u64[:end]) <= 2 * rel(u_e[:end], u64[:end]) + 1e-4
        assert torch.equal(pre[end:], torch.zeros_like(pre[end:]))


# --- grouped (expert) plain GEMM: the down projection, in place or scattered to token slots ------

@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("routing", ["balanced", "skewed", "tail"])
@pytest.mark.parametrize("layout", ["separate", "transposed"])
@pytest.mark.parametrize("variant", ["plain", "bias", "scatter", "scatter_scaled_bias"])
def test_grouped_matmul(dtype, routing, layout, variant):
    from glu_fusion import grouped_reference
    t, e, n, k = 1000, 8, 264, 512
    torch.manual_seed(t + e + k)
    a = torch.randn(t, k, device="cuda", dtype=dtype)
    offsets = _routing(t, e, routing)
    if layout == "separate":
        w = torch.randn(e, n, k, device="cuda", dtype=dtype) / k ** 0.5
    else:  # an [E, K, N] storage read in place (N-major)
        w = (torch.randn(e, k, n, device="cuda", dtype=dtype) / k ** 0.5).transpose(1, 2)
    bias = torch.randn(e, n, device="cuda", dtype=dtype) if "bias" in variant else None
    end = int(offsets[-1])
    y64, _ = grouped_reference.grouped_preact(a.double(), offsets, w.double(), w.double(),
                                              None if bias is None else bias.double(), None)
    y_e, _ = grouped_reference.grouped_preact(a, offsets, w, w, bias, bias)  # eager, rounded to the dtype
    if not variant.startswith("scatter"):
        assert host.grouped_matmul_serves(a, w, torch.empty(t, n, device="cuda", dtype=dtype))
        out = torch.full((t, n), float("nan"), device="cuda", dtype=dtype)
        host.grouped_matmul(a, offsets, w, out, bias)
        assert not out.isnan().any()
        assert rel(out[:end], y64[:end]) <= 2 * rel(y_e[:end], y64[:end]) + 1e-4
        assert torch.equal(out[end:], torch.zeros_like(out[end:]))  # the padded tail
        return
    slots = t + 7  # every row a distinct slot; seven slots no row names
    dest = torch.randperm(slots, device="cuda")[:t].to(torch.int32)
    scale = torch.rand(t, device="cuda") + 0.5 if "scaled" in variant else None  # one weight per row
    out = torch.full((slots, n), float("nan"), device="cuda", dtype=dtype)
    assert host.grouped_matmul_serves(a, w, out, dest, scale)
    host.grouped_matmul(a, offsets, w, out, bias, dest=dest, scale=scale)
    routed = dest[:end].long()
    factor = scale[:end].double().unsqueeze(1) if scale is not None else 1.0
    ref = y64[:end] * factor
    eager = (y_e[:end].float() * (scale[:end].unsqueeze(1) if scale is not None else 1.0)).to(dtype)
    assert not out[routed].isnan().any()
    assert rel(out[routed], ref) <= 2 * rel(eager, ref) + 1e-4
    tail = dest[end:].long()
    assert torch.equal(out[tail], torch.zeros_like(out[tail]))  # the padded tail's slots: zeros
    unnamed = torch.ones(slots, dtype=torch.bool, device="cuda")
    unnamed[dest.long()] = False
    assert out[unnamed].isnan().all()  # slots no row names are never written


def test_grouped_matmul_scale_needs_slots():
    a = torch.randn(64, 64, device="cuda", dtype=torch.bfloat16)
    w = torch.randn(2, 64, 64, device="cuda", dtype=torch.bfloat16)
    offsets = torch.tensor([32, 64], device="cuda", dtype=torch.int32)
    with pytest.raises(ValueError, match="slots"):
        host.grouped_matmul(a, offsets, w, torch.empty(64, 64, device="cuda", dtype=torch.bfloat16),
                            scale=torch.ones(64, device="cuda"))
