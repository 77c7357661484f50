"""The RMSNorm custom ops, with the residual add of a decoder layer fused in.

Ops (namespace ``glu_fusion``), both functional:

* ``rms_norm(x, weight, residual, eps, weight_offset, downcast) -> (y, h, rstd)``
* ``rms_norm_backward(dy, dh, h, weight, rstd, weight_offset, need_weight) -> (dx, dweight)``;
  ``dweight`` is an empty tensor when not asked for.

Semantics over the last dimension D::

    h = x + residual            (in x's dtype, as eager adds; h = x without a residual)
    y = rmsnorm(h) · (weight + weight_offset)

``y`` and ``h`` are what a decoder layer passes on: the normalised input of the next block and
the new residual stream.  Without a residual ``h`` is returned as an empty tensor (the caller
already holds x).  ``weight`` is optional (``[D]``; None means 1), ``rstd = 1/sqrt(mean(h²) +
eps)`` is saved per row in fp32.  ``downcast`` places the roundings to x's dtype where the
model's eager code has them, as for ``rms_norm_gated``:

* ``"none"``: weight applied in fp32, one rounding at the end (Gemma's
  ``(x.float() * (1 + w.float())).type_as(x)``, fp32 models);
* ``"before_weight"``: HF Llama / Qwen: ``weight * hidden.to(input_dtype)``; the product is
  rounded again when it is in x's dtype (it is not with an fp32 weight and a bf16 x);
* ``"after_weight"``: one rounding after the weight (``F.rms_norm`` / ``nn.RMSNorm``).

The kernels' own summation order and ``sqrt`` differ from eager's, so outputs match eager
within one unit in the last place; the reference path (CPU without the interpreter, float64)
is the eager spelling itself.

Backward: ``dx = dresidual = (gradient through the norm) + dh``, fp32 math, roundings as
identity; the weight gradient is reduced deterministically (per-program fp32 partial rows, then
one sum).  Autocast casts nothing (the eager spellings upcast and downcast explicitly).

Rows: up to ``DECODE_MAX_ROWS`` rows run one row per program with one or two warps (decode
latency); more rows run multi-row tiles.  The choice is made in ``_per_row`` only.
"""
from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor

from .. import reference
from .autocast import register_autocast_passthrough
from .dispatch import SUPPORTED_DTYPES, check_same, empty_like_nothing, register_cuda_fast_path, use_kernels
from .graph_twins import register_graph_twins
from .plan_cache import PlanCache, plans_enabled, tensor_key

DOWNCASTS = ("none", "before_weight", "after_weight")
_MAX_KERNEL_D = 32768  # mirrors kernels.norms.rms_norm.MAX_D, without importing Triton

#: Calls with at most this many rows take the one-row-per-program launch.  Unmeasured on the
#: GPU: engines switch between 1 and 64 rows; set from benchmarks/bench_norms.py.
DECODE_MAX_ROWS = 64


def _per_row(rows: int) -> bool:
    """Whether a forward of ``rows`` rows takes the decode (one row per program) launch."""
    return rows <= DECODE_MAX_ROWS


def _check(x: Tensor, weight: Optional[Tensor], residual: Optional[Tensor], eps: float, downcast: str) -> None:
    if x.dim() < 1 or x.shape[-1] == 0:
        raise ValueError("glu_fusion.rms_norm: x must be [..., D] with D > 0")
    if residual is not None and tuple(residual.shape) != tuple(x.shape):
        raise ValueError(f"glu_fusion.rms_norm: residual has shape {tuple(residual.shape)} but x has "
                         f"{tuple(x.shape)}; they must be equal")
    check_same("x", x, [("residual", residual)])
    d = x.shape[-1]
    if weight is not None:
        if tuple(weight.shape) != (d,):
            raise ValueError(f"glu_fusion.rms_norm: weight must have shape ({d},), got {tuple(weight.shape)}")
        if weight.device != x.device:
            raise ValueError(f"glu_fusion.rms_norm: weight is on {weight.device} but x is on {x.device}")
        if weight.dtype not in SUPPORTED_DTYPES or (weight.dtype == torch.float64) != (x.dtype == torch.float64):
            raise TypeError(f"glu_fusion.rms_norm: weight has dtype {weight.dtype}; with x in {x.dtype} it "
                            "must be float32, float16 or bfloat16 (float64 only with float64 x)")
    if downcast not in DOWNCASTS:
        raise ValueError(f"glu_fusion.rms_norm: downcast must be one of {DOWNCASTS}, got {downcast!r}")
    if not eps >= 0.0:
        raise ValueError(f"glu_fusion.rms_norm: eps must be >= 0, got {eps}")


def _kernels_serve(x: Tensor) -> bool:
    return use_kernels(x) and x.shape[-1] <= _MAX_KERNEL_D


def _rounding_flags(x: Tensor, weight: Optional[Tensor], weight_offset: float, downcast: str) -> tuple:
    """The kernel's ``round_normed, round_weighted, round_w_eff`` for the op's ``downcast``."""
    round_weighted = downcast == "after_weight" or (
        downcast == "before_weight" and (weight is None or torch.promote_types(x.dtype, weight.dtype) == x.dtype))
    return downcast == "before_weight", round_weighted, downcast != "none" and weight_offset != 0.0


def _rows(x: Tensor) -> int:
    return x.numel() // x.shape[-1]


# --- forward --------------------------------------------------------------------------------------

@torch.library.custom_op("glu_fusion::rms_norm", mutates_args=())
def rms_norm(x: Tensor, weight: Optional[Tensor], residual: Optional[Tensor], eps: float,
             weight_offset: float, downcast: str) -> tuple[Tensor, Tensor, Tensor]:
    if plans_enabled(x):
        key = (tensor_key(x), tensor_key(weight), tensor_key(residual), eps, weight_offset, downcast)
        plan = _FORWARD_PLANS.get(key, x, weight, residual, eps, weight_offset, downcast)
        if plan is not None:
            return plan(x, weight, residual)
    _check(x, weight, residual, eps, downcast)
    if not _kernels_serve(x):
        y, h, rstd = reference.rms_norm(x, weight, residual, eps, weight_offset, downcast)
        h = h.contiguous() if residual is not None else empty_like_nothing(x)
        return y.contiguous(), h, rstd.contiguous()
    from ..kernels.norms import rms_norm as kernels
    y = torch.empty(x.shape, device=x.device, dtype=x.dtype)
    h = torch.empty(x.shape, device=x.device, dtype=x.dtype) if residual is not None else None
    rstd = torch.empty(x.shape[:-1], device=x.device, dtype=torch.float32)
    kernels.rms_norm_forward(x, weight, residual, y, h, rstd, eps, weight_offset,
                             *_rounding_flags(x, weight, weight_offset, downcast), _per_row(_rows(x)))
    return y, (h if h is not None else empty_like_nothing(x)), rstd


def _build_forward_plan(x, weight, residual, eps, weight_offset, downcast):
    """The forward's host work for this argument signature, done once; None: general path."""
    _check(x, weight, residual, eps, downcast)
    if not _kernels_serve(x) or x.numel() == 0:
        return None
    from ..kernels.norms import rms_norm as kernels
    launch = kernels.forward_plan(x, weight, residual, eps, weight_offset,
                                  *_rounding_flags(x, weight, weight_offset, downcast), _per_row(_rows(x)))
    if launch is None:
        return None
    shape, device, dtype = x.shape, x.device, x.dtype

    def run(x, weight, residual):
        y = torch.empty(shape, device=device, dtype=dtype)
        h = torch.empty(shape, device=device, dtype=dtype) if residual is not None else None
        rstd = torch.empty(shape[:-1], device=device, dtype=torch.float32)
        launch(x, residual if residual is not None else x, weight if weight is not None else x, y,
               h if h is not None else y, rstd)
        return y, (h if h is not None else empty_like_nothing(x)), rstd
    run.launch = launch
    return run


_FORWARD_PLANS = PlanCache(_build_forward_plan)


@rms_norm.register_fake
def _(x, weight, residual, eps, weight_offset, downcast):
    _check(x, weight, residual, eps, downcast)
    h = x.new_empty(x.shape) if residual is not None else x.new_empty((0,))
    return x.new_empty(x.shape), h, x.new_empty(x.shape[:-1], dtype=torch.promote_types(x.dtype, torch.float32))


# --- backward -------------------------------------------------------------------------------------

@torch.library.custom_op("glu_fusion::rms_norm_backward", mutates_args=())
def rms_norm_backward(dy: Tensor, dh: Optional[Tensor], h: Tensor, weight: Optional[Tensor], rstd: Tensor,
                      weight_offset: float, need_weight: bool) -> tuple[Tensor, Tensor]:
    need_weight = need_weight and weight is not None
    if plans_enabled(h):
        key = (tensor_key(dy), tensor_key(dh), tensor_key(h), tensor_key(weight), tensor_key(rstd),
               weight_offset, need_weight)
        plan = _BACKWARD_PLANS.get(key, dy, dh, h, weight, weight_offset, need_weight)
        if plan is not None:
            return plan(dy, dh, h, weight, rstd)
    if not _kernels_serve(h):
        dx, dw = reference.rms_norm_backward(dy, dh, h, weight, rstd, weight_offset)
    else:
        from ..kernels.norms import rms_norm as kernels
        dx = torch.empty(h.shape, device=h.device, dtype=h.dtype)
        dw = kernels.rms_norm_backward(dy, dh, h, weight, rstd, dx, need_weight, weight_offset)
        if dw is not None:
            dw = dw.to(weight.dtype)
    return dx.contiguous(), (dw if need_weight else empty_like_nothing(h))


def _build_backward_plan(dy, dh, h, weight, weight_offset, need_weight):
    """The backward's host work for this argument signature, done once; None: general path."""
    if not _kernels_serve(h) or h.numel() == 0:
        return None
    from ..kernels.norms import rms_norm as kernels
    planned = kernels.backward_plan(dy, dh, h, weight, need_weight, weight_offset)
    if planned is None:
        return None
    launch, programs = planned
    shape, device, dtype, d = h.shape, h.device, h.dtype, h.shape[-1]

    def run(dy, dh, h, weight, rstd):
        dx = torch.empty(shape, device=device, dtype=dtype)
        ws = torch.empty((programs, d), device=device, dtype=torch.float32) if need_weight else rstd
        launch(dy, dh if dh is not None else dy, h, weight if weight is not None else h, rstd, dx, ws)
        return dx, (ws.sum(0).to(weight.dtype) if need_weight else empty_like_nothing(h))
    run.launch = launch
    return run


_BACKWARD_PLANS = PlanCache(_build_backward_plan)


@rms_norm_backward.register_fake
def _(dy, dh, h, weight, rstd, weight_offset, need_weight):
    dw = weight.new_empty(weight.shape) if need_weight and weight is not None else h.new_empty((0,))
    return h.new_empty(h.shape), dw


# --- autograd -------------------------------------------------------------------------------------

def _setup(ctx, inputs, output):
    x, weight, residual, _, weight_offset, _ = inputs
    _, h, rstd = output
    ctx.mark_non_differentiable(rstd)
    ctx.has_residual = residual is not None
    if not ctx.has_residual:
        ctx.mark_non_differentiable(h)
    ctx.weight_offset = weight_offset
    ctx.save_for_backward(h if ctx.has_residual else x, weight, rstd)


def _backward(ctx, dy, dh, _drstd):
    h, weight, rstd = ctx.saved_tensors
    need_x, need_w, need_res = ctx.needs_input_grad[:3]
    need_w = need_w and weight is not None
    if not (need_x or need_w or need_res):
        return (None,) * 6
    dh = dh if ctx.has_residual else None
    dx, dw = torch.ops.glu_fusion.rms_norm_backward(dy, dh, h, weight, rstd, ctx.weight_offset, need_w)
    # x and the residual receive the same gradient, as they would through eager's ``x + residual``.
    return (dx if need_x else None, dw if need_w else None, dx if need_res else None, None, None, None)


rms_norm.register_autograd(_backward, setup_context=_setup)


for _name in ("rms_norm", "rms_norm_backward"):
    register_autocast_passthrough(_name)
register_cuda_fast_path(rms_norm, rms_norm_backward)
register_graph_twins(rms_norm, rms_norm_backward)


# --- public functional ----------------------------------------------------------------------------
