"""Fused INT8 attention: a quantization pre-pass over K and V, then one flash-attention kernel with
INT8 Q.K^T (int32 on tensor cores) and P.V in FP8 e4m3 or in the inputs' 16-bit type.

Math (one query row i, keys j; ``c`` = sm_scale * log2(e)):
    mu     = mean_j k_j                           (K smoothing: softmax is invariant to q.mu)
    q_i    ~ qs_i * qi_i       int8, one scale per query token, quantized inside the attention kernel
    k_j-mu ~ ks_b * kq_j       int8, one scale per block b of BLOCK_N key tokens (the kernel's tile)
    s_ij   = c * qs_i * ks_b * (qi_i . kq_j)      (log2 units)
    p_ij   = exp2(s_ij - m_i) (online softmax, FP32), times 448 for the FP8 P.V
    v_j    ~ nu + vs * v8_j    (pv="fp8": V centred per channel, e4m3 with one scale per channel,
                                stored transposed [D, N] so that the FP8 product's operand is K-major)
    out_i  = sum_j p_ij v_j / sum_j p_ij  - eb  (pv="fp8": eb = mean_j (vs * v8_j - (v_j - nu)), the mean
                                rounding error of V per channel; see _kv_quant_kernel)
    lse_i  = ln2 * (m_i + log2(l_i)) + sm_scale * q_i . mu       (natural log, exact K un-smoothing)

Layouts: the caller's Q / K / V / Out are 4-D with the head dim contiguous and any strides on the
other three axes ("HND" [B, H, N, D] or "NHD" [B, N, H, D]); the kernels take the strides. Work
buffers (all contiguous, G = B * H_kv, NP = key count padded to BLOCK_N, DP = D padded to a power of 2):
    stats  f32 [G, 4, DP]   sum_j k, sum_j v, max_j |v|                (atomics of the stats pass)
                            sum_j (v8_j - (v_j - nu) / vs)             (atomics of the quant pass)
    kq     int8 [G, NP, DP]   ks f32 [G, NP / BLOCK_N]                  (pad rows and columns are 0)
    vt     e4m3 [G, DP, NP]                                             (pv="fp8" only)
    lse    f32 [B, H, NQ]
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from . import INTERPRET

LOG2E = 1.4426950408889634
LN2 = 0.6931471805599453
INT8_MAX = 127.0
FP8_MAX = 448.0
AMAX_EPS = tl.constexpr(1e-12)  # same floor as ditq.formats.AMAX_EPS: an all-zero block still gets a positive scale
WINDOW_NONE = 1 << 30  # "no limit" for the window's left / right reach (fits int32 after additions)

# Round-half-even of fp32 |v| < 2^22 without libdevice (which the interpreter lacks): adding 1.5 * 2^23
# leaves no fraction bits, the hardware rounds, subtracting restores the value.
_RND = 12582912.0
# int32 -> fp32 for |x| < 2^22 without the (slow, 16/clk/SM on Hopper) I2F instruction: the bits of
# 1.5 * 2^23 plus x, read as a float, are exactly 1.5 * 2^23 + x. |q.k| <= 127 * 127 * 256 < 2^22.
_MAGIC_BITS = 0x4B400000


@triton.jit
def _round(x):
    return (x + 12582912.0) - 12582912.0


@triton.jit
def _to_e4m3(x, EXACT: tl.constexpr):
    """fp32 -> e4m3, round to nearest even, |x| <= 448. EXACT: round in fp32 first, so the cast itself is
    exact: the interpreter's cast (triton 3.6) loses the carry when rounding crosses a power of 2."""
    if EXACT:
        e = ((x.to(tl.int32, bitcast=True) >> 23) & 0xFF) - 127
        quantum = ((tl.maximum(e, -6) - 3 + 127) << 23).to(tl.float32, bitcast=True)  # e4m3's ulp at |x|
        x = _round(x / quantum) * quantum
    return x.to(tl.float8e4nv)


def padded_head_dim(d: int) -> int:
    """Head dim the tiles use: a power of 2, at least 32 (the K extent of an 8-bit tensor-core product)."""
    return max(32, triton.next_power_of_2(d))


# ----------------------------------------------------------------------------------------------------
# Pre-pass 1: per-channel statistics of K and V (mean for the smoothing, min / max for V's FP8 scale)
# ----------------------------------------------------------------------------------------------------


@triton.jit
def _kv_stats_kernel(
    K, V, Stats,
    N, HK, CHUNK,
    s_kb, s_kh, s_kn, s_vb, s_vh, s_vn,
    D: tl.constexpr, DP: tl.constexpr, TILE: tl.constexpr,
    DO_K: tl.constexpr, DO_V: tl.constexpr, STAGES: tl.constexpr,
):
    """Program (g, s) sums K and V over tokens [s * CHUNK, (s + 1) * CHUNK) of head g and takes max |V|,
    then adds its partials into Stats with one set of atomics (Stats starts as zeros). The partials stay
    [TILE, DP] tiles in registers until the end: a reduction over rows inside the loop would cost a
    shared-memory round trip and a barrier per tile, and keep the loads of successive tiles from
    overlapping (the loop's loads are software-pipelined, STAGES deep)."""
    g = tl.program_id(0)
    b = g // HK
    h = g % HK
    cols = tl.arange(0, DP)
    cmask = cols < D
    start = tl.program_id(1) * CHUNK
    ksum = tl.zeros([TILE, DP], tl.float32)
    vsum = tl.zeros([TILE, DP], tl.float32)
    vabs = tl.zeros([TILE, DP], tl.float32)
    kbase = K + b.to(tl.int64) * s_kb + h.to(tl.int64) * s_kh + cols[None, :]
    vbase = V + b.to(tl.int64) * s_vb + h.to(tl.int64) * s_vh + cols[None, :]
    for t in tl.range(start, tl.minimum(start + CHUNK, N), TILE, num_stages=STAGES):
        rows = t + tl.arange(0, TILE)
        mask = (rows < N)[:, None] & cmask[None, :]
        if DO_K:
            ksum += tl.load(kbase + rows[:, None].to(tl.int64) * s_kn, mask=mask, other=0.0).to(tl.float32)
        if DO_V:
            v = tl.load(vbase + rows[:, None].to(tl.int64) * s_vn, mask=mask, other=0.0).to(tl.float32)
            vsum += v
            vabs = tl.maximum(vabs, tl.abs(v))
    base = Stats + g.to(tl.int64) * 4 * DP
    if DO_K:
        tl.atomic_add(base + cols, tl.sum(ksum, 0), mask=cmask)
    if DO_V:
        tl.atomic_add(base + DP + cols, tl.sum(vsum, 0), mask=cmask)
        # >= 0, so the zeros it starts from are neutral
        tl.atomic_max(base + 2 * DP + cols, tl.max(vabs, 0), mask=cmask)


@triton.jit
def _v_scale(st, cols, cmask, N, DP: tl.constexpr):
    """Per-channel mean of V and e4m3 scale of V - mean: max|v - nu| <= max|v| + |nu|. The bound may
    exceed the true range by up to 2x, which costs e4m3 nothing but one binade at the subnormal end."""
    nu = tl.load(st + DP + cols, mask=cmask, other=0.0) / N
    vabs = tl.load(st + 2 * DP + cols, mask=cmask, other=0.0)
    return nu, tl.maximum(vabs + tl.abs(nu), AMAX_EPS) / 448.0


@triton.jit
def _v_shift(st, cols, cmask, nu, vs, N, DP: tl.constexpr):
    """What the epilogue adds back per channel: nu minus the mean rounding error of V's e4m3 copy."""
    return nu - vs * (tl.load(st + 3 * DP + cols, mask=cmask, other=0.0) / N)


# ----------------------------------------------------------------------------------------------------
# Pre-pass 2: K -> int8 (smoothed, one scale per BLOCK_N tokens), V -> e4m3 transposed (per channel)
# ----------------------------------------------------------------------------------------------------


@triton.jit
def _kv_quant_kernel(
    K, V, Stats, KQ, KS, VT,
    N, NP, HK,
    s_kb, s_kh, s_kn, s_vb, s_vh, s_vn,
    D: tl.constexpr, DP: tl.constexpr, BLOCK_N: tl.constexpr,
    SMOOTH_K: tl.constexpr, DO_V: tl.constexpr, EXACT_CVT: tl.constexpr,
):
    """Program (g, nb) quantizes key block nb of head g: K, then V for pv="fp8"."""
    g = tl.program_id(0)
    nb = tl.program_id(1)
    _quant_k_block(K, Stats, KQ, KS, g, nb, N, NP, HK, s_kb, s_kh, s_kn, D, DP, BLOCK_N, SMOOTH_K)
    if DO_V:
        _quant_v_block(V, Stats, VT, g, nb, N, NP, HK, s_vb, s_vh, s_vn, D, DP, BLOCK_N, EXACT_CVT)


@triton.jit
def _load_block(X, g, nb, N, HK, s_b, s_h, s_n, D: tl.constexpr, DP: tl.constexpr, BLOCK_N: tl.constexpr):
    """Token block nb of head g of X [B, HK, N, D] (strides s_b, s_h, s_n; unit channel stride) in fp32, zeros past
    N and D: (rows, cols, channel mask, tile mask, tile)."""
    rows = nb * BLOCK_N + tl.arange(0, BLOCK_N)
    cols = tl.arange(0, DP)
    cmask = cols < D
    mask = (rows < N)[:, None] & cmask[None, :]
    p = X + (g // HK).to(tl.int64) * s_b + (g % HK).to(tl.int64) * s_h + rows[:, None].to(tl.int64) * s_n + cols[None, :]
    return rows, cols, cmask, mask, tl.load(p, mask=mask, other=0.0).to(tl.float32)


@triton.jit
def _quant_k_block(K, Stats, KQ, KS, g, nb, N, NP, HK, s_kb, s_kh, s_kn,
                   D: tl.constexpr, DP: tl.constexpr, BLOCK_N: tl.constexpr, SMOOTH_K: tl.constexpr):
    """K block nb of head g: minus the token mean, int8 with one scale for the block (pad rows 0)."""
    rows, cols, cmask, mask, k = _load_block(K, g, nb, N, HK, s_kb, s_kh, s_kn, D, DP, BLOCK_N)
    if SMOOTH_K:
        mu = tl.load(Stats + g.to(tl.int64) * 4 * DP + cols, mask=cmask, other=0.0) / N
        k = tl.where(mask, k - mu[None, :], 0.0)  # pad rows stay 0, not -mu
    ks = tl.maximum(tl.max(tl.max(tl.abs(k), 1), 0), AMAX_EPS) / 127.0
    kq = tl.minimum(tl.maximum(_round(k * (1.0 / ks)), -127.0), 127.0)
    out = KQ + g.to(tl.int64) * NP * DP + rows[:, None].to(tl.int64) * DP + cols[None, :]
    tl.store(out, kq.to(tl.int8))
    tl.store(KS + g.to(tl.int64) * (NP // BLOCK_N) + nb, ks)


@triton.jit
def _quant_v_block(V, Stats, VT, g, nb, N, NP, HK, s_vb, s_vh, s_vn,
                   D: tl.constexpr, DP: tl.constexpr, BLOCK_N: tl.constexpr, EXACT_CVT: tl.constexpr):
    """V block nb of head g: centred, e4m3 with one scale per channel, stored transposed. Also sums, per
    channel, the rounding error of the e4m3 copy into Stats row 3, because that mean is not noise that
    averages away: centring by a nu that is not on V's grid makes the errors of the many near-zero bf16
    values alike, so the mean error keeps a systematic part, which the softmax average passes on whole
    while the output itself shrinks as 1/sqrt(N) (emulated at N = 32760: cosine 0.99898 -> 0.99941 once
    the epilogue subtracts it)."""
    rows, cols, cmask, mask, v = _load_block(V, g, nb, N, HK, s_vb, s_vh, s_vn, D, DP, BLOCK_N)
    st = Stats + g.to(tl.int64) * 4 * DP
    nu, vs = _v_scale(st, cols, cmask, N, DP)
    vc = tl.minimum(tl.maximum(tl.where(mask, (v - nu[None, :]) * (1.0 / vs)[None, :], 0.0), -448.0), 448.0)
    v8 = _to_e4m3(vc, EXACT_CVT)
    # transposed store: the token axis becomes the contiguous one
    vt = VT + g.to(tl.int64) * DP * NP + cols[None, :].to(tl.int64) * NP + rows[:, None]
    tl.store(vt, v8)
    tl.atomic_add(st + 3 * DP + cols, tl.sum(v8.to(tl.float32) - vc, 0), mask=cmask)


POISON = False
"""Tests set this: work buffers then start as NaN / garbage instead of whatever memory held, so a tile the
kernels fail to write shows up."""


def _empty(shape, device, dtype):
    t = torch.empty(shape, device=device, dtype=dtype)
    if POISON:
        if dtype == torch.int8:
            t.fill_(-128)  # outside the [-127, 127] the quantizer writes
        else:
            t.view(torch.uint8).fill_(0xFF)  # NaN in f32 and in e4m3
    return t


_SMS: dict = {}


def _num_sms(dev) -> int:
    if dev.type != "cuda":
        return 4
    if dev not in _SMS:
        _SMS[dev] = torch.cuda.get_device_properties(dev).multi_processor_count
    return _SMS[dev]


# Pre-pass launch settings, from the H200 run of bench/attention_gpu.py at (1, 40, 32760, 128): stats tiles
# of stats_elems / DP rows (32 elements per thread and partial at 4 warps) with loads pipelined
# stats_stages deep read K and V at 3.5 TB/s (0.19 ms; the previous per-tile reductions ~0.28 ms); the quant
# pass runs quant_warps[DP] warps (4: 255 registers, two programs per SM; 8 warps or separate K and V
# programs measured 10-40% slower).
PREPASS = {"stats_elems": 4096, "stats_warps": 4, "stats_stages": 3, "quant_warps": {64: 4, 128: 4, 256: 8}}


def kv_prepass(k, v, block_n, smooth_k, pv_fp8):
    """Quantize K (and V for pv="fp8") for ``attention_fwd``.

    k, v: [B, H_kv, N, D] views (any strides, head dim contiguous), bf16 / fp16.
    Returns (stats f32 [G, 4, DP] (sum k, sum v, max |v|, sum of V's e4m3 rounding error in scale units),
    kq int8 [G, NP, DP], ks f32 [G, NP/block_n], vt e4m3 [G, DP, NP] | None).
    """
    stats = kv_stats(k, v, smooth_k, pv_fp8)
    return (stats,) + kv_quant(k, v, stats, block_n, smooth_k, pv_fp8)


def kv_stats(k, v, smooth_k, pv_fp8):
    """Pre-pass 1 (a memset and one launch): stats f32 [G, 4, DP], rows 0-2 filled, row 3 zero."""
    B, HK, N, D = k.shape
    DP = padded_head_dim(D)
    G = B * HK
    dev = k.device
    cfg = PREPASS
    stats = torch.zeros((G, 4, DP), device=dev, dtype=torch.float32)
    if smooth_k or pv_fp8:
        tile = max(16, cfg["stats_elems"] // DP)
        # about four programs per SM, each looping over a chunk of at least 4 tiles: few atomics, full occupancy
        splits = max(1, min(triton.cdiv(N, 4 * tile), triton.cdiv(4 * _num_sms(dev), G)))
        chunk = triton.cdiv(triton.cdiv(N, splits), tile) * tile
        _kv_stats_kernel[(G, triton.cdiv(N, chunk))](
            k, v, stats, N, HK, chunk,
            k.stride(0), k.stride(1), k.stride(2), v.stride(0), v.stride(1), v.stride(2),
            D=D, DP=DP, TILE=tile, DO_K=smooth_k, DO_V=pv_fp8, STAGES=1 if INTERPRET else cfg["stats_stages"],
            num_warps=cfg["stats_warps"],
        )
    return stats


def kv_quant(k, v, stats, block_n, smooth_k, pv_fp8):
    """Pre-pass 2 (one launch): returns (kq, ks, vt | None) as ``kv_prepass``; adds row 3 of ``stats``."""
    B, HK, N, D = k.shape
    DP = padded_head_dim(D)
    G = B * HK
    NP = triton.cdiv(N, block_n) * block_n
    dev = k.device
    kq = _empty((G, NP, DP), dev, torch.int8)
    ks = _empty((G, NP // block_n), dev, torch.float32)
    vt = _empty((G, DP, NP), dev, torch.float8_e4m3fn) if pv_fp8 else None
    _kv_quant_kernel[(G, NP // block_n)](
        k, v, stats, kq, ks, vt if pv_fp8 else kq, N, NP, HK,
        k.stride(0), k.stride(1), k.stride(2), v.stride(0), v.stride(1), v.stride(2),
        D=D, DP=DP, BLOCK_N=block_n, SMOOTH_K=smooth_k, DO_V=pv_fp8, EXACT_CVT=INTERPRET,
        num_warps=PREPASS["quant_warps"].get(DP, 4),
    )
    return kq, ks, vt


# ----------------------------------------------------------------------------------------------------
# The attention kernel
# ----------------------------------------------------------------------------------------------------


@triton.jit
def _scores(qi, kq_base, start_n, DP: tl.constexpr, BLOCK_N: tl.constexpr):
    """int32 Q.K^T of one key block: [BLOCK_M, BLOCK_N]."""
    offs_n = start_n + tl.arange(0, BLOCK_N)
    k = tl.load(kq_base + offs_n[:, None].to(tl.int64) * DP + tl.arange(0, DP)[None, :])
    return tl.dot(qi, tl.trans(k), out_dtype=tl.int32)


@triton.jit
def _attn_step(
    acc, l_i, m_i, qi, c_row,
    start_n, kq_base, ks_base, v_base, s_vn, vt_base, NP, kpm_base,
    offs_m, NK, WL, WR,
    D: tl.constexpr, DP: tl.constexpr, BLOCK_N: tl.constexpr,
    MASKED: tl.constexpr, HAS_KPM: tl.constexpr, PV_FP8: tl.constexpr, INT_TRICK: tl.constexpr,
    F32_DOT: tl.constexpr,
):
    """One key block: scores, online-softmax update, P.V."""
    qk = _scores(qi, kq_base, start_n, DP, BLOCK_N)
    return _update(acc, l_i, m_i, qk, c_row, start_n, ks_base, v_base, s_vn, vt_base, NP, kpm_base, offs_m, NK,
                   WL, WR, D, DP, BLOCK_N, MASKED, HAS_KPM, PV_FP8, INT_TRICK, F32_DOT)


@triton.jit
def _update(
    acc, l_i, m_i, qk, c_row,
    start_n, ks_base, v_base, s_vn, vt_base, NP, kpm_base,
    offs_m, NK, WL, WR,
    D: tl.constexpr, DP: tl.constexpr, BLOCK_N: tl.constexpr,
    MASKED: tl.constexpr, HAS_KPM: tl.constexpr, PV_FP8: tl.constexpr, INT_TRICK: tl.constexpr,
    F32_DOT: tl.constexpr,
):
    """Online-softmax update and P.V for the scores ``qk`` of the key block at ``start_n``. MASKED blocks
    check every (query, key) pair against the window / causal band and the key count; others skip it."""
    offs_n = start_n + tl.arange(0, BLOCK_N)
    cols = tl.arange(0, DP)
    c = c_row * tl.load(ks_base + start_n // BLOCK_N)
    # P for the FP8 product is scaled by 448 (exp2 of +log2(448)) so it uses e4m3's whole range.
    if PV_FP8:
        off = 8.807354922057604
    else:
        off = 0.0
    if MASKED or HAS_KPM:
        s = qk.to(tl.float32) * c[:, None]
        valid = offs_n[None, :] < NK
        if MASKED:
            valid = valid & (offs_n[None, :] >= offs_m[:, None] - WL) & (offs_n[None, :] <= offs_m[:, None] + WR)
        if HAS_KPM:
            keep = tl.load(kpm_base + offs_n, mask=offs_n < NK, other=0)
            valid = valid & (keep != 0)[None, :]
        s = tl.where(valid, s, -float("inf"))
        m_new = tl.maximum(m_i, tl.max(s, 1))
        m_use = tl.where(m_new == -float("inf"), 0.0, m_new)  # a row with no key yet: keep p = 0, not NaN
        p = tl.math.exp2(s - (m_use - off)[:, None])
    else:
        # the row max on the integers: one conversion per row, not per score
        m_new = tl.maximum(m_i, tl.max(qk, 1).to(tl.float32) * c)
        m_use = m_new
        if INT_TRICK:
            x = (qk + 0x4B400000).to(tl.float32, bitcast=True)  # = 1.5 * 2^23 + qk, exactly
            p = tl.math.exp2(x * c[:, None] - (12582912.0 * c + m_use - off)[:, None])
        else:
            p = tl.math.exp2(qk.to(tl.float32) * c[:, None] - (m_use - off)[:, None])
    alpha = tl.math.exp2(m_i - m_use)
    l_i = l_i * alpha + tl.sum(p, 1)
    if PV_FP8:
        vt = tl.load(vt_base + cols[:, None].to(tl.int64) * NP + offs_n[None, :])
        # fresh FP32 accumulator per block, added in FP32: Hopper's FP8 MMA accumulates with fewer bits
        acc = acc * alpha[:, None] + tl.dot(_to_e4m3(p, F32_DOT), tl.trans(vt))
    else:
        vp = v_base + offs_n[:, None].to(tl.int64) * s_vn + cols[None, :]
        if MASKED or D != DP:
            v = tl.load(vp, mask=(offs_n < NK)[:, None] & (cols < D)[None, :], other=0.0)
        else:
            v = tl.load(vp)
        acc = acc * alpha[:, None]
        if F32_DOT:  # interpreter: its bf16 dot is wrong (triton 3.6); same rounding of P, product in f32
            acc = tl.dot(p.to(v.dtype).to(tl.float32), v.to(tl.float32), acc, input_precision="ieee")
        else:
            acc = tl.dot(p.to(v.dtype), v, acc)
    return acc, l_i, m_new


@triton.jit
def _attn_fwd_kernel(
    Q, KQ, KS, V, VT, Stats, KPM, Out, Lse,
    s_qb, s_qh, s_qn, s_vb, s_vh, s_vn, s_ob, s_oh, s_on, s_kpm,
    NQ, NK, NP, H, HK, GROUP,
    qk_scale, sm_scale, WL, WR,
    D: tl.constexpr, DP: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
    PV_FP8: tl.constexpr, SMOOTH_K: tl.constexpr, HAS_KPM: tl.constexpr, HAS_WINDOW: tl.constexpr,
    INT_TRICK: tl.constexpr, F32_DOT: tl.constexpr,
):
    pid_m = tl.program_id(0)
    bh = tl.program_id(1)
    b = bh // H
    h = bh % H
    g = b * HK + h // GROUP  # the K/V head this query head reads (GQA)
    m0 = pid_m * BLOCK_M
    offs_m = m0 + tl.arange(0, BLOCK_M)
    cols = tl.arange(0, DP)
    cmask = cols < D
    qmask = (offs_m < NQ)[:, None] & cmask[None, :]

    # Q -> int8 per token, the softmax scale and log2(e) folded into its scale
    qp = Q + b.to(tl.int64) * s_qb + h.to(tl.int64) * s_qh + offs_m[:, None].to(tl.int64) * s_qn + cols[None, :]
    q = tl.load(qp, mask=qmask, other=0.0).to(tl.float32)
    qs = tl.maximum(tl.max(tl.abs(q), 1), AMAX_EPS) / 127.0
    qi = tl.minimum(tl.maximum(_round(q * (1.0 / qs)[:, None]), -127.0), 127.0).to(tl.int8)
    c_row = qs * qk_scale
    st = Stats + g.to(tl.int64) * 4 * DP
    # lse's un-smoothing term now, so the f32 Q tile is dead before the loop (it would cost 64 registers)
    if SMOOTH_K:
        mu = tl.load(st + cols, mask=cmask, other=0.0) / NK
        lse_fix = tl.sum(q * mu[None, :], 1) * sm_scale
    else:
        lse_fix = tl.zeros([BLOCK_M], tl.float32)

    kq_base = KQ + g.to(tl.int64) * NP * DP
    ks_base = KS + g.to(tl.int64) * (NP // BLOCK_N)
    v_base = V + b.to(tl.int64) * s_vb + (h // GROUP).to(tl.int64) * s_vh
    vt_base = VT + g.to(tl.int64) * DP * NP
    kpm_base = KPM + b.to(tl.int64) * s_kpm

    # key blocks this query block can see, and the sub-range that needs no per-element mask
    lo = 0
    hi = NK
    if HAS_WINDOW:
        lo = tl.maximum(m0 - WL, 0) // BLOCK_N * BLOCK_N
        hi = tl.minimum(tl.minimum(m0 + BLOCK_M, NQ) - 1 + WR + 1, NK)
        hi = tl.maximum(hi, lo)
    hi_end = (hi + BLOCK_N - 1) // BLOCK_N * BLOCK_N
    full_lo = lo
    full_hi = NK // BLOCK_N * BLOCK_N
    if HAS_WINDOW:
        # block at n0 is full when n0 >= (last row) - WL and n0 + BLOCK_N - 1 <= (first row) + WR
        full_lo = tl.maximum(lo, (tl.maximum(m0 + BLOCK_M - 1 - WL, 0) + BLOCK_N - 1) // BLOCK_N * BLOCK_N)
        full_hi = tl.minimum(full_hi, tl.maximum(m0 + WR - BLOCK_N + 1 + BLOCK_N, 0) // BLOCK_N * BLOCK_N)
    full_lo = tl.minimum(full_lo, hi_end)
    full_hi = tl.minimum(tl.maximum(full_hi, full_lo), hi_end)

    m_i = tl.full([BLOCK_M], -float("inf"), tl.float32)
    l_i = tl.zeros([BLOCK_M], tl.float32)
    acc = tl.zeros([BLOCK_M, DP], tl.float32)
    for start_n in range(lo, full_lo, BLOCK_N):
        acc, l_i, m_i = _attn_step(acc, l_i, m_i, qi, c_row, start_n, kq_base, ks_base, v_base, s_vn, vt_base,
                                   NP, kpm_base, offs_m, NK, WL, WR, D, DP, BLOCK_N, True, HAS_KPM, PV_FP8,
                                   INT_TRICK, F32_DOT)
    for start_n in range(full_lo, full_hi, BLOCK_N):
        acc, l_i, m_i = _attn_step(acc, l_i, m_i, qi, c_row, start_n, kq_base, ks_base, v_base, s_vn, vt_base,
                                   NP, kpm_base, offs_m, NK, WL, WR, D, DP, BLOCK_N, False, HAS_KPM, PV_FP8,
                                   INT_TRICK, F32_DOT)
    for start_n in range(full_hi, hi_end, BLOCK_N):
        acc, l_i, m_i = _attn_step(acc, l_i, m_i, qi, c_row, start_n, kq_base, ks_base, v_base, s_vn, vt_base,
                                   NP, kpm_base, offs_m, NK, WL, WR, D, DP, BLOCK_N, True, HAS_KPM, PV_FP8,
                                   INT_TRICK, F32_DOT)

    # epilogue: normalize, undo V's centring and scale, write; rows that saw no key give 0 and lse -inf
    empty = l_i == 0.0
    inv_l = tl.where(empty, 0.0, 1.0 / tl.where(empty, 1.0, l_i))
    out = acc * inv_l[:, None]
    if PV_FP8:
        nu, vs = _v_scale(st, cols, cmask, NK, DP)
        out = out * vs[None, :] + tl.where(empty[:, None], 0.0, _v_shift(st, cols, cmask, nu, vs, NK, DP)[None, :])
        off = 8.807354922057604
    else:
        off = 0.0
    lse = (m_i - off + tl.math.log2(tl.where(empty, 1.0, l_i))) * 0.6931471805599453 + lse_fix
    lse = tl.where(empty, -float("inf"), lse)
    offs_m = m0 + tl.arange(0, BLOCK_M)
    qmask = (offs_m < NQ)[:, None] & cmask[None, :]
    op = Out + b.to(tl.int64) * s_ob + h.to(tl.int64) * s_oh + offs_m[:, None].to(tl.int64) * s_on + cols[None, :]
    tl.store(op, out.to(Out.dtype.element_ty), mask=qmask)
    tl.store(Lse + bh.to(tl.int64) * NQ + offs_m, lse, mask=offs_m < NQ)


# (BLOCK_M, BLOCK_N, num_warps, num_stages, int_trick, maxnreg) by (padded head dim, pv is fp8), the fastest
# of `ditq bench attention --tune` on an H200 (bench/results/attention-h200.json). One warpgroup per program
# (4 warps, BLOCK_M 64) lets two or three programs share an SM and drift apart, so one's softmax overlaps
# another's tensor-core work; Triton 3.6 gives no such overlap inside one program.
CONFIGS = {
    (64, True): (64, 128, 4, 2, 1, 168),
    (64, False): (64, 128, 4, 3, 1, 0),
    (128, True): (64, 128, 4, 3, 1, 0),
    (128, False): (128, 64, 8, 3, 1, 0),
    (256, True): (64, 64, 4, 2, 1, 0),
    (256, False): (64, 64, 4, 2, 1, 0),
}
INTERPRET_CONFIG = (64, 32, 4, 1)  # the CPU interpreter: small tiles, more blocks, quicker


def pick_config(dp: int, pv_fp8: bool, interpret: bool):
    if interpret:
        return INTERPRET_CONFIG
    return CONFIGS[(max(dp, 64), pv_fp8)]


def attention_fwd(q, k, v, *, sm_scale, pv_fp8, smooth_k, key_padding_mask, window, config):
    """Launch the pre-pass and the attention kernel.

    q: [B, H, NQ, D]; k, v: [B, H_kv, NK, D] strided views (head dim contiguous, H % H_kv == 0), bf16 or
    fp16 (all one dtype). key_padding_mask: int8/bool [B, NK] (nonzero = a real key) or None.
    window: (left, right) token reach, query i sees keys j with i - left <= j <= i + right, or None.
    config: (BLOCK_M, BLOCK_N, num_warps, num_stages[, int_trick[, maxnreg]]): int_trick turns int32 scores
    into floats by bit arithmetic instead of conversion instructions; maxnreg caps registers per thread so
    more programs share an SM (0: no cap).
    Returns out [B, H, NQ, D] (a strided view of a tensor laid out like q's storage) and lse f32 [B, H, NQ].
    """
    B, H, NQ, D = q.shape
    HK, NK = k.shape[1], k.shape[2]
    DP = padded_head_dim(D)
    BM, BN, warps, stages = config[:4]
    int_trick = bool(config[4]) if len(config) > 4 else True
    maxnreg = {"maxnreg": int(config[5])} if len(config) > 5 and config[5] and not INTERPRET else {}
    stats, kq, ks, vt = kv_prepass(k, v, BN, smooth_k, pv_fp8)
    NP = kq.shape[1]
    out = torch.empty_like(q)
    lse = _empty((B, H, NQ), q.device, torch.float32)
    if POISON:
        out.fill_(float("nan"))
    kpm = key_padding_mask if key_padding_mask is not None else kq  # dummy pointer when absent
    wl, wr = window if window is not None else (WINDOW_NONE, WINDOW_NONE)
    grid = (triton.cdiv(NQ, BM), B * H)
    _attn_fwd_kernel[grid](
        q, kq, ks, v, vt if pv_fp8 else kq, stats, kpm, out, lse,
        q.stride(0), q.stride(1), q.stride(2), v.stride(0), v.stride(1), v.stride(2),
        out.stride(0), out.stride(1), out.stride(2), kpm.stride(0) if key_padding_mask is not None else 0,
        NQ, NK, NP, H, HK, H // HK,
        sm_scale * LOG2E, sm_scale, wl, wr,
        D=D, DP=DP, BLOCK_M=BM, BLOCK_N=BN, PV_FP8=pv_fp8, SMOOTH_K=smooth_k,
        HAS_KPM=key_padding_mask is not None, HAS_WINDOW=window is not None, INT_TRICK=int_trick,
        F32_DOT=INTERPRET, num_warps=warps, num_stages=stages, **maxnreg,
    )
    return out, lse


