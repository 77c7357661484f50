"""What a consumer does with a finished tile: the engine's epilogues.

Each epilogue is a pair ``(BEGIN, END)`` that ``mainloop`` calls around a tile's main loop with
the epilogue's own arguments ``epi`` (a tuple), the tile's first row and column, the consumer's
tile count ``j`` and its index ``WG``.  Flags in ``epi`` are read by index into a constexpr:
unpacking a tuple turns its constexprs into tensors.

* ``plain``: ``C = acc (+ bias along N)``;
* ``grouped``: the same per expert (each expert's bias), optionally scattered to each row's
  token slot and scaled by its routing weight (the experts' down projection and combine);
* ``swiglu``: two accumulators ``g, u`` (+ biases); writes ``h = silu(g)·u`` (or gpt-oss's
  clamped gate) and, for a backward, ``g`` and ``u`` (each rounded to the output dtype first, as
  eager rounds the two linear outputs); on grouped problems with each expert's bias, and the
  last row tile of a group by pointer stores of its rows;
* ``dgated``: the down projection's input grad ``dh`` and the saved ``g, u`` (prefetched by TMA
  while the main loop runs); writes ``dG = dh·u·silu'(g)``, ``dU = dh·silu(g)`` and
  ``h = silu(g)·u`` for the down projection's weight grad, in column pieces on wide tiles.

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
    """``acc`` plus the bias along its columns (columns from ``N`` on get none: ``N`` = 0 adds
    nothing)."""
    LAYOUT: gl.constexpr = gl.SliceLayout(0, acc.type.layout)
    cols = col + gl.arange(0, acc.shape[1], layout=LAYOUT)
    bias = gl.load(bias_ptr + cols * stride, mask=cols < N, other=0.0).to(gl.float32)
    return acc + gl.expand_dims(bias, 0)


@gluon.jit
def _store_rows(ptr, stride, value, row, col, row_end, N):
    """Pointer stores of a register tile: rows below ``row_end`` and columns below ``N`` only
    (a group's last row tile, whose other rows belong to the next group)."""
    LAYOUT: gl.constexpr = value.type.layout
    rows = row + gl.arange(0, value.shape[0], layout=gl.SliceLayout(1, LAYOUT))
    cols = col + gl.arange(0, value.shape[1], layout=gl.SliceLayout(0, LAYOUT))
    offsets = gl.expand_dims(rows.to(gl.int64) * stride, 1) + gl.expand_dims(cols, 0)
    mask = gl.expand_dims(rows < row_end, 1) & gl.expand_dims(cols < N, 0)
    gl.store(ptr + offsets, value, mask=mask)


@gluon.jit
def _put(desc, bufs, WG: gl.constexpr, ptr, stride, value, row, col, row_end, N, GROUPED: gl.constexpr):
    """Store a tile: through TMA, or, for a grouped tile running past its group's rows, by
    pointer stores of the group's rows."""
    if GROUPED:
        if row + value.shape[0] <= row_end:
            store_tile(desc, bufs, WG, value, row, col)
        else:
            _store_rows(ptr, stride, value, row, col, row_end, N)
    else:
        store_tile(desc, bufs, WG, value, row, col)


@gluon.jit
def _silu_parts(g):
    """(silu(g), sigmoid(g)) in fp32."""
    sig = 1.0 / (1.0 + gl.exp2(-g * LOG2E))
    return g * sig, sig


@gluon.jit
def no_begin(epi, row, col, j, WG: gl.constexpr):
    pass


@gluon.jit
def plain_end(epi, acc, _unused, row, col, j, WG: gl.constexpr, M, N, group):
    c_desc, c_bufs, bias_ptr, bias_stride = epi[0], epi[1], epi[2], epi[3]
    HAS_BIAS: gl.constexpr = epi[4]
    if HAS_BIAS:
        acc = _add_bias(acc, bias_ptr, bias_stride, col, N)
    store_tile(c_desc, c_bufs, WG, acc.to(c_desc.dtype), row, col)


@gluon.jit
def _scatter_rows(ptr, stride, dest_ptr, scale_ptr, acc, row, col, row_end, routed, N, dtype: gl.constexpr,
                  HAS_SCALE: gl.constexpr):
    """Pointer stores of rows below ``row_end`` to the output rows ``dest[row]`` (a routed row's
    token slot), each scaled by its ``scale[row]`` (its routing weight, fp32) after rounding to
    the output dtype, as the unfused GEMM's output is rounded before the multiply.  The padded
    tail (``routed`` 0) stores zeros, so that every slot of a permutation is written once."""
    LAYOUT: gl.constexpr = acc.type.layout
    rows = row + gl.arange(0, acc.shape[0], layout=gl.SliceLayout(1, LAYOUT))
    cols = col + gl.arange(0, acc.shape[1], layout=gl.SliceLayout(0, LAYOUT))
    live = rows < row_end
    slot = gl.load(dest_ptr + rows, mask=live, other=0)
    value = acc.to(dtype)
    if HAS_SCALE:
        scale = gl.load(scale_ptr + rows, mask=live, other=0.0) * routed.to(gl.float32)
        value = (value.to(gl.float32) * gl.expand_dims(scale, 1)).to(dtype)
    offsets = gl.expand_dims(slot.to(gl.int64) * stride, 1) + gl.expand_dims(cols, 0)
    gl.store(ptr + offsets, value, mask=gl.expand_dims(live, 1) & gl.expand_dims(cols < N, 0))


@gluon.jit
def grouped_end(epi, acc, _unused, row, col, j, WG: gl.constexpr, row_end, N, group):
    """A grouped plain GEMM's tile (the experts' down projection).  ``epi``: (output descriptor,
    staging, output pointer and row stride, bias pointer, its column stride and its stride
    between experts, the number of experts, HAS_BIAS, SCATTER, HAS_SCALE, dest and scale
    pointers).  Stored in place, or with ``SCATTER`` each row to its token slot
    (``_scatter_rows``); the padded tail's rows (no reduction steps, no bias) are zeros."""
    c_desc, bufs, c_ptr, c_stride = epi[0], epi[1], epi[2], epi[3]
    HAS_BIAS: gl.constexpr = epi[8]
    SCATTER: gl.constexpr = epi[9]
    HAS_SCALE: gl.constexpr = epi[10]
    routed = (group < epi[7]).to(gl.int32)  # 0 for the padded tail
    if HAS_BIAS:
        acc = _add_bias(acc, epi[4] + group * epi[6], epi[5], col, N * routed)
    if SCATTER:
        _scatter_rows(c_ptr, c_stride, epi[11], epi[12], acc, row, col, row_end, routed, N, c_desc.dtype,
                      HAS_SCALE)
    else:
        _put(c_desc, bufs, WG, c_ptr, c_stride, acc.to(c_desc.dtype), row, col, row_end, N, True)


@gluon.jit
def _gate(g, u, alpha, limit, ACT: gl.constexpr):
    """The gated activation in fp32: ACT 0 ``silu(g)·u``; ACT 1 gpt-oss's clamped gate
    ``(clamp(u, ±limit) + 1)·gc·sigmoid(alpha·gc)`` with ``gc = min(g, limit)``."""
    if ACT == 0:
        silu, _sig = _silu_parts(g)
        return silu * u
    else:
        gc = gl.minimum(g, limit)
        uc = gl.minimum(gl.maximum(u, -limit), limit)
        return (uc + 1.0) * gc / (1.0 + gl.exp2(-alpha * gc * LOG2E))


@gluon.jit
def swiglu_end(epi, acc_g, acc_u, row, col, j, WG: gl.constexpr, M, N, group):
    """``epi``: (h, g, u descriptors, staging, gate and up bias pointers and strides, HAS_BIAS,
    SAVE_PREACT, ACT, alpha, limit, GROUPED, (h, g, u pointers), (h and pre-activation row
    strides), the bias's stride between experts, the number of experts).  A grouped tile adds its
    expert's bias, and the padded tail (group = experts) none."""
    h_desc, g_desc, u_desc, bufs = epi[0], epi[1], epi[2], epi[3]
    bg_ptr, bu_ptr, bg_stride, bu_stride = epi[4], epi[5], epi[6], epi[7]
    HAS_BIAS: gl.constexpr = epi[8]
    SAVE_PREACT: gl.constexpr = epi[9]
    ACT: gl.constexpr = epi[10]
    GROUPED: gl.constexpr = epi[13]
    if HAS_BIAS:
        if GROUPED:
            bias_n = N * (group < epi[17]).to(gl.int32)
            acc_g = _add_bias(acc_g, bg_ptr + group * epi[16], bg_stride, col, bias_n)
            acc_u = _add_bias(acc_u, bu_ptr + group * epi[16], bu_stride, col, bias_n)
        else:
            acc_g = _add_bias(acc_g, bg_ptr, bg_stride, col, N)
            acc_u = _add_bias(acc_u, bu_ptr, bu_stride, col, N)
    dtype: gl.constexpr = h_desc.dtype
    g = acc_g.to(dtype)
    u = acc_u.to(dtype)
    ptrs, strides = epi[14], epi[15]
    if SAVE_PREACT:
        _put(g_desc, bufs, WG, ptrs[1], strides[1], g, row, col, M, N, GROUPED)
        _put(u_desc, bufs, WG, ptrs[2], strides[1], u, row, col, M, N, GROUPED)
    h = _gate(g.to(gl.float32), u.to(gl.float32), epi[11], epi[12], ACT)
    _put(h_desc, bufs, WG, ptrs[0], strides[0], h.to(dtype), row, col, M, N, GROUPED)


@gluon.jit
def dgated_begin(epi, row, col, j, WG: gl.constexpr):
    """Prefetch this tile's g and u while the main loop runs (once the previous tile's stores
    have read the buffers)."""
    g_desc, u_desc, gu_bufs, bars = epi[0], epi[1], epi[5], epi[7]
    bar = bars.index(WG)
    tma.store_wait(0)
    mbarrier.expect(bar, 2 * g_desc.block_type.nbytes)
    tma.async_copy_global_to_shared(g_desc, [row, col], bar, gu_bufs.index(WG * 2))
    tma.async_copy_global_to_shared(u_desc, [row, col], bar, gu_bufs.index(WG * 2 + 1))


@gluon.jit
def _dgated_piece(acc, g_buf, u_buf, spare, dg_desc, du_desc, h_desc, row, col):
    """One column piece: ``acc`` the fp32 ``dh`` piece, ``g_buf``/``u_buf`` its g and u in shared
    memory (overwritten by dG and h), ``spare`` receives dU; then the three TMA stores."""
    LAYOUT: gl.constexpr = acc.type.layout
    dtype: gl.constexpr = dg_desc.dtype
    dh = acc.to(dtype).to(gl.float32)  # rounded as the unfused GEMM's output is
    g = g_buf.load(LAYOUT).to(gl.float32)
    silu, sig = _silu_parts(g)
    # written in this order, at most three fp32 pieces are live: dU to the spare buffer, then
    # dG over g, then h over u (each thread writes the elements it read)
    spare.store((dh * silu).to(dtype))
    dh_dsilu = dh * (sig * (1.0 + g * (1.0 - sig)))
    u = u_buf.load(LAYOUT).to(gl.float32)
    g_buf.store((dh_dsilu * u).to(dtype))
    u_buf.store((silu * u).to(dtype))
    fence_async_shared()
    tma.async_copy_shared_to_global(dg_desc, [row, col], g_buf)
    tma.async_copy_shared_to_global(du_desc, [row, col], spare)
    tma.async_copy_shared_to_global(h_desc, [row, col], u_buf)


@gluon.jit
def dgated_end(epi, acc, _unused, row, col, j, WG: gl.constexpr, M, N, group):
    """The whole tile at once, or (an output block narrower than the tile) in column pieces of
    the output block's width, each written over its slice of the prefetched g and u; the one
    spare buffer per consumer holds a piece's dU until its store has read it."""
    dg_desc, du_desc, h_desc, gu_bufs, spares, bars = epi[2], epi[3], epi[4], epi[5], epi[6], epi[7]
    PIECE: gl.constexpr = dg_desc.block_type.shape[1]
    PIECES: gl.constexpr = acc.shape[1] // PIECE
    g_buf = gu_bufs.index(WG * 2)
    u_buf = gu_bufs.index(WG * 2 + 1)
    spare = spares.index(WG)
    mbarrier.wait(bars.index(WG), j & 1)
    if PIECES == 1:
        _dgated_piece(acc, g_buf, u_buf, spare, dg_desc, du_desc, h_desc, row, col)
    elif PIECES == 2:
        a0, a1 = _halves(acc)
        _dgated_piece(a0, g_buf.slice(0, PIECE, 1), u_buf.slice(0, PIECE, 1), spare, dg_desc, du_desc, h_desc,
                      row, col)
        tma.store_wait(1)  # the spare's store has read it (h's may still be reading)
        _dgated_piece(a1, g_buf.slice(PIECE, PIECE, 1), u_buf.slice(PIECE, PIECE, 1), spare, dg_desc, du_desc,
                      h_desc, row, col + PIECE)
    else:
        gl.static_assert(PIECES == 4, "an output piece is the tile's width, or a half or quarter of it")
        a0, a1 = _halves(acc)
        a00, a01 = _halves(a0)
        _dgated_piece(a00, g_buf.slice(0, PIECE, 1), u_buf.slice(0, PIECE, 1), spare, dg_desc, du_desc, h_desc,
                      row, col)
        tma.store_wait(1)
        _dgated_piece(a01, g_buf.slice(PIECE, PIECE, 1), u_buf.slice(PIECE, PIECE, 1), spare, dg_desc, du_desc,
                      h_desc, row, col + PIECE)
        a10, a11 = _halves(a1)
        tma.store_wait(1)
        _dgated_piece(a10, g_buf.slice(2 * PIECE, PIECE, 1), u_buf.slice(2 * PIECE, PIECE, 1), spare, dg_desc,
                      du_desc, h_desc, row, col + 2 * PIECE)
        tma.store_wait(1)
        _dgated_piece(a11, g_buf.slice(3 * PIECE, PIECE, 1), u_buf.slice(3 * PIECE, PIECE, 1), spare, dg_desc,
                      du_desc, h_desc, row, col + 3 * PIECE)
