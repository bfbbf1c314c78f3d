"""On-disk key layouts <-> (qdata, scale, format): ComfyUI / convert-to-quant and legacy "scaled fp8".

Per quantized layer ``L`` a ComfyUI file holds (see shared/FORMATS.md):

    L.weight        int8 / float8_e4m3fn [N, K]
    L.weight_scale  float32: [] (tensor), [N, 1] (int8_tensorwise per row), [N] (float8_e4m3fn_rowwise),
                    [N/128, K/128] (blockwise)
    L.comfy_quant   uint8 [len]: UTF-8 bytes of json.dumps({"format": ..., ...})
    L.input_scale   float32 [] (optional, calibrated static activation scale)

and the header may carry ``_quantization_metadata`` = json.dumps({"format_version": "1.0", "layers":
{L: conf}}), which ComfyUI prefers over the tensors. Legacy files carry a ``scaled_fp8`` marker tensor and
``L.scale_weight`` / ``L.scale_input`` instead.

In memory, ditq keeps ``formats.py``'s shapes: row formats [N, 1], block [N/128, K/128], tensor []. The
functions here translate both ways, and ``iter_layers`` gives a runtime loader (key, QuantizedTensor or
tensor) pairs whatever layout the file uses. Hadamard-rotated int8 (ComfyUI's "convrot":
``{"format": "int8_tensorwise", "convrot": true, "convrot_groupsize": g}``, the keys at top level or in
``params``) loads as a QuantizedTensor with ``rotation = g``. Formats ditq does not implement (convrot on
another format or group size, e5m2, nvfp4, other block sizes...) raise UnsupportedFormatError rather than
load wrongly.
"""

from __future__ import annotations

import json
import math
import os
from dataclasses import dataclass, field
from typing import Iterator

import torch

from .. import formats as F
from ..errors import CheckpointError, UnsupportedFormatError
from ..tensor import QuantizedTensor
from .io import Checkpoint, open_checkpoint, prefetch

QUANT_METADATA_KEY = "_quantization_metadata"
DITQ_METADATA_KEY = "ditq"
QUANT_FORMAT_VERSION = "1.0"

# ComfyUI / convert-to-quant format strings -> ditq format. "float8_e4m3fn" is per tensor unless its
# scale has one value per row; "int8_tensorwise" is per row in ditq (a scalar scale is repeated per row,
# which dequantizes identically). "int8_rowwise" is a community alias of per-row int8_tensorwise.
COMFY_FORMATS = {
    "int8_tensorwise": "int8-row",
    "int8_rowwise": "int8-row",
    "int8_blockwise": "int8-block",
    "float8_e4m3fn": "fp8-tensor",
    "float8_e4m3fn_rowwise": "fp8-row",
    "float8_e4m3fn_blockwise": "fp8-block",
}
AUX_SUFFIXES = (".weight_scale", ".comfy_quant", ".scale_weight", ".scale_input")
CONVROT_FORMATS = ("int8_tensorwise", "int8_rowwise")  # the per-row int8 strings a rotation may carry
CONVROT_GROUPS = (16, 64, 256)  # powers of 4 that ComfyUI uses and ditq's rotated kernels implement
CONVROT_DEFAULT_GROUP = 256  # comfy-kitchen's default when a file omits convrot_groupsize


# -- the per-layer JSON ----------------------------------------------------------------------------------
def encode_comfy_quant(conf: dict) -> torch.Tensor:
    """uint8 [len] tensor holding ``json.dumps(conf)`` (default separators) as UTF-8, as ComfyUI writes it."""
    return torch.tensor(list(json.dumps(conf).encode("utf-8")), dtype=torch.uint8)


def decode_comfy_quant(t: torch.Tensor, where: str = "") -> dict:
    try:
        conf = json.loads(t.numpy().tobytes())
    except (ValueError, UnicodeDecodeError) as e:
        raise CheckpointError(f"{where}: .comfy_quant does not hold valid JSON ({e})") from None
    if isinstance(conf, str):  # some tools store the bare format string
        conf = {"format": conf}
    if not isinstance(conf, dict):
        raise CheckpointError(f"{where}: .comfy_quant holds {type(conf).__name__}, expected a JSON object")
    return conf


def comfy_conf(fmt: str | F.Format, **extra) -> dict:
    """The ``.comfy_quant`` object ditq writes for a format. ``extra`` keys (e.g. a rotation's
    ``convrot`` / ``convrot_groupsize``) are appended after ``format`` / ``group_size``."""
    fmt = F.get_format(fmt)
    conf: dict = {"format": fmt.comfy_format}
    if fmt.is_block:
        conf["group_size"] = F.BLOCK
    conf.update(extra)
    return conf


def layer_conf(qt: QuantizedTensor) -> dict:
    """The ``.comfy_quant`` object of a quantized weight, with ``convrot`` / ``convrot_groupsize`` when it is
    Hadamard-rotated (stock ComfyUI's rotated int8_tensorwise)."""
    g = getattr(qt, "rotation", None)
    return comfy_conf(qt.format, convrot=True, convrot_groupsize=int(g)) if g else comfy_conf(qt.format)


def _conf_get(conf: dict, key: str, default=None):
    """A key at top level or in the nested ``params`` object older tools wrote."""
    params = conf.get("params") if isinstance(conf.get("params"), dict) else {}
    return conf.get(key, params.get(key, default))


def format_of(conf: dict, where: str) -> F.Format:
    """The ditq format a ``.comfy_quant`` object denotes (before looking at scale shapes), or raise
    UnsupportedFormatError naming the layer and what to do."""
    name = conf.get("format")
    rotation_of(conf, where)  # refuses rotated variants ditq does not implement
    if name not in COMFY_FORMATS:
        raise UnsupportedFormatError(
            f"{where}: quantization format {name!r} is not one ditq implements "
            f"(it reads {', '.join(COMFY_FORMATS)}); convert the original bf16/fp16 checkpoint with `ditq convert`"
        )
    fmt = F.get_format(COMFY_FORMATS[name])
    if fmt.is_block:
        gs = _conf_get(conf, "group_size", F.BLOCK)
        if int(gs) != F.BLOCK:
            raise UnsupportedFormatError(
                f"{where}: {name} with group_size {gs}; ditq's block formats use {F.BLOCK}x{F.BLOCK} blocks. "
                f"Convert the original checkpoint with `ditq convert --format {fmt.name}`"
            )
    return fmt


def rotation_of(conf: dict, where: str) -> int | None:
    """The Hadamard group size of a rotated ("convrot") layer config, None when not rotated. Raises
    UnsupportedFormatError for a rotation ditq does not implement (on a format other than per-row int8,
    or a group size other than 16 / 64 / 256): loading it as plain int8 would be wrong."""
    if not _conf_get(conf, "convrot", False):
        return None
    name, g = conf.get("format"), _conf_get(conf, "convrot_groupsize", CONVROT_DEFAULT_GROUP)
    if name not in CONVROT_FORMATS:
        raise UnsupportedFormatError(
            f"{where}: Hadamard-rotated ('convrot') {name!r}; ditq implements the rotation for int8_tensorwise "
            f"only. Convert the original bf16/fp16 checkpoint with `ditq convert --rotation hadamard`"
        )
    if not isinstance(g, int) or isinstance(g, bool) or g not in CONVROT_GROUPS:
        raise UnsupportedFormatError(
            f"{where}: Hadamard-rotated int8 with convrot_groupsize {g!r}; ditq implements group sizes "
            f"{', '.join(map(str, CONVROT_GROUPS))}. Convert the original checkpoint with `ditq convert --rotation "
            f"hadamard --rotation-group G`"
        )
    return g


# -- scales: memory <-> disk -----------------------------------------------------------------------------
def disk_scale(scale: torch.Tensor, fmt: str | F.Format) -> torch.Tensor:
    """In-memory scale -> the shape FORMATS.md prescribes on disk (one-element per-tensor / per-row
    scales as [])."""
    fmt = F.get_format(fmt)
    scale = scale.detach().float().contiguous()
    if fmt.is_block:
        return scale  # [N/128, K/128] even for one block: block loaders index a 2-D grid
    if scale.numel() == 1:
        return scale.reshape(())
    if fmt.name == "fp8-row":
        return scale.reshape(-1)  # float8_e4m3fn_rowwise: [N]
    return scale  # int8_tensorwise [N, 1], blockwise [N/128, K/128]


def memory_scale(scale: torch.Tensor, fmt: F.Format, n: int, k: int, where: str) -> torch.Tensor:
    """On-disk scale -> ditq's in-memory shape for a weight [n, k]; raises CheckpointError on a mismatch."""
    if not _scale_fits(scale.shape, fmt, n, k):
        raise _scale_mismatch(scale.shape, fmt, n, k, where)
    s = scale.float()
    if fmt.weight_granularity == "tensor":
        return s.reshape(())
    if fmt.weight_granularity == "row":
        return s.reshape(-1, 1).expand(n, 1).contiguous()
    return s.reshape(fmt.weight_scale_shape(n, k)).contiguous()


def _scale_fits(shape, fmt: F.Format, n: int, k: int) -> bool:
    numel = math.prod(shape)
    if fmt.weight_granularity == "tensor":
        return numel == 1
    if fmt.weight_granularity == "row":
        return numel in (1, n)
    grid = fmt.weight_scale_shape(n, k)
    return n % F.BLOCK == 0 and k % F.BLOCK == 0 and (tuple(shape) == grid or (numel == 1 and grid == (1, 1)))


def _scale_mismatch(shape, fmt: F.Format, n: int, k: int, where: str) -> CheckpointError:
    return CheckpointError(
        f"{where}: weight_scale has shape {list(shape)}, which does not fit format {fmt.comfy_format} "
        f"with weight [{n}, {k}] (expected {list(fmt.weight_scale_shape(n, k)) or '[]'}); the file is inconsistent"
    )


def quantized_to_disk(layer: str, qt: QuantizedTensor, conf: dict | None = None) -> dict[str, torch.Tensor]:
    """The tensors written for one quantized layer: ``L.weight``, ``L.weight_scale``, ``L.comfy_quant``."""
    conf = conf or layer_conf(qt)
    return {
        f"{layer}.weight": qt.qdata.detach().cpu().contiguous(),
        f"{layer}.weight_scale": disk_scale(qt.scale.cpu(), qt.format),
        f"{layer}.comfy_quant": encode_comfy_quant(conf),
    }


def planned_keys(layer: str) -> list[str]:
    """Keys a quantized layer may produce (to size the header before writing)."""
    return [f"{layer}.weight", f"{layer}.weight_scale", f"{layer}.comfy_quant", f"{layer}.input_scale"]


def quantization_metadata(layers: dict[str, dict]) -> str:
    """The ``_quantization_metadata`` header value ComfyUI reads."""
    return json.dumps({"format_version": QUANT_FORMAT_VERSION, "layers": layers})


def layer_of(key: str) -> str:
    """``a.b.weight`` -> ``a.b``."""
    return key.rsplit(".", 1)[0] if "." in key else key


# -- reading a file ----------------------------------------------------------------------------------------
@dataclass
class Entry:
    """One item a loader gets: a plain tensor, or a quantized weight assembled from several keys.

    ``key`` is the state-dict key (``L.weight`` for a quantized weight); ``sources`` the on-disk keys it is
    read from; ``shape`` the (dequantized) tensor shape; ``dtype`` its on-disk dtype (storage dtype for
    quantized weights)."""

    key: str
    shape: tuple[int, ...]
    dtype: torch.dtype
    sources: list[str]
    nbytes: int
    fmt: F.Format | None = None
    conf: dict | None = None
    partial_blocks: bool = False  # block format with dims not divisible by 128: loaded dequantized
    legacy: bool = False
    rotation: int | None = None  # Hadamard group size of a rotated ("convrot") int8 weight

    @property
    def quantized(self) -> bool:
        return self.fmt is not None


@dataclass
class Layout:
    """What ``scan`` found in a checkpoint."""

    entries: list[Entry]
    kind: str  # "plain" | "comfy" | "legacy-scaled-fp8"
    header_layers: dict[str, dict] = field(default_factory=dict)  # from _quantization_metadata
    tensor_layers: dict[str, dict] = field(default_factory=dict)  # from .comfy_quant tensors
    ditq: dict = field(default_factory=dict)  # ditq's own header metadata, if any
    skipped_input_scales: list[str] = field(default_factory=list)  # legacy scale_input == 1.0

    @property
    def quantized(self) -> list[Entry]:
        return [e for e in self.entries if e.quantized]


def _where(ckpt: Checkpoint, key: str) -> str:
    info = ckpt.info(key) if key in ckpt else None
    return f"{info.file if info else ckpt.path}: tensor {key!r}"


def _parse_header_json(path, metadata: dict, key: str) -> dict:
    raw = metadata.get(key)
    if raw is None:
        return {}
    try:
        obj = json.loads(raw)
        if not isinstance(obj, dict):
            raise ValueError("not an object")
        return obj
    except ValueError as e:
        raise CheckpointError(f"{path}: header metadata {key!r} is not valid JSON ({e})") from None


def scan(ckpt: Checkpoint) -> Layout:
    """Map a checkpoint's keys to entries (reads only the small marker/config tensors).

    Raises CheckpointError for inconsistent files and UnsupportedFormatError for formats ditq does not
    implement, naming the file and tensor."""
    ditq_meta = _parse_header_json(ckpt.path, ckpt.metadata, DITQ_METADATA_KEY)
    has_header, header_layers = _header_layers(ckpt)
    tensor_layers = {
        layer_of(k): decode_comfy_quant(ckpt.get(k), _where(ckpt, k)) for k in ckpt.names if k.endswith(".comfy_quant")
    }
    confs = {**tensor_layers, **header_layers}  # ComfyUI rebuilds .comfy_quant from the header when present
    consumed = {k for k in ckpt.names if k.endswith(".comfy_quant")}
    kind = "comfy" if confs else "plain"
    legacy_layers, renamed, skipped_inputs = {}, {}, []
    if not has_header and any(k == "scaled_fp8" or k.endswith(".scaled_fp8") for k in ckpt.names):
        kind = "legacy-scaled-fp8"
        legacy_layers, renamed, skipped_inputs, used = _legacy_scaled_fp8(ckpt)
        consumed |= used

    entries = [_quantized_entry(ckpt, layer, conf, legacy=False) for layer, conf in confs.items()]
    entries += [_quantized_entry(ckpt, layer, conf, legacy=True) for layer, conf in legacy_layers.items()]
    for e in entries:
        consumed.update(e.sources)
    by_first = {e.sources[0]: e for e in entries}
    ordered: list[Entry] = []
    for k in ckpt.names:  # file order, so reads stay sequential
        if k in by_first:
            ordered.append(by_first[k])
        elif k not in consumed:
            info = ckpt.info(k)
            ordered.append(Entry(k, info.shape, info.dtype, [k], info.nbytes))
    for new_key, old_key in renamed.items():
        info = ckpt.info(old_key)
        ordered.append(Entry(new_key, info.shape, info.dtype, [old_key], info.nbytes))
    return Layout(ordered, kind, header_layers, tensor_layers, ditq_meta, skipped_inputs)


def _header_layers(ckpt: Checkpoint) -> tuple[bool, dict[str, dict]]:
    """(whether any file has ``_quantization_metadata``, its layers merged over the shards)."""
    found, layers = False, {}
    for meta in ckpt.file_metadata or [ckpt.metadata]:  # each shard lists its own layers
        part = _parse_header_json(ckpt.path, meta, QUANT_METADATA_KEY)
        found = found or QUANT_METADATA_KEY in meta
        part_layers = part.get("layers", {})
        if not isinstance(part_layers, dict):
            raise CheckpointError(f"{ckpt.path}: {QUANT_METADATA_KEY} has no 'layers' object")
        layers.update({k: ({"format": v} if isinstance(v, str) else v) for k, v in part_layers.items()})
    return found, layers


def _legacy_scaled_fp8(ckpt: Checkpoint):
    """Legacy "scaled fp8": (layers {L: conf}, {L.input_scale: L.scale_input}, dropped unit input scales,
    consumed keys). As ComfyUI converts them: every ``L.scale_weight`` makes L a float8_e4m3fn layer;
    ``L.scale_input`` becomes ``L.input_scale`` unless it is 1.0."""
    layers, renamed, skipped, used = {}, {}, [], set()
    for k in ckpt.names:
        if k == "scaled_fp8" or k.endswith(".scaled_fp8"):
            used.add(k)
            if ckpt.info(k).dtype == torch.float8_e5m2:
                raise UnsupportedFormatError(
                    f"{_where(ckpt, k)}: a legacy scaled float8_e5m2 checkpoint; ditq implements e4m3fn only. "
                    f"Convert the original checkpoint with `ditq convert`"
                )
        elif k.endswith(".scale_weight"):
            layers[k[: -len(".scale_weight")]] = {"format": "float8_e4m3fn"}
        elif k.endswith(".scale_input"):
            used.add(k)
            t = ckpt.get(k)
            if t.numel() == 1 and float(t.float().reshape(())) == 1.0:
                skipped.append(k)
            else:
                renamed[f"{k[: -len('.scale_input')]}.input_scale"] = k
    return layers, renamed, skipped, used


def _quantized_entry(ckpt: Checkpoint, layer: str, conf: dict, legacy: bool) -> Entry:
    """The entry of one quantized layer, validated against its config (header data only)."""
    wkey, skey = f"{layer}.weight", f"{layer}.scale_weight" if legacy else f"{layer}.weight_scale"
    where = _where(ckpt, wkey)
    if wkey not in ckpt:
        raise CheckpointError(f"{ckpt.path}: layer {layer!r} has a quantization config but no tensor {wkey!r}")
    if skey not in ckpt:
        raise CheckpointError(f"{where}: quantized ({conf.get('format')}) but {skey!r} is missing")
    fmt = format_of(conf, where)
    rotation = None if legacy else rotation_of(conf, where)
    winfo, sinfo = ckpt.info(wkey), ckpt.info(skey)
    if len(winfo.shape) != 2:
        raise CheckpointError(f"{where}: quantized weight has shape {list(winfo.shape)}; expected [N, K]")
    n, k = winfo.shape
    if rotation and k % rotation:
        raise CheckpointError(f"{where}: rotated int8 with group size {rotation}, but K={k} is not divisible by it; "
                              f"the file is inconsistent")
    if winfo.dtype != fmt.storage and not (not fmt.is_int and winfo.dtype == torch.uint8):  # old tools: fp8 as bytes
        raise CheckpointError(f"{where}: format {conf.get('format')} stores {fmt.storage}, but the tensor is {winfo.dtype}")
    if not sinfo.dtype.is_floating_point:
        raise CheckpointError(f"{_where(ckpt, skey)}: scale has dtype {sinfo.dtype}; expected float32")
    if fmt.name == "fp8-tensor" and sinfo.numel == n and n > 1:
        fmt = F.get_format("fp8-row")  # a per-row scale under the per-tensor format string
    partial = bool(fmt.is_block and (n % F.BLOCK or k % F.BLOCK)
                   and tuple(sinfo.shape) == (math.ceil(n / F.BLOCK), math.ceil(k / F.BLOCK)))
    if not partial and not _scale_fits(sinfo.shape, fmt, n, k):
        raise _scale_mismatch(sinfo.shape, fmt, n, k, _where(ckpt, skey))
    return Entry(wkey, (n, k), winfo.dtype, [wkey, skey], winfo.nbytes + sinfo.nbytes, fmt, conf, partial, legacy,
                 rotation)


def default_dtype(layout: Layout) -> torch.dtype:
    """The compute dtype quantized weights report: what ditq recorded, else bfloat16."""
    name = layout.ditq.get("dtype", "bfloat16")
    dt = getattr(torch, str(name).replace("torch.", ""), None)
    return dt if isinstance(dt, torch.dtype) and dt.is_floating_point else torch.bfloat16


def load(ckpt: Checkpoint, entry: Entry, dtype: torch.dtype = torch.bfloat16) -> torch.Tensor:
    """Read one entry: a QuantizedTensor (reporting ``dtype``) for quantized weights, else the plain tensor.
    Block-format weights whose dims are not multiples of 128 (other tools pad their scale grid) come back
    dequantized to ``dtype``, since ditq's kernels need whole blocks."""
    if not entry.quantized:
        return ckpt.get(entry.sources[0])
    q = ckpt.get(entry.sources[0])
    if q.dtype == torch.uint8:  # fp8 stored as raw bytes by old tools
        q = q.view(entry.fmt.storage)
    n, k = entry.shape
    where = _where(ckpt, entry.sources[1])
    raw_scale = ckpt.get(entry.sources[1])
    if entry.partial_blocks:
        s = raw_scale.float().repeat_interleave(F.BLOCK, 0)[:n].repeat_interleave(F.BLOCK, 1)[:, :k]
        return (q.float() * s).to(dtype) if entry.fmt.is_int else q.to(dtype) * s.to(dtype)
    scale = memory_scale(raw_scale, entry.fmt, n, k, where)
    return QuantizedTensor(q, scale, entry.fmt.name, dtype, rotation=entry.rotation)


def iter_layers(
    src: str | os.PathLike | Checkpoint, dtype: torch.dtype | None = None, prefetch_depth: int = 2
) -> Iterator[tuple[str, torch.Tensor]]:
    """For runtime loaders: yield (state-dict key, QuantizedTensor or plain tensor) for every entry of a
    checkpoint in any layout ditq reads, one at a time (memory ~ a few tensors).

    Quantized weights come as ``L.weight`` -> QuantizedTensor whose ``dtype`` is ``dtype`` (default: what
    ditq recorded at conversion, else bfloat16). Calibrated ``L.input_scale`` entries are yielded as plain
    tensors (ditq quantizes activations dynamically and may ignore them)."""
    own = not isinstance(src, Checkpoint)
    ckpt = open_checkpoint(src) if own else src
    try:
        layout = scan(ckpt)
        dt = dtype or default_dtype(layout)
        yield from prefetch(((e.key, load(ckpt, e, dt)) for e in layout.entries), prefetch_depth)
    finally:
        if own:
            ckpt.close()
