"""The public functions: differentiable fused ops for eager code (``glu_fusion.swiglu`` ...).

The ops (custom-op registration, ~20 ms) are imported on the first call, not with the package:
the ``GLU_FUSION`` entry point imports the package at every ``import torch``.
"""
from __future__ import annotations

import numbers
from typing import Any, Optional

import torch
from torch import Tensor

from . import config
from .grouped_reference import GPTOSS_ALPHA, GPTOSS_LIMIT
from .layouts import LAYOUTS

__all__ = ["swiglu", "swiglu_packed", "mlp_block", "mlp_block_packed", "grouped_swiglu", "grouped_swiglu_packed",
           "grouped_down_combine", "rms_norm", "rms_norm_gated"]


def swiglu(x: Tensor, w_gate: Tensor, w_up: Tensor, bias_gate: Optional[Tensor] = None,
           bias_up: Optional[Tensor] = None) -> Tensor:
    """``silu(x @ w_gate.T + bias_gate) * (x @ w_up.T + bias_up)`` for ``x`` of shape ``[..., K]``
    and weights ``[N, K]``; differentiable in every argument.  Saves the ``[M, 2N]``
    pre-activations for backward unless ``config.recompute`` (``GLU_FUSION_RECOMPUTE=1``) is set."""
    from .ops import swiglu as swiglu_ops

    _tensors("swiglu", x=x, w_gate=w_gate, w_up=w_up)
    _optional_tensors("swiglu", bias_gate=bias_gate, bias_up=bias_up)
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

    _tensors("swiglu_packed", x=x, weight=weight)
    _optional_tensors("swiglu_packed", bias=bias)
    if layout not in LAYOUTS:
        raise ValueError(f"glu_fusion.swiglu_packed: layout must be one of {sorted(LAYOUTS)}, "
                         f"got {layout!r}")
    save = _save_preact(x, weight, bias)
    return swiglu_ops.swiglu_packed(x, weight, bias, LAYOUTS[layout], save)[0]


def mlp_block(x: Tensor, w_gate: Tensor, w_up: Tensor, w_down: Tensor, bias_gate: Optional[Tensor] = None,
              bias_up: Optional[Tensor] = None, bias_down: Optional[Tensor] = None) -> Tensor:
    """The whole gated MLP: ``down(silu(x @ w_gate.T + bias_gate) * (x @ w_up.T + bias_up))`` with
    ``w_down`` ``[D, N]`` (an ``nn.Linear(N, D)`` weight); differentiable in every argument.  Saves
    only the ``[M, 2N]`` pre-activations (or only ``x`` with ``config.recompute``); the backward
    recomputes ``h`` inside the GEMM that computes its gradient."""
    from .ops import mlp_block as block_ops

    _tensors("mlp_block", x=x, w_gate=w_gate, w_up=w_up, w_down=w_down)
    _optional_tensors("mlp_block", bias_gate=bias_gate, bias_up=bias_up, bias_down=bias_down)
    if (bias_gate is None) != (bias_up is None):
        raise ValueError("glu_fusion.mlp_block: give both bias_gate and bias_up, or neither")
    save = _save_preact(x, w_gate, w_up, bias_gate, bias_up, w_down, bias_down)
    return block_ops.mlp_block(x, w_gate, w_up, bias_gate, bias_up, w_down, bias_down, save)[0]


def mlp_block_packed(x: Tensor, weight: Tensor, w_down: Tensor, bias: Optional[Tensor] = None,
                     bias_down: Optional[Tensor] = None, layout: str = "concat") -> Tensor:
    """``mlp_block`` with one packed ``[2N, K]`` gate/up weight read in place (``layout`` as for
    ``swiglu_packed``)."""
    from .ops import mlp_block as block_ops

    _tensors("mlp_block_packed", x=x, weight=weight, w_down=w_down)
    _optional_tensors("mlp_block_packed", bias=bias, bias_down=bias_down)
    if layout not in LAYOUTS:
        raise ValueError(f"glu_fusion.mlp_block_packed: layout must be one of {sorted(LAYOUTS)}, "
                         f"got {layout!r}")
    save = _save_preact(x, weight, bias, w_down, bias_down)
    return block_ops.mlp_block_packed(x, weight, bias, LAYOUTS[layout], w_down, bias_down, save)[0]


def grouped_swiglu(x: Tensor, offsets: Tensor, w_gate: Tensor, w_up: Tensor,
                   bias_gate: Optional[Tensor] = None, bias_up: Optional[Tensor] = None, *,
                   activation: str = "silu", alpha: float = GPTOSS_ALPHA, limit: float = GPTOSS_LIMIT) -> Tensor:
    """Expert SwiGLU over tokens ``x`` [T, K] sorted by expert: ``offsets`` [E] int32 holds the
    cumulative token counts, ``w_gate``/``w_up`` are [E, N, K] (any strides), biases [E, N].
    Returns [T, N], zero on rows past ``offsets[-1]``.  ``activation="gptoss"`` applies gpt-oss's
    clamped gate with ``alpha`` and ``limit``.  Differentiable in x, the weights and biases.
    CPU offsets that are not cumulative counts (negative, decreasing, past T) raise ValueError;
    CUDA offsets are not checked, since reading them on the host would synchronise each call."""
    from .ops import grouped_swiglu as grouped_ops

    _tensors("grouped_swiglu", x=x, offsets=offsets, w_gate=w_gate, w_up=w_up)
    _optional_tensors("grouped_swiglu", bias_gate=bias_gate, bias_up=bias_up)
    save = _save_preact(x, w_gate, w_up, bias_gate, bias_up)
    return grouped_ops.grouped_swiglu(x, offsets, w_gate, w_up, bias_gate, bias_up, activation, float(alpha),
                                      float(limit), save)[0]


def grouped_swiglu_packed(x: Tensor, offsets: Tensor, weight: Tensor, bias: Optional[Tensor] = None,
                          layout: str = "concat", *, activation: str = "silu", alpha: float = GPTOSS_ALPHA,
                          limit: float = GPTOSS_LIMIT) -> Tensor:
    """Expert SwiGLU with one packed ``[E, 2N, K]`` weight (and ``[E, 2N]`` bias) read in place;
    ``layout`` as for ``swiglu_packed`` (gpt-oss: ``"interleaved"``; its ``[E, K, 2N]`` storage
    passes as ``weight.transpose(1, 2)``); ``offsets`` checked as for ``grouped_swiglu``."""
    from .ops import grouped_swiglu as grouped_ops

    _tensors("grouped_swiglu_packed", x=x, offsets=offsets, weight=weight)
    _optional_tensors("grouped_swiglu_packed", bias=bias)
    if layout not in LAYOUTS:
        raise ValueError(f"glu_fusion.grouped_swiglu_packed: layout must be one of {sorted(LAYOUTS)}, "
                         f"got {layout!r}")
    save = _save_preact(x, weight, bias)
    return grouped_ops.grouped_swiglu_packed(x, offsets, weight, bias, LAYOUTS[layout], activation, float(alpha),
                                             float(limit), save)[0]


def grouped_down_combine(h: Tensor, offsets: Tensor, w_down: Tensor, row_weights: Tensor, slots: Tensor, topk: int,
                         bias_down: Optional[Tensor] = None) -> Tensor:
    """The experts' down projection and combine: rows ``h`` [S, N] sorted by expert
    (``offsets`` as for ``grouped_swiglu``) times their expert's ``w_down`` [E, D, N] (+
    ``bias_down`` [E, D]), each scaled by its routing weight ``row_weights`` [S], summed per
    token over its ``topk`` rows: row ``r`` belongs to token ``slots[r] // topk`` (``slots``
    [S]: a permutation of ``range(S)``, the sort's permutation of the flattened top-k choices).
    Returns [S / topk, D]; rows past ``offsets[-1]`` add nothing.  Differentiable in h,
    ``w_down``, ``bias_down`` and ``row_weights``; the backward saves nothing of size [S, D]."""
    from .ops import grouped_combine

    _tensors("grouped_down_combine", h=h, offsets=offsets, w_down=w_down, row_weights=row_weights, slots=slots)
    _optional_tensors("grouped_down_combine", bias_down=bias_down)
    if isinstance(topk, bool) or not isinstance(topk, numbers.Integral):
        raise TypeError(f"glu_fusion.grouped_down_combine: topk must be an int, got {type(topk).__name__}")
    return grouped_combine.grouped_down_combine(h, offsets, w_down, bias_down, row_weights, slots, int(topk))


def rms_norm(x: Tensor, weight: Optional[Tensor] = None, eps: float = 1e-6, residual: Optional[Tensor] = None,
             *, weight_offset: float = 0.0, downcast: str = "none") -> tuple[Tensor, Tensor]:
    """``(y, h)``: ``h = x + residual`` (x itself without one) and ``y = rmsnorm(h)·(weight +
    weight_offset)`` over the last dimension, computed in fp32 and returned in x's dtype.
    ``weight_offset=1.0`` gives Gemma's ``(1 + w)``; ``downcast`` reproduces an eager spelling's
    roundings (module docstring of ``glu_fusion.ops.rms_norm``).  Differentiable in x, weight and
    residual, through both outputs."""
    from .ops import rms_norm as norm_ops

    _tensors("rms_norm", x=x)
    _optional_tensors("rms_norm", weight=weight, residual=residual)
    if x.dim() >= 1 and x.shape[-1] == 0:
        return _empty_rows_norm(x, weight, residual)
    y, h, _ = norm_ops.rms_norm(x, weight, residual, float(eps), float(weight_offset), downcast)
    return y, (h if residual is not None else x)


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

    _tensors("rms_norm_gated", x=x, z=z)
    _optional_tensors("rms_norm_gated", weight=weight)
    group_size = _group_size(group_size)
    if x.dim() >= 1 and x.shape[-1] == 0 and tuple(z.shape) == tuple(x.shape):
        return _empty_rows_norm(x, weight, None, z)[0]
    return norm_ops.rms_norm_gated(x, z, weight, float(eps), group_size, bool(norm_before_gate), activation,
                                   float(weight_offset), downcast, bool(gate_in_input_dtype))[0]


def _tensors(function: str, **arguments: Any) -> None:
    """A clear TypeError naming the argument, where the ops would fail on a missing attribute."""
    for name, value in arguments.items():
        if not isinstance(value, Tensor):
            raise TypeError(f"glu_fusion.{function}: {name} must be a torch.Tensor, got {type(value).__name__}")


def _optional_tensors(function: str, **arguments: Any) -> None:
    """As :func:`_tensors`, for arguments that may also be None."""
    _tensors(function, **{name: value for name, value in arguments.items() if value is not None})


def _group_size(group_size: Any) -> Optional[int]:
    """``group_size`` as the op's schema takes it (None or a positive int), checked here so that
    a float or a bool gets an error naming it instead of a schema mismatch."""
    if group_size is None:
        return None
    if isinstance(group_size, bool) or not isinstance(group_size, numbers.Integral):
        raise TypeError(f"glu_fusion.rms_norm_gated: group_size must be an int or None, got "
                        f"{type(group_size).__name__} {group_size!r}")
    if group_size <= 0:
        raise ValueError(f"glu_fusion.rms_norm_gated: group_size={group_size} must be positive")
    return int(group_size)


def _save_preact(*tensors: Optional[Tensor]) -> bool:
    """Write the pre-activations only when a backward can need them (and recompute is off):
    in inference the forward then writes only its output."""
    if config.recompute or not torch.is_grad_enabled():
        return False
    return any(t is not None and t.requires_grad for t in tensors)


def _empty_rows_norm(x: Tensor, weight: Optional[Tensor], residual: Optional[Tensor],
                     z: Optional[Tensor] = None) -> tuple[Tensor, Tensor]:
    """Rows of zero features (D = 0) normalise to nothing: empty outputs shaped as eager's, still
    connected to every input so that each gets its (empty) gradient."""
    if residual is not None and tuple(residual.shape) != tuple(x.shape):
        raise ValueError(f"glu_fusion: residual has shape {tuple(residual.shape)} but x has {tuple(x.shape)}")
    h = x if residual is None else x + residual
    y = h * 0 if z is None else h * z * 0
    if weight is not None:
        if tuple(weight.shape) != (0,):
            raise ValueError(f"glu_fusion: weight must have shape (0,) for x of shape {tuple(x.shape)}, "
                             f"got {tuple(weight.shape)}")
        y = y * weight.to(y.dtype)
    return y, h
