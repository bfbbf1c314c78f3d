"""The down-projection of a LoRA branch fused into per-token activation quantization: one kernel reads x
[M, K] and writes q, its per-token scale and xa = x @ A^T [M, r], the input of the GEMM's LoRA epilogue
(``gemm.scaled_mm(..., lora_xa, lora_b)``).

Off by default (``FUSED_XA``): measured slower than act_quant + cuBLAS. Why it was tried: x @ A^T alone reads all of x (28 MB at 4608 x 3072 bf16), and cuBLAS's skinny GEMM took 15-44 us for
it on an H200 (bench/NOTES.md), as much as the whole 15% budget of a DiT linear. The quantization reads x
anyway; here each program takes BLOCK_M rows, sweeps K once for the row maxima and the product with A
(A's [BLOCK_K, r] tiles come from L2, shared by all programs), then sweeps K again, backwards, to quantize
the rows it just read (mostly L2 hits: the most recent tiles first).

q and the scale are bit for bit those of ``quant.act_quant`` (same per-element math; the row maximum does not
depend on the order).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from .. import formats as F
from ..errors import ShapeError
from . import INTERPRET
from . import quant as _quant
from .quant import _divide, _rcp, _scale_of, _to_storage, cast_rne

FUSED_XA = False
"""Compute x @ A^T in the activation-quantization kernel instead of a separate cuBLAS GEMM. Off: on an H200 this
kernel took 45-290 us where act_quant + cuBLAS took 32-98 us (bench/NOTES.md, LoRA round 3); kept, tested,
for the next attempt (its A tile loads are strided gathers, the likely culprit)."""


@triton.jit
def _act_quant_lora_kernel(
    x_ptr, a_ptr, q_ptr, s_ptr, xa_ptr, M, K, stride_xm, stride_xk, stride_ar,
    QMAX: tl.constexpr, RCP_QMAX: tl.constexpr, IS_INT: tl.constexpr, FP8_MANUAL: tl.constexpr,
    EXACT_DIV: tl.constexpr, LORA_RANK: tl.constexpr, LORA_R: tl.constexpr, F32_DOT: tl.constexpr,
    MANUAL_RNE: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_K: tl.constexpr,
):  # fmt: skip
    """Program i: rows i*BLOCK_M.. of x [M, K] (any strides). q [M, K] contiguous, s f32 [M] (per token),
    xa [M, LORA_RANK] contiguous in A's dtype = x (cast to A's dtype) @ A^T with A [LORA_RANK, K] (row stride
    stride_ar, unit column stride), fp32 accumulation. LORA_R: LORA_RANK rounded up to a power of two >= 16."""
    rm = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    m_ok = rm < M
    x_rows = x_ptr + tl.minimum(rm, M - 1)[:, None].to(tl.int64) * stride_xm  # rows past M: a valid row, not stored
    rr = tl.arange(0, LORA_R)
    r_ok = rr < LORA_RANK
    offs = tl.arange(0, BLOCK_K)
    amax = tl.zeros([BLOCK_M], dtype=tl.float32)
    xa = tl.zeros([BLOCK_M, LORA_R], dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):
        rk = k0 + offs
        k_ok = rk < K
        x = tl.load(x_rows + rk[None, :] * stride_xk, mask=k_ok[None, :], other=0.0)
        amax = tl.maximum(amax, tl.max(tl.abs(x.to(tl.float32)), axis=1))
        at = tl.load(a_ptr + rr[None, :] * stride_ar + rk[:, None], mask=r_ok[None, :] & k_ok[:, None], other=0.0)
        if F32_DOT:  # fp32 operands, or the interpreter (its bf16 dot is wrong in triton 3.6)
            xa = tl.dot(x.to(at.dtype).to(tl.float32), at.to(tl.float32), xa, input_precision="ieee")
        else:
            xa = tl.dot(x.to(at.dtype), at, xa)
    scale = _scale_of(amax, QMAX, RCP_QMAX)
    inv = tl.div_rn(tl.full(scale.shape, 1.0, tl.float32), scale)
    q_rows = q_ptr + rm[:, None].to(tl.int64) * K
    n_k = tl.cdiv(K, BLOCK_K)
    for i in range(0, n_k):
        k0 = (n_k - 1 - i) * BLOCK_K  # backwards: the tiles read last are the likeliest still in L2
        rk = k0 + offs
        k_ok = rk < K
        x = tl.load(x_rows + rk[None, :] * stride_xk, mask=k_ok[None, :], other=0.0).to(tl.float32)
        q = _to_storage(_divide(x, scale[:, None], inv[:, None], EXACT_DIV), QMAX, IS_INT, FP8_MANUAL)
        tl.store(q_rows + rk[None, :], q, mask=m_ok[:, None] & k_ok[None, :])
    tl.store(s_ptr + rm, scale, mask=m_ok)
    xa_out = xa_ptr + rm[:, None].to(tl.int64) * LORA_RANK + rr[None, :]
    tl.store(xa_out, cast_rne(xa, xa_ptr.dtype.element_ty, MANUAL_RNE), mask=m_ok[:, None] & r_ok[None, :])


BLOCK_M = 16
BLOCK_K = 128
NUM_WARPS = 4
NUM_STAGES = 3


def act_quant_lora(x: torch.Tensor, fmt, lora_a: torch.Tensor, exact_div: bool | None = None):
    """(q [M, K], scale f32 [M, 1], xa [M, r]) of x [M, K] (bf16/fp16/fp32, any strides) for a per-token
    format: q and scale as ``quant.act_quant``, xa = x @ lora_a^T in lora_a's dtype (lora_a [r, K], unit
    column stride; x is cast to lora_a's dtype for the product, fp32 accumulation)."""
    fmt = F.get_format(fmt)
    if x.dim() != 2 or fmt.act_granularity != "token":
        raise ShapeError(f"act_quant_lora takes a 2-D [M, K] activation and a per-token format, got {tuple(x.shape)} "
                         f"and {fmt.name}")  # fmt: skip
    m, k = x.shape
    r = lora_a.shape[0]
    if lora_a.dim() != 2 or lora_a.shape[1] != k or lora_a.stride(1) != 1:
        raise ShapeError(f"act_quant_lora: lora_a must be [r, K={k}] with unit column stride, got "
                         f"{tuple(lora_a.shape)} strides {tuple(lora_a.stride())}")  # fmt: skip
    exact = INTERPRET if exact_div is None else exact_div
    q = _quant.empty((m, k), fmt.storage, x.device)
    s = _quant.empty((m, 1), torch.float32, x.device)
    xa = _quant.empty((m, r), lora_a.dtype, x.device)
    if not (m and k and r):
        q2, s2 = _quant.act_quant(x, fmt, exact)
        return q2, s2, xa.zero_()
    sm, sk, sa = x.stride(0), x.stride(1), lora_a.stride(0)
    key = (x.dtype, lora_a.dtype, x.data_ptr() & 15, lora_a.data_ptr() & 15, m & 15, m == 1, k & 15, k == 1,
           sm & 15, sm == 1, sk & 15, sk == 1, sa & 15, sa == 1, sm > 0x7FFFFFFF)  # fmt: skip
    spec = _quant.Spec(
        _act_quant_lora_kernel, (triton.cdiv(m, BLOCK_M),), (x, lora_a, q, s, xa, m, k, sm, sk, sa),
        dict(QMAX=fmt.qmax, RCP_QMAX=_rcp(fmt.qmax) if x.is_cuda else 0.0, IS_INT=fmt.is_int, FP8_MANUAL=INTERPRET,
             EXACT_DIV=exact, LORA_RANK=r, LORA_R=max(16, triton.next_power_of_2(r)),
             F32_DOT=INTERPRET or lora_a.dtype == torch.float32, MANUAL_RNE=INTERPRET, BLOCK_M=BLOCK_M,
             BLOCK_K=BLOCK_K),
        NUM_WARPS, NUM_STAGES, key=key,
    )  # fmt: skip
    _quant.launch(spec)
    return q, s, xa
