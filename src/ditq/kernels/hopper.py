"""Warp-specialized GEMMs for Hopper (sm_90) in Gluon, Triton's explicit dialect: int8-row, int8-block and
fp8-block at large M (``configs.get_config`` picks them; ``gemm.scaled_mm`` launches them). Same operands,
scales, accumulation and epilogue arithmetic as ``gemm._scaled_mm_kernel``, so their results are equal to it bit
for bit (tests/kernels/test_hopper.py on a GPU).

Why (bench/NOTES.md, GEMM round 7): Triton 3.6 runs every warp of a program through one instruction stream. The
int8 product is then synchronous at every K step (its pipeliner keeps a wgmma in flight only for fp32
accumulators), and the block formats' promotion of each 128-K block's partial product into the fp32 accumulator
waits for that block's wgmma while the tensor cores idle. Here a program is persistent (one per SM, tiles in
grouped order) and split into partitions that meet only at mbarriers:

- a producer warp issues the TMA loads of every (tile, K step) into a ring of STAGES stages, a stage as soon as
  both consumers have released it, so the next tile's operands arrive while this tile's epilogue runs;
- two consumer warp groups each own 64 rows of the 128 x 256 tile. Row formats accumulate in place with one K
  step's wgmma in flight; block formats run each 128-wide half of the step as a fresh product and promote it
  (x_scale * w_scale of that half's weight block) while the *other* consumer's wgmma occupies the tensor cores;
- each consumer writes its rows through shared memory and TMA stores, 64 x 128 at a time.

Measured on an H200 (GEMM alone, CUDA-graph replays, geomean of the benchmark's large shapes): int8-row 1.65x ->
1.83x cuBLAS bf16, int8-block 1.25x -> 1.45x, fp8-block 1.28x -> 1.49x. fp8-row stays on the Triton kernel
(its wgmma is already asynchronous there; the Gluon kernel was not faster).

Layouts: xq [M, K] and wq [N, K] int8 / float8_e4m3fn with unit inner stride and 16-byte aligned rows (TMA);
x_scale f32 [M, 1] (row) or [M, K/128] (block); w_scale f32 [N] / [N, 1] (row) or [ceil(N/128), K/128] (block);
out [M, N] bf16 / fp16 / f32 contiguous with 16-byte aligned rows. Block formats need K % 128 == 0.
"""

from __future__ import annotations

import dataclasses

import torch
import triton

from . import INTERPRET
from . import quant as _quant
from .gemm import _num_sms, _tma_ok, tail_split
from .gemm import _tile_coords as tile_coords  # scalar arithmetic: callable from Gluon too

try:  # triton >= 3.5 ships Gluon
    from triton.experimental import gluon
    from triton.experimental.gluon import language as gl
    from triton.experimental.gluon.language.nvidia.hopper import (fence_async_shared, mbarrier, tma, warpgroup_mma,
                                                                   warpgroup_mma_wait)  # fmt: skip

    HAS_GLUON = True
except ImportError:  # pragma: no cover
    HAS_GLUON = False

FORMATS = ("int8-row", "int8-block", "fp8-block")
"""The formats routed here at large M (fp8-row / fp8-tensor: the Triton kernel was as fast, NOTES round 7)."""

MIN_M = 2048
"""Rows from which ``configs.get_config`` takes these kernels: 128 x 256 tiles need enough of them to fill the
SMs (below, the tuned Triton configurations of the benchmark's M = 256 / 1024 shapes stay)."""

BLOCK_M, BLOCK_N, BLOCK_K = 128, 256, 128
OUT_N = 128  # width of one output store (a 64 x 128 tile per consumer warp group)
SHARED_BYTES = 227 * 1024 - 1024  # a Hopper program's shared memory, less the barriers
MIN_SLICE_STEPS = 16
"""K steps a slice of a split last-wave tile needs at least: the partial sums' round trip (128 KB stored per
slice, all slices read back by the last) cost more than they saved at 7-8 steps per slice (H200: int8-row
4608x3072x3072 1.71x -> 1.58x GEMM with 3 slices of 8 steps; 4608x3072x12288 1.82x -> 1.92x with 3 of 32)."""


if HAS_GLUON:

    @gluon.jit
    def _tail_unit(dims, tail, BM: gl.constexpr, BN: gl.constexpr):
        """(has one, tile, first K step, end K step, slice) of this program's slice of a last-wave tile."""
        M, N, K = dims
        part_ptr, count_ptr, n_full, tail_s, k_slice = tail
        u = gl.program_id(0)
        has = u < (gl.cdiv(M, BM) * gl.cdiv(N, BN) - n_full) * tail_s
        k0 = (u % tail_s) * k_slice
        return has, n_full + u // tail_s, k0, gl.minimum(k0 + k_slice, gl.cdiv(K, 128)), u % tail_s

    @gluon.jit
    def _load_steps(x_desc, w_desc, ring, tile, k0, k1, i, dims, GROUP_M: gl.constexpr):
        """TMA loads of K steps [k0, k1) of ``tile`` into the ring from slot i on; returns the next slot. A stage
        is refilled once both consumers released it (a fresh barrier counts as released: parity 1 first)."""
        a_bufs, b_bufs, ready, empty = ring
        M, N, K = dims
        STAGES: gl.constexpr = a_bufs.shape[0]
        nbytes: gl.constexpr = x_desc.block_type.nbytes + w_desc.block_type.nbytes
        off_m, off_n = tile_coords(tile, M, N, x_desc.block_type.shape[0], w_desc.block_type.shape[0], GROUP_M)
        for k in range(k0, k1):
            s = i % STAGES
            mbarrier.wait(empty.index(s), ((i // STAGES) & 1) ^ 1)
            mbarrier.expect(ready.index(s), nbytes)
            tma.async_copy_global_to_shared(x_desc, [off_m, k * 128], ready.index(s), a_bufs.index(s))
            tma.async_copy_global_to_shared(w_desc, [off_n, k * 128], ready.index(s), b_bufs.index(s))
            i += 1
        return i

    @gluon.jit
    def _load_partition(x_desc, w_desc, ring, dims, tail, GROUP_M: gl.constexpr, TAIL: gl.constexpr):
        """Producer (one warp): the K steps of every tile of this program, then of its last-wave slice."""
        BM: gl.constexpr = x_desc.block_type.shape[0]
        BN: gl.constexpr = w_desc.block_type.shape[0]
        M, N, K = dims
        k_steps = gl.cdiv(K, 128)  # TMA zero-fills a row format's K tail
        i = 0
        for tile in range(gl.program_id(0), tail[2], gl.num_programs(0)):
            i = _load_steps(x_desc, w_desc, ring, tile, 0, k_steps, i, dims, GROUP_M)
        if TAIL:
            has, tile, k0, k1, _ = _tail_unit(dims, tail, BM, BN)
            if has:
                _load_steps(x_desc, w_desc, ring, tile, k0, k1, i, dims, GROUP_M)

    @gluon.jit
    def _pin(t):
        """``t`` itself, through a volatile asm: LLVM keeps the code computing ``t`` before the next volatile op
        (the next wgmma), which then reuses the product's registers instead of taking a second set (spills)."""
        return gl.inline_asm_elementwise("mov.b32 $0, $1;", "=r,r", [t], dtype=t.dtype, is_pure=False, pack=1)

    @gluon.jit
    def _slab(acc, base, j, WG: gl.constexpr, COL0: gl.constexpr):
        """Pointers of warp group WG's rows and columns [COL0, COL0 + acc's width) in slice j of a tail tile's
        partial sums (slices of [128, 256], ``acc``'s layout)."""
        lay: gl.constexpr = acc.type.layout
        r = WG * 64 + gl.arange(0, acc.shape[0], layout=gl.SliceLayout(1, lay))
        c = COL0 + gl.arange(0, acc.shape[1], layout=gl.SliceLayout(0, lay))
        return base + j * (128 * 256) + r[:, None] * 256 + c[None, :]

    @gluon.jit
    def _arrive(count_ptr, idx, tail_s):
        """Count this warp group's slice in (its stores first); True for the last of the tile's slices to arrive,
        which resets the counter for the next launch."""
        gl.thread_barrier()  # every thread's partial sums are stored before the release below
        last = gl.atomic_add(count_ptr + idx, 1, sem="acq_rel", scope="gpu") == tail_s - 1
        if last:
            gl.atomic_xchg(count_ptr + idx, 0, sem="relaxed", scope="gpu")
        return last

    @gluon.jit
    def _slices_sum(acc, base, tail_s, WG: gl.constexpr, COL0: gl.constexpr):
        """The sum of all slices' partial sums in slice order (int32: exact, the unsplit result; fp32: a fixed
        order). .cg: the other programs' slices from L2, not L1."""
        acc = gl.load(_slab(acc, base, 0, WG, COL0), cache_modifier=".cg")
        for j in range(1, tail_s):
            acc += gl.load(_slab(acc, base, j, WG, COL0), cache_modifier=".cg")
        return acc

    @gluon.jit
    def _store(y, o_desc, o_smem, off_m, off_n, PENDING: gl.constexpr):
        """y (fp32, one 64 x 128 piece) out at (off_m, off_n) through ``o_smem`` and a TMA store, once at most
        PENDING earlier stores of this warp group still read their buffers (TMA clips rows / columns past the end)."""
        tma.store_wait(PENDING)
        o_smem.store(y.to(o_desc.dtype))
        fence_async_shared()
        tma.async_copy_shared_to_global(o_desc, [off_m, off_n], o_smem)

    @gluon.jit
    def _bias(y, off_n, N, bias_ptr, HAS_BIAS: gl.constexpr):
        if HAS_BIAS:
            rn = off_n + gl.arange(0, y.shape[1], layout=gl.SliceLayout(0, y.type.layout))
            y += gl.load(bias_ptr + rn, mask=rn < N, other=0.0).to(gl.float32)[None, :]
        return y

    @gluon.jit
    def _row_piece(a, out, o_smem, off_m, off_n, dims, scales, HAS_BIAS: gl.constexpr, PENDING: gl.constexpr):
        """One 64 x 128 piece of a row-format tile: acc * x_scale[m] * w_scale[n] (+ bias), as the Triton
        epilogue computes it."""
        M, N, K = dims
        xs_ptr, ws_ptr, bias_ptr, stride_xsm, stride_xsk, stride_wsn, stride_wsk = scales
        lay: gl.constexpr = a.type.layout
        rm = off_m + gl.arange(0, a.shape[0], layout=gl.SliceLayout(1, lay))
        rn = off_n + gl.arange(0, a.shape[1], layout=gl.SliceLayout(0, lay))
        xs = gl.load(xs_ptr + (rm % M).to(gl.int64) * stride_xsm)
        ws = gl.load(ws_ptr + (rn % N) * stride_wsn)
        y = _bias(a.to(gl.float32) * xs[:, None] * ws[None, :], off_n, N, bias_ptr, HAS_BIAS)
        _store(y, out[1], o_smem, off_m, off_n, PENDING)

    @gluon.jit
    def _row_steps(ring, tile, k0, k1, i, dims, WG: gl.constexpr, IS_INT: gl.constexpr, GROUP_M: gl.constexpr):
        """K steps [k0, k1) of ``tile`` for warp group WG's 64 rows, accumulated in place (int32 for int8: exact)
        with one step in flight; step k - 1's stage is released once step k is issued and k - 1 has completed.
        Returns (acc, next ring slot)."""
        a_bufs, b_bufs, ready, empty = ring
        BN: gl.constexpr = b_bufs.shape[1]
        STAGES: gl.constexpr = a_bufs.shape[0]
        INSTR_N: gl.constexpr = 128 if IS_INT else BN  # int8 wgmma: N <= 224
        mma: gl.constexpr = gl.NVMMADistributedLayout(version=[3, 0], warps_per_cta=[4, 1],
                                                      instr_shape=[16, INSTR_N, 32])  # fmt: skip
        acc = gl.zeros([64, BN], gl.int32 if IS_INT else gl.float32, layout=mma)
        for k in range(k0, k1):
            s = i % STAGES
            mbarrier.wait(ready.index(s), (i // STAGES) & 1)
            acc = warpgroup_mma(a_bufs.index(s).slice(WG * 64, 64), b_bufs.index(s).permute((1, 0)), acc,
                                use_acc=k != k0, is_async=True)  # fmt: skip
            acc = warpgroup_mma_wait(num_outstanding=1, deps=(acc, ))
            mbarrier.arrive(empty.index((i + STAGES - 1) % STAGES), count=1, pred=k != k0)
            i += 1
        acc = warpgroup_mma_wait(num_outstanding=0, deps=(acc, ))
        mbarrier.arrive(empty.index((i + STAGES - 1) % STAGES), count=1)
        return acc, i

    @gluon.jit
    def _row_epilogue(acc, tile, out, dims, scales, WG: gl.constexpr, HAS_BIAS: gl.constexpr, GROUP_M: gl.constexpr):
        """Warp group WG's rows of a finished row-format tile, in two 128-wide pieces one after the other (the
        scales and bias of both are not live at once)."""
        o_bufs = out[0]
        BN: gl.constexpr = acc.shape[1]
        PENDING: gl.constexpr = o_bufs.shape[0] // 2 - 1
        M, N, K = dims
        off_m, off_n = tile_coords(tile, M, N, 128, BN, GROUP_M)
        a0, a1 = gl.split(gl.permute(gl.reshape(acc, [64, 2, BN // 2]), [0, 2, 1]))
        row = off_m + WG * 64
        _row_piece(a0, out, o_bufs.index(WG * (PENDING + 1)), row, off_n, dims, scales, HAS_BIAS, PENDING)
        _row_piece(a1, out, o_bufs.index(WG * (PENDING + 1) + PENDING), row, off_n + BN // 2, dims, scales, HAS_BIAS,
                   PENDING)  # fmt: skip

    @gluon.jit
    def _row_consumer(ring, out, dims, scales, tail, WG: gl.constexpr, IS_INT: gl.constexpr,
                      HAS_BIAS: gl.constexpr, GROUP_M: gl.constexpr, TAIL: gl.constexpr):  # fmt: skip
        """Row formats, consumer warp group WG: rows [64 WG, 64 WG + 64) of this program's tiles, then of its
        last-wave slice (partial sums to the workspace; the last slice to arrive sums them and writes the tile)."""
        BN: gl.constexpr = ring[1].shape[1]
        M, N, K = dims
        i = 0
        for tile in range(gl.program_id(0), tail[2], gl.num_programs(0)):
            acc, i = _row_steps(ring, tile, 0, gl.cdiv(K, 128), i, dims, WG, IS_INT, GROUP_M)
            _row_epilogue(acc, tile, out, dims, scales, WG, HAS_BIAS, GROUP_M)
        if TAIL:
            part_ptr, count_ptr, n_full, tail_s, k_slice = tail
            has, tile, k0, k1, j = _tail_unit(dims, tail, 128, BN)
            if has:
                acc, i = _row_steps(ring, tile, k0, k1, i, dims, WG, IS_INT, GROUP_M)
                base = part_ptr + ((tile - n_full) * tail_s).to(gl.int64) * (128 * 256)
                gl.store(_slab(acc, base, j, WG, 0), acc)
                if _arrive(count_ptr, (tile - n_full) * 2 + WG, tail_s):
                    _row_epilogue(_slices_sum(acc, base, tail_s, WG, 0), tile, out, dims, scales, WG, HAS_BIAS,
                                  GROUP_M)  # fmt: skip
        tma.store_wait(0)

    @gluon.jit
    def _product(a_bufs, b_bufs, s, p, WG: gl.constexpr, H: gl.constexpr):
        """The 64 x 128 product of warp group WG's rows and the H-th 128 columns of stage s (fresh), complete."""
        p = warpgroup_mma(a_bufs.index(s).slice(WG * 64, 64), b_bufs.index(s).slice(H * 128, 128).permute((1, 0)), p,
                          use_acc=False, is_async=True)  # fmt: skip
        return warpgroup_mma_wait(num_outstanding=0, deps=(p, ))

    @gluon.jit
    def _promote(acc, p, s, IS_INT: gl.constexpr):
        """acc + p * s[:, None] in fp32: ``gemm._block_scaled_step``'s expression."""
        if IS_INT:
            return _pin(acc + p.to(gl.float32) * s[:, None])
        else:
            return _pin(acc + p * s[:, None])

    @gluon.jit
    def _block_steps(ring, tile, k0, k1, i, dims, scales, WG: gl.constexpr, IS_INT: gl.constexpr,
                     GROUP_M: gl.constexpr):  # fmt: skip
        """K steps [k0, k1) of ``tile`` for warp group WG's 64 rows: each 128-wide half of a step is a fresh
        product promoted into its own fp32 accumulator with x_scale[m, kb] * w_scale[n block, kb] (two 64 x 128
        accumulators + one product in registers); the stage is released after the second product, before its
        promotion. Returns (acc of columns 0-127, acc of 128-255, next ring slot)."""
        a_bufs, b_bufs, ready, empty = ring
        M, N, K = dims
        xs_ptr, ws_ptr, bias_ptr, stride_xsm, stride_xsk, stride_wsn, stride_wsk = scales
        BN: gl.constexpr = b_bufs.shape[1]
        STAGES: gl.constexpr = a_bufs.shape[0]
        mma: gl.constexpr = gl.NVMMADistributedLayout(version=[3, 0], warps_per_cta=[4, 1],
                                                      instr_shape=[16, 128, 32])  # fmt: skip
        off_m, off_n = tile_coords(tile, M, N, 128, BN, GROUP_M)
        p = gl.zeros([64, 128], gl.int32 if IS_INT else gl.float32, layout=mma)
        rm = off_m + WG * 64 + gl.arange(0, 64, layout=gl.SliceLayout(1, mma))
        xs_row = xs_ptr + (rm % M).to(gl.int64) * stride_xsm
        ws0 = ws_ptr + (off_n // 128) * stride_wsn
        ws1 = ws_ptr + gl.minimum(off_n // 128 + 1, gl.cdiv(N, 128) - 1) * stride_wsn  # past N: never stored
        xs = gl.load(xs_row + k0 * stride_xsk)
        w0 = gl.load(ws0 + k0 * stride_wsk)
        w1 = gl.load(ws1 + k0 * stride_wsk)
        acc0 = gl.zeros([64, 128], gl.float32, layout=mma)
        acc1 = gl.zeros([64, 128], gl.float32, layout=mma)
        for k in range(k0, k1):
            s = i % STAGES
            mbarrier.wait(ready.index(s), (i // STAGES) & 1)
            kn = gl.minimum(k + 1, k1 - 1)  # the next step's scales load while the products run
            xs_next = gl.load(xs_row + kn * stride_xsk)
            w0_next = gl.load(ws0 + kn * stride_wsk)
            w1_next = gl.load(ws1 + kn * stride_wsk)
            p = _product(a_bufs, b_bufs, s, p, WG, 0)
            acc0 = _promote(acc0, p, xs * w0, IS_INT)
            p = _product(a_bufs, b_bufs, s, p, WG, 1)
            mbarrier.arrive(empty.index(s), count=1)
            acc1 = _promote(acc1, p, xs * w1, IS_INT)
            xs, w0, w1 = xs_next, w0_next, w1_next
            i += 1
        return acc0, acc1, i

    @gluon.jit
    def _block_epilogue(acc0, acc1, tile, out, dims, scales, WG: gl.constexpr, HAS_BIAS: gl.constexpr,
                        GROUP_M: gl.constexpr):  # fmt: skip
        o_bufs, o_desc = out
        PENDING: gl.constexpr = o_bufs.shape[0] // 2 - 1
        M, N, K = dims
        bias_ptr = scales[2]
        off_m, off_n = tile_coords(tile, M, N, 128, 256, GROUP_M)
        row = off_m + WG * 64
        _store(_bias(acc0, off_n, N, bias_ptr, HAS_BIAS), o_desc, o_bufs.index(WG * (PENDING + 1)), row, off_n, PENDING)
        _store(_bias(acc1, off_n + 128, N, bias_ptr, HAS_BIAS), o_desc, o_bufs.index(WG * (PENDING + 1) + PENDING),
               row, off_n + 128, PENDING)  # fmt: skip

    @gluon.jit
    def _block_consumer(ring, out, dims, scales, tail, WG: gl.constexpr, IS_INT: gl.constexpr,
                        HAS_BIAS: gl.constexpr, GROUP_M: gl.constexpr, TAIL: gl.constexpr):  # fmt: skip
        """Block formats, consumer warp group WG: as ``_row_consumer``, with the promoted fp32 accumulators."""
        M, N, K = dims
        i = 0
        for tile in range(gl.program_id(0), tail[2], gl.num_programs(0)):
            acc0, acc1, i = _block_steps(ring, tile, 0, K // 128, i, dims, scales, WG, IS_INT, GROUP_M)
            _block_epilogue(acc0, acc1, tile, out, dims, scales, WG, HAS_BIAS, GROUP_M)
        if TAIL:
            part_ptr, count_ptr, n_full, tail_s, k_slice = tail
            has, tile, k0, k1, j = _tail_unit(dims, tail, 128, 256)
            if has:
                acc0, acc1, i = _block_steps(ring, tile, k0, k1, i, dims, scales, WG, IS_INT, GROUP_M)
                base = part_ptr + ((tile - n_full) * tail_s).to(gl.int64) * (128 * 256)
                gl.store(_slab(acc0, base, j, WG, 0), acc0)
                gl.store(_slab(acc1, base, j, WG, 128), acc1)
                if _arrive(count_ptr, (tile - n_full) * 2 + WG, tail_s):
                    _block_epilogue(_slices_sum(acc0, base, tail_s, WG, 0), _slices_sum(acc1, base, tail_s, WG, 128),
                                    tile, out, dims, scales, WG, HAS_BIAS, GROUP_M)  # fmt: skip
        tma.store_wait(0)

    @gluon.jit
    def _consumer(ring, out, dims, scales, tail, WG: gl.constexpr, BLOCK_SCALED: gl.constexpr, IS_INT: gl.constexpr,
                  HAS_BIAS: gl.constexpr, GROUP_M: gl.constexpr, TAIL: gl.constexpr):  # fmt: skip
        if BLOCK_SCALED:
            _block_consumer(ring, out, dims, scales, tail, WG, IS_INT, HAS_BIAS, GROUP_M, TAIL)
        else:
            _row_consumer(ring, out, dims, scales, tail, WG, IS_INT, HAS_BIAS, GROUP_M, TAIL)

    @gluon.jit
    def _consumer0(ring, out, dims, scales, tail, BLOCK_SCALED: gl.constexpr, IS_INT: gl.constexpr,
                   HAS_BIAS: gl.constexpr, GROUP_M: gl.constexpr, TAIL: gl.constexpr):  # fmt: skip
        _consumer(ring, out, dims, scales, tail, 0, BLOCK_SCALED, IS_INT, HAS_BIAS, GROUP_M, TAIL)

    @gluon.jit
    def _consumer1(ring, out, dims, scales, tail, BLOCK_SCALED: gl.constexpr, IS_INT: gl.constexpr,
                   HAS_BIAS: gl.constexpr, GROUP_M: gl.constexpr, TAIL: gl.constexpr):  # fmt: skip
        _consumer(ring, out, dims, scales, tail, 1, BLOCK_SCALED, IS_INT, HAS_BIAS, GROUP_M, TAIL)

    @gluon.jit(do_not_specialize=["M"])
    def _ws_gemm_kernel(x_desc, w_desc, o_desc, xs_ptr, ws_ptr, bias_ptr, part_ptr, count_ptr, M, N, K, n_full,
                        tail_s, k_slice, stride_xsm, stride_xsk, stride_wsn, stride_wsk, BLOCK_SCALED: gl.constexpr,
                        IS_INT: gl.constexpr, HAS_BIAS: gl.constexpr, GROUP_M: gl.constexpr, STAGES: gl.constexpr,
                        OUT_BUFS: gl.constexpr, CONSUMER_REGS: gl.constexpr, TAIL: gl.constexpr):  # fmt: skip
        """y = the scaled product of one persistent program's tiles: tiles pid, pid + P, ... below ``n_full``;
        TAIL: then program u < (tiles - n_full) * tail_s takes K steps [k_slice * (u % tail_s), + k_slice) of tile
        n_full + u // tail_s, its partial sums meeting the other slices' in part [.., 128, 256] (int32 / fp32 as
        the accumulator), counted in count [2 per tail tile]. Consumer 0 runs in the default partition (this
        kernel's 4 warps), consumer 1 and the producer in worker partitions."""
        BM: gl.constexpr = x_desc.block_type.shape[0]
        BN: gl.constexpr = w_desc.block_type.shape[0]
        a_bufs = gl.allocate_shared_memory(x_desc.dtype, [STAGES, BM, 128], x_desc.layout)
        b_bufs = gl.allocate_shared_memory(w_desc.dtype, [STAGES, BN, 128], w_desc.layout)
        o_bufs = gl.allocate_shared_memory(o_desc.dtype, [2 * OUT_BUFS] + o_desc.block_type.shape, o_desc.layout)
        ready = gl.allocate_shared_memory(gl.int64, [STAGES, 1], mbarrier.MBarrierLayout())
        empty = gl.allocate_shared_memory(gl.int64, [STAGES, 1], mbarrier.MBarrierLayout())
        for i in gl.static_range(STAGES):
            mbarrier.init(ready.index(i), count=1)
            mbarrier.init(empty.index(i), count=2)  # one arrival per consumer warp group
        ring = (a_bufs, b_bufs, ready, empty)
        out = (o_bufs, o_desc)
        dims = (M, N, K)
        scales = (xs_ptr, ws_ptr, bias_ptr, stride_xsm, stride_xsk, stride_wsn, stride_wsk)
        tail = (part_ptr, count_ptr, n_full, tail_s, k_slice)
        # the constexprs are written out in the call: a tuple assigned to a name turns them into tensors
        gl.warp_specialize([
            (_consumer0, (ring, out, dims, scales, tail, BLOCK_SCALED, IS_INT, HAS_BIAS, GROUP_M, TAIL)),
            (_consumer1, (ring, out, dims, scales, tail, BLOCK_SCALED, IS_INT, HAS_BIAS, GROUP_M, TAIL)),
            (_load_partition, (x_desc, w_desc, ring, dims, tail, GROUP_M, TAIL))],
            [4, 1], [CONSUMER_REGS, 24])  # fmt: skip


def available(device: torch.device | None = None) -> bool:
    """Whether these kernels can run on ``device`` (default: the current CUDA device): Gluon present, not the
    interpreter, a Hopper GPU (compute capability 9.x)."""
    if not HAS_GLUON or INTERPRET or not torch.cuda.is_available():
        return False
    return torch.cuda.get_device_capability(device)[0] == 9


_OUT_DTYPES = (torch.bfloat16, torch.float16, torch.float32)


def usable(xq: torch.Tensor, wq: torch.Tensor, out: torch.Tensor, fmt, lora=None) -> bool:
    """Whether these operands fit the kernels (else ``gemm`` launches the Triton kernel): formats of ``FORMATS``,
    TMA-able operands and output, no LoRA branch (the Triton epilogue has it), a Hopper device."""
    return (
        fmt.name in FORMATS
        and lora is None
        and xq.is_cuda
        and out.dtype in _OUT_DTYPES
        and out.is_contiguous()
        and (out.shape[1] * out.element_size()) % 16 == 0
        and out.data_ptr() % 16 == 0
        and _tma_ok(xq)
        and _tma_ok(wq)
        and (not fmt.is_block or xq.shape[1] % 128 == 0)
        and available(xq.device)
    )


def _layout(block, dtype):
    g = {torch.int8: gl.int8, torch.float8_e4m3fn: gl.float8e4nv, torch.bfloat16: gl.bfloat16,
         torch.float16: gl.float16, torch.float32: gl.float32}[dtype]  # fmt: skip
    return gl.NVMMASharedLayout.get_default_for(list(block), g)


def scaled_mm_spec(xq, x_scale, wq, w_scale, fmt, bias, out, c, tail=None) -> _quant.Spec:
    """The launch of the warp-specialized GEMM with configuration ``c`` (``c.ws``; num_stages, group_m,
    tail_split are used) for operands that are ``usable`` (M, N, K > 0) into ``out`` [M, N]. TMA operands are
    ``Tma`` objects (x, w, out; launch plans re-encode out's per call). ``tail``: the workspace of
    ``gemm.tail_args`` (partial sums, counters); the tiles of the last, partial wave are then split over K as
    ``gemm.tail_split`` decides for one program per SM. Shared memory: num_stages x 48 KB of operands + two
    64 x 128 output buffers (4 stages and a 16-bit output: 224 KB; an fp32 output takes 3 stages)."""
    m, k = xq.shape
    n = wq.shape[0]
    if x_scale.dim() == 1:
        x_scale = x_scale[:, None]
    ws = w_scale if w_scale.dim() == 2 else w_scale.reshape(-1, 1)
    xss, wss = x_scale.stride(), ws.stride()
    tiles = triton.cdiv(m, BLOCK_M) * triton.cdiv(n, BLOCK_N)
    programs = min(tiles, _num_sms(xq.device))
    n_full, tail_s, k_slice = tiles, 1, k
    part = count = None
    if tail is not None:
        part, count = tail
        steps = triton.cdiv(k, BLOCK_K)
        c = dataclasses.replace(c, tail_split=min(c.tail_split, steps // MIN_SLICE_STEPS))
        n_full, tail_s, k_slice = tail_split(tiles, k, c, programs)
        if tail_s == 1:
            part = count = None
        elif fmt.is_block or not fmt.is_int:  # the accumulator is fp32 (int8-row: int32)
            part = part.view(torch.float32)
    stages = c.num_stages
    out_bytes = 2 * 64 * OUT_N * out.element_size()  # one 64 x 128 buffer per consumer
    while stages > 2 and stages * (BLOCK_M + BLOCK_N) * BLOCK_K + out_bytes > SHARED_BYTES:
        stages -= 1  # an fp32 output: 3 stages
    args = (_quant.Tma(xq, (BLOCK_M, BLOCK_K), _layout((BLOCK_M, BLOCK_K), xq.dtype)),
            _quant.Tma(wq, (BLOCK_N, BLOCK_K), _layout((BLOCK_N, BLOCK_K), wq.dtype)),
            _quant.Tma(out, (64, OUT_N), _layout((64, OUT_N), out.dtype)),
            x_scale, ws, bias, part, count, m, n, k, n_full, tail_s, k_slice // BLOCK_K,
            xss[0], xss[1], wss[0], wss[1])  # fmt: skip
    constexprs = dict(BLOCK_SCALED=fmt.is_block, IS_INT=fmt.is_int, HAS_BIAS=bias is not None, GROUP_M=c.group_m,
                      STAGES=stages, OUT_BUFS=1, CONSUMER_REGS=232, TAIL=part is not None)  # fmt: skip
    # what Triton specializes on, for the launch cache (M is not; TMA operands by dtype, box and strides)
    key = (xq.dtype, xq.stride(), wq.stride(), out.dtype, x_scale.dtype, ws.dtype, None if bias is None else bias.dtype,
           x_scale.data_ptr() & 15, ws.data_ptr() & 15, 0 if bias is None else bias.data_ptr() & 15, n, k, xss, wss,
           tail_s, k_slice, n_full & 15)  # fmt: skip
    # 12 warps (4 + 4 + the producer's group) x 168 registers fill the register file; setmaxnreg then moves
    # them to the consumers (232 each) from the producer (24)
    return _quant.Spec(_ws_gemm_kernel, (programs,), args, constexprs, 4, 1, key=key, maxnreg=168)
