"""The engine's main loop: a persistent, warp-specialised Hopper GEMM over output tiles.

``C[M, N] = A·B`` with A a ``[M, K]`` operand and B one or two ``[K, N]`` operands (two for the
SwiGLU forward: gate and up tiles share each A tile).  Each operand arrives through a TMA
descriptor in the orientation it has in memory:

* A K-major (``x``, ``dY``: rows of length K) or M-major (``dYᵀ`` of a weight gradient, where
  the tokens are the reduction);
* B K-major (``W`` of ``x·Wᵀ``, an ``[N, K]`` weight) or N-major (``W`` of ``dY·W``).

Three partitions (``run``): a one-warp loader issues the TMA loads into an mbarrier ring, and
two consumer warpgroups run wgmma and then the epilogue, in one of two schedules:

* cooperative: both consumers work on one ``BM × BN`` tile, each on half its rows, and share
  the B tiles of one ring;
* ping-pong: the consumers take alternate tiles, each a whole ``BM × BN`` tile from a ring of
  its own, so one consumer's epilogue runs under the other's main loop (a consumer that read a
  ring shared with the other out of step could pass a wait on the wrong phase).

A weight gradient ``dYᵀ·X`` whose output tiles fill less than the GPU splits its reduction (the
tokens): work unit ``u`` is output tile ``u % tiles`` over the reduction steps of split
``u // tiles``, and the epilogue receives the row of that split's slice of a stacked ``[splits ·
rows, N]`` output (``splits`` is 1 otherwise; the cooperative schedule only).

A grouped problem (mixture-of-experts rows sorted by expert, ``GROUPED``; cooperative schedule)
runs over the row tiles of each group from a device-built work list (``work``: each group's
row end and the running count of its row tiles, the groups, and the rows of B between two
experts' weights): unit ``u`` is row tile ``u % tiles`` (found in the list) and column tile
``u // tiles``; A rows past a group's end are read but never stored, B is read at its expert's
rows, and the epilogue stores only the group's rows.  The last group is the padded tail: no
reduction steps, so its outputs are zeros.

The epilogue is a pair of functions (``EPI_BEGIN`` before a tile's main loop, ``EPI_END`` with
its accumulators) with the epilogue's own arguments in one tuple, so every op shares this loop.
Layouts and integers travel through ``warp_specialize`` as ``gl.constexpr``.
"""
from triton.experimental import gluon
from triton.experimental.gluon import language as gl
from triton.experimental.gluon.language.nvidia.hopper import mbarrier, tma, warpgroup_mma, warpgroup_mma_wait

CONSUMERS = gl.constexpr(2)


@gluon.jit
def tile_coords(tile, num_pid_m, num_pid_n, GROUP_M: gl.constexpr):
    """Grouped tile order: ``GROUP_M`` row-tiles sweep the columns together, so the B tiles
    they share stay in L2."""
    group = GROUP_M * num_pid_n
    first_m = (tile // group) * GROUP_M
    group_rows = min(num_pid_m - first_m, GROUP_M)
    pid_m = first_m + (tile % group) % group_rows
    pid_n = (tile % group) // group_rows
    return pid_m, pid_n


@gluon.jit
def unit_coords(unit, num_pid_m, num_pid_n, k_tiles, splits, GROUP_M: gl.constexpr):
    """Work unit -> (tile row, tile column, split, first and end reduction step): the splits of
    one tile are ``tiles`` units apart, so the units running together share their k range."""
    tiles = num_pid_m * num_pid_n
    split = unit // tiles
    pid_m, pid_n = tile_coords(unit % tiles, num_pid_m, num_pid_n, GROUP_M)
    per_split = gl.cdiv(k_tiles, splits)
    k0 = split * per_split
    return pid_m, pid_n, split, k0, min(k0 + per_split, k_tiles)


@gluon.jit
def group_tile(mt, work, WARPS: gl.constexpr, GROUP_POW2: gl.constexpr, BM: gl.constexpr):
    """(group, first row, row end) of global row tile ``mt`` of a grouped problem."""
    ends_ptr, tile_cum_ptr, groups = work[0], work[1], work[2]
    LAYOUT: gl.constexpr = gl.BlockedLayout([1], [32], [WARPS], [0])
    idx = gl.arange(0, GROUP_POW2, layout=LAYOUT)
    cum = gl.load(tile_cum_ptr + idx, mask=idx < groups, other=2147483647)
    group = gl.sum((cum <= mt).to(gl.int32), axis=0)
    prev = gl.maximum(group - 1, 0)
    after_first = (group > 0).to(gl.int32)
    tile_start = gl.load(tile_cum_ptr + prev) * after_first
    row_start = gl.load(ends_ptr + prev) * after_first
    return group, row_start + (mt - tile_start) * BM, gl.load(ends_ptr + group)


@gluon.jit
def units_of(M, N, splits, work, BM: gl.constexpr, BN: gl.constexpr, GROUPED: gl.constexpr):
    """(work units, row tiles, column tiles) of the problem."""
    num_pid_n = gl.cdiv(N, BN)
    if GROUPED:
        num_pid_m = gl.load(work[1] + work[2] - 1)
    else:
        num_pid_m = gl.cdiv(M, BM)
    return num_pid_m * num_pid_n * splits, num_pid_m, num_pid_n


@gluon.jit
def unit_tile(unit, M, num_pid_m, num_pid_n, k_tiles, splits, work, WARPS: gl.constexpr, BM: gl.constexpr,
              BN: gl.constexpr, GROUP_M: gl.constexpr, GROUPED: gl.constexpr, GROUP_POW2: gl.constexpr):
    """Work unit -> (first A row, B's first row of this expert, output row, row end, column,
    group, first and end reduction step); dense problems have one group and a B offset of 0."""
    if GROUPED:
        mt = unit % num_pid_m
        group, row, row_end = group_tile(mt, work, WARPS, GROUP_POW2, BM)
        k1 = k_tiles * (group < work[2] - 1).to(gl.int32)  # the padded tail: no steps
        return row, group * work[3], row, row_end, (unit // num_pid_m) * BN, group, 0, k1
    else:
        pid_m, pid_n, split, k0, k1 = unit_coords(unit, num_pid_m, num_pid_n, k_tiles, splits, GROUP_M)
        return pid_m * BM, 0, split * (num_pid_m * BM) + pid_m * BM, M, pid_n * BN, 0, k0, k1


@gluon.jit
def _loader(a_desc, b0_desc, b1_desc, a_bufs, b_bufs, ready, empty, M, N, K, splits, work,
            NB: gl.constexpr, A_KMAJOR: gl.constexpr, B_KMAJOR: gl.constexpr, PINGPONG: gl.constexpr,
            BM: gl.constexpr, BN: gl.constexpr, BK: gl.constexpr, GROUP_M: gl.constexpr,
            GROUPED: gl.constexpr, GROUP_POW2: gl.constexpr):
    RINGS: gl.constexpr = 2 if PINGPONG else 1
    STAGES: gl.constexpr = ready.shape[0] // RINGS
    A_PARTS: gl.constexpr = 1 if PINGPONG else CONSUMERS
    SUB_M: gl.constexpr = BM // A_PARTS
    nbytes: gl.constexpr = A_PARTS * a_desc.block_type.nbytes + NB * b0_desc.block_type.nbytes
    start = gl.program_id(0)
    nprog = gl.num_programs(0)
    units, num_pid_m, num_pid_n = units_of(M, N, splits, work, BM, BN, GROUPED)
    k_tiles = gl.cdiv(K, BK)
    my_units = gl.cdiv(units - start, nprog)
    done = 0  # steps through the ring so far (cooperative: one ring)
    for t in range(my_units):
        a_row, b_base, _out_row, _row_end, col, _group, k0, k1 = unit_tile(
            start + t * nprog, M, num_pid_m, num_pid_n, k_tiles, splits, work, 1, BM, BN, GROUP_M, GROUPED, GROUP_POW2)
        ring = t % RINGS
        # the ring's steps before this unit (ping-pong: one split, so every tile has k_tiles)
        first = (t // RINGS) * k_tiles if PINGPONG else done - k0
        for kk in range(k0, k1):
            p = first + kk
            slot = ring * STAGES + p % STAGES
            mbarrier.wait(empty.index(slot), ((p // STAGES) & 1) ^ 1)
            bar = ready.index(slot)
            mbarrier.expect(bar, nbytes)
            for part in gl.static_range(A_PARTS):
                row = a_row + part * SUB_M
                if A_KMAJOR:
                    tma.async_copy_global_to_shared(a_desc, [row, kk * BK], bar, a_bufs.index(slot * A_PARTS + part))
                else:
                    tma.async_copy_global_to_shared(a_desc, [kk * BK, row], bar, a_bufs.index(slot * A_PARTS + part))
            # B K-major: [column, step] from the expert's first row; N-major: [step, column]
            if B_KMAJOR:
                tma.async_copy_global_to_shared(b0_desc, [b_base + col, kk * BK], bar, b_bufs.index(slot * NB))
            else:
                tma.async_copy_global_to_shared(b0_desc, [b_base + kk * BK, col], bar, b_bufs.index(slot * NB))
            if NB == 2:
                if B_KMAJOR:
                    tma.async_copy_global_to_shared(b1_desc, [b_base + col, kk * BK], bar,
                                                    b_bufs.index(slot * NB + 1))
                else:
                    tma.async_copy_global_to_shared(b1_desc, [b_base + kk * BK, col], bar,
                                                    b_bufs.index(slot * NB + 1))
        done += k1 - k0


@gluon.jit
def _consumer(a_bufs, b_bufs, ready, empty, M, N, K, splits, work, epi, WG: gl.constexpr,
              NB: gl.constexpr, A_KMAJOR: gl.constexpr, B_KMAJOR: gl.constexpr, PINGPONG: gl.constexpr,
              BM: gl.constexpr, BN: gl.constexpr, BK: gl.constexpr, GROUP_M: gl.constexpr,
              GROUPED: gl.constexpr, GROUP_POW2: gl.constexpr, EPI_BEGIN: gl.constexpr, EPI_END: gl.constexpr):
    RINGS: gl.constexpr = 2 if PINGPONG else 1
    STAGES: gl.constexpr = ready.shape[0] // RINGS
    A_PARTS: gl.constexpr = 1 if PINGPONG else CONSUMERS
    SUB_M: gl.constexpr = BM // A_PARTS
    RING: gl.constexpr = WG if PINGPONG else 0
    A_PART: gl.constexpr = 0 if PINGPONG else WG
    FIRST_TILE: gl.constexpr = WG if PINGPONG else 0
    TILE_STEP: gl.constexpr = 2 if PINGPONG else 1
    ACC: gl.constexpr = gl.NVMMADistributedLayout(version=[3, 0], warps_per_cta=[4, 1], instr_shape=[16, BN, 16])
    gl.static_assert(not (GROUPED and PINGPONG), "grouped problems run the cooperative schedule")
    start = gl.program_id(0)
    nprog = gl.num_programs(0)
    units, num_pid_m, num_pid_n = units_of(M, N, splits, work, BM, BN, GROUPED)
    k_tiles = gl.cdiv(K, BK)
    my_units = gl.cdiv(units - start, nprog)
    c = 0  # this consumer's steps through its ring
    j = 0  # this consumer's tiles
    for t in range(FIRST_TILE, my_units, TILE_STEP):
        # fresh accumulators per tile: carried across tiles, they would stay live through the
        # epilogue beside its own temporaries (and spill there)
        acc0 = gl.zeros([SUB_M, BN], gl.float32, ACC)
        acc1 = gl.zeros([SUB_M, BN], gl.float32, ACC)
        _a_row, _b_base, out_row, row_end, col, group, k0, k1 = unit_tile(
            start + t * nprog, M, num_pid_m, num_pid_n, k_tiles, splits, work, 4, BM, BN, GROUP_M, GROUPED, GROUP_POW2)
        row = out_row + A_PART * SUB_M
        EPI_BEGIN(epi, row, col, j, WG)
        for kk in range(k0, k1):
            slot = RING * STAGES + c % STAGES
            mbarrier.wait(ready.index(slot), (c // STAGES) & 1)
            a = a_bufs.index(slot * A_PARTS + A_PART)
            if not A_KMAJOR:
                a = a.permute((1, 0))
            b0 = b_bufs.index(slot * NB)
            if B_KMAJOR:
                b0 = b0.permute((1, 0))
            acc0 = warpgroup_mma(a, b0, acc0, use_acc=kk > k0, is_async=True)
            if NB == 2:
                b1 = b_bufs.index(slot * NB + 1)
                if B_KMAJOR:
                    b1 = b1.permute((1, 0))
                acc1 = warpgroup_mma(a, b1, acc1, use_acc=kk > k0, is_async=True)
                # each wgmma is its own group: two outstanding = this step's, so the last step's are done
                acc0, acc1 = warpgroup_mma_wait(2, deps=(acc0, acc1))
            else:
                acc0 = warpgroup_mma_wait(1, deps=(acc0, ))
            # the previous step's wgmma has retired: its stage is free (the previous tile's last
            # stage was released after its final wait, below)
            mbarrier.arrive(empty.index(RING * STAGES + (c + STAGES - 1) % STAGES), pred=kk > k0)
            c += 1
        if NB == 2:
            acc0, acc1 = warpgroup_mma_wait(0, deps=(acc0, acc1))
        else:
            acc0 = warpgroup_mma_wait(0, deps=(acc0, ))
        if GROUPED:  # a unit without steps (the padded tail) used no stage
            mbarrier.arrive(empty.index(RING * STAGES + (c + STAGES - 1) % STAGES), pred=k1 > k0)
        else:
            mbarrier.arrive(empty.index(RING * STAGES + (c + STAGES - 1) % STAGES))
        EPI_END(epi, acc0, acc1, row, col, j, WG, row_end, N, group)
        j += 1
    tma.store_wait(0)  # every epilogue stores through TMA: let the last stores land


@gluon.jit
def run(a_desc, b0_desc, b1_desc, M, N, K, splits, epi,
        NB: gl.constexpr, A_KMAJOR: gl.constexpr, B_KMAJOR: gl.constexpr, PINGPONG: gl.constexpr,
        STAGES: gl.constexpr, GROUP_M: gl.constexpr, EPI_BEGIN: gl.constexpr, EPI_END: gl.constexpr,
        CONSUMER_REGS: gl.constexpr, work, GROUPED: gl.constexpr, GROUP_POW2: gl.constexpr):
    """Allocate the ring (``rings × STAGES`` slots, each of ``CONSUMERS`` A sub-tiles, or one A
    tile in ping-pong, and ``NB`` B tiles; a ready and an empty barrier per slot) and fork the
    loader and the two consumers.  The tile shape comes from the descriptors' blocks: A's is one
    consumer's rows.  ``K`` must be positive (callers route empty reductions elsewhere), and
    every one of the ``splits`` must own at least one reduction step (the host's choice)."""
    RINGS: gl.constexpr = 2 if PINGPONG else 1
    A_PARTS: gl.constexpr = 1 if PINGPONG else CONSUMERS
    SLOTS: gl.constexpr = RINGS * STAGES
    A0: gl.constexpr = a_desc.block_type.shape[0]
    A1: gl.constexpr = a_desc.block_type.shape[1]
    B0: gl.constexpr = b0_desc.block_type.shape[0]
    B1: gl.constexpr = b0_desc.block_type.shape[1]
    BM: gl.constexpr = (A0 if A_KMAJOR else A1) * A_PARTS
    BK: gl.constexpr = A1 if A_KMAJOR else A0
    BN: gl.constexpr = B0 if B_KMAJOR else B1
    a_bufs = gl.allocate_shared_memory(a_desc.dtype, [SLOTS * A_PARTS, A0, A1], a_desc.layout)
    b_bufs = gl.allocate_shared_memory(b0_desc.dtype, [SLOTS * NB, B0, B1], b0_desc.layout)
    ready = gl.allocate_shared_memory(gl.int64, [SLOTS, 1], mbarrier.MBarrierLayout())
    empty = gl.allocate_shared_memory(gl.int64, [SLOTS, 1], mbarrier.MBarrierLayout())
    for i in gl.static_range(SLOTS):
        mbarrier.init(ready.index(i), count=1)
        mbarrier.init(empty.index(i), count=1 if PINGPONG else CONSUMERS)
    # constexprs keep their kind through warp_specialize only when wrapped, in tuples built in
    # the call itself (a tuple assigned to a name first turns them into tensors)
    gl.warp_specialize([
        (_consumer, (a_bufs, b_bufs, ready, empty, M, N, K, splits, work, epi, gl.constexpr(0), gl.constexpr(NB),
                     gl.constexpr(A_KMAJOR), gl.constexpr(B_KMAJOR), gl.constexpr(PINGPONG), gl.constexpr(BM),
                     gl.constexpr(BN), gl.constexpr(BK), gl.constexpr(GROUP_M), gl.constexpr(GROUPED),
                     gl.constexpr(GROUP_POW2), gl.constexpr(EPI_BEGIN), gl.constexpr(EPI_END))),
        (_loader, (a_desc, b0_desc, b1_desc, a_bufs, b_bufs, ready, empty, M, N, K, splits, work, gl.constexpr(NB),
                   gl.constexpr(A_KMAJOR), gl.constexpr(B_KMAJOR), gl.constexpr(PINGPONG), gl.constexpr(BM),
                   gl.constexpr(BN), gl.constexpr(BK), gl.constexpr(GROUP_M), gl.constexpr(GROUPED),
                   gl.constexpr(GROUP_POW2))),
        (_consumer, (a_bufs, b_bufs, ready, empty, M, N, K, splits, work, epi, gl.constexpr(1), gl.constexpr(NB),
                     gl.constexpr(A_KMAJOR), gl.constexpr(B_KMAJOR), gl.constexpr(PINGPONG), gl.constexpr(BM),
                     gl.constexpr(BN), gl.constexpr(BK), gl.constexpr(GROUP_M), gl.constexpr(GROUPED),
                     gl.constexpr(GROUP_POW2), gl.constexpr(EPI_BEGIN), gl.constexpr(EPI_END))),
    ],
                       [1, 4], [24, CONSUMER_REGS])
