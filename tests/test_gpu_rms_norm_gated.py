"""Gated RMSNorm kernels compiled for the GPU: every dtype, head and model widths, against float64.

Each error (forward and the three gradients) must be within the dtype's bound and no worse than
twice eager's own error against the same float64 reference.  The float64 oracle and eager run in
row chunks so that the largest shapes fit in device memory; the op runs on the whole tensor.
"""
from __future__ import annotations

import pytest
import torch

from glu_fusion import reference
from glu_fusion.functional import rms_norm_gated as rms_norm_gated_api

from helpers.norm_cases import EPS, TOLERANCE, fp32_weight_gate, gated_before_norm_hf, hf_qwen3_next

pytestmark = [pytest.mark.gpu,
              pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")]

DIMS = (64, 128, 256, 1024, 4096)
ROWS = (1, 32, 131072, 524288)
# From 2^28 elements (1 GiB a tensor in fp32, with a dozen such tensors alive) a case runs alone,
# with the other memory-heavy tests (marker ``bigmem``), not beside other test processes.
BIGMEM_ELEMENTS = 1 << 28
SHAPES = [pytest.param(d, rows, marks=[pytest.mark.bigmem] if rows == 524288 or rows * d >= BIGMEM_ELEMENTS else [])
          for d in DIMS for rows in ROWS]
CHUNK_ELEMENTS = 1 << 24

# (name, op flags, eager spelling); eager spellings take (x, z, w, eps).
VARIANTS = {
    "fp32": (dict(), fp32_weight_gate),
    "hf_qwen3_next": (dict(downcast="before_weight"), hf_qwen3_next),
    "gate_first_hf": (dict(norm_before_gate=False, downcast="before_weight"), gated_before_norm_hf),
}


class _ErrorSum:
    """Relative error ``|a - b| / |b|`` accumulated over chunks, in float64."""

    def __init__(self):
        self.diff = 0.0
        self.ref = 0.0

    def add(self, got: torch.Tensor, ref: torch.Tensor) -> None:
        self.diff += (got.double() - ref).pow(2).sum().item()
        self.ref += ref.pow(2).sum().item()

    @property
    def value(self) -> float:
        return (self.diff / max(self.ref, 1e-300)) ** 0.5


def _errors(x, z, w, dy, kw, spelling, y, grads):
    """(ours, eager) relative errors for y, dx, dz, dw against float64, chunk by chunk."""
    ours = [_ErrorSum() for _ in range(4)]
    eager = [_ErrorSum() for _ in range(4)]
    rows = x.shape[0]
    step = max(1, CHUNK_ELEMENTS // x.shape[1])
    dw64 = torch.zeros(x.shape[1], dtype=torch.float64, device=x.device)
    dw_eager = torch.zeros_like(dw64)
    w64 = w.double()
    for start in range(0, rows, step):
        sl = slice(start, min(rows, start + step))
        x64, z64, dy64 = x[sl].double(), z[sl].double(), dy[sl].double()
        y64, rstd64 = reference.rms_norm_gated(x64, z64, w64, EPS, **kw)
        dx64, dz64, dwc = reference.rms_norm_gated_backward(
            dy64, x64, z64, w64, rstd64, kw.get("group_size"), kw.get("norm_before_gate", True), "silu", 0.0)
        dw64 += dwc
        for acc, got, ref in zip(ours[:3], (y[sl], grads[0][sl], grads[1][sl]), (y64, dx64, dz64)):
            acc.add(got, ref)
        xe, ze = x[sl].clone().requires_grad_(), z[sl].clone().requires_grad_()
        we = w.detach().clone().requires_grad_()
        with torch.enable_grad():  # the caller runs the oracle under no_grad
            ye = spelling(xe, ze, we, EPS)
            gx, gz, gw = torch.autograd.grad(ye, (xe, ze, we), dy[sl])
        dw_eager += gw.double()
        for acc, got, ref in zip(eager[:3], (ye, gx, gz), (y64, dx64, dz64)):
            acc.add(got, ref)
    ours[3].add(grads[2], dw64)
    eager[3].add(dw_eager, dw64)
    return [e.value for e in ours], [e.value for e in eager]


@pytest.mark.parametrize("d, rows", SHAPES)
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
def test_against_float64_and_eager(dtype, d, rows):
    # fp32 at 524288 x 4096 (2^31 elements, 8 GiB a tensor) holds about 50 GiB: an H200 has room
    variant = "hf_qwen3_next" if dtype == torch.bfloat16 else "fp32"
    check(dtype, d, rows, variant)


@pytest.mark.parametrize("variant", sorted(VARIANTS))
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_spelling_variants(variant, dtype):
    check(dtype, 128, 4099, variant)


def test_grouped_gate_first():
    """Mamba-2 layout: D = 4096 in 8 groups, gate before the norm."""
    torch.manual_seed(3)
    x = torch.randn(2048, 4096, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    z = torch.randn_like(x, requires_grad=True)
    w = torch.randn(4096, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    kw = dict(group_size=512, norm_before_gate=False)
    y = rms_norm_gated_api(x, z, w, EPS, **kw)
    dy = torch.randn_like(y)
    got = torch.autograd.grad(y, (x, z, w), dy)
    leaves = [t.detach().double().requires_grad_() for t in (x, z, w)]
    y64, _ = reference.rms_norm_gated(*leaves, EPS, **kw)
    exp = torch.autograd.grad(y64, leaves, dy.double())
    for a, b in zip((y,) + got, (y64,) + exp):
        assert ((a.double() - b).norm() / b.norm()).item() < TOLERANCE[torch.bfloat16]


def check(dtype, d, rows, variant):
    torch.manual_seed(d + rows)
    kw, spelling = VARIANTS[variant]
    x = torch.randn(rows, d, device="cuda", dtype=dtype, requires_grad=True)
    z = (2 * torch.randn(rows, d, device="cuda")).to(dtype).requires_grad_()
    w = (1 + 0.1 * torch.randn(d, device="cuda")).to(dtype).requires_grad_()
    y = rms_norm_gated_api(x, z, w, EPS, **kw)
    dy = torch.randn_like(y)
    grads = torch.autograd.grad(y, (x, z, w), dy)
    with torch.no_grad():
        ours, eager = _errors(x.detach(), z.detach(), w.detach(), dy, kw, spelling, y.detach(), grads)
    tol = TOLERANCE[dtype]
    for name, o, e in zip(("y", "dx", "dz", "dw"), ours, eager):
        assert o < tol and o <= max(2 * e, tol / 4), f"{name}: ours {o:.3e}, eager {e:.3e}, bound {tol}"
