"""``ditq.attention``: fused INT8 attention (INT8 Q.K^T, FP8 or 16-bit P.V) for diffusion transformers.

The Triton kernels live in ``ditq.kernels.attention``; this module checks arguments, registers the op
with torch.library (so torch.compile and CUDA graphs see one opaque op with a fake implementation) and
holds the pure-torch reference, which is also the fallback where Triton cannot run.
"""

from __future__ import annotations

import math
from typing import Optional

import torch

from .errors import FormatError, ShapeError
from .kernels import triton_runs_on

PV_MODES = ("fp8", "bf16")
LAYOUTS = ("HND", "NHD")
_DTYPES = (torch.bfloat16, torch.float16)
_WINDOW_NONE = 1 << 30


def attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    *,
    layout: str = "HND",
    causal: bool = False,
    sm_scale: float | None = None,
    pv: str = "fp8",
    smooth_k: bool = True,
    key_padding_mask: torch.Tensor | None = None,
    window: int | tuple[int, int] | None = None,
    return_lse: bool = False,
    _config: tuple[int, ...] | None = None,
):
    """Softmax attention with 8-bit Q.K^T (and 8-bit P.V when ``pv="fp8"``).

    q: [B, H, Nq, D] ("HND") or [B, Nq, H, D] ("NHD"); k, v: the same layout with H_kv heads and Nk
    tokens, H % H_kv == 0 (grouped-query attention). bf16 or fp16, all three alike; D <= 256 (64 and 128
    are the tuned sizes; others are padded to the next power of 2).
    causal: query i sees keys j <= i (top-left aligned, as SDPA's ``is_causal``).
    sm_scale: softmax scale, default 1/sqrt(D).
    pv: "fp8" (P and V in e4m3, V scaled per channel) or "bf16" (P in the inputs' 16-bit type).
    smooth_k: subtract K's mean over tokens before quantizing (softmax is invariant to it; it keeps INT8
        accurate on real DiT keys, which share a large per-channel bias). The caller's K is not modified.
    key_padding_mask: [B, Nk], True (nonzero) for a real key, False for padding (the convention of SDPA's
        boolean masks). A query with no visible key gets zeros and lse = -inf.
    window: block-sparse local attention: an int w or a pair (left, right); query i sees keys
        i - left <= j <= i + right. Key blocks wholly outside the band are skipped. Combines with causal.
    return_lse: also return the natural-log log-sum-exp of each query's scaled scores, f32 [B, H, Nq]
        (whatever the layout), exact with respect to the K smoothing, so that attention over key shards
        merges exactly: out = sum_s exp(lse_s - lse) out_s with lse = logsumexp_s lse_s.
    Returns out in q's layout and dtype (and lse).
    """
    if layout not in LAYOUTS:
        raise FormatError(f"attention: layout={layout!r}; use one of {LAYOUTS}")
    if pv not in PV_MODES:
        raise FormatError(f"attention: pv={pv!r}; use one of {PV_MODES}")
    for name, t in (("q", q), ("k", k), ("v", v)):
        if t.dim() != 4:
            raise ShapeError(f"attention: {name} has shape {tuple(t.shape)}; expected 4-D {layout}")
        if t.dtype not in _DTYPES:
            raise FormatError(f"attention: {name} is {t.dtype}; pass bfloat16 or float16 (cast with .to())")
    if not (q.dtype == k.dtype == v.dtype):
        raise FormatError(f"attention: q, k, v dtypes differ ({q.dtype}, {k.dtype}, {v.dtype}); cast them alike")
    if layout == "NHD":
        q, k, v = q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)
    B, H, NQ, D = q.shape
    HK, NK = k.shape[1], k.shape[2]
    if k.shape != v.shape or k.shape[0] != B or k.shape[3] != D:
        raise ShapeError(
            f"attention: q {tuple(q.shape)}, k {tuple(k.shape)}, v {tuple(v.shape)} (as HND) do not match: "
            "k and v need q's batch and head dim and the same shape as each other"
        )
    if H % HK != 0:
        raise ShapeError(f"attention: {H} query heads is not a multiple of {HK} key/value heads")
    if D > 256:
        raise ShapeError(f"attention: head dim {D} > 256 is not supported; use SDPA for it")
    if NQ == 0 or NK == 0 or B == 0 or H == 0:
        raise ShapeError(f"attention: empty input (q {tuple(q.shape)}, k {tuple(k.shape)} as HND)")
    if q.device != k.device or q.device != v.device:
        raise ShapeError(f"attention: q, k, v on different devices ({q.device}, {k.device}, {v.device})")
    wl, wr = _window(window, causal)
    if key_padding_mask is not None:
        if tuple(key_padding_mask.shape) != (B, NK):
            raise ShapeError(
                f"attention: key_padding_mask has shape {tuple(key_padding_mask.shape)}; expected [B, Nk] = "
                f"[{B}, {NK}] (True = real key)"
            )
        key_padding_mask = (key_padding_mask != 0).to(device=q.device, dtype=torch.uint8).contiguous()
    q, k, v = (t if t.stride(-1) == 1 else t.contiguous() for t in (q, k, v))
    scale = float(sm_scale) if sm_scale is not None else 1.0 / math.sqrt(D)
    out, lse = torch.ops.ditq.int8_attention(
        q, k, v, key_padding_mask, scale, pv, smooth_k, wl, wr, list(_config) if _config else None
    )
    if layout == "NHD":
        out = out.transpose(1, 2)
    return (out, lse) if return_lse else out


def _window(window, causal: bool) -> tuple[int, int]:
    """(left, right) reach in tokens; _WINDOW_NONE means unbounded; (-1, -1) means no band at all."""
    if window is None:
        wl = wr = _WINDOW_NONE
    else:
        wl, wr = (window, window) if isinstance(window, int) else tuple(window)
        if wl < 0 or wr < 0:
            raise ShapeError(f"attention: window={window!r}; reaches must be >= 0 tokens")
        wl, wr = min(int(wl), _WINDOW_NONE), min(int(wr), _WINDOW_NONE)
    if causal:
        wr = 0
    if window is None and not causal:
        return -1, -1
    return wl, wr


@torch.library.custom_op("ditq::int8_attention", mutates_args=())
def _int8_attention_op(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    key_padding_mask: Optional[torch.Tensor],
    sm_scale: float,
    pv: str,
    smooth_k: bool,
    window_left: int,
    window_right: int,
    config: Optional[list[int]],
) -> tuple[torch.Tensor, torch.Tensor]:
    """q [B, H, Nq, D], k / v [B, Hkv, Nk, D] (HND views, head dim contiguous) -> (out like q, lse f32)."""
    window = None if window_left < 0 else (window_left, window_right)
    if not triton_runs_on(q):
        out, lse = attention_ref(
            q, k, v, sm_scale=sm_scale, pv=pv, smooth_k=smooth_k, key_padding_mask=key_padding_mask,
            window=window, compute_dtype=torch.float32,
        )
        res = torch.empty_like(q)
        res.copy_(out)
        return res, lse
    from .kernels import INTERPRET
    from .kernels.attention import attention_fwd, padded_head_dim, pick_config

    cfg = tuple(config) if config else pick_config(padded_head_dim(q.shape[-1]), pv == "fp8", INTERPRET)
    return attention_fwd(
        q, k, v, sm_scale=sm_scale, pv_fp8=pv == "fp8", smooth_k=smooth_k, key_padding_mask=key_padding_mask,
        window=window, config=cfg,
    )


@_int8_attention_op.register_fake
def _(q, k, v, key_padding_mask, sm_scale, pv, smooth_k, window_left, window_right, config):
    B, H, NQ, _ = q.shape
    return torch.empty_like(q), q.new_empty((B, H, NQ), dtype=torch.float32)


def attention_ref(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    *,
    sm_scale: float | None = None,
    pv: str = "fp8",
    smooth_k: bool = True,
    key_padding_mask: torch.Tensor | None = None,
    window: tuple[int, int] | None = None,
    causal: bool = False,
    quantize: bool = True,
    block_n: int = 64,
    compute_dtype: torch.dtype = torch.float64,
    chunk: int = 1024,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Pure-torch attention, HND ([B, H, Nq, D]; k, v [B, Hkv, Nk, D]); returns (out f32/f64, lse).

    quantize=True reproduces the kernel's quantization (Q int8 per token, smoothed K int8 per block of
    ``block_n`` tokens, P and V in e4m3 for pv="fp8", V's mean rounding error subtracted per channel, or P
    rounded to v's dtype for "bf16"), up to the online softmax's order of operations; quantize=False is
    exact attention in ``compute_dtype`` (the accuracy reference). Queries run in chunks of ``chunk`` so
    the score matrix stays small.
    """
    B, H, NQ, D = q.shape
    HK, NK = k.shape[1], k.shape[2]
    scale = float(sm_scale) if sm_scale is not None else 1.0 / math.sqrt(D)
    if causal:
        window = (_WINDOW_NONE if window is None else window[0], 0)
    cd = compute_dtype
    qf = q.to(cd)
    kf = k.to(cd)
    vf = v.to(cd)
    mu = kf.mean(2, keepdim=True) if smooth_k else torch.zeros_like(kf[:, :, :1])
    kc = kf - mu
    if quantize:
        qs = qf.abs().amax(-1, keepdim=True).clamp(min=1e-12) / 127
        qd = torch.round(qf / qs).clamp(-127, 127) * qs
        pad = (-NK) % block_n
        kb = torch.nn.functional.pad(kc, (0, 0, 0, pad)).unflatten(2, (-1, block_n))
        ks = kb.abs().amax(dim=(-2, -1), keepdim=True).clamp(min=1e-12) / 127
        kd = (torch.round(kb / ks).clamp(-127, 127) * ks).flatten(2, 3)[:, :, :NK]
    else:
        qd, kd = qf, kc
    if pv == "fp8" and quantize:
        nu = vf.mean(2, keepdim=True)
        vs = (vf.abs().amax(2, keepdim=True) + nu.abs()).clamp(min=1e-12) / 448  # bounds max |v - nu|
        vc = ((vf - nu) / vs).clamp(-448, 448)
        vd = vc.to(torch.float8_e4m3fn).to(cd)
        # the kernel subtracts the mean rounding error of V's e4m3 copy per channel (systematic, see
        # ditq.kernels.attention._kv_quant_kernel)
        nu = nu - vs * (vd - vc).mean(2, keepdim=True)
    else:
        vd = vf
    g = H // HK
    kd = kd.repeat_interleave(g, dim=1)
    vd = vd.repeat_interleave(g, dim=1)
    mu_h = mu.repeat_interleave(g, dim=1)
    cols = torch.arange(NK, device=q.device)
    outs, lses = [], []
    for s0 in range(0, NQ, chunk):
        rows = torch.arange(s0, min(NQ, s0 + chunk), device=q.device)
        s = torch.matmul(qd[:, :, rows], kd.transpose(-1, -2)) * scale
        valid = torch.ones((1, 1, len(rows), NK), dtype=torch.bool, device=q.device)
        if key_padding_mask is not None:
            valid = valid & (key_padding_mask != 0)[:, None, None, :]
        if window is not None:
            wl, wr = window
            valid = valid & (cols[None, :] >= rows[:, None] - wl) & (cols[None, :] <= rows[:, None] + wr)
        s = s.masked_fill(~valid, -math.inf)
        m = s.amax(-1, keepdim=True)
        empty = m == -math.inf
        p = torch.exp(s - m.masked_fill(empty, 0))
        l = p.sum(-1, keepdim=True)
        if quantize and pv == "fp8":
            p8 = (p * 448).to(torch.float8_e4m3fn).to(cd)
            o = torch.matmul(p8, vd) / (448 * l) * vs.repeat_interleave(g, dim=1) + nu.repeat_interleave(g, dim=1)
        elif quantize:
            o = torch.matmul(p.to(v.dtype).to(cd), vd) / l
        else:
            o = torch.matmul(p, vd) / l
        o = o.masked_fill(empty, 0)
        lse = (m + torch.log(l)).squeeze(-1) + scale * (qf[:, :, rows] * mu_h).sum(-1)
        lses.append(lse.masked_fill(empty.squeeze(-1), -math.inf))
        outs.append(o)
    return torch.cat(outs, 2), torch.cat(lses, 2).float()


def merge_attention(outs, lses):
    """Combine attention over disjoint key shards: outs [.., Nq, D] in any layout with lse f32 [B, H, Nq]
    matching (HND). Returns (out in f32, lse). Used by ring / context-parallel inference and the tests."""
    lse = torch.logsumexp(torch.stack(lses), 0)
    w = [torch.exp(l - lse).nan_to_num(0.0) for l in lses]
    out = sum(o.float() * wi[..., None] for o, wi in zip(outs, w))
    return out, lse
