"""Issue 3, round 6 probe kernel: the block-scaled GEMM (int8-block / fp8-block) written in Gluon, Hopper only,
with each 128-K block's product kept in flight while the previous block's product is promoted.

Why: the block formats promote every 128-K block's partial product into the fp32 accumulator with the block's
scales. Triton 3.6 makes a dot asynchronous only when its accumulator is carried into the next dot (rule 2.1 of
``dotCanBeProperlyAsync``), and a block's partial is a fresh product each step, so the shipped kernel waits for
every block's wgmma before it promotes it: MMA and promotion alternate inside a program and overlap only across
the programs on an SM (bench/NOTES.md, rounds 1, 3 and 5). The GEMM alone reaches 1.23-1.27x bf16 against the
row formats' 1.67-1.76x.

Three K loops (``pair``), all keeping the previous block's promotion beside the next block's wgmma:
- 0: one product in flight at a time: step k's wgmma is issued, step k-1's complete product is promoted while
  it runs, then step k is waited for and its stage refilled;
- 1 (default): two in flight: step k is issued, step k-1 promoted, step k+1 issued behind k, k waited for and
  promoted while k+1 runs, k+1 waited for; nothing in flight across the loop's back edge;
- 2: one product always in flight, across the back edge too (issue k, wait for k-1, promote k-1).
Same operands, scales and promotion expression as ``gemm._block_scaled_step``; K is a multiple of 128 (the block
formats require it), BLOCK_N is 128 (one weight scale per tile and K block).

What ptxas does with these (``ptxas -v`` of triton 3.6's, sm_90a, compiled on the CPU machine): it serializes every
wgmma of the kernel (warning C7514, ``WARPGROUP.DEPBAR.LE gsb0, 0x0`` after each) when a loop carries a wgmma in
flight across its back edge and reads a completed product under a partial wait (loop 2), and when a no-op
``warpgroup_mma_wait`` is used to order LLVM's code; ordering through a volatile ``mov`` (``_pin``) is accepted.
Loops 0 and 1 compile to overlapped SASS (``DEPBAR.LE gsb0, 0x1`` in the loop), but ptxas still sinks part of the
promotion below the wait that follows it (its scheduler does not see the MMA's latency).

Outcome on the H200 (``bench/gemm_probe.py --part gblock``, NOTES "GEMM round 6"): bit-identical to the Triton
kernel at every shape checked (odd M, 1-24 K steps), and slower: GEMM alone, geomean of 6 shapes with M >= 4096,
int8-block 1.20x bf16 (loop 1, 4 stages) vs Triton's 1.26x, fp8-block 1.26x vs 1.30x; loop 0 1.13x / 1.19x.
Not adopted.

Runs only on a CUDA GPU (Gluon has no interpreter).
"""

from __future__ import annotations

import torch
import triton

try:  # triton >= 3.5
    from triton.experimental import gluon
    from triton.experimental.gluon import language as gl
    from triton.experimental.gluon.language.nvidia.hopper import mbarrier, tma, warpgroup_mma, warpgroup_mma_wait
    from triton.experimental.gluon.nvidia.hopper import TensorDescriptor as GluonDescriptor

    HAS_GLUON = True
except ImportError:  # pragma: no cover
    HAS_GLUON = False

from ditq import formats as F
from ditq.kernels import INTERPRET
from ditq.kernels import quant as _quant
from ditq.kernels.gemm import _tile_coords as tile_coords  # scalar arithmetic: callable from Gluon too

if HAS_GLUON:

    @gluon.jit
    def _load_step(x_desc, w_desc, a_bufs, b_bufs, bars, step, k_steps, off_m, off_n, STAGES: gl.constexpr):
        """TMA loads of K step ``step`` into its ring stage (nothing past the last step)."""
        BLOCK_K: gl.constexpr = x_desc.block_type.shape[1]
        nbytes: gl.constexpr = x_desc.block_type.nbytes + w_desc.block_type.nbytes
        s = step % STAGES
        ok = step < k_steps
        mbarrier.expect(bars.index(s), nbytes, pred=ok)
        tma.async_copy_global_to_shared(x_desc, [off_m, step * BLOCK_K], bars.index(s), a_bufs.index(s), pred=ok)
        tma.async_copy_global_to_shared(w_desc, [off_n, step * BLOCK_K], bars.index(s), b_bufs.index(s), pred=ok)

    @gluon.jit
    def _issue(a_bufs, b_bufs, bars, step, p, STAGES: gl.constexpr):
        """Wait for step ``step``'s tiles and start its product into ``p``'s registers (old values ignored)."""
        s = step % STAGES
        mbarrier.wait(bars.index(s), (step // STAGES) & 1)
        return warpgroup_mma(a_bufs.index(s), b_bufs.index(s).permute((1, 0)), p, use_acc=False, is_async=True)

    @gluon.jit
    def _promote(acc, p, xs_row, ws_ptr, kb, stride_xsk, stride_wsk, IS_INT: gl.constexpr):
        s = gl.load(xs_row + kb * stride_xsk) * gl.load(ws_ptr + kb * stride_wsk)
        if IS_INT:
            return acc + p.to(gl.float32) * s[:, None]
        else:
            return acc + p * s[:, None]

    @gluon.jit
    def _pin(t):
        """``t`` itself, through a volatile asm: code that uses the result stays after the asm issued before it
        (a no-op wgmma wait would do the same for LLVM, but makes ptxas serialize every wgmma)."""
        return gl.inline_asm_elementwise("mov.b32 $0, $1;", "=r,r", [t], dtype=t.dtype, is_pure=False, pack=1)

    @gluon.jit
    def _overlap(acc, p, prev, a_bufs, b_bufs, bars, x_desc, w_desc, xs_row, ws_row, step, k_steps, off_m, off_n,
                 stride_xsk, stride_wsk, IS_INT: gl.constexpr, STAGES: gl.constexpr):  # fmt: skip
        """Start step ``step``'s product into ``p``, promote ``prev`` (step - 1, complete) while it runs, wait for
        it and refill its stage. The no-op wait on ``acc`` and ``_pin(prev)`` pin the order for LLVM: the last
        promotion before this issue (no second register set for ``p``), this one after it (the overlap)."""
        acc = warpgroup_mma_wait(num_outstanding=1, deps=(acc, ))
        p = _issue(a_bufs, b_bufs, bars, step, p, STAGES)
        prev = _pin(prev)
        acc = _promote(acc, prev, xs_row, ws_row, step - 1, stride_xsk, stride_wsk, IS_INT)
        p = warpgroup_mma_wait(num_outstanding=0, deps=(p, ))
        _load_step(x_desc, w_desc, a_bufs, b_bufs, bars, step + STAGES, k_steps, off_m, off_n, STAGES)
        return acc, p

    @gluon.jit
    def _pair1(acc, pa, pb, a_bufs, b_bufs, bars, x_desc, w_desc, xs_row, ws_row, k, k_steps, off_m, off_n,
               stride_xsk, stride_wsk, IS_INT: gl.constexpr, STAGES: gl.constexpr):  # fmt: skip
        """Steps k and k + 1, one product in flight at a time, each overlapping the previous one's promotion."""
        acc, pa = _overlap(acc, pa, pb, a_bufs, b_bufs, bars, x_desc, w_desc, xs_row, ws_row, k, k_steps,
                           off_m, off_n, stride_xsk, stride_wsk, IS_INT, STAGES)  # fmt: skip
        acc, pb = _overlap(acc, pb, pa, a_bufs, b_bufs, bars, x_desc, w_desc, xs_row, ws_row, k + 1, k_steps,
                           off_m, off_n, stride_xsk, stride_wsk, IS_INT, STAGES)  # fmt: skip
        return acc, pa, pb

    @gluon.jit
    def _pair(acc, pa, pb, a_bufs, b_bufs, bars, x_desc, w_desc, xs_row, ws_row, k, k_steps, off_m, off_n,
              stride_xsk, stride_wsk, IS_INT: gl.constexpr, STAGES: gl.constexpr):  # fmt: skip
        """Steps k and k + 1 with two products in flight: start k into ``pa``, promote ``pb`` (step k - 1,
        complete), start k + 1 into ``pb`` (queued behind k on the tensor cores), wait for k and promote it
        while k + 1 runs, then wait for k + 1 (complete, not promoted, on return: nothing in flight across
        the loop's back edge)."""
        acc = _pin(acc)
        pa = _issue(a_bufs, b_bufs, bars, k, pa, STAGES)
        acc = _promote(acc, _pin(pb), xs_row, ws_row, k - 1, stride_xsk, stride_wsk, IS_INT)
        acc = _pin(acc)
        pb = _issue(a_bufs, b_bufs, bars, k + 1, pb, STAGES)
        pa = warpgroup_mma_wait(num_outstanding=1, deps=(pa, ))
        _load_step(x_desc, w_desc, a_bufs, b_bufs, bars, k + STAGES, k_steps, off_m, off_n, STAGES)
        acc = _promote(acc, pa, xs_row, ws_row, k, stride_xsk, stride_wsk, IS_INT)
        pb = warpgroup_mma_wait(num_outstanding=0, deps=(pb, ))
        _load_step(x_desc, w_desc, a_bufs, b_bufs, bars, k + 1 + STAGES, k_steps, off_m, off_n, STAGES)
        return acc, pa, pb

    @gluon.jit
    def _settled(acc, pa, a_bufs, b_bufs, bars, x_desc, w_desc, xs_row, ws_row, k_steps, off_m, off_n, stride_xsk,
                 stride_wsk, IS_INT: gl.constexpr, STAGES: gl.constexpr, PAIR: gl.constexpr):  # fmt: skip
        """The K loop with no product in flight across its back edge."""
        pb = warpgroup_mma_wait(num_outstanding=0, deps=(_issue(a_bufs, b_bufs, bars, 0, pa, STAGES), ))
        _load_step(x_desc, w_desc, a_bufs, b_bufs, bars, STAGES, k_steps, off_m, off_n, STAGES)
        # invariant at the top: pb holds step k - 1's product, complete and not yet promoted; no MMA in flight
        # across the back edge (ptxas serializes every wgmma of a kernel whose loop carries one in flight and
        # reads a completed product under a partial wait)
        for k in range(1, k_steps - 1, 2):
            if PAIR:
                acc, pa, pb = _pair(acc, pa, pb, a_bufs, b_bufs, bars, x_desc, w_desc, xs_row, ws_row, k, k_steps,
                                    off_m, off_n, stride_xsk, stride_wsk, IS_INT, STAGES)  # fmt: skip
            else:
                acc, pa, pb = _pair1(acc, pa, pb, a_bufs, b_bufs, bars, x_desc, w_desc, xs_row, ws_row, k, k_steps,
                                     off_m, off_n, stride_xsk, stride_wsk, IS_INT, STAGES)  # fmt: skip
        if k_steps % 2 == 0:  # steps k_steps - 2 (in pb) and k_steps - 1 left
            acc, pa = _overlap(acc, pa, pb, a_bufs, b_bufs, bars, x_desc, w_desc, xs_row, ws_row, k_steps - 1,
                               k_steps, off_m, off_n, stride_xsk, stride_wsk, IS_INT, STAGES)  # fmt: skip
            acc = _promote(acc, pa, xs_row, ws_row, k_steps - 1, stride_xsk, stride_wsk, IS_INT)
        else:
            acc = _promote(acc, pb, xs_row, ws_row, k_steps - 1, stride_xsk, stride_wsk, IS_INT)
        return acc

    @gluon.jit
    def _carry_step(acc, p, prev, a_bufs, b_bufs, bars, x_desc, w_desc, xs_row, ws_row, step, k_steps, off_m, off_n,
                    stride_xsk, stride_wsk, IS_INT: gl.constexpr, STAGES: gl.constexpr):  # fmt: skip
        """Start step ``step`` into ``p`` while ``prev`` (step - 1) is in flight, wait for ``prev``, refill its
        stage and promote it; ``p`` stays in flight on return."""
        acc = _pin(acc)
        p = _issue(a_bufs, b_bufs, bars, step, p, STAGES)
        prev = warpgroup_mma_wait(num_outstanding=1, deps=(prev, ))
        _load_step(x_desc, w_desc, a_bufs, b_bufs, bars, step - 1 + STAGES, k_steps, off_m, off_n, STAGES)
        acc = _promote(acc, prev, xs_row, ws_row, step - 1, stride_xsk, stride_wsk, IS_INT)
        return acc, p, prev

    @gluon.jit
    def _carried(acc, pa, a_bufs, b_bufs, bars, x_desc, w_desc, xs_row, ws_row, k_steps, off_m, off_n, stride_xsk,
                 stride_wsk, IS_INT: gl.constexpr, STAGES: gl.constexpr):  # fmt: skip
        """The K loop with one product always in flight (across the back edge too): step k is issued before
        step k - 1 is waited for and promoted."""
        pb = pa
        pa = _issue(a_bufs, b_bufs, bars, 0, pa, STAGES)
        for k in range(1, k_steps - 1, 2):  # top: step k - 1 in flight in pa
            acc, pb, pa = _carry_step(acc, pb, pa, a_bufs, b_bufs, bars, x_desc, w_desc, xs_row, ws_row, k, k_steps,
                                      off_m, off_n, stride_xsk, stride_wsk, IS_INT, STAGES)  # fmt: skip
            acc, pa, pb = _carry_step(acc, pa, pb, a_bufs, b_bufs, bars, x_desc, w_desc, xs_row, ws_row, k + 1,
                                      k_steps, off_m, off_n, stride_xsk, stride_wsk, IS_INT, STAGES)  # fmt: skip
        pa = warpgroup_mma_wait(num_outstanding=0, deps=(pa, ))
        acc = _promote(acc, pa, xs_row, ws_row, k_steps - 2 + k_steps % 2, stride_xsk, stride_wsk, IS_INT)
        if k_steps % 2 == 0:
            pb = warpgroup_mma_wait(num_outstanding=0, deps=(_issue(a_bufs, b_bufs, bars, k_steps - 1, pb, STAGES), ))
            acc = _promote(acc, pb, xs_row, ws_row, k_steps - 1, stride_xsk, stride_wsk, IS_INT)
        return acc

    @gluon.jit(do_not_specialize=["M"])
    def _block_kernel(x_desc, w_desc, xs_ptr, ws_ptr, bias_ptr, out_ptr, M, N, K, stride_om, stride_xsm, stride_xsk,
                      stride_wsn, stride_wsk, IS_INT: gl.constexpr, HAS_BIAS: gl.constexpr, GROUP_M: gl.constexpr,
                      STAGES: gl.constexpr, PAIR: gl.constexpr, num_warps: gl.constexpr):  # fmt: skip
        BLOCK_M: gl.constexpr = x_desc.block_type.shape[0]
        BLOCK_N: gl.constexpr = w_desc.block_type.shape[0]
        off_m, off_n = tile_coords(gl.program_id(0), M, N, BLOCK_M, BLOCK_N, GROUP_M)

        a_bufs = gl.allocate_shared_memory(x_desc.dtype, [STAGES, BLOCK_M, 128], x_desc.layout)
        b_bufs = gl.allocate_shared_memory(w_desc.dtype, [STAGES, BLOCK_N, 128], w_desc.layout)
        bars = gl.allocate_shared_memory(gl.int64, [STAGES, 1], mbarrier.MBarrierLayout())
        for i in gl.static_range(STAGES):
            mbarrier.init(bars.index(i), count=1)
        k_steps = K // 128
        for i in gl.static_range(STAGES):  # every stage starts empty
            _load_step(x_desc, w_desc, a_bufs, b_bufs, bars, i, k_steps, off_m, off_n, STAGES)

        mma: gl.constexpr = gl.NVMMADistributedLayout(version=[3, 0], warps_per_cta=[num_warps, 1],
                                                      instr_shape=[16, BLOCK_N, 32])  # fmt: skip
        p_ty: gl.constexpr = gl.int32 if IS_INT else gl.float32
        rm = off_m + gl.arange(0, BLOCK_M, layout=gl.SliceLayout(1, mma))
        xs_row = xs_ptr + (rm % M).to(gl.int64) * stride_xsm
        ws_row = ws_ptr + (off_n // 128) * stride_wsn
        acc = gl.zeros([BLOCK_M, BLOCK_N], gl.float32, layout=mma)
        pa = gl.zeros([BLOCK_M, BLOCK_N], p_ty, layout=mma)
        if PAIR == 2:
            acc = _carried(acc, pa, a_bufs, b_bufs, bars, x_desc, w_desc, xs_row, ws_row, k_steps, off_m, off_n,
                           stride_xsk, stride_wsk, IS_INT, STAGES)  # fmt: skip
        else:
            acc = _settled(acc, pa, a_bufs, b_bufs, bars, x_desc, w_desc, xs_row, ws_row, k_steps, off_m, off_n,
                           stride_xsk, stride_wsk, IS_INT, STAGES, PAIR)  # fmt: skip
        for i in gl.static_range(STAGES):
            mbarrier.invalidate(bars.index(i))

        rn = off_n + gl.arange(0, BLOCK_N, layout=gl.SliceLayout(0, mma))
        if HAS_BIAS:
            acc += gl.load(bias_ptr + rn, mask=rn < N, other=0.0).to(gl.float32)[None, :]
        out = out_ptr + rm[:, None].to(gl.int64) * stride_om + rn[None, :]
        gl.store(out, acc.to(out_ptr.dtype.element_ty), mask=(rm < M)[:, None] & (rn < N)[None, :])


def available(t: torch.Tensor) -> bool:
    """Whether the Gluon kernel can run on ``t`` (a CUDA tensor of a Hopper GPU, not the interpreter)."""
    return HAS_GLUON and not INTERPRET and t.is_cuda and torch.cuda.get_device_capability(t.device)[0] == 9


def block_mm(xq, x_scale, wq, w_scale, fmt, bias=None, out_dtype=torch.bfloat16, block=(128, 128), num_warps=8,
             stages=4, group_m=8, pair=True) -> torch.Tensor:  # fmt: skip
    """y [M, N] ``out_dtype`` = sum over 128-K blocks kb of (xq[:, kb] @ wq[:, kb]^T) * x_scale[:, kb] *
    w_scale[n // 128, kb] (+ bias) for int8-block / fp8-block operands (as ``gemm.scaled_mm``)."""
    fmt = F.get_format(fmt)
    bm, bn = block
    m, k = xq.shape
    n = wq.shape[0]
    out = _quant.empty((m, n), out_dtype, xq.device)
    if not (m and n and k):
        from ditq.kernels.gemm import _empty_product

        return _empty_product(out, bias)
    dt = gl.int8 if fmt.is_int else gl.float8e4nv
    xd = GluonDescriptor(xq, list(xq.shape), list(xq.stride()), [bm, 128], gl.NVMMASharedLayout.get_default_for([bm, 128], dt))
    wd = GluonDescriptor(wq, list(wq.shape), list(wq.stride()), [bn, 128], gl.NVMMASharedLayout.get_default_for([bn, 128], dt))
    grid = (triton.cdiv(m, bm) * triton.cdiv(n, bn),)
    _block_kernel[grid](xd, wd, x_scale, w_scale, bias, out, m, n, k, out.stride(0), x_scale.stride(0),
                        x_scale.stride(1), w_scale.stride(0), w_scale.stride(1), IS_INT=fmt.is_int,
                        HAS_BIAS=bias is not None, GROUP_M=group_m, STAGES=stages, PAIR=int(pair),
                        num_warps=num_warps)  # fmt: skip
    return out
