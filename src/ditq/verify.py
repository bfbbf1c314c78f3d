"""`ditq verify SRC DST`: check every key of a converted file against its source.

For each entry of DST (read in any layout ditq understands, see ``checkpoint.layout``):
- it must exist in SRC with the same shape;
- a quantized weight must be valid for its format (finite positive scales, int8 within [-127, 127], no
  NaN codes) and within the format's rounding bound of the source weight, element by element: at most
  ``ROUNDING_LIMIT[rounding]`` steps, where a step is the scale (int8) or the e4m3 spacing at that value
  (fp8). Round-to-nearest gives <= 0.5; a tool that truncates gives up to 1 and is reported as such;
  Learned rounding (GPTQ-style error feedback, searched scales) deliberately moves values several steps
  to lower the *output* error, so for a DST that records ``rounding: learned`` the bound is on the relative
  weight error instead: at most ``LEARNED_REL_FACTOR`` x that of round-to-nearest on the same source
  weight (a check against corruption or a wrong layer, not a proof of the rounding);
- a Hadamard-rotated int8 weight ("convrot") is dequantized to the original basis (q * scale, then H_g^T per
  group) and compared with the source there. The rotation mixes each group's errors, so a per-element step
  bound does not hold after rotating back; the bound is on the relative error instead: H_g is orthogonal,
  so a row's error norm is the same in both bases and at most ``limit x scale_row x sqrt(K)``, which gives
  ``rel <= limit x sqrt(K x sum_r scale_r^2) / ||W||`` (limit: the rounding's step bound, 0.5 for nearest);
- a tensor kept unquantized must equal the source tensor cast to its dtype, bit for bit, except a bias
  DST records as corrected by learned rounding (same shape and dtype, finite);
- the header's ``_quantization_metadata`` and the ``.comfy_quant`` tensors must agree.
Every SRC key must be in DST, unless DST's recorded preset drops it. Exit code 1 on any problem.
"""

from __future__ import annotations

import json
import time
from dataclasses import asdict, dataclass, field

import torch

from . import formats as F
from .checkpoint import layout as L
from .checkpoint.io import open_checkpoint, release_memory
from .checkpoint.policy import Policy
from .convert.convert import weight_error_stats, write_json
from .tensor import QuantizedTensor

# Largest error, in format steps, that each rounding may produce (a small margin absorbs float32 division).
ROUNDING_LIMIT = {"nearest": 0.5 + 1e-3, "learned": 1.0 + 1e-3, "unknown": 1.0 + 1e-3}
LEARNED_REL_FACTOR = 4.0
"""Learned rounding's relative weight error may reach this multiple of round-to-nearest's (measured: about
1.5-3x on layers with outlier inputs, where it lowers the output error by half)."""


@dataclass
class KeyCheck:
    key: str
    kind: str  # quantized format name, or "tensor"
    ok: bool
    detail: str = ""
    rel_error: float | None = None
    max_steps: float | None = None  # largest error in format steps


@dataclass
class VerifyReport:
    src: str
    dst: str
    checks: list[KeyCheck] = field(default_factory=list)
    problems: list[str] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    seconds: float = 0.0

    @property
    def ok(self) -> bool:
        return not self.problems and all(c.ok for c in self.checks)

    def to_dict(self) -> dict:
        return {**asdict(self), "ok": self.ok}

    def summary(self) -> str:
        lines = [f"ditq verify: {self.dst} against {self.src}"]
        kinds: dict[str, list[KeyCheck]] = {}
        for c in self.checks:
            kinds.setdefault(c.kind, []).append(c)
        lines.append(f"  {'kind':<12} {'keys':>6} {'failed':>7} {'rel. error mean':>16} {'max':>8} {'max steps':>10}")
        for kind, cs in sorted(kinds.items()):
            errs = [c.rel_error for c in cs if c.rel_error is not None]
            steps = [c.max_steps for c in cs if c.max_steps is not None]
            lines.append(
                f"  {kind:<12} {len(cs):>6} {sum(not c.ok for c in cs):>7} "
                f"{(f'{sum(errs) / len(errs):.3%}' if errs else '-'):>16} {(f'{max(errs):.3%}' if errs else '-'):>8} "
                f"{(f'{max(steps):.3f}' if steps else '-'):>10}"
            )
        failed = [c for c in self.checks if not c.ok]
        for c in failed[:20]:
            lines.append(f"  FAIL {c.key}: {c.detail}")
        if len(failed) > 20:
            lines.append(f"  ... and {len(failed) - 20} more failed keys")
        lines += [f"  problem: {p}" for p in self.problems]
        lines += [f"  note: {n}" for n in self.notes]
        verdict = "OK" if self.ok else "FAILED"
        lines.append(f"  {verdict}: {len(self.checks)} keys checked in {self.seconds:.1f} s")
        return "\n".join(lines)


def _bits_equal(a: torch.Tensor, b: torch.Tensor) -> bool:
    """Exact equality that treats identical NaNs as equal."""
    if a.dtype != b.dtype or a.shape != b.shape:
        return False
    if a.numel() == 0:
        return True
    if a.dtype.itemsize in (1, 2, 4, 8) and a.dtype != torch.bool:
        view = {1: torch.uint8, 2: torch.int16, 4: torch.int32, 8: torch.int64}[a.dtype.itemsize]
        return torch.equal(a.contiguous().view(view), b.contiguous().view(view))
    return torch.equal(a, b)


def _check_codes(qt: QuantizedTensor) -> str:
    """Problems with the stored codes and scales themselves, or ''."""
    fmt = F.get_format(qt.format)
    s = qt.scale
    if not bool(torch.isfinite(s).all()) or not bool((s > 0).all()):
        return "weight_scale holds zero, negative or non-finite values"
    if fmt.is_int and int(qt.qdata.min()) < -127:
        return "int8 codes hold -128 (the symmetric range is [-127, 127])"
    if not fmt.is_int and not bool(torch.isfinite(qt.qdata.float()).all()):
        return "fp8 codes hold NaN"
    return ""


def verify_checkpoint(src, dst, rounding: str | None = None) -> VerifyReport:
    """Check ``dst`` (a converted file or folder) against ``src`` (its source). ``rounding`` overrides
    the rounding DST records (nearest | learned | unknown), which sets the per-element bound."""
    t0 = time.perf_counter()
    report = VerifyReport(str(src), str(dst))
    with open_checkpoint(src) as sck, open_checkpoint(dst) as dck:
        slay, dlay = L.scan(sck), L.scan(dck)
        s_entries = {e.key: e for e in slay.entries}
        ditq = dlay.ditq
        rounding = rounding or ditq.get("rounding", "unknown" if not ditq else "nearest")
        limit = ROUNDING_LIMIT.get(rounding, ROUNDING_LIMIT["unknown"])
        if not ditq:
            report.notes.append("DST carries no ditq metadata (written by another tool): bound is 1 step per element")
        elif ditq.get("source_bytes") not in (None, sck.file_size):
            report.notes.append(
                f"DST records a source of {ditq.get('source_bytes')} bytes ({ditq.get('source')}); SRC has {sck.file_size}"
            )
        _check_metadata(dlay, report)

        dtype = L.default_dtype(dlay)
        corrected = set(ditq.get("corrected_biases", []))
        if corrected:
            report.notes.append(f"{len(corrected)} bias(es) corrected by learned rounding: checked for shape, dtype, "
                                f"finiteness only")
        for e in dlay.entries:
            se = s_entries.get(e.key)
            if se is None:
                report.checks.append(KeyCheck(e.key, e.fmt.name if e.quantized else "tensor", False, "not in SRC"))
                continue
            if tuple(se.shape) != tuple(e.shape):
                report.checks.append(KeyCheck(e.key, e.fmt.name if e.quantized else "tensor", False,
                                              f"shape {list(e.shape)} but SRC has {list(se.shape)}"))
                continue
            d_val = L.load(dck, e, dtype)
            s_val = L.load(sck, se, dtype)
            report.checks.append(_check_entry(e, d_val, s_val, limit, rounding == "learned", e.key in corrected))
            del d_val, s_val
            release_memory()

        missing = [k for k in s_entries if k not in {e.key for e in dlay.entries}]
        if missing:
            dropped = _dropped_by_preset(ditq, missing, s_entries)
            rest = [k for k in missing if k not in dropped]
            if dropped:
                report.notes.append(f"{len(dropped)} SRC keys dropped by preset {ditq.get('preset')} (e.g. {dropped[0]!r})")
            if rest:
                report.problems.append(f"{len(rest)} SRC keys missing from DST, e.g. {rest[:3]}")
    report.seconds = time.perf_counter() - t0
    return report


def _nearest_rel_error(w: torch.Tensor, fmt: F.Format) -> float:
    """Round-to-nearest's relative weight error for w [N, K] (row chunks of whole 128-row blocks; per-tensor
    formats at once, their scale is global)."""
    if fmt.weight_granularity == "tensor":
        q, s = F.quantize_weight_ref(w, fmt)
        return F.relative_error(F.dequantize_ref(q, s, fmt, torch.float32).double(), w.double())
    step = max(F.BLOCK, (1 << 20) // max(1, w.shape[1]) // F.BLOCK * F.BLOCK)
    num = den = 0.0
    for i in range(0, w.shape[0], step):
        ref = w[i:i + step]
        q, s = F.quantize_weight_ref(ref, fmt)
        num += float((F.dequantize_ref(q, s, fmt, torch.float32).double() - ref.double()).square().sum())
        den += float(ref.double().square().sum())
    return (num / den) ** 0.5 if den > 0 else 0.0


def _check_entry(e: L.Entry, d_val, s_val, limit: float, learned: bool = False, corrected: bool = False) -> KeyCheck:
    if isinstance(d_val, QuantizedTensor):
        bad = _check_codes(d_val)
        if bad:
            return KeyCheck(e.key, d_val.format, False, bad)
        if isinstance(s_val, QuantizedTensor):  # copied from an already quantized source
            same = (s_val.format == d_val.format and s_val.rotation == d_val.rotation and _bits_equal(s_val.qdata, d_val.qdata)
                    and _bits_equal(s_val.scale.float(), d_val.scale.float()))
            return KeyCheck(e.key, d_val.format, same, "" if same else "differs from the quantized SRC layer",
                            0.0 if same else None, 0.0 if same else None)
        if not s_val.is_floating_point():
            return KeyCheck(e.key, d_val.format, False, f"SRC tensor has dtype {s_val.dtype}")
        if d_val.rotation:
            return _check_rotated(e, d_val, s_val, limit)
        rel, steps = weight_error_stats(d_val, s_val)
        if learned:
            bound = LEARNED_REL_FACTOR * _nearest_rel_error(s_val, F.get_format(d_val.format)) + 1e-6
            ok = rel <= bound
            detail = "" if ok else (f"relative error {rel:.3%} exceeds {LEARNED_REL_FACTOR:g}x round-to-nearest's "
                                    f"({bound:.3%}): not this weight's learned rounding")
            return KeyCheck(e.key, d_val.format, ok, detail, rel, steps)
        ok = steps <= limit
        detail = "" if ok else f"error reaches {steps:.3f} steps of the format (bound {limit:.3f}): not this weight's rounding"
        return KeyCheck(e.key, d_val.format, ok, detail, rel, steps)
    kind = "tensor" if not e.partial_blocks else f"{e.fmt.name}*"
    if isinstance(s_val, QuantizedTensor):
        s_val = s_val.dequantize()
    if e.partial_blocks:  # loaded dequantized: compare errors only
        rel = F.relative_error(d_val.float(), s_val.float())
        return KeyCheck(e.key, kind, rel < 0.1, "" if rel < 0.1 else f"relative error {rel:.2%}", rel)
    if corrected and d_val.shape == s_val.shape and d_val.is_floating_point():
        ok = bool(torch.isfinite(d_val).all())
        return KeyCheck(e.key, kind, ok, "bias corrected by learned rounding" if ok else "corrected bias is not finite")
    same = _bits_equal(s_val.to(d_val.dtype), d_val)
    detail = "" if same else f"differs from SRC ({s_val.dtype} -> {d_val.dtype})"
    return KeyCheck(e.key, kind, same, detail)


def _check_rotated(e: L.Entry, d_val: QuantizedTensor, s_val: torch.Tensor, limit: float) -> KeyCheck:
    """A rotated int8-row weight against its source, in the original basis, by relative error (see the
    module docstring for the bound)."""
    w = s_val.double()
    deq = d_val.dequantize(torch.float32).double()  # q * scale, then H_g^T per group (FORMATS.md)
    num, den = float((deq - w).square().sum()), float(w.square().sum())
    rel = (num / den) ** 0.5 if den > 0 else (0.0 if num == 0 else float("inf"))
    s = d_val.scale.double().reshape(-1).expand(w.shape[0])
    bound = limit * float((s.square().sum() * w.shape[1]).sqrt()) / den ** 0.5 if den > 0 else 0.0
    bound = bound * (1 + 1e-4) + 1e-7  # float32 dequantization and rotation
    ok = rel <= bound
    detail = "" if ok else (f"rotated (hadamard-{d_val.rotation}): relative error {rel:.3%} after rotating back "
                            f"exceeds the bound {bound:.3%} of its scales")
    return KeyCheck(e.key, f"{d_val.format}+h{d_val.rotation}", ok, detail, rel, None)


def _check_metadata(dlay: L.Layout, report: VerifyReport) -> None:
    h, t = dlay.header_layers, dlay.tensor_layers
    if h and t:
        diff = sorted(k for k in set(h) | set(t) if h.get(k) != t.get(k))
        if diff:
            k = diff[0]
            report.problems.append(
                f"_quantization_metadata and .comfy_quant disagree for {len(diff)} layer(s), e.g. {k!r}: "
                f"{json.dumps(h.get(k))} vs {json.dumps(t.get(k))}"
            )
    elif t and not h:
        report.notes.append("DST has .comfy_quant tensors but no _quantization_metadata header (ComfyUI accepts this)")
    elif h and not t:
        report.notes.append("DST has _quantization_metadata but no .comfy_quant tensors (ComfyUI rebuilds them)")


def _dropped_by_preset(ditq: dict, keys: list[str], entries) -> list[str]:
    if not ditq.get("preset"):
        return []
    pol = Policy(ditq.get("format", "int8-row"), ditq["preset"], min_elements=0)
    return [k for k in keys if pol.decide(k, tuple(entries[k].shape), entries[k].dtype).action == "drop"]


def add_arguments(p) -> None:
    p.add_argument("src", help="the source checkpoint (file, sharded folder or index json)")
    p.add_argument("dst", help="the converted checkpoint")
    p.add_argument("--rounding", choices=sorted(ROUNDING_LIMIT), default=None,
                   help="rounding bound to check (default: what DST records; 'unknown' allows 1 step)")
    p.add_argument("--json", default=None, metavar="REPORT", help="write the report as JSON ('-' for stdout)")
    p.add_argument("-q", "--quiet", action="store_true", help="print only failures")


def main(args) -> int:
    report = verify_checkpoint(args.src, args.dst, args.rounding)
    if args.json:
        write_json(report.to_dict(), args.json)
    if not args.quiet or not report.ok:
        print(report.summary())
    return 0 if report.ok else 1
