"""Block-format linear with the activation quantization fused into the GEMM, kernel beside its wrapper.

``y [M, N] = act_quant(x) @ dequant(wq)^T + bias`` for ``int8-block`` / ``fp8-block`` in one launch, x read in
its float dtype (bf16 / fp16 / fp32). The activation scale of these formats belongs to one (row, 128-wide K
block), so a program that holds the x tile [BLOCK_M, 128] of a K block holds everything its scale depends on:
per K block it takes the row amax of the tile, scale = max(amax, AMAX_EPS) / qmax, quantizes the tile in
registers, multiplies it with the weight tile on the tensor cores and promotes the product with
``x_scale[m, kb] * w_scale[n // 128, kb]`` into an fp32 accumulator. This drops the separate activation-
quantization launch and its HBM round trip (2 bytes read + 1 byte written + 1 byte read again per x element,
plus the scales), at the price of quantizing each x tile once per N tile (ALU work, no memory traffic).

Same math as ``quant.act_quant`` (its own functions: scale rounding, division mode, rounding and clamp)
followed by ``gemm.scaled_mm`` (same promotion order over K blocks): the result is bit-identical to the
two-kernel path, under the interpreter (tests) and on an H200 (measured at four issue-3 shapes).

Measured on an H200 (bench/NOTES.md, GEMM round 3): 0.3-0.6x cuBLAS bf16, about half the speed of act_quant +
scaled_mm at every issue-3 shape, so ``ops.linear`` does not use it; ``ditq bench gemm`` times it as the column
"<format> fused". Why: the x tile of a K block is quantized again by each of the N/BLOCK_N programs that read
it (24-108x at DiT widths), ~500 more instructions per thread per K block (unpack, row max, shuffles, exact
reciprocal, scale, round, pack, a pass through shared memory to the wgmma operand layout), while the
activation-quantization kernel it replaces took only 5-20% of the linear.

Layouts: x [M, K] any strides (pointer loads; K % 128 == 0), wq [N, K] row-major int8 / float8_e4m3fn (TMA when
16-byte aligned), w_scale f32 [N/128, K/128] any strides, bias [N] any float dtype, out [M, N] ``out_dtype``.
``BLOCK_N`` 256 runs two 128-wide products per K block that share one quantized x tile (half the quantization
work per output element); it needs one weight scale per 128 columns, which is why it is split in two.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import triton
import triton.language as tl

from .. import formats as F
from ..errors import ShapeError
from . import INTERPRET
from . import quant as _quant
from .gemm import _promote, _tile_coords, _tma_ok, check_weight_side, store_tile
from .quant import _divide, _scale_of, _to_storage, cast_rne


@dataclass(frozen=True)
class FusedConfig:
    """Launch configuration of the fused kernel. ``block_n``: 64, 128 or 256 (256 = two 128-wide halves).
    ``w_tma`` / ``x_tma``: weight / activation tiles by TMA (else pointer loads). ``split_k`` is always 1: ops' single-launch plans read it."""

    block_m: int
    block_n: int
    num_warps: int = 4
    num_stages: int = 3
    group_m: int = 8
    w_tma: bool = True
    maxnreg: int = 0
    x_tma: bool = False
    split_k: int = 1

    def as_list(self) -> list:
        return [self.block_m, self.block_n, self.num_warps, self.num_stages, self.group_m, int(self.w_tma), self.maxnreg,
                int(self.x_tma)]  # fmt: skip


@triton.jit
def _quant_tile(x, QMAX: tl.constexpr, RCP_QMAX: tl.constexpr, IS_INT: tl.constexpr, FP8_MANUAL: tl.constexpr,
                EXACT_DIV: tl.constexpr):  # fmt: skip
    """x [BLOCK_M, 128] float -> (q [BLOCK_M, 128] int8 / e4m3, scale f32 [BLOCK_M]) by act_quant's own
    functions. (Without the clamp to +-qmax, which never changes a finite value here, ptxas contracted
    x * inv + 1.5 * 2^23 into one FFMA, one rounding instead of two: on an H200 12-20% of the bf16 outputs
    then differed from the two-kernel path's in the last bit, none with the clamp.)"""
    xf = x.to(tl.float32)
    scale = _scale_of(tl.max(tl.abs(xf), axis=1), QMAX, RCP_QMAX)
    inv = tl.div_rn(tl.full(scale.shape, 1.0, tl.float32), scale)
    q = _to_storage(_divide(xf, scale[:, None], inv[:, None], EXACT_DIV), QMAX, IS_INT, FP8_MANUAL)
    return q, scale


@triton.jit
def _load_w(w_ptr, w_desc, row0, k, N, stride_wn, W_TMA: tl.constexpr, SUB_N: tl.constexpr):
    """Weight tile [SUB_N, 128] at rows row0.., K columns k..; rows past N read valid rows (never stored)."""
    if W_TMA:
        return w_desc.load([row0, k])
    rn = (row0 + tl.arange(0, SUB_N)) % N
    return tl.load(w_ptr + rn[:, None].to(tl.int64) * stride_wn + (k + tl.arange(0, 128))[None, :])


@triton.jit
def _store_tile(acc, off_m, col0, M, N, bias_ptr, out_ptr, stride_om, HAS_BIAS: tl.constexpr,
                MANUAL_RNE: tl.constexpr, BLOCK_M: tl.constexpr, SUB_N: tl.constexpr):  # fmt: skip
    """Bias, cast, masked store of an accumulator tile at (off_m, col0)."""
    store_tile(acc, off_m + tl.arange(0, BLOCK_M), col0 + tl.arange(0, SUB_N), M, N, bias_ptr, out_ptr, stride_om,
               HAS_BIAS, MANUAL_RNE)  # fmt: skip


@triton.jit(do_not_specialize=["M"])
def _fused_block_linear_kernel(
    x_ptr, x_desc, w_ptr, w_desc, ws_ptr, bias_ptr, out_ptr,
    M, N, K, stride_xm, stride_xk, stride_wn, stride_om, stride_wsn, stride_wsk,
    QMAX: tl.constexpr, RCP_QMAX: tl.constexpr, IS_INT: tl.constexpr, FP8_MANUAL: tl.constexpr,
    EXACT_DIV: tl.constexpr, HAS_BIAS: tl.constexpr, X_TMA: tl.constexpr, W_TMA: tl.constexpr,
    MANUAL_RNE: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, GROUP_M: tl.constexpr,
):  # fmt: skip
    """One output tile [BLOCK_M, BLOCK_N] per program (grouped order); per 128-wide K block: load x tile, quantize
    it (scale per row), product with the weight tile(s), promote with x_scale * w_scale."""
    SUB_N: tl.constexpr = BLOCK_N if BLOCK_N < 128 else 128
    TWO: tl.constexpr = BLOCK_N == 256
    dot_ty: tl.constexpr = tl.int32 if IS_INT else tl.float32
    off_m, off_n = _tile_coords(tl.program_id(0), M, N, BLOCK_M, BLOCK_N, GROUP_M)
    rm = (off_m + tl.arange(0, BLOCK_M)) % M  # rows past M read valid rows (never stored)
    x_rows = x_ptr + rm[:, None].to(tl.int64) * stride_xm + tl.arange(0, 128)[None, :] * stride_xk
    ws0 = ws_ptr + (off_n // 128) * stride_wsn
    # second half's weight-scale row, clamped for a last tile whose second half lies past N (not stored)
    ws1 = ws_ptr + tl.minimum(off_n // 128 + 1, N // 128 - 1) * stride_wsn
    acc0 = tl.zeros([BLOCK_M, SUB_N], dtype=tl.float32)
    acc1 = tl.zeros([BLOCK_M, SUB_N], dtype=tl.float32)
    for kb in range(0, K // 128):
        k = kb * 128
        if X_TMA:  # rows past M are zero-filled by the copy engine
            x = x_desc.load([off_m, k])
        else:
            x = tl.load(x_rows + k.to(tl.int64) * stride_xk)
        q, xs = _quant_tile(x, QMAX, RCP_QMAX, IS_INT, FP8_MANUAL, EXACT_DIV)
        b0 = _load_w(w_ptr, w_desc, off_n, k, N, stride_wn, W_TMA, SUB_N)
        p0 = tl.dot(q, tl.trans(b0), out_dtype=dot_ty)
        if TWO:
            b1 = _load_w(w_ptr, w_desc, off_n + 128, k, N, stride_wn, W_TMA, SUB_N)
            p1 = tl.dot(q, tl.trans(b1), out_dtype=dot_ty)  # issued before p0 is promoted
            acc1 += _promote(p1, IS_INT, False) * (xs * tl.load(ws1 + kb * stride_wsk))[:, None]
        acc0 += _promote(p0, IS_INT, False) * (xs * tl.load(ws0 + kb * stride_wsk))[:, None]
    _store_tile(acc0, off_m, off_n, M, N, bias_ptr, out_ptr, stride_om, HAS_BIAS, MANUAL_RNE, BLOCK_M, SUB_N)
    if TWO:
        _store_tile(acc1, off_m, off_n + 128, M, N, bias_ptr, out_ptr, stride_om, HAS_BIAS, MANUAL_RNE, BLOCK_M, SUB_N)


def check_activation(x: torch.Tensor, fmt: F.Format) -> None:
    """x of a fused block linear: 2-D float, K divisible by 128; ShapeError / UnsupportedFormat otherwise."""
    if not fmt.is_block:
        raise ShapeError(f"fused_linear is for the block formats (int8-block, fp8-block), got {fmt.name}; use ops.linear")
    if x.dim() != 2 or not x.is_floating_point():
        raise ShapeError(f"fused_linear takes a 2-D float activation [M, K], got {x.dtype} {tuple(x.shape)}; reshape first")
    if x.shape[1] % F.BLOCK:
        raise ShapeError(f"activation has K={x.shape[1]}: format {fmt.name} needs K divisible by {F.BLOCK}")


def fused_linear_spec(x, wq, w_scale, fmt: F.Format, bias, out, c: FusedConfig, exact: bool) -> _quant.Spec:
    """The launch of the fused linear for checked operands (M, N, K > 0): x [M, K], wq [N, K] contiguous, into
    ``out`` [M, N] (unit column stride). TMA operands: x's (``spec.args[1]``, only with ``c.x_tma`` and a
    16-byte aligned x with unit inner stride), then the weight's (``spec.args[3]``)."""
    m, k = x.shape
    n = wq.shape[0]
    if c.block_n not in (64, 128, 256):
        raise ShapeError(f"fused config {c}: block_n must be 64, 128 or 256")
    w_tma = c.w_tma and _tma_ok(wq)
    w_desc = _quant.Tma(wq, (min(c.block_n, 128), F.BLOCK)) if w_tma else None
    x_tma = c.x_tma and _tma_ok(x)
    x_desc = _quant.Tma(x, (c.block_m, F.BLOCK)) if x_tma else None
    sxm, sxk = x.stride()
    wss = w_scale.stride()
    rcp = _quant._rcp(fmt.qmax) if x.is_cuda else 0.0
    key = (x.dtype, out.dtype, w_scale.dtype, None if bias is None else bias.dtype, x.data_ptr() & 15,
           wq.data_ptr() & 15, w_scale.data_ptr() & 15, 0 if bias is None else bias.data_ptr() & 15,
           n, k, sxm, sxk, wq.stride(0), out.stride(0), wss, x_tma)  # fmt: skip
    args = (x, x_desc, wq, w_desc, w_scale, bias, out, m, n, k, sxm, sxk, wq.stride(0), out.stride(0), wss[0], wss[1])
    tiles = triton.cdiv(m, c.block_m) * triton.cdiv(n, c.block_n)
    opts = {"maxnreg": c.maxnreg} if c.maxnreg else {}
    return _quant.Spec(
        _fused_block_linear_kernel, (tiles,), args,
        dict(QMAX=fmt.qmax, RCP_QMAX=rcp, IS_INT=fmt.is_int, FP8_MANUAL=INTERPRET, EXACT_DIV=exact,
             HAS_BIAS=bias is not None, X_TMA=x_tma, W_TMA=w_tma, MANUAL_RNE=INTERPRET,
             BLOCK_M=c.block_m, BLOCK_N=c.block_n, GROUP_M=c.group_m),
        c.num_warps, c.num_stages, key=key, **opts,
    )  # fmt: skip


FUSED_CONFIGS = {
    "int8-block": FusedConfig(64, 256, 8, 3),
    "fp8-block": FusedConfig(64, 128, 4, 3, x_tma=True),
}
"""The fastest configuration per format in the H200 sweep (bench/NOTES.md, GEMM round 3; within 3% of each other
across shapes): int8 prefers two 128-wide halves sharing one quantized x tile, fp8 TMA loads of x."""


def fused_config(fmt: str, m: int, n: int, k: int) -> FusedConfig:
    """The fused kernel's configuration for a block format and shape."""
    if INTERPRET:
        return FusedConfig(32, 128, 4, 1)
    return FUSED_CONFIGS[fmt]


def fused_linear(
    x: torch.Tensor,
    wq: torch.Tensor,
    w_scale: torch.Tensor,
    fmt,
    bias: torch.Tensor | None = None,
    out_dtype: torch.dtype | None = None,
    config: FusedConfig | None = None,
    exact_div: bool | None = None,
) -> torch.Tensor:
    """y [M, N] ``out_dtype`` (default x's) = act_quant(x [M, K]) @ dequant(wq [N, K])^T + bias in one launch,
    for int8-block / fp8-block; x bf16 / fp16 / fp32, any strides. ``exact_div`` as ``quant.act_quant``
    (default: only under the interpreter)."""
    fmt = F.get_format(fmt)
    check_activation(x, fmt)
    m, k = x.shape
    check_weight_side(wq, w_scale, fmt, bias, k)
    n = wq.shape[0]
    out = _quant.empty((m, n), out_dtype or x.dtype, x.device)
    if not (m and n and k):
        from .gemm import _empty_product

        return _empty_product(out, bias)
    exact = INTERPRET if exact_div is None else exact_div
    c = config or fused_config(fmt.name, m, n, k)
    if fmt.is_int and c.block_m < 64 and x.stride(1) != 1 and x.is_cuda:
        # measured wrong on an H200 (relative error 1.0, every x dtype; bench/NOTES.md, GEMM round 3): int8 tiles
        # of 16 rows loaded from an x with a non-unit column stride. 64-row tiles, fp8 and unit strides are right.
        x = x.contiguous()
    _quant.launch(fused_linear_spec(x, wq.contiguous(), w_scale, fmt, bias, out, c, exact))
    return out
