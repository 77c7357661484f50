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
