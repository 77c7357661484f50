"""Plain-torch semantics of every op: the CPU fallback and the test oracle.

Everything here is written with ordinary torch operations so that it runs anywhere,
differentiates with autograd and serves as the definition the Triton kernels must match.
"""
from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor

# ---------------------------------------------------------------------------------------------
# SwiGLU: out = silu(x @ Wg.T + bg) * (x @ Wu.T + bu)
# ---------------------------------------------------------------------------------------------


def swiglu_preact(x2d: Tensor, w_gate: Tensor, w_up: Tensor,
                  b_gate: Optional[Tensor], b_up: Optional[Tensor]) -> tuple[Tensor, Tensor]:
    """The two projections ``g`` and ``u`` of a 2-D input, each rounded to x's dtype as eager does."""
    g = torch.nn.functional.linear(x2d, w_gate, b_gate)
    u = torch.nn.functional.linear(x2d, w_up, b_up)
    return g, u


def upcast(t: Tensor) -> Tensor:
    """fp16/bf16 to fp32 for the elementwise math; fp32 and fp64 stay as they are."""
    return t.to(torch.promote_types(t.dtype, torch.float32))


def swiglu_gate(g: Tensor, u: Tensor) -> Tensor:
    """``silu(g) * u`` computed in (at least) fp32 and rounded once to the input dtype."""
    gf = upcast(g)
    return (gf * torch.sigmoid(gf) * upcast(u)).to(g.dtype)


def swiglu(x: Tensor, w_gate: Tensor, w_up: Tensor,
           b_gate: Optional[Tensor] = None, b_up: Optional[Tensor] = None) -> Tensor:
    """Reference forward for any leading shape of ``x`` (differentiable through autograd)."""
    g, u = swiglu_preact(x, w_gate, w_up, b_gate, b_up)
    return swiglu_gate(g, u)


def swiglu_grad_preact(dout: Tensor, g: Tensor, u: Tensor) -> tuple[Tensor, Tensor]:
    """Gradients of ``silu(g) * u`` with respect to ``g`` and ``u`` (fp32 math, x's dtype out)."""
    gf, uf, df = upcast(g), upcast(u), upcast(dout)
    sig = torch.sigmoid(gf)
    silu = gf * sig
    d_g = df * uf * sig * (1.0 + gf * (1.0 - sig))
    d_u = df * silu
    return d_g.to(g.dtype), d_u.to(g.dtype)


# ---------------------------------------------------------------------------------------------
# Gated RMSNorm: y = rmsnorm(x)·w·act(z)  or  rmsnorm(x·act(z))·w, per group of the last dim
# ---------------------------------------------------------------------------------------------

def _groups(t: Tensor, group_size: Optional[int]) -> Tensor:
    d = t.shape[-1]
    n = group_size or d
    return t.unflatten(-1, (d // n, n))


def _gate(zf: Tensor, activation: str) -> Tensor:
    return torch.nn.functional.silu(zf) if activation == "silu" else torch.sigmoid(zf)


def _round(t: Tensor, dtype: torch.dtype) -> Tensor:
    """Round a computation-dtype tensor to ``dtype`` and back, as an eager ``.to(dtype)`` does."""
    return t.to(dtype).to(t.dtype)


def rms_norm_gated(x: Tensor, z: Tensor, weight: Optional[Tensor], eps: float,
                   group_size: Optional[int] = None, norm_before_gate: bool = True,
                   activation: str = "silu", weight_offset: float = 0.0, downcast: str = "none",
                   gate_in_input_dtype: bool = False) -> tuple[Tensor, Tensor]:
    """Reference forward: ``(y, rstd)``, y in x's dtype, rstd ``[..., G]`` in the compute dtype.

    Computes in fp32 (float64 for float64 inputs) and rounds to x's dtype exactly where the
    flags say eager code does (see ``glu_fusion.ops.rms_norm_gated`` for their meaning).
    Differentiable through autograd.
    """
    dt = x.dtype
    cd = torch.promote_types(dt, torch.float32)
    xf = _groups(x, group_size).to(cd)
    g = _gate(_groups(z, group_size).to(cd), activation)
    if gate_in_input_dtype:
        g = _round(g, dt)
    if not norm_before_gate:
        xf = xf * g
        if gate_in_input_dtype:
            xf = _round(xf, dt)
    rstd = torch.rsqrt(xf.square().mean(-1, keepdim=True) + eps)
    h = xf * rstd
    if downcast == "before_weight":
        h = _round(h, dt)
    if weight is not None:
        w_eff = _groups(weight, group_size).to(cd) + weight_offset
        if downcast != "none" and weight_offset != 0.0:
            w_eff = _round(w_eff, weight.dtype)
        h = h * w_eff
        if downcast == "after_weight" or (downcast == "before_weight"
                                          and torch.promote_types(dt, weight.dtype) == dt):
            h = _round(h, dt)
    elif downcast != "none":
        h = _round(h, dt)
    y = h * g if norm_before_gate else h
    return y.flatten(-2).to(dt), rstd.squeeze(-1)


def rms_norm_gated_backward(dy: Tensor, x: Tensor, z: Tensor, weight: Optional[Tensor], rstd: Tensor,
                            group_size: Optional[int], norm_before_gate: bool, activation: str,
                            weight_offset: float) -> tuple[Tensor, Tensor, Optional[Tensor]]:
    """Explicit gradients ``(dx, dz, dweight)`` from the saved ``rstd``, in fp32 math (float64 for
    float64 inputs) without the forward's roundings; dweight is None without a weight."""
    cd = torch.promote_types(x.dtype, torch.float32)
    xf, zf, df = (_groups(t, group_size).to(cd) for t in (x, z, dy))
    r = rstd.to(cd).unsqueeze(-1)
    sig = torch.sigmoid(zf)
    g = zf * sig if activation == "silu" else sig
    dact = sig * (1.0 + zf * (1.0 - sig)) if activation == "silu" else sig * (1.0 - sig)
    w_eff = _groups(weight, group_size).to(cd) + weight_offset if weight is not None else None
    if norm_before_gate:
        n = xf * r
        dh = df * g
        h = n * w_eff if w_eff is not None else n
        dz = df * h * dact
        dn = dh * w_eff if w_eff is not None else dh
        w_src = dh * n
    else:
        n = xf * g * r
        dn = df * w_eff if w_eff is not None else df
        w_src = df * n
    ds = (dn - n * (dn * n).mean(-1, keepdim=True)) * r
    if norm_before_gate:
        dx = ds
    else:
        dx = ds * g
        dz = ds * xf * dact
    dw = None
    if weight is not None:
        dw = w_src.reshape(-1, x.shape[-1]).sum(0).to(weight.dtype)
    return dx.flatten(-2).to(x.dtype), dz.flatten(-2).to(x.dtype), dw


# ---------------------------------------------------------------------------------------------
# RMSNorm with the residual add: h = x + residual; y = rmsnorm(h)·(w + offset)
# ---------------------------------------------------------------------------------------------


def rms_norm(x: Tensor, weight: Optional[Tensor], residual: Optional[Tensor], eps: float,
             weight_offset: float = 0.0, downcast: str = "none") -> tuple[Tensor, Tensor, Tensor]:
    """Reference forward: ``(y, h, rstd)``; ``h = x + residual`` in x's dtype (x itself without a
    residual), y in x's dtype, rstd ``[...]`` in the compute dtype.  ``downcast`` places the
    roundings as for ``rms_norm_gated`` (see ``glu_fusion.ops.rms_norm``).  Differentiable."""
    h = x + residual if residual is not None else x
    dt = h.dtype
    cd = torch.promote_types(dt, torch.float32)
    hf = h.to(cd)
    rstd = torch.rsqrt(hf.pow(2).mean(-1, keepdim=True) + eps)
    n = hf * rstd
    if downcast == "before_weight":
        n = _round(n, dt)
    if weight is not None:
        w_eff = weight.to(cd) + weight_offset
        if downcast != "none" and weight_offset != 0.0:
            w_eff = _round(w_eff, weight.dtype)
        n = n * w_eff
        if downcast == "after_weight" or (downcast == "before_weight"
                                          and torch.promote_types(dt, weight.dtype) == dt):
            n = _round(n, dt)
    return n.to(dt), h, rstd.squeeze(-1)


def rms_norm_backward(dy: Tensor, dh: Optional[Tensor], h: Tensor, weight: Optional[Tensor], rstd: Tensor,
                      weight_offset: float) -> tuple[Tensor, Optional[Tensor]]:
    """Explicit gradients ``(dh_total, dweight)`` from the saved ``h`` and ``rstd``: the gradient
    reaching ``h`` through the norm plus ``dh`` (the gradient of the ``h`` output), which is
    both dx and dresidual.  fp32 math (float64 for float64), roundings taken as identity."""
    cd = torch.promote_types(h.dtype, torch.float32)
    hf, df = h.to(cd), dy.to(cd)
    r = rstd.to(cd).unsqueeze(-1)
    n = hf * r
    dn = df * (weight.to(cd) + weight_offset) if weight is not None else df
    ds = (dn - n * (dn * n).mean(-1, keepdim=True)) * r
    if dh is not None:
        ds = ds + dh.to(cd)
    dw = (df * n).reshape(-1, h.shape[-1]).sum(0).to(weight.dtype) if weight is not None else None
    return ds.to(h.dtype), dw
