"""The grouped (mixture-of-experts) SwiGLU custom ops.

``out[t] = act(xₜ·Wgₑᵀ + bgₑ, xₜ·Wuₑᵀ + buₑ)`` for each token ``t`` of expert ``e``, tokens
sorted by expert, ``offsets`` [E] (int32/int64) their cumulative counts; rows from
``offsets[-1]`` on (a padded tail) give zeros.  ``act`` is ``"silu"`` (``silu(g)·u``) or
``"gptoss"`` (gpt-oss's clamped gate, ``alpha`` and ``limit`` from the model).

Ops (namespace ``glu_fusion``), all functional:

* ``grouped_swiglu(x, offsets, w_gate, w_up, b_gate, b_up, activation, alpha, limit,
  save_preact) -> (out, preact)``: weights [E, N, K] with any strides (a transposed
  ``[E, K, N]`` storage is read in place through ``.transpose(1, 2)``), biases [E, N].
* ``grouped_swiglu_packed(x, offsets, weight, bias, layout, activation, alpha, limit,
  save_preact) -> (out, preact)``: one ``[E, 2N, K]`` weight (``[E, 2N]`` bias) whose gate and
  up rows sit as ``swiglu.LAYOUTS`` says, read in place; its gradient comes back packed.
* ``grouped_swiglu_dh(dout, preact, offsets, activation, alpha, limit) -> dh``: the gate's
  backward ``[dG | dU]`` [T, 2N].
* ``grouped_swiglu_dx(dh, offsets, w_gate, w_up) -> dx``: the grouped input gradient.
* ``grouped_swiglu_dw(dh, x, offsets, layout, want_weight, want_bias) -> (dweight, dbias)``:
  the per-expert weight gradient ``[E, 2N, K]`` and bias gradient ``[E, 2N]``, packed as
  ``layout`` says (empty when not wanted); deterministic.

``preact`` is ``[T, 2N]`` = ``[g | u]`` rounded to x's dtype, or empty when ``save_preact`` is
false (backward then recomputes it).  Inside a ``WeightGradStore`` the eager backward defers
the weight gradient (``glu_fusion.weight_grad_store``).
"""
from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor

from .. import grouped_reference
from ..layouts import CONCAT_GATE_FIRST
from ..weight_grad_store import active_store, deferrable
from .autocast import register_autocast_follow
from .dispatch import allow_tf32, check_same, empty_like_nothing, register_cuda_fast_path, use_gemm_kernels
from .graph_twins import register_graph_twins
from .swiglu import packed_views

ACTIVATION_CODES = {"silu": 0, "gptoss": 1}

#: Whether the Hopper engine's grouped kernels run what they can serve: the forward
#: (``kernels.engine.host.grouped_swiglu_forward``) and the input gradient of gate and up halves
#: of one packed weight (``host.grouped_matmul``).  Off until benchmarks/bench_moe.py measures them
#: against the portable kernels and ``torch._grouped_mm``; the GPU tests turn it on.
ENGINE_GROUPED = False


def _engine_serves(x: Tensor, w_gate: Tensor, w_up: Tensor, out: Tensor, preact: Optional[Tensor]) -> bool:
    from ..kernels import engine
    if not (ENGINE_GROUPED and engine.available(x.device)):
        return False
    from ..kernels.engine.host import grouped_serves
    n = w_gate.shape[1]
    halves = (preact[:, :n], preact[:, n:]) if preact is not None else (None, None)
    return grouped_serves(x, w_gate, w_up, out, *halves)


#: Device types where the expert GEMMs (the forward's, with the gate as a separate pass, and the
#: backward's dX and dW) run on torch's grouped GEMM (``torch._grouped_mm``, bf16) where it serves
#: the operands and the engine does not: the portable kernels ran at 0.45-0.78x its speed on the
#: H200 (2026-12-02, benchmarks/NOTES.md, "Experts").
TORCH_GROUPED_MM_DEVICES: tuple[str, ...] = ("cuda",)


def routed_rows(offsets: Tensor, t: int) -> Tensor:
    """[T] bool: the rows an expert owns (not the padded tail)."""
    return torch.arange(t, device=offsets.device) < offsets[-1]


def expert_of_rows(offsets: Tensor, t: int) -> Tensor:
    """[T] int64: each row's expert (E for the padded tail)."""
    return torch.searchsorted(offsets, torch.arange(t, device=offsets.device, dtype=offsets.dtype), right=True)


def _grouped_mm_layout(t: Tensor) -> bool:
    """What ``torch._grouped_mm`` reads: a unit stride in one of the last two dimensions, the
    other strides multiples of 16 bytes, a 16-byte aligned start."""
    size, strides = t.element_size(), t.stride()
    if t.data_ptr() % 16 or any((s * size) % 16 for s in strides[:-2]):
        return False
    if strides[-1] == 1:
        return (strides[-2] * size) % 16 == 0
    return strides[-2] == 1 and (strides[-1] * size) % 16 == 0


def _torch_grouped_mm_serves(*operands: Tensor, widths: tuple = ()) -> bool:
    """Whether ``torch._grouped_mm`` takes these bf16 operands on this device; ``widths``: the
    GEMM's non-grouped sizes, which its kernels need in multiples of 16 bytes."""
    first = operands[0]
    if any(w % 8 for w in widths):
        return False
    if first.device.type not in TORCH_GROUPED_MM_DEVICES or not hasattr(torch, "_grouped_mm"):
        return False
    if first.is_cuda and torch.cuda.get_device_capability(first.device) < (9, 0):
        return False
    return all(t.dtype == torch.bfloat16 and t.numel() > 0 and _grouped_mm_layout(t) for t in operands)


def _torch_grouped_mm_dx(dh: Tensor, offsets: Tensor, w_gate: Tensor, w_up: Tensor) -> Optional[Tensor]:
    """``dX = dGₑ·Wgₑ + dUₑ·Wuₑ`` on ``torch._grouped_mm`` (one GEMM over a packed weight's
    halves), zeros for the padded tail (which it leaves unwritten); None where it cannot serve."""
    n, k, offs = w_gate.shape[1], w_gate.shape[2], offsets.to(torch.int32)
    packed = stacked_halves(w_gate, w_up)
    if packed is not None and _torch_grouped_mm_serves(dh, packed, widths=(2 * n, k)):
        dx = torch._grouped_mm(dh, packed, offs=offs)
    elif _torch_grouped_mm_serves(dh[:, :n], dh[:, n:], w_gate, w_up, widths=(n, k)):
        dx = torch._grouped_mm(dh[:, :n], w_gate, offs=offs) + torch._grouped_mm(dh[:, n:], w_up, offs=offs)
    else:
        return None
    return dx.masked_fill(~routed_rows(offsets, dh.shape[0]).unsqueeze(1), 0)


def _torch_grouped_mm_dw(dh: Tensor, x: Tensor, offsets: Tensor) -> Optional[Tensor]:
    """``dWₑ = dHₑᵀ·xₑ`` [E, 2N, K] on ``torch._grouped_mm``, zeros for experts without rows;
    None where it cannot serve."""
    if not _torch_grouped_mm_serves(dh.t(), x, widths=(dh.shape[1], x.shape[1])):
        return None
    offs = offsets.to(torch.int32)
    counts = torch.diff(offs, prepend=offs.new_zeros(1))
    dw = torch._grouped_mm(dh.t(), x, offs=offs)
    return dw.masked_fill((counts == 0).view(-1, 1, 1), 0)


def _interleaved_source(w_gate: Tensor, w_up: Tensor) -> Optional[Tensor]:
    """The ``[E, 2N, K]`` weight whose even rows are ``w_gate``'s and odd rows ``w_up``'s, as a
    view, where the two are its interleaved halves (gpt-oss); otherwise None."""
    e, n, k = w_gate.shape
    if w_up.shape != w_gate.shape or w_up.stride() != w_gate.stride() or w_up.dtype != w_gate.dtype \
            or w_gate.stride(1) % 2:
        return None
    row = w_gate.stride(1) // 2
    if w_up.data_ptr() != w_gate.data_ptr() + row * w_gate.element_size():
        return None
    return torch.as_strided(w_gate, (e, 2 * n, k), (w_gate.stride(0), row, w_gate.stride(2)),
                            w_gate.storage_offset())


def _torch_grouped_mm_forward(x: Tensor, offsets: Tensor, w_gate: Tensor, w_up: Tensor, b_gate: Optional[Tensor],
                              b_up: Optional[Tensor], activation: str, alpha: float,
                              limit: float) -> Optional[tuple[Tensor, Tensor]]:
    """``(out, preact)`` from ``torch._grouped_mm`` (one GEMM over a packed weight, concatenated or
    interleaved; two otherwise) and the gate as a separate pass: what Inductor runs, faster than
    the portable fused kernel; zeros for the padded tail.  None where it cannot serve."""
    t, n, offs = x.shape[0], w_gate.shape[1], offsets.to(torch.int32)
    stacked, interleaved = stacked_halves(w_gate, w_up), _interleaved_source(w_gate, w_up)
    packed_widths, widths = (x.shape[1], 2 * n), (x.shape[1], n)
    if stacked is not None and _torch_grouped_mm_serves(x, stacked.transpose(1, 2), widths=packed_widths):
        preact = torch._grouped_mm(x, stacked.transpose(1, 2), offs=offs)
    elif interleaved is not None and _torch_grouped_mm_serves(x, interleaved.transpose(1, 2), widths=packed_widths):
        gu = torch._grouped_mm(x, interleaved.transpose(1, 2), offs=offs)
        preact = torch.cat([gu[:, 0::2], gu[:, 1::2]], dim=1)
    elif _torch_grouped_mm_serves(x, w_gate.transpose(1, 2), w_up.transpose(1, 2), widths=widths):
        preact = torch.cat([torch._grouped_mm(x, w.transpose(1, 2), offs=offs) for w in (w_gate, w_up)], dim=1)
    else:
        return None
    if b_gate is not None:
        expert = expert_of_rows(offsets, t).clamp(max=w_gate.shape[0] - 1)
        preact += torch.cat([b_gate, b_up], dim=1)[expert]
    preact.masked_fill_(~routed_rows(offsets, t).unsqueeze(1), 0)  # rows the GEMM left unwritten
    return grouped_reference.gate(preact[:, :n], preact[:, n:], activation, alpha, limit), preact


def stacked_halves(w_gate: Tensor, w_up: Tensor) -> Optional[Tensor]:
    """The ``[E, 2N, K]`` weight whose rows are ``w_gate``'s then ``w_up``'s, as a view, where
    ``w_up`` follows ``w_gate`` along dim 1 in memory (the halves of one concatenated weight);
    otherwise None."""
    e, n, k = w_gate.shape
    if w_up.shape != w_gate.shape or w_up.stride() != w_gate.stride() or w_up.dtype != w_gate.dtype:
        return None
    if w_up.data_ptr() != w_gate.data_ptr() + n * w_gate.stride(1) * w_gate.element_size():
        return None
    if e > 1 and abs(w_gate.stride(0)) < 2 * n * abs(w_gate.stride(1)):
        return None  # one expert's up half would overlap the next expert's gate half
    return torch.as_strided(w_gate, (e, 2 * n, k), w_gate.stride(), w_gate.storage_offset())


def _engine_dx(dh: Tensor, offsets: Tensor, w_gate: Tensor, w_up: Tensor) -> Optional[Tensor]:
    """``dX = dH·[Wg; Wu]`` per expert as one grouped GEMM on the engine, where it serves the
    operands (a packed weight's halves); None otherwise."""
    from ..kernels import engine
    if not (ENGINE_GROUPED and engine.available(dh.device)):
        return None
    weight = stacked_halves(w_gate, w_up)
    if weight is None:
        return None
    from ..kernels.engine.host import grouped_matmul, grouped_matmul_serves
    dx = dh.new_empty((dh.shape[0], w_gate.shape[2]))
    as_kn = weight.transpose(1, 2)  # [E, K, 2N]: output columns K, reduction over 2N
    if not grouped_matmul_serves(dh, as_kn, dx):
        return None
    grouped_matmul(dh, offsets, as_kn, dx)
    return dx


def expert_views(t: Tensor, layout: int) -> tuple[Tensor, Tensor]:
    """(gate, up) views along dim 1 of a packed ``[E, 2N, K]`` weight or ``[E, 2N]`` bias."""
    gate, up = packed_views(t.transpose(0, 1), layout)
    return gate.transpose(0, 1), up.transpose(0, 1)


def _check_forward(x: Tensor, offsets: Tensor, w_gate: Tensor, w_up: Tensor,
                   b_gate: Optional[Tensor], b_up: Optional[Tensor], activation: str) -> None:
    if activation not in ACTIVATION_CODES:
        raise ValueError(f"glu_fusion: activation must be one of {sorted(ACTIVATION_CODES)}, got {activation!r}")
    if x.dim() != 2:
        raise ValueError(f"glu_fusion: grouped x must be 2-D [T, K], got {tuple(x.shape)}")
    if w_gate.dim() != 3 or w_gate.shape != w_up.shape:
        raise ValueError(f"glu_fusion: w_gate and w_up must both be [E, N, K], got {tuple(w_gate.shape)} "
                         f"and {tuple(w_up.shape)}")
    e, n, k = w_gate.shape
    if x.shape[1] != k:
        raise ValueError(f"glu_fusion: x has K={x.shape[1]} features but the weights expect K={k}")
    if offsets.dim() != 1 or offsets.shape[0] != e or e == 0:
        raise ValueError(f"glu_fusion: offsets must be 1-D with one entry per expert ({e}, at least one), "
                         f"got {tuple(offsets.shape)}")
    if offsets.dtype not in (torch.int32, torch.int64):
        raise TypeError(f"glu_fusion: offsets must be int32 or int64, got {offsets.dtype}")
    if offsets.device != x.device:
        raise ValueError(f"glu_fusion: offsets is on {offsets.device} but x is on {x.device}")
    if (b_gate is None) != (b_up is None):
        raise ValueError("glu_fusion: give both bias_gate and bias_up, or neither")
    for name, b in (("bias_gate", b_gate), ("bias_up", b_up)):
        if b is not None and tuple(b.shape) != (e, n):
            raise ValueError(f"glu_fusion: {name} must have shape ({e}, {n}), got {tuple(b.shape)}")
    check_same("x", x, [("w_gate", w_gate), ("w_up", w_up), ("bias_gate", b_gate), ("bias_up", b_up)])


def check_offset_values(offsets: Tensor, t: int) -> None:
    """Offsets must be cumulative token counts: non-negative, non-decreasing, at most T.  Checked
    only where they are on the CPU: reading CUDA offsets on the host would synchronise every call,
    so CUDA offsets are not checked (bad ones there give wrong values, not an error)."""
    if offsets.device.type != "cpu" or offsets.numel() == 0:
        return
    ends = offsets.tolist()
    if ends[0] < 0 or ends[-1] > t or any(b < a for a, b in zip(ends, ends[1:])):
        raise ValueError(f"glu_fusion: offsets must be cumulative token counts per expert (non-negative, "
                         f"non-decreasing, at most T={t}), got {ends}")


def _forward(x, offsets, w_gate, w_up, b_gate, b_up, activation, alpha, limit, save_preact):
    _check_forward(x, offsets, w_gate, w_up, b_gate, b_up, activation)
    check_offset_values(offsets, x.shape[0])
    t, n = x.shape[0], w_gate.shape[1]
    if use_gemm_kernels(x):
        out = x.new_empty((t, n))
        preact = x.new_empty((t, 2 * n)) if save_preact else None
        engine = _engine_serves(x, w_gate, w_up, out, preact)
        unfused = None if engine else _torch_grouped_mm_forward(x, offsets, w_gate, w_up, b_gate, b_up, activation,
                                                                alpha, limit)
        if unfused is not None:
            out, preact = unfused[0], unfused[1] if save_preact else None
        elif engine:
            from ..kernels.engine.host import grouped_swiglu_forward as engine_forward
            halves = (preact[:, :n], preact[:, n:]) if preact is not None else (None, None)
            engine_forward(x, offsets, w_gate, w_up, b_gate, b_up, out, *halves, ACTIVATION_CODES[activation],
                           alpha, limit)
        else:
            from ..kernels.portable.grouped_gemm import grouped_swiglu_forward
            grouped_swiglu_forward(x, offsets, w_gate, w_up, b_gate, b_up, out, preact,
                                   ACTIVATION_CODES[activation], alpha, limit, allow_tf32())
    else:
        g, u = grouped_reference.grouped_preact(x, offsets, w_gate, w_up, b_gate, b_up)
        out = grouped_reference.gate(g, u, activation, alpha, limit)
        preact = torch.cat([g, u], dim=1) if save_preact else None
    return out, preact if preact is not None else empty_like_nothing(x)


def _fake_forward(x, offsets, w_gate, w_up, b_gate, b_up, activation, save_preact):
    _check_forward(x, offsets, w_gate, w_up, b_gate, b_up, activation)
    t, n = x.shape[0], w_gate.shape[1]
    return x.new_empty((t, n)), x.new_empty((t, 2 * n) if save_preact else (0,))


# --- forward ops ---------------------------------------------------------------------------------

@torch.library.custom_op("glu_fusion::grouped_swiglu", mutates_args=())
def grouped_swiglu(x: Tensor, offsets: Tensor, w_gate: Tensor, w_up: Tensor, b_gate: Optional[Tensor],
                   b_up: Optional[Tensor], activation: str, alpha: float, limit: float,
                   save_preact: bool) -> tuple[Tensor, Tensor]:
    return _forward(x, offsets, w_gate, w_up, b_gate, b_up, activation, alpha, limit, save_preact)


@grouped_swiglu.register_fake
def _(x, offsets, w_gate, w_up, b_gate, b_up, activation, alpha, limit, save_preact):
    return _fake_forward(x, offsets, w_gate, w_up, b_gate, b_up, activation, save_preact)


def _packed_halves(weight: Tensor, bias: Optional[Tensor], layout: int):
    if weight.dim() != 3:
        raise ValueError(f"glu_fusion: a packed expert weight must be [E, 2N, K], got {tuple(weight.shape)}")
    if weight.shape[1] % 2:
        raise ValueError(f"glu_fusion: a packed expert weight [E, 2N, K] needs an even second dimension, "
                         f"got {tuple(weight.shape)}")
    if bias is not None and tuple(bias.shape) != tuple(weight.shape[:2]):
        raise ValueError(f"glu_fusion: bias must have shape (E, 2N) = {tuple(weight.shape[:2])} for a weight of "
                         f"shape {tuple(weight.shape)}, got {tuple(bias.shape)}")
    w_gate, w_up = expert_views(weight, layout)
    b_gate, b_up = expert_views(bias, layout) if bias is not None else (None, None)
    return w_gate, w_up, b_gate, b_up


@torch.library.custom_op("glu_fusion::grouped_swiglu_packed", mutates_args=())
def grouped_swiglu_packed(x: Tensor, offsets: Tensor, weight: Tensor, bias: Optional[Tensor], layout: int,
                          activation: str, alpha: float, limit: float,
                          save_preact: bool) -> tuple[Tensor, Tensor]:
    return _forward(x, offsets, *_packed_halves(weight, bias, layout), activation, alpha, limit, save_preact)


@grouped_swiglu_packed.register_fake
def _(x, offsets, weight, bias, layout, activation, alpha, limit, save_preact):
    return _fake_forward(x, offsets, *_packed_halves(weight, bias, layout), activation, save_preact)


# --- backward ops --------------------------------------------------------------------------------

@torch.library.custom_op("glu_fusion::grouped_swiglu_dh", mutates_args=())
def grouped_swiglu_dh(dout: Tensor, preact: Tensor, offsets: Tensor, activation: str, alpha: float,
                      limit: float) -> Tensor:
    """``[dG | dU]`` [T, 2N]; zero on the padded tail."""
    t, n = dout.shape
    if use_gemm_kernels(dout):
        from ..kernels.portable.grouped_gate import grouped_gate_grad
        dh = preact.new_empty((t, 2 * n))
        grouped_gate_grad(dout, preact, offsets, dh, ACTIVATION_CODES[activation], alpha, limit)
        return dh
    d_g, d_u = grouped_reference.gate_grad(dout, preact[:, :n], preact[:, n:], activation, alpha, limit)
    dh = torch.cat([d_g, d_u], dim=1)
    dh[max(0, min(int(offsets[-1]), t)):] = 0
    return dh


@grouped_swiglu_dh.register_fake
def _(dout, preact, offsets, activation, alpha, limit):
    return preact.new_empty((dout.shape[0], 2 * dout.shape[1]))


@torch.library.custom_op("glu_fusion::grouped_swiglu_dx", mutates_args=())
def grouped_swiglu_dx(dh: Tensor, offsets: Tensor, w_gate: Tensor, w_up: Tensor) -> Tensor:
    if use_gemm_kernels(dh):
        dx = _engine_dx(dh, offsets, w_gate, w_up)
        if dx is None:
            dx = _torch_grouped_mm_dx(dh, offsets, w_gate, w_up)
        if dx is not None:
            return dx
        from ..kernels.portable.grouped_gemm import grouped_input_grad
        dx = dh.new_empty((dh.shape[0], w_gate.shape[2]))
        grouped_input_grad(dh, offsets, w_gate, w_up, dx, allow_tf32())
        return dx
    return grouped_reference.grouped_input_grad(dh, offsets, w_gate, w_up)


@grouped_swiglu_dx.register_fake
def _(dh, offsets, w_gate, w_up):
    return dh.new_empty((dh.shape[0], w_gate.shape[2]))


@torch.library.custom_op("glu_fusion::grouped_swiglu_dw", mutates_args=())
def grouped_swiglu_dw(dh: Tensor, x: Tensor, offsets: Tensor, layout: int, want_weight: bool,
                      want_bias: bool) -> tuple[Tensor, Tensor]:
    e, n2, k = offsets.shape[0], dh.shape[1], x.shape[1]
    dweight = x.new_empty((e, n2, k)) if want_weight else None
    dbias = x.new_empty((e, n2)) if want_bias else None
    if use_gemm_kernels(x):
        from ..kernels.portable.grouped_gemm import grouped_weight_grad
        full = _torch_grouped_mm_dw(dh, x, offsets) if want_weight else None
        if full is not None:
            if layout == CONCAT_GATE_FIRST:
                dweight = full
            else:
                gate, up = expert_views(dweight, layout)
                gate.copy_(full[:, :n2 // 2])
                up.copy_(full[:, n2 // 2:])
        dw_gate, dw_up = expert_views(dweight, layout) if want_weight and full is None else (None, None)
        db_gate, db_up = expert_views(dbias, layout) if want_bias else (None, None)
        if dw_gate is not None or db_gate is not None:
            grouped_weight_grad(dh, x, offsets, dw_gate, dw_up, db_gate, db_up, allow_tf32())
    else:
        dw, db = grouped_reference.grouped_weight_grad(dh, x, offsets, e)
        n = n2 // 2
        for full, out in ((dw, dweight), (db, dbias)):
            if out is not None:
                gate, up = expert_views(out, layout)
                gate.copy_(full[:, :n])
                up.copy_(full[:, n:])
    return (dweight if want_weight else empty_like_nothing(x),
            dbias if want_bias else empty_like_nothing(x))


@grouped_swiglu_dw.register_fake
def _(dh, x, offsets, layout, want_weight, want_bias):
    e, n2, k = offsets.shape[0], dh.shape[1], x.shape[1]
    return (x.new_empty((e, n2, k) if want_weight else (0,)),
            x.new_empty((e, n2) if want_bias else (0,)))


# --- autograd ------------------------------------------------------------------------------------

def _setup(ctx, x, offsets, weights, biases, activation, alpha, limit, save_preact, output, layout):
    out, preact = output
    ctx.mark_non_differentiable(preact)
    ctx.has_bias = biases[0] is not None
    ctx.gate = (activation, alpha, limit)
    ctx.layout = layout
    ctx.n_weights = len(weights)
    ctx.save_for_backward(x, offsets, *weights, *biases, preact if save_preact else None)
    # The weights as the caller passed them: a deferred weight gradient goes to their .grad.
    ctx.weight_targets = weights


def _deferred_weight_grad(dh: Tensor, x: Tensor, offsets: Tensor, layout: int,
                          dtype: Optional[torch.dtype]) -> Tensor:
    """The packed weight gradient ``[E, 2N, K]`` of a deferred computation: in x's dtype, or in
    ``dtype`` (a store's wider accumulate dtype) without rounding to x's dtype on the way: the
    Triton kernel writes its fp32 accumulator as it is; elsewhere dH and x are upcast first (a
    product of two bf16/fp16 values is exact in fp32) and the GEMM runs in ``dtype``."""
    if dtype is None or dtype == x.dtype:
        return torch.ops.glu_fusion.grouped_swiglu_dw(dh, x, offsets, layout, True, False)[0]
    if dtype == torch.float32 and use_gemm_kernels(x):
        from ..kernels.portable.grouped_gemm import grouped_weight_grad
        dweight = x.new_empty((offsets.shape[0], dh.shape[1], x.shape[1]), dtype=dtype)
        grouped_weight_grad(dh, x, offsets, *expert_views(dweight, layout), None, None, allow_tf32())
        return dweight
    return torch.ops.glu_fusion.grouped_swiglu_dw(dh.to(dtype), x.to(dtype), offsets, layout, True, False)[0]


def _weight_and_bias_grads(ctx, dh, x, offsets, need_w, need_b):
    """``(dweight, dbias)`` packed ``[E, 2N, K]`` / ``[E, 2N]`` (or Nones); with a
    ``WeightGradStore`` entered, dweight is None and its computation is queued instead."""
    store = active_store(dh, x) if need_w else None
    targets = ctx.weight_targets
    if store is not None and deferrable(*[t for t in targets if t.requires_grad]):
        layout, n_weights = ctx.layout, ctx.n_weights
        dbias = torch.ops.glu_fusion.grouped_swiglu_dw(dh, x, offsets, layout, False, True)[1] if need_b else None
        dtype = store.sum_dtype(x)

        def compute_weight_grad() -> None:
            with torch.no_grad():
                dweight = _deferred_weight_grad(dh, x, offsets, layout, dtype)
                parts = (dweight,) if n_weights == 1 else expert_views(dweight, layout)
                for target, grad in zip(targets, parts):
                    if target.requires_grad:
                        store.accumulate(target, grad)

        store.put(compute_weight_grad)
        return None, dbias
    if not (need_w or need_b):
        return None, None
    dweight, dbias = torch.ops.glu_fusion.grouped_swiglu_dw(dh, x, offsets, ctx.layout, need_w, need_b)
    return (dweight if need_w else None), (dbias if need_b else None)


def _grouped_swiglu_setup(ctx, inputs, output):
    x, offsets, w_gate, w_up, b_gate, b_up, activation, alpha, limit, save_preact = inputs
    _setup(ctx, x, offsets, (w_gate, w_up), (b_gate, b_up), activation, alpha, limit, save_preact,
           output, CONCAT_GATE_FIRST)


def _grouped_swiglu_backward(ctx, dout, _dpreact):
    x, offsets, w_gate, w_up, b_gate, b_up, preact = ctx.saved_tensors
    need_x, _, need_wg, need_wu, need_bg, need_bu = ctx.needs_input_grad[:6]
    nothing = (None,) * 4
    if not any((need_x, need_wg, need_wu, need_bg, need_bu)):
        return (None,) * 6 + nothing
    act, alpha, limit = ctx.gate
    if preact is None:
        preact = torch.ops.glu_fusion.grouped_swiglu(x, offsets, w_gate, w_up, b_gate, b_up,
                                                     act, alpha, limit, True)[1]
    dh = torch.ops.glu_fusion.grouped_swiglu_dh(dout, preact, offsets, act, alpha, limit)
    dx = torch.ops.glu_fusion.grouped_swiglu_dx(dh, offsets, w_gate, w_up) if need_x else None
    dweight, dbias = _weight_and_bias_grads(ctx, dh, x, offsets, need_wg or need_wu,
                                            ctx.has_bias and (need_bg or need_bu))
    dwg, dwu = expert_views(dweight, CONCAT_GATE_FIRST) if dweight is not None else (None, None)
    dbg, dbu = expert_views(dbias, CONCAT_GATE_FIRST) if dbias is not None else (None, None)
    return (dx, None, dwg if need_wg else None, dwu if need_wu else None,
            dbg if need_bg else None, dbu if need_bu else None) + nothing


grouped_swiglu.register_autograd(_grouped_swiglu_backward, setup_context=_grouped_swiglu_setup)


def _grouped_swiglu_packed_setup(ctx, inputs, output):
    x, offsets, weight, bias, layout, activation, alpha, limit, save_preact = inputs
    _setup(ctx, x, offsets, (weight,), (bias,), activation, alpha, limit, save_preact, output, layout)


def _grouped_swiglu_packed_backward(ctx, dout, _dpreact):
    x, offsets, weight, bias, preact = ctx.saved_tensors
    need_x, _, need_w, need_b = ctx.needs_input_grad[:4]
    nothing = (None,) * 5
    if not any((need_x, need_w, need_b)):
        return (None,) * 4 + nothing
    act, alpha, limit = ctx.gate
    w_gate, w_up, b_gate, b_up = _packed_halves(weight, bias, ctx.layout)
    if preact is None:
        preact = torch.ops.glu_fusion.grouped_swiglu(x, offsets, w_gate, w_up, b_gate, b_up,
                                                     act, alpha, limit, True)[1]
    dh = torch.ops.glu_fusion.grouped_swiglu_dh(dout, preact, offsets, act, alpha, limit)
    dx = torch.ops.glu_fusion.grouped_swiglu_dx(dh, offsets, w_gate, w_up) if need_x else None
    dweight, dbias = _weight_and_bias_grads(ctx, dh, x, offsets, need_w, ctx.has_bias and need_b)
    return (dx, None, dweight, dbias) + nothing


grouped_swiglu_packed.register_autograd(_grouped_swiglu_packed_backward,
                                        setup_context=_grouped_swiglu_packed_setup)

for _name in ("grouped_swiglu", "grouped_swiglu_packed", "grouped_swiglu_dh", "grouped_swiglu_dx",
              "grouped_swiglu_dw"):
    register_autocast_follow(_name)
_ALL_OPS = (grouped_swiglu, grouped_swiglu_packed, grouped_swiglu_dh, grouped_swiglu_dx, grouped_swiglu_dw)
register_cuda_fast_path(*_ALL_OPS)
register_graph_twins(*_ALL_OPS)


# --- the functional API ------------------------------------------------------------------------


