"""Builders of small checkpoints for the checkpoint / convert / verify / analyze tests.

Foreign layouts (ComfyUI / convert-to-quant, legacy scaled fp8) are written here straight from the
description in shared/FORMATS.md with ``safetensors.torch.save_file``, independently of ditq's own
layout code, so that reading them tests ditq against the contract and not against itself. The values
come from ``ditq.formats``' reference quantizer (the one statement of the math) or, for a per-tensor
int8 scale ditq has no format for, from the formula written out below."""

from __future__ import annotations

import json
import secrets
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from ditq import formats as F
from ditq import kernels


@pytest.fixture
def reference_kernels(monkeypatch):
    """Run ditq's pure-torch reference instead of the Triton interpreter on the CPU (~0.5 s a launch):
    the same math, which the kernel tests compare the kernels against. Test modules that quantize many
    layers import it (and make it autouse)."""
    monkeypatch.setattr(kernels, "INTERPRET", False)


def fresh_gen() -> tuple[torch.Generator, int]:
    """A generator with a fresh seed (returned so that tests can print it in assertion messages)."""
    s = secrets.randbits(31)
    return torch.Generator().manual_seed(s), s


def rand(shape, gen, dtype=torch.bfloat16, scale=0.05) -> torch.Tensor:
    return (torch.randn(*shape, generator=gen) * scale).to(dtype)


def small_model(gen, dtype=torch.bfloat16) -> dict[str, torch.Tensor]:
    """A generic transformer-ish state dict: quantizable weights (some with dims not divisible by 128),
    biases, norms, a 3-D tensor and an integer buffer. Small enough for fast CPU tests."""
    sd = {
        "blocks.0.attn.to_q.weight": rand((256, 384), gen, dtype),
        "blocks.0.attn.to_q.bias": rand((256,), gen, dtype),
        "blocks.0.attn.to_k.weight": rand((256, 384), gen, dtype),
        "blocks.0.norm1.weight": 1 + rand((384,), gen, dtype),
        "blocks.0.ff.up.weight": rand((384, 256), gen, dtype),
        "blocks.0.ff.down.weight": rand((200, 384), gen, dtype),  # N % 128 != 0
        "blocks.1.attn.to_q.weight": rand((128, 128), gen, dtype),
        "pos_table": rand((1, 4, 128), gen, dtype),
        "step_counter": torch.arange(5, dtype=torch.int64),
    }
    return sd


def save(path: Path, tensors: dict[str, torch.Tensor], metadata: dict[str, str] | None = None) -> Path:
    save_file({k: v.contiguous() for k, v in tensors.items()}, str(path), metadata=metadata)
    return path


def comfy_bytes(conf: dict) -> torch.Tensor:
    """FORMATS.md: json.dumps(obj) with default separators, UTF-8, as a 1-D uint8 tensor."""
    return torch.tensor(list(json.dumps(conf).encode("utf-8")), dtype=torch.uint8)


# comfy format string -> (ditq reference format for the math, on-disk scale shape rule)
COMFY_MATH = {
    "int8_tensorwise": "int8-row",
    "int8_blockwise": "int8-block",
    "float8_e4m3fn": "fp8-tensor",
    "float8_e4m3fn_rowwise": "fp8-row",
    "float8_e4m3fn_blockwise": "fp8-block",
}


def comfy_layer(layer: str, w: torch.Tensor, comfy_format: str, *, scalar_int8: bool = False,
                nested_params: bool = False, extra: dict | None = None) -> tuple[dict[str, torch.Tensor], dict, torch.Tensor]:
    """Tensors of one quantized layer in ComfyUI / convert-to-quant layout, its config, and the float32
    weight ComfyUI's dequantization gives for it. ``scalar_int8``: int8_tensorwise with one scale."""
    if scalar_int8:
        s = w.float().abs().amax().clamp(min=F.AMAX_EPS) / 127.0
        q = torch.round(w.float() / s).clamp(-127, 127).to(torch.int8)
        disk_scale, deq = s.reshape(()), q.float() * s
    else:
        fmt = F.get_format(COMFY_MATH[comfy_format])
        q, s = F.quantize_weight_ref(w, fmt)
        deq = F.dequantize_ref(q, s, fmt, torch.float32)
        if fmt.name == "fp8-row":
            disk_scale = s.reshape(-1)  # float8_e4m3fn_rowwise: [N]
        else:
            disk_scale = s  # [] / [N, 1] / [N/128, K/128]
    conf: dict = {"format": comfy_format}
    if comfy_format.endswith("blockwise"):
        if nested_params:
            conf["params"] = {"group_size": 128}  # older convert-to-quant files
        else:
            conf["group_size"] = 128
    conf.update(extra or {})
    tensors = {f"{layer}.weight": q, f"{layer}.weight_scale": disk_scale.float(), f"{layer}.comfy_quant": comfy_bytes(conf)}
    return tensors, conf, deq


def legacy_fp8_layer(layer: str, w: torch.Tensor, input_scale: float | None = None, scale_shape=()) -> tuple[dict, torch.Tensor]:
    """A legacy "scaled fp8" layer: weight e4m3fn, ``scale_weight`` per tensor, optional ``scale_input``."""
    q, s = F.quantize_weight_ref(w, "fp8-tensor")
    t = {f"{layer}.weight": q, f"{layer}.scale_weight": s.reshape(scale_shape)}
    if input_scale is not None:
        t[f"{layer}.scale_input"] = torch.tensor(input_scale, dtype=torch.float32).reshape(scale_shape)
    return t, F.dequantize_ref(q, s, "fp8-tensor", torch.float32)


def comfyui_load(path: Path, compute_dtype=torch.bfloat16) -> dict[str, torch.Tensor]:
    """What stock ComfyUI computes from a quantized file, restated from shared/FORMATS.md: the header's
    ``_quantization_metadata`` rebuilds ``.comfy_quant`` tensors; each layer's JSON is decoded with
    ``json.loads(t.numpy().tobytes())``; int8_tensorwise and float8_e4m3fn weights are dequantized as
    ``(q.float() * scale).to(dtype)`` and ``q.to(dtype) * scale.to(dtype)``. Other formats raise KeyError,
    as stock ComfyUI does. Returns the float state dict a model would see."""
    from safetensors import safe_open

    with safe_open(str(path), "pt") as f:
        meta = f.metadata() or {}
        sd = {k: f.get_tensor(k) for k in f.keys()}
    if "_quantization_metadata" in meta:
        for k, v in json.loads(meta["_quantization_metadata"])["layers"].items():
            sd[f"{k}.comfy_quant"] = torch.tensor(list(json.dumps(v).encode("utf-8")), dtype=torch.uint8)
    out = {}
    layers = {k[: -len(".comfy_quant")] for k in sd if k.endswith(".comfy_quant")}
    stock = {"int8_tensorwise", "float8_e4m3fn", "float8_e5m2"}
    for layer in layers:
        conf = json.loads(sd.pop(f"{layer}.comfy_quant").numpy().tobytes())
        if conf["format"] not in stock:
            raise KeyError(conf["format"])
        q, s = sd.pop(f"{layer}.weight"), sd.pop(f"{layer}.weight_scale")
        if conf["format"] == "int8_tensorwise":
            assert s.dim() == 0 or (s.dim() == 2 and s.shape == (q.shape[0], 1)), s.shape
            out[f"{layer}.weight"] = (q.float() * s).to(compute_dtype)
        else:
            assert s.dim() == 0, s.shape
            out[f"{layer}.weight"] = q.to(compute_dtype) * s.to(compute_dtype)
    out.update(sd)
    return out
