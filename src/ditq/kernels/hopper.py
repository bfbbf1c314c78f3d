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

import torch
import triton

from . import INTERPRET
from . import quant as _quant
from .gemm import _num_sms, _tma_ok
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


if HAS_GLUON:

    @gluon.jit
    def _load_partition(x_desc, w_desc, a_bufs, b_bufs, ready, empty, M, N, K, GROUP_M: gl.constexpr):
        """Producer (one warp): every (tile, K step) of this program into the ring; a stage once both consumers
        released it (a fresh barrier counts as released: the first wait is for parity 1)."""
        BM: gl.constexpr = x_desc.block_type.shape[0]
        BN: gl.constexpr = w_desc.block_type.shape[0]
        STAGES: gl.constexpr = a_bufs.shape[0]
        nbytes: gl.constexpr = x_desc.block_type.nbytes + w_desc.block_type.nbytes
        tiles = gl.cdiv(M, BM) * gl.cdiv(N, BN)
        k_steps = gl.cdiv(K, 128)  # TMA zero-fills a row format's K tail
        i = 0
        for tile in range(gl.program_id(0), tiles, gl.num_programs(0)):
            off_m, off_n = tile_coords(tile, M, N, BM, BN, GROUP_M)
            for k in range(k_steps):
                s = i % STAGES
                mbarrier.wait(empty.index(s), ((i // STAGES) & 1) ^ 1)
                mbarrier.expect(ready.index(s), nbytes)
                tma.async_copy_global_to_shared(x_desc, [off_m, k * 128], ready.index(s), a_bufs.index(s))
                tma.async_copy_global_to_shared(w_desc, [off_n, k * 128], ready.index(s), b_bufs.index(s))
                i += 1

    @gluon.jit
    def _pin(t):
        """``t`` itself, through a volatile asm: LLVM keeps the code computing ``t`` before the next volatile op
        (the next wgmma), which then reuses the product's registers instead of taking a second set (spills)."""
        return gl.inline_asm_elementwise("mov.b32 $0, $1;", "=r,r", [t], dtype=t.dtype, is_pure=False, pack=1)

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
    def _row_half(a, o_desc, o_smem, off_m, off_n, M, N, xs_ptr, ws_ptr, bias_ptr, stride_xsm, stride_wsn,
                  HAS_BIAS: gl.constexpr, PENDING: gl.constexpr):  # fmt: skip
        """One 64 x 128 piece of a row-format tile: acc * x_scale[m] * w_scale[n] (+ bias), as the Triton
        epilogue computes it."""
        lay: gl.constexpr = a.type.layout
        rm = off_m + gl.arange(0, a.shape[0], layout=gl.SliceLayout(1, lay))
        rn = off_n + gl.arange(0, a.shape[1], layout=gl.SliceLayout(0, lay))
        xs = gl.load(xs_ptr + (rm % M).to(gl.int64) * stride_xsm)
        ws = gl.load(ws_ptr + (rn % N) * stride_wsn)
        y = _bias(a.to(gl.float32) * xs[:, None] * ws[None, :], off_n, N, bias_ptr, HAS_BIAS)
        _store(y, o_desc, o_smem, off_m, off_n, PENDING)

    @gluon.jit
    def _row_consumer(a_bufs, b_bufs, ready, empty, o_bufs, o_desc, xs_ptr, ws_ptr, bias_ptr, M, N, K,
                      stride_xsm, stride_xsk, stride_wsn, stride_wsk, WG: gl.constexpr, IS_INT: gl.constexpr,
                      HAS_BIAS: gl.constexpr, GROUP_M: gl.constexpr):  # fmt: skip
        """Row formats, consumer warp group WG: rows [64 WG, 64 WG + 64) of every tile, accumulated in place over
        K (int32 for int8: exact) with one step in flight; step k - 1's stage is released once step k is issued
        and k - 1 has completed."""
        BM: gl.constexpr = a_bufs.shape[1]
        BN: gl.constexpr = b_bufs.shape[1]
        STAGES: gl.constexpr = a_bufs.shape[0]
        INSTR_N: gl.constexpr = 128 if IS_INT else BN  # int8 wgmma: N <= 224
        mma: gl.constexpr = gl.NVMMADistributedLayout(version=[3, 0], warps_per_cta=[4, 1],
                                                      instr_shape=[16, INSTR_N, 32])  # fmt: skip
        acc_ty: gl.constexpr = gl.int32 if IS_INT else gl.float32
        PENDING: gl.constexpr = o_bufs.shape[0] // 2 - 1
        tiles = gl.cdiv(M, BM) * gl.cdiv(N, BN)
        k_steps = gl.cdiv(K, 128)
        i = 0
        for tile in range(gl.program_id(0), tiles, gl.num_programs(0)):
            off_m, off_n = tile_coords(tile, M, N, BM, BN, GROUP_M)
            acc = gl.zeros([64, BN], acc_ty, layout=mma)
            for k in range(k_steps):
                s = i % STAGES
                mbarrier.wait(ready.index(s), (i // STAGES) & 1)
                acc = warpgroup_mma(a_bufs.index(s).slice(WG * 64, 64), b_bufs.index(s).permute((1, 0)), acc,
                                    use_acc=k != 0, is_async=True)  # fmt: skip
                acc = warpgroup_mma_wait(num_outstanding=1, deps=(acc, ))
                mbarrier.arrive(empty.index((i + STAGES - 1) % STAGES), count=1, pred=k != 0)
                i += 1
            acc = warpgroup_mma_wait(num_outstanding=0, deps=(acc, ))
            mbarrier.arrive(empty.index((i + STAGES - 1) % STAGES), count=1)
            # two 128-wide pieces, one after the other: the scales and bias of both are not live at once
            a0, a1 = gl.split(gl.permute(gl.reshape(acc, [64, 2, BN // 2]), [0, 2, 1]))
            row = off_m + WG * 64
            _row_half(a0, o_desc, o_bufs.index(WG * (PENDING + 1)), row, off_n, M, N, xs_ptr, ws_ptr, bias_ptr,
                      stride_xsm, stride_wsn, HAS_BIAS, PENDING)  # fmt: skip
            _row_half(a1, o_desc, o_bufs.index(WG * (PENDING + 1) + PENDING), row, off_n + BN // 2, M, N, xs_ptr,
                      ws_ptr, bias_ptr, stride_xsm, stride_wsn, HAS_BIAS, PENDING)  # fmt: skip
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
    def _block_consumer(a_bufs, b_bufs, ready, empty, o_bufs, o_desc, xs_ptr, ws_ptr, bias_ptr, M, N, K,
                        stride_xsm, stride_xsk, stride_wsn, stride_wsk, WG: gl.constexpr, IS_INT: gl.constexpr,
                        HAS_BIAS: gl.constexpr, GROUP_M: gl.constexpr):  # fmt: skip
        """Block formats, consumer warp group WG: per K step, each 128-wide half is a fresh product promoted into
        its own fp32 accumulator with x_scale[m, kb] * w_scale[n-block, kb] (two accumulators of 64 x 128 + one
        product in registers); the stage is released after the second product, before its promotion."""
        BM: gl.constexpr = a_bufs.shape[1]
        BN: gl.constexpr = b_bufs.shape[1]
        STAGES: gl.constexpr = a_bufs.shape[0]
        mma: gl.constexpr = gl.NVMMADistributedLayout(version=[3, 0], warps_per_cta=[4, 1],
                                                      instr_shape=[16, 128, 32])  # fmt: skip
        p_ty: gl.constexpr = gl.int32 if IS_INT else gl.float32
        PENDING: gl.constexpr = o_bufs.shape[0] // 2 - 1
        tiles = gl.cdiv(M, BM) * gl.cdiv(N, BN)
        k_steps = K // 128
        last_nb = gl.cdiv(N, 128) - 1
        i = 0
        for tile in range(gl.program_id(0), tiles, gl.num_programs(0)):
            off_m, off_n = tile_coords(tile, M, N, BM, BN, GROUP_M)
            p = gl.zeros([64, 128], p_ty, layout=mma)  # fresh per tile: not live across the epilogue
            rm = off_m + WG * 64 + gl.arange(0, 64, layout=gl.SliceLayout(1, mma))
            xs_row = xs_ptr + (rm % M).to(gl.int64) * stride_xsm
            ws0 = ws_ptr + (off_n // 128) * stride_wsn
            ws1 = ws_ptr + gl.minimum(off_n // 128 + 1, last_nb) * stride_wsn  # past N: clamped, never stored
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
                w1_next = gl.load(ws1 + kn * stride_wsk)
                p = _product(a_bufs, b_bufs, s, p, WG, 0)
                acc0 = _promote(acc0, p, xs * w0, IS_INT)
                p = _product(a_bufs, b_bufs, s, p, WG, 1)
                mbarrier.arrive(empty.index(s), count=1)
                acc1 = _promote(acc1, p, xs * w1, IS_INT)
                xs, w0, w1 = xs_next, w0_next, w1_next
                i += 1
            row = off_m + WG * 64
            _store(_bias(acc0, off_n, N, bias_ptr, HAS_BIAS), o_desc, o_bufs.index(WG * (PENDING + 1)), row, off_n,
                   PENDING)  # fmt: skip
            _store(_bias(acc1, off_n + 128, N, bias_ptr, HAS_BIAS), o_desc, o_bufs.index(WG * (PENDING + 1) + PENDING),
                   row, off_n + 128, PENDING)  # fmt: skip
        tma.store_wait(0)

    @gluon.jit
    def _consumer0(a_bufs, b_bufs, ready, empty, o_bufs, o_desc, xs_ptr, ws_ptr, bias_ptr, M, N, K, stride_xsm,
                   stride_xsk, stride_wsn, stride_wsk, BLOCK_SCALED: gl.constexpr, IS_INT: gl.constexpr,
                   HAS_BIAS: gl.constexpr, GROUP_M: gl.constexpr):  # fmt: skip
        if BLOCK_SCALED:
            _block_consumer(a_bufs, b_bufs, ready, empty, o_bufs, o_desc, xs_ptr, ws_ptr, bias_ptr, M, N, K,
                            stride_xsm, stride_xsk, stride_wsn, stride_wsk, 0, IS_INT, HAS_BIAS, GROUP_M)  # fmt: skip
        else:
            _row_consumer(a_bufs, b_bufs, ready, empty, o_bufs, o_desc, xs_ptr, ws_ptr, bias_ptr, M, N, K,
                          stride_xsm, stride_xsk, stride_wsn, stride_wsk, 0, IS_INT, HAS_BIAS, GROUP_M)  # fmt: skip

    @gluon.jit
    def _consumer1(a_bufs, b_bufs, ready, empty, o_bufs, o_desc, xs_ptr, ws_ptr, bias_ptr, M, N, K, stride_xsm,
                   stride_xsk, stride_wsn, stride_wsk, BLOCK_SCALED: gl.constexpr, IS_INT: gl.constexpr,
                   HAS_BIAS: gl.constexpr, GROUP_M: gl.constexpr):  # fmt: skip
        if BLOCK_SCALED:
            _block_consumer(a_bufs, b_bufs, ready, empty, o_bufs, o_desc, xs_ptr, ws_ptr, bias_ptr, M, N, K,
                            stride_xsm, stride_xsk, stride_wsn, stride_wsk, 1, IS_INT, HAS_BIAS, GROUP_M)  # fmt: skip
        else:
            _row_consumer(a_bufs, b_bufs, ready, empty, o_bufs, o_desc, xs_ptr, ws_ptr, bias_ptr, M, N, K,
                          stride_xsm, stride_xsk, stride_wsn, stride_wsk, 1, IS_INT, HAS_BIAS, GROUP_M)  # fmt: skip

    @gluon.jit(do_not_specialize=["M"])
    def _ws_gemm_kernel(x_desc, w_desc, o_desc, xs_ptr, ws_ptr, bias_ptr, M, N, K, stride_xsm, stride_xsk,
                        stride_wsn, stride_wsk, BLOCK_SCALED: gl.constexpr, IS_INT: gl.constexpr,
                        HAS_BIAS: gl.constexpr, GROUP_M: gl.constexpr, STAGES: gl.constexpr,
                        OUT_BUFS: gl.constexpr, CONSUMER_REGS: gl.constexpr):  # fmt: skip
        """y = the scaled product of one persistent program's tiles: consumer 0 in the default partition (this
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
        # the argument tuples are written out in the call: a tuple assigned to a name first loses its constexprs
        gl.warp_specialize([
            (_consumer0, (a_bufs, b_bufs, ready, empty, o_bufs, o_desc, xs_ptr, ws_ptr, bias_ptr, M, N, K, stride_xsm,
                          stride_xsk, stride_wsn, stride_wsk, BLOCK_SCALED, IS_INT, HAS_BIAS, GROUP_M)),
            (_consumer1, (a_bufs, b_bufs, ready, empty, o_bufs, o_desc, xs_ptr, ws_ptr, bias_ptr, M, N, K, stride_xsm,
                          stride_xsk, stride_wsn, stride_wsk, BLOCK_SCALED, IS_INT, HAS_BIAS, GROUP_M)),
            (_load_partition, (x_desc, w_desc, a_bufs, b_bufs, ready, empty, M, N, K, GROUP_M))],
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


def scaled_mm_spec(xq, x_scale, wq, w_scale, fmt, bias, out, stages: int = 4, group_m: int = 8) -> _quant.Spec:
    """The launch of the warp-specialized GEMM for operands that are ``usable`` (M, N, K > 0) into ``out``
    [M, N]. TMA operands are ``Tma`` objects (x, w, out; out's is re-encoded per call by launch plans). Shared
    memory: STAGES x 48 KB of operands + 2 output buffers of 64 x 128 (4 stages and a 16-bit output: 224 KB; an
    fp32 output takes 3 stages)."""
    m, k = xq.shape
    n = wq.shape[0]
    if x_scale.dim() == 1:
        x_scale = x_scale[:, None]
    ws = w_scale if w_scale.dim() == 2 else w_scale.reshape(-1, 1)
    xss, wss = x_scale.stride(), ws.stride()
    if x_scale.shape[0] == 1:  # a per-tensor scale (row kernel): broadcast
        xss = (0, xss[1])
    if ws.shape[0] == 1:
        wss = (0, wss[1])
    args = (_quant.Tma(xq, (BLOCK_M, BLOCK_K), _layout((BLOCK_M, BLOCK_K), xq.dtype)),
            _quant.Tma(wq, (BLOCK_N, BLOCK_K), _layout((BLOCK_N, BLOCK_K), wq.dtype)),
            _quant.Tma(out, (64, OUT_N), _layout((64, OUT_N), out.dtype)),
            x_scale, ws, bias, m, n, k, xss[0], xss[1], wss[0], wss[1])  # fmt: skip
    tiles = triton.cdiv(m, BLOCK_M) * triton.cdiv(n, BLOCK_N)
    out_bytes = 2 * 64 * OUT_N * out.element_size()  # one 64 x 128 buffer per consumer
    while stages > 2 and stages * (BLOCK_M + BLOCK_N) * BLOCK_K + out_bytes > SHARED_BYTES:
        stages -= 1  # an fp32 output: 3 stages
    constexprs = dict(BLOCK_SCALED=fmt.is_block, IS_INT=fmt.is_int, HAS_BIAS=bias is not None, GROUP_M=group_m,
                      STAGES=stages, OUT_BUFS=1, CONSUMER_REGS=232)  # fmt: skip
    # 12 warps (4 + 4 + the producer's group) x 168 registers fill the register file; setmaxnreg then moves
    # them to the consumers (232 each) from the producer (24)
    # what Triton specializes on, for the launch cache (M is not; TMA operands by dtype, box and strides)
    key = (xq.dtype, xq.stride(), wq.stride(), out.dtype, x_scale.dtype, ws.dtype, None if bias is None else bias.dtype,
           x_scale.data_ptr() & 15, ws.data_ptr() & 15, 0 if bias is None else bias.data_ptr() & 15, n, k, xss, wss)  # fmt: skip
    return _quant.Spec(_ws_gemm_kernel, (min(tiles, _num_sms(xq.device)),), args, constexprs, 4, 1, key=key,
                       maxnreg=168)  # fmt: skip
