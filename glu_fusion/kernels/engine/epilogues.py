"""What a consumer does with a finished tile: the engine's epilogues.

Each epilogue is a pair ``(BEGIN, END)`` that ``mainloop`` calls around a tile's main loop with
the epilogue's own arguments ``epi`` (a tuple), the tile's first row and column, the consumer's
tile count ``j`` and its index ``WG``.  Flags in ``epi`` are read by index into a constexpr:
unpacking a tuple turns its constexprs into tensors.

* ``plain``: ``C = acc (+ bias along N)``;
* ``swiglu``: two accumulators ``g, u`` (+ biases); writes ``h = silu(g)·u`` and, for a
  backward, ``g`` and ``u`` (each rounded to the output dtype first, as eager rounds the two
  linear outputs);
* ``dgated``: the down projection's input grad ``dh`` and the saved ``g, u`` (prefetched by TMA
  while the main loop runs); writes ``dG = dh·u·silu'(g)``, ``dU = dh·silu(g)`` and
  ``h = silu(g)·u`` for the down projection's weight grad.

Tiles leave through shared memory and TMA stores, in column pieces of the output descriptor's
block width: a narrower block needs less shared memory (room for a deeper ring), and the
stores of one piece overlap the conversion of the next.
"""
from triton.experimental import gluon
from triton.experimental.gluon import language as gl
from triton.experimental.gluon.language.nvidia.hopper import fence_async_shared, mbarrier, tma

from .mainloop import CONSUMERS

LOG2E = gl.constexpr(1.4426950408889634)


@gluon.jit
def _halves(x):
    """The left and right column halves of a register tile."""
    ROWS: gl.constexpr = x.shape[0]
    COLS: gl.constexpr = x.shape[1]
    pairs = gl.permute(gl.reshape(x, [ROWS, 2, COLS // 2]), (0, 2, 1))
    return gl.split(pairs)


@gluon.jit
def _store_piece(desc, bufs, WG: gl.constexpr, PIECE: gl.constexpr, value, row, col):
    """One piece through this consumer's staging buffers (one, or two used in turn)."""
    BUFS: gl.constexpr = bufs.shape[0] // CONSUMERS
    buf = bufs.index(WG * BUFS + PIECE % BUFS)
    tma.store_wait(BUFS - 1)  # the store that last read this buffer has finished
    buf.store(value)
    fence_async_shared()
    tma.async_copy_shared_to_global(desc, [row, col], buf)


@gluon.jit
def store_tile(desc, bufs, WG: gl.constexpr, value, row, col):
    """Store a ``[rows, BN]`` register tile at ``(row, col)`` in pieces of ``desc``'s block
    width (BN, BN/2 or BN/4); TMA clips what falls outside the tensor."""
    PIECE_N: gl.constexpr = desc.block_type.shape[1]
    PIECES: gl.constexpr = value.shape[1] // PIECE_N
    if PIECES == 1:
        _store_piece(desc, bufs, WG, 0, value, row, col)
    elif PIECES == 2:
        v0, v1 = _halves(value)
        _store_piece(desc, bufs, WG, 0, v0, row, col)
        _store_piece(desc, bufs, WG, 1, v1, row, col + PIECE_N)
    else:
        gl.static_assert(PIECES == 4, "an output piece is the tile's width, or a half or quarter of it")
        v0, v1 = _halves(value)
        v00, v01 = _halves(v0)
        _store_piece(desc, bufs, WG, 0, v00, row, col)
        _store_piece(desc, bufs, WG, 1, v01, row, col + PIECE_N)
        v10, v11 = _halves(v1)
        _store_piece(desc, bufs, WG, 2, v10, row, col + 2 * PIECE_N)
        _store_piece(desc, bufs, WG, 3, v11, row, col + 3 * PIECE_N)


@gluon.jit
def _add_bias(acc, bias_ptr, stride, col, N):
    LAYOUT: gl.constexpr = gl.SliceLayout(0, acc.type.layout)
    cols = col + gl.arange(0, acc.shape[1], layout=LAYOUT)
    bias = gl.load(bias_ptr + cols * stride, mask=cols < N, other=0.0).to(gl.float32)
    return acc + gl.expand_dims(bias, 0)


@gluon.jit
def _silu_parts(g):
    """(silu(g), sigmoid(g)) in fp32."""
    sig = 1.0 / (1.0 + gl.exp2(-g * LOG2E))
    return g * sig, sig


@gluon.jit
def no_begin(epi, row, col, j, WG: gl.constexpr):
    pass


@gluon.jit
def plain_end(epi, acc, _unused, row, col, j, WG: gl.constexpr, M, N):
    c_desc, c_bufs, bias_ptr, bias_stride = epi[0], epi[1], epi[2], epi[3]
    HAS_BIAS: gl.constexpr = epi[4]
    if HAS_BIAS:
        acc = _add_bias(acc, bias_ptr, bias_stride, col, N)
    store_tile(c_desc, c_bufs, WG, acc.to(c_desc.dtype), row, col)


@gluon.jit
def swiglu_end(epi, acc_g, acc_u, row, col, j, WG: gl.constexpr, M, N):
    h_desc, g_desc, u_desc, bufs = epi[0], epi[1], epi[2], epi[3]
    bg_ptr, bu_ptr, bg_stride, bu_stride = epi[4], epi[5], epi[6], epi[7]
    HAS_BIAS: gl.constexpr = epi[8]
    SAVE_PREACT: gl.constexpr = epi[9]
    if HAS_BIAS:
        acc_g = _add_bias(acc_g, bg_ptr, bg_stride, col, N)
        acc_u = _add_bias(acc_u, bu_ptr, bu_stride, col, N)
    dtype: gl.constexpr = h_desc.dtype
    g = acc_g.to(dtype)
    u = acc_u.to(dtype)
    if SAVE_PREACT:
        store_tile(g_desc, bufs, WG, g, row, col)
        store_tile(u_desc, bufs, WG, u, row, col)
    silu, _sig = _silu_parts(g.to(gl.float32))
    store_tile(h_desc, bufs, WG, (silu * u.to(gl.float32)).to(dtype), row, col)


@gluon.jit
def dgated_begin(epi, row, col, j, WG: gl.constexpr):
    """Prefetch this tile's g and u while the main loop runs (once the previous tile's stores
    have read the buffers)."""
    g_desc, u_desc, bufs, bars = epi[0], epi[1], epi[5], epi[6]
    bar = bars.index(WG)
    tma.store_wait(0)
    mbarrier.expect(bar, 2 * g_desc.block_type.nbytes)
    tma.async_copy_global_to_shared(g_desc, [row, col], bar, bufs.index(WG * 3))
    tma.async_copy_global_to_shared(u_desc, [row, col], bar, bufs.index(WG * 3 + 1))


@gluon.jit
def dgated_end(epi, acc, _unused, row, col, j, WG: gl.constexpr, M, N):
    dg_desc, du_desc, h_desc, bufs, bars = epi[2], epi[3], epi[4], epi[5], epi[6]
    ACC: gl.constexpr = acc.type.layout
    dtype: gl.constexpr = dg_desc.dtype
    g_buf = bufs.index(WG * 3)
    u_buf = bufs.index(WG * 3 + 1)
    spare = bufs.index(WG * 3 + 2)
    mbarrier.wait(bars.index(WG), j & 1)
    dh = acc.to(dtype).to(gl.float32)  # rounded as the unfused GEMM's output is
    g = g_buf.load(ACC).to(gl.float32)
    silu, sig = _silu_parts(g)
    # written in this order, at most three fp32 tiles are live: dU to the spare buffer, then dG
    # over g, then h over u
    spare.store((dh * silu).to(dtype))
    dh_dsilu = dh * (sig * (1.0 + g * (1.0 - sig)))
    u = u_buf.load(ACC).to(gl.float32)
    g_buf.store((dh_dsilu * u).to(dtype))
    u_buf.store((silu * u).to(dtype))
    fence_async_shared()
    tma.async_copy_shared_to_global(dg_desc, [row, col], g_buf)
    tma.async_copy_shared_to_global(du_desc, [row, col], spare)
    tma.async_copy_shared_to_global(h_desc, [row, col], u_buf)
