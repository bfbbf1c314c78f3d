"""Triton GEMMs of the five formats with fused scale application, each beside its wrapper.

``y[M, N] = (x_q * x_scale) @ (w_q * w_scale)^T + bias``, computed as

- ``int8-row``: int8 x int8 -> int32 accumulator; epilogue ``acc * x_scale[m] * w_scale[n] (+ bias)``.
- ``fp8-tensor`` / ``fp8-row``: e4m3 x e4m3 -> fp32 accumulator; same epilogue (scalar / per-row w_scale).
- ``int8-block`` / ``fp8-block``: one 128-wide K block per dot; each block's partial product is promoted
  into an fp32 accumulator with ``x_scale[m, kb] * w_scale[n // 128, kb]``. The N tile is at most 128 wide
  and divides 128, so the weight scale is one scalar per (tile, K block) and the promotion is one
  multiply-add per accumulator element (TERRAIN.md).

Layouts: x_q [M, K] (any strides; contiguous rows with K % 16 == 0 use TMA loads), w_q [N, K]
(row-major: K-major, as both int8 and fp8 tensor-core products need), x_scale f32 [M, 1] or [M, K/128],
w_scale f32 [] / [N, 1] / [N/128, K/128], bias [N] any float dtype, y [M, N] in ``out_dtype``.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

import torch
import triton
import triton.language as tl

from .. import formats as F
from ..errors import ShapeError
from . import INTERPRET
from . import quant as _quant
from .quant import cast_rne

try:
    from triton.runtime.errors import OutOfResources
except ImportError:  # pragma: no cover

    class OutOfResources(Exception):
        pass


try:
    from triton.tools.tensor_descriptor import TensorDescriptor  # noqa: F401  (TMA support in this triton)

    HAS_TMA = True
except ImportError:  # pragma: no cover - older triton: pointer loads only
    HAS_TMA = False


last_compiled = None
"""The compiled kernel of the latest launch (for the benchmark's resource report: registers, spills, PTX)."""


@dataclass(frozen=True)
class Config:
    """A GEMM launch configuration (the tuned key is format, M bucket, N, K: see ``configs.py``)."""

    block_m: int
    block_n: int
    block_k: int
    group_m: int = 8
    num_warps: int = 8
    num_stages: int = 3
    tma: bool = True  # TMA descriptor loads (else pointer loads, masked)
    dot2: bool = False  # block formats: two independent K-block products per loop iteration
    magic_i2f: bool = False  # int8-block: int32 -> fp32 by an add on the bits instead of a convert
    persistent: bool = False  # one program per SM looping over tiles (TMA only): next loads overlap the epilogue
    maxnreg: int = 0  # register cap per thread (0: the compiler's choice); lets more programs share an SM
    split_k: int = 1  # weight-only kernel: programs per output tile, each over a K slice (last one reduces)
    tail_split: int = 0  # W8A8 GEMM: split the tiles of the last, partial wave over K into up to this many slices
    ws: bool = False  # the warp-specialized Gluon kernel of ``hopper.py`` (128 x 256 tiles, num_stages stages)

    def as_list(self) -> list:
        return [self.block_m, self.block_n, self.block_k, self.group_m, self.num_warps, self.num_stages,
                int(self.tma), int(self.dot2), int(self.magic_i2f), int(self.persistent), self.maxnreg,
                self.split_k, self.tail_split, int(self.ws)]  # fmt: skip

    @classmethod
    def from_list(cls, v) -> "Config":
        v = list(v) + [0] * (11 - len(v))
        return cls(*v[:6], *(bool(b) for b in v[6:10]), int(v[10]), int(v[11]) if len(v) > 11 else 1,
                   int(v[12]) if len(v) > 12 else 0, bool(v[13]) if len(v) > 13 else False)


@triton.jit
def _load_tiles(x_ptr, x_desc, w_ptr, w_desc, off_m, off_n, k, M, N, K,
                stride_xm, stride_xk, stride_wn, stride_wk,
                USE_TMA: tl.constexpr, EVEN_K: tl.constexpr,
                BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):  # fmt: skip
    """x tile [BLOCK_M, BLOCK_K] and w tile [BLOCK_N, BLOCK_K] at (off_m, k) / (off_n, k); zeros past K.
    Rows past M / N are clamped to valid rows (their results are never stored)."""
    if USE_TMA:  # out-of-bounds boxes are zero-filled by the copy engine
        a = x_desc.load([off_m, k])
        b = w_desc.load([off_n, k])
    else:
        rm = (off_m + tl.arange(0, BLOCK_M)) % M
        rn = (off_n + tl.arange(0, BLOCK_N)) % N
        rk = k + tl.arange(0, BLOCK_K)
        a_ptr = x_ptr + rm[:, None].to(tl.int64) * stride_xm + rk[None, :] * stride_xk
        b_ptr = w_ptr + rn[:, None].to(tl.int64) * stride_wn + rk[None, :] * stride_wk
        if EVEN_K:
            a = tl.load(a_ptr)
            b = tl.load(b_ptr)
        else:
            a = tl.load(a_ptr, mask=(rk < K)[None, :], other=0.0)
            b = tl.load(b_ptr, mask=(rk < K)[None, :], other=0.0)
    return a, b


@triton.jit
def _promote(p, IS_INT: tl.constexpr, MAGIC_I2F: tl.constexpr):
    """A K block's partial product as fp32. |int32 partial| <= 128 * 127 * 127 < 2^22, so adding the bits
    of 1.5 * 2^23 and reading them as fp32 is exact, an integer add + a float add instead of a convert."""
    if IS_INT:
        if MAGIC_I2F:
            return (p + 0x4B400000).to(tl.float32, bitcast=True) - 12582912.0
        else:
            return p.to(tl.float32)
    else:
        return p


@triton.jit
def _tile_coords(tile, M, N, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, GROUP_M: tl.constexpr):
    """Grouped ordering: GROUP_M row tiles sweep the N tiles together, so x and w tiles are reused from L2."""
    num_m = tl.cdiv(M, BLOCK_M)
    num_n = tl.cdiv(N, BLOCK_N)
    in_group = GROUP_M * num_n
    first_m = (tile // in_group) * GROUP_M
    size_m = min(num_m - first_m, GROUP_M)
    pid_m = first_m + (tile % in_group) % size_m
    pid_n = (tile % in_group) // size_m
    return pid_m * BLOCK_M, pid_n * BLOCK_N


@triton.jit
def _block_scaled_step(acc, a, b, xs_row, ws_row, kb, stride_xsk, stride_wsk,
                       IS_INT: tl.constexpr, MAGIC_I2F: tl.constexpr):  # fmt: skip
    """acc += (a @ b^T) * x_scale[:, kb] * w_scale[kb]: one 128-wide K block, promoted into fp32."""
    p = tl.dot(a, tl.trans(b), out_dtype=tl.int32 if IS_INT else tl.float32)
    s = tl.load(xs_row + kb * stride_xsk) * tl.load(ws_row + kb * stride_wsk)
    return acc + _promote(p, IS_INT, MAGIC_I2F) * s[:, None]


@triton.jit
def _lora_dot(y, rm, rn, M, N, xa_ptr, lb_ptr, stride_xam, stride_lbn,
              LORA_RANK: tl.constexpr, LORA_R: tl.constexpr, LORA_CHUNK: tl.constexpr, LORA_F32: tl.constexpr):  # fmt: skip
    """y [BLOCK_M, BLOCK_N] fp32 + xa[rm, :] @ lb[rn, :]^T: the LoRA up-projection of this output tile, its
    factors folded into lb. xa [M, LORA_RANK], lb [N, LORA_RANK] (16-bit, unit column stride); LORA_R is
    LORA_RANK rounded up to a power of two >= 16 (tl.arange / tl.dot sizes), the padding masked to zero.
    Accumulates into y itself, so no second fp32 tile is live; LORA_CHUNK columns of r at a time, so the
    operands' shared memory next to the main loop's stage buffers stays small. LORA_F32: fp32 operands (fp32
    models, and the interpreter, whose bf16 dot is wrong in triton 3.6)."""
    xa_rows = xa_ptr + (rm % M)[:, None].to(tl.int64) * stride_xam
    lb_rows = lb_ptr + (rn % N)[:, None].to(tl.int64) * stride_lbn
    for r0 in tl.static_range(0, LORA_R, LORA_CHUNK):
        rr = r0 + tl.arange(0, LORA_CHUNK)
        r_ok = (rr < LORA_RANK)[None, :]
        xa = tl.load(xa_rows + rr[None, :], mask=r_ok, other=0.0)
        lb = tl.load(lb_rows + rr[None, :], mask=r_ok, other=0.0)
        if LORA_F32:
            y = tl.dot(xa.to(tl.float32), tl.trans(lb.to(tl.float32)), y, input_precision="ieee")
        else:
            y = tl.dot(xa, tl.trans(lb), y)
    return y


@triton.jit
def _epilogue(acc, off_m, off_n, M, N, xs_ptr, ws_ptr, bias_ptr, out_ptr, stride_om, stride_xsm, stride_wsn,
              xa_ptr, lb_ptr, stride_xam, stride_lbn,
              BLOCK_SCALED: tl.constexpr, W_SCALE_ROW: tl.constexpr, HAS_BIAS: tl.constexpr,
              MANUAL_RNE: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
              LORA_RANK: tl.constexpr, LORA_R: tl.constexpr, LORA_CHUNK: tl.constexpr, LORA_F32: tl.constexpr):  # fmt: skip
    """Scales (non-block formats: x_scale[m] * w_scale[n] or scalar), the LoRA branch (LORA_RANK > 0), bias,
    cast, masked store."""
    rm = off_m + tl.arange(0, BLOCK_M)
    rn = off_n + tl.arange(0, BLOCK_N)
    if BLOCK_SCALED:
        y = acc
    else:
        xs = tl.load(xs_ptr + (rm % M).to(tl.int64) * stride_xsm)
        if W_SCALE_ROW:
            ws = tl.load(ws_ptr + (rn % N) * stride_wsn)
            y = acc.to(tl.float32) * xs[:, None] * ws[None, :]
        else:
            y = acc.to(tl.float32) * (xs * tl.load(ws_ptr))[:, None]
    if LORA_RANK > 0:
        y = _lora_dot(y, rm, rn, M, N, xa_ptr, lb_ptr, stride_xam, stride_lbn, LORA_RANK, LORA_R, LORA_CHUNK,
                      LORA_F32)
    store_tile(y, rm, rn, M, N, bias_ptr, out_ptr, stride_om, HAS_BIAS, MANUAL_RNE)


@triton.jit
def store_tile(y, rm, rn, M, N, bias_ptr, out_ptr, stride_om, HAS_BIAS: tl.constexpr, MANUAL_RNE: tl.constexpr):
    """Bias (any float dtype, added in fp32), cast to the output's dtype, masked store of the fp32 tile y at
    rows rm / columns rn of out [M, N] (unit column stride)."""
    if HAS_BIAS:
        y += tl.load(bias_ptr + rn, mask=rn < N, other=0.0).to(tl.float32)[None, :]
    out = out_ptr + rm[:, None].to(tl.int64) * stride_om + rn[None, :]
    tl.store(out, cast_rne(y, out_ptr.dtype.element_ty, MANUAL_RNE), mask=(rm < M)[:, None] & (rn < N)[None, :])


@triton.jit(do_not_specialize=["M"])
def _scaled_mm_persistent_kernel(
    x_desc, w_desc, xs_ptr, ws_ptr, bias_ptr, out_ptr, xa_ptr, lb_ptr,
    M, N, K, stride_om, stride_xsm, stride_xsk, stride_wsn, stride_wsk, stride_xam, stride_lbn,
    IS_INT: tl.constexpr, BLOCK_SCALED: tl.constexpr, W_SCALE_ROW: tl.constexpr, HAS_BIAS: tl.constexpr,
    MAGIC_I2F: tl.constexpr, MANUAL_RNE: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, GROUP_M: tl.constexpr,
    NUM_PROGRAMS: tl.constexpr, LORA_RANK: tl.constexpr, LORA_R: tl.constexpr, LORA_CHUNK: tl.constexpr,
    LORA_F32: tl.constexpr,
):  # fmt: skip
    """One program per SM, looping over output tiles; the tile loop is flattened with the K loop so the
    software pipeline issues the next tile's TMA loads while this tile's epilogue runs."""
    num_tiles = tl.cdiv(M, BLOCK_M) * tl.cdiv(N, BLOCK_N)
    k_steps = tl.cdiv(K, BLOCK_K)
    tile_out = tl.program_id(0) - NUM_PROGRAMS  # tile of the epilogue, tracked apart (as flattening needs)
    for tile in tl.range(tl.program_id(0), num_tiles, NUM_PROGRAMS, flatten=True):
        off_m, off_n = _tile_coords(tile, M, N, BLOCK_M, BLOCK_N, GROUP_M)
        if BLOCK_SCALED:
            xs_row = xs_ptr + ((off_m + tl.arange(0, BLOCK_M)) % M).to(tl.int64) * stride_xsm
            ws_row = ws_ptr + (off_n // 128) * stride_wsn
            acc = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
            for kb in range(k_steps):
                a = x_desc.load([off_m, kb * BLOCK_K])
                b = w_desc.load([off_n, kb * BLOCK_K])
                acc = _block_scaled_step(acc, a, b, xs_row, ws_row, kb, stride_xsk, stride_wsk, IS_INT, MAGIC_I2F)
        else:
            acc = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.int32 if IS_INT else tl.float32)
            for kb in range(k_steps):
                a = x_desc.load([off_m, kb * BLOCK_K])
                b = w_desc.load([off_n, kb * BLOCK_K])
                acc = tl.dot(a, tl.trans(b), acc, out_dtype=tl.int32 if IS_INT else tl.float32)
        tile_out += NUM_PROGRAMS
        off_m, off_n = _tile_coords(tile_out, M, N, BLOCK_M, BLOCK_N, GROUP_M)
        _epilogue(acc, off_m, off_n, M, N, xs_ptr, ws_ptr, bias_ptr, out_ptr, stride_om, stride_xsm, stride_wsn,
                  xa_ptr, lb_ptr, stride_xam, stride_lbn, BLOCK_SCALED, W_SCALE_ROW, HAS_BIAS, MANUAL_RNE,
                  BLOCK_M, BLOCK_N, LORA_RANK, LORA_R, LORA_CHUNK, LORA_F32)  # fmt: skip


@triton.jit(do_not_specialize=["M", "n_dp"])  # M changes call to call; one compiled kernel serves every M
def _scaled_mm_kernel(
    x_ptr, x_desc, w_ptr, w_desc, xs_ptr, ws_ptr, bias_ptr, out_ptr, xa_ptr, lb_ptr, part_ptr, count_ptr,
    M, N, K, n_dp, tail_s, k_slice,
    stride_xm, stride_xk, stride_wn, stride_wk, stride_om,
    stride_xsm, stride_xsk, stride_wsn, stride_wsk, stride_xam, stride_lbn,
    IS_INT: tl.constexpr, BLOCK_SCALED: tl.constexpr, W_SCALE_ROW: tl.constexpr, HAS_BIAS: tl.constexpr,
    USE_TMA: tl.constexpr, EVEN_K: tl.constexpr, DOT2: tl.constexpr, MAGIC_I2F: tl.constexpr,
    MANUAL_RNE: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, GROUP_M: tl.constexpr,
    LORA_RANK: tl.constexpr, LORA_R: tl.constexpr, LORA_CHUNK: tl.constexpr,
    LORA_F32: tl.constexpr, TAIL: tl.constexpr,
):  # fmt: skip
    """One program per output tile. TAIL: the first ``n_dp`` programs are whole tiles; the tiles after them
    (those of the grid's last, partial wave) are split over K into ``tail_s`` slices of ``k_slice`` each, one
    program per slice: each stores its raw accumulator in part [tail tiles * tail_s, BLOCK_M, BLOCK_N] and
    counts itself in count [tail tiles]; the last to arrive sums the slices in order (int32: exact, so the
    result is the unsplit one; fp32: a fixed order), finishes the tile and sets its counter back to 0."""
    pid = tl.program_id(0)
    if TAIL:
        j = tl.maximum(pid - n_dp, 0)
        t_tail = j // tail_s
        s_tail = j - t_tail * tail_s
        in_tail = pid >= n_dp
        tile = tl.where(in_tail, n_dp + t_tail, pid)
        k_lo = tl.where(in_tail, s_tail * k_slice, 0)
        k_hi = tl.where(in_tail, tl.minimum(k_lo + k_slice, K), K)
    else:
        tile = pid
        k_lo = 0
        k_hi = K
    off_m, off_n = _tile_coords(tile, M, N, BLOCK_M, BLOCK_N, GROUP_M)
    rm = off_m + tl.arange(0, BLOCK_M)
    dot_ty = tl.int32 if IS_INT else tl.float32

    if BLOCK_SCALED:
        # BLOCK_K == 128 and 128 % BLOCK_N == 0: one w scale per (tile, K block), x scale per (row, K block)
        kb_lo = k_lo // BLOCK_K
        kb_hi = k_hi // BLOCK_K
        xs_row = xs_ptr + (rm % M).to(tl.int64) * stride_xsm
        ws_row = ws_ptr + (off_n // 128) * stride_wsn
        acc = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
        if DOT2:  # two independent products in flight: one is promoted while the other runs
            for kb in range(kb_lo, kb_hi - 1, 2):
                a0, b0 = _load_tiles(x_ptr, x_desc, w_ptr, w_desc, off_m, off_n, kb * BLOCK_K, M, N, K,
                                     stride_xm, stride_xk, stride_wn, stride_wk, USE_TMA, True,
                                     BLOCK_M, BLOCK_N, BLOCK_K)  # fmt: skip
                a1, b1 = _load_tiles(x_ptr, x_desc, w_ptr, w_desc, off_m, off_n, (kb + 1) * BLOCK_K, M, N, K,
                                     stride_xm, stride_xk, stride_wn, stride_wk, USE_TMA, True,
                                     BLOCK_M, BLOCK_N, BLOCK_K)  # fmt: skip
                p0 = tl.dot(a0, tl.trans(b0), out_dtype=dot_ty)
                p1 = tl.dot(a1, tl.trans(b1), out_dtype=dot_ty)  # issued before p0 is promoted
                s0 = tl.load(xs_row + kb * stride_xsk) * tl.load(ws_row + kb * stride_wsk)
                s1 = tl.load(xs_row + (kb + 1) * stride_xsk) * tl.load(ws_row + (kb + 1) * stride_wsk)
                acc += _promote(p0, IS_INT, MAGIC_I2F) * s0[:, None]
                acc += _promote(p1, IS_INT, MAGIC_I2F) * s1[:, None]
            if (kb_hi - kb_lo) % 2 == 1:
                kb = kb_hi - 1
                a0, b0 = _load_tiles(x_ptr, x_desc, w_ptr, w_desc, off_m, off_n, kb * BLOCK_K, M, N, K,
                                     stride_xm, stride_xk, stride_wn, stride_wk, USE_TMA, True,
                                     BLOCK_M, BLOCK_N, BLOCK_K)  # fmt: skip
                acc = _block_scaled_step(acc, a0, b0, xs_row, ws_row, kb, stride_xsk, stride_wsk, IS_INT, MAGIC_I2F)
        else:
            for kb in range(kb_lo, kb_hi):
                a, b = _load_tiles(x_ptr, x_desc, w_ptr, w_desc, off_m, off_n, kb * BLOCK_K, M, N, K,
                                   stride_xm, stride_xk, stride_wn, stride_wk, USE_TMA, True,
                                   BLOCK_M, BLOCK_N, BLOCK_K)  # fmt: skip
                acc = _block_scaled_step(acc, a, b, xs_row, ws_row, kb, stride_xsk, stride_wsk, IS_INT, MAGIC_I2F)
    else:
        acc = tl.zeros([BLOCK_M, BLOCK_N], dtype=dot_ty)
        for k in range(k_lo, k_hi, BLOCK_K):
            a, b = _load_tiles(x_ptr, x_desc, w_ptr, w_desc, off_m, off_n, k, M, N, K,
                               stride_xm, stride_xk, stride_wn, stride_wk, USE_TMA, EVEN_K,
                               BLOCK_M, BLOCK_N, BLOCK_K)  # fmt: skip
            acc = tl.dot(a, tl.trans(b), acc, out_dtype=dot_ty)
    write = pid >= 0  # every program writes its tile but a tail slice that is not the last to arrive
    if TAIL:
        if in_tail:
            sub = tl.arange(0, BLOCK_M)[:, None] * BLOCK_N + tl.arange(0, BLOCK_N)[None, :]
            part = part_ptr + (t_tail * tail_s).to(tl.int64) * (BLOCK_M * BLOCK_N) + sub
            tl.store(part + s_tail * (BLOCK_M * BLOCK_N), acc)
            tl.debug_barrier()  # every thread's slice is written before the release below
            arrived = tl.atomic_add(count_ptr + t_tail, 1, sem="acq_rel", scope="gpu")
            write = arrived == tail_s - 1
            if write:
                acc = tl.load(part, cache_modifier=".cg")  # .cg: the other programs' slices from L2, not L1
                for j2 in range(1, tail_s):
                    acc += tl.load(part + j2 * (BLOCK_M * BLOCK_N), cache_modifier=".cg")
                tl.atomic_xchg(count_ptr + t_tail, 0, sem="relaxed", scope="gpu")
    if write:
        _epilogue(acc, off_m, off_n, M, N, xs_ptr, ws_ptr, bias_ptr, out_ptr, stride_om, stride_xsm, stride_wsn,
                  xa_ptr, lb_ptr, stride_xam, stride_lbn, BLOCK_SCALED, W_SCALE_ROW, HAS_BIAS, MANUAL_RNE,
                  BLOCK_M, BLOCK_N, LORA_RANK, LORA_R, LORA_CHUNK, LORA_F32)  # fmt: skip


_SMS: dict = {}

WS_FALLBACK = {False: Config(128, 256, 128, 8, 8, 4), True: Config(128, 128, 128, 8, 8, 3, tma=False, dot2=True)}
"""Large-M Triton configurations for a warp-specialized config whose operands the Gluon kernel does not take
(LoRA, unaligned rows, no Hopper GPU): the tuned ones of the benchmark's M >= 4096 shapes (row, block)."""


def _num_sms(device: torch.device) -> int:
    if INTERPRET or device.type != "cuda":
        return 4
    if device not in _SMS:
        _SMS[device] = torch.cuda.get_device_properties(device).multi_processor_count
    return _SMS[device]


def _tma_ok(t: torch.Tensor) -> bool:
    """TMA needs a unit inner stride and 16-byte aligned base and row stride."""
    return (
        HAS_TMA
        and t.stride(1) == 1
        and (t.stride(0) * t.element_size()) % 16 == 0
        and t.data_ptr() % 16 == 0
    )


def check_operands(xq, x_scale, wq, w_scale, fmt: F.Format, bias) -> None:
    """Shapes and dtypes of a scaled_mm call; ShapeError naming what is wrong."""
    if xq.dim() != 2 or wq.dim() != 2:
        raise ShapeError(f"scaled_mm takes 2-D xq [M, K] and wq [N, K], got {tuple(xq.shape)} and {tuple(wq.shape)}")
    m, k = xq.shape
    n, kw = wq.shape
    if k != kw:
        raise ShapeError(f"scaled_mm: x has K={k} but the weight [{n}, {kw}] has K={kw}")
    if xq.dtype != fmt.storage or wq.dtype != fmt.storage:
        raise ShapeError(f"scaled_mm {fmt.name}: operands must be {fmt.storage}, got {xq.dtype} and {wq.dtype}")
    xs_shape = (m, k // F.BLOCK) if fmt.is_block else (m, 1)
    if fmt.is_block and k % F.BLOCK:
        raise ShapeError(f"scaled_mm {fmt.name}: K={k} is not divisible by {F.BLOCK}")
    if tuple(x_scale.shape) != xs_shape:
        raise ShapeError(f"scaled_mm {fmt.name}: x_scale has shape {tuple(x_scale.shape)}, expected {xs_shape}")
    ws_shape = fmt.weight_scale_shape(n, k)
    if tuple(w_scale.shape) != ws_shape and not (fmt.weight_granularity == "row" and tuple(w_scale.shape) == (n,)):
        raise ShapeError(f"scaled_mm {fmt.name}: w_scale has shape {tuple(w_scale.shape)}, expected {ws_shape}")
    if bias is not None and tuple(bias.shape) != (n,):
        raise ShapeError(f"scaled_mm: bias has shape {tuple(bias.shape)}, expected ({n},)")


def check_lora(lora, m: int, n: int, fmt: F.Format) -> None:
    """The LoRA operands (xa [M, r], lb [N, r]) of a fused call; ShapeError naming what is wrong."""
    xa, lb = lora
    if fmt.is_block:
        raise ShapeError(f"scaled_mm {fmt.name}: the fused LoRA epilogue is for row / tensor formats; add the "
                         f"branch after the GEMM for block formats")  # fmt: skip
    if xa.dim() != 2 or lb.dim() != 2 or xa.shape[0] != m or lb.shape[0] != n or xa.shape[1] != lb.shape[1]:
        raise ShapeError(f"scaled_mm LoRA: needs xa [M={m}, r] and lb [N={n}, r], got {tuple(xa.shape)} and "
                         f"{tuple(lb.shape)}")  # fmt: skip
    ok = (torch.bfloat16, torch.float16, torch.float32)
    if xa.dtype not in ok or lb.dtype != xa.dtype or xa.stride(1) != 1 or lb.stride(1) != 1:
        raise ShapeError(f"scaled_mm LoRA: xa and lb must share a float dtype and have unit column stride, got "
                         f"{xa.dtype} {tuple(xa.stride())} and {lb.dtype} {tuple(lb.stride())}")  # fmt: skip


def _lora_args(lora, c: Config) -> tuple[tuple, dict, tuple | None]:
    """(pointer and stride arguments, constexprs, specialization key) of the LoRA epilogue; lora = (xa, lb) or
    None (the plain GEMM: LORA_RANK = 0 compiles the branch out)."""
    if lora is None:
        return (None, None, 0, 0), dict(LORA_RANK=0, LORA_R=16, LORA_CHUNK=16, LORA_F32=False), None
    xa, lb = lora
    r = xa.shape[1]
    sa, sb = xa.stride(0), lb.stride(0)
    key = (xa.dtype, xa.data_ptr() & 15, lb.data_ptr() & 15, sa & 15, sa == 1, sb & 15, sb == 1)
    r_pad = max(16, triton.next_power_of_2(r))
    consts = dict(LORA_RANK=r, LORA_R=r_pad, LORA_CHUNK=lora_chunk(c, r_pad, xa.element_size()),
                  LORA_F32=INTERPRET or xa.dtype == torch.float32)  # fmt: skip
    return (xa, lb, sa, sb), consts, key


def ctas_per_sm(c: Config) -> int:
    """Programs of configuration ``c`` one SM holds at once (Hopper: 227 KiB of shared memory, 64 warps and
    64K registers per SM), estimated from the stage buffers and the accumulator's registers."""
    smem = c.num_stages * (c.block_m + c.block_n) * c.block_k + 1024
    regs = min(255, c.block_m * c.block_n // (32 * c.num_warps) + 48)
    return max(1, min(SMEM_BYTES // smem, 64 // c.num_warps, 65536 // (regs * 32 * c.num_warps)))


def tail_split(tiles: int, k: int, c: Config, slots: int) -> tuple[int, int, int]:
    """(whole tiles, slices per tail tile, K per slice) for a grid of ``tiles`` on ``slots`` concurrent programs:
    the ``tiles % slots`` tiles of the last, partial wave are split over K into up to ``c.tail_split`` slices
    (each at least two K steps, at most ``slots`` programs in that wave), so that wave ends sooner. No split:
    (tiles, 1, k)."""
    r = tiles % slots
    steps = triton.cdiv(k, c.block_k)
    s = min(c.tail_split, slots // r if r else 0, steps // 2)
    if s < 2:
        return tiles, 1, k
    k_slice = triton.cdiv(steps, s) * c.block_k
    return tiles - r, triton.cdiv(k, k_slice), k_slice


_TAIL_WORKSPACE: dict = {}


def tail_buffers(device: torch.device, c: Config, kept: bool = True):
    """(slices [slots, block_m, block_n] as raw 4-byte words, counters int32 [slots] all zero) for tail-split
    launches of ``c``, slots = the programs the device holds at once. ``kept`` and no CUDA graph being captured:
    kept per device, stream and tile (launches on one stream run one after another, and each leaves the
    counters at zero; never evicted: launch plans hold the addresses, ``ops.clear_plans`` drops them). Else
    fresh ones (a graph's own, zeroed by a memset node: nothing is shared with launches outside it)."""
    slots = _num_sms(device) * ctas_per_sm(c)
    shape = (slots, c.block_m, c.block_n)
    if not kept or (device.type == "cuda" and torch.cuda.is_current_stream_capturing()):
        return (torch.empty(shape, dtype=torch.int32, device=device),
                torch.zeros(slots, dtype=torch.int32, device=device))  # fmt: skip
    index = device.index if device.index is not None or device.type != "cuda" else torch.cuda.current_device()
    stream = torch._C._cuda_getCurrentRawStream(index) if device.type == "cuda" else 0
    key = (index, stream, c.block_m, c.block_n, slots)
    got = _TAIL_WORKSPACE.get(key)
    if got is None:
        got = _TAIL_WORKSPACE[key] = (torch.empty(shape, dtype=torch.int32, device=device),
                                      torch.zeros(slots, dtype=torch.int32, device=device))  # fmt: skip
    return got


def tail_args(xq, c: Config, kept: bool = True):
    """The workspace (``tail_buffers``) of a launch of ``c`` on xq's device, or None where ``c`` splits no
    tail (``tail_split`` < 2, or a persistent config)."""
    if c.tail_split < 2 or c.persistent:
        return None
    return tail_buffers(xq.device, c, kept)


def scaled_mm_spec(xq, x_scale, wq, w_scale, fmt: F.Format, bias, out, c: Config, lora=None,
                   tail=None) -> _quant.Spec:  # fmt: skip
    """The launch of the scaled GEMM for checked operands (M, N, K > 0) into ``out`` [M, N] (fresh, contiguous)
    with configuration ``c``. TMA operands are ``Tma`` objects in ``spec.args`` (x first, then w). ``lora``:
    (xa [M, r], lb [N, r]) checked by ``check_lora``, added in the epilogue (``acc += xa @ lb^T``). ``tail``:
    the workspace of ``tail_args`` (the last wave's tiles split over K; see ``_scaled_mm_kernel``)."""
    if c.ws:
        from . import hopper  # it imports this module

        if hopper.usable(xq, wq, out, fmt, lora):
            return hopper.scaled_mm_spec(xq, x_scale, wq, w_scale, fmt, bias, out, c, tail)
        c, tail = WS_FALLBACK[fmt.is_block], None
    m, k = xq.shape
    n = wq.shape[0]
    if fmt.is_block and (c.block_k != F.BLOCK or F.BLOCK % c.block_n):
        raise ShapeError(f"config {c} invalid for {fmt.name}: needs block_k == 128 and block_n dividing 128")
    (xa, lb, s_xa, s_lb), lora_c, lora_key = _lora_args(lora, c)
    use_tma = c.tma and _tma_ok(xq) and _tma_ok(wq)
    if x_scale.dim() == 1:
        x_scale = x_scale[:, None]
    wss = w_scale.stride()
    ws_stride = (wss[0], wss[1] if len(wss) > 1 else 0) if wss else (0, 0)
    opts = {"maxnreg": c.maxnreg} if c.maxnreg else {}
    common = dict(IS_INT=fmt.is_int, BLOCK_SCALED=fmt.is_block, W_SCALE_ROW=fmt.weight_granularity == "row",
                  HAS_BIAS=bias is not None)  # fmt: skip
    tiles = triton.cdiv(m, c.block_m) * triton.cdiv(n, c.block_n)
    xss = x_scale.stride()
    # what Triton specializes on, for the launch cache (M is not specialized; out is a fresh allocation)
    key = (out.dtype, x_scale.dtype, w_scale.dtype, None if bias is None else bias.dtype,
           xq.data_ptr() & 15, wq.data_ptr() & 15, x_scale.data_ptr() & 15, w_scale.data_ptr() & 15,
           0 if bias is None else bias.data_ptr() & 15, n, k, xq.stride(), wq.stride(), xss, ws_stride, lora_key)  # fmt: skip
    x_desc = _quant.Tma(xq, (c.block_m, c.block_k)) if use_tma else None
    w_desc = _quant.Tma(wq, (c.block_n, c.block_k)) if use_tma else None
    if use_tma and c.persistent:
        programs = min(tiles, _num_sms(xq.device))
        args = (x_desc, w_desc, x_scale, w_scale, bias, out, xa, lb, m, n, k, out.stride(0), xss[0], xss[1],
                ws_stride[0], ws_stride[1], s_xa, s_lb)  # fmt: skip
        return _quant.Spec(
            _scaled_mm_persistent_kernel, (programs,), args,
            dict(**common, MAGIC_I2F=c.magic_i2f, MANUAL_RNE=INTERPRET, BLOCK_M=c.block_m, BLOCK_N=c.block_n,
                 BLOCK_K=c.block_k, GROUP_M=c.group_m, NUM_PROGRAMS=programs, **lora_c),
            c.num_warps, c.num_stages, key=key, **opts,
        )  # fmt: skip
    n_dp, tail_s, k_slice = tiles, 1, k
    part = count = None
    if tail is not None:
        part, count = tail
        n_dp, tail_s, k_slice = tail_split(tiles, k, c, count.numel())
        if tail_s == 1:
            part = count = None
        elif fmt.is_block or not fmt.is_int:  # the accumulator is fp32 (int8-row: int32)
            part = part.view(torch.float32)
    grid = n_dp + (tiles - n_dp) * tail_s
    args = (xq, x_desc, wq, w_desc, x_scale, w_scale, bias, out, xa, lb, part, count, m, n, k, n_dp, tail_s,
            k_slice, xq.stride(0), xq.stride(1), wq.stride(0), wq.stride(1), out.stride(0),
            xss[0], xss[1], ws_stride[0], ws_stride[1], s_xa, s_lb)  # fmt: skip
    return _quant.Spec(
        _scaled_mm_kernel, (grid,), args,
        dict(**common, USE_TMA=use_tma, EVEN_K=k % c.block_k == 0, DOT2=c.dot2, MAGIC_I2F=c.magic_i2f,
             MANUAL_RNE=INTERPRET, BLOCK_M=c.block_m, BLOCK_N=c.block_n, BLOCK_K=c.block_k, GROUP_M=c.group_m,
             **lora_c, TAIL=part is not None),
        c.num_warps, c.num_stages, key=(*key, tail_s, k_slice), **opts,
    )  # fmt: skip


def _empty_product(out: torch.Tensor, bias) -> torch.Tensor:
    """The result of a product with M, N or K zero: nothing to write, or the bias broadcast over M rows."""
    if out.numel() == 0:
        return out
    return out.copy_(bias.expand_as(out) if bias is not None else torch.zeros_like(out))


def _launch(spec: _quant.Spec) -> None:
    global last_compiled
    entry = _quant.launch(spec)
    last_compiled = entry.ck if entry is not None else None


def scaled_mm(
    xq: torch.Tensor,
    x_scale: torch.Tensor,
    wq: torch.Tensor,
    w_scale: torch.Tensor,
    fmt,
    bias: torch.Tensor | None = None,
    out_dtype: torch.dtype = torch.bfloat16,
    config: Config | None = None,
    check: bool = True,
    lora_xa: torch.Tensor | None = None,
    lora_b: torch.Tensor | None = None,
) -> torch.Tensor:
    """y [M, N] ``out_dtype`` = dequant(xq) @ dequant(wq)^T (+ lora_xa @ lora_b^T) + bias, with Triton (see the
    module docstring for layouts). ``config`` overrides the tuned/heuristic launch configuration.

    LoRA (row / tensor formats): lora_xa [M, r] = x @ A^T and lora_b [N, r] (the LoRA factors folded in),
    bf16 / fp16 / fp32 alike, unit column stride, any r; the up-projection runs in the epilogue on the
    output tile (fp32 accumulation) before the bias and the cast, so y is written once."""
    fmt = F.get_format(fmt)
    if check:
        check_operands(xq, x_scale, wq, w_scale, fmt, bias)
    m, k = xq.shape
    n = wq.shape[0]
    lora = None
    if lora_xa is not None or lora_b is not None:
        lora = (lora_xa, lora_b)
        if check:
            check_lora(lora, m, n, fmt)
    out = _quant.empty((m, n), out_dtype, xq.device)
    if not (m and n and k):
        out = _empty_product(out, bias)
        if lora is not None and m and n and lora_xa.shape[1]:  # K = 0: the branch alone (its x @ A^T is zero too)
            out += (lora_xa.float() @ lora_b.float().t()).to(out.dtype)
        return out
    if config is None:
        from .configs import get_config

        config = get_config(fmt.name, m, n, k)
    if lora is None:
        _launch(scaled_mm_spec(xq, x_scale, wq, w_scale, fmt, bias, out, config, tail=tail_args(xq, config)))
        return out
    if config.ws:  # the LoRA branch lives in the Triton kernel's epilogue
        config = WS_FALLBACK[fmt.is_block]
    key = (config, max(16, triton.next_power_of_2(lora_xa.shape[1])), lora_xa.element_size())
    c = _LORA_CONFIGS.get(key)
    if c is None:
        c = dataclasses.replace(config, num_stages=_lora_stages_guess(config, key[1], key[2]))
    while True:
        try:
            _launch(scaled_mm_spec(xq, x_scale, wq, w_scale, fmt, bias, out, c, lora))
            break
        except OutOfResources:  # raised when the compiled kernel is loaded, before anything runs
            if c.num_stages <= 1:
                raise
            c = dataclasses.replace(c, num_stages=c.num_stages - 1)
        except Exception:  # noqa: BLE001 -- a compiler that refuses the persistent loop with the LoRA dot
            if not c.persistent:
                raise
            c = dataclasses.replace(c, persistent=False)
    _LORA_CONFIGS[key] = c
    return out


_LORA_CONFIGS: dict = {}
"""The launch configuration of a LoRA GEMM per (tuned config, padded rank, operand bytes): the LoRA operands
take shared memory next to the main loop's stage buffers (the compiler keeps both live: on an H200
128x256x128 int8 at 4 stages with r 64 in one chunk asked for 264 KiB of the 227 available), so a launch that
does not fit drops a stage; a persistent kernel the compiler refuses becomes the tiled one."""
SMEM_BYTES = 232448  # Hopper's per-block opt-in limit; a GPU with less makes the launch retry with fewer stages


def _smem_guess(c: Config, stages: int, chunk: int, esize: int) -> int:
    """Shared memory of a LoRA launch: the 8-bit stage buffers plus 1.5x one chunk of the LoRA tiles (the
    measured overhead of their layout conversion: 264 KiB for 128x256x128, 4 stages, r 64 in one chunk)."""
    return stages * (c.block_m + c.block_n) * c.block_k + (c.block_m + c.block_n) * chunk * esize * 3 // 2


def lora_chunk(c: Config, r_pad: int, esize: int) -> int:
    """Columns of r per epilogue dot: the widest (<= 64) that keeps the config's pipeline within SMEM_BYTES."""
    chunk = min(64, r_pad)
    while chunk > 16 and _smem_guess(c, c.num_stages, chunk, esize) > SMEM_BYTES:
        chunk //= 2
    return chunk


def _lora_stages_guess(c: Config, r_pad: int, esize: int) -> int:
    """The deepest pipeline that fits SMEM_BYTES by the guess above; the launch loop corrects a wrong guess."""
    chunk = lora_chunk(c, r_pad, esize)
    stages = c.num_stages
    while stages > 1 and _smem_guess(c, stages, chunk, esize) > SMEM_BYTES:
        stages -= 1
    return stages


# ----------------------------------------------------------------------------------------------------------
# weight-only product for few rows (M <= 128): the activation stays in its float dtype


@triton.jit
def _wo_epilogue(acc, rn, rn_c, rm, m_ok, N, ws_ptr, bias_ptr, out_ptr, stride_om, stride_wsn,
                 W_GRAN: tl.constexpr, HAS_BIAS: tl.constexpr, MANUAL_RNE: tl.constexpr):  # fmt: skip
    """Row / tensor scale, bias, cast and the transposed store of a [BLOCK_N, BLOCK_M] tile into out [M, N]."""
    if W_GRAN == 1:
        acc = acc * tl.load(ws_ptr + rn_c * stride_wsn)[:, None]
    elif W_GRAN == 0:
        acc = acc * tl.load(ws_ptr)
    if HAS_BIAS:
        acc += tl.load(bias_ptr + rn_c).to(tl.float32)[:, None]
    out = out_ptr + rm[None, :].to(tl.int64) * stride_om + rn[:, None]
    tl.store(out, cast_rne(acc, out_ptr.dtype.element_ty, MANUAL_RNE), mask=(rn < N)[:, None] & m_ok)


@triton.jit(do_not_specialize=["M"])
def _weight_only_kernel(
    x_ptr, w_ptr, ws_ptr, bias_ptr, out_ptr, part_ptr, count_ptr, M, N, K, K_SLICE,
    stride_xm, stride_xk, stride_om, stride_wsn, stride_wsk,
    W_GRAN: tl.constexpr, HAS_BIAS: tl.constexpr, EVEN_K: tl.constexpr, F32_DOT: tl.constexpr,
    MANUAL_RNE: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
    SUB_K: tl.constexpr, SPLIT_K: tl.constexpr,
):  # fmt: skip
    """y [M, N] = x [M, K] @ (w [N, K] * scale)^T + bias with M <= BLOCK_M. Program (i, j) reads weight rows
    i*BLOCK_N.. over the K slice j*K_SLICE.. once (memory-bound: the weight bytes are the traffic; the split
    over K gives every SM several programs even when N is narrow). The product is computed transposed, w
    [BLOCK_N, K] as the tensor cores' wide operand and x^T [K, BLOCK_M] as the narrow one, so BLOCK_M can stay
    at the 16-row minimum. int8 and e4m3 values are exact in bf16 / fp16, so the products are exact and
    accumulate in fp32. W_GRAN: 0 one scale, 1 per row, 2 per 128x128 block (SUB_K == 128 and BLOCK_N divides
    128: one scale per tile and K block, applied to that block's partial).

    SPLIT_K > 1: each program stores its fp32 partial in part [SPLIT_K, BLOCK_M, N] and counts itself in
    count[i]; the last of the tile's programs to arrive sums the partials in slice order (deterministic),
    finishes the tile and sets count[i] back to 0, so the counters are zero again for the next launch."""
    pid_n = tl.program_id(0)
    pid_k = tl.program_id(1)
    rn = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    rn_c = tl.minimum(rn, N - 1)  # rows past N load a valid row; never stored
    rm = tl.arange(0, BLOCK_M)
    m_ok = (rm < M)[None, :]
    cdt = x_ptr.dtype.element_ty
    w_rows = w_ptr + rn_c[:, None].to(tl.int64) * K
    x_rows = x_ptr + rm[None, :].to(tl.int64) * stride_xm
    acc = tl.zeros([BLOCK_N, BLOCK_M], dtype=tl.float32)
    k_lo = pid_k * K_SLICE
    for k0 in range(k_lo, tl.minimum(k_lo + K_SLICE, K), BLOCK_K):
        for kk in tl.static_range(BLOCK_K // SUB_K):
            rk = k0 + kk * SUB_K + tl.arange(0, SUB_K)
            if EVEN_K:
                w = tl.load(w_rows + rk[None, :])
                xt = tl.load(x_rows + rk[:, None] * stride_xk, mask=m_ok, other=0.0)
            else:
                k_ok = rk < K
                w = tl.load(w_rows + rk[None, :], mask=k_ok[None, :], other=0.0)
                xt = tl.load(x_rows + rk[:, None] * stride_xk, mask=m_ok & k_ok[:, None], other=0.0)
            if F32_DOT:  # fp32 x, or the interpreter (its int8 -> bf16 cast and bf16 dot are wrong in triton 3.6)
                p = tl.dot(w.to(tl.float32), xt.to(tl.float32), input_precision="ieee")
            else:
                p = tl.dot(w.to(cdt), xt)
            if W_GRAN == 2:
                kb = (k0 + kk * SUB_K) // 128
                acc += p * tl.load(ws_ptr + (pid_n * BLOCK_N // 128) * stride_wsn + kb * stride_wsk)
            else:
                acc += p
    if SPLIT_K == 1:
        _wo_epilogue(acc, rn, rn_c, rm, m_ok, N, ws_ptr, bias_ptr, out_ptr, stride_om, stride_wsn,
                     W_GRAN, HAS_BIAS, MANUAL_RNE)  # fmt: skip
    else:
        part = part_ptr + rm[None, :].to(tl.int64) * N + rn[:, None]
        tile_ok = (rn < N)[:, None] & m_ok
        tl.store(part + pid_k.to(tl.int64) * BLOCK_M * N, acc, mask=tile_ok)
        tl.debug_barrier()  # every thread's partial is written before the release below
        arrived = tl.atomic_add(count_ptr + pid_n, 1, sem="acq_rel", scope="gpu")
        if arrived == SPLIT_K - 1:
            total = tl.zeros([BLOCK_N, BLOCK_M], dtype=tl.float32)
            for j in tl.static_range(SPLIT_K):  # .cg: read the other programs' partials from L2, not L1
                total += tl.load(part + j * BLOCK_M * N, mask=tile_ok, other=0.0, cache_modifier=".cg")
            tl.atomic_xchg(count_ptr + pid_n, 0, sem="relaxed", scope="gpu")
            _wo_epilogue(total, rn, rn_c, rm, m_ok, N, ws_ptr, bias_ptr, out_ptr, stride_om, stride_wsn,
                         W_GRAN, HAS_BIAS, MANUAL_RNE)  # fmt: skip


_WO_WORKSPACE: dict = {}


def wo_workspace(device: torch.device, stream: int, c: Config, n: int):
    """(partials f32 [split_k, block_m, N], counters int32 [N tiles] all zero) kept per device, stream and
    shape: launches on one stream run one after another and leave the counters at zero. None while a CUDA
    graph is being captured and none exists yet (zeroing inside a capture would only happen on replay). Never
    evicted (launch plans hold their addresses; ``ops.clear_plans`` drops both); bounded by the distinct
    (stream, N, tile) combinations a process uses."""
    key = (device.index, stream, c.split_k, c.block_m, c.block_n, n)
    got = _WO_WORKSPACE.get(key)
    if got is None:
        if device.type == "cuda" and torch.cuda.is_current_stream_capturing():
            return None
        got = _WO_WORKSPACE[key] = (torch.empty((c.split_k, c.block_m, n), dtype=torch.float32, device=device),
                                    torch.zeros(triton.cdiv(n, c.block_n), dtype=torch.int32, device=device))  # fmt: skip
    return got


def weight_only_spec(x, wq, w_scale, fmt: F.Format, bias, out, c: Config, workspace=None) -> _quant.Spec:
    """The launch of the weight-only product for x [M, K] (any strides, 0 < M <= c.block_m), wq [N, K]
    contiguous, into ``out`` [M, N] (row stride ``out.stride(0)``, unit column stride). ``c``: block_m (a
    power of two >= 16 and >= M), block_n, block_k (for block formats a multiple of 128 and block_n dividing
    128), num_warps, num_stages, split_k (> 1 needs ``workspace`` from ``wo_workspace``)."""
    m, k = x.shape
    n = wq.shape[0]
    if fmt.is_block and (c.block_k % F.BLOCK or F.BLOCK % c.block_n):
        raise ShapeError(f"config {c} invalid for weight-only {fmt.name}: needs block_k % 128 == 0, 128 % block_n == 0")
    split = c.split_k if workspace is not None else 1
    steps = triton.cdiv(k, c.block_k)
    split = max(1, min(split, steps))
    k_slice = triton.cdiv(steps, split) * c.block_k
    split = triton.cdiv(k, k_slice)  # no empty slices
    part, count = workspace if split > 1 else (None, None)
    gran = {"tensor": 0, "row": 1, "block": 2}[fmt.weight_granularity]
    wss = w_scale.stride()
    ws_stride = (wss[0], wss[1] if len(wss) > 1 else 0) if wss else (0, 0)
    sxm, sxk = x.stride()
    key = (x.dtype, wq.dtype, out.dtype, w_scale.dtype, None if bias is None else bias.dtype, x.data_ptr() & 15,
           wq.data_ptr() & 15, w_scale.data_ptr() & 15, 0 if bias is None else bias.data_ptr() & 15,
           n, k, k_slice, sxm, sxk, out.stride(0), ws_stride)  # fmt: skip
    args = (x, wq, w_scale, bias, out, part, count, m, n, k, k_slice, sxm, sxk, out.stride(0), ws_stride[0],
            ws_stride[1])  # fmt: skip
    return _quant.Spec(
        _weight_only_kernel, (triton.cdiv(n, c.block_n), split), args,
        dict(W_GRAN=gran, HAS_BIAS=bias is not None, EVEN_K=k % c.block_k == 0,
             F32_DOT=INTERPRET or x.dtype == torch.float32, MANUAL_RNE=INTERPRET,
             BLOCK_M=c.block_m, BLOCK_N=c.block_n, BLOCK_K=c.block_k,
             SUB_K=F.BLOCK if fmt.is_block else c.block_k, SPLIT_K=split),
        c.num_warps, c.num_stages, key=key,
    )  # fmt: skip


def weight_only_linear(
    x: torch.Tensor,
    wq: torch.Tensor,
    w_scale: torch.Tensor,
    fmt,
    bias: torch.Tensor | None = None,
    out_dtype: torch.dtype | None = None,
    config: Config | None = None,
) -> torch.Tensor:
    """y [M, N] = x [M, K] @ dequant(wq [N, K])^T + bias for few rows (M <= 128), without quantizing x: one
    launch that reads the 8-bit weight once. x: bf16 / fp16 / fp32, any strides; out ``out_dtype`` (default
    x's). More accurate than W8A8 (only the weight is quantized)."""
    fmt = F.get_format(fmt)
    m, k = x.shape
    n = wq.shape[0]
    check_weight_side(wq, w_scale, fmt, bias, k)
    if m > 128:
        raise ShapeError(f"weight_only_linear takes at most 128 rows, got M={m}; use the W8A8 GEMM")
    out = _quant.empty((m, n), out_dtype or x.dtype, x.device)
    if not (m and n and k):
        return _empty_product(out, bias)
    if config is None:
        from .configs import weight_only_config

        config = weight_only_config(fmt.name, m, n, k)
    ws = None
    if config.split_k > 1:
        stream = torch._C._cuda_getCurrentRawStream(x.device.index) if x.is_cuda else 0
        ws = wo_workspace(x.device, stream, config, n)
    _launch(weight_only_spec(x, wq.contiguous(), w_scale, fmt, bias, out, config, ws))
    return out


def check_weight_side(wq, w_scale, fmt: F.Format, bias, k: int) -> None:
    """The weight, its scale and the bias of a linear whose activation has K=k; ShapeError naming what is wrong."""
    if wq.dim() != 2 or wq.shape[1] != k or wq.dtype != fmt.storage:
        raise ShapeError(f"linear: the activation has K={k} but the {fmt.name} weight is {wq.dtype} {tuple(wq.shape)}")
    n = wq.shape[0]
    ok = (tuple(w_scale.shape) == fmt.weight_scale_shape(n, k) if fmt.is_block
          else w_scale.numel() == (1 if fmt.weight_granularity == "tensor" else n))  # fmt: skip
    if not ok:
        raise ShapeError(f"linear {fmt.name}: weight {tuple(wq.shape)} does not go with a scale of shape {tuple(w_scale.shape)}")
    if bias is not None and tuple(bias.shape) != (n,):
        raise ShapeError(f"linear: bias has shape {tuple(bias.shape)}, expected ({n},)")
