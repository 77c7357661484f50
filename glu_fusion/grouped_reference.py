"""Plain-torch semantics of the grouped (mixture-of-experts) SwiGLU: the CPU fallback and the
test oracle of ``glu_fusion::grouped_swiglu``.

Tokens ``x`` [T, K] are sorted by expert; ``offsets`` [E] holds the cumulative token counts, so
expert ``e`` owns rows ``offsets[e-1]:offsets[e]`` (``0:offsets[0]`` for the first).  Rows from
``offsets[-1]`` to ``T`` belong to no expert (a padded tail): their output is zero.  Everything
here loops over experts on the host and differentiates with autograd.
"""
from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor

from .reference import swiglu_gate, upcast

ACTIVATIONS = ("silu", "gptoss")
#: gpt-oss's gate constants (its model config's ``swiglu_limit`` and the fixed alpha).
GPTOSS_ALPHA = 1.702
GPTOSS_LIMIT = 7.0


def expert_ranges(offsets: Tensor, t: int) -> list[tuple[int, int]]:
    """``(start, end)`` row range of every expert, clipped to the ``t`` rows present."""
    ranges, start = [], 0
    for end in offsets.tolist():
        end = max(start, min(int(end), t))
        ranges.append((start, end))
        start = end
    return ranges


def grouped_linear(x: Tensor, offsets: Tensor, w: Tensor, b: Optional[Tensor] = None) -> Tensor:
    """Each expert's rows times its weight: ``xₑ·Wₑᵀ + bₑ`` with ``w`` [E, N, K] and ``b``
    [E, N], rounded to x's dtype as ``F.linear`` rounds it; zero rows for the padded tail."""
    t, n = x.shape[0], w.shape[1]
    out = x.new_zeros((t, n))
    for e, (start, end) in enumerate(expert_ranges(offsets, t)):
        if end > start:
            out[start:end] = torch.nn.functional.linear(x[start:end], w[e], None if b is None else b[e])
    return out


def grouped_preact(x: Tensor, offsets: Tensor, w_gate: Tensor, w_up: Tensor,
                   b_gate: Optional[Tensor], b_up: Optional[Tensor]) -> tuple[Tensor, Tensor]:
    """Each expert's two projections ``g``, ``u`` [T, N] (rounded to x's dtype as ``F.linear``
    rounds them); zero rows for the padded tail."""
    return grouped_linear(x, offsets, w_gate, b_gate), grouped_linear(x, offsets, w_up, b_up)


def gptoss_gate(g: Tensor, u: Tensor, alpha: float, limit: float) -> Tensor:
    """gpt-oss's clamped gate ``(clamp(u, ±limit) + 1) · g' · σ(alpha·g')`` with
    ``g' = clamp(g, max=limit)``, in fp32 and rounded once to the input dtype."""
    gf = upcast(g).clamp(max=limit)
    uf = upcast(u).clamp(-limit, limit)
    return ((uf + 1) * gf * torch.sigmoid(alpha * gf)).to(g.dtype)


def gate(g: Tensor, u: Tensor, activation: str, alpha: float, limit: float) -> Tensor:
    if activation == "silu":
        return swiglu_gate(g, u)
    if activation == "gptoss":
        return gptoss_gate(g, u, alpha, limit)
    raise ValueError(f"glu_fusion: activation must be one of {ACTIVATIONS}, got {activation!r}")


def gate_grad(dout: Tensor, g: Tensor, u: Tensor, activation: str, alpha: float,
              limit: float) -> tuple[Tensor, Tensor]:
    """Gradients of ``gate(g, u)`` with respect to ``g`` and ``u`` (fp32 math, x's dtype out).

    For gpt-oss the gradient is zero where a clamp is active, as torch's ``clamp`` backward
    defines it (it passes the gradient at the limit itself)."""
    gf, uf, df = upcast(g), upcast(u), upcast(dout)
    if activation == "silu":
        sig = torch.sigmoid(gf)
        d_g = df * uf * sig * (1.0 + gf * (1.0 - sig))
        d_u = df * gf * sig
    elif activation == "gptoss":
        gc = gf.clamp(max=limit)
        uc = uf.clamp(-limit, limit)
        sig = torch.sigmoid(alpha * gc)
        d_g = torch.where(gf <= limit, df * (uc + 1) * sig * (1.0 + alpha * gc * (1.0 - sig)), 0.0)
        d_u = torch.where((uf >= -limit) & (uf <= limit), df * gc * sig, 0.0)
    else:
        raise ValueError(f"glu_fusion: activation must be one of {ACTIVATIONS}, got {activation!r}")
    return d_g.to(g.dtype), d_u.to(g.dtype)


def grouped_swiglu(x: Tensor, offsets: Tensor, w_gate: Tensor, w_up: Tensor,
                   b_gate: Optional[Tensor] = None, b_up: Optional[Tensor] = None,
                   activation: str = "silu", alpha: float = GPTOSS_ALPHA,
                   limit: float = GPTOSS_LIMIT) -> Tensor:
    """Reference forward ``[T, N]``, differentiable in x, the weights and the biases."""
    g, u = grouped_preact(x, offsets, w_gate, w_up, b_gate, b_up)
    return gate(g, u, activation, alpha, limit)


def grouped_weight_grad(dh: Tensor, x: Tensor, offsets: Tensor, e: int) -> tuple[Tensor, Tensor]:
    """``(dW [E, 2N, K], db [E, 2N])`` of the projections from ``dH = [dG | dU]`` [T, 2N]:
    per expert ``dHₑᵀ·xₑ`` and the column sums of ``dHₑ``; zero for experts without tokens."""
    k, n2 = x.shape[1], dh.shape[1]
    dw = x.new_zeros((e, n2, k))
    db = x.new_zeros((e, n2))
    for i, (start, end) in enumerate(expert_ranges(offsets, x.shape[0])):
        if end > start:
            dw[i] = dh[start:end].t() @ x[start:end]
            db[i] = upcast(dh[start:end]).sum(0).to(db.dtype)
    return dw, db


def grouped_input_grad(dh: Tensor, offsets: Tensor, w_gate: Tensor, w_up: Tensor) -> Tensor:
    """``dX`` [T, K] = ``dGₑ·Wgₑ + dUₑ·Wuₑ`` per expert; zero rows for the padded tail."""
    n = w_gate.shape[1]
    dx = dh.new_zeros((dh.shape[0], w_gate.shape[2]))
    for i, (start, end) in enumerate(expert_ranges(offsets, dh.shape[0])):
        if end > start:
            dx[start:end] = torch.addmm(dh[start:end, :n] @ w_gate[i], dh[start:end, n:], w_up[i])
    return dx
