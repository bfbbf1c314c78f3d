"""`ditq convert SRC -o DST`: stream a checkpoint tensor by tensor into an 8-bit ComfyUI-layout file.

The pipeline: open and validate SRC (``checkpoint.io``), map its keys (``checkpoint.layout.scan``),
decide per layer (``checkpoint.policy``), then for each tensor in file order: read (a background thread
reads ahead), check, quantize (``ditq.quantize_weight``), write (``SafetensorsWriter``: temporary file,
renamed when complete). Memory stays near a few tensors whatever the checkpoint size.

``convert_checkpoint`` is the function behind the command; it returns a ``ConvertReport``.
"""

from __future__ import annotations


import importlib.util
import json
import os
import re
import resource
import shutil
import sys
import time
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Callable

import torch

from .. import __version__
from .. import formats as F
from ..checkpoint import layout as L
from ..checkpoint.io import (
    SMALL_TENSOR_BYTES, SafetensorsWriter, ShardedWriter, header_reserve, open_checkpoint, prefetch, release_memory,
)
from ..checkpoint.policy import KEEP_DTYPES, PRESETS, Decision, Policy, outlier_ratio
from ..errors import CheckpointError, DitqError, NonFiniteError
from ..precision import DEFAULT_CANDIDATES, SpeedTable, check_candidates, check_target
from ..tensor import QuantizedTensor, quantize_weight

ACTIONS = ("quantized", "copied", "kept", "dropped")


@dataclass
class LayerRecord:
    """One source entry in the report. ``action``: quantized | copied (already quantized in SRC) | kept |
    dropped. ``out``: the format or dtype written. ``rel_error``: ||W_dq - W|| / ||W|| for quantized."""

    key: str
    shape: list[int]
    dtype: str
    action: str
    out: str
    reason: str
    params: int
    bytes_in: int
    bytes_out: int
    rel_error: float | None = None
    outlier_ratio: float | None = None
    # learned rounding (issue 7): objective / held-out errors nearest vs learned, iterations, time, fallback
    rounding: dict | None = None
    rotation: int | None = None  # Hadamard group size of a rotated int8-row layer (ComfyUI "convrot")


@dataclass
class ConvertReport:
    src: str
    dst: str
    format: str
    preset: str
    preset_detected: bool
    device: str
    src_file_bytes: int = 0
    dst_file_bytes: int = 0
    seconds: float = 0.0
    peak_rss_bytes: int = 0
    layers: list[LayerRecord] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)
    precision: dict | None = None  # --target-cos: the per-layer choice, errors and speeds (budget.plan_budget)

    @property
    def bytes_in(self) -> int:
        return sum(r.bytes_in for r in self.layers)

    @property
    def bytes_out(self) -> int:
        return sum(r.bytes_out for r in self.layers)

    def count(self, action: str) -> int:
        return sum(r.action == action for r in self.layers)

    @property
    def reduction(self) -> float:
        """Fraction of the source file size saved."""
        return 1.0 - self.dst_file_bytes / self.src_file_bytes if self.src_file_bytes else 0.0

    def to_dict(self) -> dict:
        d = asdict(self)
        d["totals"] = {
            **{a: self.count(a) for a in ACTIONS},
            "tensor_bytes_in": self.bytes_in,
            "tensor_bytes_out": self.bytes_out,
            "src_file_bytes": self.src_file_bytes,
            "dst_file_bytes": self.dst_file_bytes,
            "reduction_pct": round(100 * self.reduction, 2),
            "seconds": round(self.seconds, 3),
            "read_gb_per_s": round(self.src_file_bytes / self.seconds / 1e9, 3) if self.seconds else None,
            "peak_rss_gb": round(self.peak_rss_bytes / 1e9, 3),
        }
        return d

    def summary(self) -> str:
        """The table printed after a conversion: groups of layers with counts, parameters and bytes."""
        groups: dict[tuple[str, str], list[LayerRecord]] = {}
        for r in self.layers:
            out = r.out + (f" hadamard-{r.rotation}" if r.rotation else "")
            label = (r.action, out if r.action in ("quantized", "copied") else r.reason)
            groups.setdefault(label, []).append(r)
        order = {a: i for i, a in enumerate(ACTIONS)}
        rows = sorted(groups.items(), key=lambda kv: (order[kv[0][0]], -sum(r.bytes_in for r in kv[1])))
        preset = f"{self.preset} (detected)" if self.preset_detected else self.preset
        lines = [f"ditq convert: {self.src} -> {self.dst}", f"  format {self.format}, preset {preset}, device {self.device}", ""]
        head = f"  {'layers':<44} {'count':>6} {'params':>9} {'bytes in':>10} {'bytes out':>10}"
        lines += [head, "  " + "-" * (len(head) - 2)]
        for (action, what), rs in rows:
            label = f"{action} {what}" if action != "kept" else f"kept: {what}"
            lines.append(
                f"  {label[:44]:<44} {len(rs):>6} {_num(sum(r.params for r in rs)):>9} "
                f"{_size(sum(r.bytes_in for r in rs)):>10} {_size(sum(r.bytes_out for r in rs)):>10}"
            )
        lines.append("  " + "-" * (len(head) - 2))
        lines.append(
            f"  {'total':<44} {len(self.layers):>6} {_num(sum(r.params for r in self.layers)):>9} "
            f"{_size(self.bytes_in):>10} {_size(self.bytes_out):>10}"
        )
        errs = [r.rel_error for r in self.layers if r.rel_error is not None]
        lines.append("")
        lines.append(
            f"  file size {_size(self.src_file_bytes)} -> {_size(self.dst_file_bytes)} "
            f"({100 * self.reduction:.1f}% smaller)"
            + (f"; weight error (relative L2) mean {sum(errs) / len(errs):.2%}, max {max(errs):.2%}" if errs else "")
        )
        rate = self.src_file_bytes / self.seconds / 1e9 if self.seconds else 0.0
        lines.append(f"  {self.seconds:.1f} s, {rate:.2f} GB/s read, peak RSS {self.peak_rss_bytes / 1e9:.2f} GB")
        lines += self._rounding_lines()
        if self.precision is not None:
            from .budget import summary_lines

            lines += summary_lines(self.precision)
        lines += [f"  warning: {w}" for w in self.warnings]
        return "\n".join(lines)


    def _rounding_lines(self) -> list[str]:
        """Learned rounding per layer: nearest vs learned on the objective and on held-out output error."""
        reps = [r.rounding for r in self.layers if r.rounding is not None]
        if not reps:
            return []
        from ..rounding import format_report

        kept = [r for r in reps if not r.get("fallback")]
        red = [r["heldout_reduction"] for r in kept if r.get("heldout_reduction") is not None]
        lines = ["", f"  learned rounding: {len(kept)} of {len(reps)} layers learned, {len(reps) - len(kept)} kept "
                     f"nearest" + (f"; held-out output MSE {-100 * sum(red) / len(red):+.1f}% on average over the "
                                   f"learned layers" if red else "")]
        lines += [f"    {format_report(r)}" + ("; bias corrected" if r.get("bias_correction") else "") for r in reps]
        return lines


def _size(n: float) -> str:
    for unit in ("B", "KB", "MB", "GB", "TB"):
        if abs(n) < 1000 or unit == "TB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1000
    return str(n)


def _num(n: float) -> str:
    for unit in ("", "K", "M", "B"):
        if abs(n) < 1000 or unit == "B":
            return f"{n:.0f}" if unit == "" else f"{n:.1f}{unit}"
        n /= 1000
    return str(n)


def parse_size(text: str) -> int:
    """'5GB', '500MB', '2GiB', '1000000' -> bytes."""
    m = re.fullmatch(r"\s*([\d.]+)\s*([kmgt]?)(i?)b?\s*", str(text).lower())
    if not m:
        raise DitqError(f"cannot read size {text!r}; write e.g. 5GB, 500MB or 2GiB")
    base = 1024 if m.group(3) else 1000
    return int(float(m.group(1)) * base ** " kmgt".index(m.group(2) or " "))


def peak_rss_bytes() -> int:
    """Peak resident memory of this process. Linux's VmHWM belongs to the current address space;
    ``ru_maxrss`` is the fallback, but it survives exec, so a process started from a large parent would
    report the parent's size."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # KiB on Linux


def resolve_device(device: str | torch.device | None) -> torch.device:
    if device in (None, "auto"):
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        dev = torch.device(device)
    except RuntimeError:
        raise DitqError(f"unknown device {device!r}; use cpu, cuda, cuda:1 or auto") from None
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise DitqError(f"device {device} requested but CUDA is not available; use --device cpu")
    return dev


CPU_CHUNK_ELEMENTS = 1 << 23
"""On the CPU, row and block formats are quantized in slices of about this many elements: rows (and
128-row blocks) are independent, so slices give the same codes and scales with a fraction of the float32
temporaries (resident memory then stays near the size of the bf16 tensors in flight)."""


def nearest_quantizer(key: str, w: torch.Tensor, decision: Decision) -> QuantizedTensor:
    """Default quantizer. Later features plug in here (learned rounding via ``decision.options`` such as
    ``rounding="learned"``; a rotation; a per-layer format chosen under a quality budget)."""
    fmt = F.get_format(decision.format)
    n, k = w.shape
    if decision.options or w.device.type != "cpu" or fmt.weight_granularity == "tensor" or w.numel() <= CPU_CHUNK_ELEMENTS:
        return quantize_weight(w, fmt.name, name=key, **decision.options)
    rows = max(F.BLOCK, CPU_CHUNK_ELEMENTS // k // F.BLOCK * F.BLOCK)
    qdata = torch.empty(n, k, dtype=fmt.storage)
    scales = []
    for i in range(0, n, rows):
        part = quantize_weight(w[i:i + rows], fmt.name, name=key)
        qdata[i:i + rows] = part.qdata
        scales.append(part.scale)
    return QuantizedTensor(qdata, torch.cat(scales), fmt.name, w.dtype)


def _same_file(a: Path, b: Path) -> bool:
    try:
        return a.resolve() == b.resolve() or (a.exists() and b.exists() and os.path.samefile(a, b))
    except OSError:
        return False


def _check_destination(src: Path, dst: Path, src_files: list[Path], sharded: bool) -> None:
    if _same_file(src, dst) or any(_same_file(f, dst) for f in src_files):
        raise CheckpointError(f"refusing to write {dst}: it is the source checkpoint; choose another output path")
    if src.is_dir() and dst.resolve() == src.resolve():
        raise CheckpointError(f"refusing to write into the source folder {src} itself; choose another output path")
    if dst.is_dir() and not sharded:
        raise CheckpointError(f"{dst} is a folder; give a file name (e.g. {dst / 'model-int8.safetensors'}) or --shard-size")
    if not dst.parent.is_dir():
        raise CheckpointError(f"output folder {dst.parent} does not exist; create it first")


def convert_checkpoint(
    src: str | os.PathLike,
    dst: str | os.PathLike,
    *,
    format: str = "int8-row",
    preset: str = "auto",
    include=(),
    exclude=(),
    keep_dtype: str = "original",
    min_elements: int = 16384,
    max_outlier_ratio: float | None = None,
    keep_nonfinite: bool = False,
    device: str | torch.device | None = "auto",
    shard_size: int | str | None = None,
    rounding: str = "nearest",
    rounding_options: dict | None = None,
    calibration=None,
    rotation: str | None = None,
    rotation_group: int | None = None,
    target_cos: float | None = None,
    candidates=DEFAULT_CANDIDATES,
    speed_table=None,
    tokens: int | None = None,
    measure_error: bool = True,
    progress: bool = False,
    policy: Policy | None = None,
    quantizer: Callable[[str, torch.Tensor, Decision], QuantizedTensor] = nearest_quantizer,
) -> ConvertReport:
    """Convert ``src`` to ``dst`` (one safetensors file, or a folder of shards when ``shard_size`` is set).

    Every check that needs no tensor data (paths, headers, shards, formats, disk space) runs before
    anything is written; a failure later (a NaN weight, a full disk, Ctrl-C) removes the temporary output,
    so ``dst`` is either complete or untouched. ``policy`` / ``quantizer`` replace the per-layer decision
    and quantization (hooks for rotation and quality-budget formats).

    ``rounding="learned"`` runs ``ditq.rounding.round_layer`` per quantized layer with ``rounding_options``
    (objective, optimizer, iters, rank_fraction, min_rank, max_rank, optimize_scale) and ``calibration``
    (a ``ditq calibrate`` file or CalibrationStats); each layer's record then carries the rounding report,
    and a bias correction from the calibration mean replaces the layer's ``.bias`` in the output.

    ``rotation="hadamard"`` (int8-row only) writes ComfyUI's rotated int8 ("convrot") with group
    ``rotation_group`` (default per layer: ``formats.rotation_group_size(K)``); a layer whose K the group
    does not divide is quantized unrotated and its record says so.

    ``target_cos`` (with ``calibration``) chooses each layer's format among ``candidates`` (precision.SPEED_ORDER
    names; "bf16" keeps the layer in float) from its measured output error on the calibration rows, the
    fastest per the GEMM benchmark ``speed_table`` (a ``ditq bench gemm --json`` file, "none", or None for
    ``precision.DEFAULT_TABLE``) read at ``tokens`` rows per GEMM (default ``precision.DEFAULT_TOKENS``; a video
    model's token count, e.g. 32760 for Wan 480p 81 frames) within the whole-model budget of ``budget.py``;
    ``format`` is then unused and ``report.precision`` holds the per-layer choice."""
    t0 = time.perf_counter()
    src, dst = Path(src), Path(dst)
    fmt = F.get_format(format)
    if rounding not in ("nearest", "learned"):
        raise DitqError(f"unknown rounding {rounding!r}; choose nearest or learned")
    table = None
    if target_cos is not None:
        target, cands = check_target(target_cos), check_candidates(candidates)
        if calibration is None:
            raise DitqError("--target-cos needs --calibration FILE: the layers' sensitivity is measured on real inputs; "
                            "write one with `ditq calibrate MODEL -o stats.safetensors`")
        if rounding != "nearest" or rotation is not None or rotation_group is not None:
            raise DitqError("--target-cos chooses each layer's format and rotation itself (candidate "
                            "int8-row+hadamard); drop --rounding learned / --rotation")
        if max_outlier_ratio is not None:
            raise DitqError("--target-cos measures each layer's error on real inputs itself; drop --max-outlier-ratio")
        table = speed_table if isinstance(speed_table, SpeedTable) else SpeedTable.load(speed_table)
        if tokens is not None:
            if isinstance(tokens, bool) or not isinstance(tokens, int) or tokens < 1:
                raise DitqError(f"--tokens must be a positive whole number (the rows of the model's GEMMs), got {tokens!r}")
            table = replace(table, tokens=tokens)
        fmt = F.get_format("int8-row")  # the policy's eligibility; each layer's format comes from the budget
    elif check_candidates(candidates) != DEFAULT_CANDIDATES or speed_table is not None or tokens is not None:
        raise DitqError("--candidates, --speed-table and --tokens only apply with --target-cos; add it or drop them")
    if rounding == "nearest" and (rounding_options or (calibration is not None and target_cos is None)):
        raise DitqError("rounding options apply only with --rounding learned, and --calibration with --rounding learned "
                        "or --target-cos; add one or drop them")
    if rounding == "learned" and importlib.util.find_spec("ditq.rounding") is None:
        raise DitqError("--rounding learned needs ditq.rounding, which this build does not have; use --rounding nearest")
    unknown = sorted(set(rounding_options or {}) - set(ROUNDING_OPTION_NAMES))
    if unknown:
        raise DitqError(f"unknown rounding option(s) {unknown}; known: {', '.join(ROUNDING_OPTION_NAMES)}")
    options = {"rounding": "learned", **(rounding_options or {})} if rounding == "learned" else {}
    if rotation is not None or rotation_group is not None:
        _check_rotation_request(rotation, rotation_group, fmt, rounding)
    cal = _load_calibration(calibration) if rounding == "learned" or target_cos is not None else None
    dev = resolve_device(device)
    shard_bytes = parse_size(shard_size) if isinstance(shard_size, str) else shard_size

    release_memory()
    with open_checkpoint(src) as ckpt:
        _check_destination(src, dst, ckpt.files, bool(shard_bytes))
        layout = L.scan(ckpt)
        pol = policy or Policy(fmt.name, preset, [e.key for e in layout.entries], include, exclude, min_elements, keep_dtype)
        plan = [(e, _static_decision(pol, e, options, rotation_group if rotation else None, bool(rotation)))
                for e in layout.entries]
        report = ConvertReport(str(src), str(dst), fmt.name if table is None else "mixed", pol.preset, pol.detected,
                               str(dev))
        report.src_file_bytes = ckpt.file_size
        rounder = None
        if rounding == "learned":
            plan, rounder = _learned_plan(plan, cal, options, report)
        if table is not None:
            from .budget import plan_budget

            cal_name = str(calibration) if isinstance(calibration, (str, os.PathLike)) else "(given statistics)"
            plan, report.precision, warns = plan_budget(ckpt, plan, pol, cal, cal_name, target, cands, table, dev,
                                                        keep_nonfinite, L.default_dtype(layout))
            report.warnings += warns
        _check_disk_space(dst, plan)
        if getattr(ckpt, "skipped", None):
            report.warnings.append(f"{len(ckpt.skipped)} non-tensor entries of SRC skipped (e.g. {ckpt.skipped[0]!r})")
        if layout.skipped_input_scales:
            report.warnings.append(f"{len(layout.skipped_input_scales)} legacy scale_input == 1.0 dropped")

        writer = _open_writer(dst, shard_bytes, plan, ckpt.metadata)
        bar = _progress(ckpt.nbytes, progress)
        quant_layers: dict[str, dict] = {}
        try:
            with writer:
                for e, d in plan:
                    if d.action == "drop":
                        report.layers.append(_record(e, "dropped", "-", d.reason, 0))
                        _advance(bar, e, report)
                work = [(e, d) for e, d in plan if d.action != "drop"]
                dtype = L.default_dtype(layout)
                for e, d, value in prefetch(((e, d, L.load(ckpt, e, dtype)) for e, d in work), 2):
                    report.layers.append(_convert_one(ckpt, e, d, value, writer, quant_layers, pol, dev, keep_nonfinite,
                                                      max_outlier_ratio, measure_error, quantizer, rounder))
                    del value
                    if e.nbytes >= SMALL_TENSOR_BYTES:
                        release_memory()
                    _advance(bar, e, report)
                meta = _metadata(ckpt, layout, report, pol, options, src, quant_layers)
                if shard_bytes:
                    writer.commit(lambda names: _shard_metadata(meta, names, quant_layers), {"ditq": meta[L.DITQ_METADATA_KEY]})
                else:
                    writer.commit(meta)
        finally:
            if bar is not None:
                bar.close()

    report.dst_file_bytes = sum(p.stat().st_size for p in dst.glob("*.safetensors")) if dst.is_dir() else dst.stat().st_size
    report.seconds = time.perf_counter() - t0
    report.peak_rss_bytes = peak_rss_bytes()
    return report


def _open_writer(dst: Path, shard_bytes: int | None, plan, src_metadata: dict):
    """A writer whose reserved space fits the header and the small tensors the plan will produce."""
    keys = [k for e, d in plan if d.action != "drop"
            for k in (L.planned_keys(L.layer_of(e.key)) if d.action != "keep" else [e.key])]
    meta_bytes = sum(len(k) + 80 for k in keys) + sum(len(k) + len(v) for k, v in src_metadata.items()) + 1024
    reserve = header_reserve(keys, meta_bytes, _small_bytes(plan))
    if not shard_bytes:
        return SafetensorsWriter(dst, reserve)
    share = min(1.0, shard_bytes / max(1, _output_bytes(plan)))  # each shard holds about its share
    return ShardedWriter(dst, shard_bytes, int(reserve * share) + (64 << 10))


def _advance(bar, e: L.Entry, report: ConvertReport) -> None:
    if bar is not None:
        bar.update(e.nbytes)
        bar.set_postfix_str(f"out/in {report.bytes_out / max(report.bytes_in, 1):.0%}", refresh=False)


def _check_rotation_request(rotation, group, fmt: F.Format, rounding: str) -> None:
    if rotation != "hadamard":
        raise DitqError(f"unknown rotation {rotation!r}; the one ditq implements is --rotation hadamard"
                        if rotation is not None else "--rotation-group needs --rotation hadamard")
    if fmt.name != "int8-row":
        raise DitqError(f"--rotation hadamard applies to --format int8-row only (ComfyUI's rotated int8_tensorwise), "
                        f"not {fmt.name}; drop --rotation or use --format int8-row")
    if group is not None and group not in L.CONVROT_GROUPS:
        raise DitqError(f"--rotation-group {group} is not supported; choose one of "
                        f"{', '.join(map(str, L.CONVROT_GROUPS))} (powers of 4)")
    if rounding != "nearest":
        raise DitqError("--rotation hadamard with --rounding learned is not implemented; use one or the other")


def _rotation_group(k: int, group: int | None) -> tuple[int | None, str]:
    """(group size for a weight with K inputs or None, why not rotated)."""
    if group is not None:
        return (group, "") if k % group == 0 else (None, f"K={k} not divisible by rotation group {group}: not rotated")
    g = F.rotation_group_size(k) if k % 4 == 0 else 1
    if g not in L.CONVROT_GROUPS:
        return None, f"K={k} not divisible by 16: not rotated"
    return g, ""


def _static_decision(pol: Policy, e: L.Entry, options: dict, rotation_group: int | None = None,
                     rotate: bool = False) -> Decision:
    if e.quantized and not e.partial_blocks:
        d = pol.decide(e.key, e.shape, torch.bfloat16)
        if d.action == "drop":
            return d
        return Decision("copy", f"already {e.fmt.name} in SRC", e.fmt.name)
    dtype = torch.bfloat16 if e.partial_blocks else e.dtype  # partial-block layers are loaded dequantized
    d = pol.decide(e.key, e.shape, dtype)
    if d.quantize and options:
        d.options = {**options, **d.options}
    if d.quantize and rotate:
        g, why = _rotation_group(e.shape[1], rotation_group)
        if g:
            d.options = {**d.options, "rotation": "hadamard", "rotation_group": g}
        else:
            d.reason = f"{d.reason}; {why}" if d.reason else why
    return d


def _small_bytes(plan) -> int:
    """Bytes of the small tensors (scales, configs, biases, norms) the writer holds back (an estimate:
    a larger total only costs one move of the data)."""
    total = 0
    for e, d in plan:
        if d.action == "quantize":
            total += F.qdata_bytes(*e.shape, d.format) - _numel(e.shape) + 64
        elif d.action in ("keep", "copy"):
            out = e.nbytes if d.out_dtype is None else _numel(e.shape) * d.out_dtype.itemsize
            total += out if out < SMALL_TENSOR_BYTES else 0
    return total


def _output_bytes(plan) -> int:
    """Bytes of tensor data the plan writes (before data-dependent changes such as --keep-nonfinite)."""
    need = 0
    for e, d in plan:
        if d.action == "quantize":
            need += F.qdata_bytes(*e.shape, d.format) + 64
        elif d.action == "copy" or (d.action == "keep" and d.out_dtype is None):
            need += e.nbytes
        elif d.action == "keep":
            need += _numel(e.shape) * d.out_dtype.itemsize
    return need


def _check_disk_space(dst: Path, plan) -> None:
    need = _output_bytes(plan)
    free = shutil.disk_usage(dst.parent).free
    if free < need + (64 << 20):
        raise CheckpointError(
            f"{dst.parent} has {free / 1e9:.2f} GB free but the output needs about {need / 1e9:.2f} GB; free some space "
            f"or write elsewhere"
        )


def _numel(shape) -> int:
    n = 1
    for s in shape:
        n *= s
    return n


def _record(e: L.Entry, action: str, out: str, reason: str, bytes_out: int, **kw) -> LayerRecord:
    return LayerRecord(
        e.key, list(e.shape), str(e.dtype).replace("torch.", ""), action, out, reason, _numel(e.shape), e.nbytes,
        bytes_out, **kw
    )


# -- learned rounding (issue 7) ---------------------------------------------------------------------------
ROUNDING_OPTION_NAMES = ("objective", "optimizer", "iters", "rank_fraction", "min_rank", "max_rank", "optimize_scale")


def _load_calibration(calibration):
    """A ``ditq calibrate`` file path -> CalibrationStats (objects pass through; None stays None)."""
    if calibration is None or not isinstance(calibration, (str, os.PathLike)):
        return calibration
    from ..rounding import load_calibration

    if not Path(calibration).is_file():
        raise CheckpointError(f"calibration file {calibration} does not exist; create it with `ditq calibrate`")
    return load_calibration(calibration)


class _Rounder:
    """Learned rounding in the stream. ``bias_of``: weight key -> its bias key, for the layers whose bias
    may be corrected; the plan puts each such bias right after its weight, so the corrected bias (held in
    ``corrected`` until written) replaces the source bias without holding more than one layer."""

    def __init__(self, cal, options: dict, bias_of: dict[str, str]):
        self.cal, self.options, self.bias_of = cal, options, bias_of
        self.corrected: dict[str, torch.Tensor] = {}

    def quantize(self, ckpt, key: str, w: torch.Tensor, d: Decision) -> tuple[QuantizedTensor, dict]:
        from ..rounding import round_layer

        bkey = self.bias_of.get(key)
        bias = ckpt.get(bkey) if bkey is not None else None  # a small read out of file order
        opts = {k: v for k, v in d.options.items() if k != "rounding"}
        q, s, rep = round_layer(key, w, d.format, self.cal, bias=bias, device=w.device, **opts)
        corrected = rep.pop("corrected_bias", None)
        if corrected is not None and bkey is not None:
            self.corrected[bkey] = corrected.detach().cpu()
        rep = {k: v for k, v in rep.items() if not isinstance(v, torch.Tensor)}
        return QuantizedTensor(q, s, d.format, w.dtype), rep


def _learned_plan(plan, cal, options: dict, report: ConvertReport):
    """(plan with each correctable bias moved right after its weight, the _Rounder); adds warnings when
    learned rounding cannot do anything."""
    objective = options.get("objective", "auto")
    learned = [e.key for e, d in plan if d.quantize and d.options.get("rounding") == "learned"]
    if cal is None and objective in ("auto", "activation"):
        report.warnings.append(
            "--rounding learned without --calibration and with objective auto keeps round-to-nearest on every layer "
            "(data-free objectives are opt-in: --objective weight or svd); run `ditq calibrate` and pass --calibration"
        )
    elif cal is not None and learned and not any(cal.get(k) is not None for k in learned):
        report.warnings.append(
            "the calibration file has statistics for none of the quantized layers (does it belong to this model?); "
            "every layer kept round-to-nearest"
        )
    bias_of = {}
    if cal is not None:
        present = {e.key: (e, d) for e, d in plan}
        for k in learned:
            b = L.layer_of(k) + ".bias"
            if b in present and present[b][1].action != "drop" and not present[b][0].quantized and cal.get(k) is not None:
                bias_of[k] = b
    if bias_of:
        moved = set(bias_of.values())
        by_key = {e.key: (e, d) for e, d in plan}
        out = []
        for e, d in plan:
            if e.key in moved:
                continue
            out.append((e, d))
            if e.key in bias_of:
                out.append(by_key[bias_of[e.key]])
        plan = out
    return plan, _Rounder(cal, options, bias_of)


def count_nonfinite(w: torch.Tensor) -> int:
    """Number of NaN/Inf values. A float32 sum propagates any of them, so the exact (slower) count runs
    only when the sum is not finite (a NaN/Inf, or finite values whose sum overflows)."""
    if bool(torch.isfinite(w.sum(dtype=torch.float32))):
        return 0
    return int((~torch.isfinite(w)).sum())


def _convert_one(ckpt, e, d, value, writer, quant_layers, pol, dev, keep_nonfinite, max_ratio, measure_error, quantizer,
                 rounder=None):
    layer = L.layer_of(e.key)
    if d.action == "copy":
        conf = L.layer_conf(value)
        out = L.quantized_to_disk(layer, value, conf)
        for k, t in out.items():
            writer.add(k, t)
        quant_layers[layer] = conf
        return _record(e, "copied", value.format, d.reason, sum(t.numel() * t.element_size() for t in out.values()),
                       rotation=value.rotation)

    if d.action == "quantize":
        w = value.to(dev, non_blocking=True) if dev.type != "cpu" else value
        ratio = None
        bad = count_nonfinite(w)
        if bad:
            if not keep_nonfinite:
                raise NonFiniteError(
                    f"{ckpt.info(e.sources[0]).file}: tensor {e.key!r} ({list(e.shape)}) holds {bad} NaN/Inf value(s); "
                    f"nothing was written. Fix the checkpoint, keep the layer unquantized with --keep-nonfinite, or "
                    f"--exclude it"
                )
            d = pol.keep(e.key, e.dtype, f"{bad} NaN/Inf (--keep-nonfinite)")
        elif max_ratio is not None:
            ratio = outlier_ratio(w, d.format)
            if ratio > max_ratio:
                d = pol.keep(e.key, e.dtype, f"outlier ratio > {max_ratio:g}")
        if d.quantize:
            rrep = None
            if rounder is not None and d.options.get("rounding") == "learned":
                qt, rrep = rounder.quantize(ckpt, e.key, w, d)
            else:
                qt = quantizer(e.key, w, d)
            err = weight_error(qt, w) if measure_error else None
            conf = L.layer_conf(qt)
            out = L.quantized_to_disk(layer, qt, conf)
            for k, t in out.items():
                writer.add(k, t)
            quant_layers[layer] = conf
            nbytes = sum(t.numel() * t.element_size() for t in out.values())
            return _record(e, "quantized", qt.format, d.reason, nbytes, rel_error=err, outlier_ratio=ratio, rounding=rrep,
                           rotation=qt.rotation)
        value = w.cpu() if w.device.type != "cpu" else w
        rec_ratio = ratio
    else:
        rec_ratio = None
    if rounder is not None and e.key in rounder.corrected:  # a learned layer's bias, corrected for its rounding
        value = rounder.corrected.pop(e.key)
        d = Decision(d.action, d.reason + "; corrected for the weight's rounding (calibration mean)", d.format,
                     d.out_dtype, d.options)

    # keep: write the tensor as is, or in the dtype the policy asks for
    t = value.dequantize() if isinstance(value, QuantizedTensor) else value
    if d.out_dtype is not None and t.is_floating_point():
        t = t.to(d.out_dtype)
    writer.add(e.key, t)
    out = str(t.dtype).replace("torch.", "")
    return _record(e, "kept", out, d.reason, t.numel() * t.element_size(), outlier_ratio=rec_ratio)


def weight_error(qt: QuantizedTensor, w: torch.Tensor) -> float:
    """||dequantize(qt) - w|| / ||w|| of a weight w [N, K] (norms over row chunks, summed in float64;
    rotated weights in the rotated basis, which gives the same norms)."""
    num = den = 0.0
    for q, s, ref in _row_chunks(qt, w):
        # a rotated weight is compared in the rotated basis: H_g is orthogonal, so the norms are the same
        ref = F.rotate(ref.float(), qt.rotation) if qt.rotation else ref.float()
        diff = F.dequantize_ref(q, s, qt.format, torch.float32).sub_(ref)
        # float32 norms (cascade-summed, ~1e-7 relative) are 30x faster than float64 ones on a CPU
        num += float(torch.linalg.vector_norm(diff)) ** 2
        den += float(torch.linalg.vector_norm(ref)) ** 2
    return (num / den) ** 0.5 if den > 0 else (0.0 if num == 0 else float("inf"))


def _row_chunks(qt: QuantizedTensor, w: torch.Tensor, chunk_elements: int = 1 << 20):
    """(qdata, scale, w) for row chunks of about ``chunk_elements`` (whole 128-row blocks for block formats),
    so that temporaries stay a fraction of the weight."""
    fmt = F.get_format(qt.format)
    n, k = w.shape
    step = max(1, chunk_elements // max(k, 1))
    if fmt.is_block:
        step = max(F.BLOCK, step // F.BLOCK * F.BLOCK)
    for i in range(0, n, step):
        j = min(n, i + step)
        if qt.scale.dim() == 0:
            s = qt.scale
        elif fmt.is_block:
            s = qt.scale[i // F.BLOCK: -(-j // F.BLOCK)]
        else:
            s = qt.scale[i:j]
        yield qt.qdata[i:j], s, w[i:j]


def weight_error_stats(qt: QuantizedTensor, w: torch.Tensor) -> tuple[float, float]:
    """(relative L2 error, largest error in units of the format's step) of a quantized weight against the
    float weight w [N, K], in float64 over row chunks.

    The step of an element is its scale for int8 and the e4m3 spacing at |w / scale| (times the scale) for
    fp8, so round-to-nearest gives at most 0.5 and any rounding to a neighbour at most 1. Dequantization
    is ComfyUI's (``formats.dequantize_ref`` in float32)."""
    fmt = F.get_format(qt.format)
    num = den = worst = 0.0
    for q, s, ref in _row_chunks(qt, w):
        ref = ref.double()
        unit = F.broadcast_weight_scale(s, fmt, *ref.shape).double()
        diff = F.dequantize_ref(q, s, fmt, torch.float32).double() - ref
        num += float(diff.square().sum())
        den += float(ref.square().sum())
        if not fmt.is_int:  # e4m3fn: 3 mantissa bits, normals from 2^-6, subnormal spacing 2^-9
            unit = unit * torch.exp2(torch.floor(torch.log2((ref / unit).abs().clamp(min=2.0**-6))) - 3)
        if diff.numel():
            worst = max(worst, float((diff.abs() / unit).max()))
    rel = (num / den) ** 0.5 if den > 0 else (0.0 if num == 0 else float("inf"))
    return rel, worst


def _metadata(ckpt, layout, report, pol, options, src: Path, quant_layers) -> dict[str, str]:
    meta = {k: v for k, v in ckpt.metadata.items() if k not in (L.QUANT_METADATA_KEY, L.DITQ_METADATA_KEY)}
    float_dtypes = [r.dtype for r in report.layers if r.action == "quantized"]
    ditq = {
        "version": __version__,
        "format": report.format,
        "preset": pol.preset,
        "rounding": options.get("rounding", "nearest"),
        "dtype": max(set(float_dtypes), key=float_dtypes.count) if float_dtypes else "bfloat16",
        "source": src.name,
        "source_bytes": ckpt.file_size,
        "source_layout": layout.kind,
    }
    if report.precision is not None:
        ditq["target_cos"] = report.precision["target_cos"]
    corrected = [r.key for r in report.layers if r.action == "kept" and "corrected for the weight's rounding" in r.reason]
    if corrected:  # verify then accepts these biases differing from SRC
        ditq["corrected_biases"] = corrected
    meta[L.DITQ_METADATA_KEY] = json.dumps(ditq)
    if quant_layers:
        meta[L.QUANT_METADATA_KEY] = L.quantization_metadata(quant_layers)
    return meta


def _shard_metadata(meta: dict, names: list[str], quant_layers: dict) -> dict:
    """Each shard's header lists only its own layers, so a loader never rebuilds a config for a weight
    that lives in another shard."""
    mine = {L.layer_of(n) for n in names if n.endswith(".weight")}
    out = {k: v for k, v in meta.items() if k != L.QUANT_METADATA_KEY}
    layers = {k: v for k, v in quant_layers.items() if k in mine}
    if layers:
        out[L.QUANT_METADATA_KEY] = L.quantization_metadata(layers)
    return out


def _progress(total: int, enabled: bool):
    if not enabled or not sys.stderr.isatty():
        return None
    try:
        from tqdm import tqdm
    except ImportError:
        return None
    return tqdm(total=total, unit="B", unit_scale=True, unit_divisor=1000, desc="convert", dynamic_ncols=True,
                file=sys.stderr)


# -- command line ------------------------------------------------------------------------------------------
def add_arguments(p) -> None:
    p.add_argument("src", help="a .safetensors file, a sharded folder (or its index json), or a .bin/.pt/.ckpt file")
    p.add_argument("-o", "--output", dest="dst", required=True, help="output .safetensors file (a folder with --shard-size)")
    p.add_argument("--format", default=None, choices=list(F.FORMATS), help="8-bit format (default int8-row)")
    p.add_argument("--preset", default="auto", choices=PRESETS, help="layers kept in high precision (default: detect)")
    p.add_argument("--include", action="append", default=[], metavar="REGEX", help="quantize matching weights the preset keeps (repeatable)")
    p.add_argument("--exclude", action="append", default=[], metavar="REGEX", help="keep matching tensors unquantized (repeatable; wins over --include)")
    p.add_argument("--keep-dtype", default="original", choices=list(KEEP_DTYPES), help="dtype of layers left unquantized")
    p.add_argument("--min-elements", type=int, default=16384, metavar="N", help="keep weights with fewer elements (default 16384)")
    p.add_argument("--max-outlier-ratio", type=float, default=None, metavar="R",
                   help="keep layers whose worst scale group has amax/RMS above R (about R/440 relative int8 error)")
    p.add_argument("--keep-nonfinite", action="store_true", help="keep NaN/Inf weights unquantized instead of failing")
    p.add_argument("--rounding", default="nearest", choices=["nearest", "learned"], help="rounding of weights (default nearest)")
    g = p.add_argument_group("learned rounding (with --rounding learned)")
    g.add_argument("--calibration", default=None, metavar="FILE", help="input statistics from `ditq calibrate`, for "
                   "--rounding learned (without it, objective auto keeps nearest) or --target-cos")
    g.add_argument("--objective", default="auto", choices=["auto", "activation", "weight", "svd"],
                   help="what the rounding minimizes (auto: output error on the calibration inputs)")
    g.add_argument("--optimizer", default="original", choices=["original", "adamw", "radam"],
                   help="original: GPTQ error feedback (+ coordinate descent with --iters); adamw/radam refine it")
    g.add_argument("--iters", type=int, default=None, metavar="N",
                   help="refinement iterations (default 0 for original, 100 for adamw/radam)")
    g.add_argument("--rank-fraction", type=float, default=0.05, metavar="P", help="svd objective: rank = P x min(N, K)")
    g.add_argument("--min-rank", type=int, default=8, metavar="K", help="svd objective: smallest rank (default 8)")
    g.add_argument("--max-rank", type=int, default=256, metavar="K", help="svd objective: largest rank (default 256)")
    g.add_argument("--no-scale-search", action="store_true", help="keep the amax scales (no shrink search)")
    p.add_argument("--rotation", default=None, choices=["hadamard"],
                   help="int8-row only: Hadamard-rotated int8 (ComfyUI 'convrot'), better with outlier activations")
    p.add_argument("--rotation-group", type=int, default=None, metavar="G",
                   help="rotation group size 16, 64 or 256 (default per layer: the largest dividing K, up to 256)")
    g = p.add_argument_group("automatic precision (with --calibration)")
    g.add_argument("--target-cos", type=float, default=None, metavar="T",
                   help="choose each layer's format: the fastest whose measured output error keeps the estimated "
                        "whole-model cosine >= T (e.g. 0.999); replaces --format")
    g.add_argument("--candidates", default=",".join(DEFAULT_CANDIDATES), metavar="LIST",
                   help="formats --target-cos may choose (default %(default)s; bf16 keeps a layer in float, "
                        "int8-row+hadamard is rotated int8-row, fp8-tensor and fp8-block also allowed)")
    g.add_argument("--speed-table", default=None, metavar="JSON",
                   help="`ditq bench gemm --json` result ranking the formats by speed per shape (default: "
                        "bench/results/gemm-h200.json when present; 'none': the default order)")
    g.add_argument("--tokens", type=int, default=None, metavar="N",
                   help="rows of the model's GEMMs the speed table is read at (default 4096, a 1024px Flux image; "
                        "e.g. 32760 for Wan 480p 81 frames)")
    p.add_argument("--device", default="auto", help="where to quantize: auto (cuda if available), cpu, cuda, cuda:N")
    p.add_argument("--shard-size", default=None, metavar="SIZE", help="write a folder of shards of at most SIZE (e.g. 5GB)")
    p.add_argument("--no-error", action="store_true", help="skip measuring each layer's weight error (a little faster)")
    p.add_argument("--json", default=None, metavar="REPORT", help="write the full report as JSON ('-' for stdout)")
    p.add_argument("-q", "--quiet", action="store_true", help="no progress bar and no summary")


def main(args) -> int:
    if args.target_cos is not None and args.format is not None:
        raise DitqError("--format and --target-cos exclude each other: --target-cos chooses each layer's format "
                        "among --candidates")
    report = convert_checkpoint(
        args.src,
        args.dst,
        format=args.format or "int8-row",
        preset=args.preset,
        include=args.include,
        exclude=args.exclude,
        keep_dtype=args.keep_dtype,
        min_elements=args.min_elements,
        max_outlier_ratio=args.max_outlier_ratio,
        keep_nonfinite=args.keep_nonfinite,
        device=args.device,
        shard_size=args.shard_size,
        rounding=args.rounding,
        rounding_options=_rounding_options(args),
        calibration=args.calibration,
        rotation=args.rotation,
        rotation_group=args.rotation_group,
        target_cos=args.target_cos,
        candidates=check_candidates(args.candidates),
        speed_table=args.speed_table,
        tokens=args.tokens,
        measure_error=not args.no_error,
        progress=not args.quiet,
    )
    if args.json:
        write_json(report.to_dict(), args.json)
    if not args.quiet:
        print(report.summary())
    else:
        for w in report.warnings:
            print(f"ditq convert: warning: {w}", file=sys.stderr)
    return 0


def _rounding_options(args) -> dict | None:
    """round_layer's options from the command line; None with --rounding nearest, where a learned-rounding
    flag changed from its default is an error rather than silently ignored."""
    opts = {"objective": args.objective, "optimizer": args.optimizer, "iters": args.iters,
            "rank_fraction": args.rank_fraction, "min_rank": args.min_rank, "max_rank": args.max_rank,
            "optimize_scale": not args.no_scale_search}
    if args.rounding == "learned":
        return opts
    defaults = {"objective": "auto", "optimizer": "original", "iters": None, "rank_fraction": 0.05, "min_rank": 8,
                "max_rank": 256, "optimize_scale": True}
    changed = [k for k in opts if opts[k] != defaults[k]]
    if changed:
        flags = ["--no-scale-search" if k == "optimize_scale" else "--" + k.replace("_", "-") for k in changed]
        raise DitqError(f"{', '.join(flags)} only apply with --rounding learned; add it or drop them")
    return None


def write_json(obj, path: str) -> None:
    text = json.dumps(obj, indent=2)
    if path == "-":
        print(text)
        return
    try:
        Path(path).write_text(text + "\n")
    except OSError as e:
        raise DitqError(f"cannot write report {path}: {e.strerror or e}") from None
