"""Issue 3, round 5 probe kernel: the int8-row GEMM written in Gluon (Triton's lower-level dialect), Hopper only.
Kept as the reproduction of a measured negative result (bench/NOTES.md, GEMM round 5, item 7): bit-identical to
the Triton kernel, and not faster.

Why: Triton 3.6 never keeps an int8 wgmma in flight across K steps. Its MMA pipeliner makes a dot
"properly async" only when the accumulator is fp32 (rule 2.1 of ``dotCanBeProperlyAsync`` in
``WGMMAPipeline.cpp``), so the int32 accumulator of an int8 x int8 product gets ``wgmma.wait_group 0`` after
every K step (PTX of ditq's int8-row kernel at 128x256x128, 8 warps, 4 stages: one ``wait_group 0`` in the loop;
the e4m3 kernel of the same tile: ``wait_group 1``). The tensor cores then idle while each step's wait, barrier
and loop overhead run. Gluon states the asynchrony directly: ``warpgroup_mma(is_async=True)`` followed by
``warpgroup_mma_wait(num_outstanding=1)`` keeps one step's MMA running while the next is issued.

y [M, N] = (xq [M, K] int8 @ wq [N, K]^T int8) * x_scale[m] * w_scale[n] (+ bias), int32 accumulation (exact),
so the result equals ``gemm.scaled_mm`` for int8-row bit for bit. TMA loads into a STAGES-deep ring guarded by
one mbarrier per stage; the stage that step k-1 read is refilled (with step k + STAGES - 1) once step k's MMA is
issued and step k-1's has completed. int8 wgmma takes N <= 224 per instruction, so the 256-wide tile runs as
two 128-wide instructions per 64-row warp group.

Runs only on a CUDA GPU (Gluon has no interpreter): ``available()`` says whether it can run on a tensor.
Outcome on the H200: equal to the Triton kernel bit for bit at every shape probed (odd ones included), GEMM alone
1.58x bf16 geomean vs the Triton kernel's 1.66x, and sustained 1084 vs 1116 TFLOP/s (both at the 700 W limit):
keeping the int8 MMA in flight does not raise the power-limited rate. ``a_in_regs``: x read into registers once per
step (register-A wgmma, synchronous): slower still (1.41x, 944 TFLOP/s sustained). Used by ``bench/gemm_probe.py
--part gluon``.
"""

from __future__ import annotations

import torch
import triton

try:  # triton >= 3.5
    from triton.experimental import gluon
    from triton.experimental.gluon import language as gl
    from triton.experimental.gluon.language.nvidia.hopper import (fence_async_shared, mbarrier, tma, warpgroup_mma,
                                                                   warpgroup_mma_wait)
    from triton.experimental.gluon.nvidia.hopper import TensorDescriptor as GluonDescriptor

    HAS_GLUON = True
except ImportError:  # pragma: no cover
    HAS_GLUON = False

from ditq.kernels import INTERPRET
from ditq.kernels import quant as _quant
from ditq.kernels.gemm import _empty_product, _num_sms
from ditq.kernels.gemm import _tile_coords as tile_coords  # scalar arithmetic: callable from Gluon too

if HAS_GLUON:

    @gluon.jit
    def _row_scaled(acc, off_m, off_n, M, N, xs_ptr, ws_ptr, bias_ptr, stride_xsm, stride_wsn, HAS_BIAS: gl.constexpr,
                    mma: gl.constexpr):  # fmt: skip
        """(acc * x_scale[m] * w_scale[n] + bias in fp32, rows, columns) of the tile at (off_m, off_n)."""
        rm = off_m + gl.arange(0, acc.shape[0], layout=gl.SliceLayout(1, mma))
        rn = off_n + gl.arange(0, acc.shape[1], layout=gl.SliceLayout(0, mma))
        xs = gl.load(xs_ptr + (rm % M).to(gl.int64) * stride_xsm)
        ws = gl.load(ws_ptr + (rn % N) * stride_wsn)
        y = acc.to(gl.float32) * xs[:, None] * ws[None, :]
        if HAS_BIAS:
            y += gl.load(bias_ptr + rn, mask=rn < N, other=0.0).to(gl.float32)[None, :]
        return y, rm, rn

    @gluon.jit(do_not_specialize=["M"])
    def _int8_row_kernel(x_desc, w_desc, xs_ptr, ws_ptr, bias_ptr, out_ptr, M, N, K, stride_om, stride_xsm,
                         stride_wsn, HAS_BIAS: gl.constexpr, GROUP_M: gl.constexpr, STAGES: gl.constexpr,
                         INSTR_N: gl.constexpr, A_IN_REGS: gl.constexpr, num_warps: gl.constexpr):  # fmt: skip
        BLOCK_M: gl.constexpr = x_desc.block_type.shape[0]
        BLOCK_K: gl.constexpr = x_desc.block_type.shape[1]
        BLOCK_N: gl.constexpr = w_desc.block_type.shape[0]
        off_m, off_n = tile_coords(gl.program_id(0), M, N, BLOCK_M, BLOCK_N, GROUP_M)

        a_bufs = gl.allocate_shared_memory(x_desc.dtype, [STAGES, BLOCK_M, BLOCK_K], x_desc.layout)
        b_bufs = gl.allocate_shared_memory(w_desc.dtype, [STAGES, BLOCK_N, BLOCK_K], w_desc.layout)
        bars = gl.allocate_shared_memory(gl.int64, [STAGES, 1], mbarrier.MBarrierLayout())
        for i in gl.static_range(STAGES):
            mbarrier.init(bars.index(i), count=1)
        nbytes: gl.constexpr = x_desc.block_type.nbytes + w_desc.block_type.nbytes
        k_steps = gl.cdiv(K, BLOCK_K)
        for i in gl.static_range(STAGES - 1):  # prologue: the first STAGES - 1 steps in flight
            ok = i < k_steps
            mbarrier.expect(bars.index(i), nbytes, pred=ok)
            tma.async_copy_global_to_shared(x_desc, [off_m, i * BLOCK_K], bars.index(i), a_bufs.index(i), pred=ok)
            tma.async_copy_global_to_shared(w_desc, [off_n, i * BLOCK_K], bars.index(i), b_bufs.index(i), pred=ok)

        mma: gl.constexpr = gl.NVMMADistributedLayout(version=[3, 0], warps_per_cta=[num_warps, 1],
                                                      instr_shape=[16, INSTR_N, 32])  # fmt: skip
        acc = gl.zeros([BLOCK_M, BLOCK_N], gl.int32, layout=mma)
        for k in range(k_steps):
            s = k % STAGES
            mbarrier.wait(bars.index(s), (k // STAGES) & 1)
            if A_IN_REGS:  # x read from shared memory once per step (both 128-wide halves use the registers);
                # registers an MMA reads must not change before it completes, so this variant is synchronous
                a = a_bufs.index(s).load(gl.DotOperandLayout(operand_index=0, parent=mma, k_width=4))
                acc = warpgroup_mma(a, b_bufs.index(s).permute((1, 0)), acc, is_async=True)
                acc = warpgroup_mma_wait(num_outstanding=0, deps=(acc, ))
            else:
                acc = warpgroup_mma(a_bufs.index(s), b_bufs.index(s).permute((1, 0)), acc, is_async=True)
                # step k's MMA stays in flight; step k-1's is done, so its stage can be refilled
                acc = warpgroup_mma_wait(num_outstanding=1, deps=(acc, ))
            nk = k + STAGES - 1
            ns = nk % STAGES
            ok = nk < k_steps
            mbarrier.expect(bars.index(ns), nbytes, pred=ok)
            tma.async_copy_global_to_shared(x_desc, [off_m, nk * BLOCK_K], bars.index(ns), a_bufs.index(ns), pred=ok)
            tma.async_copy_global_to_shared(w_desc, [off_n, nk * BLOCK_K], bars.index(ns), b_bufs.index(ns), pred=ok)
        acc = warpgroup_mma_wait(num_outstanding=0, deps=(acc, ))
        for i in gl.static_range(STAGES):
            mbarrier.invalidate(bars.index(i))

        y, rm, rn = _row_scaled(acc, off_m, off_n, M, N, xs_ptr, ws_ptr, bias_ptr, stride_xsm, stride_wsn, HAS_BIAS,
                                mma)  # fmt: skip
        out = out_ptr + rm[:, None].to(gl.int64) * stride_om + rn[None, :]
        gl.store(out, y.to(out_ptr.dtype.element_ty), mask=(rm < M)[:, None] & (rn < N)[None, :])


    @gluon.jit
    def _load_global(x_desc, w_desc, a_bufs, b_bufs, bars, p, total, k_steps, pid, M, N, NUM_PROGRAMS: gl.constexpr,
                     GROUP_M: gl.constexpr, STAGES: gl.constexpr):  # fmt: skip
        """TMA loads of this program's global step ``p`` (tile ``p // k_steps`` of its tiles, K step ``p % k_steps``)
        into ring stage ``p % STAGES``; nothing past the last step."""
        BLOCK_M: gl.constexpr = x_desc.block_type.shape[0]
        BLOCK_K: gl.constexpr = x_desc.block_type.shape[1]
        BLOCK_N: gl.constexpr = w_desc.block_type.shape[0]
        nbytes: gl.constexpr = x_desc.block_type.nbytes + w_desc.block_type.nbytes
        off_m, off_n = tile_coords(pid + (p // k_steps) * NUM_PROGRAMS, M, N, BLOCK_M, BLOCK_N, GROUP_M)
        k = (p % k_steps) * BLOCK_K
        s = p % STAGES
        ok = p < total
        mbarrier.expect(bars.index(s), nbytes, pred=ok)
        tma.async_copy_global_to_shared(x_desc, [off_m, k], bars.index(s), a_bufs.index(s), pred=ok)
        tma.async_copy_global_to_shared(w_desc, [off_n, k], bars.index(s), b_bufs.index(s), pred=ok)

    @gluon.jit(do_not_specialize=["M"])
    def _int8_row_persistent_kernel(x_desc, w_desc, o_desc, xs_ptr, ws_ptr, bias_ptr, M, N, K, stride_xsm, stride_wsn,
                                    HAS_BIAS: gl.constexpr, GROUP_M: gl.constexpr, STAGES: gl.constexpr,
                                    INSTR_N: gl.constexpr, NUM_PROGRAMS: gl.constexpr, EPI_HALVES: gl.constexpr,
                                    num_warps: gl.constexpr):  # fmt: skip
        """Round 6: one program per SM looping over its tiles; the ring's loads are numbered over (tile, K step)
        so they run ahead across tile boundaries (the next tile's first steps load while this one's epilogue runs);
        async wgmma with one step in flight; the epilogue goes through shared memory and a TMA store (the round-5
        kernel stored straight from the MMA layout, 4-byte stores)."""
        BLOCK_M: gl.constexpr = x_desc.block_type.shape[0]
        BLOCK_N: gl.constexpr = w_desc.block_type.shape[0]
        pid = gl.program_id(0)
        num_tiles = gl.cdiv(M, BLOCK_M) * gl.cdiv(N, BLOCK_N)
        k_steps = gl.cdiv(K, x_desc.block_type.shape[1])
        my_tiles = (num_tiles - pid + NUM_PROGRAMS - 1) // NUM_PROGRAMS
        total = my_tiles * k_steps

        a_bufs = gl.allocate_shared_memory(x_desc.dtype, [STAGES] + x_desc.block_type.shape, x_desc.layout)
        b_bufs = gl.allocate_shared_memory(w_desc.dtype, [STAGES] + w_desc.block_type.shape, w_desc.layout)
        o_smem = gl.allocate_shared_memory(o_desc.dtype, o_desc.block_type.shape, o_desc.layout)
        bars = gl.allocate_shared_memory(gl.int64, [STAGES, 1], mbarrier.MBarrierLayout())
        for i in gl.static_range(STAGES):
            mbarrier.init(bars.index(i), count=1)
        for i in gl.static_range(STAGES - 1):
            _load_global(x_desc, w_desc, a_bufs, b_bufs, bars, i, total, k_steps, pid, M, N, NUM_PROGRAMS, GROUP_M,
                         STAGES)  # fmt: skip

        mma: gl.constexpr = gl.NVMMADistributedLayout(version=[3, 0], warps_per_cta=[num_warps, 1],
                                                      instr_shape=[16, INSTR_N, 32])  # fmt: skip
        acc = gl.zeros([BLOCK_M, BLOCK_N], gl.int32, layout=mma)
        for t in range(my_tiles):  # outer loop: no MMA in flight across its back edge
            for k in range(k_steps):  # one step's MMA in flight across this loop's back edge, as in _int8_row_kernel
                c = t * k_steps + k
                s = c % STAGES
                mbarrier.wait(bars.index(s), (c // STAGES) & 1)
                acc = warpgroup_mma(a_bufs.index(s), b_bufs.index(s).permute((1, 0)), acc, use_acc=k != 0,
                                    is_async=True)  # fmt: skip
                acc = warpgroup_mma_wait(num_outstanding=1, deps=(acc, ))  # step c - 1 done: its stage is free
                _load_global(x_desc, w_desc, a_bufs, b_bufs, bars, c + STAGES - 1, total, k_steps, pid, M, N,
                             NUM_PROGRAMS, GROUP_M, STAGES)  # fmt: skip
            acc = warpgroup_mma_wait(num_outstanding=0, deps=(acc, ))
            off_m, off_n = tile_coords(pid + t * NUM_PROGRAMS, M, N, BLOCK_M, BLOCK_N, GROUP_M)
            y, _, _ = _row_scaled(acc, off_m, off_n, M, N, xs_ptr, ws_ptr, bias_ptr, stride_xsm, stride_wsn, HAS_BIAS,
                                  mma)  # fmt: skip
            y = y.to(o_desc.dtype)
            if EPI_HALVES == 2:  # a 32 KB output buffer (4 stages fit): the tile's two column halves in turn
                y0, y1 = gl.split(gl.permute(gl.reshape(y, [BLOCK_M, 2, BLOCK_N // 2]), [0, 2, 1]))
                tma.store_wait(0)  # the previous store has left o_smem
                o_smem.store(y0)
                fence_async_shared()
                tma.async_copy_shared_to_global(o_desc, [off_m, off_n], o_smem)
                tma.store_wait(0)
                o_smem.store(y1)
                fence_async_shared()
                tma.async_copy_shared_to_global(o_desc, [off_m, off_n + BLOCK_N // 2], o_smem)
            else:
                tma.store_wait(0)  # the previous tile's store has left o_smem
                o_smem.store(y)
                fence_async_shared()
                tma.async_copy_shared_to_global(o_desc, [off_m, off_n], o_smem)
            # the next tile starts with use_acc=False: a fresh value ends this one's live range here, so y and
            # the accumulator are not both live across the epilogue
            acc = gl.zeros([BLOCK_M, BLOCK_N], gl.int32, layout=mma)
        tma.store_wait(0)
        for i in gl.static_range(STAGES):
            mbarrier.invalidate(bars.index(i))


def available(t: torch.Tensor) -> bool:
    """Whether the Gluon kernel can run on ``t`` (a CUDA tensor of a Hopper-or-later GPU, not the interpreter)."""
    return HAS_GLUON and not INTERPRET and t.is_cuda and torch.cuda.get_device_capability(t.device)[0] >= 9


def _setup(xq, x_scale, wq, w_scale, out_dtype, block):
    """(out, TMA descriptors of xq / wq, x_scale [M, 1], w_scale [N, 1]) for the Gluon kernels; the descriptors
    are None when M, N or K is 0 (nothing to launch)."""
    bm, bn, bk = block
    m, k = xq.shape
    n = wq.shape[0]
    out = _quant.empty((m, n), out_dtype, xq.device)
    if not (m and n and k):
        return out, None, None, x_scale, w_scale

    def desc(t, rows):
        return GluonDescriptor(t, list(t.shape), list(t.stride()), [rows, bk],
                               gl.NVMMASharedLayout.get_default_for([rows, bk], gl.int8))  # fmt: skip

    return out, desc(xq, bm), desc(wq, bn), x_scale.reshape(m, -1), w_scale.reshape(n, -1)


def int8_row_mm(xq, x_scale, wq, w_scale, bias=None, out_dtype=torch.bfloat16, block=(128, 256, 128),
                num_warps=8, stages=4, group_m=8, a_in_regs=False) -> torch.Tensor:
    """y [M, N] ``out_dtype`` = (xq @ wq^T) * x_scale * w_scale (+ bias) for int8-row operands (xq [M, K] and wq
    [N, K] int8 with unit column stride and 16-byte aligned rows, x_scale f32 [M, 1], w_scale f32 [N] / [N, 1]),
    by the Gluon kernel. Equals ``gemm.scaled_mm(..., "int8-row")`` bit for bit."""
    bm, bn, _ = block
    out, xd, wd, xs, ws = _setup(xq, x_scale, wq, w_scale, out_dtype, block)
    if xd is None:
        return _empty_product(out, bias)
    m, n, k = xq.shape[0], wq.shape[0], xq.shape[1]
    grid = (triton.cdiv(m, bm) * triton.cdiv(n, bn),)
    instr_n = 128 if bn % 128 == 0 else bn
    _int8_row_kernel[grid](xd, wd, xs, ws, bias, out, m, n, k, out.stride(0), xs.stride(0), ws.stride(0),
                           HAS_BIAS=bias is not None, GROUP_M=group_m, STAGES=stages, INSTR_N=instr_n,
                           A_IN_REGS=a_in_regs, num_warps=num_warps)  # fmt: skip
    return out


def int8_row_mm_persistent(xq, x_scale, wq, w_scale, bias=None, out_dtype=torch.bfloat16, block=(128, 256, 128),
                           num_warps=8, stages=3, group_m=8, epi_halves=1) -> torch.Tensor:  # fmt: skip
    """As ``int8_row_mm`` by the persistent kernel with the TMA-store epilogue (round 6); ``out`` needs 16-byte
    aligned rows (N * 2 bytes a multiple of 16). ``epi_halves=2``: the output tile leaves in two column halves
    through a buffer of half the size (room for a fourth stage)."""
    bm, bn, _ = block
    out, xd, wd, xs, ws = _setup(xq, x_scale, wq, w_scale, out_dtype, block)
    if xd is None:
        return _empty_product(out, bias)
    m, n, k = xq.shape[0], wq.shape[0], xq.shape[1]
    ot = gl.bfloat16 if out_dtype == torch.bfloat16 else gl.float16
    ob = [bm, bn // epi_halves]
    od = GluonDescriptor(out, list(out.shape), list(out.stride()), ob, gl.NVMMASharedLayout.get_default_for(ob, ot))
    programs = min(triton.cdiv(m, bm) * triton.cdiv(n, bn), _num_sms(xq.device))
    _int8_row_persistent_kernel[(programs,)](xd, wd, od, xs, ws, bias, m, n, k, xs.stride(0), ws.stride(0),
                                             HAS_BIAS=bias is not None, GROUP_M=group_m, STAGES=stages,
                                             INSTR_N=128 if bn % 128 == 0 else bn, NUM_PROGRAMS=programs,
                                             EPI_HALVES=epi_halves, num_warps=num_warps)  # fmt: skip
    return out
