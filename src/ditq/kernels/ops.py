"""The kernel entry points the rest of ditq calls. Each takes plain tensors and a format name, runs the
Triton kernel where it can (``triton_runs_on``) and the pure-torch reference of ``ditq.formats``
elsewhere, so every op works on any device.

Layouts (M tokens, K in, N out):
    act_quant(x [M, K], fmt)                  -> q [M, K] storage dtype, scale f32 [M, 1] | [M, K/128]
    quant_weight(w [N, K], fmt)               -> q [N, K] storage dtype, scale f32 (formats.py table)
    dequant_weight(q, scale, fmt, dtype)      -> w [N, K] dtype
    scaled_mm(xq, xs, wq, ws, fmt, bias, out_dtype) -> y [M, N] out_dtype
    linear(x [..., K], wq, ws, fmt, bias, out_dtype) -> y [..., N]   (act_quant + scaled_mm)
"""

from __future__ import annotations

import torch

from .. import formats as F


def act_quant(x: torch.Tensor, fmt: str) -> tuple[torch.Tensor, torch.Tensor]:
    return F.quantize_activation_ref(x, fmt)


def quant_weight(w: torch.Tensor, fmt: str) -> tuple[torch.Tensor, torch.Tensor]:
    return F.quantize_weight_ref(w, fmt)


def dequant_weight(q: torch.Tensor, scale: torch.Tensor, fmt: str, dtype: torch.dtype) -> torch.Tensor:
    return F.dequantize_ref(q, scale, fmt, dtype)


def scaled_mm(xq, x_scale, wq, w_scale, fmt: str, bias=None, out_dtype=torch.bfloat16) -> torch.Tensor:
    return F.scaled_mm_ref(xq, x_scale, wq, w_scale, fmt, bias, out_dtype)


def linear(x, wq, w_scale, fmt: str, bias=None, out_dtype=None) -> torch.Tensor:
    return F.linear_ref(x, wq, w_scale, fmt, bias, out_dtype)
