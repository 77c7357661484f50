"""The public functions: differentiable fused ops for eager code (``glu_fusion.swiglu`` ...).

The ops (custom-op registration, ~20 ms) are imported on the first call, not with the package:
the ``GLU_FUSION`` entry point imports the package at every ``import torch``.
"""
from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor

from . import config
from .layouts import LAYOUTS

__all__ = ["swiglu", "swiglu_packed", "rms_norm_gated"]


def swiglu(x: Tensor, w_gate: Tensor, w_up: Tensor, bias_gate: Optional[Tensor] = None,
           bias_up: Optional[Tensor] = None) -> Tensor:
    """``silu(x @ w_gate.T + bias_gate) * (x @ w_up.T + bias_up)`` for ``x`` of shape ``[..., K]``
    and weights ``[N, K]``; differentiable in every argument.  Saves the ``[M, 2N]``
    pre-activations for backward unless ``config.recompute`` (``GLU_FUSION_RECOMPUTE=1``) is set."""
    from .ops import swiglu as swiglu_ops

    if (bias_gate is None) != (bias_up is None):
        raise ValueError("glu_fusion.swiglu: give both bias_gate and bias_up, or neither")
    save = _save_preact(x, w_gate, w_up, bias_gate, bias_up)
    return swiglu_ops.swiglu(x, w_gate, w_up, bias_gate, bias_up, save)[0]


def swiglu_packed(x: Tensor, weight: Tensor, bias: Optional[Tensor] = None,
                  layout: str = "concat") -> Tensor:
    """SwiGLU with one packed ``[2N, K]`` weight (and optional ``[2N]`` bias), read in place.

    ``layout="concat"``: gate rows first, then up rows (``y.chunk(2, -1)`` order);
    ``"interleaved"``: gate rows at even indices (``y[..., ::2]``), up rows at odd ones.
    ``"concat_up_first"`` and ``"interleaved_up_first"`` put the up half first.
    """
    from .ops import swiglu as swiglu_ops

    if layout not in LAYOUTS:
        raise ValueError(f"glu_fusion.swiglu_packed: layout must be one of {sorted(LAYOUTS)}, "
                         f"got {layout!r}")
    save = _save_preact(x, weight, bias)
    return swiglu_ops.swiglu_packed(x, weight, bias, LAYOUTS[layout], save)[0]


def rms_norm_gated(x: Tensor, z: Tensor, weight: Optional[Tensor] = None, eps: float = 1e-6,
                   group_size: Optional[int] = None, norm_before_gate: bool = True,
                   activation: str = "silu", *, weight_offset: float = 0.0,
                   downcast: str = "none", gate_in_input_dtype: bool = False) -> Tensor:
    """Gated RMSNorm over the last dimension of ``x`` and ``z`` (same shape ``[..., D]``).

    ``norm_before_gate=True``: ``rmsnorm(x) * w * act(z)``; ``False``: ``rmsnorm(x * act(z)) * w``,
    with ``w = weight + weight_offset`` (``weight_offset=1.0`` for the ``(1 + w)`` form; no
    weight means 1), ``act`` ``"silu"`` or ``"sigmoid"``, and each group of ``group_size``
    columns (a divisor of D; None: the whole row) normalised on its own.  Computes in fp32 and
    returns x's dtype; ``downcast`` (``"none"``, ``"before_weight"``, ``"after_weight"``) and
    ``gate_in_input_dtype`` reproduce the roundings of a given eager spelling (module docstring
    of ``glu_fusion.ops.rms_norm_gated``).  Differentiable in x, z and weight; x and z may be
    strided views (unit last stride avoids a copy).
    """
    from .ops import rms_norm_gated as norm_ops

    return norm_ops.rms_norm_gated(x, z, weight, float(eps), group_size, bool(norm_before_gate), activation,
                                   float(weight_offset), downcast, bool(gate_in_input_dtype))[0]


def _save_preact(*tensors: Optional[Tensor]) -> bool:
    """Write the pre-activations only when a backward can need them (and recompute is off):
    in inference the forward then writes only its output."""
    if config.recompute or not torch.is_grad_enabled():
        return False
    return any(t is not None and t.requires_grad for t in tensors)
