"""The SwiGLU custom ops: ``out = silu(x·Wgᵀ + bg) * (x·Wuᵀ + bu)``.

Ops (namespace ``glu_fusion``), all functional but one:

* ``swiglu(x, w_gate, w_up, b_gate, b_up, save_preact) -> (out, preact)``
* ``swiglu_packed(x, weight, bias, layout, save_preact) -> (out, preact)``: one ``[2N, K]``
  weight read in place through the views ``LAYOUTS`` describes; its gradient comes back packed.
* ``swiglu_preact(x, w_gate, w_up, b_gate, b_up) -> preact``: the pre-activations alone (two
  GEMMs), which a recomputing backward needs.
* ``swiglu_dh(dout, preact, layout) -> dh``: the gate's backward alone; the backward's GEMMs
  (``dX = dH·W``, ``dW = dHᵀ·x``) are plain torch calls (cuBLAS on the GPU).
* ``swiglu_dh_inplace(dout, preact!)``: the same, written over ``preact`` (the one op that
  mutates: for backward passes that own the pre-activations).

``preact`` is ``[M, 2N]`` = ``[g | u]`` (each rounded to x's dtype, as eager rounds the two
linear outputs), or an empty tensor when ``save_preact`` is false: backward then recomputes it
with ``swiglu_preact`` and writes ``dH`` over it.  Outputs an op was told not to compute are empty tensors.
"""
from __future__ import annotations

import logging
import os
from typing import Optional

import torch
from torch import Tensor

from .. import reference
from ..layouts import CONCAT_GATE_FIRST, CONCAT_UP_FIRST, INTERLEAVED_GATE_EVEN, INTERLEAVED_UP_EVEN, LAYOUTS
from .autocast import register_autocast_follow, register_autocast_passthrough
from .dispatch import allow_tf32, check_same, empty_like_nothing, register_cuda_fast_path, rows_2d, use_gemm_kernels
from .graph_twins import register_graph_twins
from .plan_cache import PlanCache, plans_enabled, tensor_key


def _env_choice(name: str, default: str, allowed: tuple[str, ...]) -> str:
    """A benchmark A/B switch from the environment; an unknown value logs a warning and keeps
    the default (this module may be imported while ``import torch`` runs)."""
    value = os.environ.get(name, "").strip().lower() or default
    if value not in allowed:
        logging.getLogger("glu_fusion").warning("glu_fusion: %s must be one of %s, got %r; using %r",
                                                name, ", ".join(allowed), value, default)
        return default
    return value


# Benchmark A/B switches (not user settings; benchmarks/NOTES.md has the measurements):
# ``GLU_FUSION_FORWARD=fused`` makes training calls from ``_CUBLAS_MIN_TOKENS`` tokens up use the
# fused GEMM-with-gate kernel instead of two cuBLAS GEMMs plus the gate kernel (``auto``);
# ``GLU_FUSION_TMA=0`` keeps the pointer forward kernel where the TMA kernel would run.
_FORWARD: str = _env_choice("GLU_FUSION_FORWARD", "auto", ("auto", "fused"))
_FORWARD_TMA: bool = _env_choice("GLU_FUSION_TMA", "1", ("1", "0")) == "1"
# ``GLU_FUSION_ENGINE=0`` keeps the Triton kernels where the Hopper engine would run.
_ENGINE: bool = _env_choice("GLU_FUSION_ENGINE", "1", ("1", "0")) == "1"
# Saving g and u too, the engine lost at 1024 features (0.94-0.96x cuBLAS + Inductor's gate)
# and won from 2048 (1.05-1.15x): benchmarks/results/engine.md, H200, 2026-12-02.
_ENGINE_TRAIN_MIN_K = 2048


# The persistent TMA forward wins from about this many tokens on (H100, benchmarks/NOTES.md,
# run 22: 0.86-1.00x the pointer kernel's GPU time at 1024 tokens, once its launch cost the
# host no more than the pointer kernel's).
_TMA_MIN_TOKENS = 1024
# From this many tokens on, training calls run cuBLAS and the gate kernel (``_FORWARD``):
# faster at M=16384 on the H100, slower at M=1024 (benchmarks/NOTES.md, run 14).
_CUBLAS_MIN_TOKENS = 8192


def packed_views(t: Tensor, layout: int) -> tuple[Tensor, Tensor]:
    """(gate, up) views along dim 0 of a packed weight ``[2N, K]`` or bias ``[2N]``; no copy."""
    n2 = t.shape[0]
    if n2 % 2:
        raise ValueError(f"glu_fusion: packed weight/bias needs an even first dimension, got {n2}")
    n = n2 // 2
    if layout == CONCAT_GATE_FIRST:
        return t[:n], t[n:]
    if layout == CONCAT_UP_FIRST:
        return t[n:], t[:n]
    if layout == INTERLEAVED_GATE_EVEN:
        return t[0::2], t[1::2]
    if layout == INTERLEAVED_UP_EVEN:
        return t[1::2], t[0::2]
    raise ValueError(f"glu_fusion: unknown packed layout {layout}; expected one of {sorted(LAYOUTS.values())}")


def _check_forward(x: Tensor, w_gate: Tensor, w_up: Tensor,
                   b_gate: Optional[Tensor], b_up: Optional[Tensor]) -> None:
    if x.dim() < 1:
        raise ValueError("glu_fusion: x must have at least one dimension [..., K]")
    if w_gate.dim() != 2 or w_up.dim() != 2:
        raise ValueError(f"glu_fusion: w_gate and w_up must be 2-D [N, K], got {tuple(w_gate.shape)} "
                         f"and {tuple(w_up.shape)}")
    if w_gate.shape != w_up.shape:
        raise ValueError(f"glu_fusion: w_gate {tuple(w_gate.shape)} and w_up {tuple(w_up.shape)} differ")
    if x.shape[-1] != w_gate.shape[1]:
        raise ValueError(f"glu_fusion: x has K={x.shape[-1]} features but the weights expect "
                         f"K={w_gate.shape[1]}")
    # Messages use the public functions' parameter names (bias_gate, bias_up).
    if (b_gate is None) != (b_up is None):
        raise ValueError("glu_fusion: give both bias_gate and bias_up, or neither")
    for name, b in (("bias_gate", b_gate), ("bias_up", b_up)):
        if b is not None and tuple(b.shape) != (w_gate.shape[0],):
            raise ValueError(f"glu_fusion: {name} must have shape ({w_gate.shape[0]},), got {tuple(b.shape)}")
    check_same("x", x, [("w_gate", w_gate), ("w_up", w_up), ("bias_gate", b_gate), ("bias_up", b_up)])


def check_packed(x: Tensor, weight: Tensor, bias: Optional[Tensor]) -> None:
    """Check a packed ``[2N, K]`` weight and ``[2N]`` bias as the caller passed them, before they
    are split into halves (whose shapes would only confuse an error message)."""
    if weight.dim() != 2 or weight.shape[0] % 2:
        raise ValueError(f"glu_fusion: the packed weight must be 2-D [2N, K] with an even first dimension, "
                         f"got {tuple(weight.shape)}")
    if bias is not None and tuple(bias.shape) != (weight.shape[0],):
        raise ValueError(f"glu_fusion: bias must have shape (2N,) = ({weight.shape[0]},) for a weight of "
                         f"shape {tuple(weight.shape)}, got {tuple(bias.shape)}")
    if x.dim() >= 1 and x.shape[-1] != weight.shape[1]:
        raise ValueError(f"glu_fusion: x has K={x.shape[-1]} features but the weight expects K={weight.shape[1]}")
    check_same("x", x, [("weight", weight), ("bias", bias)])


def _engine_serves(x2d: Tensor, w_gate: Tensor, w_up: Tensor, out: Optional[Tensor],
                   preact: Optional[Tensor], save_preact: bool) -> bool:
    """Whether the Hopper engine runs this forward: on sm_90 with 16-bit operands TMA can
    address, and, when the pre-activations are saved, from ``_ENGINE_TRAIN_MIN_K`` features."""
    from ..kernels import engine
    if not (_ENGINE and x2d.shape[1] > 0 and engine.available(x2d.device)):
        return False
    if save_preact and x2d.shape[1] < _ENGINE_TRAIN_MIN_K:
        return False
    from ..kernels.engine.host import addressable
    n = w_gate.shape[0]
    halves = (preact[:, :n], preact[:, n:]) if preact is not None else ()
    return all(addressable(t) for t in (x2d, w_gate, w_up, out, *halves))


def _route(x2d: Tensor, w_gate: Tensor, w_up: Tensor, out: Optional[Tensor], preact: Optional[Tensor],
           save_preact: bool) -> str:
    """The one place the forward picks its implementation for a 2-D problem:
    ``"reference"`` (plain torch), ``"engine"`` (the Hopper GEMM engine with the gate in its
    epilogue), ``"cublas"`` (two GEMMs into the pre-activations, then the
    gate kernel: training calls from ``_CUBLAS_MIN_TOKENS`` tokens), ``"tma"`` (the persistent
    TMA kernel from ``_TMA_MIN_TOKENS`` tokens where every operand is TMA-addressable) or
    ``"pointer"`` (the fused pointer kernel)."""
    if not use_gemm_kernels(x2d):
        return "reference"
    if _engine_serves(x2d, w_gate, w_up, out, preact, save_preact):
        return "engine"
    m, k = x2d.shape
    if save_preact and _FORWARD == "auto" and m >= _CUBLAS_MIN_TOKENS and k > 0:
        return "cublas"
    if _FORWARD_TMA and m >= _TMA_MIN_TOKENS and k > 0:
        from ..kernels.portable.swiglu_fwd_tma import tma_eligible
        n = w_gate.shape[0]
        halves = (preact[:, :n], preact[:, n:]) if preact is not None else ()
        if tma_eligible(x2d, w_gate, w_up, out, *halves):
            return "tma"
    return "pointer"


def _forward(x: Tensor, w_gate: Tensor, w_up: Tensor, b_gate: Optional[Tensor],
             b_up: Optional[Tensor], save_preact: bool) -> tuple[Tensor, Tensor]:
    if plans_enabled(x):
        key = (tensor_key(x), tensor_key(w_gate), tensor_key(w_up), tensor_key(b_gate),
               tensor_key(b_up), save_preact, torch.get_float32_matmul_precision(), _FORWARD_TMA, _FORWARD, _ENGINE)
        plan = _FORWARD_PLANS.get(key, x, w_gate, w_up, b_gate, b_up, save_preact)
        if plan is not None:
            result = plan(x, w_gate, w_up, b_gate, b_up)
            if result is not None:
                return result
    _check_forward(x, w_gate, w_up, b_gate, b_up)
    n, k = w_gate.shape
    lead = x.shape[:-1]
    x2d = rows_2d(x, k)
    m = x2d.shape[0]
    if use_gemm_kernels(x):
        out = torch.empty((m, n), device=x.device, dtype=x.dtype)
        preact = torch.empty((m, 2 * n), device=x.device, dtype=x.dtype) if save_preact else None
        route = _route(x2d, w_gate, w_up, out, preact, save_preact)
        if route == "engine":
            _forward_engine(x2d, w_gate, w_up, b_gate, b_up, out, preact)
        elif route == "cublas":
            _forward_cublas(x2d, w_gate, w_up, b_gate, b_up, out, preact)
        else:
            from ..kernels.portable.swiglu_fwd import swiglu_forward
            from ..kernels.portable.swiglu_fwd_tma import swiglu_forward_tma
            launch = swiglu_forward_tma if route == "tma" else swiglu_forward
            launch(x2d, w_gate, w_up, b_gate, b_up, out, preact, allow_tf32())
    else:
        g, u = reference.swiglu_preact(x2d, w_gate, w_up, b_gate, b_up)
        out = reference.swiglu_gate(g, u)
        preact = torch.cat([g, u], dim=1) if save_preact else None
    if preact is None:
        preact = empty_like_nothing(x)
    return out.reshape(*lead, n), preact


def _forward_engine(x2d: Tensor, w_gate: Tensor, w_up: Tensor, b_gate: Optional[Tensor],
                    b_up: Optional[Tensor], out: Tensor, preact: Optional[Tensor]) -> None:
    from ..kernels.engine.host import swiglu_forward
    halves = _preact_halves(preact) if preact is not None else (None, None)
    swiglu_forward(x2d, w_gate, w_up, b_gate, b_up, out, *halves)


def _forward_cublas(x2d: Tensor, w_gate: Tensor, w_up: Tensor, b_gate: Optional[Tensor],
                    b_up: Optional[Tensor], out: Tensor, preact: Tensor) -> None:
    """Training forward: cuBLAS writes g and u straight into the saved pre-activations (as
    ``F.linear`` rounds them), then one elementwise kernel writes ``silu(g)·u``."""
    from ..kernels.portable.swiglu_gate import swiglu_gate
    _projections_into(x2d, w_gate, w_up, b_gate, b_up, preact)
    swiglu_gate(*_preact_halves(preact), out)


def _projections_into(x2d: Tensor, w_gate: Tensor, w_up: Tensor, b_gate: Optional[Tensor],
                      b_up: Optional[Tensor], preact: Tensor) -> None:
    """``preact = [x·Wgᵀ + bg | x·Wuᵀ + bu]``: two GEMMs straight into its halves."""
    g, u = _preact_halves(preact)
    if b_gate is None:
        torch.mm(x2d, w_gate.t(), out=g)
        torch.mm(x2d, w_up.t(), out=u)
    else:
        torch.addmm(b_gate, x2d, w_gate.t(), out=g)
        torch.addmm(b_up, x2d, w_up.t(), out=u)


def _build_forward_plan(x: Tensor, w_gate: Tensor, w_up: Tensor, b_gate: Optional[Tensor],
                        b_up: Optional[Tensor], save_preact: bool):
    """The forward's host work for this argument signature, done once; None: general path.

    The returned ``run(x, w_gate, w_up, b_gate, b_up)`` allocates the outputs and launches; it
    returns None when this call's operands are not aligned for the TMA kernel."""
    _check_forward(x, w_gate, w_up, b_gate, b_up)
    n, k = w_gate.shape
    x2d = rows_2d(x, k)
    m = x2d.shape[0]
    if m == 0 or n == 0 or k == 0 or x2d.data_ptr() != x.data_ptr():
        return None   # empty problems and inputs that reshape copies take the general path
    device, dtype = x.device, x.dtype
    out_2d, out_shape, pre_shape = (m, n), (*x.shape[:-1], n), (m, 2 * n)
    # Outputs laid out as every call will allocate them: the kernels' strides come from these.
    out = torch.empty(out_2d, device=device, dtype=dtype)
    preact = torch.empty(pre_shape, device=device, dtype=dtype) if save_preact else None
    route = _route(x2d, w_gate, w_up, out, preact, save_preact)
    if route == "reference":
        return None

    if route == "engine":
        def run_engine(x, w_gate, w_up, b_gate, b_up):
            if (x.data_ptr() | w_gate.data_ptr() | w_up.data_ptr()) & 15:
                return None   # the copy engine needs 16-byte aligned operands: general path
            out = torch.empty(out_2d, device=device, dtype=dtype)
            preact = torch.empty(pre_shape, device=device, dtype=dtype) if save_preact else None
            _forward_engine(x.reshape(m, k), w_gate, w_up, b_gate, b_up, out, preact)
            return out.reshape(out_shape), preact if save_preact else empty_like_nothing(x)
        return run_engine

    if route == "cublas":
        def run_cublas(x, w_gate, w_up, b_gate, b_up):
            out = torch.empty(out_2d, device=device, dtype=dtype)
            preact = torch.empty(pre_shape, device=device, dtype=dtype)
            _forward_cublas(x.reshape(m, k), w_gate, w_up, b_gate, b_up, out, preact)
            return out.reshape(out_shape), preact
        return run_cublas

    from ..kernels.portable.swiglu_fwd import forward_operands, forward_plan
    if route == "tma":
        from ..kernels.portable.swiglu_fwd_tma import tma_forward_plan
        launch_tma = tma_forward_plan(x2d, w_gate, w_up, b_gate, b_up, out, preact, allow_tf32())

        def run_tma(x, w_gate, w_up, b_gate, b_up):
            if (x.data_ptr() | w_gate.data_ptr() | w_up.data_ptr()) & 15:
                return None   # the copy engine needs 16-byte aligned operands: general path
            out = torch.empty(out_2d, device=device, dtype=dtype)
            preact = torch.empty(pre_shape, device=device, dtype=dtype) if save_preact else None
            launch_tma(*forward_operands(x.reshape(m, k), w_gate, w_up, b_gate, b_up, out, preact))
            return out.reshape(out_shape), preact if save_preact else empty_like_nothing(x)
        return run_tma

    launch = forward_plan(x2d, w_gate, w_up, b_gate, b_up, out, preact, allow_tf32())

    def run(x, w_gate, w_up, b_gate, b_up):
        out = torch.empty(out_shape, device=device, dtype=dtype)
        preact = torch.empty(pre_shape, device=device, dtype=dtype) if save_preact else None
        launch(*forward_operands(x, w_gate, w_up, b_gate, b_up, out, preact))
        return out, preact if save_preact else empty_like_nothing(x)
    return run


_FORWARD_PLANS = PlanCache(_build_forward_plan)


def _fake_forward(x: Tensor, n: int, save_preact: bool) -> tuple[Tensor, Tensor]:
    out = x.new_empty((*x.shape[:-1], n))
    if save_preact:
        m = 1
        for d in x.shape[:-1]:
            m = m * d
        return out, x.new_empty((m, 2 * n))
    return out, x.new_empty((0,))


# --- forward ops --------------------------------------------------------------------------------

@torch.library.custom_op("glu_fusion::swiglu", mutates_args=())
def swiglu(x: Tensor, w_gate: Tensor, w_up: Tensor, b_gate: Optional[Tensor],
           b_up: Optional[Tensor], save_preact: bool) -> tuple[Tensor, Tensor]:
    return _forward(x, w_gate, w_up, b_gate, b_up, save_preact)


@swiglu.register_fake
def _(x, w_gate, w_up, b_gate, b_up, save_preact):
    _check_forward(x, w_gate, w_up, b_gate, b_up)
    return _fake_forward(x, w_gate.shape[0], save_preact)


@torch.library.custom_op("glu_fusion::swiglu_packed", mutates_args=())
def swiglu_packed(x: Tensor, weight: Tensor, bias: Optional[Tensor], layout: int,
                  save_preact: bool) -> tuple[Tensor, Tensor]:
    check_packed(x, weight, bias)
    w_gate, w_up = packed_views(weight, layout)
    b_gate, b_up = packed_views(bias, layout) if bias is not None else (None, None)
    return _forward(x, w_gate, w_up, b_gate, b_up, save_preact)


@swiglu_packed.register_fake
def _(x, weight, bias, layout, save_preact):
    check_packed(x, weight, bias)
    w_gate, w_up = packed_views(weight, layout)
    b_gate, b_up = packed_views(bias, layout) if bias is not None else (None, None)
    _check_forward(x, w_gate, w_up, b_gate, b_up)
    return _fake_forward(x, w_gate.shape[0], save_preact)


@torch.library.custom_op("glu_fusion::swiglu_preact", mutates_args=())
def swiglu_preact(x: Tensor, w_gate: Tensor, w_up: Tensor, b_gate: Optional[Tensor],
                  b_up: Optional[Tensor]) -> Tensor:
    """The pre-activations ``[g | u]`` [M, 2N] alone, for a backward that recomputes them: the
    two GEMMs (cuBLAS on the GPU) write its halves; no gate and no output are computed."""
    _check_forward(x, w_gate, w_up, b_gate, b_up)
    n, k = w_gate.shape
    x2d = rows_2d(x, k)
    preact = x.new_empty((x2d.shape[0], 2 * n))
    _projections_into(x2d, w_gate, w_up, b_gate, b_up, preact)
    return preact


@swiglu_preact.register_fake
def _(x, w_gate, w_up, b_gate, b_up):
    _check_forward(x, w_gate, w_up, b_gate, b_up)
    return _fake_forward(x, w_gate.shape[0], True)[1]


# --- backward ops -------------------------------------------------------------------------------

def _preact_halves(preact: Tensor) -> tuple[Tensor, Tensor]:
    n = preact.shape[1] // 2
    return preact[:, :n], preact[:, n:]


@torch.library.custom_op("glu_fusion::swiglu_dh", mutates_args=())
def swiglu_dh(dout: Tensor, preact: Tensor, layout: int) -> Tensor:
    """The gate's backward ``dH`` [M, 2N], its dG and dU columns placed as ``layout`` places
    the gate and up rows of a packed weight, so that ``dX = dH·W`` and ``dW = dHᵀ·x``."""
    if plans_enabled(dout):
        plan = _DH_PLANS.get((tensor_key(dout), tensor_key(preact), layout), dout, preact, layout)
        if plan is not None:
            return plan(dout, preact)
    n = preact.shape[1] // 2
    dh = preact.new_empty((preact.shape[0], 2 * n))
    _gate_grad_into(dout, preact, *_dh_halves(dh, layout))
    return dh


def _gate_grad_into(dout: Tensor, preact: Tensor, d_g_out: Tensor, d_u_out: Tensor,
                    h_out: Optional[Tensor] = None) -> None:
    """Write dG and dU of ``silu(g)·u`` into the given [M, N] views (which may be g and u), and
    ``h = silu(g)·u`` into ``h_out`` when given."""
    n = preact.shape[1] // 2
    dout2d = rows_2d(dout, n)
    g, u = _preact_halves(preact)
    if use_gemm_kernels(dout):
        from ..kernels.portable.swiglu_gate_grad import swiglu_gate_grad
        swiglu_gate_grad(dout2d, g, u, d_g_out, d_u_out, h_out)
    else:
        if h_out is not None:
            h_out.copy_(reference.swiglu_gate(g, u))
        d_g, d_u = reference.swiglu_grad_preact(dout2d, g, u)  # both read before either is written
        d_g_out.copy_(d_g)
        d_u_out.copy_(d_u)


def _dh_halves(dh: Tensor, layout: int) -> tuple[Tensor, Tensor]:
    """The dG and dU column views of ``dh``, placed as ``layout`` places the weight's rows."""
    return tuple(t.t() for t in packed_views(dh.t(), layout))


def _build_dh_plan(dout: Tensor, preact: Tensor, layout: int):
    """``swiglu_dh``'s host work for this signature, done once; None: general path."""
    if not use_gemm_kernels(dout):
        return None
    from ..kernels.portable.swiglu_gate_grad import gate_grad_plan
    n = preact.shape[1] // 2
    dout2d = rows_2d(dout, n)
    m = dout2d.shape[0]
    if m == 0 or n == 0 or dout2d.data_ptr() != dout.data_ptr():
        return None
    dh = preact.new_empty((m, 2 * n))
    launch = gate_grad_plan(dout2d, *_preact_halves(preact), *_dh_halves(dh, layout))

    def run(dout, preact):
        dh = preact.new_empty((m, 2 * n))
        d_g, d_u = _dh_halves(dh, layout)
        launch(dout, *_preact_halves(preact), d_g, d_u, d_g)
        return dh
    return run


_DH_PLANS = PlanCache(_build_dh_plan)


@swiglu_dh.register_fake
def _(dout, preact, layout):
    return preact.new_empty((preact.shape[0], preact.shape[1]))


@torch.library.custom_op("glu_fusion::swiglu_dh_inplace", mutates_args=("preact",))
def swiglu_dh_inplace(dout: Tensor, preact: Tensor) -> None:
    """``swiglu_dh`` written over the pre-activations: afterwards ``preact`` holds ``[dG | dU]``.

    For backward passes that own ``preact`` (recomputed there, or a saved buffer the compiled
    backward may consume: ``saved_preact_pass``), so that the ``[M, 2N]`` gradient needs no
    buffer of its own.  The kernel reads each element's g and u before writing it."""
    if plans_enabled(dout):  # the plan's build checks the arguments, once per signature
        plan = _DH_INPLACE_PLANS.get((tensor_key(dout), tensor_key(preact)), dout, preact)
        if plan is not None:
            plan(dout, preact)
            return
    _check_dh_inplace(dout, preact)
    _gate_grad_into(dout, preact, *_preact_halves(preact))


def _check_dh_inplace(dout: Tensor, preact: Tensor) -> None:
    n2 = preact.shape[-1] if preact.dim() == 2 else -1
    if n2 < 0 or n2 % 2 or dout.shape[-1] != n2 // 2 or dout.numel() != preact.numel() // 2:
        raise ValueError(f"glu_fusion: swiglu_dh_inplace needs preact [M, 2N] and dout [..., N] with "
                         f"M·N elements; got {tuple(preact.shape)} and {tuple(dout.shape)}")
    check_same("preact", preact, [("dout", dout)])


def _build_dh_inplace_plan(dout: Tensor, preact: Tensor):
    """``swiglu_dh_inplace``'s host work for this signature, done once; None: general path."""
    _check_dh_inplace(dout, preact)
    if not use_gemm_kernels(dout):
        return None
    from ..kernels.portable.swiglu_gate_grad import gate_grad_plan
    n = preact.shape[1] // 2
    dout2d = rows_2d(dout, n)
    if dout2d.shape[0] == 0 or n == 0 or dout2d.data_ptr() != dout.data_ptr():
        return None
    g, u = _preact_halves(preact)
    launch = gate_grad_plan(dout2d, g, u, g, u)

    def run(dout, preact):
        g, u = _preact_halves(preact)
        launch(dout, g, u, g, u, g)
    return run


_DH_INPLACE_PLANS = PlanCache(_build_dh_inplace_plan)


@swiglu_dh_inplace.register_fake
def _(dout, preact):
    _check_dh_inplace(dout, preact)


# --- autograd -----------------------------------------------------------------------------------

def _gemm_backward(dout: Tensor, preact: Tensor, x: Tensor, weights: tuple, layout: int,
                   need_x: bool, need_w: bool, need_b: bool, owns_preact: bool = False):
    """Backward through one elementwise kernel and plain GEMMs.

    ``weights`` is ``(weight,)`` for a packed weight or ``(w_gate, w_up)``; returns dx, the
    weight grads in the same form, and the bias grads (or Nones).  ``owns_preact``: nothing
    else reads ``preact`` (it was recomputed here), so ``dH`` overwrites it where its columns
    sit as the pre-activations' do (``[dG | dU]``)."""
    if owns_preact and layout == CONCAT_GATE_FIRST:
        torch.ops.glu_fusion.swiglu_dh_inplace(dout, preact)
        dh = preact
    else:
        dh = torch.ops.glu_fusion.swiglu_dh(dout, preact, layout)
    return grads_from_dh(dh, x, weights, need_x, need_w, need_b)


def grads_from_dh(dh: Tensor, x: Tensor, weights: tuple, need_x: bool, need_w: bool, need_b: bool):
    """dx, the weight grads and the bias grads (each a tuple shaped like ``weights``, or None)
    from ``dH`` laid out as the weights' rows: plain GEMMs and column sums.

    The weight gradient ``dHᵀ·x`` is one GEMM for a packed weight, one per weight otherwise
    (cuBLAS on the GPU).  The Hopper engine's split-reduction weight gradient
    (``kernels.engine.host.matmul(..., splits=)``) is the candidate for it once measured against
    cuBLAS."""
    x2d = rows_2d(x)
    dx = dws = dbs = None
    n = dh.shape[1] // 2
    if need_x:
        if len(weights) == 1:
            dx = (dh @ weights[0]).reshape(x.shape)
        else:
            dx = torch.addmm(dh[:, :n] @ weights[0], dh[:, n:], weights[1]).reshape(x.shape)
    if need_w or need_b:
        if need_w and len(weights) == 1:
            dws = (dh.t() @ x2d,)  # one GEMM over [dG | dU]: the packed weight's gradient
        elif need_w:
            # separate weights: dGᵀ·x and dUᵀ·x, two GEMMs (6% faster than one over [dG | dU]
            # and then two views of it: H100, 4096->14336, 16384 tokens)
            dws = (dh[:, :n].t() @ x2d, dh[:, n:].t() @ x2d)
        db = dh.sum(0) if need_b else None
        if need_b:
            dbs = (db,) if len(weights) == 1 else (db[:n], db[n:])
    return dx, dws, dbs


def _setup(ctx, x, weights, biases, save_preact, output, layout=None):
    out, preact = output
    ctx.mark_non_differentiable(preact)
    ctx.has_bias = biases[0] is not None
    ctx.layout = layout
    ctx.save_for_backward(x, *weights, *biases, preact if save_preact else None)


def _swiglu_setup(ctx, inputs, output):
    x, w_gate, w_up, b_gate, b_up, save_preact = inputs
    _setup(ctx, x, (w_gate, w_up), (b_gate, b_up), save_preact, output)


def _swiglu_backward(ctx, dout, _dpreact):
    x, w_gate, w_up, b_gate, b_up, preact = ctx.saved_tensors
    need_x, need_wg, need_wu, need_bg, need_bu = ctx.needs_input_grad[:5]
    if not any((need_x, need_wg, need_wu, need_bg, need_bu)):
        return None, None, None, None, None, None
    recomputed = preact is None
    if recomputed:
        preact = torch.ops.glu_fusion.swiglu_preact(x, w_gate, w_up, b_gate, b_up)
    need_b = ctx.has_bias and (need_bg or need_bu)
    dx, dws, dbs = _gemm_backward(dout, preact, x, (w_gate, w_up), CONCAT_GATE_FIRST,
                                  need_x, need_wg or need_wu, need_b, owns_preact=recomputed)
    return (dx, *(dws or (None, None)), *(dbs or (None, None)), None)


swiglu.register_autograd(_swiglu_backward, setup_context=_swiglu_setup)


def _swiglu_packed_setup(ctx, inputs, output):
    x, weight, bias, layout, save_preact = inputs
    _setup(ctx, x, (weight,), (bias,), save_preact, output, layout)


def _swiglu_packed_backward(ctx, dout, _dpreact):
    x, weight, bias, preact = ctx.saved_tensors
    need_x, need_w, need_b = ctx.needs_input_grad[:3]
    if not any((need_x, need_w, need_b)):
        return None, None, None, None, None
    recomputed = preact is None
    if recomputed:
        w_gate, w_up = packed_views(weight, ctx.layout)
        b_gate, b_up = packed_views(bias, ctx.layout) if bias is not None else (None, None)
        preact = torch.ops.glu_fusion.swiglu_preact(x, w_gate, w_up, b_gate, b_up)
    dx, dws, dbs = _gemm_backward(dout, preact, x, (weight,), ctx.layout, need_x, need_w,
                                  ctx.has_bias and need_b, owns_preact=recomputed)
    return dx, (dws or (None,))[0], (dbs or (None,))[0], None, None


swiglu_packed.register_autograd(_swiglu_packed_backward, setup_context=_swiglu_packed_setup)

for _name in ("swiglu", "swiglu_packed", "swiglu_preact", "swiglu_dh"):
    register_autocast_follow(_name)
# Casting would write the gradient into a copy: the in-place op runs on the dtypes it is given.
register_autocast_passthrough("swiglu_dh_inplace")
_ALL_OPS = (swiglu, swiglu_packed, swiglu_preact, swiglu_dh, swiglu_dh_inplace)
register_cuda_fast_path(*_ALL_OPS)
register_graph_twins(*_ALL_OPS)
