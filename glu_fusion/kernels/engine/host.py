"""The engine's host side: tile configurations, TMA descriptors, launches, and which operands
it can serve.

Every launch is described by a ``Spec`` (the kernel, each descriptor's block shape, the
constexprs), so that the launch and the ahead-of-time compile for sm_90 (CI, with no GPU)
build exactly the same kernels.
"""
from __future__ import annotations

import functools
from dataclasses import dataclass
from typing import Optional

import torch
import triton
from torch import Tensor
from triton.experimental.gluon import language as gl
from triton.experimental.gluon.nvidia.hopper import TensorDescriptor

from .._launch import multiprocessors
from . import kernels

#: Operand dtypes the engine's wgmma reads.
GL_DTYPES = {torch.bfloat16: gl.bfloat16, torch.float16: gl.float16}
#: Every dtype a descriptor may hold: the operands', and fp32 for split partials.
_LAYOUT_DTYPES = {**GL_DTYPES, torch.float32: gl.float32}

#: Shared memory one program may use on sm_90 (bytes).
SHARED_MEMORY_LIMIT = 232448
_WARPS = 4  # the default partition (consumer 0); the loader and consumer 1 add 1 + 4 warps


@dataclass(frozen=True)
class Config:
    """One tile configuration.  ``block_m`` rows per tile (both consumers' rows in the
    cooperative schedule, one consumer's in ping-pong), ``stages`` per ring, ``store_n`` the
    width of a stored piece and ``store_bufs`` the staging buffers per consumer."""
    block_m: int
    block_n: int
    block_k: int
    stages: int
    pingpong: bool = False
    store_n: Optional[int] = None  # None: the tile's width
    store_bufs: int = 1
    group_m: int = 8
    consumer_regs: int = 232

    @property
    def piece_n(self) -> int:
        return self.store_n or self.block_n

    @property
    def consumer_rows(self) -> int:
        return self.block_m if self.pingpong else self.block_m // 2

    @property
    def name(self) -> str:
        schedule = "pp" if self.pingpong else "coop"
        return (f"{schedule}{self.block_m}x{self.block_n}x{self.block_k}_s{self.stages}"
                f"_st{self.piece_n}x{self.store_bufs}")

    def shared_bytes(self, b_operands: int, staging: int, element: int = 2) -> int:
        """Shared memory of the ring plus ``staging`` staging tiles per consumer, in bytes."""
        rings = 2 if self.pingpong else 1
        stage = (self.block_m * self.block_k + b_operands * self.block_n * self.block_k) * element
        # a ping-pong ring stage holds one consumer's tile
        ring = rings * self.stages * stage
        return ring + 2 * staging * self.consumer_rows * self.piece_n * element + 1024


@dataclass(frozen=True)
class Spec:
    """A launch up to its tensors: the kernel, each descriptor parameter's block shape (in the
    order of the kernel's parameters), the constexprs, and the descriptors that hold fp32 (split
    partials) rather than the operands' dtype."""
    kernel: object
    blocks: dict
    constexprs: dict
    fp32_descriptors: tuple = ()
    #: pointer parameters by kind ("operand": the operands' dtype, "int32", "fp32", or None: not
    #: given in this launch); other ``*_ptr`` parameters are bias pointers, given with HAS_BIAS
    pointers: tuple = ()
    #: fp32 scalar parameters
    floats: tuple = ()


# The configurations the routes pick (benchmarks/results/engine.md has the sweep behind them:
# H200, 2026-12-02; the sub-tiled and ping-pong schedules are slower there or no faster, and
# fail the GPU tests at M=300, N=200, K=136, so no route picks them yet).
GEMM = Config(128, 256, 64, 3)
SWIGLU_INFER = Config(128, 128, 64, 4)
SWIGLU_TRAIN = Config(128, 128, 64, 4)
DGATED = Config(128, 128, 64, 4)
# 128x256 tiles read twice the columns per A tile (half the operand traffic per FLOP of 128x128
# tiles); their prefetched g and u fill 128 KB, so the ring takes 32-deep steps and the outputs
# leave in 64-wide pieces.  A candidate for DGATED, to be measured (bench_engine.py).
DGATED_WIDE = Config(128, 256, 32, 3, store_n=64)
# A split weight gradient stores fp32 partials: 64-wide pieces keep the staging in shared memory
# beside a 3-stage ring of 128x256 tiles.  Not measured yet: no route splits.
WEIGHT_GRAD_SPLIT = Config(128, 256, 64, 3, store_n=64)
# The expert SwiGLU forward: the dense training forward's tiles (not measured on experts yet).
GROUPED_SWIGLU = Config(128, 128, 64, 4)
# The experts' down projection: the plain GEMM's tiles (not measured on experts yet).
GROUPED_GEMM = Config(128, 256, 64, 3)


def _kmajor(t: Tensor) -> bool:
    """Whether a 2-D operand is stored row by row (unit last stride); otherwise column by column."""
    return t.stride(1) == 1


def addressable(t: Optional[Tensor], dtypes=GL_DTYPES) -> bool:
    """Whether TMA can address a 2-D tensor of ``dtypes`` (the operands' 16-bit floats unless
    told otherwise): one unit stride, the other a multiple of 16 bytes, a 16-byte aligned base,
    no empty dimension."""
    if t is None:
        return True
    if t.dim() != 2 or t.dtype not in dtypes or t.numel() == 0 or t.data_ptr() % 16:
        return False
    size = t.element_size()
    if t.stride(1) == 1:
        return (t.stride(0) * size) % 16 == 0
    return t.stride(0) == 1 and (t.stride(1) * size) % 16 == 0


@functools.lru_cache(maxsize=None)
def _shared_layout(block: tuple, dtype: torch.dtype):
    return gl.NVMMASharedLayout.get_default_for(list(block), _LAYOUT_DTYPES[dtype])


def _descriptor(t: Tensor, block: tuple) -> TensorDescriptor:
    return TensorDescriptor.from_tensor(t, list(block), _shared_layout(tuple(block), t.dtype))


def _row_major(t: Tensor) -> Tensor:
    """``t`` or its transpose, whichever has unit last stride (the descriptor's view)."""
    return t if t.stride(1) == 1 else t.t()


def _grid(m: int, n: int, cfg: Config, device: torch.device, splits: int = 1) -> tuple:
    """One persistent program per SM, or one per work unit when there are fewer."""
    units = triton.cdiv(m, cfg.block_m) * triton.cdiv(n, cfg.block_n) * splits
    return (min(units, multiprocessors(device.index if device.index is not None else torch.cuda.current_device())),)


def _common(cfg: Config) -> dict:
    return dict(PINGPONG=cfg.pingpong, STAGES=cfg.stages, GROUP_M=cfg.group_m, CONSUMER_REGS=cfg.consumer_regs)


def gemm_spec(cfg: Config, a_kmajor: bool, b_kmajor: bool, has_bias: bool, split: bool = False) -> Spec:
    """``split``: the output is the fp32 stack of split partials (no bias there)."""
    rows, bk, bn = cfg.consumer_rows, cfg.block_k, cfg.block_n
    blocks = dict(a_desc=(rows, bk) if a_kmajor else (bk, rows), b_desc=(bn, bk) if b_kmajor else (bk, bn),
                  c_desc=(rows, cfg.piece_n))
    return Spec(kernels.gemm_kernel, blocks,
                dict(HAS_BIAS=has_bias, A_KMAJOR=a_kmajor, B_KMAJOR=b_kmajor, STORE_BUFS=cfg.store_bufs,
                     **_common(cfg)), ("c_desc",) if split else ())


def swiglu_spec(cfg: Config, b_kmajor: bool, has_bias: bool, save_preact: bool) -> Spec:
    rows, bk, bn = cfg.consumer_rows, cfg.block_k, cfg.block_n
    b_block = (bn, bk) if b_kmajor else (bk, bn)
    out = (rows, cfg.piece_n)
    blocks = dict(a_desc=(rows, bk), bg_desc=b_block, bu_desc=b_block, h_desc=out, g_desc=out, u_desc=out)
    return Spec(kernels.swiglu_kernel, blocks,
                dict(HAS_BIAS=has_bias, SAVE_PREACT=save_preact, B_KMAJOR=b_kmajor, STORE_BUFS=cfg.store_bufs,
                     **_common(cfg)))


def dgated_spec(cfg: Config, b_kmajor: bool) -> Spec:
    rows, bk, bn = cfg.consumer_rows, cfg.block_k, cfg.block_n
    tile, piece = (rows, bn), (rows, cfg.piece_n)
    blocks = dict(a_desc=(rows, bk), b_desc=(bn, bk) if b_kmajor else (bk, bn), g_desc=tile, u_desc=tile,
                  dg_desc=piece, du_desc=piece, h_desc=piece)
    common = _common(cfg)
    del common["PINGPONG"]
    return Spec(kernels.dgated_kernel, blocks, dict(B_KMAJOR=b_kmajor, **common))


def _launch(spec: Spec, grid: tuple, descriptor_tensors: dict, scalars: tuple) -> None:
    for name, t in descriptor_tensors.items():
        if not addressable(t, _LAYOUT_DTYPES if name in spec.fp32_descriptors else GL_DTYPES):
            raise ValueError(f"glu_fusion engine: {name.removesuffix('_desc')} {tuple(t.shape)} with strides "
                             f"{t.stride()} ({t.dtype}) cannot be read by TMA: 16-bit elements, one unit stride, "
                             "the other a multiple of 16 bytes, a 16-byte aligned start")
    descs = [_descriptor(descriptor_tensors[name], block) for name, block in spec.blocks.items()]
    spec.kernel[grid](*descs, *scalars, num_warps=_WARPS, **spec.constexprs)


def split_steps(k: int, cfg: Config, splits: int) -> int:
    """The splits that own reduction steps when ``k`` is cut into ``splits`` (the last ones may
    have none: ``cdiv(k_steps, splits)`` steps each)."""
    steps = triton.cdiv(k, cfg.block_k)
    return triton.cdiv(steps, triton.cdiv(steps, max(1, splits)))


def matmul(a: Tensor, b: Tensor, out: Tensor, bias: Optional[Tensor] = None, cfg: Config = GEMM,
           splits: int = 1) -> None:
    """``out[M, N] = a[M, K]·b[K, N] (+ bias[N])``; each operand is read in the orientation it
    has in memory (``x·Wᵀ`` is ``matmul(x, W.t())``, ``dYᵀ·X`` is ``matmul(dY.t(), X)``).

    ``splits`` > 1 cuts the reduction into that many parts, each a work unit of its own (for
    outputs whose tiles fill less than the GPU: a narrow weight gradient over many tokens); their
    fp32 partials are summed in a fixed order by a second kernel (deterministic), no bias."""
    m, k = a.shape
    n = b.shape[1]
    splits = split_steps(k, cfg, splits)
    if splits > 1 and bias is not None:
        raise ValueError("glu_fusion engine: a split reduction takes no bias")
    spec = gemm_spec(cfg, _kmajor(a), not _kmajor(b), bias is not None, split=splits > 1)
    target = out
    if splits > 1:
        stacked_rows = triton.cdiv(m, cfg.block_m) * cfg.block_m
        target = torch.empty((splits * stacked_rows, n), device=out.device, dtype=torch.float32)
    tensors = dict(a_desc=_row_major(a), b_desc=_row_major(b), c_desc=target)
    bias_args = (bias, bias.stride(0)) if bias is not None else (None, 0)
    grid = _grid(m, n, cfg, out.device, splits)
    _launch(spec, grid, tensors, (*bias_args, m, n, k, splits))
    if splits > 1:
        from .reduce import sum_splits
        sum_splits(target, out, splits, stacked_rows)


def swiglu_forward(x: Tensor, w_gate: Tensor, w_up: Tensor, b_gate: Optional[Tensor], b_up: Optional[Tensor],
                   h: Tensor, g: Optional[Tensor], u: Optional[Tensor], cfg: Optional[Config] = None) -> None:
    """``h = silu(x·Wgᵀ + bg)·(x·Wuᵀ + bu)``; ``g``, ``u`` (or None) receive the pre-activations.
    The weights are ``[N, K]`` views of any packed layout (row stride as the layout gives)."""
    m, k = x.shape
    n = w_gate.shape[0]
    save = g is not None
    cfg = cfg or (SWIGLU_TRAIN if save else SWIGLU_INFER)
    spec = swiglu_spec(cfg, True, b_gate is not None, save)
    tensors = dict(a_desc=x, bg_desc=w_gate, bu_desc=w_up, h_desc=h, g_desc=g if save else h,
                   u_desc=u if save else h)
    if b_gate is not None:
        bias_args = (b_gate, b_up, b_gate.stride(0), b_up.stride(0))
    else:
        bias_args = (None, None, 0, 0)
    _launch(spec, _grid(m, n, cfg, h.device), tensors, (*bias_args, m, n, k))


def dgated(dout: Tensor, w_down: Tensor, g: Tensor, u: Tensor, d_g: Tensor, d_u: Tensor, h: Tensor,
           cfg: Config = DGATED) -> None:
    """``dh = dOut·Wd`` (``Wd`` the ``[D, N]`` down weight) with the SwiGLU backward in the
    epilogue: writes ``d_g``, ``d_u`` (which may be ``g``, ``u`` themselves) and ``h``."""
    m, k = dout.shape
    n = w_down.shape[1]
    spec = dgated_spec(cfg, not _kmajor(w_down))
    tensors = dict(a_desc=dout, b_desc=_row_major(w_down), g_desc=g, u_desc=u, dg_desc=d_g, du_desc=d_u, h_desc=h)
    _launch(spec, _grid(m, n, cfg, dout.device), tensors, (m, n, k))


def grouped_swiglu_spec(cfg: Config, b_kmajor: bool, has_bias: bool, save_preact: bool, activation: int,
                        group_pow2: int) -> Spec:
    rows, bk, bn = cfg.consumer_rows, cfg.block_k, cfg.block_n
    b_block = (bn, bk) if b_kmajor else (bk, bn)
    out = (rows, cfg.piece_n)
    blocks = dict(a_desc=(rows, bk), bg_desc=b_block, bu_desc=b_block, h_desc=out, g_desc=out, u_desc=out)
    common = _common(cfg)
    del common["PINGPONG"]
    return Spec(kernels.grouped_swiglu_kernel, blocks,
                dict(HAS_BIAS=has_bias, SAVE_PREACT=save_preact, ACT=activation, B_KMAJOR=b_kmajor,
                     STORE_BUFS=cfg.store_bufs, GROUP_POW2=group_pow2, **common),
                pointers=(("h_ptr", "operand"), ("g_ptr", "operand"), ("u_ptr", "operand"),
                          ("ends_ptr", "int32"), ("tile_cum_ptr", "int32")),
                floats=("alpha", "limit"))


def expert_rows(w: Tensor) -> Optional[tuple[Tensor, int, bool]]:
    """An ``[E, N, K]`` expert weight (any view) as the 2-D tensor a B descriptor reads, the rows
    between two experts, and whether it is K-major; None where no such view exists (experts not
    evenly spaced in rows, or neither N nor K of unit stride).  A K-major weight's rows are its N
    rows; an N-major one's (a transposed ``[E, K, N]`` storage) its K rows."""
    e, n, k = w.shape
    if w.stride(2) == 1:
        row_stride, rows, kmajor = w.stride(1), n, True
        width = k
    elif w.stride(1) == 1:
        row_stride, rows, kmajor = w.stride(2), k, False
        width = n
    else:
        return None
    if row_stride <= 0 or w.stride(0) % row_stride or (e > 1 and w.stride(0) // row_stride < rows):
        return None
    between = w.stride(0) // row_stride if e > 1 else rows
    flat = torch.as_strided(w, ((e - 1) * between + rows, width), (row_stride, 1))
    return flat, between, kmajor


def grouped_swiglu_forward(x: Tensor, offsets: Tensor, w_gate: Tensor, w_up: Tensor, b_gate: Optional[Tensor],
                           b_up: Optional[Tensor], h: Tensor, g: Optional[Tensor], u: Optional[Tensor],
                           activation: int = 0, alpha: float = 0.0, limit: float = 0.0,
                           cfg: Optional[Config] = None) -> None:
    """The expert SwiGLU forward on rows of ``x`` sorted by expert (``offsets``: cumulative rows
    per expert; rows from ``offsets[-1]`` on give zeros): ``h`` and, when given, ``g`` and ``u``.
    ``activation`` 0 is ``silu(g)·u``, 1 gpt-oss's clamped gate.  The caller checks
    ``grouped_serves``."""
    from ..portable.grouped_gemm import work_list
    cfg = cfg or GROUPED_SWIGLU
    t, k = x.shape
    e, n, _ = w_gate.shape
    (wg2, between, kmajor), (wu2, _, _) = expert_rows(w_gate), expert_rows(w_up)
    save = g is not None
    ends, tile_cum, max_tiles = work_list(offsets, t, cfg.block_m)
    spec = grouped_swiglu_spec(cfg, kmajor, b_gate is not None, save, activation, triton.next_power_of_2(e + 1))
    tensors = dict(a_desc=x, bg_desc=wg2, bu_desc=wu2, h_desc=h, g_desc=g if save else h, u_desc=u if save else h)
    if b_gate is not None:
        bias_args = (b_gate, b_up, b_gate.stride(1), b_up.stride(1), b_gate.stride(0))
    else:
        bias_args = (None, None, 0, 0, 0)
    pre = (g, u, g.stride(0)) if save else (h, h, 0)
    units = max_tiles * triton.cdiv(n, cfg.block_n)
    grid = (min(units, multiprocessors(h.device.index if h.device.index is not None else torch.cuda.current_device())),)
    _launch(spec, grid, tensors, (h, pre[0], pre[1], h.stride(0), pre[2], *bias_args, ends, tile_cum, e + 1, between,
                                  float(alpha), float(limit), t, n, k))


def grouped_serves(x: Tensor, w_gate: Tensor, w_up: Tensor, h: Tensor, g: Optional[Tensor] = None,
                   u: Optional[Tensor] = None, cfg: Optional[Config] = None) -> bool:
    """Whether ``grouped_swiglu_forward`` can run these operands: TMA-addressable rows, gate and
    up weights laid out alike, and (N-major weights) whole reduction steps per expert."""
    cfg = cfg or GROUPED_SWIGLU
    if x.shape[0] == 0 or x.shape[1] == 0 or w_gate.shape[0] == 0:
        return False
    views = expert_rows(w_gate), expert_rows(w_up)
    if views[0] is None or views[1] is None or views[0][1:] != views[1][1:] or w_gate.dtype != w_up.dtype:
        return False
    if not views[0][2] and x.shape[1] % cfg.block_k:
        return False
    return all(addressable(t) for t in (x, views[0][0], views[1][0], h, g, u))


def grouped_gemm_spec(cfg: Config, b_kmajor: bool, has_bias: bool, scatter: bool, has_scale: bool,
                      group_pow2: int) -> Spec:
    rows, bk, bn = cfg.consumer_rows, cfg.block_k, cfg.block_n
    blocks = dict(a_desc=(rows, bk), b_desc=(bn, bk) if b_kmajor else (bk, bn), c_desc=(rows, cfg.piece_n))
    common = _common(cfg)
    del common["PINGPONG"]
    return Spec(kernels.grouped_gemm_kernel, blocks,
                dict(HAS_BIAS=has_bias, SCATTER=scatter, HAS_SCALE=has_scale, B_KMAJOR=b_kmajor,
                     STORE_BUFS=cfg.store_bufs, GROUP_POW2=group_pow2, **common),
                pointers=(("c_ptr", "operand"), ("dest_ptr", "int32" if scatter else None),
                          ("scale_ptr", "fp32" if has_scale else None), ("ends_ptr", "int32"),
                          ("tile_cum_ptr", "int32")))


def grouped_matmul(a: Tensor, offsets: Tensor, w: Tensor, out: Tensor, bias: Optional[Tensor] = None,
                   dest: Optional[Tensor] = None, scale: Optional[Tensor] = None,
                   cfg: Optional[Config] = None) -> None:
    """Rows of ``a`` sorted by expert (``offsets``: cumulative rows per expert) times their
    expert's ``w[e]ᵀ`` (``w`` an ``[E, N, K]`` view, as ``expert_rows`` reads it) plus its bias
    ``[E, N]``.  Without ``dest``: ``out[r]`` for every row (rows from ``offsets[-1]`` on get
    zeros).  With ``dest`` (int32, one slot per row of ``a``): ``out[dest[r]]``, times
    ``scale[r]`` (fp32, each row's routing weight) when given; the padded tail's slots get zeros,
    slots no row names keep what they held.  The caller checks ``grouped_matmul_serves``."""
    from ..portable.grouped_gemm import work_list
    cfg = cfg or GROUPED_GEMM
    t, k = a.shape
    e, n, _ = w.shape
    w2, between, kmajor = expert_rows(w)
    scatter = dest is not None
    if scale is not None and not scatter:
        raise ValueError("glu_fusion engine: a routing-weight scale needs the rows' slots (dest)")
    ends, tile_cum, max_tiles = work_list(offsets, t, cfg.block_m)
    spec = grouped_gemm_spec(cfg, kmajor, bias is not None, scatter, scale is not None,
                             triton.next_power_of_2(e + 1))
    bias_args = (bias, bias.stride(1), bias.stride(0)) if bias is not None else (None, 0, 0)
    units = max_tiles * triton.cdiv(n, cfg.block_n)
    grid = (min(units, multiprocessors(out.device.index if out.device.index is not None
                                       else torch.cuda.current_device())),)
    _launch(spec, grid, dict(a_desc=a, b_desc=w2, c_desc=out),
            (out, out.stride(0), *bias_args, dest, scale, ends, tile_cum, e + 1, between, t, n, k))


def grouped_matmul_serves(a: Tensor, w: Tensor, out: Tensor, dest: Optional[Tensor] = None,
                          scale: Optional[Tensor] = None, cfg: Optional[Config] = None) -> bool:
    """Whether ``grouped_matmul`` can run these operands: TMA-addressable rows, an expert weight
    ``expert_rows`` reads (N-major: whole reduction steps per expert), contiguous int32 slots and
    fp32 routing weights."""
    cfg = cfg or GROUPED_GEMM
    if a.shape[0] == 0 or a.shape[1] == 0 or w.shape[0] == 0 or w.dtype != a.dtype:
        return False
    view = expert_rows(w)
    if view is None or (not view[2] and a.shape[1] % cfg.block_k):
        return False
    if dest is not None and (dest.dtype != torch.int32 or not dest.is_contiguous() or dest.shape != a.shape[:1]):
        return False
    if scale is not None and (scale.dtype != torch.float32 or not scale.is_contiguous()
                              or scale.shape != a.shape[:1]):
        return False
    return all(addressable(t) for t in (a, view[0], out))


def route_specs() -> list[tuple[str, Spec, torch.dtype]]:
    """Every launch the ops can make, by name: what CI compiles for sm_90."""
    specs = []
    for dtype in GL_DTYPES:
        tag = str(dtype).removeprefix("torch.")
        for has_bias in (False, True):
            specs.append((f"gemm x·Wᵀ bias={has_bias} {tag}", gemm_spec(GEMM, True, True, has_bias), dtype))
        specs.append((f"gemm dY·W {tag}", gemm_spec(GEMM, True, False, False), dtype))
        specs.append((f"gemm dYᵀ·X {tag}", gemm_spec(GEMM, False, False, False), dtype))
        specs.append((f"gemm dYᵀ·X split {tag}", gemm_spec(WEIGHT_GRAD_SPLIT, False, False, False, split=True), dtype))
        for save in (False, True):
            for has_bias in (False, True):
                cfg = SWIGLU_TRAIN if save else SWIGLU_INFER
                specs.append((f"swiglu save={save} bias={has_bias} {tag}", swiglu_spec(cfg, True, has_bias, save),
                              dtype))
        for b_kmajor in (False, True):
            for cfg in (DGATED, DGATED_WIDE):
                specs.append((f"dgated {cfg.name} wd_kmajor={b_kmajor} {tag}", dgated_spec(cfg, b_kmajor), dtype))
        for b_kmajor, has_bias, save, act in ((True, False, False, 0), (True, False, True, 0), (True, True, True, 1),
                                              (False, False, True, 0)):
            specs.append((f"grouped swiglu w_kmajor={b_kmajor} bias={has_bias} save={save} act={act} {tag}",
                          grouped_swiglu_spec(GROUPED_SWIGLU, b_kmajor, has_bias, save, act, 256), dtype))
        for b_kmajor, has_bias, scatter, has_scale in ((True, False, False, False), (True, True, True, True),
                                                       (False, False, True, True), (False, True, False, False)):
            specs.append((f"grouped gemm w_kmajor={b_kmajor} bias={has_bias} scatter={scatter} scale={has_scale} "
                          f"{tag}", grouped_gemm_spec(GROUPED_GEMM, b_kmajor, has_bias, scatter, has_scale, 256),
                          dtype))
    return specs
