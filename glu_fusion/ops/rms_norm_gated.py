"""The gated RMSNorm custom ops of gated delta-net / linear-attention / Mamba-2 layers.

Ops (namespace ``glu_fusion``), both functional:

* ``rms_norm_gated(x, z, weight, eps, group_size, norm_before_gate, activation, weight_offset,
  downcast, gate_in_input_dtype) -> (y, rstd)``
* ``rms_norm_gated_backward(dy, x, z, weight, rstd, group_size, norm_before_gate, activation,
  weight_offset, need_x, need_z, need_weight) -> (dx, dz, dweight)``; outputs not asked for are
  empty tensors.

Semantics over the last dimension D, cut into groups of ``group_size`` (None: one group)::

    norm_before_gate=True:   y = rmsnorm(x) · (weight + weight_offset) · act(z)
    norm_before_gate=False:  y = rmsnorm(x · act(z)) · (weight + weight_offset)

with ``act`` silu or sigmoid, ``weight`` optional (``[D]``, any float dtype; None means 1) and
``rstd = 1/sqrt(mean(s²) + eps)`` saved per row and group in fp32 for backward.  The math runs in
fp32; the output is in x's dtype.  Three flags place the roundings to x's dtype where the source
model's eager code has them, so the op reproduces that code within one rounding step:

* ``downcast="none"``: the weight is applied in fp32, one rounding at the end (FLA, Mamba-2
  reference with ``upcast``, torchtitan, Gemma-style ``x.float() * (1 + w.float())``).
* ``"before_weight"``: the normalised value is rounded to x's dtype, then multiplied by the
  weight in the promoted dtype of x and weight and rounded again when that is x's dtype
  (HF ``weight * hidden.to(input_dtype)``: Qwen3-Next, Llama-style RMSNorm modules).
* ``"after_weight"``: rounded once after the weight (``F.rms_norm`` / ``nn.RMSNorm``, which
  return x's dtype, followed by the gate product).
* with ``downcast != "none"`` a nonzero ``weight_offset`` is added in the weight's dtype.
* ``gate_in_input_dtype``: ``act(z)`` is rounded to x's dtype (``F.silu(z)`` without an upcast),
  and with the gate before the norm so is ``x·act(z)``.  Default: the gate stays fp32
  (HF ``F.silu(gate.to(torch.float32))``).

Exactness: the reference path (CPU without the interpreter, float64) is the eager spelling
itself, so it equals eager bit for bit on the same device.  The kernels use the same rounding
points but their own summation order and ``exp``/``sqrt``: outputs match eager within one unit in
the last place of x's dtype (fp32: a few fp32 ulps).  Spellings with more roundings than these
flags describe (e.g. ``pow(2).mean()`` in bf16 without an upcast) are matched within tolerance
only, and are more accurate than eager.

Backward treats every rounding as identity (as autograd does for ``.to``) and computes in fp32;
the weight gradient is accumulated in fp32 and reduced deterministically (per-program partial
rows, then one sum).  Only the gradients autograd needs are computed.

Autocast: the op casts nothing.  Eager code for these norms contains no autocast-listed op
that changes the result dtype (it upcasts and downcasts explicitly), so the op runs on the
dtypes it is given, as eager does; a fallthrough keeps it from being cast.
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

#: The gate activations and rounding modes the op takes, by name (the kernels' integer codes
#: are looked up from these names in ``_activation_code`` / ``_forward_flags`` only).
ACTIVATIONS = ("silu", "sigmoid")
DOWNCASTS = ("none", "before_weight", "after_weight")


def _group(d: int, group_size: Optional[int]) -> int:
    return d if group_size is None else group_size


def _check(x: Tensor, z: Tensor, weight: Optional[Tensor], eps: float, group_size: Optional[int],
           activation: str, downcast: str) -> None:
    if x.dim() < 1:
        raise ValueError("glu_fusion.rms_norm_gated: x must have at least one dimension [..., D]")
    if tuple(z.shape) != tuple(x.shape):
        raise ValueError(f"glu_fusion.rms_norm_gated: z has shape {tuple(z.shape)} but x has "
                         f"{tuple(x.shape)}; they must be equal")
    check_same("x", x, [("z", z)])
    d = x.shape[-1]
    if d == 0:
        raise ValueError("glu_fusion.rms_norm_gated: x's last dimension D must be positive")
    if group_size is not None and (group_size <= 0 or d % group_size != 0):
        raise ValueError(f"glu_fusion.rms_norm_gated: group_size={group_size} must be a positive "
                         f"divisor of D={d}")
    if weight is not None:
        if tuple(weight.shape) != (d,):
            raise ValueError(f"glu_fusion.rms_norm_gated: weight must have shape ({d},), got "
                             f"{tuple(weight.shape)}")
        if weight.device != x.device:
            raise ValueError(f"glu_fusion.rms_norm_gated: weight is on {weight.device} but x is on "
                             f"{x.device}")
        if weight.dtype not in SUPPORTED_DTYPES or (weight.dtype == torch.float64) != (x.dtype == torch.float64):
            raise TypeError(f"glu_fusion.rms_norm_gated: weight has dtype {weight.dtype}; with x in "
                            f"{x.dtype} it must be float32, float16 or bfloat16 (float64 only with "
                            "float64 x)")
    if activation not in ACTIVATIONS:
        raise ValueError(f"glu_fusion.rms_norm_gated: activation must be one of {sorted(ACTIVATIONS)}, "
                         f"got {activation!r}")
    if downcast not in DOWNCASTS:
        raise ValueError(f"glu_fusion.rms_norm_gated: downcast must be one of {sorted(DOWNCASTS)}, "
                         f"got {downcast!r}")
    if not eps >= 0.0:
        raise ValueError(f"glu_fusion.rms_norm_gated: eps must be >= 0, got {eps}")


def _kernels_serve(x: Tensor, group_size: Optional[int]) -> bool:
    if not use_kernels(x):
        return False
    from ..kernels.norms.rms_norm_gated import MAX_GROUP
    return _group(x.shape[-1], group_size) <= MAX_GROUP


def _activation_code(activation: str) -> int:
    from ..kernels.norms import rms_norm_gated as kernels
    return {"silu": kernels.ACT_SILU, "sigmoid": kernels.ACT_SIGMOID}[activation]


def _rstd_dtype(x: Tensor) -> torch.dtype:
    return torch.promote_types(x.dtype, torch.float32)


# --- forward --------------------------------------------------------------------------------------

@torch.library.custom_op("glu_fusion::rms_norm_gated", mutates_args=())
def rms_norm_gated(x: Tensor, z: Tensor, weight: Optional[Tensor], eps: float,
                   group_size: Optional[int], norm_before_gate: bool, activation: str,
                   weight_offset: float, downcast: str, gate_in_input_dtype: bool) -> tuple[Tensor, Tensor]:
    if plans_enabled(x):
        key = (tensor_key(x), tensor_key(z), tensor_key(weight), eps, group_size, norm_before_gate,
               activation, weight_offset, downcast, gate_in_input_dtype)
        plan = _FORWARD_PLANS.get(key, x, z, weight, eps, group_size, norm_before_gate, activation,
                                  weight_offset, downcast, gate_in_input_dtype)
        if plan is not None:
            return plan(x, z, weight)
    _check(x, z, weight, eps, group_size, activation, downcast)
    if not _kernels_serve(x, group_size):
        y, rstd = reference.rms_norm_gated(x, z, weight, eps, group_size, norm_before_gate, activation,
                                           weight_offset, downcast, gate_in_input_dtype)
        return y.contiguous(), rstd.contiguous()
    from ..kernels.norms import rms_norm_gated as kernels
    y = torch.empty(x.shape, device=x.device, dtype=x.dtype)
    rstd = torch.empty(_rstd_shape(x, group_size), device=x.device, dtype=torch.float32)
    kernels.rms_norm_gated_forward(x, z, weight, y, rstd, *_forward_flags(
        x, weight, eps, group_size, norm_before_gate, activation, weight_offset, downcast, gate_in_input_dtype))
    return y, rstd


def _rstd_shape(x: Tensor, group_size: Optional[int]) -> tuple:
    d = x.shape[-1]
    return (*x.shape[:-1], d // _group(d, group_size))


def _forward_flags(x, weight, eps, group_size, norm_before_gate, activation, weight_offset, downcast,
                   gate_in_input_dtype) -> tuple:
    """The forward kernel's arguments after ``rstd``, from the op's."""
    from ..kernels.norms import rms_norm_gated as kernels
    mode = {"none": kernels.DOWNCAST_NONE, "before_weight": kernels.DOWNCAST_BEFORE_WEIGHT,
            "after_weight": kernels.DOWNCAST_AFTER_WEIGHT}[downcast]
    round_weighted = mode == kernels.DOWNCAST_AFTER_WEIGHT or (
        mode == kernels.DOWNCAST_BEFORE_WEIGHT
        and (weight is None or torch.promote_types(x.dtype, weight.dtype) == x.dtype))
    return (eps, _group(x.shape[-1], group_size), norm_before_gate, _activation_code(activation), weight_offset,
            gate_in_input_dtype, mode == kernels.DOWNCAST_BEFORE_WEIGHT, round_weighted,
            mode != kernels.DOWNCAST_NONE and weight_offset != 0.0)


def _build_forward_plan(x, z, weight, eps, group_size, norm_before_gate, activation, weight_offset,
                        downcast, gate_in_input_dtype):
    """The forward's host work for this argument signature, done once; None: general path."""
    _check(x, z, weight, eps, group_size, activation, downcast)
    if not _kernels_serve(x, group_size) or x.numel() == 0:
        return None
    from ..kernels.norms import rms_norm_gated as kernels
    shape, rstd_shape, device, dtype = x.shape, _rstd_shape(x, group_size), x.device, x.dtype
    launch = kernels.forward_plan(x, z, weight, torch.empty(shape, device=device, dtype=dtype), *_forward_flags(
        x, weight, eps, group_size, norm_before_gate, activation, weight_offset, downcast, gate_in_input_dtype))
    if launch is None:
        return None

    def run(x, z, weight):
        y = torch.empty(shape, device=device, dtype=dtype)
        rstd = torch.empty(rstd_shape, device=device, dtype=torch.float32)
        launch(x, z, weight if weight is not None else x, y, rstd)
        return y, rstd
    return run


_FORWARD_PLANS = PlanCache(_build_forward_plan)


@rms_norm_gated.register_fake
def _(x, z, weight, eps, group_size, norm_before_gate, activation, weight_offset, downcast,
      gate_in_input_dtype):
    _check(x, z, weight, eps, group_size, activation, downcast)
    n_groups = x.shape[-1] // _group(x.shape[-1], group_size)
    return x.new_empty(x.shape), x.new_empty((*x.shape[:-1], n_groups), dtype=_rstd_dtype(x))


# --- backward -------------------------------------------------------------------------------------

@torch.library.custom_op("glu_fusion::rms_norm_gated_backward", mutates_args=())
def rms_norm_gated_backward(dy: Tensor, x: Tensor, z: Tensor, weight: Optional[Tensor], rstd: Tensor,
                            group_size: Optional[int], norm_before_gate: bool, activation: str,
                            weight_offset: float, need_x: bool, need_z: bool,
                            need_weight: bool) -> tuple[Tensor, Tensor, Tensor]:
    need_weight = need_weight and weight is not None
    if plans_enabled(x):
        key = (tensor_key(dy), tensor_key(x), tensor_key(z), tensor_key(weight), tensor_key(rstd), group_size,
               norm_before_gate, activation, weight_offset, need_x, need_z, need_weight)
        plan = _BACKWARD_PLANS.get(key, dy, x, z, weight, group_size, norm_before_gate, activation,
                                   weight_offset, need_x, need_z, need_weight)
        if plan is not None:
            return plan(dy, x, z, weight, rstd)
    if not _kernels_serve(x, group_size):
        dx, dz, dw = reference.rms_norm_gated_backward(dy, x, z, weight, rstd, group_size,
                                                       norm_before_gate, activation, weight_offset)
    else:
        from ..kernels.norms import rms_norm_gated as kernels
        dx = torch.empty(x.shape, device=x.device, dtype=x.dtype) if need_x else None
        dz = torch.empty(x.shape, device=x.device, dtype=x.dtype) if need_z else None
        dw = kernels.rms_norm_gated_backward(
            dy, x, z, weight, rstd, dx, dz, need_weight, _group(x.shape[-1], group_size),
            norm_before_gate, _activation_code(activation), weight_offset)
        if dw is not None:
            dw = dw.to(weight.dtype)
    return (dx.contiguous() if need_x else empty_like_nothing(x),
            dz.contiguous() if need_z else empty_like_nothing(x),
            dw if need_weight else empty_like_nothing(x))


def _build_backward_plan(dy, x, z, weight, group_size, norm_before_gate, activation, weight_offset,
                         need_x, need_z, need_weight):
    """The backward's host work for this argument signature, done once; None: general path."""
    if not _kernels_serve(x, group_size) or x.numel() == 0:
        return None
    from ..kernels.norms import rms_norm_gated as kernels
    shape, device, dtype, d = x.shape, x.device, x.dtype, x.shape[-1]
    planned = kernels.backward_plan(dy, x, z, weight, torch.empty(shape, device=device, dtype=dtype),
                                    need_x, need_z, need_weight, _group(d, group_size), norm_before_gate,
                                    _activation_code(activation), weight_offset)
    if planned is None:
        return None
    launch, programs = planned

    def run(dy, x, z, weight, rstd):
        dx = torch.empty(shape, device=device, dtype=dtype) if need_x else None
        dz = torch.empty(shape, device=device, dtype=dtype) if need_z else None
        out = dx if dx is not None else (dz if dz is not None else torch.empty(shape, device=device, dtype=dtype))
        ws = torch.empty((programs, d), device=device, dtype=torch.float32) if need_weight else rstd
        launch(dy, x, z, weight if weight is not None else x, rstd, dx if dx is not None else out,
               dz if dz is not None else out, ws)
        return (dx if need_x else empty_like_nothing(x), dz if need_z else empty_like_nothing(x),
                ws.sum(0).to(weight.dtype) if need_weight else empty_like_nothing(x))
    return run


_BACKWARD_PLANS = PlanCache(_build_backward_plan)


@rms_norm_gated_backward.register_fake
def _(dy, x, z, weight, rstd, group_size, norm_before_gate, activation, weight_offset, need_x, need_z,
      need_weight):
    dx = x.new_empty(x.shape) if need_x else x.new_empty((0,))
    dz = x.new_empty(x.shape) if need_z else x.new_empty((0,))
    dw = weight.new_empty(weight.shape) if need_weight and weight is not None else x.new_empty((0,))
    return dx, dz, dw


# --- autograd -------------------------------------------------------------------------------------

def _setup(ctx, inputs, output):
    x, z, weight, eps, group_size, norm_before_gate, activation, weight_offset, _, _ = inputs
    _, rstd = output
    ctx.mark_non_differentiable(rstd)
    ctx.flags = (group_size, norm_before_gate, activation, weight_offset)
    ctx.save_for_backward(x, z, weight, rstd)


def _backward(ctx, dy, _drstd):
    x, z, weight, rstd = ctx.saved_tensors
    need_x, need_z, need_w = ctx.needs_input_grad[:3]
    need_w = need_w and weight is not None
    if not (need_x or need_z or need_w):
        return (None,) * 10
    dx, dz, dw = torch.ops.glu_fusion.rms_norm_gated_backward(dy, x, z, weight, rstd, *ctx.flags,
                                                              need_x, need_z, need_w)
    return (dx if need_x else None, dz if need_z else None, dw if need_w else None) + (None,) * 7


rms_norm_gated.register_autograd(_backward, setup_context=_setup)


# Both ops run on the dtypes they are given under autocast (see the module docstring).
for _name in ("rms_norm_gated", "rms_norm_gated_backward"):
    register_autocast_passthrough(_name)
register_cuda_fast_path(rms_norm_gated, rms_norm_gated_backward)
register_graph_twins(rms_norm_gated, rms_norm_gated_backward)
