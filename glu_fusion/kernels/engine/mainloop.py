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
def _loader(a_desc, b0_desc, b1_desc, a_bufs, b_bufs, ready, empty, M, N, K, splits,
            NB: gl.constexpr, A_KMAJOR: gl.constexpr, B_KMAJOR: gl.constexpr, PINGPONG: gl.constexpr,
            BM: gl.constexpr, BN: gl.constexpr, BK: gl.constexpr, GROUP_M: gl.constexpr):
    RINGS: gl.constexpr = 2 if PINGPONG else 1
    STAGES: gl.constexpr = ready.shape[0] // RINGS
    A_PARTS: gl.constexpr = 1 if PINGPONG else CONSUMERS
    SUB_M: gl.constexpr = BM // A_PARTS
    nbytes: gl.constexpr = A_PARTS * a_desc.block_type.nbytes + NB * b0_desc.block_type.nbytes
    start = gl.program_id(0)
    nprog = gl.num_programs(0)
    num_pid_m = gl.cdiv(M, BM)
    num_pid_n = gl.cdiv(N, BN)
    k_tiles = gl.cdiv(K, BK)
    my_units = gl.cdiv(num_pid_m * num_pid_n * splits - start, nprog)
    done = 0  # steps through the ring so far (cooperative: one ring)
    for t in range(my_units):
        pid_m, pid_n, split, k0, k1 = unit_coords(start + t * nprog, num_pid_m, num_pid_n, k_tiles, splits, GROUP_M)
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
                row = pid_m * BM + part * SUB_M
                if A_KMAJOR:
                    tma.async_copy_global_to_shared(a_desc, [row, kk * BK], bar, a_bufs.index(slot * A_PARTS + part))
                else:
                    tma.async_copy_global_to_shared(a_desc, [kk * BK, row], bar, a_bufs.index(slot * A_PARTS + part))
            if B_KMAJOR:
                tma.async_copy_global_to_shared(b0_desc, [pid_n * BN, kk * BK], bar, b_bufs.index(slot * NB))
            else:
                tma.async_copy_global_to_shared(b0_desc, [kk * BK, pid_n * BN], bar, b_bufs.index(slot * NB))
            if NB == 2:
                if B_KMAJOR:
                    tma.async_copy_global_to_shared(b1_desc, [pid_n * BN, kk * BK], bar, b_bufs.index(slot * NB + 1))
                else:
                    tma.async_copy_global_to_shared(b1_desc, [kk * BK, pid_n * BN], bar, b_bufs.index(slot * NB + 1))
        done += k1 - k0


@gluon.jit
def _consumer(a_bufs, b_bufs, ready, empty, M, N, K, splits, epi, WG: gl.constexpr,
              NB: gl.constexpr, A_KMAJOR: gl.constexpr, B_KMAJOR: gl.constexpr, PINGPONG: gl.constexpr,
              BM: gl.constexpr, BN: gl.constexpr, BK: gl.constexpr, GROUP_M: gl.constexpr,
              EPI_BEGIN: gl.constexpr, EPI_END: gl.constexpr):
    RINGS: gl.constexpr = 2 if PINGPONG else 1
    STAGES: gl.constexpr = ready.shape[0] // RINGS
    A_PARTS: gl.constexpr = 1 if PINGPONG else CONSUMERS
    SUB_M: gl.constexpr = BM // A_PARTS
    RING: gl.constexpr = WG if PINGPONG else 0
    A_PART: gl.constexpr = 0 if PINGPONG else WG
    FIRST_TILE: gl.constexpr = WG if PINGPONG else 0
    TILE_STEP: gl.constexpr = 2 if PINGPONG else 1
    ACC: gl.constexpr = gl.NVMMADistributedLayout(version=[3, 0], warps_per_cta=[4, 1], instr_shape=[16, BN, 16])
    start = gl.program_id(0)
    nprog = gl.num_programs(0)
    num_pid_m = gl.cdiv(M, BM)
    num_pid_n = gl.cdiv(N, BN)
    k_tiles = gl.cdiv(K, BK)
    my_units = gl.cdiv(num_pid_m * num_pid_n * splits - start, nprog)
    c = 0  # this consumer's steps through its ring
    j = 0  # this consumer's tiles
    for t in range(FIRST_TILE, my_units, TILE_STEP):
        # fresh accumulators per tile: carried across tiles, they would stay live through the
        # epilogue beside its own temporaries (and spill there)
        acc0 = gl.zeros([SUB_M, BN], gl.float32, ACC)
        acc1 = gl.zeros([SUB_M, BN], gl.float32, ACC)
        pid_m, pid_n, split, k0, k1 = unit_coords(start + t * nprog, num_pid_m, num_pid_n, k_tiles, splits, GROUP_M)
        row = split * (num_pid_m * BM) + pid_m * BM + A_PART * SUB_M
        col = pid_n * BN
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
        mbarrier.arrive(empty.index(RING * STAGES + (c + STAGES - 1) % STAGES))
        EPI_END(epi, acc0, acc1, row, col, j, WG, M, N)
        j += 1
    tma.store_wait(0)  # every epilogue stores through TMA: let the last stores land


@gluon.jit
def run(a_desc, b0_desc, b1_desc, M, N, K, splits, epi,
        NB: gl.constexpr, A_KMAJOR: gl.constexpr, B_KMAJOR: gl.constexpr, PINGPONG: gl.constexpr,
        STAGES: gl.constexpr, GROUP_M: gl.constexpr, EPI_BEGIN: gl.constexpr, EPI_END: gl.constexpr,
        CONSUMER_REGS: gl.constexpr):
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
        (_consumer, (a_bufs, b_bufs, ready, empty, M, N, K, splits, epi, gl.constexpr(0), gl.constexpr(NB),
                     gl.constexpr(A_KMAJOR), gl.constexpr(B_KMAJOR), gl.constexpr(PINGPONG), gl.constexpr(BM),
                     gl.constexpr(BN), gl.constexpr(BK), gl.constexpr(GROUP_M), gl.constexpr(EPI_BEGIN),
                     gl.constexpr(EPI_END))),
        (_loader, (a_desc, b0_desc, b1_desc, a_bufs, b_bufs, ready, empty, M, N, K, splits, gl.constexpr(NB),
                   gl.constexpr(A_KMAJOR), gl.constexpr(B_KMAJOR), gl.constexpr(PINGPONG), gl.constexpr(BM),
                   gl.constexpr(BN), gl.constexpr(BK), gl.constexpr(GROUP_M))),
        (_consumer, (a_bufs, b_bufs, ready, empty, M, N, K, splits, epi, gl.constexpr(1), gl.constexpr(NB),
                     gl.constexpr(A_KMAJOR), gl.constexpr(B_KMAJOR), gl.constexpr(PINGPONG), gl.constexpr(BM),
                     gl.constexpr(BN), gl.constexpr(BK), gl.constexpr(GROUP_M), gl.constexpr(EPI_BEGIN),
                     gl.constexpr(EPI_END))),
    ],
                       [1, 4], [24, CONSUMER_REGS])
