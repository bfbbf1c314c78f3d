"""LoRA on quantized (and plain) models: ``apply_lora(model, path_or_state_dict, scale, mode)``.

A LoRA adds ``scale * (alpha / r) * B @ A`` to a linear weight W [N, K], with A = ``lora_A`` / ``lora_down``
[r, K] and B = ``lora_B`` / ``lora_up`` [N, r]. Two ways to apply it:

- ``mode="merge"``: fold the update into the weight, layer by layer: dequantize W to float32, add, quantize
  again in the same format (the same QuantizedTensor is updated in place, so there is never a second copy
  of the model). Costs nothing at run time; cannot be undone without reloading.
- ``mode="dynamic"``: keep A and B in the layer's compute dtype (16-bit) beside the 8-bit weight and add the
  branch at run time, ``y = linear8(x) + f * (x @ A^T) @ B^T`` through ``ops.linear_lora``: for int8-row
  weights inside the 8-bit GEMM (``xa = x @ A^T`` first, then ``acc += xa @ B^T`` in the GEMM's epilogue,
  so y is written once), for other formats after it (one skinny GEMM and one ``addmm`` with beta=1, in
  place on y). Several adapters at once (those enabled are packed into one branch), switchable
  (``set_lora_scale``, ``enable_lora`` / ``disable_lora``) and removable (``remove_lora``) without
  reloading. The layer gets an instance ``forward`` (a layer whose forward is already wrapped, e.g. by
  accelerate, or not nn.Linear's gets a forward hook instead), and ``torch.compile`` traces either
  without graph breaks.

Key names understood (see ``_ROLE_PATTERNS``): diffusers / PEFT (``<module>.lora_A.weight``,
``lora_A.<adapter>.weight``, ``transformer.`` / ``base_model.model.`` prefixes, optional ``<module>.alpha``,
``lora_adapter_metadata`` in the safetensors header or a PEFT ``adapter_config.json``), kohya / sd-scripts
(``lora_unet_<module_path_with_underscores>.lora_down.weight`` / ``lora_up.weight`` / ``alpha``), and,
through diffusers' own converters when diffusers is installed, the original-checkpoint names people
download (Flux BFL / ComfyUI / kohya / XLabs, Wan, HunyuanVideo, ...; ``_DIFFUSERS_LOADERS``). Keys that
match no layer are reported, not fatal; a shape that does not fit its layer is a ShapeError raised before
the model is touched.
"""

from __future__ import annotations

import json
import math
import re
import types
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as Fn

from ..errors import CheckpointError, DitqError, ShapeError
from ..kernels import ops
from ..tensor import QuantizedTensor, quantize_weight

MODES = ("merge", "dynamic")

# (regex on the key, role); group 1 is the module path as written in the file.
_ROLE_PATTERNS = [
    (re.compile(r"^(.+)\.lora_A(?:\.[^.]+)?\.weight$"), "A"),  # PEFT, with or without the adapter name
    (re.compile(r"^(.+)\.lora_B(?:\.[^.]+)?\.weight$"), "B"),
    (re.compile(r"^(.+)\.lora_down\.weight$"), "A"),  # kohya / sd-scripts
    (re.compile(r"^(.+)\.lora_up\.weight$"), "B"),
    (re.compile(r"^(.+)\.lora(?:_linear_layer)?\.down\.weight$"), "A"),  # older diffusers
    (re.compile(r"^(.+)\.lora(?:_linear_layer)?\.up\.weight$"), "B"),
    (re.compile(r"^(.+_lora\d?)\.down\.weight$"), "A"),  # XLabs (processor.qkv_lora1.down.weight)
    (re.compile(r"^(.+_lora\d?)\.up\.weight$"), "B"),
    (re.compile(r"^(.+)\.(?:lora_B(?:\.[^.]+)?|lora_up)\.bias$"), "bias"),  # PEFT lora_bias; Wan's diff_b, converted
    (re.compile(r"^(.+)\.alpha$"), "alpha"),
]

# Keys ditq recognizes but does not apply, with the reason reported for them.
_DORA = re.compile(r"dora_scale|lora_magnitude_vector")
_UNSUPPORTED = [
    (_DORA, "DoRA magnitude: not applied (the layer gets the plain low-rank update, as diffusers does)"),
    (re.compile(r"\.diff(_b)?$"), "full weight/bias difference: not supported"),
    (re.compile(r"hada_|lokr_|\.oft_"), "LoHa / LoKr / OFT adapter: not supported, only low-rank LoRA"),
]

_TEXT_ENCODER = re.compile(r"^(text_encoder|text_encoders|te\d?\.|lora_te\d?_)")

# Prefixes that wrap module paths in files: PEFT's model wrapper, diffusers' component name, ComfyUI's.
_DOTTED_PREFIXES = ("base_model.model.", "transformer.", "unet.", "model.diffusion_model.", "diffusion_model.", "model.")
# kohya writes the module path with underscores after one of these.
_FLAT_PREFIXES = ("lora_unet_", "lora_transformer_", "lora_te1_", "lora_te2_", "lora_te_", "lora_")

# diffusers model class -> the LoRA loader mixin whose ``lora_state_dict`` converts that family's
# non-diffusers files (their detection logic and converters are reused as they are).
_DIFFUSERS_LOADERS = {
    "FluxTransformer2DModel": "FluxLoraLoaderMixin",
    "Flux2Transformer2DModel": "Flux2LoraLoaderMixin",
    "WanTransformer3DModel": "WanLoraLoaderMixin",
    "WanVACETransformer3DModel": "WanLoraLoaderMixin",
    "SkyReelsV2Transformer3DModel": "SkyReelsV2LoraLoaderMixin",
    "SD3Transformer2DModel": "SD3LoraLoaderMixin",
    "HunyuanVideoTransformer3DModel": "HunyuanVideoLoraLoaderMixin",
    "Kandinsky5Transformer3DModel": "KandinskyLoraLoaderMixin",
    "QwenImageTransformer2DModel": "QwenImageLoraLoaderMixin",
    "LTXVideoTransformer3DModel": "LTXVideoLoraLoaderMixin",
    "LTX2VideoTransformer3DModel": "LTX2LoraLoaderMixin",
    "Lumina2Transformer2DModel": "Lumina2LoraLoaderMixin",
    "HiDreamImageTransformer2DModel": "HiDreamImageLoraLoaderMixin",
    "CogVideoXTransformer3DModel": "CogVideoXLoraLoaderMixin",
    "CogView4Transformer2DModel": "CogView4LoraLoaderMixin",
    "SanaTransformer2DModel": "SanaLoraLoaderMixin",
    "UNet2DConditionModel": "StableDiffusionLoraLoaderMixin",
}


# ----------------------------------------------------------------------------------------------------------
# reports


@dataclass
class LoraLayer:
    """One layer the LoRA reaches: ``factor`` = alpha / rank (the user's ``scale`` comes on top)."""

    name: str
    rank: int
    alpha: float
    factor: float
    weight: str  # the layer's weight format (e.g. int8-row) or float dtype
    keys: tuple[str, ...]


@dataclass
class LoraReport:
    """What ``apply_lora`` did. ``unmatched``: file keys that reached no layer, with the reason."""

    adapter_name: str
    mode: str
    scale: float
    source: str
    naming: str  # peft | kohya | kohya+peft, and/or "original names converted by diffusers <LoaderMixin>"
    layers: list[LoraLayer] = field(default_factory=list)
    unmatched: dict[str, str] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)

    def summary(self, max_unmatched: int = 8) -> str:
        formats: dict[str, int] = {}
        for layer in self.layers:
            formats[layer.weight] = formats.get(layer.weight, 0) + 1
        fmt = ", ".join(f"{n} {f}" for f, n in sorted(formats.items()))
        lines = [
            f"ditq.apply_lora: {self.source} as adapter {self.adapter_name!r} ({self.mode}, scale {self.scale:g}, "
            f"keys: {self.naming}): {len(self.layers)} layers ({fmt})"
        ]
        if self.unmatched:
            lines.append(f"  unmatched keys ({len(self.unmatched)}):")
            for k, why in list(self.unmatched.items())[:max_unmatched]:
                lines.append(f"    {k}: {why}")
            if len(self.unmatched) > max_unmatched:
                lines.append(f"    ... and {len(self.unmatched) - max_unmatched} more (report.unmatched)")
        lines += [f"  note: {n}" for n in self.notes]
        return "\n".join(lines)

    __str__ = summary


# ----------------------------------------------------------------------------------------------------------
# reading a LoRA and matching its keys to the model's layers


def _read(lora) -> tuple[dict[str, torch.Tensor], dict, str]:
    """(state dict, PEFT config or {}, description) of a path or a state dict (never modified)."""
    if isinstance(lora, dict):
        bad = [k for k, v in lora.items() if not isinstance(v, torch.Tensor)]
        if bad:
            raise DitqError(f"LoRA state dict entry {bad[0]!r} is a {type(lora[bad[0]]).__name__}, not a tensor")
        return dict(lora), {}, "state dict"
    if not isinstance(lora, (str, Path)):
        raise DitqError(f"apply_lora needs a file path or a state dict, got {type(lora).__name__}")
    from ..checkpoint.io import open_checkpoint

    path = Path(lora)
    with open_checkpoint(path) as ck:
        sd = {name: ck.get(name) for name in ck.names}
        meta = dict(ck.metadata)
    config = {}
    if "lora_adapter_metadata" in meta:  # diffusers' save_lora_weights / save_lora_adapter
        try:
            config = _peft_config(json.loads(meta["lora_adapter_metadata"]))
        except (ValueError, TypeError):
            raise CheckpointError(f"{path}: its 'lora_adapter_metadata' header entry is not valid JSON") from None
    adapter_config = (path if path.is_dir() else path.parent) / "adapter_config.json"  # PEFT save_pretrained
    if not config and adapter_config.is_file():
        try:
            config = _peft_config(json.loads(adapter_config.read_text()))
        except (ValueError, TypeError):
            raise CheckpointError(f"{adapter_config} is not valid JSON") from None
    return sd, config, str(path)


def _peft_config(d: dict) -> dict:
    """lora_alpha / alpha_pattern / use_rslora from a PEFT config, also when diffusers packed it with a
    component prefix (``transformer.lora_alpha``)."""
    if not isinstance(d, dict):
        raise TypeError
    if "lora_alpha" not in d:
        prefixes = [k[: -len("lora_alpha")] for k in d if k.endswith(".lora_alpha")]
        if not prefixes:
            return {}
        prefix = "transformer." if "transformer." in prefixes else prefixes[0]
        d = {k[len(prefix):]: v for k, v in d.items() if k.startswith(prefix)}
    return {
        "lora_alpha": float(d["lora_alpha"]),
        "alpha_pattern": dict(d.get("alpha_pattern") or {}),
        "use_rslora": bool(d.get("use_rslora", False)),
    }


def _config_alpha(config: dict, module: str) -> float | None:
    if not config:
        return None
    for pattern, alpha in config["alpha_pattern"].items():  # PEFT's rule: the pattern matches a name suffix
        if re.match(rf"(.*\.)?({pattern})$", module):
            return float(alpha)
    return config["lora_alpha"]


def _role(key: str) -> tuple[str, str] | None:
    for pattern, role in _ROLE_PATTERNS:
        m = pattern.match(key)
        if m:
            return m.group(1), role
    return None


class _Index:
    """The model's modules by dotted name and by kohya's underscore name."""

    def __init__(self, model: nn.Module):
        self.modules = dict(model.named_modules())
        self.flat: dict[str, str | None] = {}
        for name in self.modules:
            if name:
                flat = name.replace(".", "_")
                self.flat[flat] = None if flat in self.flat else name  # None: two modules flatten alike

    def resolve(self, path: str) -> str | None:
        p = path
        while True:
            if p in self.modules and p:
                return p
            pre = next((x for x in _DOTTED_PREFIXES if p.startswith(x)), None)
            if pre is None:
                break
            p = p[len(pre):]
        if "." not in path:
            for pre in _FLAT_PREFIXES:
                if path.startswith(pre) and self.flat.get(path[len(pre):]):
                    return self.flat[path[len(pre):]]
            return self.flat.get(path)
        return None


@dataclass
class _Target:
    """A resolved layer: its LoRA pair (and alpha) with the keys they came from."""

    name: str
    module: nn.Linear
    A: torch.Tensor
    B: torch.Tensor
    alpha: float
    factor: float
    keys: tuple[str, ...]
    bias: torch.Tensor | None = None  # lora_B's bias [N], scaled like the branch (PEFT's lora_bias)


def _match(model: nn.Module, sd: dict) -> tuple[dict[str, dict], dict[str, str], set[str]]:
    """Group keys by target layer. Returns ({layer: {role: key}}, {key: why unmatched}, naming styles)."""
    index = _Index(model)
    groups: dict[str, dict[str, str]] = {}
    unmatched: dict[str, str] = {}
    styles = set()
    for key in sd:
        parsed = _role(key)
        if parsed is None:
            why = next((w for p, w in _UNSUPPORTED if p.search(key)), "not a LoRA tensor name ditq knows")
            unmatched[key] = why
            continue
        path, role = parsed
        name = index.resolve(path)
        if name is None:
            if _TEXT_ENCODER.match(path):
                unmatched[key] = "text-encoder LoRA: apply it to the text encoder model"
            else:
                unmatched[key] = f"no layer {path!r} in {type(model).__name__}"
            continue
        module = index.modules[name]
        if not isinstance(module, nn.Linear):
            unmatched[key] = f"{name} is a {type(module).__name__}: ditq applies LoRAs to nn.Linear layers only"
            continue
        group = groups.setdefault(name, {})
        if role in group:
            unmatched[key] = f"second {role} for layer {name} (first: {group[role]})"
            continue
        group[role] = key
        if role in ("A", "B"):
            styles.add("kohya" if ("lora_down" in key or "lora_up" in key) else "peft")
    for name in list(groups):
        group = groups[name]
        if "A" not in group or "B" not in group:
            have = ", ".join(group.values())
            missing = "up/B" if "A" in group else "down/A"
            for k in group.values():
                unmatched[k] = f"layer {name} lacks its lora_{missing} tensor (has only {have})"
            del groups[name]
    return groups, unmatched, styles


def _targets(model: nn.Module, sd: dict, config: dict, groups: dict[str, dict], mode: str) -> list[_Target]:
    """Check every pair against its layer (raises ShapeError / DitqError before anything is changed)."""
    modules = dict(model.named_modules())
    out = []
    for name, group in groups.items():
        module = modules[name]
        if module.weight.device.type == "meta":
            raise DitqError(f"{name}.weight is on the meta device: load the model's weights before applying a LoRA")
        n, k = module.weight.shape
        A, B = sd[group["A"]], sd[group["B"]]
        # kohya stores linear LoRAs of some layers as 1x1 convolutions [r, K, 1, 1] / [N, r, 1, 1]
        if A.dim() == 4 and A.shape[2:] == (1, 1):
            A = A.flatten(1)
        if B.dim() == 4 and B.shape[2:] == (1, 1):
            B = B.flatten(1)
        if A.dim() != 2 or B.dim() != 2 or A.shape[1] != k or B.shape[0] != n or A.shape[0] != B.shape[1]:
            raise ShapeError(
                f"LoRA for layer {name} (weight [{n}, {k}]) does not fit: {group['A']} has shape {list(A.shape)} "
                f"(expected [r, {k}]) and {group['B']} has shape {list(B.shape)} (expected [{n}, r]); this LoRA "
                f"was made for a model of another size or architecture. Nothing was applied."
            )
        if not (A.is_floating_point() and B.is_floating_point()):
            raise DitqError(f"LoRA tensors {group['A']} / {group['B']} must be floating point, got {A.dtype} / {B.dtype}")
        rank = A.shape[0]
        if "alpha" in group:
            alpha = float(sd[group["alpha"]].float().reshape(-1)[0])
        else:
            alpha = _config_alpha(config, name)
            alpha = float(rank) if alpha is None else alpha
        factor = alpha / (math.sqrt(rank) if config.get("use_rslora") else rank)
        bias = sd[group["bias"]] if "bias" in group else None
        if bias is not None:
            if tuple(bias.shape) != (n,):
                raise ShapeError(f"LoRA bias {group['bias']} has shape {list(bias.shape)}; layer {name} needs [{n}]")
            if mode == "merge" and module.bias is None:
                raise DitqError(
                    f"LoRA bias {group['bias']} cannot be merged: layer {name} has no bias; use mode='dynamic'"
                )
        out.append(_Target(name, module, A, B, alpha, factor, tuple(group.values()), bias))
    return out


def _diffusers_loader(model: nn.Module):
    """The diffusers LoRA loader mixin of the model's family, or None (diffusers absent, unknown family)."""
    classes = [type(m).__name__ for m in model.modules()]
    name = next((_DIFFUSERS_LOADERS[c] for c in classes if c in _DIFFUSERS_LOADERS), None)
    if name is None:
        return None
    try:
        from diffusers.loaders import lora_pipeline
    except ImportError:
        return None
    return getattr(lora_pipeline, name, None)


_BFL_FLUX = re.compile(r"^(diffusion_model\.|base_model\.model\.)?(double_blocks|single_blocks|final_layer|img_in|txt_in|"
                       r"time_in|vector_in|guidance_in)[._]")


def _convert(loader, sd: dict) -> dict:
    """Run the family's diffusers converter on a copy of ``sd``; its alphas come back as ``.alpha`` keys."""
    sd = dict(sd)
    if loader.__name__ == "FluxLoraLoaderMixin" and not any(".lora_down." in k or "processor" in k for k in sd):
        # BFL / ComfyUI names with PEFT's lora_A / lora_B (e.g. diffusion_model.double_blocks.0.img_attn.qkv.
        # lora_A.weight): diffusers' kohya converter maps exactly these module names once they are spelled
        # lora_down / lora_up, including the split of fused qkv / linear1 layers.
        if any(_BFL_FLUX.match(k) for k in sd):
            renamed = {}
            for k, v in sd.items():
                k = re.sub(r"^(base_model\.model\.)?", "", k)
                if not k.startswith("diffusion_model."):
                    k = "diffusion_model." + k
                renamed[k.replace(".lora_A.weight", ".lora_down.weight").replace(".lora_B.weight", ".lora_up.weight")] = v
            sd = renamed
    kwargs = {"return_alphas": True} if loader.__name__ == "FluxLoraLoaderMixin" else {}
    out = loader.lora_state_dict(sd, **kwargs)
    if isinstance(out, tuple):
        out, alphas = out[0], out[1]
        out = dict(out)
        for k, v in (alphas or {}).items():
            out.setdefault(k if k.endswith(".alpha") else f"{k}.alpha", v)
    return dict(out)


def _convert_pending(loader, pending: dict) -> tuple[dict, dict[str, str]]:
    """Convert the LoRA keys ditq could not place with diffusers' converter: the whole set at once (as
    diffusers would), or, when the converter refuses it (its converters raise on the first key they do not
    know), module by module so that one odd key does not lose the rest. Returns (converted state dict,
    {original key: why it failed})."""
    try:
        return _convert(loader, pending), {}
    except Exception:  # noqa: BLE001 -- diffusers' converters raise ValueError / KeyError / AssertionError
        pass
    by_module: dict[str, dict] = {}
    for k, v in pending.items():
        by_module.setdefault(_role(k)[0] if _role(k) else k.rsplit(".", 1)[0], {})[k] = v
    converted, failed = {}, {}
    for group in by_module.values():
        try:
            converted.update(_convert(loader, group))
        except Exception as e:  # noqa: BLE001
            msg = " ".join(str(e).split()) or "no message (diffusers' converters assume the full-size model's shapes)"
            why = f"diffusers {loader.__name__} cannot convert it: {type(e).__name__}: {msg}"[:300]
            failed.update(dict.fromkeys(group, why))
    return converted, failed


def _plan(model: nn.Module, lora, mode: str) -> tuple[list[_Target], LoraReport]:
    """Read and match a LoRA; validate every layer's shapes. Touches nothing."""
    sd, config, source = _read(lora)
    if not sd:
        raise DitqError(f"LoRA {source} holds no tensors")
    groups, unmatched, styles = _match(model, sd)
    naming = "+".join(sorted(styles)) or "none"
    notes = []
    # everything ditq could not place goes to the family's converter, which may know more (Wan's diff_b, ...)
    pending = {k: sd[k] for k in unmatched if not _DORA.search(k)}
    loader = _diffusers_loader(model) if any(_role(k) for k in pending) else None
    if pending and loader is None and any(_BFL_FLUX.match(k) for k in pending):
        notes.append(
            "these look like original (BFL / ComfyUI / kohya) Flux names: ditq converts them with diffusers' converter "
            "when diffusers is installed and the model is diffusers' FluxTransformer2DModel"
        )
    if loader is not None:
        converted, failed = _convert_pending(loader, pending)
        g2, u2, _ = _match(model, converted)
        clash = [name for name in g2 if name in groups]
        for name in clash:  # a layer reached both by a ditq-matched key and a converted one: keep the first
            u2.update(dict.fromkeys(g2.pop(name).values(), f"layer {name} already gets a LoRA from this file"))
        if g2:
            for k in pending:
                if k not in failed or unmatched[k].startswith("no layer"):  # else ditq's reason says more
                    unmatched.pop(k)
            unmatched.update({k: why for k, why in failed.items() if k not in unmatched})
            unmatched.update({k: f"after diffusers' conversion: {why}" for k, why in u2.items()})
            groups.update(g2)
            sd = {**sd, **converted}
            converted_by = f"original names converted by diffusers {loader.__name__}"
            naming = f"{naming} and {converted_by}" if styles else converted_by
        elif failed:
            notes.append(next(iter(failed.values())))
    if not groups:
        shown = "; ".join(f"{k}: {w}" for k, w in list(unmatched.items())[:5])
        raise DitqError(
            f"no key of LoRA {source} matches a linear layer of {type(model).__name__} ({len(sd)} keys, e.g. {shown})"
            + (f". {notes[0]}" if notes else "")
        )
    targets = _targets(model, sd, config, groups, mode)
    report = LoraReport("", "", 1.0, source, naming, unmatched=unmatched, notes=notes)
    return targets, report


# ----------------------------------------------------------------------------------------------------------
# merge


def _weight_kind(w: torch.Tensor) -> str:
    return w.format if isinstance(w, QuantizedTensor) else str(w.dtype).replace("torch.", "")


@torch.no_grad()
def _merge(t: _Target, scale: float) -> None:
    """W <- W + scale * factor * B @ A in float32, then back to W's format, in place (the same Parameter).
    Peak extra memory: one float32 copy of this layer's weight."""
    w = t.module.weight
    device = w.qdata.device if isinstance(w, QuantizedTensor) else w.device
    merged = w.dequantize(torch.float32) if isinstance(w, QuantizedTensor) else w.to(torch.float32, copy=True)
    merged.addmm_(t.B.to(device, torch.float32), t.A.to(device, torch.float32), alpha=scale * t.factor)
    if isinstance(w, QuantizedTensor):
        rot = {"rotation": "hadamard", "rotation_group": w.rotation} if w.rotation else {}
        w.copy_(quantize_weight(merged, w.format, name=f"{t.name}.weight", **rot))  # copies qdata and scale
    else:
        w.copy_(merged)
    if t.bias is not None:
        b = t.module.bias
        b.copy_(b.float() + t.bias.to(b.device, torch.float32) * (scale * t.factor))


# ----------------------------------------------------------------------------------------------------------
# dynamic


@dataclass
class _Adapter:
    index: int  # buffers A_<index> / B_<index> of the LoraSlot
    rank: int
    factor: float  # alpha / rank
    scale: float
    enabled: bool = True


FUSE = True
"""Quantized layers run their branch through ``ops.linear_lora`` (int8-row: inside the 8-bit GEMM). False: the
base forward, then two cuBLAS GEMMs (the benchmark's baseline; the path gradients and rotated weights take)."""


class LoraSlot(nn.Module):
    """The dynamic LoRA adapters of one ``nn.Linear``, child ``ditq_lora`` of that layer.

    Adapter tensors are non-persistent buffers (they follow ``model.to(...)`` and stay out of
    ``state_dict``): ``A_i`` [r, K], ``B_i`` [N, r] and optionally ``bias_i`` [N] in the layer's compute dtype.
    What the forward uses is decided when adapters change, not in the forward: ``packed_A`` [R, K] and
    ``packed_B`` [N, R] (R = sum of the enabled ranks) with each adapter's factor ``scale * alpha / r``
    folded into its columns of B (one enabled adapter: A is its own A_i), so any number of adapters costs one
    branch; ``packed_bias`` float32 [N], the sum of the scaled biases (None without any), is added to the
    layer's bias.

    The branch: on an unrotated quantized weight (``FUSE``, no gradient needed) the layer's forward is
    ``ops.linear_lora`` (int8-row: the up-projection in the GEMM's epilogue, y written once); otherwise the
    base output y plus ``(x @ A^T) @ B^T`` by cuBLAS (in place on y when no gradient is recorded)."""

    def __init__(self):
        super().__init__()
        self.adapters: dict[str, _Adapter] = {}
        self._next = 0
        self.register_buffer("packed_A", None, persistent=False)
        self.register_buffer("packed_B", None, persistent=False)
        self.register_buffer("packed_bias", None, persistent=False)
        self._hook = None

    def add(self, name: str, A: torch.Tensor, B: torch.Tensor, bias: torch.Tensor | None, factor: float, scale: float):
        i = self._next
        self._next += 1
        self.register_buffer(f"A_{i}", A, persistent=False)
        self.register_buffer(f"B_{i}", B, persistent=False)
        self.register_buffer(f"bias_{i}", bias, persistent=False)
        self.adapters[name] = _Adapter(i, A.shape[0], factor, scale)
        self.repack()

    def drop(self, name: str) -> None:
        a = self.adapters.pop(name)
        for t in ("A", "B", "bias"):
            delattr(self, f"{t}_{a.index}")
        self.repack()

    def repack(self) -> None:
        self.packed_A = self.packed_B = self.packed_bias = None
        active = [a for a in self.adapters.values() if a.enabled and a.scale * a.factor != 0.0]
        if not active:
            return
        A = [getattr(self, f"A_{a.index}") for a in active]
        dtype = A[0].dtype
        B = [getattr(self, f"B_{a.index}").float() * (a.scale * a.factor) for a in active]
        biases = [getattr(self, f"bias_{a.index}") for a in active]
        bias = [b.float() * (a.scale * a.factor) for a, b in zip(active, biases) if b is not None]
        self.packed_A = A[0] if len(A) == 1 else torch.cat(A)
        self.packed_B = torch.cat(B, dim=1).to(dtype)
        self.packed_bias = sum(bias) if bias else None

    def linear(self, x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
        """The layer's forward with its adapters: ``F.linear(x, weight, bias)`` plus the branch."""
        A, B = self.packed_A, self.packed_B
        if A is None:  # nothing enabled: exactly the plain layer
            return Fn.linear(x, weight, bias)
        if (FUSE and isinstance(weight, QuantizedTensor) and not weight.rotation
                and not (torch.is_grad_enabled() and (x.requires_grad or (bias is not None and bias.requires_grad)))):  # fmt: skip
            extra = self.packed_bias
            if extra is not None:
                bias = extra if bias is None else bias.float() + extra
            return ops.linear_lora(x, weight.qdata, weight.scale, weight.format, A, B, bias)
        return self(x, Fn.linear(x, weight, bias))

    def forward(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        """y [..., N] (the base layer's output for x [..., K]) plus the enabled adapters' branch, after the GEMM."""
        A, B = self.packed_A, self.packed_B
        if A is None:
            return y
        xa = Fn.linear(x.to(A.dtype), A)  # [..., R]: reads x once
        if xa.dtype != y.dtype:
            xa, B = xa.to(y.dtype), B.to(y.dtype)
        n = y.shape[-1]
        if not torch.is_grad_enabled() and y.is_contiguous():
            # beta=1 GEMM accumulating into y: one pass over y instead of a temporary and an add
            y.view(-1, n).addmm_(xa.reshape(-1, xa.shape[-1]), B.t())
        else:
            y = torch.addmm(y.reshape(-1, n), xa.reshape(-1, xa.shape[-1]), B.t()).view(y.shape)
        if self.packed_bias is not None:
            y = y + self.packed_bias.to(y.dtype)
        return y


def _lora_forward(self: nn.Linear, input: torch.Tensor) -> torch.Tensor:
    """``nn.Linear.forward`` of a layer with dynamic adapters (installed as the instance's ``forward``, so the
    8-bit GEMM itself can carry the branch); the plain forward once the slot is gone."""
    slot = self._modules.get("ditq_lora")
    if slot is None:
        return Fn.linear(input, self.weight, self.bias)
    return slot.linear(input, self.weight, self.bias)


def _lora_hook(module: nn.Module, args, kwargs, output):
    x = args[0] if args else kwargs["input"]
    return module.ditq_lora(x, output)


def _slots(model: nn.Module) -> list[tuple[str, nn.Module, LoraSlot]]:
    model = getattr(model, "_orig_mod", model)
    return [(name, m, m.ditq_lora) for name, m in model.named_modules() if isinstance(getattr(m, "ditq_lora", None), LoraSlot)]


def _attach(t: _Target, name: str, scale: float) -> None:
    w = t.module.weight
    device = w.qdata.device if isinstance(w, QuantizedTensor) else w.device
    dtype = w.dtype if w.dtype in (torch.bfloat16, torch.float16, torch.float32) else torch.bfloat16
    slot = getattr(t.module, "ditq_lora", None)
    if slot is None:
        slot = LoraSlot()
        t.module.ditq_lora = slot
        if type(t.module).forward is nn.Linear.forward and "forward" not in t.module.__dict__:
            # the layer's own forward (nn.Linear's): replaced, so a quantized GEMM can fuse the branch
            t.module.forward = types.MethodType(_lora_forward, t.module)
        else:  # a subclass's forward, or one wrapped already (accelerate): the branch after it, by a hook
            slot._hook = t.module.register_forward_hook(_lora_hook, with_kwargs=True)
    bias = t.bias.to(device, dtype) if t.bias is not None else None
    slot.add(name, t.A.to(device, dtype).contiguous(), t.B.to(device, dtype).contiguous(), bias, t.factor, scale)


def _detach(module: nn.Module, slot: LoraSlot) -> None:
    if slot._hook is not None:
        slot._hook.remove()
    elif getattr(module.__dict__.get("forward"), "__func__", None) is _lora_forward:
        del module.forward  # (when a wrapper was put around it since, it stays: without the slot it is plain)
    del module.ditq_lora


# ----------------------------------------------------------------------------------------------------------
# public API


def _merged_registry(model: nn.Module) -> dict[str, dict]:
    model = getattr(model, "_orig_mod", model)
    reg = model.__dict__.get("_ditq_merged_loras")
    if reg is None:
        reg = model.__dict__["_ditq_merged_loras"] = {}
    return reg


def lora_adapters(model: nn.Module) -> dict[str, dict]:
    """The adapters applied to ``model``: {name: {mode, scale, enabled, layers}}."""
    out: dict[str, dict] = {}
    for _, _, slot in _slots(model):
        for name, a in slot.adapters.items():
            info = out.setdefault(name, {"mode": "dynamic", "scale": a.scale, "enabled": a.enabled, "layers": 0})
            info["layers"] += 1
    for name, info in _merged_registry(model).items():
        out.setdefault(name, dict(info))
    return out


def _default_name(model: nn.Module, source: str) -> str:
    base = Path(source).stem if source != "state dict" else "lora"
    taken = lora_adapters(model)
    name, i = base, 1
    while name in taken:
        name, i = f"{base}_{i}", i + 1
    return name


def apply_lora(
    model: nn.Module,
    lora,
    scale: float = 1.0,
    mode: str = "merge",
    adapter_name: str | None = None,
) -> LoraReport:
    """Apply a LoRA (a .safetensors / .pt path, a PEFT folder, or a state dict) to ``model``'s linear layers.

    ``mode="merge"``: ``W += scale * alpha/r * B @ A`` into each target weight (QuantizedTensor: dequantize
    in float32, add, requantize in the same format, in place, one layer at a time). ``mode="dynamic"``:
    keep A/B in 16 bits beside the layer and add ``scale * alpha/r * (x @ A^T) @ B^T`` at run time;
    change it with ``set_lora_scale`` / ``enable_lora`` / ``disable_lora``, undo it with ``remove_lora``.
    ``adapter_name`` defaults to the file's stem. Returns a LoraReport (layers, unmatched keys and why).

    Raises ShapeError (a LoRA tensor that does not fit its layer) and DitqError (nothing matches, name
    taken) before changing anything."""
    if not isinstance(model, nn.Module):
        hint = " (for a diffusers pipeline pass pipe.transformer)" if hasattr(model, "components") else ""
        raise DitqError(f"apply_lora needs a torch.nn.Module, got {type(model).__name__}{hint}")
    model = getattr(model, "_orig_mod", model)  # torch.compile's wrapper: names are the inner model's
    if mode not in MODES:
        raise DitqError(f"unknown LoRA mode {mode!r}; choose 'merge' (fold into the weights) or 'dynamic'")
    scale = float(scale)
    if not math.isfinite(scale):
        raise DitqError(f"LoRA scale must be finite, got {scale}")
    if adapter_name is not None and adapter_name in lora_adapters(model):
        raise DitqError(
            f"a LoRA named {adapter_name!r} is already applied to this model; remove_lora(model, {adapter_name!r}) "
            f"first or choose another adapter_name"
        )
    targets, report = _plan(model, lora, mode)
    name = adapter_name or _default_name(model, report.source)
    report.adapter_name, report.mode, report.scale = name, mode, scale
    for t in targets:
        if mode == "merge":
            _merge(t, scale)
        else:
            _attach(t, name, scale)
        report.layers.append(LoraLayer(t.name, t.A.shape[0], t.alpha, t.factor, _weight_kind(t.module.weight), t.keys))
    if mode == "merge":
        _merged_registry(model)[name] = {"mode": "merge", "scale": scale, "enabled": True, "layers": len(targets)}
    return report


def _find(model: nn.Module, adapter_name: str | None) -> list[tuple[str, nn.Module, LoraSlot]]:
    """The slots holding ``adapter_name`` (all slots when None); DitqError when there is none."""
    slots = _slots(model)
    if adapter_name is None:
        return slots
    found = [s for s in slots if adapter_name in s[2].adapters]
    if not found:
        merged = _merged_registry(model)
        if adapter_name in merged:
            raise DitqError(
                f"LoRA {adapter_name!r} was merged into the weights (mode='merge'): it cannot be changed or removed; "
                f"reload the model, or apply LoRAs with mode='dynamic' to switch them"
            )
        names = sorted(lora_adapters(model))
        raise DitqError(f"no LoRA adapter {adapter_name!r} on this model; applied: {names or 'none'}")
    return found


def remove_lora(model: nn.Module, adapter_name: str | None = None) -> int:
    """Remove a dynamic adapter (all of them when ``adapter_name`` is None); returns the number of layers
    that lost one. A layer left without adapters gets its original forward back (no hook, no child)."""
    count = 0
    for _, module, slot in _find(model, adapter_name):
        for name in [adapter_name] if adapter_name is not None else list(slot.adapters):
            slot.drop(name)
            count += 1
        if not slot.adapters:
            _detach(module, slot)
    return count


def set_lora_scale(model: nn.Module, adapter_name: str, scale: float) -> None:
    """Set a dynamic adapter's scale (the factor in front of alpha/r * B @ A); takes effect on the next call."""
    scale = float(scale)
    if not math.isfinite(scale):
        raise DitqError(f"LoRA scale must be finite, got {scale}")
    for _, _, slot in _find(model, adapter_name):
        slot.adapters[adapter_name].scale = scale
        slot.repack()


def _set_enabled(model: nn.Module, adapter_name: str | None, enabled: bool) -> None:
    for _, _, slot in _find(model, adapter_name):
        for name, a in slot.adapters.items():
            if adapter_name is None or name == adapter_name:
                a.enabled = enabled
        slot.repack()


def enable_lora(model: nn.Module, adapter_name: str | None = None) -> None:
    """Switch a dynamic adapter (all when None) back on."""
    _set_enabled(model, adapter_name, True)


def disable_lora(model: nn.Module, adapter_name: str | None = None) -> None:
    """Switch a dynamic adapter (all when None) off without removing it; the layer then computes exactly
    its base output."""
    _set_enabled(model, adapter_name, False)


__all__ = [
    "LoraReport",
    "LoraSlot",
    "apply_lora",
    "disable_lora",
    "enable_lora",
    "lora_adapters",
    "remove_lora",
    "set_lora_scale",
]
