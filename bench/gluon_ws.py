"""Issue 3, round 7 probe kernel: the block-scaled GEMM (int8-block / fp8-block) warp-specialized in Gluon, Hopper
only: one producer warp issues the TMA loads, two consumer warp groups run the tensor-core products and the
promotions, each at its own pace.

Why: every 128-K block's partial product must be complete before it is promoted into the fp32 accumulator
(x_scale * w_scale per block). In the shipped Triton kernel (and round 6's Gluon kernels) all warps of a
program run one instruction stream: they wait for the same wgmma, promote at the same time and meet at the same
barriers, so the tensor cores idle while the program promotes; only other programs on the SM fill that gap
(NOTES rounds 1-6: GEMM alone 1.22-1.27x bf16 against the row formats' 1.65-1.74x). Here the two consumer warp
groups are separate partitions that meet only at mbarriers: a stage is released when both have read it, and
neither waits for the other otherwise, so one group's promotion runs while the other's wgmma occupies the tensor
cores (the schedule that makes DeepGEMM's block-scaled fp8 kernels fast). The kernel is persistent (one program
per SM, tiles in grouped order), so the producer loads the next tile while the consumers finish this one.

Tile BLOCK_M x BLOCK_N = 128 x 128: each consumer owns 64 rows (its accumulator: 64 fp32 + 64 int32/fp32 product
registers per thread). Within a group every step is: wait for the stage, wgmma (fresh product), load the next
step's scales, wait for the product, release the stage, promote. Same operands, scales and promotion expression
as ``gemm._block_scaled_step``, so the result should equal the shipped kernel bit for bit. K is a multiple of 128
(the block formats require it).

Runs only on a CUDA GPU (Gluon has no interpreter).
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

from ditq import formats as F
from ditq.kernels import INTERPRET
from ditq.kernels import quant as _quant
from ditq.kernels.gemm import _empty_product, _num_sms
from ditq.kernels.gemm import _tile_coords as tile_coords  # scalar arithmetic: callable from Gluon too

if HAS_GLUON:

    @gluon.jit
    def _ws_load(x_desc, w_desc, a_bufs, b_bufs, ready, empty, M, N, K, GROUP_M: gl.constexpr):
        """Producer (one warp): every (tile, K step) of this program into the ring, a stage once both consumers
        released it (fresh barriers count as released: the first wait is for parity 1)."""
        BLOCK_M: gl.constexpr = x_desc.block_type.shape[0]
        BLOCK_N: gl.constexpr = w_desc.block_type.shape[0]
        STAGES: gl.constexpr = a_bufs.shape[0]
        nbytes: gl.constexpr = x_desc.block_type.nbytes + w_desc.block_type.nbytes
        tiles = gl.cdiv(M, BLOCK_M) * gl.cdiv(N, BLOCK_N)
        k_steps = K // 128
        i = 0
        for tile in range(gl.program_id(0), tiles, gl.num_programs(0)):
            off_m, off_n = tile_coords(tile, M, N, BLOCK_M, BLOCK_N, GROUP_M)
            for k in range(k_steps):
                s = i % STAGES
                mbarrier.wait(empty.index(s), ((i // STAGES) & 1) ^ 1)
                mbarrier.expect(ready.index(s), nbytes)
                tma.async_copy_global_to_shared(x_desc, [off_m, k * 128], ready.index(s), a_bufs.index(s))
                tma.async_copy_global_to_shared(w_desc, [off_n, k * 128], ready.index(s), b_bufs.index(s))
                i += 1

    @gluon.jit
    def _ws_product(a_bufs, b_bufs, s, p, WG: gl.constexpr, H: gl.constexpr):
        """The 64 x 128 partial product of warp group WG's rows and the H-th 128 columns of stage s (fresh)."""
        p = warpgroup_mma(a_bufs.index(s).slice(WG * 64, 64), b_bufs.index(s).slice(H * 128, 128).permute((1, 0)), p,
                          use_acc=False, is_async=True)  # fmt: skip
        return warpgroup_mma_wait(num_outstanding=0, deps=(p, ))

    @gluon.jit
    def _pin(t):
        """``t`` itself, through a volatile asm: LLVM keeps it (and so the code computing ``t``) before the next
        volatile op, here the next wgmma, which then reuses the product's registers instead of a second set."""
        return gl.inline_asm_elementwise("mov.b32 $0, $1;", "=r,r", [t], dtype=t.dtype, is_pure=False, pack=1)

    @gluon.jit
    def _ws_promote(acc, p, sc, IS_INT: gl.constexpr):
        if IS_INT:
            return _pin(acc + p.to(gl.float32) * sc[:, None])
        else:
            return _pin(acc + p * sc[:, None])

    @gluon.jit
    def _ws_store(acc, o_desc, o_smem, off_m, off_n, N, bias_ptr, HAS_BIAS: gl.constexpr, mma: gl.constexpr):
        """acc (+ bias) into out[off_m:+64, off_n:+128] through shared memory and a TMA store (TMA clips rows and
        columns past the end); waits for the previous store from ``o_smem`` first."""
        if HAS_BIAS:
            rn = off_n + gl.arange(0, acc.shape[1], layout=gl.SliceLayout(0, mma))
            acc += gl.load(bias_ptr + rn, mask=rn < N, other=0.0).to(gl.float32)[None, :]
        tma.store_wait(0)
        o_smem.store(acc.to(o_desc.dtype))
        fence_async_shared()
        tma.async_copy_shared_to_global(o_desc, [off_m, off_n], o_smem)

    @gluon.jit
    def _ws_math(a_bufs, b_bufs, ready, empty, xs_ptr, ws_ptr, bias_ptr, o_desc, o_bufs, M, N, K, stride_xsm,
                 stride_xsk, stride_wsn, stride_wsk, WG: gl.constexpr, IS_INT: gl.constexpr, HAS_BIAS: gl.constexpr,
                 GROUP_M: gl.constexpr):  # fmt: skip
        """Consumer warp group ``WG`` (4 warps): rows [64 WG, 64 WG + 64) of every tile of this program. A 256-wide
        tile runs as two 128-wide products per step (one weight scale each), one after the other into the same
        product registers (two accumulators of 64 x 128 fp32 + one product: ~200 registers)."""
        BLOCK_M: gl.constexpr = a_bufs.shape[1]
        BLOCK_N: gl.constexpr = b_bufs.shape[1]
        STAGES: gl.constexpr = a_bufs.shape[0]
        mma: gl.constexpr = gl.NVMMADistributedLayout(version=[3, 0], warps_per_cta=[4, 1],
                                                      instr_shape=[16, 128, 32])  # fmt: skip
        p_ty: gl.constexpr = gl.int32 if IS_INT else gl.float32
        tiles = gl.cdiv(M, BLOCK_M) * gl.cdiv(N, BLOCK_N)
        k_steps = K // 128
        last_nb = gl.cdiv(N, 128) - 1
        OUT_BUFS: gl.constexpr = o_bufs.shape[0] // 2  # per warp group: 1, or 2 (one per 128-wide half)
        i = 0
        for tile in range(gl.program_id(0), tiles, gl.num_programs(0)):
            off_m, off_n = tile_coords(tile, M, N, BLOCK_M, BLOCK_N, GROUP_M)
            p = gl.zeros([64, 128], p_ty, layout=mma)  # fresh per tile: not live across the epilogue
            rm = off_m + WG * 64 + gl.arange(0, 64, layout=gl.SliceLayout(1, mma))
            xs_row = xs_ptr + (rm % M).to(gl.int64) * stride_xsm
            ws0 = ws_ptr + (off_n // 128) * stride_wsn
            ws1 = ws_ptr + gl.minimum(off_n // 128 + 1, last_nb) * stride_wsn  # a 256-wide tile's second half
            xs = gl.load(xs_row)
            w0 = gl.load(ws0)
            w1 = gl.load(ws1)
            acc0 = gl.zeros([64, 128], gl.float32, layout=mma)
            acc1 = gl.zeros([64, 128], gl.float32, layout=mma)
            for k in range(k_steps):
                s = i % STAGES
                mbarrier.wait(ready.index(s), (i // STAGES) & 1)
                kn = gl.minimum(k + 1, k_steps - 1)  # the next step's scales load while the products run
                xs_next = gl.load(xs_row + kn * stride_xsk)
                w0_next = gl.load(ws0 + kn * stride_wsk)
                if BLOCK_N == 256:
                    w1_next = gl.load(ws1 + kn * stride_wsk)
                    p = _ws_product(a_bufs, b_bufs, s, p, WG, 0)
                    acc0 = _ws_promote(acc0, p, xs * w0, IS_INT)
                    p = _ws_product(a_bufs, b_bufs, s, p, WG, 1)
                    mbarrier.arrive(empty.index(s), count=1)
                    acc1 = _ws_promote(acc1, p, xs * w1, IS_INT)
                    w1 = w1_next
                else:
                    p = _ws_product(a_bufs, b_bufs, s, p, WG, 0)
                    mbarrier.arrive(empty.index(s), count=1)
                    acc0 = _ws_promote(acc0, p, xs * w0, IS_INT)
                xs = xs_next
                w0 = w0_next
                i += 1
            _ws_store(acc0, o_desc, o_bufs.index(WG * OUT_BUFS), off_m + WG * 64, off_n, N, bias_ptr, HAS_BIAS, mma)
            if BLOCK_N == 256:
                _ws_store(acc1, o_desc, o_bufs.index(WG * OUT_BUFS + OUT_BUFS - 1), off_m + WG * 64, off_n + 128, N,
                          bias_ptr, HAS_BIAS, mma)  # fmt: skip
        tma.store_wait(0)

    @gluon.jit
    def _ws_math0(a_bufs, b_bufs, ready, empty, xs_ptr, ws_ptr, bias_ptr, o_desc, o_bufs, M, N, K, stride_xsm,
                  stride_xsk, stride_wsn, stride_wsk, IS_INT: gl.constexpr, HAS_BIAS: gl.constexpr,
                  GROUP_M: gl.constexpr):  # fmt: skip
        _ws_math(a_bufs, b_bufs, ready, empty, xs_ptr, ws_ptr, bias_ptr, o_desc, o_bufs, M, N, K, stride_xsm,
                 stride_xsk, stride_wsn, stride_wsk, 0, IS_INT, HAS_BIAS, GROUP_M)  # fmt: skip

    @gluon.jit
    def _ws_math1(a_bufs, b_bufs, ready, empty, xs_ptr, ws_ptr, bias_ptr, o_desc, o_bufs, M, N, K, stride_xsm,
                  stride_xsk, stride_wsn, stride_wsk, IS_INT: gl.constexpr, HAS_BIAS: gl.constexpr,
                  GROUP_M: gl.constexpr):  # fmt: skip
        _ws_math(a_bufs, b_bufs, ready, empty, xs_ptr, ws_ptr, bias_ptr, o_desc, o_bufs, M, N, K, stride_xsm,
                 stride_xsk, stride_wsn, stride_wsk, 1, IS_INT, HAS_BIAS, GROUP_M)  # fmt: skip

    @gluon.jit(do_not_specialize=["M"])
    def _block_ws_kernel(x_desc, w_desc, o_desc, xs_ptr, ws_ptr, bias_ptr, M, N, K, stride_xsm, stride_xsk, stride_wsn,
                         stride_wsk, IS_INT: gl.constexpr, HAS_BIAS: gl.constexpr, GROUP_M: gl.constexpr,
                         STAGES: gl.constexpr, OUT_BUFS: gl.constexpr, MATH_REGS: gl.constexpr,
                         num_warps: gl.constexpr):  # fmt: skip
        BLOCK_M: gl.constexpr = x_desc.block_type.shape[0]
        BLOCK_N: gl.constexpr = w_desc.block_type.shape[0]
        a_bufs = gl.allocate_shared_memory(x_desc.dtype, [STAGES, BLOCK_M, 128], x_desc.layout)
        b_bufs = gl.allocate_shared_memory(w_desc.dtype, [STAGES, BLOCK_N, 128], w_desc.layout)
        o_bufs = gl.allocate_shared_memory(o_desc.dtype, [2 * OUT_BUFS] + o_desc.block_type.shape, o_desc.layout)
        ready = gl.allocate_shared_memory(gl.int64, [STAGES, 1], mbarrier.MBarrierLayout())
        empty = gl.allocate_shared_memory(gl.int64, [STAGES, 1], mbarrier.MBarrierLayout())
        for i in gl.static_range(STAGES):
            mbarrier.init(ready.index(i), count=1)
            mbarrier.init(empty.index(i), count=2)  # one arrival per consumer warp group
        # the argument tuples are written out in the call: a tuple assigned to a name first loses its constexprs
        gl.warp_specialize([
            (_ws_math0, (a_bufs, b_bufs, ready, empty, xs_ptr, ws_ptr, bias_ptr, o_desc, o_bufs, M, N, K, stride_xsm,
                         stride_xsk, stride_wsn, stride_wsk, IS_INT, HAS_BIAS, GROUP_M)),
            (_ws_math1, (a_bufs, b_bufs, ready, empty, xs_ptr, ws_ptr, bias_ptr, o_desc, o_bufs, M, N, K, stride_xsm,
                         stride_xsk, stride_wsn, stride_wsk, IS_INT, HAS_BIAS, GROUP_M)),
            (_ws_load, (x_desc, w_desc, a_bufs, b_bufs, ready, empty, M, N, K, GROUP_M))],
                           [4, 1], [MATH_REGS, 24])  # fmt: skip


def available(t: torch.Tensor) -> bool:
    """Whether the Gluon kernel can run on ``t`` (a CUDA tensor of a Hopper GPU, not the interpreter)."""
    return HAS_GLUON and not INTERPRET and t.is_cuda and torch.cuda.get_device_capability(t.device)[0] == 9


def descriptors(xq, wq, fmt, block):
    dt = gl.int8 if F.get_format(fmt).is_int else gl.float8e4nv
    bm, bn = block
    xd = GluonDescriptor(xq, list(xq.shape), list(xq.stride()), [bm, 128],
                         gl.NVMMASharedLayout.get_default_for([bm, 128], dt))  # fmt: skip
    wd = GluonDescriptor(wq, list(wq.shape), list(wq.stride()), [bn, 128],
                         gl.NVMMASharedLayout.get_default_for([bn, 128], dt))  # fmt: skip
    return xd, wd


def ws_block_mm(xq, x_scale, wq, w_scale, fmt, bias=None, out_dtype=torch.bfloat16, block_n=128, stages=4, out_bufs=1,
                group_m=8, math_regs=232, maxnreg=168, programs=None) -> torch.Tensor:  # fmt: skip
    """y [M, N] ``out_dtype`` = sum over 128-K blocks kb of (xq[:, kb] @ wq[:, kb]^T) * x_scale[:, kb] *
    w_scale[n // 128, kb] (+ bias) for int8-block / fp8-block operands (as ``gemm.scaled_mm``). ``out_bufs``: output
    buffers of 64 x 128 per consumer warp group (2: the two halves of a 256-wide tile leave without waiting)."""
    fmt = F.get_format(fmt)
    m, k = xq.shape
    n = wq.shape[0]
    out = _quant.empty((m, n), out_dtype, xq.device)
    if not (m and n and k):
        return _empty_product(out, bias)
    xd, wd = descriptors(xq, wq, fmt, (128, block_n))
    odt = {torch.bfloat16: gl.bfloat16, torch.float16: gl.float16, torch.float32: gl.float32}[out_dtype]
    od = GluonDescriptor(out, [m, n], list(out.stride()), [64, 128], gl.NVMMASharedLayout.get_default_for([64, 128], odt))
    tiles = triton.cdiv(m, 128) * triton.cdiv(n, block_n)
    grid = (min(tiles, programs or _num_sms(xq.device)),)
    _block_ws_kernel[grid](xd, wd, od, x_scale, w_scale, bias, m, n, k, x_scale.stride(0), x_scale.stride(1),
                           w_scale.stride(0), w_scale.stride(1), IS_INT=fmt.is_int, HAS_BIAS=bias is not None,
                           GROUP_M=group_m, STAGES=stages, OUT_BUFS=out_bufs, MATH_REGS=math_regs, num_warps=4,
                           maxnreg=maxnreg)  # fmt: skip
    return out
