"""Which layers to quantize: presets for known model families and the per-layer decision, with a reason.

A preset is a list of patterns for layers kept in high precision (norms, embeddings, modulation and
time layers, first and last projections), from the lists real tools use (shared/FORMATS.md), plus keys
to drop. Patterns are regular expressions searched in the key with a known wrapper prefix
(``model.diffusion_model.``, ``transformer.``...) removed; plain words match anywhere in the key, and a
leading ``^`` anchors a pattern to the model's top level (so ``^proj_out`` keeps Flux's last projection
but not the ``proj_out`` inside each single block).

Static decisions (name, shape, dtype) are made by ``Policy.decide`` before any data is read; the converter
adds the data-dependent ones (non-finite values, ``outlier_ratio``) as it streams.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field

import torch

from .. import formats as F

WRAPPER_PREFIXES = ("model.diffusion_model.", "diffusion_model.", "transformer.", "model.", "net.")

COMMON_KEEP = [
    "norm", "bias", "embed_tokens", "lm_head", "shared", "patch_embedding", "k_norm", "q_norm", "norm_k",
    "norm_q", r"img_emb\.proj", r"head\.modulation",
]  # fmt: skip

FAMILY_KEEP = {
    "flux": [
        # BFL names: first/last layers, time/vector/guidance embedders, per-block modulation
        "img_in", "txt_in", "time_in", "vector_in", "guidance_in", "final_layer", r"_mod\.lin", r"\.modulation\.lin",
        # diffusers names (modulation is `norm1.linear` / `norm.linear`, kept by "norm")
        "^x_embedder", "^context_embedder", "^time_text_embed", "^norm_out", "^proj_out",
    ],
    "flux2": [
        "stream_modulation", "guidance_in", "time_in", "final_layer", "img_in", "txt_in",
        "^time_guidance_embed", "^x_embedder", "^context_embedder", "^norm_out", "^proj_out",
    ],
    "wan": [
        "text_embedding", "time_embedding", "time_projection", r"head\.head", "patch_embedding",
        "^condition_embedder", "^proj_out",
    ],
    "hunyuanvideo": [
        "layernorm", "_attn_k_norm", "_attn_q_norm", "norm1", "norm2", r"img_in\.proj", r"vision_in\.proj\.0",
        r"vision_in\.proj\.4", "cond_type_embedding", "time_in", "vector_in", "guidance_in", "final_layer",
        "^x_embedder", "^time_text_embed", r"^context_embedder\.time_text_embed", r"^context_embedder\.proj_in",
        "^norm_out", "^proj_out",
    ],
    "kandinsky5": [
        # `_keep_in_fp32_modules` of diffusers' Kandinsky5Transformer3DModel, plus first/last projections
        "time_embeddings", "modulation", "^visual_embeddings", "^text_embeddings", "^pooled_text_embeddings",
        r"^out_layer\.out_layer",
    ],
    "sd3": [
        "x_embedder", "t_embedder", "y_embedder", "context_embedder", "final_layer", "pos_embed",
        "adaLN_modulation", "^time_text_embed", "^norm_out", "^proj_out",
    ],
    "t5xxl": [],
    "generic": [],
}  # fmt: skip

FAMILY_DROP = {"t5xxl": ["decoder", "lm_head"]}
# diffusers loads these in float32 whatever the checkpoint holds; keeping them fp32 avoids a double rounding
FAMILY_FP32 = {"kandinsky5": ["time_embeddings", "modulation"]}

PRESETS = ("auto", *FAMILY_KEEP)

KEEP_DTYPES = {"original": None, "bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}


def strip_prefix(key: str) -> str:
    for p in WRAPPER_PREFIXES:
        if key.startswith(p):
            return key[len(p):]
    return key


def detect_family(keys) -> str:
    """Guess the model family from its key names (``generic`` when nothing matches)."""
    names = [strip_prefix(k) for k in keys]
    text = "\n".join(names)

    def has(*subs):
        return any(s in text for s in subs)

    if has("encoder.block.") and has("SelfAttention", "shared.weight"):
        return "t5xxl"
    if has("visual_transformer_blocks.", "visual_modulation"):
        return "kandinsky5"
    if has("stream_modulation"):
        return "flux2"
    if has("token_refiner", "vision_in.", "img_attn_qkv", "cond_type_embedding"):
        return "hunyuanvideo"
    if has("patch_embedding") and has("head.head", "condition_embedder", "time_projection", "scale_shift_table"):
        return "wan"
    if has("joint_blocks.") or (has("pos_embed") and has("context_embedder") and not has("single_transformer_blocks")):
        return "sd3"
    if (has("double_blocks.") and has("single_blocks.")) or (has("single_transformer_blocks.") and has("x_embedder")):
        return "flux"
    return "generic"


@dataclass
class Decision:
    """What happens to one tensor. ``action``: quantize | keep | drop. ``out_dtype``: the dtype a kept
    float tensor is written in (None: unchanged). ``reason``: why, in words for the report."""

    action: str
    reason: str
    format: str | None = None
    out_dtype: torch.dtype | None = None
    # hooks for later features: a rotation ("hadamard") or learned rounding chosen per layer
    options: dict = field(default_factory=dict)

    @property
    def quantize(self) -> bool:
        return self.action == "quantize"


class Policy:
    """Per-layer decisions for a conversion.

    ``include`` / ``exclude``: regexes applied after the preset (include forces quantization of a 2-D
    weight the preset keeps; exclude keeps a layer; exclude wins). ``min_elements``: smaller weights are
    kept (they save little). ``keep_dtype``: dtype of kept float tensors (original | bf16 | fp16 | fp32)."""

    def __init__(
        self,
        format: str = "int8-row",
        preset: str = "auto",
        keys=(),
        include=(),
        exclude=(),
        min_elements: int = 16384,
        keep_dtype: str = "original",
    ):
        self.format = F.get_format(format)
        if preset not in PRESETS:
            raise F.FormatError(f"unknown preset {preset!r}; choose one of: {', '.join(PRESETS)}")
        self.preset = detect_family(keys) if preset == "auto" else preset
        self.detected = preset == "auto"
        if keep_dtype not in KEEP_DTYPES:
            raise F.FormatError(f"unknown --keep-dtype {keep_dtype!r}; choose one of: {', '.join(KEEP_DTYPES)}")
        self.keep_dtype = KEEP_DTYPES[keep_dtype]
        self.min_elements = min_elements
        self.keep_patterns = [(p, re.compile(p)) for p in COMMON_KEEP + FAMILY_KEEP[self.preset]]
        self.drop_patterns = [(p, re.compile(p)) for p in FAMILY_DROP.get(self.preset, [])]
        self.fp32_patterns = [(p, re.compile(p)) for p in FAMILY_FP32.get(self.preset, [])]
        self.include = [(p, _compile(p, "--include")) for p in include]
        self.exclude = [(p, _compile(p, "--exclude")) for p in exclude]

    def _kept_dtype(self, name: str, dtype: torch.dtype) -> tuple[torch.dtype | None, str]:
        if not dtype.is_floating_point or dtype.itemsize == 1:
            return None, ""
        if _match(self.fp32_patterns, strip_prefix(name)):
            return (torch.float32 if dtype != torch.float32 else None), " (fp32 module)"
        if self.keep_dtype is not None and self.keep_dtype != dtype:
            return self.keep_dtype, ""
        return None, ""

    def keep(self, name: str, dtype: torch.dtype, reason: str) -> Decision:
        out, note = self._kept_dtype(name, dtype)
        return Decision("keep", reason + note, out_dtype=out)

    def decide(self, name: str, shape: tuple[int, ...], dtype: torch.dtype) -> Decision:
        """The static decision for a tensor of the source checkpoint (state-dict key ``name``)."""
        key = strip_prefix(name)
        hit = _match(self.drop_patterns, key)
        if hit:
            return Decision("drop", f"preset {self.preset}: drops '{hit}'")
        hit = _match(self.exclude, name)
        if hit:
            return self.keep(name, dtype, f"--exclude '{hit}'")
        if len(shape) != 2:
            return self.keep(name, dtype, f"{len(shape)}-D tensor" if shape else "scalar")
        if not name.endswith(".weight"):
            return self.keep(name, dtype, "not a .weight")
        if not dtype.is_floating_point or dtype.itemsize == 1:
            return self.keep(name, dtype, f"dtype {str(dtype).replace('torch.', '')}")
        forced = _match(self.include, name)
        hit = None if forced else _match(self.keep_patterns, key)
        if hit:
            return self.keep(name, dtype, f"preset {self.preset}: '{hit}'")
        n, k = shape
        if n * k < self.min_elements and not forced:
            return self.keep(name, dtype, f"< {self.min_elements} elements")
        if self.format.is_block and (n % F.BLOCK or k % F.BLOCK):
            return self.keep(name, dtype, f"{self.format.name} needs dims % {F.BLOCK} == 0")
        return Decision("quantize", f"--include '{forced}'" if forced else self.format.name, self.format.name)


def _compile(p: str, flag: str):
    try:
        return re.compile(p)
    except re.error as e:
        raise F.FormatError(f"{flag} {p!r} is not a valid regular expression: {e}") from None


def _match(patterns, text: str) -> str | None:
    for p, rx in patterns:
        if rx.search(text):
            return p
    return None


def outlier_ratio(w: torch.Tensor, fmt: str | F.Format) -> float:
    """How much outliers cost a format: the worst scale group's amax / RMS.

    A group is what shares one scale (the tensor, a row, or a 128x128 block). int8 rounding error in a
    group is about amax / (127 * sqrt(12)), so its relative error is about ratio / 440: a Gaussian row of
    4096 values has a ratio near 4 (~1% error), a ratio of 44 costs ~10%. w: [N, K] float."""
    fmt = F.get_format(fmt)
    a = w.detach().float()
    n, k = a.shape
    if fmt.weight_granularity == "tensor":
        groups = a.reshape(1, -1)
    elif fmt.weight_granularity == "row":
        groups = a
    else:
        groups = a.reshape(n // F.BLOCK, F.BLOCK, k // F.BLOCK, F.BLOCK).permute(0, 2, 1, 3).reshape(-1, F.BLOCK * F.BLOCK)
    amax = groups.abs().amax(dim=1)
    rms = groups.square().mean(dim=1).sqrt()
    ratio = torch.where(rms > 0, amax / rms.clamp(min=F.AMAX_EPS), torch.ones_like(rms))
    return float(ratio.max()) if ratio.numel() else 1.0
