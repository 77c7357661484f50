"""The MLP-block custom ops: ``out = down(silu(x·Wgᵀ + bg) · (x·Wuᵀ + bu))``.

Ops (namespace ``glu_fusion``):

* ``mlp_block(x, w_gate, w_up, b_gate, b_up, w_down, b_down, save_preact) -> (out, preact)``
* ``mlp_block_packed(x, weight, bias, layout, w_down, b_down, save_preact) -> (out, preact)``
* ``mlp_dgated(dout, preact, w_down, layout) -> (dh, h)``: the down projection's input-grad
  GEMM ``dOut·Wd`` followed by the SwiGLU backward: ``dH = [dG | dU]`` placed as ``layout``
  places the gate and up rows, and ``h = silu(g)·u`` recomputed for ``dWd``.  On Hopper the
  engine runs the gate's backward in the GEMM's epilogue (the gradient of ``h`` never reaches
  memory); elsewhere the GEMM (cuBLAS on the GPU) is followed by one elementwise pass.
* ``mlp_dgated_inplace(dout, preact!, w_down) -> h``: the same, ``dH`` written over ``preact``
  (for backward passes that own it).

Why a block op: the SwiGLU op alone saves its output ``h`` for the down projection's weight
grad.  The block saves only the pre-activations (``h`` is recomputed with the gate's backward:
``[M, N]`` less memory per layer).  The forward runs the SwiGLU forward's routes, then the down
projection (cuBLAS on the GPU).
"""
from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F
from torch import Tensor

from ..layouts import CONCAT_GATE_FIRST
from .autocast import register_autocast_follow, register_autocast_passthrough
from .dispatch import check_same, register_cuda_fast_path, rows_2d
from .graph_twins import register_graph_twins
from . import swiglu as swiglu_ops
from .swiglu import (_check_forward, check_packed, _dh_halves, _forward, _gate_grad_into,
                     _preact_halves, grads_from_dh, packed_views)


def _check_down(h_features: int, x: Tensor, w_down: Tensor, b_down: Optional[Tensor]) -> None:
    if w_down.dim() != 2 or w_down.shape[1] != h_features:
        raise ValueError(f"glu_fusion: w_down must be [D, N] with N={h_features}, got {tuple(w_down.shape)}")
    if b_down is not None and tuple(b_down.shape) != (w_down.shape[0],):
        raise ValueError(f"glu_fusion: bias_down must have shape ({w_down.shape[0]},), got {tuple(b_down.shape)}")
    check_same("x", x, [("w_down", w_down), ("bias_down", b_down)])


def _block_forward(x, w_gate, w_up, b_gate, b_up, w_down, b_down, save_preact):
    _check_down(w_gate.shape[0], x, w_down, b_down)
    h, preact = _forward(x, w_gate, w_up, b_gate, b_up, save_preact)
    return F.linear(h, w_down, b_down), preact


def _fake_block(x, w_gate, w_up, b_gate, b_up, w_down, b_down, save_preact):
    _check_forward(x, w_gate, w_up, b_gate, b_up)
    _check_down(w_gate.shape[0], x, w_down, b_down)
    out = x.new_empty((*x.shape[:-1], w_down.shape[0]))
    if not save_preact:
        return out, x.new_empty((0,))
    m = 1
    for d in x.shape[:-1]:
        m = m * d
    return out, x.new_empty((m, 2 * w_gate.shape[0]))


@torch.library.custom_op("glu_fusion::mlp_block", mutates_args=())
def mlp_block(x: Tensor, w_gate: Tensor, w_up: Tensor, b_gate: Optional[Tensor], b_up: Optional[Tensor],
              w_down: Tensor, b_down: Optional[Tensor], save_preact: bool) -> tuple[Tensor, Tensor]:
    return _block_forward(x, w_gate, w_up, b_gate, b_up, w_down, b_down, save_preact)


@mlp_block.register_fake
def _(x, w_gate, w_up, b_gate, b_up, w_down, b_down, save_preact):
    return _fake_block(x, w_gate, w_up, b_gate, b_up, w_down, b_down, save_preact)


@torch.library.custom_op("glu_fusion::mlp_block_packed", mutates_args=())
def mlp_block_packed(x: Tensor, weight: Tensor, bias: Optional[Tensor], layout: int, w_down: Tensor,
                     b_down: Optional[Tensor], save_preact: bool) -> tuple[Tensor, Tensor]:
    check_packed(x, weight, bias)
    w_gate, w_up = packed_views(weight, layout)
    b_gate, b_up = packed_views(bias, layout) if bias is not None else (None, None)
    return _block_forward(x, w_gate, w_up, b_gate, b_up, w_down, b_down, save_preact)


@mlp_block_packed.register_fake
def _(x, weight, bias, layout, w_down, b_down, save_preact):
    check_packed(x, weight, bias)
    w_gate, w_up = packed_views(weight, layout)
    b_gate, b_up = packed_views(bias, layout) if bias is not None else (None, None)
    return _fake_block(x, w_gate, w_up, b_gate, b_up, w_down, b_down, save_preact)


# --- the down projection's input-grad GEMM and the gate's backward --------------------------------

def _engine_dgated_serves(dout2d: Tensor, w_down: Tensor, *outputs: Optional[Tensor]) -> bool:
    """The Hopper engine's dgated GEMM: 1.10-2.0x cuBLAS's ``dOut·Wd`` plus the elementwise
    pass (benchmarks/results/engine.md, H200), wherever TMA addresses every operand."""
    from ..kernels import engine
    if not (swiglu_ops._ENGINE and dout2d.shape[0] and dout2d.shape[1] and engine.available(dout2d.device)):
        return False
    from ..kernels.engine.host import addressable
    return all(t is not None and addressable(t) for t in (dout2d, w_down, *outputs))


def _dgated_into(dout2d: Tensor, preact: Tensor, w_down: Tensor, d_g: Tensor, d_u: Tensor,
                 h: Optional[Tensor]) -> None:
    """Write dG, dU (which may be the halves of ``preact`` itself) and, when given, ``h``: the
    engine's GEMM with the gate's backward in its epilogue on Hopper, elsewhere the GEMM
    ``dOut·Wd`` (cuBLAS on the GPU) and one elementwise pass."""
    g, u = _preact_halves(preact)
    if _engine_dgated_serves(dout2d, w_down, g, u, d_g, d_u, h):
        from ..kernels.engine.host import dgated
        dgated(dout2d, w_down, g, u, d_g, d_u, h)
        return
    _gate_grad_into(dout2d @ w_down, preact, d_g, d_u, h)


def _check_dgated(dout: Tensor, preact: Tensor, w_down: Tensor) -> None:
    n2 = preact.shape[-1] if preact.dim() == 2 else -1
    if (n2 < 0 or n2 % 2 or dout.dim() != 2 or dout.shape[0] != preact.shape[0]
            or tuple(w_down.shape) != (dout.shape[1], n2 // 2)):
        raise ValueError(f"glu_fusion: mlp_dgated needs dout [M, D], preact [M, 2N] and w_down [D, N]; "
                         f"got {tuple(dout.shape)}, {tuple(preact.shape)} and {tuple(w_down.shape)}")
    check_same("preact", preact, [("dout", dout), ("w_down", w_down)])


def _dgated(dout: Tensor, preact: Tensor, w_down: Tensor, d_g: Tensor, d_u: Tensor, h: Tensor) -> None:
    _check_dgated(dout, preact, w_down)
    _dgated_into(dout, preact, w_down, d_g, d_u, h)


@torch.library.custom_op("glu_fusion::mlp_dgated", mutates_args=())
def mlp_dgated(dout: Tensor, preact: Tensor, w_down: Tensor, layout: int) -> tuple[Tensor, Tensor]:
    m, n = preact.shape[0], preact.shape[1] // 2
    dh = preact.new_empty((m, 2 * n))
    h = preact.new_empty((m, n))
    _dgated(dout, preact, w_down, *_dh_halves(dh, layout), h)
    return dh, h


@mlp_dgated.register_fake
def _(dout, preact, w_down, layout):
    _check_dgated(dout, preact, w_down)
    return preact.new_empty(preact.shape), preact.new_empty((preact.shape[0], preact.shape[1] // 2))


@torch.library.custom_op("glu_fusion::mlp_dgated_inplace", mutates_args=("preact",))
def mlp_dgated_inplace(dout: Tensor, preact: Tensor, w_down: Tensor) -> Tensor:
    """``mlp_dgated`` with ``dH = [dG | dU]`` written over ``preact``; returns ``h``."""
    h = preact.new_empty((preact.shape[0], preact.shape[1] // 2))
    _dgated(dout, preact, w_down, *_preact_halves(preact), h)
    return h


@mlp_dgated_inplace.register_fake
def _(dout, preact, w_down):
    _check_dgated(dout, preact, w_down)
    return preact.new_empty((preact.shape[0], preact.shape[1] // 2))


# --- autograd -----------------------------------------------------------------------------------

def _block_backward(ctx, dout, x, weights, biases, w_down, preact, needs, recompute_preact):
    """Gradients (dx, weight grads, bias grads, dWd, dbd); ``needs`` = (x, any weight, any bias,
    w_down, b_down).  The weight and bias grads come as tuples shaped like ``weights``/``biases``
    (or None)."""
    need_x, need_w, need_b, need_wd, need_bd = needs
    dout2d = rows_2d(dout, w_down.shape[0])
    owns = preact is None
    if owns:
        preact = recompute_preact()
    if owns and ctx.layout == CONCAT_GATE_FIRST:
        h = torch.ops.glu_fusion.mlp_dgated_inplace(dout2d, preact, w_down)
        dh = preact
    else:
        dh, h = torch.ops.glu_fusion.mlp_dgated(dout2d, preact, w_down, ctx.layout)
    d_wd = dout2d.t() @ h if need_wd else None
    d_bd = dout2d.sum(0) if (need_bd and ctx.has_down_bias) else None
    dx, dws, dbs = grads_from_dh(dh, x, weights, need_x, need_w, need_b and ctx.has_bias)
    return dx, dws or (None,) * len(weights), dbs or (None,) * len(biases), d_wd, d_bd


def _setup(ctx, x, weights, biases, w_down, b_down, save_preact, output, layout):
    _out, preact = output
    ctx.mark_non_differentiable(preact)
    ctx.layout = layout
    ctx.has_bias = biases[0] is not None
    ctx.has_down_bias = b_down is not None
    ctx.save_for_backward(x, *weights, *biases, w_down, preact if save_preact else None)


def _mlp_block_setup(ctx, inputs, output):
    x, w_gate, w_up, b_gate, b_up, w_down, b_down, save_preact = inputs
    _setup(ctx, x, (w_gate, w_up), (b_gate, b_up), w_down, b_down, save_preact, output, CONCAT_GATE_FIRST)


def _mlp_block_backward(ctx, dout, _dpreact):
    x, w_gate, w_up, b_gate, b_up, w_down, preact = ctx.saved_tensors
    n = ctx.needs_input_grad
    needs = (n[0], n[1] or n[2], n[3] or n[4], n[5], n[6])
    dx, dws, dbs, d_wd, d_bd = _block_backward(
        ctx, dout, x, (w_gate, w_up), (b_gate, b_up), w_down, preact, needs,
        lambda: torch.ops.glu_fusion.swiglu_preact(x, w_gate, w_up, b_gate, b_up))
    return dx, *dws, *dbs, d_wd, d_bd, None


mlp_block.register_autograd(_mlp_block_backward, setup_context=_mlp_block_setup)


def _mlp_block_packed_setup(ctx, inputs, output):
    x, weight, bias, layout, w_down, b_down, save_preact = inputs
    _setup(ctx, x, (weight,), (bias,), w_down, b_down, save_preact, output, layout)


def _mlp_block_packed_backward(ctx, dout, _dpreact):
    x, weight, bias, w_down, preact = ctx.saved_tensors
    n = ctx.needs_input_grad
    needs = (n[0], n[1], n[2], n[4], n[5])

    def recompute():
        w_gate, w_up = packed_views(weight, ctx.layout)
        b_gate, b_up = packed_views(bias, ctx.layout) if bias is not None else (None, None)
        return torch.ops.glu_fusion.swiglu_preact(x, w_gate, w_up, b_gate, b_up)

    dx, dws, dbs, d_wd, d_bd = _block_backward(ctx, dout, x, (weight,), (bias,), w_down, preact,
                                               needs, recompute)
    return dx, dws[0], dbs[0], None, d_wd, d_bd, None


mlp_block_packed.register_autograd(_mlp_block_packed_backward, setup_context=_mlp_block_packed_setup)

for _name in ("mlp_block", "mlp_block_packed", "mlp_dgated"):
    register_autocast_follow(_name)
register_autocast_passthrough("mlp_dgated_inplace")
_ALL_OPS = (mlp_block, mlp_block_packed, mlp_dgated, mlp_dgated_inplace)
register_cuda_fast_path(*_ALL_OPS)
register_graph_twins(*_ALL_OPS)

