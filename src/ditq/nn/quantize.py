"""``quantize_(model, format)``: replace the weights of a loaded model's linear layers by QuantizedTensors,
in place, one layer at a time.

The per-layer decision (quantize or keep in high precision, and why) is ``ditq.checkpoint.policy``'s, the
same one ``ditq convert`` applies to files, so a model quantized at run time and one loaded from a
converted file hold the same layers in 8 bits.

Memory: each layer's float weight is released as soon as its QuantizedTensor replaces it, so the peak
is the model plus one layer's quantized copy (and, with ``device=``, one float layer on that device).
"""

from __future__ import annotations

from collections import Counter
from dataclasses import asdict, dataclass, field

import torch
import torch.nn as nn

from ..checkpoint.policy import Policy
from ..errors import DitqError
from ..tensor import QuantizedTensor, quantize_weight, rotation_group_of


@dataclass
class LayerReport:
    """One linear layer: ``action`` is quantize | keep | skip (already quantized)."""

    name: str
    shape: tuple[int, int]
    action: str
    reason: str
    format: str | None
    bytes_before: int
    bytes_after: int


@dataclass
class QuantizeReport:
    """What ``quantize_`` did. Byte counts: linear weights only (``bytes_*``) and the whole model's
    parameters and buffers (``model_bytes_*``)."""

    format: str
    preset: str
    layers: list[LayerReport] = field(default_factory=list)
    model_bytes_before: int = 0
    model_bytes_after: int = 0
    rotation: str | None = None

    @property
    def quantized(self) -> list[LayerReport]:
        return [r for r in self.layers if r.action == "quantize"]

    @property
    def kept(self) -> list[LayerReport]:
        return [r for r in self.layers if r.action != "quantize"]

    @property
    def bytes_before(self) -> int:
        return sum(r.bytes_before for r in self.layers)

    @property
    def bytes_after(self) -> int:
        return sum(r.bytes_after for r in self.layers)

    def to_dict(self) -> dict:
        d = asdict(self)
        d.update(bytes_before=self.bytes_before, bytes_after=self.bytes_after)
        return d

    def summary(self, max_kept: int = 12) -> str:
        gb = 1e-9
        lines = [
            f"ditq.quantize_: {len(self.quantized)} of {len(self.layers)} linear layers -> {self.format}"
            f"{' + ' + self.rotation + ' rotation' if self.rotation else ''} "
            f"(preset {self.preset})",
            f"  linear weights {self.bytes_before * gb:.3f} GB -> {self.bytes_after * gb:.3f} GB; "
            f"model {self.model_bytes_before * gb:.3f} GB -> {self.model_bytes_after * gb:.3f} GB "
            f"({100 * self.model_bytes_after / max(self.model_bytes_before, 1):.1f}%)",
        ]
        kept = self.kept
        if kept:
            lines.append(f"  kept in high precision ({len(kept)}):")
            lines += [f"    {r.name} {list(r.shape)}: {r.reason}" for r in kept[:max_kept]]
            if len(kept) > max_kept:
                lines.append(f"    ... and {len(kept) - max_kept} more (report.kept)")
        return "\n".join(lines)

    __str__ = summary


def tensor_bytes(t: torch.Tensor) -> int:
    """Bytes a tensor actually holds (qdata + scale for a QuantizedTensor)."""
    if isinstance(t, QuantizedTensor):
        return t.nbytes_quantized
    return t.numel() * t.element_size()


def model_bytes(model: nn.Module) -> int:
    """Bytes of a model's parameters and buffers (shared tensors counted once)."""
    seen, total = set(), 0
    for t in (*model.parameters(), *model.buffers()):
        if id(t) not in seen:
            seen.add(id(t))
            total += tensor_bytes(t)
    return total


def linear_layers(model: nn.Module) -> list[tuple[str, nn.Linear]]:
    return [(name, m) for name, m in model.named_modules() if isinstance(m, nn.Linear)]


def make_policy(model: nn.Module, format: str, preset: str, include, exclude, min_elements: int) -> Policy:
    keys = [name for name, _ in model.named_parameters()]
    return Policy(
        format, preset, keys=keys, include=_patterns(include), exclude=_patterns(exclude), min_elements=min_elements
    )


def _patterns(p) -> tuple[str, ...]:
    if p is None:
        return ()
    return (p,) if isinstance(p, str) else tuple(p)


@torch.no_grad()
def quantize_(
    model: nn.Module,
    format: str = "int8-row",
    preset: str = "auto",
    include=None,
    exclude=None,
    rounding: str = "nearest",
    device: torch.device | str | None = None,
    min_elements: int = 16384,
    verbose: bool = False,
    rotation: str | None = None,
    rotation_group: int | None = None,
) -> QuantizeReport:
    """Quantize ``model``'s ``nn.Linear`` weights in place; returns a QuantizeReport.

    format: int8-row | int8-block | fp8-tensor | fp8-row | fp8-block. preset: a model family
    (flux, wan, hunyuanvideo, kandinsky5, sd3, ...) or ``auto`` (detected from parameter names): which
    layers stay in high precision. include / exclude: regexes (or lists of them) on ``<module>.weight``
    names that force quantization / keep a layer (exclude wins). rounding: nearest | learned.
    device: where to quantize and leave the model (e.g. ``"cuda"`` for a model loaded on the CPU: each
    layer moves, is quantized there, and the rest of the model follows); None quantizes where each weight
    is. Weights smaller than ``min_elements`` are kept (they save little). rotation="hadamard" (int8-row
    only): ComfyUI's rotated int8 ("convrot"), group ``rotation_group`` or the largest of 256 / 64 / 16
    dividing each layer's K; a layer whose K is not a multiple of 16 is quantized unrotated (its reason says
    so)."""
    if not isinstance(model, nn.Module):
        hint = " (for a diffusers pipeline pass pipe.transformer)" if hasattr(model, "components") else ""
        raise DitqError(f"quantize_ needs a torch.nn.Module, got {type(model).__name__}{hint}")
    policy = make_policy(model, format, preset, include, exclude, min_elements)
    # a wrong rotation request fails here, before any layer changes (the shape is a stand-in: K = 256)
    rotation_group_of(rotation, rotation_group, policy.format.name, (1, rotation_group or 256))
    rotation = "hadamard" if rotation not in (None, False, "none") else None
    report = QuantizeReport(policy.format.name, policy.preset, model_bytes_before=model_bytes(model), rotation=rotation)
    layers = linear_layers(model)
    users = Counter(id(m.weight) for _, m in layers)
    tied: dict[int, QuantizedTensor] = {}  # a weight shared by several layers is quantized once

    for name, module in layers:
        w = module.weight
        key = f"{name}.weight"
        shape = tuple(w.shape)
        if isinstance(w, QuantizedTensor):
            report.layers.append(LayerReport(name, shape, "skip", f"already {w.format}", w.format, *(tensor_bytes(w),) * 2))
            continue
        decision = policy.decide(key, shape, w.dtype)
        before = tensor_bytes(w)
        if not decision.quantize:
            if device is not None:
                module.to(device)
            report.layers.append(LayerReport(name, shape, "keep", decision.reason, None, before, before))
            continue
        if w.device.type == "meta":
            raise DitqError(
                f"{key} is on the meta device: there is no weight to quantize. Load the checkpoint first, "
                f"or fill a meta model from a converted file with ditq.load_quantized(model, path)"
            )
        q = tied.get(id(w))
        reason = decision.reason
        if q is None:
            src = w.detach() if device is None else w.detach().to(device)
            gk = rotation_group or 16
            rot = rotation if decision.format == "int8-row" and shape[1] % gk == 0 else None
            if rotation and rot is None:
                reason += f"; unrotated (K={shape[1]} is not a multiple of {gk})"
            q = quantize_weight(src, decision.format, rounding=rounding, name=key, rotation=rot,
                                rotation_group=rotation_group if rot else None)
            del src
        users[id(w)] -= 1
        if users[id(w)] > 0:
            tied[id(w)] = q  # the float weight stays alive (and its id valid) until its last user
        else:
            tied.pop(id(w), None)
        # Replacing the Parameter drops the model's reference to the float weight: it is freed here,
        # before the next layer is quantized (unless the caller holds another reference).
        module.weight = nn.Parameter(q, requires_grad=False)
        if device is not None:
            module.to(device)
        del w
        report.layers.append(LayerReport(name, shape, "quantize", reason, q.format, before, q.nbytes_quantized))
        if verbose:
            print(f"  {name} {list(shape)} -> {q.format}")

    if device is not None:
        model.to(device)
    report.model_bytes_after = model_bytes(model)
    if verbose:
        print(report.summary())
    return report
