"""Hadamard-rotated int8 activations ("ConvRot", FORMATS.md): one Triton kernel that rotates every group of g
channels of a token by H_g and quantizes the token to int8 (per-token scale), beside its wrapper; and
``rotated_linear``, that kernel followed by the int8-row GEMM of ``gemm.py``.

The math is the reference's: ``quantize_activation_ref(rotate(x, g), "int8-row")`` with the rotation in fp32
(``formats.rotate`` of ``x.float()``). H_g is the Kronecker power of H_4 over sqrt(g); the kernel multiplies by
the +-1 matrix and then by 1/sqrt(g) (a power of two, so exact):

- g = 16 or 64: one ``tl.dot`` of the [tokens * K/g, g] view with the g x g sign matrix.
- g = 256 (``KRON``): H_256 = H_16 (x) H_16, so a group seen as a 16 x 16 matrix V becomes H_16 V H_16: two
  dots with the 16 x 16 sign matrix and a transpose in between -- 32 multiply-adds per value instead of 256.
  ``KRON=False`` does the single 256-wide dot instead (kept for the benchmark to compare).

The sign matrix is generated in registers (entry (i, j) of H_4^(x)n is -1 for an odd count of base-4 digit
positions where i_d + j_d = 3), so no operand is loaded for it. Dot precision (``DOT_*`` constexprs): 0 = fp32
``ieee`` (the interpreter, whose bf16 dot is wrong in triton 3.6), 1 = the operand's own 16-bit dtype (exact:
the products are +-x), 2 = an fp32 operand split into three bf16 terms (fp32-accurate on tensor cores).
"""

from __future__ import annotations

import dataclasses

import torch
import triton
import triton.language as tl

from .. import formats as F
from ..errors import FormatError, ShapeError
from . import INTERPRET, triton_runs_on
from . import configs as _configs
from . import gemm as _gemm
from . import quant as _quant
from .quant import _divide, _scale_of, _to_storage

FMT = F.get_format("int8-row")
GROUPS = (16, 64, 256)
"""Rotation group sizes the kernel implements (those ComfyUI writes)."""
_MAX_TILE = 16384  # values of x held in registers by one program (the row is quantized in one pass up to this)

KRON_256 = True
"""g = 256 as two 16-wide dots (True) or one 256-wide dot (False); the benchmark times both."""
F32_DOT = 2
"""How fp32 operands meet the tensor cores on a GPU: 2 = three bf16 terms, 0 = fp32 ``ieee`` (FMA units)."""


@triton.jit
def _signs(HB: tl.constexpr, DIGITS: tl.constexpr):
    """The HB x HB +-1 matrix H_4^(x)DIGITS (fp32), built from the indices."""
    i = tl.arange(0, HB)[:, None]
    j = tl.arange(0, HB)[None, :]
    neg = tl.zeros([HB, HB], dtype=tl.int32)
    for d in tl.static_range(DIGITS):
        neg += (((i >> (2 * d)) & 3) + ((j >> (2 * d)) & 3) == 3).to(tl.int32)
    return tl.where((neg & 1) == 1, -1.0, 1.0)


@triton.jit
def _dot_signs(a, h, MODE: tl.constexpr):
    """a [R, HB] @ h [HB, HB] (+-1, fp32) in fp32; MODE as in the module docstring."""
    if MODE == 0:
        return tl.dot(a.to(tl.float32), h, input_precision="ieee")
    elif MODE == 1:
        return tl.dot(a, h.to(a.dtype))
    else:
        hb = h.to(tl.bfloat16)
        a = a.to(tl.float32)
        a1 = a.to(tl.bfloat16)
        r = a - a1.to(tl.float32)
        a2 = r.to(tl.bfloat16)
        a3 = (r - a2.to(tl.float32)).to(tl.bfloat16)
        acc = tl.dot(a1, hb)
        acc = tl.dot(a2, hb, acc)
        return tl.dot(a3, hb, acc)


@triton.jit
def _rotate_tile(x, BLOCK_M: tl.constexpr, BLOCK_K: tl.constexpr, G: tl.constexpr, KRON: tl.constexpr,
                 DOT_X: tl.constexpr, DOT_F32: tl.constexpr):  # fmt: skip
    """x [BLOCK_M, BLOCK_K] (BLOCK_K a multiple of G) -> fp32 [BLOCK_M, BLOCK_K], every G-group times H_G."""
    if KRON:  # G == 256 = 16 x 16
        h = _signs(16, 2)
        rows: tl.constexpr = BLOCK_M * BLOCK_K // 16
        y = _dot_signs(tl.reshape(x, [rows, 16]), h, DOT_X)  # V H: over the inner index of each group
        y = tl.reshape(tl.trans(tl.reshape(y, [rows // 16, 16, 16]), (0, 2, 1)), [rows, 16])
        y = _dot_signs(y, h, DOT_F32)  # (H V H)^T: over the outer index
        y = tl.reshape(tl.trans(tl.reshape(y, [rows // 16, 16, 16]), (0, 2, 1)), [BLOCK_M, BLOCK_K])
        return y * (1.0 / 16.0)
    else:
        DIGITS: tl.constexpr = 2 if G == 16 else (3 if G == 64 else 4)
        SQRT: tl.constexpr = 4.0 if G == 16 else (8.0 if G == 64 else 16.0)
        y = _dot_signs(tl.reshape(x, [BLOCK_M * BLOCK_K // G, G]), _signs(G, DIGITS), DOT_X)
        return tl.reshape(y, [BLOCK_M, BLOCK_K]) * (1.0 / SQRT)


@triton.jit
def _rotate_act_quant_kernel(
    x_ptr, q_ptr, s_ptr, M, K, stride_xm, stride_xk,
    RCP_QMAX: tl.constexpr, EXACT_DIV: tl.constexpr, G: tl.constexpr, KRON: tl.constexpr,
    DOT_X: tl.constexpr, DOT_F32: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_K: tl.constexpr,
    ONE_PASS: tl.constexpr,
):  # fmt: skip
    """Program i: rows i*BLOCK_M.. of x [M, K] (any strides). q [M, K] int8 contiguous = round(rot(x) / s),
    s [M] f32 = max|rot(x) row| / 127. ONE_PASS: the row (padded to BLOCK_K >= K) stays in registers; else
    an amax pass and a quantize pass over BLOCK_K chunks (the rotation is recomputed, x re-read from L2)."""
    rm = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    m_ok = (rm < M)[:, None]
    rk = tl.arange(0, BLOCK_K)
    x_rows = x_ptr + rm[:, None].to(tl.int64) * stride_xm
    q_rows = q_ptr + rm[:, None].to(tl.int64) * K
    if ONE_PASS:
        mask = m_ok & (rk < K)[None, :]
        x = tl.load(x_rows + rk[None, :] * stride_xk, mask=mask, other=0.0)
        y = _rotate_tile(x, BLOCK_M, BLOCK_K, G, KRON, DOT_X, DOT_F32)  # padded groups stay 0
        scale = _scale_of(tl.max(tl.abs(y), axis=1), 127.0, RCP_QMAX)
        inv = tl.div_rn(tl.full(scale.shape, 1.0, tl.float32), scale)
        q = _to_storage(_divide(y, scale[:, None], inv[:, None], EXACT_DIV), 127.0, True, False)
        tl.store(q_rows + rk[None, :], q, mask=mask)
    else:
        amax = tl.zeros([BLOCK_M], dtype=tl.float32)
        for k0 in range(0, K, BLOCK_K):
            mask = m_ok & (k0 + rk < K)[None, :]
            x = tl.load(x_rows + (k0 + rk)[None, :] * stride_xk, mask=mask, other=0.0)
            y = _rotate_tile(x, BLOCK_M, BLOCK_K, G, KRON, DOT_X, DOT_F32)
            amax = tl.maximum(amax, tl.max(tl.abs(y), axis=1))
        scale = _scale_of(amax, 127.0, RCP_QMAX)
        inv = tl.div_rn(tl.full(scale.shape, 1.0, tl.float32), scale)
        for k0 in range(0, K, BLOCK_K):
            mask = m_ok & (k0 + rk < K)[None, :]
            x = tl.load(x_rows + (k0 + rk)[None, :] * stride_xk, mask=mask, other=0.0)
            y = _rotate_tile(x, BLOCK_M, BLOCK_K, G, KRON, DOT_X, DOT_F32)
            q = _to_storage(_divide(y, scale[:, None], inv[:, None], EXACT_DIV), 127.0, True, False)
            tl.store(q_rows + (k0 + rk)[None, :], q, mask=mask)
    tl.store(s_ptr + rm, scale, mask=rm < M)


def check_group(g: int, k: int, what: str = "activation") -> None:
    """ShapeError / FormatError unless g is a group size the kernel implements and divides K."""
    if g not in GROUPS:
        raise FormatError(f"rotation group size {g} is not supported; choose one of {GROUPS} (powers of 4)")
    if k % g:
        raise ShapeError(f"{what} has K={k}, not divisible by the rotation group size {g}")


def rotate_act_quant_spec(x, q, s, g: int, exact: bool, kron: bool | None = None, f32_dot: int | None = None):
    """The launch of the fused rotation + per-token int8 quantization of x [M, K] (M, K > 0, K % g == 0) into
    q [M, K] int8 contiguous and s f32 [M, 1]."""
    m, k = x.shape
    kron = (KRON_256 if kron is None else kron) and g == 256
    if INTERPRET:  # the interpreter's bf16 / fp16 dots are wrong (triton 3.6): fp32 throughout
        dot_x = dot_f32 = 0
    else:
        dot_f32 = F32_DOT if f32_dot is None else f32_dot
        dot_x = 1 if x.dtype in (torch.bfloat16, torch.float16) else dot_f32
    block_k = min(triton.next_power_of_2(k), _MAX_TILE // 2 if k > _MAX_TILE else _MAX_TILE)
    # the dot's row count (BLOCK_M * BLOCK_K / group width) must reach 16, and a program should carry
    # enough work to hide the load latency: up to 4096 values
    width = 16 if kron else g
    block_m = max(1, 4096 // block_k, 16 * width // block_k)
    block_m = min(block_m, max(triton.next_power_of_2(m), 16 * width // block_k, 1))
    tile = block_m * block_k
    warps = 4 if tile <= 2048 else (8 if tile <= 8192 else 16)
    sm, sk = x.stride()
    rcp = _quant._rcp(127.0) if x.is_cuda else 0.0
    return _quant.Spec(
        _rotate_act_quant_kernel, (triton.cdiv(m, block_m),), (x, q, s, m, k, sm, sk),
        dict(RCP_QMAX=rcp, EXACT_DIV=exact, G=g, KRON=kron, DOT_X=dot_x, DOT_F32=dot_f32, BLOCK_M=block_m,
             BLOCK_K=block_k, ONE_PASS=k <= block_k),
        warps,
    )  # fmt: skip


def rotate_act_quant(
    x: torch.Tensor, g: int, exact_div: bool | None = None, kron: bool | None = None, f32_dot: int | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """Rotate every group of g channels of x [M, K] (bf16 / fp16 / fp32, any strides) by H_g and quantize each
    token to int8. Returns q int8 [M, K] contiguous and scale f32 [M, 1], as
    ``quantize_activation_ref(rotate(x.float(), g), "int8-row")``. ``exact_div`` (default: only under the
    interpreter) divides by the scale instead of multiplying by its reciprocal; ``kron`` / ``f32_dot``
    override ``KRON_256`` / ``F32_DOT``."""
    if x.dim() != 2:
        raise ShapeError(f"rotate_act_quant takes a 2-D [M, K] activation, got shape {tuple(x.shape)}")
    m, k = x.shape
    check_group(g, k)
    if not triton_runs_on(x):
        return F.quantize_activation_ref(F.rotate(x.float(), g), FMT)
    exact = INTERPRET if exact_div is None else exact_div
    q = _quant.empty((m, k), torch.int8, x.device)
    s = _quant.empty((m, 1), torch.float32, x.device)
    if m and k:
        _quant.launch(rotate_act_quant_spec(x, q, s, g, exact, kron, f32_dot))
    elif m:
        s.fill_(F.AMAX_EPS / FMT.qmax)
    return q, s


def rotated_linear_ref(x, wq, w_scale, g: int, bias=None, out_dtype=None, compute_dtype=torch.float32):
    """Reference: ``linear_ref`` of the fp32-rotated activation with the rotated int8-row weight."""
    return F.linear_ref(F.rotate(x.float(), g), wq, w_scale, FMT, bias, out_dtype or x.dtype, compute_dtype)


def _rotated_linear_triton(x, wq, w_scale, g: int, bias, out_dtype):
    k = x.shape[-1]
    check_group(g, k)
    _gemm.check_weight_side(wq, w_scale, FMT, bias, k)
    out_dtype = out_dtype or x.dtype
    lead = x.shape[:-1]
    x2 = x if x.dim() == 2 else x.reshape(-1, k)
    m = x2.shape[0]
    from . import ops  # the row limit of the weight-only path (ops does not import this module)

    if 0 < m <= ops.weight_only_max_m(x) and wq.is_contiguous():
        # few tokens: rotate in torch (cheap at this size) and let the weight-only kernel read the weight once
        # split_k=1: no kept workspace, so the path also runs inside CUDA-graph trees (reduce-overhead)
        cfg = dataclasses.replace(_configs.weight_only_config(FMT.name, m, wq.shape[0], k), split_k=1)
        y = _gemm.weight_only_linear(F.rotate(x2.float(), g).to(x2.dtype), wq, w_scale, FMT, bias, out_dtype, cfg)
    else:
        xq, xs = rotate_act_quant(x2, g)
        y = _gemm.scaled_mm(xq, xs, wq, w_scale, FMT, bias, out_dtype, check=False)
    return y if x.dim() == 2 else y.reshape(*lead, wq.shape[0])


def rotated_linear(x, wq, w_scale, g: int, bias=None, out_dtype=None) -> torch.Tensor:
    """y [..., N] = x [..., K] @ W^T + bias for a rotated int8-row weight: wq int8 [N, K] holds W H_g per group
    quantized per row, w_scale f32 [N, 1]. x (bf16 / fp16 / fp32, any strides) is rotated and quantized per
    token by one kernel, then the int8 GEMM applies both scales; output in ``out_dtype`` (default x's)."""
    if not triton_runs_on(x):
        check_group(g, x.shape[-1])
        return rotated_linear_ref(x, wq, w_scale, g, bias, out_dtype)
    if torch.compiler.is_compiling():
        return torch.ops.ditq.rotated_linear(x, wq, w_scale, g, bias, out_dtype or x.dtype)
    return _rotated_linear_triton(x, wq, w_scale, g, bias, out_dtype)


# -- custom ops for torch.compile (as ops.py registers its own: Library, plain kernels, fake impls) ---------
def _rotate_act_quant_fake(x, g):
    return x.new_empty(x.shape, dtype=torch.int8), x.new_empty((x.shape[0], 1), dtype=torch.float32)


def _rotated_linear_fake(x, wq, w_scale, g, bias, out_dtype):
    return x.new_empty((*x.shape[:-1], wq.shape[0]), dtype=out_dtype)


_LIB = torch.library.Library("ditq", "FRAGMENT")
for _name, _schema, _impl, _fake in (
    ("rotate_act_quant", "rotate_act_quant(Tensor x, int g) -> (Tensor, Tensor)",
     lambda x, g: rotate_act_quant(x, g), _rotate_act_quant_fake),
    ("rotated_linear", "rotated_linear(Tensor x, Tensor wq, Tensor w_scale, int g, Tensor? bias, "
     "ScalarType out_dtype) -> Tensor", _rotated_linear_triton, _rotated_linear_fake),
):  # fmt: skip
    _LIB.define(_schema)
    _LIB.impl(_name, _impl, "CUDA")
    _LIB.impl(_name, _impl, "CPU")  # the Triton interpreter
    torch.library.register_fake(f"ditq::{_name}", _fake, lib=_LIB)
