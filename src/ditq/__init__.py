"""ditq: 8-bit quantization for diffusion transformers.

Offline: ``ditq convert`` / ``analyze`` / ``verify``. At run time: ``quantize_`` a loaded model or
``load_quantized`` a converted file; ``QuantizedTensor`` weights send ``F.linear`` to Triton kernels
(int8 / fp8, per row or per 128x128 block), and ``attention`` is a fused INT8 attention.
"""

from __future__ import annotations

import importlib

from .errors import (
    CheckpointError,
    DitqError,
    FormatError,
    NonFiniteError,
    ShapeError,
    UnsupportedFormatError,
)
from .formats import FORMATS, get_format
from .tensor import QuantizedTensor, linear, quantize_activation, quantize_weight

__version__ = "0.1.0"

# Heavier parts load on first use, so `import ditq` stays cheap.
_LAZY = {
    "attention": "ditq.attn",
    "quantize_": "ditq.nn.quantize",
    "load_quantized": "ditq.nn.load",
    "enable_int8_attention": "ditq.nn.attention",
    "disable_int8_attention": "ditq.nn.attention",
    "apply_lora": "ditq.nn.lora",
    "remove_lora": "ditq.nn.lora",
    "set_lora_scale": "ditq.nn.lora",
    "enable_lora": "ditq.nn.lora",
    "disable_lora": "ditq.nn.lora",
    "lora_adapters": "ditq.nn.lora",
    "autoquant_": "ditq.nn.autoquant",
}


def __getattr__(name: str):
    module = _LAZY.get(name)
    if module is None:
        raise AttributeError(f"module 'ditq' has no attribute {name!r}")
    return getattr(importlib.import_module(module), name)


__all__ = [
    "CheckpointError",
    "DitqError",
    "FORMATS",
    "FormatError",
    "NonFiniteError",
    "QuantizedTensor",
    "ShapeError",
    "UnsupportedFormatError",
    "get_format",
    "linear",
    "quantize_activation",
    "quantize_weight",
    *_LAZY,
]
