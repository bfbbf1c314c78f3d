"""The five weight formats and their pure-torch reference math: the one statement of what each format
computes. The Triton kernels in ``ditq.kernels`` must agree with these functions.

Layouts (in memory; ``ditq.checkpoint.layout`` maps them to and from the on-disk shapes):

====================  ==============  ======================  ===========================
format                storage         weight_scale            activation scale (x [M, K])
====================  ==============  ======================  ===========================
``int8-row``          int8 [N, K]     f32 [N, 1]              f32 [M, 1]   (per token)
``int8-block``        int8 [N, K]     f32 [N/128, K/128]      f32 [M, K/128] (per token, 128 channels)
``fp8-tensor``        e4m3fn [N, K]   f32 []                  f32 [M, 1]
``fp8-row``           e4m3fn [N, K]   f32 [N, 1]              f32 [M, 1]
``fp8-block``         e4m3fn [N, K]   f32 [N/128, K/128]      f32 [M, K/128]
====================  ==============  ======================  ===========================

Scales are symmetric: ``scale = max(amax, AMAX_EPS) / qmax`` (qmax 127 for int8, 448 for e4m3fn),
``q = clamp(round_half_even(v / scale), -qmax, qmax)``; fp8 rounding is the cast's own (nearest even).
Activations of ``fp8-tensor`` get a per-token scale like ``fp8-row``: one weight scale does not force one
activation scale, and per-token is both more accurate and as fast (it is applied in the GEMM epilogue).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from .errors import FormatError, NonFiniteError, ShapeError

AMAX_EPS = 1e-12
"""Floor of every amax, so an all-zero row, block or token gets a positive scale (never 0 or NaN)."""

BLOCK = 128
"""Edge of a weight block and width of an activation group in the block formats."""


@dataclass(frozen=True)
class Format:
    name: str  # ditq's name, used identically in the API, the CLI and reports
    storage: torch.dtype  # dtype of qdata
    qmax: float  # largest representable magnitude of the storage dtype used by the scale
    weight_granularity: str  # "tensor" | "row" | "block"
    comfy_format: str  # the `format` string written to `.comfy_quant`
    is_int: bool

    @property
    def is_block(self) -> bool:
        return self.weight_granularity == "block"

    @property
    def act_granularity(self) -> str:
        """"token" (scale [M, 1]) or "token-block" (scale [M, K/128])."""
        return "token-block" if self.is_block else "token"

    def weight_scale_shape(self, n: int, k: int) -> tuple[int, ...]:
        if self.weight_granularity == "tensor":
            return ()
        if self.weight_granularity == "row":
            return (n, 1)
        return (n // BLOCK, k // BLOCK)


FORMATS: dict[str, Format] = {
    f.name: f
    for f in (
        Format("int8-row", torch.int8, 127.0, "row", "int8_tensorwise", True),
        Format("int8-block", torch.int8, 127.0, "block", "int8_blockwise", True),
        Format("fp8-tensor", torch.float8_e4m3fn, 448.0, "tensor", "float8_e4m3fn", False),
        Format("fp8-row", torch.float8_e4m3fn, 448.0, "row", "float8_e4m3fn_rowwise", False),
        Format("fp8-block", torch.float8_e4m3fn, 448.0, "block", "float8_e4m3fn_blockwise", False),
    )
}


def get_format(fmt: str | Format) -> Format:
    """Look a format up by ditq name (``int8-row``), also accepting ``int8_row``; raises FormatError."""
    if isinstance(fmt, Format):
        return fmt
    key = str(fmt).strip().lower().replace("_", "-")
    if key not in FORMATS:
        raise FormatError(f"unknown format {fmt!r}; choose one of: {', '.join(FORMATS)}")
    return FORMATS[key]


def check_weight(w: torch.Tensor, fmt: Format, name: str | None = None) -> None:
    """Refuse what a format cannot hold, before any work: wrong rank, non-divisible block dims, NaN/Inf."""
    what = f"weight {name!r}" if name else "weight"
    if w.dim() != 2:
        raise ShapeError(f"{what} has shape {tuple(w.shape)}: only 2-D [N_out, K_in] weights are quantized")
    if not w.is_floating_point():
        raise FormatError(f"{what} has dtype {w.dtype}: expected a floating-point weight")
    n, k = w.shape
    if fmt.is_block and (n % BLOCK or k % BLOCK):
        raise ShapeError(
            f"{what} has shape [{n}, {k}]: format {fmt.name} needs both dimensions divisible by {BLOCK}; "
            f"use int8-row / fp8-row for this layer or keep it in high precision"
        )
    # NaN and Inf propagate through a sum, so one reduction clears the common case; only a non-finite
    # sum (a bad value, or an overflow of large finite ones) pays for the element-wise check
    if not bool(torch.isfinite(w.sum(dtype=torch.float32))) and not bool(torch.isfinite(w).all()):
        bad = int((~torch.isfinite(w)).sum())
        raise NonFiniteError(f"{what} holds {bad} NaN/Inf value(s); fix the checkpoint or keep this layer unquantized")


def _blocks(t: torch.Tensor) -> torch.Tensor:
    """[N, K] -> [N/128, 128, K/128, 128] view."""
    n, k = t.shape
    return t.reshape(n // BLOCK, BLOCK, k // BLOCK, BLOCK)


def expand_block_scale(scale: torch.Tensor, n: int, k: int) -> torch.Tensor:
    """[N/128, K/128] -> [N, K] (each block's scale repeated over its block)."""
    return scale.repeat_interleave(BLOCK, 0)[:n].repeat_interleave(BLOCK, 1)[:, :k]


def round_to_storage(v: torch.Tensor, fmt: Format) -> torch.Tensor:
    """Round already-scaled values to the storage dtype (round half to even, clamp to +-qmax)."""
    v = v.clamp(-fmt.qmax, fmt.qmax)
    if fmt.is_int:
        return torch.round(v).to(torch.int8)
    return v.to(fmt.storage)


def weight_scale(w: torch.Tensor, fmt: Format) -> torch.Tensor:
    """The float32 scale of a weight [N, K] for a format (shape ``fmt.weight_scale_shape``)."""
    a = w.detach().float().abs()
    if fmt.weight_granularity == "tensor":
        amax = a.amax()
    elif fmt.weight_granularity == "row":
        amax = a.amax(dim=1, keepdim=True)
    else:
        amax = _blocks(a).amax(dim=(1, 3))
    return amax.clamp(min=AMAX_EPS) / fmt.qmax


def broadcast_weight_scale(scale: torch.Tensor, fmt: Format, n: int, k: int) -> torch.Tensor:
    """A scale made broadcastable against the [N, K] weight."""
    return expand_block_scale(scale, n, k) if fmt.is_block else scale


def quantize_weight_ref(
    w: torch.Tensor, fmt: str | Format, scale: torch.Tensor | None = None, name: str | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """Reference weight quantization. w: [N, K] float. Returns (qdata [N, K] storage dtype, scale f32).

    A given ``scale`` (e.g. an optimized one) is used instead of the amax scale."""
    fmt = get_format(fmt)
    check_weight(w, fmt, name)
    if scale is None:
        scale = weight_scale(w, fmt)
    n, k = w.shape
    q = round_to_storage(w.float() / broadcast_weight_scale(scale, fmt, n, k), fmt)
    return q, scale.float()


def dequantize_ref(q: torch.Tensor, scale: torch.Tensor, fmt: str | Format, dtype=torch.float32) -> torch.Tensor:
    """Reference dequantization, bit-for-bit as ComfyUI does it: int8 multiplies in float32 then casts;
    fp8 casts to ``dtype`` first and multiplies by the scale rounded to ``dtype``."""
    fmt = get_format(fmt)
    n, k = q.shape
    s = broadcast_weight_scale(scale, fmt, n, k)
    if fmt.is_int:
        return (q.float() * s).to(dtype)
    return q.to(dtype) * s.to(dtype)


def quantize_activation_ref(x: torch.Tensor, fmt: str | Format) -> tuple[torch.Tensor, torch.Tensor]:
    """Reference dynamic activation quantization. x: [..., K] float.

    Returns (q [..., K] storage dtype, scale f32 [..., 1] per token or [..., K/128] per token and group)."""
    fmt = get_format(fmt)
    xf = x.float()
    k = x.shape[-1]
    if fmt.act_granularity == "token":
        scale = xf.abs().amax(dim=-1, keepdim=True).clamp(min=AMAX_EPS) / fmt.qmax
        return round_to_storage(xf / scale, fmt), scale
    if k % BLOCK:
        raise ShapeError(f"activation has K={k}: format {fmt.name} needs K divisible by {BLOCK}")
    g = xf.reshape(*x.shape[:-1], k // BLOCK, BLOCK)
    scale = g.abs().amax(dim=-1).clamp(min=AMAX_EPS) / fmt.qmax
    q = round_to_storage(g / scale.unsqueeze(-1), fmt).reshape(x.shape)
    return q, scale


def dequantize_activation_ref(q: torch.Tensor, scale: torch.Tensor, fmt: str | Format, dtype=torch.float32):
    fmt = get_format(fmt)
    if fmt.act_granularity == "token":
        return q.to(dtype) * scale.to(dtype)
    k = q.shape[-1]
    g = q.to(dtype).reshape(*q.shape[:-1], k // BLOCK, BLOCK) * scale.to(dtype).unsqueeze(-1)
    return g.reshape(q.shape)


def scaled_mm_ref(
    xq: torch.Tensor,
    x_scale: torch.Tensor,
    wq: torch.Tensor,
    w_scale: torch.Tensor,
    fmt: str | Format,
    bias: torch.Tensor | None = None,
    out_dtype: torch.dtype = torch.bfloat16,
    compute_dtype: torch.dtype = torch.float32,
) -> torch.Tensor:
    """Reference of the quantized GEMM: ``(x_dq @ w_dq^T + bias).to(out_dtype)``.

    xq [M, K], x_scale [M, 1] or [M, K/128]; wq [N, K], w_scale per format. The sum over K blocks of
    scaled partial products equals the product of the dequantized operands, which is what this computes
    (in ``compute_dtype``; float64 for test references)."""
    fmt = get_format(fmt)
    n, k = wq.shape
    xd = dequantize_activation_ref(xq, x_scale, fmt, compute_dtype)
    wd = wq.to(compute_dtype) * broadcast_weight_scale(w_scale, fmt, n, k).to(compute_dtype)
    y = xd @ wd.t()
    if bias is not None:
        y = y + bias.to(compute_dtype)
    return y.to(out_dtype)


def linear_ref(
    x: torch.Tensor,
    wq: torch.Tensor,
    w_scale: torch.Tensor,
    fmt: str | Format,
    bias: torch.Tensor | None = None,
    out_dtype: torch.dtype | None = None,
    compute_dtype: torch.dtype = torch.float32,
) -> torch.Tensor:
    """Reference W8A8 linear: quantize x dynamically, then ``scaled_mm_ref``. x: [..., K]."""
    fmt = get_format(fmt)
    lead, k = x.shape[:-1], x.shape[-1]
    x2 = x.reshape(-1, k)
    xq, xs = quantize_activation_ref(x2, fmt)
    y = scaled_mm_ref(xq, xs, wq, w_scale, fmt, bias, out_dtype or x.dtype, compute_dtype)
    return y.reshape(*lead, wq.shape[0])


def relative_error(y: torch.Tensor, ref: torch.Tensor) -> float:
    """||y - ref|| / ||ref|| in float64 (0 when both are zero)."""
    y64, r64 = y.double(), ref.double()
    den = r64.norm().item()
    num = (y64 - r64).norm().item()
    return num / den if den > 0 else (0.0 if num == 0 else math.inf)


def sqnr_db(y: torch.Tensor, ref: torch.Tensor) -> float:
    """Signal-to-quantization-noise ratio in dB."""
    e = relative_error(y, ref)
    return math.inf if e == 0 else -20.0 * math.log10(e)


def qdata_bytes(n: int, k: int, fmt: str | Format) -> int:
    """Bytes of a quantized weight: 1 byte a value plus its float32 scales."""
    fmt = get_format(fmt)
    return n * k + 4 * math.prod(fmt.weight_scale_shape(n, k))


# -- Hadamard rotation ("ConvRot", FORMATS.md) -------------------------------------------------------------
_H4 = ((1, 1, 1, -1), (1, 1, -1, 1), (1, -1, 1, 1), (-1, 1, 1, 1))


def hadamard(g: int, dtype: torch.dtype = torch.float32, device=None) -> torch.Tensor:
    """The "regular" Hadamard matrix of ComfyUI's ConvRot: the Kronecker power of H_4 of size g (a power of
    4), divided by sqrt(g). Symmetric and its own inverse, so rotating twice is the identity."""
    if g < 4 or g & (g - 1) or (g.bit_length() - 1) % 2:
        raise FormatError(f"rotation group size {g} is not a power of 4 (16, 64, 256, ...)")
    h4 = torch.tensor(_H4, dtype=torch.float64)
    h = h4
    while h.shape[0] < g:
        h = torch.kron(h, h4)
    return (h / math.sqrt(g)).to(dtype=dtype, device=device)


def rotation_group_size(k: int, max_group: int = 256) -> int:
    """The largest power of 4 up to ``max_group`` that divides K (256 for most DiT layers, 64 for K = 128
    or K = 384); raises ShapeError when not even 4 divides K."""
    g = max_group
    while g >= 4:
        if k % g == 0 and (g.bit_length() - 1) % 2 == 0:
            return g
        g //= 2
    raise ShapeError(f"K={k} is not divisible by 4: a Hadamard rotation cannot apply")


def rotate(t: torch.Tensor, g: int) -> torch.Tensor:
    """Right-multiply every group of g consecutive channels of t [..., K] by H_g (computed in float32 at
    least, returned in t's dtype). Rotating a weight offline and its activations at run time leaves
    x @ W^T unchanged because H_g is symmetric and orthogonal."""
    k = t.shape[-1]
    if k % g:
        raise ShapeError(f"K={k} is not divisible by the rotation group size {g}")
    cdtype = torch.float64 if t.dtype == torch.float64 else torch.float32
    h = hadamard(g, cdtype, t.device)
    out = t.to(cdtype).reshape(*t.shape[:-1], k // g, g) @ h
    return out.reshape(t.shape).to(t.dtype)
