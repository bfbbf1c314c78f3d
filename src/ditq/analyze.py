"""`ditq analyze SRC`: which format suits which layer, at what error and size.

For every 2-D floating-point ``.weight`` of a checkpoint (streamed one at a time): shape, dtype, parameter
count, which of the five formats apply (block formats need both dims divisible by 128), outlier
statistics (amax / RMS of the whole tensor, of its worst row and of its worst 128x128 block; see
``checkpoint.policy.outlier_ratio``), the round-to-nearest relative error ||W_dq - W|| / ||W|| of each
applicable format, what the preset decides, and a recommended format. Totals give the size the
checkpoint would have under each ``--format`` (with the preset's kept layers) and under the
recommendations. Output: a terminal table, ``--json`` for machines, ``--plot`` PNG (needs matplotlib).

Recommendation rule: among the applicable formats, the first in ``SPEED_ORDER`` whose error is within
``TOLERANCE`` x the lowest error; "keep" when the preset keeps the layer or when even the lowest error
exceeds ``--max-error``.
"""

from __future__ import annotations

import sys
import time
from dataclasses import asdict, dataclass, field

import torch

from . import formats as F
from .checkpoint import layout as L
from .checkpoint.io import open_checkpoint, release_memory
from .checkpoint.policy import PRESETS, Policy, outlier_ratio
from .convert.convert import _num, _size, count_nonfinite, resolve_device, weight_error, write_json
from .errors import DitqError
from .kernels import ops
from .tensor import QuantizedTensor

# Eager GEMM speed on Hopper, fastest first (shared/TERRAIN.md: fp8 rowwise ~1.6x bf16, int8 with scales in
# the epilogue ~1.5x, block-scaled formats below 1x until their kernels improve).
SPEED_ORDER = ("fp8-row", "int8-row", "fp8-tensor", "int8-block", "fp8-block")
TOLERANCE = 1.25


@dataclass
class LayerAnalysis:
    key: str
    shape: list[int]
    dtype: str
    params: int
    bytes: int
    decision: str  # what the preset does with --format: quantize | keep
    reason: str
    errors: dict[str, float | None]  # None where the format does not apply
    outliers: dict[str, float]  # amax / RMS: tensor, worst row, worst block (when divisible)
    recommended: str


@dataclass
class AnalyzeReport:
    src: str
    preset: str
    format: str
    formats: list[str]
    layers: list[LayerAnalysis] = field(default_factory=list)
    other_bytes: int = 0  # tensors that are not 2-D float weights (kept by every policy)
    other_count: int = 0
    totals: dict = field(default_factory=dict)
    seconds: float = 0.0

    def to_dict(self) -> dict:
        return asdict(self)

    def table(self, top: int = 0) -> str:
        fmts = self.formats
        rows = self.layers
        if top:
            rows = sorted(rows, key=lambda r: -(r.errors.get(self.format) or 0.0))[:top]
        width = min(56, max([len(r.key) for r in rows] + [5]))
        head = (f"{'layer':<{width}} {'shape':>13} {'params':>8} {'outl.':>6} "
                + " ".join(f"{f:>10}" for f in fmts) + f"  {'recommended':<12}")
        lines = [f"ditq analyze: {self.src} (preset {self.preset}; error = relative L2 of the weight, "
                 f"outl. = worst row amax/RMS)", head, "-" * len(head)]
        for r in rows:
            key = r.key if len(r.key) <= width else "..." + r.key[-(width - 3):]
            errs = " ".join(f"{_pct(r.errors.get(f)):>10}" for f in fmts)
            lines.append(f"{key:<{width}} {'x'.join(map(str, r.shape)):>13} {_num(r.params):>8} "
                         f"{r.outliers.get('row', 0):>6.1f} {errs}  {r.recommended:<12}")
        if top and len(self.layers) > top:
            lines.append(f"({top} of {len(self.layers)} layers shown, highest {self.format} error first)")
        lines += ["", self.totals_table()]
        return "\n".join(lines)

    def totals_table(self) -> str:
        t = self.totals
        lines = [f"{'policy':<26} {'quantized':>9} {'kept':>6} {'size':>10} {'reduction':>9} {'mean err':>9} {'max err':>8}"]
        lines.append("-" * len(lines[0]))
        lines.append(f"{'original':<26} {'':>9} {'':>6} {_size(t['original_bytes']):>10} {'':>9} {'':>9} {'':>8}")
        for name, p in t["policies"].items():
            lines.append(
                f"{name:<26} {p['quantized']:>9} {p['kept']:>6} {_size(p['bytes']):>10} {p['reduction_pct']:>8.1f}% "
                f"{_pct(p['mean_error']):>9} {_pct(p['max_error']):>8}"
            )
        lines.append(f"({self.other_count} other tensors, {_size(self.other_bytes)}, are kept by every policy)")
        return "\n".join(lines)


def _pct(x) -> str:
    return "-" if x is None else f"{100 * x:.2f}%"


def _applies(fmt: F.Format, shape) -> bool:
    n, k = shape
    return not fmt.is_block or (n % F.BLOCK == 0 and k % F.BLOCK == 0)


def recommend(errors: dict[str, float | None], max_error: float) -> str:
    """The first format of SPEED_ORDER within TOLERANCE x the lowest error; 'keep' above max_error."""
    valid = {f: e for f, e in errors.items() if e is not None}
    if not valid:
        return "keep"
    best = min(valid.values())
    if best > max_error:
        return "keep"
    for f in SPEED_ORDER:
        if f in valid and valid[f] <= TOLERANCE * best + 1e-12:
            return f
    return min(valid, key=valid.get)


def analyze_checkpoint(src, *, formats=None, format: str = "int8-row", preset: str = "auto", include=(), exclude=(),
                       min_elements: int = 16384, max_error: float = 0.05, device="auto", progress: bool = False) -> AnalyzeReport:
    """Analyze every 2-D float weight of ``src`` (streamed one at a time); see the module docstring."""
    t0 = time.perf_counter()
    fmts = [F.get_format(f).name for f in (formats or F.FORMATS)]
    target = F.get_format(format).name
    dev = resolve_device(device)
    with open_checkpoint(src) as ckpt:
        layout = L.scan(ckpt)
        keys = [e.key for e in layout.entries]
        policies = {f: Policy(f, preset, keys, include, exclude, min_elements) for f in set(fmts) | {target}}
        pol = policies[target]
        rep = AnalyzeReport(str(src), pol.preset, target, fmts)
        candidates = []
        for e in layout.entries:
            if e.quantized and not e.partial_blocks:
                raise DitqError(f"{src} is already quantized ({e.key} is {e.fmt.name}); analyze the original checkpoint")
            dtype = torch.bfloat16 if e.partial_blocks else e.dtype
            if len(e.shape) == 2 and dtype.is_floating_point and dtype.itemsize > 1 and e.key.endswith(".weight"):
                candidates.append(e)
            else:
                rep.other_bytes += e.nbytes
                rep.other_count += 1
        bar = _bar(sum(e.nbytes for e in candidates), progress)
        dtype = L.default_dtype(layout)
        gen = ((e, L.load(ckpt, e, dtype)) for e in candidates)
        for e, w in L.prefetch(gen, 2):
            # float32 once: every format's quantizer and error would convert it again (exact for bf16/fp16)
            rep.layers.append(_analyze_one(e, w.to(dev, torch.float32), fmts, pol, max_error))
            del w
            release_memory()
            if bar is not None:
                bar.update(e.nbytes)
        if bar is not None:
            bar.close()
    rep.totals = _totals(rep, policies, keys, layout)
    rep.seconds = time.perf_counter() - t0
    return rep


def _analyze_one(e: L.Entry, w: torch.Tensor, fmts, pol: Policy, max_error: float) -> LayerAnalysis:
    n, k = e.shape
    errors: dict[str, float | None] = {}
    finite = count_nonfinite(w) == 0
    for f in fmts:
        fmt = F.get_format(f)
        if not _applies(fmt, e.shape) or not finite:
            errors[f] = None
            continue
        # round to nearest through the kernels; shape and finiteness were checked once above
        q, s = ops.quant_weight(w, fmt.name)
        errors[f] = weight_error(QuantizedTensor(q, s, fmt.name, w.dtype), w)
        del q, s
    outliers = {}
    if finite:
        outliers = {"tensor": outlier_ratio(w, "fp8-tensor"), "row": outlier_ratio(w, "int8-row")}
        if n % F.BLOCK == 0 and k % F.BLOCK == 0:
            outliers["block"] = outlier_ratio(w, "int8-block")
    d = pol.decide(e.key, e.shape, torch.bfloat16 if e.partial_blocks else e.dtype)
    rec = recommend(errors, max_error) if d.quantize else "keep"
    if not finite:
        rec, d.reason = "keep", "holds NaN/Inf"
    return LayerAnalysis(e.key, [n, k], str(e.dtype).replace("torch.", ""), n * k, e.nbytes,
                         d.action, d.reason, errors, outliers, rec)


def _totals(rep: AnalyzeReport, policies: dict[str, Policy], keys, layout) -> dict:
    original = sum(r.bytes for r in rep.layers) + rep.other_bytes
    out = {"original_bytes": original, "params": sum(r.params for r in rep.layers), "policies": {}}

    def summarize(choice):  # choice(layer) -> format name or None (kept)
        size, qbytes, errs, nq = rep.other_bytes, 0, [], 0
        for r in rep.layers:
            f = choice(r)
            if f is None:
                size += r.bytes
            else:
                qbytes += F.qdata_bytes(*r.shape, f)
                errs.append(r.errors[f])
                nq += 1
        size += qbytes
        return {"quantized": nq, "kept": len(rep.layers) - nq, "bytes": size, "quantized_bytes": qbytes,
                "reduction_pct": round(100 * (1 - size / original), 2) if original else 0.0,
                "mean_error": sum(errs) / len(errs) if errs else None, "max_error": max(errs) if errs else None}

    for f in rep.formats:
        pol = policies[f]

        def choice(r, f=f, pol=pol):
            return f if pol.decide(r.key, tuple(r.shape), torch.bfloat16).quantize and r.errors[f] is not None else None

        out["policies"][f"--format {f}"] = summarize(choice)
    out["policies"]["recommended per layer"] = summarize(lambda r: None if r.recommended == "keep" else r.recommended)
    return out


def _bar(total: int, enabled: bool):
    if not enabled or not sys.stderr.isatty():
        return None
    from tqdm import tqdm

    return tqdm(total=total, unit="B", unit_scale=True, desc="analyze", file=sys.stderr, dynamic_ncols=True)


def plot(rep: AnalyzeReport, path: str) -> None:
    """PNG: per-layer error of each format (top) and the size under each policy (bottom)."""
    try:
        import matplotlib
    except ImportError:
        raise DitqError("--plot needs matplotlib: pip install 'ditq[plot]' (or pip install matplotlib)") from None
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax1, ax2) = plt.subplots(2, 1, figsize=(12, 8), gridspec_kw={"height_ratios": [3, 2]})
    x = list(range(len(rep.layers)))
    for f in rep.formats:
        ys = [(i, 100 * r.errors[f]) for i, r in zip(x, rep.layers) if r.errors.get(f) is not None]
        if ys:
            ax1.plot([i for i, _ in ys], [y for _, y in ys], ".", label=f, markersize=4)
    kept = [i for i, r in zip(x, rep.layers) if r.decision != "quantize"]
    for i in kept:
        ax1.axvspan(i - 0.5, i + 0.5, color="0.9", lw=0)
    ax1.set_yscale("log")
    ax1.set_ylabel("relative weight error (%)")
    ax1.set_xlabel("layer (file order; grey: kept by the preset)")
    ax1.set_title(f"ditq analyze: {rep.src}")
    ax1.legend(ncol=len(rep.formats), fontsize=8, loc="best")
    pols = rep.totals["policies"]
    unit, div = ("GB", 1e9) if rep.totals["original_bytes"] >= 1e9 else ("MB", 1e6)
    names = ["original"] + list(pols)
    quant = [0.0] + [p["quantized_bytes"] / div for p in pols.values()]
    total = [rep.totals["original_bytes"] / div] + [p["bytes"] / div for p in pols.values()]
    ax2.barh(names, quant, color="tab:blue", label="8-bit weights")
    ax2.barh(names, [t - q for t, q in zip(total, quant)], left=quant, color="tab:gray", label="kept in high precision")
    ax2.set_xlabel(unit)
    ax2.invert_yaxis()
    ax2.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def add_arguments(p) -> None:
    p.add_argument("src", help="a checkpoint (file, sharded folder, index json, .bin/.pt/.ckpt)")
    p.add_argument("--format", default="int8-row", choices=list(F.FORMATS), help="the format --preset decisions refer to")
    p.add_argument("--formats", nargs="+", choices=list(F.FORMATS), default=None, help="formats to measure (default all)")
    p.add_argument("--preset", default="auto", choices=PRESETS)
    p.add_argument("--include", action="append", default=[], metavar="REGEX")
    p.add_argument("--exclude", action="append", default=[], metavar="REGEX")
    p.add_argument("--min-elements", type=int, default=16384, metavar="N")
    p.add_argument("--max-error", type=float, default=0.05, help="recommend keeping layers whose best error exceeds this")
    p.add_argument("--device", default="auto", help="auto (cuda if available), cpu, cuda, cuda:N")
    p.add_argument("--top", type=int, default=0, metavar="N", help="print only the N layers with the highest error")
    p.add_argument("--json", default=None, metavar="REPORT", help="write the report as JSON ('-' for stdout)")
    p.add_argument("--plot", default=None, metavar="PNG", help="write a PNG (needs matplotlib: pip install 'ditq[plot]')")
    p.add_argument("-q", "--quiet", action="store_true", help="no table")


def main(args) -> int:
    if args.plot:  # fail before the work, not after
        try:
            import matplotlib  # noqa: F401
        except ImportError:
            raise DitqError("--plot needs matplotlib: pip install 'ditq[plot]' (or pip install matplotlib)") from None
    rep = analyze_checkpoint(args.src, formats=args.formats, format=args.format, preset=args.preset,
                             include=args.include, exclude=args.exclude, min_elements=args.min_elements,
                             max_error=args.max_error, device=args.device, progress=not args.quiet)
    if args.json:
        write_json(rep.to_dict(), args.json)
    if args.plot:
        plot(rep, args.plot)
    if not args.quiet:
        print(rep.table(args.top))
        if args.plot:
            print(f"plot written to {args.plot}")
    return 0
