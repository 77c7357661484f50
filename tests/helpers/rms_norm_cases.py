"""Shared helpers for the RMSNorm tests: inputs, a float64 oracle, and the eager spellings of
real models with the op flags that reproduce each."""
from __future__ import annotations

from typing import Callable, NamedTuple, Optional

import torch
import torch.nn.functional as F

from glu_fusion import reference
from glu_fusion.functional import rms_norm as rms_norm_api

from helpers.norm_cases import TOLERANCE, rel_error  # noqa: F401  (re-exported)

EPS = 1e-5


def make_inputs(rows: int, d: int, dtype: torch.dtype, residual: bool, offset: bool,
                device: str = "cpu", lead: Optional[tuple] = None):
    """x, residual (or None) and weight, all requiring grad; a zero-centred weight for the
    ``(1 + w)`` form."""
    shape = (*(lead or (rows,)), d)
    x = torch.randn(shape, device=device).to(dtype).requires_grad_()
    r = torch.randn(shape, device=device).to(dtype).requires_grad_() if residual else None
    w = 0.1 * torch.randn(d, device=device) + (0.0 if offset else 1.0)
    return x, r, w.to(dtype).requires_grad_()


def check_against_float64(x, r, w, kw: dict, tol: float, run: Callable = rms_norm_api) -> None:
    """Forward (y and h) and the gradients of x, the residual and the weight, taking gradients
    through both outputs, within ``tol`` of the float64 reference."""
    y, h = run(x, w, EPS, r, **kw)
    assert y.dtype == x.dtype and y.shape == x.shape and h.shape == x.shape
    leaves = [t for t in (x, w, r) if t is not None]
    dy = torch.randn_like(y)
    outs, grads_out = [y], [dy]
    if r is not None:
        outs.append(h)
        grads_out.append(torch.randn_like(h))
    grads = torch.autograd.grad(outs, leaves, grads_out)
    leaves64 = [t.detach().double().requires_grad_() for t in leaves]
    x64, w64 = leaves64[0], leaves64[1]
    r64 = leaves64[2] if r is not None else None
    y64, h64, _ = reference.rms_norm(x64, w64, r64, EPS, kw.get("weight_offset", 0.0))
    grads64 = torch.autograd.grad([y64, h64][:len(outs)], leaves64, [g.double() for g in grads_out])
    errs = [rel_error(y, y64), rel_error(h, h64)] + [rel_error(a, b) for a, b in zip(grads, grads64)]
    assert all(e < tol for e in errs), f"errors (y, h, dx, dw, dres) {errs} above {tol}"
    for g, leaf in zip(grads, leaves):
        assert g.dtype == leaf.dtype and g.shape == leaf.shape


# --- eager spellings ------------------------------------------------------------------------------

class Spelling(NamedTuple):
    name: str
    fn: Callable            # fn(x, w, eps) -> y
    kwargs: dict            # op flags that reproduce it


def hf_llama(x, w, eps):
    """HF Llama / Qwen3 ``RMSNorm``: fp32 norm, downcast, then the weight."""
    dt = x.dtype
    h = x.to(torch.float32)
    var = h.pow(2).mean(-1, keepdim=True)
    h = h * torch.rsqrt(var + eps)
    return w * h.to(dt)


def gemma(x, w, eps):
    """HF Gemma ``RMSNorm``: ``(1 + w)`` in fp32 before the downcast."""
    xf = x.float()
    out = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps)
    out = out * (1.0 + w.float())
    return out.type_as(x)


def rms_norm_fn(x, w, eps):
    return F.rms_norm(x, (x.shape[-1],), w, eps)


SPELLINGS = [
    Spelling("hf_llama", hf_llama, dict(downcast="before_weight")),
    Spelling("gemma", gemma, dict(weight_offset=1.0, downcast="none")),
    Spelling("rms_norm_fn", rms_norm_fn, dict(downcast="after_weight")),
]


# --- look-alikes: norms the residual + RMSNorm family must leave alone -----------------------------

def layer_norm(x, r, w):
    return F.layer_norm(x + r, (x.shape[-1],), w, None, EPS)


def manual_layer_norm(x, r, w):
    h = (x + r).float()
    c = h - h.mean(-1, keepdim=True)
    return (c * torch.rsqrt(c.pow(2).mean(-1, keepdim=True) + EPS) * w).to(x.dtype)


def l2_norm(x, r, w):
    h = (x + r).float()
    return (h * torch.rsqrt(h.pow(2).sum(-1, keepdim=True) + EPS) * w).to(x.dtype)


def normed_reused(x, r, w):
    h = (x + r).float()
    n = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + EPS)
    return (n * w).to(x.dtype), n.sum()


def low_precision(x, r, w):
    h = x + r
    return h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + EPS) * w


LOOKALIKES = [layer_norm, manual_layer_norm, l2_norm, normed_reused, low_precision]
