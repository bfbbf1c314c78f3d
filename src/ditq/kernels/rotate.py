"""Hadamard-rotated int8 activations ("ConvRot", FORMATS.md): one Triton kernel that rotates every group of g
channels of a token by H_g and quantizes the token to int8 (per-token scale), beside its wrapper; and
``rotated_linear``, that kernel followed by the int8-row GEMM of ``gemm.py``.

The math is the reference's: ``quantize_activation_ref(rotate(x, g), "int8-row")`` with the rotation in fp32
(``formats.rotate`` of ``x.float()``). H_g is the Kronecker power of H_4 over sqrt(g); the kernel multiplies by
the +-1 matrix and folds 1/sqrt(g) (a power of two, so exact) into the amax and the reciprocal scale.

- g = 256 (``KRON``): H_256 = H_16 (x) H_16, so a group seen as a 16 x 16 matrix V (V[a, b] = x[16 a + b])
  becomes H_16 V H_16, in place. Each warp takes a batch of groups side by side, [V_0 | V_1 | ...] (16 x 16 n),
  and multiplies it by H_16 from the left in one product (exact: x is the B operand, +-1 the A operand);
  reading the result as [(j, a), b] is a relabeling of its registers, already the A-operand layout of the
  second product (mma.sync m16n8k16), (H V) H. So nothing crosses warps or goes through shared memory between
  the two, and the output stays in x's layout. 32 multiply-adds per value instead of 256 (64 with the fp32
  split below). ``KRON=False`` does the single 256-wide dot instead (kept for the benchmark).
- g = 16 or 64: one ``tl.dot`` of the [groups, g] view with the g x g sign matrix.

The sign matrix is generated in registers (entry (i, j) of H_4^(x)n is -1 for an odd count of base-4 digit
positions where i_d + j_d = 3), so no operand is loaded for it. Dot precision (``DOT_*`` constexprs): 0 = fp32
``ieee`` (the interpreter, whose bf16 dot is wrong in triton 3.6), 1 = the operand's own 16-bit dtype (exact:
the products are +-x, accumulated in fp32), 2 = an fp32 operand split into three bf16 pieces by truncation
(v = v1 + v2 + v3 exactly: 3 x 8 significant bits cover fp32's 24), so fp32-accurate on the tensor cores.

Work split: a program holds ``ROWS`` tokens whole (``NCH`` <= 4 chunks of ``CH`` channels, unrolled, all loads
issued first): x is read once, the rotated values stay in registers for the amax, then quantize and store.
Rows longer than ``_ONE_PASS_MAX`` take two passes over the chunks (amax, then rotate again and quantize; the
second read of x mostly hits L2). Quantization is one FMA per value (``v * inv + 1.5 * 2^23``: the sum rounds
half to even at integer precision and its low byte is the int8; no clamp: |v| <= amax, so |v * inv| <= 127).
"""

from __future__ import annotations

import dataclasses
import functools

import torch
import triton
import triton.language as tl

from .. import formats as F
from ..errors import FormatError, ShapeError
from . import INTERPRET, triton_runs_on
from . import configs as _configs
from . import gemm as _gemm
from . import quant as _quant
from .quant import _scale_of

FMT = F.get_format("int8-row")
GROUPS = (16, 64, 256)
"""Rotation group sizes the kernel implements (those ComfyUI writes)."""
_ONE_PASS_MAX = 16384  # values of one program held in registers (the token is rotated once) up to this
_TWO_PASS_CHUNK = 4096  # chunk width of longer tokens (two passes)

KRON_256 = True
"""g = 256 as H_16 V H_16 (True) or one 256-wide dot (False); the benchmark times both."""
F32_DOT = 2
"""How fp32 operands meet the tensor cores on a GPU: 2 = three bf16 pieces, 0 = fp32 ``ieee`` (FMA units)."""


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
def _split3(v):
    """fp32 v -> bf16 v1, v2, v3 with v1 + v2 + v3 == v exactly: each piece keeps the top 16 bits of what is
    left (truncation), so the remainders are exact and 3 x 8 significant bits cover fp32's 24."""
    v1 = (v.to(tl.uint32, bitcast=True) & 0xFFFF0000).to(tl.float32, bitcast=True)
    r = v - v1
    v2 = (r.to(tl.uint32, bitcast=True) & 0xFFFF0000).to(tl.float32, bitcast=True)
    return v1.to(tl.bfloat16), v2.to(tl.bfloat16), (r - v2).to(tl.bfloat16)


@triton.jit
def _hdot(h, v, MODE: tl.constexpr, LEFT: tl.constexpr):
    """h @ v (LEFT) or v @ h in fp32, for h a +-1 matrix (fp32) and v the data; MODE as in the module
    docstring. 2-D or batched 3-D."""
    if MODE == 0:
        if LEFT:
            return tl.dot(h, v.to(tl.float32), input_precision="ieee")
        else:
            return tl.dot(v.to(tl.float32), h, input_precision="ieee")
    elif MODE == 1:
        if LEFT:
            return tl.dot(h.to(v.dtype), v)
        else:
            return tl.dot(v, h.to(v.dtype))
    else:
        hb = h.to(tl.bfloat16)
        v1, v2, v3 = _split3(v.to(tl.float32))
        if LEFT:
            acc = tl.dot(hb, v1)
            acc = tl.dot(hb, v2, acc)
            return tl.dot(hb, v3, acc)
        else:
            acc = tl.dot(v1, hb)
            acc = tl.dot(v2, hb, acc)
            return tl.dot(v3, hb, acc)


@triton.jit
def _kron_groups(idx, W: tl.constexpr):
    """Group index (within the chunk) of each row of a [W, NBW * 16] tile: warp-batch w holds groups
    w * NBW .. w * NBW + NBW - 1, 16 rows (or columns) each."""
    NBW: tl.constexpr = idx.shape[0] // 16
    return tl.arange(0, W)[:, None] * NBW + (idx // 16)[None, :]


@triton.jit
def _chunk_in(row0, k0, ROWS: tl.constexpr, CH: tl.constexpr, G: tl.constexpr, KRON: tl.constexpr,
              W: tl.constexpr):  # fmt: skip
    """Where the chunk k0.. of tokens row0.. is read from: token index and channel offsets of the tile.
    KRON: [W, 1, NBW * 16] and [W, 16, NBW * 16], element (w, a, 16 j + b) = x[group w * NBW + j][16 a + b]
    (the groups side by side, one batch of NBW groups per warp, so H @ tile is one product per warp).
    Else [NB, 1] and [NB, G], a group per row."""
    GPR: tl.constexpr = CH // G
    if KRON:
        n = tl.arange(0, ROWS * GPR // W * 16)
        gi = _kron_groups(n, W)  # [W, NBW * 16]
        m = row0 + gi // GPR
        col = k0 + (gi % GPR) * G + n[None, :] % 16
        return m[:, None, :], col[:, None, :] + 16 * tl.arange(0, 16)[None, :, None]
    else:
        gi = tl.arange(0, ROWS * GPR)
        return (row0 + gi // GPR)[:, None], (k0 + (gi % GPR) * G)[:, None] + tl.arange(0, G)[None, :]


@triton.jit
def _chunk_out(row0, k0, ROWS: tl.constexpr, CH: tl.constexpr, G: tl.constexpr, KRON: tl.constexpr,
               W: tl.constexpr):  # fmt: skip
    """Where the rotated tile goes: KRON: [W, NBW * 16, 1] and [W, NBW * 16, 16], element (w, 16 j + a, c) =
    group w * NBW + j, channel 16 a + c (the layout of (H V) H per group, groups stacked). Else as _chunk_in."""
    if KRON:
        GPR: tl.constexpr = CH // G
        r = tl.arange(0, ROWS * GPR // W * 16)
        gi = _kron_groups(r, W)
        m = row0 + gi // GPR
        col = k0 + (gi % GPR) * G + 16 * (r[None, :] % 16)
        return m[:, :, None], col[:, :, None] + tl.arange(0, 16)[None, None, :]
    else:
        return _chunk_in(row0, k0, ROWS, CH, G, KRON, W)


@triton.jit
def _load_chunk(x_ptr, row0, k0, M, K, stride_xm, stride_xk,
                ROWS: tl.constexpr, CH: tl.constexpr, G: tl.constexpr, KRON: tl.constexpr, W: tl.constexpr):  # fmt: skip
    m, off = _chunk_in(row0, k0, ROWS, CH, G, KRON, W)
    return tl.load(x_ptr + m.to(tl.int64) * stride_xm + off * stride_xk, mask=(m < M) & (off < K), other=0.0)


@triton.jit
def _rotate(x, G: tl.constexpr, KRON: tl.constexpr, DOT_X: tl.constexpr, DOT_F32: tl.constexpr):
    """Every group of the tile times the +-1 matrix of H_G (so sqrt(G) H_G), fp32. KRON: x [W, 16, NBW * 16]
    (_chunk_in) -> [W, NBW * 16, 16] (_chunk_out)."""
    if KRON:
        W: tl.constexpr = x.shape[0]
        NBW: tl.constexpr = x.shape[2] // 16
        h = tl.broadcast_to(_signs(16, 2)[None, :, :], [W, 16, 16])
        z = _hdot(h, x, DOT_X, True)  # H V for all groups of a warp at once; x is the B operand (exact if 16-bit)
        # [W, 16 (a), (j, b)] -> [W, (j, a), b]: a relabeling of registers, the layout of the A operand next
        z = tl.reshape(tl.permute(tl.reshape(z, [W, 16, NBW, 16]), (0, 2, 1, 3)), [W, NBW * 16, 16])
        return _hdot(h, z, DOT_F32, False)  # (H V) H
    else:
        DIGITS: tl.constexpr = 2 if G == 16 else (3 if G == 64 else 4)
        return _hdot(_signs(G, DIGITS), x, DOT_X, False)


@triton.jit
def _token_max(t, ROWS: tl.constexpr, KRON: tl.constexpr):
    """max of a tile of values >= 0 per token: [ROWS] (groups are in chunk order in both tile layouts)."""
    if KRON:
        t = tl.max(tl.reshape(tl.max(t, axis=2), [t.shape[0] * t.shape[1] // 16, 16]), axis=1)
    else:
        t = tl.max(t, axis=1)
    return tl.max(tl.reshape(t, [ROWS, t.shape[0] // ROWS]), axis=1)


@triton.jit
def _per_group(v, ROWS: tl.constexpr, NB: tl.constexpr, KRON: tl.constexpr, W: tl.constexpr):
    """[ROWS] per token -> per group, shaped to broadcast against the rotated tile (tokens are consecutive
    runs of NB / ROWS groups)."""
    g = tl.reshape(tl.broadcast_to(v[:, None], [ROWS, NB // ROWS]), [NB])
    if KRON:
        g = tl.reshape(tl.broadcast_to(tl.reshape(g, [W, NB // W])[:, :, None], [W, NB // W, 16]), [W, NB // W * 16])
        return g[:, :, None]
    else:
        return g[:, None]


@triton.jit
def _quant_store(q_ptr, y, row0, k0, M, K, scale, inv, INV_SQRT: tl.constexpr, EXACT_DIV: tl.constexpr,
                 ROWS: tl.constexpr, CH: tl.constexpr, G: tl.constexpr, KRON: tl.constexpr, W: tl.constexpr):  # fmt: skip
    """q = round(y / sqrt(G) / scale) as int8 into q [M, K] (contiguous). Rounding: adding 1.5 * 2^23 rounds
    half to even at integer precision and leaves the integer in the low bits (its low byte is the int8)."""
    m, off = _chunk_out(row0, k0, ROWS, CH, G, KRON, W)
    NB: tl.constexpr = ROWS * CH // G
    if EXACT_DIV:
        v = tl.div_rn(y * INV_SQRT, _per_group(scale, ROWS, NB, KRON, W)) + 12582912.0
    else:
        v = y * _per_group(inv, ROWS, NB, KRON, W) + 12582912.0  # one FMA
    q = v.to(tl.int32, bitcast=True).to(tl.int8)
    tl.store(q_ptr + m.to(tl.int64) * K + off, q, mask=(m < M) & (off < K))


@triton.jit
def _rotate_act_quant_kernel(
    x_ptr, q_ptr, s_ptr, M, K, stride_xm, stride_xk,
    RCP_QMAX: tl.constexpr, EXACT_DIV: tl.constexpr, G: tl.constexpr, KRON: tl.constexpr,
    DOT_X: tl.constexpr, DOT_F32: tl.constexpr, ROWS: tl.constexpr, CH: tl.constexpr, NCH: tl.constexpr,
    W: tl.constexpr,
):  # fmt: skip
    """Program i: tokens i*ROWS.. of x [M, K] (any strides). q [M, K] int8 contiguous = round(rot(x) / s),
    s [M] f32 = max|rot(x) token| / 127. NCH in 1..4: the token is NCH chunks of CH channels (the last one
    may be partly masked), all loaded first and kept in registers (one pass). NCH = 0: two passes over
    ceil(K / CH) chunks (amax; rotate again and quantize)."""
    SQ: tl.constexpr = 16.0 if G == 256 else (8.0 if G == 64 else 4.0)
    INV_SQRT: tl.constexpr = 1.0 / SQ
    row0 = tl.program_id(0) * ROWS
    if NCH > 0:
        x0 = _load_chunk(x_ptr, row0, 0, M, K, stride_xm, stride_xk, ROWS, CH, G, KRON, W)
        if NCH >= 2:
            x1 = _load_chunk(x_ptr, row0, CH, M, K, stride_xm, stride_xk, ROWS, CH, G, KRON, W)
        if NCH >= 3:
            x2 = _load_chunk(x_ptr, row0, 2 * CH, M, K, stride_xm, stride_xk, ROWS, CH, G, KRON, W)
        if NCH >= 4:
            x3 = _load_chunk(x_ptr, row0, 3 * CH, M, K, stride_xm, stride_xk, ROWS, CH, G, KRON, W)
        y0 = _rotate(x0, G, KRON, DOT_X, DOT_F32)
        t = tl.abs(y0)  # elementwise running max: one reduction at the end
        if NCH >= 2:
            y1 = _rotate(x1, G, KRON, DOT_X, DOT_F32)
            t = tl.maximum(t, tl.abs(y1))
        if NCH >= 3:
            y2 = _rotate(x2, G, KRON, DOT_X, DOT_F32)
            t = tl.maximum(t, tl.abs(y2))
        if NCH >= 4:
            y3 = _rotate(x3, G, KRON, DOT_X, DOT_F32)
            t = tl.maximum(t, tl.abs(y3))
    else:
        t = tl.abs(_rotate(_load_chunk(x_ptr, row0, 0, M, K, stride_xm, stride_xk, ROWS, CH, G, KRON, W),
                           G, KRON, DOT_X, DOT_F32))  # fmt: skip
        for k0 in range(CH, K, CH):
            x = _load_chunk(x_ptr, row0, k0, M, K, stride_xm, stride_xk, ROWS, CH, G, KRON, W)
            t = tl.maximum(t, tl.abs(_rotate(x, G, KRON, DOT_X, DOT_F32)))
    scale = _scale_of(_token_max(t, ROWS, KRON) * INV_SQRT, 127.0, RCP_QMAX)
    inv = tl.div_rn(tl.full(scale.shape, INV_SQRT, tl.float32), scale)  # 1 / (sqrt(G) scale), exactly scaled
    if NCH > 0:
        _quant_store(q_ptr, y0, row0, 0, M, K, scale, inv, INV_SQRT, EXACT_DIV, ROWS, CH, G, KRON, W)
        if NCH >= 2:
            _quant_store(q_ptr, y1, row0, CH, M, K, scale, inv, INV_SQRT, EXACT_DIV, ROWS, CH, G, KRON, W)
        if NCH >= 3:
            _quant_store(q_ptr, y2, row0, 2 * CH, M, K, scale, inv, INV_SQRT, EXACT_DIV, ROWS, CH, G, KRON, W)
        if NCH >= 4:
            _quant_store(q_ptr, y3, row0, 3 * CH, M, K, scale, inv, INV_SQRT, EXACT_DIV, ROWS, CH, G, KRON, W)
    else:
        for k0 in range(0, K, CH):
            x = _load_chunk(x_ptr, row0, k0, M, K, stride_xm, stride_xk, ROWS, CH, G, KRON, W)
            y = _rotate(x, G, KRON, DOT_X, DOT_F32)
            _quant_store(q_ptr, y, row0, k0, M, K, scale, inv, INV_SQRT, EXACT_DIV, ROWS, CH, G, KRON, W)
    rm = row0 + tl.arange(0, ROWS)
    tl.store(s_ptr + rm, scale, mask=rm < M)


def check_group(g: int, k: int, what: str = "activation") -> None:
    """ShapeError / FormatError unless g is a group size the kernel implements and divides K."""
    if g not in GROUPS:
        raise FormatError(f"rotation group size {g} is not supported; choose one of {GROUPS} (powers of 4)")
    if k % g:
        raise ShapeError(f"{what} has K={k}, not divisible by the rotation group size {g}")


@dataclasses.dataclass(frozen=True)
class RotConfig:
    """Launch shape of the kernel: ``rows`` tokens per program, ``chunk`` channels per chunk, ``n_chunks``
    unrolled chunks (0: two passes over ceil(K / chunk) chunks), ``warps``."""

    rows: int
    chunk: int
    n_chunks: int
    warps: int


def _pow2_floor(v: int) -> int:
    return 1 << (max(int(v), 1).bit_length() - 1)


def rot_config(m: int, k: int, g: int, kron: bool) -> RotConfig:
    """One pass when the token fits in <= 4 power-of-two chunks of <= _ONE_PASS_MAX values in all (the chunk
    count that pads K least, then the most: on an H200 one 16384-wide chunk took 16% longer per value than
    three of 4096, and ptxas counts ~13% more instructions); else two passes over _TWO_PASS_CHUNK-wide chunks.
    KRON: each warp rotates its own groups (no data crosses warps), ~3072 values (96 per thread) per warp:
    fewer instructions per value than more, thinner warps (the per-program setup and the amax reduction are
    shared by more values). g-wide dots: >= 16 groups per dot, ~48 values per thread."""
    if k <= _ONE_PASS_MAX:
        _, n = min((c * triton.next_power_of_2(-(-k // c)) - k, -c) for c in (1, 2, 3, 4))
        n = -n
        chunk = max(triton.next_power_of_2(-(-k // n)), g)
        n = -(-k // chunk)
    else:
        n, chunk = 0, _TWO_PASS_CHUNK
    tile = chunk * max(n, 1)  # values per token held at once
    cap = triton.next_power_of_2(max(m, 1))
    if kron:
        rows = min(_pow2_floor(3072 // tile), cap)
        warps = 4 if n == 0 else min(8, _pow2_floor(rows * tile // 3072), rows * chunk // g)
        return RotConfig(rows, chunk, n, warps)
    rows = max(_pow2_floor(2048 // tile), 16 * g // chunk)
    rows = min(rows, max(cap, 16 * g // chunk))
    warps = min(8, max(1, triton.next_power_of_2(rows * tile // (32 * 48) + 1) // 2))
    return RotConfig(rows, chunk, n, warps if n else 4)


def rotate_act_quant_spec(x, q, s, g: int, exact: bool, kron: bool | None = None, f32_dot: int | None = None,
                          config: RotConfig | None = None):  # fmt: skip
    """The launch of the fused rotation + per-token int8 quantization of x [M, K] (M, K > 0, K % g == 0) into
    q [M, K] int8 contiguous and s f32 [M, 1]."""
    m, k = x.shape
    kron = (KRON_256 if kron is None else kron) and g == 256
    if INTERPRET:  # the interpreter's bf16 / fp16 dots are wrong (triton 3.6): fp32 throughout
        dot_x = dot_f32 = 0
    else:
        dot_f32 = F32_DOT if f32_dot is None else f32_dot
        dot_x = 1 if x.dtype in (torch.bfloat16, torch.float16) else dot_f32
    c = config or rot_config(m, k, g, kron)
    sm, sk = x.stride()
    rcp = _quant._rcp(127.0) if x.is_cuda else 0.0
    return _quant.Spec(
        _rotate_act_quant_kernel, (triton.cdiv(m, c.rows),), (x, q, s, m, k, sm, sk),
        dict(RCP_QMAX=rcp, EXACT_DIV=exact, G=g, KRON=kron, DOT_X=dot_x, DOT_F32=dot_f32, ROWS=c.rows,
             CH=c.chunk, NCH=c.n_chunks, W=c.warps if kron else 1),
        c.warps,
    )  # fmt: skip


def rotate_act_quant(
    x: torch.Tensor, g: int, exact_div: bool | None = None, kron: bool | None = None, f32_dot: int | None = None,
    config: RotConfig | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Rotate every group of g channels of x [M, K] (bf16 / fp16 / fp32, any strides) by H_g and quantize each
    token to int8. Returns q int8 [M, K] contiguous and scale f32 [M, 1], as
    ``quantize_activation_ref(rotate(x.float(), g), "int8-row")``. ``exact_div`` (default: only under the
    interpreter) divides by the scale instead of multiplying by its reciprocal; ``kron`` / ``f32_dot``
    override ``KRON_256`` / ``F32_DOT``, ``config`` the launch shape
    (``rot_config``)."""
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
        _quant.launch(rotate_act_quant_spec(x, q, s, g, exact, kron, f32_dot, config))
    elif m:
        s.fill_(F.AMAX_EPS / FMT.qmax)
    return q, s


def rotated_linear_ref(x, wq, w_scale, g: int, bias=None, out_dtype=None, compute_dtype=torch.float32):
    """Reference: ``linear_ref`` of the fp32-rotated activation with the rotated int8-row weight."""
    return F.linear_ref(F.rotate(x.float(), g), wq, w_scale, FMT, bias, out_dtype or x.dtype, compute_dtype)


# -- the eager rotated linear: ops' launch plans with this module's activation kernel ---------------------
# (ops keeps the two launches bound per (weight, activation layout), with kept activation buffers and the GEMM's
# tail-split workspace; ``ActQuant`` puts the rotation + quantization kernel in front of the int8-row GEMM)


def _act(g: int):
    """The ActQuant of group size g under the current KRON_256 / F32_DOT (made once per combination: the eager
    path asks for it on every call)."""
    return _act_for(g, KRON_256, F32_DOT)


@functools.lru_cache(maxsize=None)
def _act_for(g: int, kron, f32_dot):
    return _ops().ActQuant(("rotate", g, kron, f32_dot),
                           lambda x2, xq, xs: rotate_act_quant_spec(x2, xq, xs, g, False, kron, f32_dot),
                           lambda x2: rotate_act_quant(x2, g, kron=kron, f32_dot=f32_dot))  # fmt: skip


def _ops():
    from . import ops  # ops does not import this module

    return ops


def _rotated_linear_triton(x, wq, w_scale, g: int, bias, out_dtype, kept: bool = True):
    """``kept=False`` (the registered op, inside compiled graphs): no buffer outlives the call."""
    k = x.shape[-1]
    check_group(g, k)
    m = x.numel() // k if k else 0
    ops = _ops()
    if 0 < m <= ops.weight_only_max_m(x) and wq.is_contiguous():
        # few tokens: rotate in torch (cheap at this size) and let the weight-only kernel read the weight once
        # split_k=1: no kept workspace, so the path also runs inside CUDA-graph trees (reduce-overhead)
        _gemm.check_weight_side(wq, w_scale, FMT, bias, k)
        x2 = x.reshape(-1, k)
        cfg = dataclasses.replace(_configs.weight_only_config(FMT.name, m, wq.shape[0], k), split_k=1)
        y = _gemm.weight_only_linear(F.rotate(x2.float(), g).to(x2.dtype), wq, w_scale, FMT, bias,
                                     out_dtype or x.dtype, cfg)  # fmt: skip
        return y if x.dim() == 2 else y.reshape(*x.shape[:-1], wq.shape[0])
    return ops._linear_triton(x, wq, w_scale, FMT, bias, out_dtype, kept, _act(g))


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
     "ScalarType out_dtype) -> Tensor",
     lambda x, wq, w_scale, g, bias, out_dtype: _rotated_linear_triton(x, wq, w_scale, g, bias, out_dtype, kept=False),
     _rotated_linear_fake),
):  # fmt: skip
    _LIB.define(_schema)
    _LIB.impl(_name, _impl, "CUDA")
    _LIB.impl(_name, _impl, "CPU")  # the Triton interpreter
    torch.library.register_fake(f"ditq::{_name}", _fake, lib=_LIB)
