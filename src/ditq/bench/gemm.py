"""`ditq bench gemm`: ditq's quantized linear (activation quantization + GEMM + bias, bf16 in and out) against
cuBLAS bf16, ``torch._int_mm`` and ``torch._scaled_mm`` (fp8 rowwise) at diffusion-transformer shapes, in one
process; for the block formats also the fused kernel (``kernels.fused``: activation quantization inside the GEMM,
column "<format> fused"). Checks correctness first (every format, every shape, against the torch reference), then times with
``triton.testing.do_bench`` medians, prints ratios vs bf16 with geometric means, and writes JSON.

Timing of the shape table: every variant of a shape (bf16 included) once per round, ``--rounds`` rounds; each
timing starts after ``--settle-ms`` of the same call (``settle``: at the power limit the GPU's clock lags the
load of the last tenths of a second); a ratio is the median of the per-round ratios (``_round_ratios``).

``--tune`` first searches the candidate GEMM configurations per (format, shape) and writes the winners to
``--configs-out`` (ship them as ``ditq/kernels/gemm_configs.json``); timing then uses them.
"""

from __future__ import annotations

import contextlib
import json
import math
import platform
import statistics
import sys
import time

import torch

from .. import formats as F
from .timing import captured

SHAPES = (
    [("flux", 4608, n, k) for n, k in ((3072, 3072), (12288, 3072), (3072, 12288), (3072, 15360))]
    + [("wan14b", 32760, n, k) for n, k in ((5120, 5120), (13824, 5120), (5120, 13824))]
    + [("k5-pro", 16384, n, k) for n, k in ((4096, 4096), (16384, 4096), (4096, 16384))]
    + [("k5-lite", 8192, n, k) for n, k in ((1792, 1792), (7168, 1792), (1792, 7168))]
    + [("flux", m, n, k) for m in (1024, 256) for n, k in ((3072, 3072), (12288, 3072), (3072, 12288), (3072, 15360))]
)
QUICK = [("flux", 4608, 3072, 3072), ("flux", 4608, 3072, 12288), ("flux", 1024, 3072, 3072)]
FMTS = tuple(F.FORMATS)
TUNED_FMTS = ("int8-row", "fp8-row", "int8-block", "fp8-block")  # fp8-tensor shares fp8-row's kernel shape
BOUND = {True: 0.025, False: 0.06}  # issue 2: relative error of linear vs float math, int8 / fp8


def candidates(fmt: str, m: int):
    """The configurations ``--tune`` tries (bench/NOTES.md says which won where, and why these)."""
    from ..kernels.gemm import Config as C

    f = F.get_format(fmt)
    if f.is_block:
        cs = [
            C(128, 128, 128, 8, 8, 3, tma=False, dot2=True),
            C(128, 128, 128, 8, 8, 3, tma=True, dot2=True),
            C(64, 128, 128, 8, 4, 4, tma=True),
            C(64, 128, 128, 8, 4, 3, tma=True),
            C(64, 128, 128, 8, 4, 2, tma=True),
            C(64, 128, 128, 8, 4, 4, tma=False),
            C(128, 128, 128, 8, 8, 2, tma=True, maxnreg=128),
        ]
        if f.is_int:
            cs.append(C(64, 128, 128, 8, 4, 3, tma=True, magic_i2f=True))
        return cs
    cs = [
        C(128, 256, 128, 8, 8, 3),
        C(128, 256, 128, 8, 8, 4),
        C(256, 128, 128, 8, 8, 3),
        C(128, 128, 128, 8, 4, 4),
        C(128, 128, 128, 8, 8, 4),
        C(64, 128, 128, 8, 4, 4),
        C(128, 256, 128, 8, 8, 3, persistent=True),
        C(256, 128, 128, 8, 8, 3, persistent=True),
        C(128, 128, 128, 8, 4, 4, persistent=True),
        C(128, 256, 128, 8, 8, 4, tail_split=4),
        C(128, 256, 128, 8, 8, 3, tail_split=4),
        C(256, 128, 128, 8, 8, 3, tail_split=4),
    ]
    if m <= 1024:
        cs += [C(64, 64, 128, 8, 4, 4), C(64, 128, 128, 8, 4, 3), C(64, 128, 128, 8, 4, 3, tail_split=4)]
    return cs


def add_arguments(p) -> None:
    p.add_argument("--json", metavar="PATH", help="write all numbers to this JSON file")
    p.add_argument("--quick", action="store_true", help="three shapes only (smoke test)")
    p.add_argument("--tune", action="store_true", help="search GEMM configs per (format, shape) before timing")
    p.add_argument("--configs-out", metavar="PATH", help="with --tune: write the winners here")
    p.add_argument("--formats", default=",".join(FMTS), help="comma-separated formats (default: all five)")
    p.add_argument("--rep", type=int, default=30, help="do_bench rep in ms per timing and round (default 30; at least "
                   "8 calls)")
    p.add_argument("--rounds", type=int, default=2, help="interleaved timing rounds per shape; ratios are medians "
                   "of the per-round ratios (default 2)")
    p.add_argument("--settle-ms", type=float, default=200.0, help="run each call back to back this long before "
                   "timing it, so its clock is its own steady state (default 200; 0: off)")
    p.add_argument("--no-shapes", action="store_true", help="skip the GEMM shape table (host/small-M/compile only)")
    p.add_argument("--wo-sweep", action="store_true", help="also sweep the weight-only kernel's configurations")
    p.add_argument("--no-compile", action="store_true", help="skip the torch.compile measurements")


def _geomean(v):
    v = [x for x in v if x and x > 0]
    return math.exp(sum(map(math.log, v)) / len(v)) if v else float("nan")


def _graph_ms(fn, bench) -> float:
    """Time of ``fn`` replayed from a CUDA graph: the GPU time with the host's launch cost taken out."""
    with captured(fn) as g:
        return bench(g.replay)


def settle(fn, est_ms: float, settle_ms: float) -> None:
    """Run ``fn`` back to back for about ``settle_ms`` before it is timed. At the 700 W limit an H200's clock
    depends on the power of what ran in the last tenths of a second (measured: the int8-row linear at
    16384x4096x4096 took 499 us after 0.3 s idle or of itself, 612 us after 0.3 s of cuBLAS bf16 and 615 us
    after cuBLAS fp8; bench/NOTES.md, GEMM round 5), so without this a timing inherits the previous variant's
    clock. Each variant is timed in its own steady state, as in a model that runs it layer after layer."""
    if settle_ms <= 0:
        return
    for _ in range(max(1, int(settle_ms / max(est_ms, 1e-3)))):
        fn()
    torch.cuda.synchronize()


def timed(fn, rep_ms: float, settle_ms: float = 0.0, min_calls: int = 8) -> float:
    """``do_bench`` median (ms) of ``fn`` over at least ``rep_ms`` and ``min_calls`` calls (large shapes), after
    ``settle_ms`` of the same call (``settle``)."""
    from triton.testing import do_bench

    est = do_bench(fn, warmup=2, rep=2, return_mode="median")
    settle(fn, est, settle_ms)
    return do_bench(fn, warmup=max(5, int(rep_ms) // 4), rep=max(rep_ms, min_calls * est), return_mode="median")


def _interleaved(fns: dict, bench, rounds: int) -> dict:
    """{name: [time per round]}: each round times every function once, in order. The GPU's clocks drift with
    its power and temperature over seconds (bench/NOTES.md, round 5), so a baseline timed once, before its
    variants, biases their ratios; in rounds both sides of a ratio see the same drift."""
    out = {v: [] for v in fns}
    for _ in range(rounds):
        for v, fn in fns.items():
            out[v].append(bench(fn))
    return out


def _round_ratios(times: dict) -> dict:
    """{name: median over rounds of (bf16 time / this time) in the same round}."""
    base = times["bf16"]
    return {v: statistics.median(b / t for b, t in zip(base, ts)) for v, ts in times.items()}


def _copy_bandwidth(bench) -> float:
    """Device-to-device copy bandwidth in GB/s, counting bytes read plus bytes written."""
    a = torch.empty(1 << 30, dtype=torch.uint8, device="cuda")
    b = torch.empty_like(a)
    a.random_()
    ms = bench(lambda: b.copy_(a))
    del a, b
    return 2 * (1 << 30) / ms / 1e6


def _per_call_us(fn, n=2000) -> float:
    """Host time per call (us) of a loop of ``fn`` with one synchronize at the end (GPU work negligible)."""
    for _ in range(50):
        fn()
    torch.cuda.synchronize()
    t = time.perf_counter()
    for _ in range(n):
        fn()
    torch.cuda.synchronize()
    return (time.perf_counter() - t) / n * 1e6


def _eager_overhead(ops, fmts) -> dict:
    """Host time per call (us) of small linears (M=16, N=K=1024), where the GPU work is negligible: the
    default path (weight-only below the threshold), the W8A8 path (act quant + GEMM), the W8A8 path through
    Triton's launcher (``DITQ_RAW_LAUNCH=0``, the state before the launch plans), and the custom op."""
    from ..kernels import configs as CF
    from ..kernels import quant as Q

    res = {}
    x = torch.randn(16, 1024, device="cuda", dtype=torch.bfloat16)
    w = torch.randn(1024, 1024, device="cuda", dtype=torch.bfloat16)
    b = torch.randn(1024, device="cuda", dtype=torch.bfloat16)
    res["bf16 F.linear"] = _per_call_us(lambda: torch.nn.functional.linear(x, w, b))
    wqs = {fmt: ops.quant_weight(w.float(), fmt) for fmt in fmts}
    limit = dict(CF.WEIGHT_ONLY_MAX_M)
    for fmt, (wq, ws) in wqs.items():
        res[f"ditq {fmt}"] = _per_call_us(lambda: ops.linear(x, wq, ws, fmt, b))
        res[f"custom op {fmt}"] = _per_call_us(lambda: torch.ops.ditq.linear(x, wq, ws, fmt, b, torch.bfloat16))
    try:
        CF.WEIGHT_ONLY_MAX_M.update(int8=0, fp8=0)
        ops.clear_plans()
        for fmt, (wq, ws) in wqs.items():
            res[f"ditq W8A8 {fmt}"] = _per_call_us(lambda: ops.linear(x, wq, ws, fmt, b))
        Q.RAW_LAUNCH = False
        ops.clear_plans()
        for fmt in ("int8-row", "int8-block"):
            if fmt in wqs:
                wq, ws = wqs[fmt]
                res[f"ditq W8A8 triton launcher {fmt}"] = _per_call_us(lambda: ops.linear(x, wq, ws, fmt, b), 500)
    finally:
        CF.WEIGHT_ONLY_MAX_M.update(limit)
        Q.RAW_LAUNCH = True
        ops.clear_plans()
    res["torch.empty"] = _per_call_us(lambda: torch.empty(16, 1024, dtype=torch.bfloat16, device="cuda"))
    import cProfile
    import io
    import pstats

    prof = cProfile.Profile()
    wq, ws = wqs[fmts[0]]
    prof.enable()
    for _ in range(500):
        ops.linear(x, wq, ws, fmts[0], b)
    prof.disable()
    out = io.StringIO()
    pstats.Stats(prof, stream=out).sort_stats("tottime").print_stats(10)
    print("\n".join(out.getvalue().splitlines()[:30]))
    return res


SMALL_M_SHAPES = [(3072, 3072), (18432, 3072), (12288, 3072), (3072, 12288)]  # Flux: qkv/out, adaLN, ff1, ff2
SMALL_MS = (1, 4, 16, 32, 64, 128, 256)


def _small_m(ops, bench, fmts, sweep: bool) -> list:
    """Few-row linears (e.g. the adaLN modulation of a DiT: one row per sample): bf16 F.linear vs ditq's
    weight-only kernel vs its W8A8 path, at Flux widths; with ``sweep`` also the weight-only configurations.
    Checks the weight-only result against the float64 product of x and the dequantized weight first."""
    from ..kernels import configs as CF
    from ..kernels import gemm as G

    rows = []
    for n, k in SMALL_M_SHAPES:
        w = torch.randn(n, k, device="cuda") * 0.02
        bias = torch.randn(n, device="cuda", dtype=torch.bfloat16)
        wqs = {fmt: ops.quant_weight(w, fmt) for fmt in fmts}
        for m in SMALL_MS:
            x = torch.randn(m, k, device="cuda", dtype=torch.bfloat16)
            wb = w.bfloat16()
            row = {"M": m, "N": n, "K": k, "us": {"bf16": bench(lambda: torch.nn.functional.linear(x, wb, bias)) * 1e3},
                   "err": {}, "weight_GBps": {}}  # fmt: skip
            for fmt, (wq, ws) in wqs.items():
                if m <= 128:
                    y = G.weight_only_linear(x, wq, ws, fmt, bias)
                    ref = x.double() @ F.dequantize_ref(wq, ws, fmt, torch.float64).t() + bias.double()
                    row["err"][fmt] = e = F.relative_error(y, ref)
                    if not e < 6e-3:
                        print(f"FAIL weight-only {fmt} {m}x{n}x{k}: rel err {e:.2e}")
                        row["fail"] = True
                    t = bench(lambda: G.weight_only_linear(x, wq, ws, fmt, bias)) * 1e3
                    row["us"][f"wo {fmt}"] = t
                    row["weight_GBps"][fmt] = n * k / t / 1e3
                    row.setdefault("wo_config", {})[fmt] = CF.weight_only_config(fmt, m, n, k).as_list()
                    if sweep and fmt in ("int8-row", "fp8-block") and m in (1, 16, 64):
                        for c in _wo_candidates(fmt, m):
                            try:
                                tc = bench(lambda: G.weight_only_linear(x, wq, ws, fmt, bias, config=c), rep=20) * 1e3
                            except Exception as ex:  # a config that does not compile or fit: said, skipped
                                print(f"  wo {fmt} {c.as_list()}: {type(ex).__name__}: {str(ex)[:100]}")
                                continue
                            row.setdefault("wo_sweep", {}).setdefault(fmt, []).append([c.as_list(), round(tc, 2)])
                xq, xs = ops.act_quant(x, fmt)
                row["us"][f"w8a8 {fmt}"] = (bench(lambda: ops.act_quant(x, fmt)) + bench(
                    lambda: G.scaled_mm(xq, xs, wq, ws, fmt, bias, torch.bfloat16))) * 1e3  # fmt: skip
            rows.append(row)
            u = row["us"]
            print(f"small M {m:4d} {n:6d}x{k:<6d} bf16 {u['bf16']:7.1f} us | "
                  + " ".join(f"{kk}={u['bf16'] / v:.2f}x" for kk, v in u.items() if kk != "bf16")
                  + " | weight GB/s " + " ".join(f"{f_}={v:.0f}" for f_, v in row["weight_GBps"].items()), flush=True)  # fmt: skip
            if "wo_sweep" in row:
                for f_, lst in row["wo_sweep"].items():
                    best = min(lst, key=lambda r: r[1])
                    print(f"    sweep {f_}: default {row['us'][f'wo {f_}']:.1f} us, best {best[1]:.1f} us {best[0]}")
    return rows


def _wo_candidates(fmt: str, m: int):
    from ..kernels.gemm import Config as C

    bm = max(16, 1 << (max(m, 1) - 1).bit_length())
    cs = [C(bm, 32, 256, 1, 4, 4, split_k=s) for s in (1, 2, 4, 8)]
    cs += [C(bm, 32, 128, 1, 4, 6, split_k=4), C(bm, 16, 256, 1, 4, 4, split_k=4), C(bm, 64, 256, 1, 4, 3, split_k=4),
           C(bm, 32, 512, 1, 4, 3, split_k=2)]  # fmt: skip
    return cs


def _compile_modes(ops, bench, fmts) -> dict:
    """A stack of four quantized linears (Flux widths, GELU between) eager vs torch.compile modes, against the
    same stack in bf16: per-forward time (do_bench median; host and GPU both count) and the first call."""
    res = {}
    dims = [(3072, 12288), (12288, 3072), (3072, 3072), (3072, 3072)]
    ws = [torch.randn(n, k, device="cuda") * 0.02 for k, n in dims]
    bs = [torch.randn(n, device="cuda", dtype=torch.bfloat16) * 0.1 for _, n in dims]

    def bf16_stack(x, wb=[w.bfloat16() for w in ws]):
        for w, b in zip(wb, bs):
            x = torch.nn.functional.gelu(torch.nn.functional.linear(x, w, b))
        return x

    def ditq_stack(fmt, qs):
        def f(x):
            for (wq, s), b in zip(qs, bs):
                x = torch.nn.functional.gelu(ops.linear(x, wq, s, fmt, b))
            return x

        return f

    for m in (16, 4608):
        x = torch.randn(m, 3072, device="cuda", dtype=torch.bfloat16)
        variants = [("bf16", "eager", bf16_stack), ("bf16", "default", bf16_stack), ("bf16", "reduce-overhead", bf16_stack)]
        for fmt in fmts:
            fn = ditq_stack(fmt, [ops.quant_weight(w, fmt) for w in ws])
            variants += [(fmt, "eager", fn), (fmt, "max-autotune-no-cudagraphs", fn), (fmt, "reduce-overhead", fn)]
        ref = bf16_stack(x).float()
        for name, mode, fn in variants:
            key = f"M={m} {name} {mode}"
            try:
                torch._dynamo.reset()
                f = fn if mode == "eager" else torch.compile(fn, mode=mode, dynamic=False, fullgraph=True)
                t0 = time.perf_counter()
                y = f(x)
                torch.cuda.synchronize()
                first = time.perf_counter() - t0
                for _ in range(3):
                    y = f(x)
                ms = bench(lambda: f(x))
                res[key] = {"ms": ms, "first_call_s": first, "cos_vs_bf16": float(
                    torch.nn.functional.cosine_similarity(y.float().flatten(), ref.flatten(), dim=0))}  # fmt: skip
            except Exception as e:  # reported, not fatal
                res[key] = f"{type(e).__name__}: {str(e)[:300]}"
            print(f"  compile {key}: {res[key]}", flush=True)
    torch._dynamo.reset()
    return res


def main(args) -> int:
    if not torch.cuda.is_available():
        print("ditq bench gemm: needs a CUDA GPU", file=sys.stderr)
        return 2
    import triton

    from ..kernels import configs as CF
    from ..kernels import fused as FU
    from ..kernels import gemm as G
    from ..kernels import ops
    from ..kernels import quant as Q

    fmts = [f.strip() for f in args.formats.split(",") if f.strip()]
    shapes = [] if args.no_shapes else (QUICK if args.quick else SHAPES)
    gpu = torch.cuda.get_device_name()
    print(f"# {gpu}  torch {torch.__version__}  triton {triton.__version__}  python {platform.python_version()}")

    def bench_short(fn, rep=args.rep):  # small problems (small-M tables, host overhead): no settling
        return timed(fn, rep)

    def bench(fn, rep=args.rep):  # the shape tables: each timing starts in the steady state of its own call
        return timed(fn, rep, args.settle_ms)

    torch.manual_seed(0)
    report = {"gpu": gpu, "torch": torch.__version__, "triton": triton.__version__,
              "command": "ditq bench gemm " + " ".join(sys.argv[3:] if sys.argv[1:3] == ["bench", "gemm"] else sys.argv[1:]),
              "date": time.strftime("%Y-%m-%d %H:%M"), "shapes": [], "act_quant": [], "checks": []}  # fmt: skip
    report["copy_GBps"] = copy_bw = _copy_bandwidth(bench_short)
    print(f"# device-to-device copy: {copy_bw:.0f} GB/s (read + write)")

    tuned: dict[str, list] = {}
    failures = 0
    for tag, m, n, k in shapes:
        x = torch.randn(m, k, device="cuda", dtype=torch.bfloat16)
        w = torch.randn(n, k, device="cuda", dtype=torch.bfloat16) * 0.02
        bias = torch.randn(n, device="cuda", dtype=torch.bfloat16) * 0.1
        ref_bf16 = torch.nn.functional.linear(x, w, bias)
        row = {"model": tag, "M": m, "N": n, "K": k, "ms": {}, "gemm_ms": {}, "err": {}}
        flops = 2.0 * m * n * k
        # ---- correctness (and tuning) first
        wqs = {}
        for fmt in fmts:
            f = F.get_format(fmt)
            wq, ws = ops.quant_weight(w, fmt)
            wq_ref, ws_ref = F.quantize_weight_ref(w, fmt)
            if not (torch.equal(ws, ws_ref) and torch.equal(wq.view(torch.int8), wq_ref.view(torch.int8))):
                print(f"FAIL weight quant {fmt} {m}x{n}x{k}")
                failures += 1
            wqs[fmt] = (wq, ws)
            xq, xs = ops.act_quant(x, fmt)
            if args.tune and fmt in TUNED_FMTS:
                best = None
                for c in candidates(fmt, m):
                    try:
                        # the whole linear: a GEMM's rank alone differs from its rank after the act quant (NOTES, round 5)
                        t = bench(lambda: G.scaled_mm(*Q.act_quant(x, fmt), wq, ws, fmt, bias, torch.bfloat16, config=c),
                                  rep=25)  # fmt: skip
                    except Exception as e:  # a config that does not compile or fit is skipped, and said so
                        print(f"  tune {fmt} {m}x{n}x{k} {c.as_list()}: {type(e).__name__}: {str(e)[:120]}")
                        continue
                    row.setdefault("tune", {}).setdefault(fmt, []).append([c.as_list(), round(t, 5)])
                    if best is None or t < best[0]:
                        best = (t, c)
                if best:
                    tuned[CF.key(fmt, m, n, k)] = best[1].as_list()
                    if fmt == "fp8-row":
                        tuned[CF.key("fp8-tensor", m, n, k)] = best[1].as_list()
            if args.tune:
                CF.tuned.cache_clear()
                CF.get_config.cache_clear()
                CF.tuned().update({kk: G.Config.from_list(v) for kk, v in tuned.items()})
            y = ops.linear(x, wq, ws, fmt, bias)
            y_ref = F.linear_ref(x, wq, ws, fmt, bias, torch.float32)
            e_kernel = F.relative_error(y, y_ref)
            e_true = F.relative_error(y, ref_bf16)
            qdiff = (xq.float() - F.quantize_activation_ref(x, fmt)[0].float()).abs()
            ok = e_kernel < 1e-2 and e_true < BOUND[f.is_int] and math.isfinite(e_kernel)
            row["err"][fmt] = {"vs_reference": e_kernel, "vs_bf16": e_true, "act_q_mismatch": float((qdiff > 0).float().mean())}
            if not ok:
                failures += 1
                print(f"FAIL {fmt} {m}x{n}x{k}: rel err vs reference {e_kernel:.2e}, vs bf16 {e_true:.2e}")
            if f.is_block:  # the fused kernel (act quant inside the GEMM): same reference, same bound
                e_fused = F.relative_error(FU.fused_linear(x, wq, ws, fmt, bias), y_ref)
                row["err"][f"{fmt} fused"] = {"vs_reference": e_fused}
                if not e_fused < 1e-2:
                    failures += 1
                    print(f"FAIL {fmt} fused {m}x{n}x{k}: rel err vs reference {e_fused:.2e}")
            del y_ref
        # ---- timing: interleaved rounds (every variant of the shape once per round, bf16 first)
        fns = {"bf16": lambda: torch.nn.functional.linear(x, w, bias)}
        xi8, _ = ops.act_quant(x, "int8-row")
        wi8 = wqs.get("int8-row", ops.quant_weight(w, "int8-row"))[0]
        try:
            torch._int_mm(xi8, wi8.t())
            fns["torch._int_mm"] = lambda: torch._int_mm(xi8, wi8.t())
        except RuntimeError as e:
            print(f"  torch._int_mm {m}x{n}x{k}: {e}")
        xf8, xs8 = ops.act_quant(x, "fp8-row")
        wf8, ws8 = wqs.get("fp8-row", ops.quant_weight(w, "fp8-row"))
        wsT = ws8.reshape(1, n)
        try:
            torch._scaled_mm(xf8, wf8.t(), scale_a=xs8, scale_b=wsT, bias=bias, out_dtype=torch.bfloat16)
            fns["torch._scaled_mm"] = lambda: torch._scaled_mm(xf8, wf8.t(), scale_a=xs8, scale_b=wsT, bias=bias,
                                                               out_dtype=torch.bfloat16)  # fmt: skip
        except RuntimeError as e:
            print(f"  torch._scaled_mm {m}x{n}x{k}: {e}")
        gemm_fns, graph_fns = {}, {"bf16": fns["bf16"]}
        for fmt in fmts:
            wq, ws = wqs[fmt]
            fns[fmt] = graph_fns[fmt] = lambda wq=wq, ws=ws, fmt=fmt: ops.linear(x, wq, ws, fmt, bias)
            if F.get_format(fmt).is_block:
                fns[f"{fmt} fused"] = lambda wq=wq, ws=ws, fmt=fmt: FU.fused_linear(x, wq, ws, fmt, bias)
            xq, xs = ops.act_quant(x, fmt)
            gemm_fns[fmt] = (lambda xq=xq, xs=xs, wq=wq, ws=ws, fmt=fmt:
                             ops.scaled_mm(xq, xs, wq, ws, fmt, bias, torch.bfloat16))  # fmt: skip
            row.setdefault("config", {})[fmt] = CF.get_config(fmt, m, n, k).as_list()
        row["rounds"] = _interleaved(fns, bench, args.rounds)
        row["rounds_gemm"] = _interleaved({"bf16": fns["bf16"], **gemm_fns}, bench, args.rounds)
        with contextlib.ExitStack() as stack:  # every graph captured first, then replayed in rounds
            graphs = {v: stack.enter_context(captured(fn)).replay for v, fn in graph_fns.items()}
            row["rounds_graph"] = _interleaved(graphs, bench, args.rounds)
        row["ms"] = {v: statistics.median(t) for v, t in row["rounds"].items()}
        row["gemm_ms"] = {v: statistics.median(t) for v, t in row["rounds_gemm"].items() if v != "bf16"}
        row["graph_ms"] = {v: statistics.median(t) for v, t in row["rounds_graph"].items()}
        row["bf16_TFLOPs"] = flops / row["ms"]["bf16"] / 1e9
        row["bf16_spread"] = max(row["rounds"]["bf16"]) / min(row["rounds"]["bf16"]) - 1
        row["ratio"] = _round_ratios(row["rounds"])
        row["gemm_ratio"] = {v: r for v, r in _round_ratios(row["rounds_gemm"]).items() if v != "bf16"}
        row["graph_ratio"] = _round_ratios(row["rounds_graph"])
        report["shapes"].append(row)
        r = row["ratio"]
        print(f"{tag:8s} {m:6d} {n:6d} {k:6d} bf16 {row['bf16_TFLOPs']:5.0f} TF/s | "
              + " ".join(f"{v}={r[v]:.2f}" for v in r if v != "bf16")
              + " | gemm-only " + " ".join(f"{v}={t:.2f}" for v, t in row["gemm_ratio"].items())
              + " | graph " + " ".join(f"{v}={t:.2f}" for v, t in row["graph_ratio"].items()), flush=True)  # fmt: skip
        del x, w, ref_bf16, wqs

    # ---- activation quantization alone vs the copy bandwidth
    for m, k in sorted({(m, k) for _, m, _, k in shapes}):
        x = torch.randn(m, k, device="cuda", dtype=torch.bfloat16)
        for fmt in ("int8-row", "int8-block", "fp8-row"):
            if fmt not in fmts:
                continue
            for exact in (False, True):
                ms = bench(lambda: Q.act_quant(x, fmt, exact_div=exact))
                nbytes = m * k * 3 + 4 * m * (k // F.BLOCK if F.get_format(fmt).is_block else 1)
                gbps = nbytes / ms / 1e6
                report["act_quant"].append({"M": m, "K": k, "format": fmt, "exact_div": exact, "ms": ms,
                                            "GBps": gbps, "of_copy": gbps / copy_bw})  # fmt: skip
        del x
    print("\n# activation quantization (bf16 -> 8 bit), fraction of copy bandwidth")
    for a in report["act_quant"]:
        print(f"  {a['format']:10s} {a['M']:6d}x{a['K']:<6d} exact_div={int(a['exact_div'])}  {a['ms'] * 1e3:7.1f} us"
              f"  {a['GBps']:6.0f} GB/s  {a['of_copy']:.0%}")  # fmt: skip

    # ---- what the compiler made of the kernels at one large shape (registers, spills, instruction mix)
    report["kernels"] = {}
    m, n, k = 4608, 3072, 12288
    fmts_k = fmts if shapes else []
    x = torch.randn(m, k, device="cuda", dtype=torch.bfloat16)
    w = torch.randn(n, k, device="cuda", dtype=torch.bfloat16)
    print("\n# compiled GEMM kernels at 4608x3072x12288")
    for fmt in fmts_k:
        wq, ws = ops.quant_weight(w, fmt)
        xq, xs = ops.act_quant(x, fmt)
        G.scaled_mm(xq, xs, wq, ws, fmt, None, torch.bfloat16)
        kern = G.last_compiled
        ptx = kern.asm.get("ptx", "")
        info = {"config": CF.get_config(fmt, m, n, k).as_list(), "n_regs": kern.n_regs, "n_spills": kern.n_spills,
                "shared": getattr(kern.metadata, "shared", None)}
        for ins in ("wgmma.mma_async", "mma.sync", "cvt.rn.f32.s32", "cp.async.bulk.tensor", "cp.async.cg", "fma.rn.f32"):
            info[ins] = ptx.count(ins)
        report["kernels"][fmt] = info
        print(f"  {fmt:10s} " + " ".join(f"{kk}={vv}" for kk, vv in info.items()))
    del x, w

    report["eager_overhead_us"] = _eager_overhead(ops, fmts)
    print("\n# host time per call at M=16, N=K=1024 (us): "
          + ", ".join(f"{k}={v:.1f}" for k, v in report["eager_overhead_us"].items()))  # fmt: skip
    report["small_m"] = _small_m(ops, bench_short, fmts, args.wo_sweep)
    failures += sum(1 for r in report["small_m"] if r.get("fail"))
    if not args.no_compile:
        report["compile_modes"] = _compile_modes(ops, bench_short, [f for f in ("int8-row", "fp8-block") if f in fmts])

    # ---- summary table
    big = [r for r in report["shapes"] if r["M"] >= 4096]
    cols = ["torch._int_mm", "torch._scaled_mm"] + fmts + [f"{f} fused" for f in fmts if F.get_format(f).is_block]
    report["geomean_M_ge_4096"] = {c: _geomean([r["ratio"].get(c) for r in big]) for c in cols}
    report["min_M_1024"] = {c: min((r["ratio"].get(c, float("nan")) for r in report["shapes"] if r["M"] == 1024),
                                   default=float("nan")) for c in cols}  # fmt: skip
    print(f"\n# {gpu}: speed-up vs cuBLAS bf16 (F.linear with bias); ditq = act quant + GEMM + bias, bf16 in/out")
    print(f"| M | N | K | bf16 TFLOP/s | " + " | ".join(cols) + " |")
    print("|---" * (4 + len(cols)) + "|")
    for r in report["shapes"]:
        print(f"| {r['M']} | {r['N']} | {r['K']} | {r['bf16_TFLOPs']:.0f} | "
              + " | ".join(f"{r['ratio'][c]:.2f}x" if c in r["ratio"] else "-" for c in cols) + " |")  # fmt: skip
    print("| geomean M>=4096 | | | | " + " | ".join(f"{report['geomean_M_ge_4096'][c]:.2f}x" for c in cols) + " |")
    print("| min at M=1024 | | | | " + " | ".join(f"{report['min_M_1024'][c]:.2f}x" for c in cols) + " |")
    report["graph_geomean_M_ge_4096"] = {c: _geomean([r["graph_ratio"].get(c) for r in big]) for c in fmts}
    report["graph_min_M_1024"] = {c: min(r["graph_ratio"][c] for r in report["shapes"] if r["M"] == 1024)
                                  for c in fmts if any(r["M"] == 1024 for r in report["shapes"])}  # fmt: skip
    print(f"\n# same, both sides replayed from CUDA graphs (GPU time, no host launch cost)")
    print("| M | N | K | " + " | ".join(fmts) + " |")
    print("|---" * (3 + len(fmts)) + "|")
    for r in report["shapes"]:
        print(f"| {r['M']} | {r['N']} | {r['K']} | " + " | ".join(f"{r['graph_ratio'][c]:.2f}x" for c in fmts) + " |")
    print("| geomean M>=4096 | | | " + " | ".join(f"{report['graph_geomean_M_ge_4096'][c]:.2f}x" for c in fmts) + " |")
    if report["graph_min_M_1024"]:
        print("| min at M=1024 | | | " + " | ".join(f"{report['graph_min_M_1024'][c]:.2f}x" for c in fmts) + " |")
    report["failures"] = failures
    if args.tune and args.configs_out:
        with open(args.configs_out, "w") as fh:
            json.dump({"gpu": gpu, "triton": triton.__version__, "configs": tuned}, fh, indent=0, sort_keys=True)
    if args.json:
        with open(args.json, "w") as fh:
            json.dump(report, fh, indent=1)
        print(f"# wrote {args.json}")
    if failures:
        print(f"# {failures} correctness failure(s)", file=sys.stderr)
    return 1 if failures else 0
