"""The experts' down projection and combine as one custom op.

``out[t] = Σ wᵣ·(hᵣ·Wdₑᵀ + bdₑ)`` over the ``topk`` rows ``r`` whose slot ``slots[r]`` belongs to
token ``t`` (``slots[r] // topk == t``), for rows ``h`` [S, N] sorted by expert (``offsets``:
cumulative rows per expert, as for ``grouped_swiglu``), ``w_down`` [E, D, N] (any strides),
``b_down`` [E, D], ``row_weights`` [S] each row's routing weight and ``slots`` [S] a permutation
of ``range(S)``.  Rows from ``offsets[-1]`` on (a padded tail) add nothing.  This is what
transformers' ``grouped_mm`` experts compute after the gate: the down grouped GEMM and its
per-row expert bias, the routing-weight multiply, the inverse permutation and the sum over each
token's ``topk`` rows, with eager's roundings (each step rounded to h's dtype; the sum
accumulated in fp32 by ``torch.sum``).

One op because of the backward: the routing-weight gradient ``<dOutₜ, yᵣ>`` needs the down
projection's output ``y`` [S, D], which a compiled graph saves for the multiply's backward.
Here it comes from the GEMM the backward runs anyway, ``dHuᵣ = dOutₜ·Wdₑ`` (``dh = w·dHu``):
``<dOutₜ, yᵣ> = <hᵣ, dHuᵣ> + <dOutₜ, bdₑ>``, so nothing of size [S, D] is saved.  On Hopper the
engine's grouped GEMM scales each row and writes it to its token slot in its epilogue
(``ENGINE_COMBINE``), so that the per-token sum reads each token's rows side by side.

Op (namespace ``glu_fusion``, functional): ``grouped_down_combine(h, offsets, w_down, b_down,
row_weights, slots, topk) -> out`` [S / topk, D].
"""
from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor

from .. import grouped_reference
from ..layouts import CONCAT_GATE_FIRST
from .autocast import register_autocast_passthrough
from .dispatch import check_same, register_cuda_fast_path
from .graph_twins import register_graph_twins
from .grouped_swiglu import check_offset_values, expert_of_rows, routed_rows

#: Whether the Hopper engine's grouped GEMM runs the forward where it serves the operands
#: (``kernels.engine.host.grouped_matmul`` with slots and routing weights).  Off until
#: benchmarks/bench_moe.py measures it; the GPU tests turn it on.
ENGINE_COMBINE = False


def _check(h: Tensor, offsets: Tensor, w_down: Tensor, b_down: Optional[Tensor], row_weights: Tensor,
           slots: Tensor, topk: int) -> None:
    if h.dim() != 2:
        raise ValueError(f"glu_fusion: grouped h must be 2-D [S, N], got {tuple(h.shape)}")
    if w_down.dim() != 3 or w_down.shape[2] != h.shape[1]:
        raise ValueError(f"glu_fusion: w_down must be [E, D, N] with N = {h.shape[1]} (h's width), "
                         f"got {tuple(w_down.shape)}")
    e, d, _ = w_down.shape
    s = h.shape[0]
    if offsets.dim() != 1 or offsets.shape[0] != e or e == 0:
        raise ValueError(f"glu_fusion: offsets must be 1-D with one entry per expert ({e}, at least one), "
                         f"got {tuple(offsets.shape)}")
    for name, t in (("offsets", offsets), ("slots", slots)):
        if t.dtype not in (torch.int32, torch.int64):
            raise TypeError(f"glu_fusion: {name} must be int32 or int64, got {t.dtype}")
        if t.device != h.device:
            raise ValueError(f"glu_fusion: {name} is on {t.device} but h is on {h.device}")
    if tuple(slots.shape) != (s,) or tuple(row_weights.shape) != (s,):
        raise ValueError(f"glu_fusion: slots and row_weights must be [S] = ({s},), one per row of h, got "
                         f"{tuple(slots.shape)} and {tuple(row_weights.shape)}")
    if topk < 1 or s % topk:
        raise ValueError(f"glu_fusion: topk must be a positive divisor of the {s} rows, got {topk}")
    if b_down is not None and tuple(b_down.shape) != (e, d):
        raise ValueError(f"glu_fusion: bias_down must have shape ({e}, {d}), got {tuple(b_down.shape)}")
    check_same("h", h, [("w_down", w_down), ("bias_down", b_down), ("row_weights", row_weights)])


def _check_slot_values(slots: Tensor) -> None:
    """Slots must be a permutation of the rows (each token slot filled once).  Checked only on the
    CPU, for the reason ``check_offset_values`` gives."""
    if slots.device.type != "cpu":
        return
    if not torch.equal(torch.sort(slots.long()).values, torch.arange(slots.shape[0])):
        raise ValueError("glu_fusion: slots must be a permutation of range(S): each token slot gets one row")


def _down(h: Tensor, offsets: Tensor, w_down: Tensor, b_down: Optional[Tensor]) -> Tensor:
    """``y`` [S, D]: each row's down projection and expert bias, rounded to h's dtype; zeros for
    the padded tail.  cuBLAS's grouped GEMM where torch has one for these operands."""
    if h.is_cuda and h.dtype == torch.bfloat16 and offsets.dtype == torch.int32 and hasattr(torch, "_grouped_mm"):
        routed = routed_rows(offsets, h.shape[0]).unsqueeze(1)
        y = torch._grouped_mm(h, w_down.transpose(-2, -1), offs=offsets)
        if b_down is not None:
            y = y + b_down[expert_of_rows(offsets, h.shape[0]).clamp(max=w_down.shape[0] - 1)]
        return y.masked_fill(~routed, 0)  # the kernel leaves the tail's rows unwritten
    return grouped_reference.grouped_linear(h, offsets, w_down, b_down)


def _engine_forward(h: Tensor, offsets: Tensor, w_down: Tensor, b_down: Optional[Tensor], row_weights: Tensor,
                    slots: Tensor) -> Optional[Tensor]:
    """The scaled rows in slot order [S, D] from the engine, where it serves; None otherwise."""
    from ..kernels import engine
    if not (ENGINE_COMBINE and engine.available(h.device)):
        return None
    from ..kernels.engine.host import grouped_matmul, grouped_matmul_serves
    slot_rows = h.new_empty((h.shape[0], w_down.shape[1]))
    dest, scale = slots.to(torch.int32), row_weights.float().contiguous()
    if not grouped_matmul_serves(h, w_down, slot_rows, dest, scale):
        return None
    grouped_matmul(h, offsets, w_down, slot_rows, b_down, dest=dest, scale=scale)
    return slot_rows


@torch.library.custom_op("glu_fusion::grouped_down_combine", mutates_args=())
def grouped_down_combine(h: Tensor, offsets: Tensor, w_down: Tensor, b_down: Optional[Tensor], row_weights: Tensor,
                         slots: Tensor, topk: int) -> Tensor:
    _check(h, offsets, w_down, b_down, row_weights, slots, topk)
    check_offset_values(offsets, h.shape[0])
    _check_slot_values(slots)
    s, d = h.shape[0], w_down.shape[1]
    slot_rows = _engine_forward(h, offsets, w_down, b_down, row_weights, slots)
    if slot_rows is None:
        weighted = _down(h, offsets, w_down, b_down) * row_weights.unsqueeze(1)
        slot_rows = torch.empty_like(weighted).index_copy_(0, slots.long(), weighted)
    return slot_rows.view(s // topk, topk, d).sum(dim=1)


@grouped_down_combine.register_fake
def _(h, offsets, w_down, b_down, row_weights, slots, topk):
    _check(h, offsets, w_down, b_down, row_weights, slots, topk)
    return h.new_empty((h.shape[0] // topk, w_down.shape[1]))


# --- autograd ------------------------------------------------------------------------------------

def _times_weight(g: Tensor, offsets: Tensor, w_down: Tensor) -> Tensor:
    """``gᵣ·Wdₑ`` [S, N] per expert, zeros for the tail: the grouped input-grad op over the two
    row halves of ``w_down`` (one engine GEMM where they serve), or the reference for an odd D."""
    d = w_down.shape[1]
    if d % 2:
        return grouped_reference.grouped_input_grad(g, offsets, w_down, w_down[:, :0])
    return torch.ops.glu_fusion.grouped_swiglu_dx(g, offsets, w_down[:, :d // 2], w_down[:, d // 2:])


def _weight_grads(dy: Tensor, h: Tensor, offsets: Tensor, e: int, need_w: bool,
                  need_b: bool) -> tuple[Optional[Tensor], Optional[Tensor]]:
    """``(dWd [E, D, N], dbd [E, D])`` = per expert ``dyₑᵀ·hₑ`` and the column sums of ``dyₑ``
    (deterministic; zeros for experts without rows)."""
    if dy.shape[1] % 2:
        dw, db = grouped_reference.grouped_weight_grad(dy, h, offsets, e)
        return (dw if need_w else None), (db if need_b else None)
    dw, db = torch.ops.glu_fusion.grouped_swiglu_dw(dy, h, offsets, CONCAT_GATE_FIRST, need_w, need_b)
    return (dw if need_w else None), (db if need_b else None)


def _setup(ctx, inputs, output):
    h, offsets, w_down, b_down, row_weights, slots, topk = inputs
    ctx.topk = topk
    ctx.save_for_backward(h, offsets, w_down, b_down, row_weights, slots)


def _backward(ctx, dout):
    h, offsets, w_down, b_down, row_weights, slots = ctx.saved_tensors
    need_h, _, need_w, need_b, need_rw = ctx.needs_input_grad[:5]
    s, e = h.shape[0], w_down.shape[0]
    routed = routed_rows(offsets, s).unsqueeze(1)
    g = dout.index_select(0, slots.long() // ctx.topk) * routed  # each row's token gradient; tail: 0
    scale = row_weights.float().unsqueeze(1)
    dh = drw = dw = db = None
    if need_h or need_rw:
        dhu = _times_weight(g, offsets, w_down)
        if need_h:
            dh = (dhu.float() * scale).to(h.dtype)
        if need_rw:
            drw = (dhu.float() * h.float()).sum(1)
            if b_down is not None:
                bias = b_down[expert_of_rows(offsets, s).clamp(max=e - 1)]
                drw = drw + (g.float() * bias.float()).sum(1)
            drw = drw.to(row_weights.dtype)
    if need_w or (need_b and b_down is not None):
        dy = (g.float() * scale).to(h.dtype)
        dw, db = _weight_grads(dy, h, offsets, e, need_w, need_b and b_down is not None)
    return dh, None, dw, db, drw, None, None


grouped_down_combine.register_autograd(_backward, setup_context=_setup)
register_autocast_passthrough("grouped_down_combine")  # as eager: grouped_mm has no autocast rule
register_cuda_fast_path(grouped_down_combine)
register_graph_twins(grouped_down_combine)
