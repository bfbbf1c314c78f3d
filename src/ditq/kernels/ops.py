"""The kernel entry points the rest of ditq calls. Each takes plain tensors and a format name, runs the
Triton kernel where it can (``triton_runs_on``) and the pure-torch reference of ``ditq.formats``
elsewhere, so every op works on any device.

Layouts (M tokens, K in, N out):
    act_quant(x [M, K], fmt)                  -> q [M, K] storage dtype, scale f32 [M, 1] | [M, K/128]
    quant_weight(w [N, K], fmt)               -> q [N, K] storage dtype, scale f32 (formats.py table)
    dequant_weight(q, scale, fmt, dtype)      -> w [N, K] dtype
    scaled_mm(xq, xs, wq, ws, fmt, bias, out_dtype) -> y [M, N] out_dtype
    linear(x [..., K], wq, ws, fmt, bias, out_dtype) -> y [..., N]   (act_quant + scaled_mm)

The runtime ops (act_quant, scaled_mm, linear, dequant_weight) are also registered as torch custom ops
``torch.ops.ditq.*`` with fake implementations, so ``torch.compile`` traces them without graph breaks.
Eager calls skip the custom-op dispatcher (it costs tens of microseconds a call) and launch the Triton
wrappers directly; only a graph being compiled goes through the registered ops.
"""

from __future__ import annotations

import torch

from .. import formats as F
from ..errors import ShapeError
from . import HAS_TRITON, triton_runs_on

if HAS_TRITON:
    from . import gemm as _gemm
    from . import quant as _quant


def _fmt(fmt) -> F.Format:
    return fmt if isinstance(fmt, F.Format) else (F.FORMATS.get(fmt) or F.get_format(fmt))


# ----------------------------------------------------------------------------------------------------------
# eager implementations (Triton)


def _linear_triton(x, wq, w_scale, fmt: F.Format, bias, out_dtype):
    k = x.shape[-1]
    if wq.dim() != 2 or wq.shape[1] != k or wq.dtype != fmt.storage:
        raise ShapeError(
            f"linear: x has K={k} (shape {tuple(x.shape)}) but the {fmt.name} weight is {wq.dtype} {tuple(wq.shape)}"
        )
    lead = x.shape[:-1]
    x2 = x if x.dim() == 2 else x.reshape(-1, k)  # act_quant reads any strides, so no copy for 2-D views
    xq, xs = _quant.act_quant(x2, fmt)
    if bias is not None and bias.shape != (wq.shape[0],):
        raise ShapeError(f"linear: bias has shape {tuple(bias.shape)}, expected ({wq.shape[0]},)")
    n = wq.shape[0]
    if (w_scale.shape != fmt.weight_scale_shape(n, k) if fmt.is_block else w_scale.numel() != (1 if fmt.weight_granularity == "tensor" else n)):
        raise ShapeError(f"linear {fmt.name}: weight {tuple(wq.shape)} does not go with a scale of shape {tuple(w_scale.shape)}")
    # the activation side was made here, so only the weight side above needed checking
    y = _gemm.scaled_mm(xq, xs, wq, w_scale, fmt, bias, out_dtype or x.dtype, check=False)
    return y if x.dim() == 2 else y.reshape(*lead, wq.shape[0])


# ----------------------------------------------------------------------------------------------------------
# custom ops for torch.compile


def _act_scale_shape(fmt: F.Format, m: int, k: int) -> tuple[int, int]:
    return (m, k // F.BLOCK) if fmt.is_block else (m, 1)


if HAS_TRITON:

    @torch.library.custom_op("ditq::act_quant", mutates_args=())
    def _act_quant_op(x: torch.Tensor, fmt: str) -> tuple[torch.Tensor, torch.Tensor]:
        return _quant.act_quant(x, fmt)

    @_act_quant_op.register_fake
    def _(x, fmt):
        f = _fmt(fmt)
        m, k = x.shape
        return x.new_empty((m, k), dtype=f.storage), x.new_empty(_act_scale_shape(f, m, k), dtype=torch.float32)

    @torch.library.custom_op("ditq::scaled_mm", mutates_args=())
    def _scaled_mm_op(
        xq: torch.Tensor,
        x_scale: torch.Tensor,
        wq: torch.Tensor,
        w_scale: torch.Tensor,
        fmt: str,
        bias: torch.Tensor | None,
        out_dtype: torch.dtype,
    ) -> torch.Tensor:
        return _gemm.scaled_mm(xq, x_scale, wq, w_scale, fmt, bias, out_dtype)

    @_scaled_mm_op.register_fake
    def _(xq, x_scale, wq, w_scale, fmt, bias, out_dtype):
        return xq.new_empty((xq.shape[0], wq.shape[0]), dtype=out_dtype)

    @torch.library.custom_op("ditq::linear", mutates_args=())
    def _linear_op(
        x: torch.Tensor,
        wq: torch.Tensor,
        w_scale: torch.Tensor,
        fmt: str,
        bias: torch.Tensor | None,
        out_dtype: torch.dtype,
    ) -> torch.Tensor:
        return _linear_triton(x, wq, w_scale, _fmt(fmt), bias, out_dtype)

    @_linear_op.register_fake
    def _(x, wq, w_scale, fmt, bias, out_dtype):
        return x.new_empty((*x.shape[:-1], wq.shape[0]), dtype=out_dtype)

    @torch.library.custom_op("ditq::dequant_weight", mutates_args=())
    def _dequant_op(q: torch.Tensor, scale: torch.Tensor, fmt: str, dtype: torch.dtype) -> torch.Tensor:
        return _quant.dequant_weight(q, scale, fmt, dtype)

    @_dequant_op.register_fake
    def _(q, scale, fmt, dtype):
        return q.new_empty(q.shape, dtype=dtype)


def _compiling() -> bool:
    return torch.compiler.is_compiling()


# ----------------------------------------------------------------------------------------------------------
# public entry points


def act_quant(x: torch.Tensor, fmt) -> tuple[torch.Tensor, torch.Tensor]:
    """Dynamic activation quantization of x [..., K] (bf16/fp16/fp32, any strides): (q, scale) as
    ``formats.quantize_activation_ref`` (scale [..., 1] per token or [..., K/128] for block formats)."""
    f = _fmt(fmt)
    if not triton_runs_on(x):
        return F.quantize_activation_ref(x, f)
    lead, k = x.shape[:-1], x.shape[-1]
    x2 = x if x.dim() == 2 else x.reshape(-1, k)
    q, s = torch.ops.ditq.act_quant(x2, f.name) if _compiling() else _quant.act_quant(x2, f)
    if x.dim() != 2:
        q, s = q.reshape(*lead, k), s.reshape(*lead, s.shape[-1])
    return q, s


def quant_weight(w: torch.Tensor, fmt, scale: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Weight quantization of w [N, K]: (q [N, K], scale f32) as ``formats.quantize_weight_ref``; a given
    ``scale`` (e.g. an optimized one) replaces the amax scale. Offline: no custom op."""
    f = _fmt(fmt)
    if not triton_runs_on(w):
        return F.quantize_weight_ref(w, f, scale)
    return _quant.quant_weight(w, f, scale)


def dequant_weight(q: torch.Tensor, scale: torch.Tensor, fmt, dtype: torch.dtype) -> torch.Tensor:
    """q [N, K] -> [N, K] ``dtype``, bit-for-bit as ``formats.dequantize_ref`` (ComfyUI's rounding)."""
    f = _fmt(fmt)
    if not triton_runs_on(q):
        return F.dequantize_ref(q, scale, f, dtype)
    if _compiling():
        return torch.ops.ditq.dequant_weight(q, scale, f.name, dtype)
    return _quant.dequant_weight(q, scale, f, dtype)


def scaled_mm(xq, x_scale, wq, w_scale, fmt, bias=None, out_dtype=torch.bfloat16) -> torch.Tensor:
    """y [M, N] = dequant(xq [M, K]) @ dequant(wq [N, K])^T + bias, in ``out_dtype``."""
    f = _fmt(fmt)
    if not triton_runs_on(xq):
        return F.scaled_mm_ref(xq, x_scale, wq, w_scale, f, bias, out_dtype)
    if _compiling():
        return torch.ops.ditq.scaled_mm(xq, x_scale, wq, w_scale, f.name, bias, out_dtype)
    return _gemm.scaled_mm(xq, x_scale, wq, w_scale, f, bias, out_dtype)


def linear(x, wq, w_scale, fmt, bias=None, out_dtype=None) -> torch.Tensor:
    """W8A8 linear: y [..., N] = act_quant(x [..., K]) times the quantized weight wq [N, K], + bias, in
    ``out_dtype`` (default x's dtype). One activation-quantization kernel, then one GEMM whose epilogue
    applies both scales, adds the bias and casts."""
    f = _fmt(fmt)
    if not triton_runs_on(x):
        return F.linear_ref(x, wq, w_scale, f, bias, out_dtype)
    if _compiling():
        return torch.ops.ditq.linear(x, wq, w_scale, f.name, bias, out_dtype or x.dtype)
    return _linear_triton(x, wq, w_scale, f, bias, out_dtype)
