"""``load_quantized(model, path)``: fill a model (typically a skeleton on the meta device) from a converted
file, one tensor at a time, so the float weights never exist in memory.

Reads every layout ``ditq.checkpoint.layout`` knows (ditq, ComfyUI ``.comfy_quant`` / header metadata,
convert-to-quant, legacy scaled fp8). Quantized weights become ``QuantizedTensor`` parameters of the
model's ``nn.Linear`` layers; every other tensor is assigned as stored (its dtype from the file unless
``dtype`` is given). All keys are matched and all shapes checked before any data is read.

Build the skeleton with ``ditq.nn.empty_weights()`` (parameters on meta, buffers real, as accelerate's
``init_empty_weights``): non-persistent buffers such as rotary tables are not in any file and must be
computed at construction.
"""

from __future__ import annotations

import contextlib
import time
from dataclasses import dataclass, field
from typing import Callable

import torch
import torch.nn as nn

from ..checkpoint import layout as L
from ..checkpoint.io import open_checkpoint, prefetch
from ..checkpoint.policy import strip_prefix
from ..errors import CheckpointError
from ..tensor import QuantizedTensor


@dataclass
class LoadReport:
    """What ``load_quantized`` did. ``missing``: model tensors the file lacks (left as they were);
    ``unexpected``: file tensors with no place in the model; ``ignored``: calibrated input scales (ditq
    quantizes activations dynamically)."""

    path: str
    layout: str
    quantized: dict[str, int] = field(default_factory=dict)  # format -> layers
    plain: int = 0
    bytes_loaded: int = 0
    missing: list[str] = field(default_factory=list)
    unexpected: list[str] = field(default_factory=list)
    ignored: list[str] = field(default_factory=list)
    seconds: float = 0.0

    def summary(self) -> str:
        q = ", ".join(f"{n} {f}" for f, n in sorted(self.quantized.items())) or "none"
        lines = [
            f"ditq.load_quantized: {self.path} ({self.layout}): quantized layers: {q}; {self.plain} other tensors; "
            f"{self.bytes_loaded / 1e9:.3f} GB in {self.seconds:.1f} s"
        ]
        for what in ("missing", "unexpected", "ignored"):
            keys = getattr(self, what)
            if keys:
                more = f" ... and {len(keys) - 5} more" if len(keys) > 5 else ""
                lines.append(f"  {what} ({len(keys)}): {', '.join(keys[:5])}{more}")
        return "\n".join(lines)

    __str__ = summary


@contextlib.contextmanager
def empty_weights():
    """Build modules with their parameters on the meta device (no memory, no init time) while buffers
    stay real. ``with ditq.nn.empty_weights(): model = Model(config)``."""
    original = nn.Module.register_parameter

    def register_parameter(module, name, param):
        original(module, name, param)
        if param is not None and param.device.type != "meta":
            p = module._parameters[name]
            module._parameters[name] = nn.Parameter(p.to("meta"), requires_grad=p.requires_grad)

    nn.Module.register_parameter = register_parameter
    try:
        yield
    finally:
        nn.Module.register_parameter = original


def _targets(model: nn.Module) -> dict[str, tuple[nn.Module, str, bool]]:
    """state-dict key -> (owning module, attribute, is_parameter), tied names included."""
    out: dict[str, tuple[nn.Module, str, bool]] = {}
    for mname, m in model.named_modules(remove_duplicate=False):
        prefix = f"{mname}." if mname else ""
        for pname, p in m._parameters.items():
            if p is not None:
                out[prefix + pname] = (m, pname, True)
        for bname, b in m._buffers.items():
            if b is not None and bname not in m._non_persistent_buffers_set:
                out[prefix + bname] = (m, bname, False)
    return out


def _map_key(key: str, targets, key_map) -> str | None:
    if key_map is not None:
        return key_map(key) if callable(key_map) else key_map.get(key, key)
    if key in targets:
        return key
    stripped = strip_prefix(key)
    return stripped if stripped in targets else key


@torch.no_grad()
def load_quantized(
    model: nn.Module,
    path,
    device: torch.device | str | None = None,
    strict: bool = True,
    dtype: torch.dtype | None = None,
    key_map: Callable[[str], str | None] | dict | None = None,
) -> LoadReport:
    """Fill ``model`` from the checkpoint at ``path`` (file, sharded folder or index), tensor by tensor.

    device: where tensors go (default: each parameter's current device, CPU for meta ones). dtype: the
    compute dtype quantized weights report and the dtype floating unquantized tensors are cast to (default:
    the dtype ditq recorded in the file, else bfloat16, for quantized weights; the stored dtype for the
    rest). strict: raise CheckpointError, before reading any data, when the file and the model's keys
    differ (else list them in the report). key_map: file key -> model key (callable returning None to
    skip, or a dict); by default a key matches as is or with a wrapper prefix (``model.diffusion_model.``,
    ``transformer.``...) removed."""
    t0 = time.perf_counter()
    targets = _targets(model)
    ckpt = open_checkpoint(path)
    try:
        layout = L.scan(ckpt)
        report = LoadReport(str(path), layout.kind)
        qdtype = dtype or L.default_dtype(layout)
        plan: list[tuple[L.Entry, str]] = []
        for e in layout.entries:
            if e.key.endswith(".input_scale"):
                report.ignored.append(e.key)
                continue
            key = _map_key(e.key, targets, key_map)
            if key is None:
                report.ignored.append(e.key)
                continue
            if key not in targets:
                report.unexpected.append(e.key)
                continue
            module, attr, is_param = targets[key]
            current = getattr(module, attr)
            if tuple(current.shape) != tuple(e.shape):
                raise CheckpointError(
                    f"{path}: tensor {e.key!r} has shape {list(e.shape)} but the model's {key!r} has "
                    f"{list(current.shape)}; is the model built from the matching config?"
                )
            if e.quantized and not e.partial_blocks and not (is_param and isinstance(module, nn.Linear) and attr == "weight"):
                raise CheckpointError(
                    f"{path}: {e.key!r} is quantized ({e.fmt.name}) but the model's {key!r} is not an nn.Linear "
                    f"weight; ditq runs quantized weights in linear layers only. Convert with this layer kept"
                )
            plan.append((e, key))
        loaded = {key for _, key in plan}
        report.missing = [k for k in targets if k not in loaded]
        if strict and (report.missing or report.unexpected):
            raise CheckpointError(
                f"{path} does not match the model: {len(report.missing)} model tensor(s) missing from the file "
                f"(e.g. {report.missing[:3]}), {len(report.unexpected)} file tensor(s) unknown to the model "
                f"(e.g. {report.unexpected[:3]}). Check the model config / key names (key_map=), or pass strict=False"
            )

        def read():
            for e, key in plan:
                yield e, key, L.load(ckpt, e, qdtype)

        for e, key, value in prefetch(read(), 2):
            module, attr, is_param = targets[key]
            current = getattr(module, attr)
            dev = device if device is not None else (current.device if current.device.type != "meta" else "cpu")
            if isinstance(value, QuantizedTensor):
                value = value.to(dev)
                report.quantized[value.format] = report.quantized.get(value.format, 0) + 1
                report.bytes_loaded += value.nbytes_quantized
            else:
                cast = dtype if (dtype is not None and value.is_floating_point()) else None
                value = value.to(device=dev, dtype=cast)
                report.plain += 1
                report.bytes_loaded += value.numel() * value.element_size()
            if is_param:
                module._parameters[attr] = nn.Parameter(value, requires_grad=False)
            else:
                module._buffers[attr] = value
        report.seconds = time.perf_counter() - t0
        return report
    finally:
        ckpt.close()
