"""Shared helpers for the gated RMSNorm tests: inputs, a float64 oracle, real eager spellings.

The spellings are the forms real models write; each comes with the op flags that reproduce it.
"""
from __future__ import annotations

import itertools
from typing import Callable, NamedTuple, Optional

import torch
import torch.nn.functional as F

from glu_fusion import reference
from glu_fusion.functional import rms_norm_gated as rms_norm_gated_api

# Relative-error bounds (norm of the difference over the norm of the float64 result).
TOLERANCE = {torch.float32: 1e-5, torch.float16: 2e-3, torch.bfloat16: 1.6e-2}
EPS = 1e-5


def rel_error(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.double(), b.double()
    return ((a - b).norm() / b.norm().clamp_min(1e-30)).item()


def all_flag_sets() -> list:
    """Every combination of the op's semantic flags (weight given as a mode)."""
    out = []
    for nbg, act, group, wmode, downcast, gate_low in itertools.product(
            (True, False), ("silu", "sigmoid"), (None, 16), ("none", "plain", "offset"),
            ("none", "before_weight", "after_weight"), (False, True)):
        out.append(dict(norm_before_gate=nbg, activation=act, group_size=group, wmode=wmode,
                        downcast=downcast, gate_in_input_dtype=gate_low))
    return out


def flag_id(flags: dict) -> str:
    return "-".join(f"{v}" for v in flags.values())


def make_inputs(lead: tuple, d: int, dtype: torch.dtype, wmode: str = "plain",
                device: str = "cpu", weight_dtype: Optional[torch.dtype] = None):
    """x, z (requiring grad), weight or None, and weight_offset for a weight mode."""
    x = torch.randn(*lead, d, device=device).to(dtype).requires_grad_()
    z = (2 * torch.randn(*lead, d, device=device)).to(dtype).requires_grad_()
    if wmode == "none":
        return x, z, None, 0.0
    base = 0.1 if wmode == "offset" else 1.0
    w = (base * torch.randn(d, device=device) + (0.0 if wmode == "offset" else 1.0))
    return x, z, w.to(weight_dtype or dtype).requires_grad_(), (1.0 if wmode == "offset" else 0.0)


def op_kwargs(flags: dict, offset: float) -> dict:
    kw = {k: v for k, v in flags.items() if k != "wmode"}
    kw["weight_offset"] = offset
    return kw


def float64_oracle(x, z, w, kw: dict, dy: torch.Tensor):
    """The reference on float64 copies, differentiated by autograd: (y, [dx, dz, dw])."""
    leaves = [t.detach().double().requires_grad_() for t in (x, z) + ((w,) if w is not None else ())]
    xs, zs = leaves[0], leaves[1]
    ws = leaves[2] if w is not None else None
    y, _ = reference.rms_norm_gated(xs, zs, ws, EPS, **kw)
    grads = torch.autograd.grad(y, leaves, dy.double())
    return y, list(grads)


def check_against_float64(x, z, w, kw: dict, tol: float, run: Callable = rms_norm_gated_api) -> None:
    """Forward and every gradient within ``tol`` of the float64 reference."""
    y = run(x, z, w, EPS, **kw)
    assert y.dtype == x.dtype and y.shape == x.shape
    dy = torch.randn_like(y)
    leaves = [x, z] + ([w] if w is not None else [])
    grads = torch.autograd.grad(y, leaves, dy)
    y64, g64 = float64_oracle(x, z, w, kw, dy)
    errs = [rel_error(y, y64)] + [rel_error(a, b) for a, b in zip(grads, g64)]
    assert all(e < tol for e in errs), f"errors (y, dx, dz, dw) {errs} above {tol}"
    for g, leaf in zip(grads, leaves):
        assert g.dtype == leaf.dtype and g.shape == leaf.shape


def ulps(a: torch.Tensor, b: torch.Tensor) -> float:
    """Largest |a - b| in units of the last place (spacing) of b's dtype at each element of b."""
    finfo = torch.finfo(b.dtype)
    _, exponent = torch.frexp(b.double().abs().clamp_min(finfo.tiny))
    spacing = torch.ldexp(torch.full_like(b, finfo.eps, dtype=torch.float64), exponent - 1)
    return ((a.double() - b.double()).abs() / spacing).max().item() if b.numel() else 0.0


# --- eager spellings of real models ---------------------------------------------------------------

class Spelling(NamedTuple):
    name: str
    fn: Callable            # fn(x, z, w, eps) -> y
    kwargs: dict            # op flags that reproduce it (weight_offset included)
    group: Optional[int] = None


def hf_qwen3_next(x, z, w, eps):
    """HF Qwen3-Next: fp32 norm, downcast, weight in the input dtype, fp32 silu gate."""
    dt = x.dtype
    h = x.to(torch.float32)
    var = h.pow(2).mean(-1, keepdim=True)
    h = h * torch.rsqrt(var + eps)
    h = w * h.to(dt)
    h = h * F.silu(z.to(torch.float32))
    return h.to(dt)


def fp32_weight_gate(x, z, w, eps):
    """FLA / torchtitan style: everything in fp32, one downcast at the end."""
    xf = x.float()
    y = xf * torch.rsqrt((xf * xf).mean(-1, keepdim=True) + eps) * w.float()
    return (y * F.silu(z.float())).to(x.dtype)


def rms_norm_fn_then_silu(x, z, w, eps):
    """``F.rms_norm`` followed by the gate product in the input dtype."""
    return F.rms_norm(x, (x.shape[-1],), w, eps) * F.silu(z)


def llama_module_then_silu(x, z, w, eps):
    """A Llama-style RMSNorm module, then ``* F.silu(z)`` in the input dtype."""
    dt = x.dtype
    h = x.to(torch.float32)
    h = h * torch.rsqrt(h.square().mean(-1, keepdim=True) + eps)
    return (w * h.to(dt)) * F.silu(z)


def llama_module_then_fp32_silu(x, z, w, eps):
    """A Llama-style RMSNorm module, then the gate computed in fp32 and cast back first."""
    dt = x.dtype
    h = x.to(torch.float32)
    h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + eps)
    return w * h.to(dt) * F.silu(z.float()).to(dt)


def gated_before_norm_hf(x, z, w, eps):
    """HF Mamba-2 / Bamba / FalconH1 gated norm: gate first (fp32), weight after the downcast."""
    dt = x.dtype
    h = x.to(torch.float32)
    h = h * F.silu(z.to(torch.float32))
    var = h.pow(2).mean(-1, keepdim=True)
    h = h * torch.rsqrt(var + eps)
    return w * h.to(dt)


def mamba2_grouped(group):
    def fn(x, z, w, eps):
        """Mamba-2 reference, grouped, gate before norm, all fp32."""
        xf = x.float() * F.silu(z.float())
        xg = xf.view(*xf.shape[:-1], -1, group)
        y = (xg * torch.rsqrt(xg.pow(2).mean(-1, keepdim=True) + eps)).view(xf.shape) * w.float()
        return y.to(x.dtype)
    return fn


def offset_sigmoid(x, z, w, eps):
    """Gemma-style ``(1 + w)`` in fp32 with a sigmoid output gate."""
    xf = x.float()
    y = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps) * (1.0 + w.float())
    return (y * torch.sigmoid(z.float())).to(x.dtype)


def _kw(**kw):
    base = dict(norm_before_gate=True, activation="silu", group_size=None, weight_offset=0.0,
                downcast="none", gate_in_input_dtype=False)
    base.update(kw)
    return base


SPELLINGS = [
    Spelling("hf_qwen3_next", hf_qwen3_next, _kw(downcast="before_weight")),
    Spelling("fp32_weight_gate", fp32_weight_gate, _kw()),
    Spelling("rms_norm_fn_then_silu", rms_norm_fn_then_silu,
             _kw(downcast="after_weight", gate_in_input_dtype=True)),
    Spelling("llama_module_then_silu", llama_module_then_silu,
             _kw(downcast="before_weight", gate_in_input_dtype=True)),
    Spelling("llama_module_then_fp32_silu", llama_module_then_fp32_silu,
             _kw(downcast="before_weight", gate_in_input_dtype=True)),
    Spelling("gated_before_norm_hf", gated_before_norm_hf,
             _kw(norm_before_gate=False, downcast="before_weight")),
    Spelling("mamba2_grouped", mamba2_grouped(16), _kw(norm_before_gate=False, group_size=16), 16),
    Spelling("offset_sigmoid", offset_sigmoid, _kw(activation="sigmoid", weight_offset=1.0)),
]
