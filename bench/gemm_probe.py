"""Issue 3, round 5 probe: the last wave's tiles split over K (``Config.tail_split``), activation quantization
with several rows per program, and how much the cuBLAS bf16 baseline moves between measurements.

Why: at the Flux shapes a 128x256 tile grid is 3.27 waves on 132 SMs, so the fourth wave runs 27% full and
costs a whole tile's time (the K=3072 and K=12288 / 15360 shapes, Kandinsky Lite's 1792-wide ones); and in the
last full run the bf16 baseline of one shape differed by up to 22% between two measurements a few seconds
apart (eager vs graph columns), which moves every ratio of that shape.

One process, correctness first (every variant against the float64 product of its quantized operands, the
int8-row tail split bit-equal to the unsplit GEMM, the launch-plan path with a tail split bit-equal to the
regular path), then timing in interleaved rounds: each round times bf16 and every variant of a shape back to
back (``do_bench`` medians, L2 flushed), so drift of the GPU's clocks between rounds hits both sides of a
ratio alike; the ratio reported is the median over rounds of the per-round ratios. Writes $OUT/probe.json.

    PYTHONPATH=src python3 bench/gemm_probe.py [--part gemm,act] [--rounds 3]

Round 6 added ``--part gblock`` (the Gluon block-scaled kernel of ``bench/gluon_block.py`` against the shipped one,
``--quick`` for 6 shapes) and ``--part lingap`` (act quant, GEMM and their sums side by side, clocks sampled).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import statistics
import subprocess
import sys
import time

import torch
from triton.testing import do_bench

from ditq import formats as F
from ditq.bench.gemm import SHAPES, _interleaved, _round_ratios, timed
from ditq.kernels import configs as CF
from ditq.kernels import gemm as G
from ditq.kernels import ops
from ditq.kernels import quant as Q
from ditq.kernels.gemm import Config

FMTS = ["int8-row", "fp8-row", "int8-block", "fp8-block"]


def bench(fn, rep_ms=15.0):
    t = do_bench(fn, warmup=3, rep=3, return_mode="median")  # estimate, then enough repeats for large shapes
    return do_bench(fn, warmup=5, rep=max(rep_ms, 8 * t), return_mode="median")


def _settled(fn):
    """``do_bench`` median after 200 ms of the same call (the GPU's clock follows its load: round 5)."""
    return timed(fn, 20.0, 200.0)


def smi() -> str:
    try:
        return subprocess.run(["nvidia-smi", "--query-gpu=clocks.sm,clocks.max.sm,power.draw,power.limit,temperature.gpu",
                               "--format=csv,noheader"], capture_output=True, text=True, timeout=10).stdout.strip()  # fmt: skip
    except Exception as e:  # noqa: BLE001
        return f"nvidia-smi: {e}"


def variants_bk256(fmt: str, m: int, n: int, k: int) -> dict[str, Config]:
    """Round 6: row formats with 256-wide K steps (half the per-step MMA waits and loop overhead of int8)."""
    shipped = CF.get_config(fmt, m, n, k)
    v = {"shipped": shipped}
    for name, c in {"128x256x256/8w/2s": Config(128, 256, 256, 8, 8, 2, tail_split=4),
                    "128x128x256/8w/3s": Config(128, 128, 256, 8, 8, 3, tail_split=4),
                    "128x128x256/4w/3s": Config(128, 128, 256, 8, 4, 3, tail_split=4),
                    "256x128x256/8w/2s": Config(256, 128, 256, 8, 8, 2, tail_split=4)}.items():  # fmt: skip
        if k % 256 == 0:
            v[name] = c
    return v


def variants(fmt: str, m: int, n: int, k: int) -> dict[str, Config]:
    shipped = CF.get_config(fmt, m, n, k)
    v = {"shipped": shipped, "shipped+tail": dataclasses.replace(shipped, tail_split=4, persistent=False)}
    if not F.get_format(fmt).is_block:
        for name, c in {"128x256/8w/4s": Config(128, 256, 128, 8, 8, 4), "256x128/8w/3s": Config(256, 128, 128, 8, 8, 3),
                        "128x128/4w/4s": Config(128, 128, 128, 8, 4, 4), "64x128/4w/3s": Config(64, 128, 128, 8, 4, 3)}.items():  # fmt: skip
            if c.as_list()[:11] != shipped.as_list()[:11]:
                v[name] = c
                v[name + "+tail"] = dataclasses.replace(c, tail_split=4)
    else:
        for name, c in {"64x128/4w/3s": Config(64, 128, 128, 8, 4, 3, tma=True),
                        "128x128/8w/3s dot2": Config(128, 128, 128, 8, 8, 3, tma=False, dot2=True)}.items():  # fmt: skip
            if c.as_list()[:11] != shipped.as_list()[:11]:
                v[name] = c
                v[name + "+tail"] = dataclasses.replace(c, tail_split=4)
    return v


def part_gemm(args, report) -> int:
    failures = 0
    shapes = [s for s in SHAPES if s[1] >= (4096 if args.settled else 1024)]
    if args.quick:
        shapes = [s for s in shapes if (s[1], s[2], s[3]) in {(4608, 3072, 3072), (16384, 4096, 4096), (1024, 3072, 3072)}]
    fmts = [f for f in args.formats.split(",") if f]
    if args.block_occupancy:  # round 6: the tail split sized by the block kernels' real occupancy
        def block_ctas_per_sm(c: Config) -> int:
            """As ``gemm.ctas_per_sm`` with the block kernels' registers: the fp32 accumulator and one (dot2: two)
            partial product tiles (128x128 / 8 warps dot2: 243 registers in ptxas, 1 program per SM)."""
            regs = min(255, (2 + c.dot2) * c.block_m * c.block_n // (32 * c.num_warps) + 48)
            smem = c.num_stages * (c.block_m + c.block_n) * c.block_k + 1024
            return max(1, min(G.SMEM_BYTES // smem, 64 // c.num_warps, 65536 // (regs * 32 * c.num_warps)))

        assert all(F.get_format(f).is_block for f in fmts), "--block-occupancy: block formats only"
        G.ctas_per_sm = block_ctas_per_sm
    rows = []
    for tag, m, n, k in shapes:
        torch.manual_seed(m + n + k)
        x = torch.randn(m, k, device="cuda", dtype=torch.bfloat16)
        w = torch.randn(n, k, device="cuda", dtype=torch.bfloat16) * 0.02
        bias = torch.randn(n, device="cuda", dtype=torch.bfloat16) * 0.1
        fns = {"bf16": lambda: torch.nn.functional.linear(x, w, bias)}
        errs = {}
        for fmt in fmts:
            f = F.get_format(fmt)
            wq, ws = ops.quant_weight(w, fmt)
            xq, xs = ops.act_quant(x, fmt)
            sub = slice(0, 256)  # float64 reference on the first rows
            ref = F.scaled_mm_ref(xq[sub], xs[sub], wq, ws, f, bias, torch.float64, torch.float64)
            plain = None
            for name, c in (variants_bk256 if args.bk256 else variants)(fmt, m, n, k).items():
                try:
                    y = G.scaled_mm(xq, xs, wq, ws, f, bias, torch.bfloat16, config=c)
                    y2 = G.scaled_mm(xq, xs, wq, ws, f, bias, torch.bfloat16, config=c)  # counters reset?
                except Exception as e:  # noqa: BLE001 -- a config that does not fit is skipped, and said so
                    print(f"  {fmt} {m}x{n}x{k} {name}: {type(e).__name__}: {str(e)[:100]}")
                    continue
                e = F.relative_error(y[sub], ref)
                errs[f"{fmt} {name}"] = e
                bad = not e < 1e-2 or not torch.equal(y, y2)
                if name == "shipped":
                    plain = y
                elif fmt == "int8-row" and plain is not None and c.tail_split and not torch.equal(y, plain):
                    bad = True  # int32 slices sum exactly: must equal the unsplit GEMM
                if bad:
                    failures += 1
                    print(f"FAIL {fmt} {m}x{n}x{k} {name}: rel err {e:.2e}, repeat equal {torch.equal(y, y2)}")
                    continue
                fns[f"{fmt} {name}"] = (lambda xq=xq, xs=xs, wq=wq, ws=ws, f=f, c=c:
                                        G.scaled_mm(xq, xs, wq, ws, f, bias, torch.bfloat16, config=c))  # fmt: skip
            fns[f"{fmt} linear"] = lambda wq=wq, ws=ws, fmt=fmt: ops.linear(x, wq, ws, fmt, bias)
            fns[f"{fmt} act_quant"] = lambda fmt=fmt: Q.act_quant(x, fmt)
            del xq, xs, ref
        times = _interleaved(fns, _settled if args.bk256 or args.settled else bench, args.rounds)
        bf = times["bf16"]
        ratio = _round_ratios(times)
        row = {"M": m, "N": n, "K": k, "ms": times, "ratio": ratio, "err": errs,
               "bf16_spread": (max(bf) - min(bf)) / min(bf), "smi": smi()}  # fmt: skip
        rows.append(row)
        best = {}
        for fmt in fmts:
            cand = {nm: r for nm, r in ratio.items() if nm.startswith(fmt + " ") and nm.split(" ", 1)[1] not in
                    ("linear", "act_quant")}  # fmt: skip
            if cand:
                b = max(cand, key=cand.get)
                best[fmt] = (b.split(" ", 1)[1], cand[b], ratio[f"{fmt} shipped"] if f"{fmt} shipped" in ratio else 0)
        print(f"{m:6d} {n:6d} {k:6d} bf16 {statistics.median(bf) * 1e3:8.1f} us (spread {row['bf16_spread']:.1%}) | "
              + " | ".join(f"{fm}: shipped {s:.2f} best {nm} {r:.2f} lin {ratio[fm + ' linear']:.2f}"
                           for fm, (nm, r, s) in best.items()), flush=True)  # fmt: skip
        del x, w, fns
        torch.cuda.empty_cache()
    report["gemm"] = rows
    # per format and variant name: geomean of GEMM-only ratios over M >= 4096
    import math

    big = [r for r in rows if r["M"] >= 4096]
    names = sorted({nm for r in big for nm in r["ratio"]})
    geo = {}
    for nm in names:
        v = [r["ratio"][nm] for r in big if nm in r["ratio"]]
        if len(v) == len(big):
            geo[nm] = math.exp(sum(map(math.log, v)) / len(v))
    report["geomean_M_ge_4096"] = geo
    print("\n# geomean over M >= 4096 (GEMM-only unless 'linear'), median of per-round ratios vs bf16")
    for nm, g in sorted(geo.items()):
        print(f"  {nm:34s} {g:.3f}")
    # the best variant per shape, per format (what a re-tuned table would give)
    for fmt in fmts:
        best = []
        for r in big:
            c = [v for nm, v in r["ratio"].items() if nm.startswith(fmt + " ") and not nm.endswith(("linear", "act_quant"))]
            best.append(max(c) if c else float("nan"))
        print(f"  {fmt} best-per-shape GEMM-only geomean {math.exp(sum(map(math.log, best)) / len(best)):.3f}")
    return failures


def part_plans(args, report) -> int:
    """The launch-plan path (ops.linear) with tail-split configs against the regular path, bit for bit."""
    failures = 0
    for fmt in ("int8-row", "fp8-row", "int8-block"):
        for m, n, k in ((4608, 3072, 3072), (1000, 3072, 3072)):
            x = torch.randn(m, k, device="cuda", dtype=torch.bfloat16)
            w = torch.randn(n, k, device="cuda", dtype=torch.bfloat16) * 0.02
            wq, ws = ops.quant_weight(w, fmt)
            c = dataclasses.replace(CF.get_config(fmt, m, n, k), tail_split=4, persistent=False)
            key = CF.key(fmt, m, n, k)
            saved = CF.tuned().get(key)
            CF.tuned()[key] = c
            CF.get_config.cache_clear()
            ops.clear_plans()
            try:
                xq, xs = ops.act_quant(x, fmt)
                ref = G.scaled_mm(xq, xs, wq, ws, fmt, None, torch.bfloat16, config=c)
                ys = [ops.linear(x, wq, ws, fmt) for _ in range(3)]  # build, then reuse the plan
                g = torch.cuda.CUDAGraph()
                ops.linear(x, wq, ws, fmt)
                with torch.cuda.graph(g):
                    yg = ops.linear(x, wq, ws, fmt)
                g.replay()
                g.replay()
                ok = all(torch.equal(y, ref) for y in ys) and torch.equal(yg, ref)
            finally:
                if saved is None:
                    CF.tuned().pop(key)
                else:
                    CF.tuned()[key] = saved
                CF.get_config.cache_clear()
                ops.clear_plans()
            print(f"  plans {fmt} {m}x{n}x{k} tail: {'ok' if ok else 'FAIL'}")
            failures += not ok
            report.setdefault("plans", []).append({"fmt": fmt, "shape": [m, n, k], "ok": ok})
    return failures


def part_gap(args, report) -> int:
    """Why the fp8-row linear ran 15-20% slower than its act quant + GEMM timed apart (round 5's first probe)
    while int8-row's did not: the same two kernels through each path, in rounds."""
    rows = []
    for m, n, k in ((4608, 12288, 3072), (16384, 4096, 4096), (4608, 3072, 3072)):
        x = torch.randn(m, k, device="cuda", dtype=torch.bfloat16)
        w = torch.randn(n, k, device="cuda", dtype=torch.bfloat16) * 0.02
        bias = torch.randn(n, device="cuda", dtype=torch.bfloat16) * 0.1
        fns = {"bf16": lambda: torch.nn.functional.linear(x, w, bias)}
        info = {}
        for fmt in ("int8-row", "fp8-row"):
            f = F.get_format(fmt)
            wq, ws = ops.quant_weight(w, fmt)
            xq, xs = ops.act_quant(x, fmt)
            q2, s2 = torch.empty_like(xq), torch.empty_like(xs)
            aspec = Q.act_quant_spec(x, q2, s2, f, False)
            y_gemm = G.scaled_mm(xq, xs, wq, ws, f, bias)
            ck_gemm = G.last_compiled
            ops.clear_plans()
            y_lin = ops.linear(x, wq, ws, fmt, bias)
            ops.linear(x, wq, ws, fmt, bias)
            plan = next(iter(ops._PLANS.values()))
            info[fmt] = {"gemm_regs": ck_gemm.n_regs, "plan_regs": plan.mm.entry.ck.n_regs,
                         "same_kernel": plan.mm.entry.ck is ck_gemm, "equal": torch.equal(y_gemm, y_lin),
                         "plan_tail": list(map(str, plan.mm.tail))}  # fmt: skip
            fns[f"{fmt} gemm fixed"] = lambda xq=xq, xs=xs, wq=wq, ws=ws, f=f: G.scaled_mm(xq, xs, wq, ws, f, bias)
            fns[f"{fmt} aq fresh + gemm"] = lambda wq=wq, ws=ws, f=f: G.scaled_mm(*Q.act_quant(x, f), wq, ws, f, bias)
            fns[f"{fmt} aq fixed + gemm"] = (lambda aspec=aspec, q2=q2, s2=s2, wq=wq, ws=ws, f=f:
                                             (Q.launch(aspec), G.scaled_mm(q2, s2, wq, ws, f, bias)))  # fmt: skip
            fns[f"{fmt} linear plan"] = lambda wq=wq, ws=ws, fmt=fmt: ops.linear(x, wq, ws, fmt, bias)
            fns[f"{fmt} linear general"] = (lambda wq=wq, ws=ws, f=f:
                                            ops._linear_general(x, wq, ws, f, bias, None, False))  # fmt: skip
            fns[f"{fmt} aq only"] = lambda aspec=aspec: Q.launch(aspec)
        times = _interleaved(fns, bench, args.rounds)
        med = {nm: statistics.median(t) * 1e3 for nm, t in times.items()}
        rows.append({"shape": [m, n, k], "us": med, "info": info})
        print(f"  {m}x{n}x{k} " + " ".join(f"{nm}={v:.1f}" for nm, v in med.items()))
        print(f"    {info}")
        del x, w, fns
        torch.cuda.empty_cache()
    report["gap"] = rows
    return 0


LIN_CANDIDATES = {
    "128x256/8w/3s": Config(128, 256, 128, 8, 8, 3), "128x256/8w/3s+tail": Config(128, 256, 128, 8, 8, 3, tail_split=4),
    "128x256/8w/4s": Config(128, 256, 128, 8, 8, 4), "128x256/8w/4s+tail": Config(128, 256, 128, 8, 8, 4, tail_split=4),
    "256x128/8w/3s": Config(256, 128, 128, 8, 8, 3), "256x128/8w/3s+tail": Config(256, 128, 128, 8, 8, 3, tail_split=4),
    "128x128/4w/4s persistent": Config(128, 128, 128, 8, 4, 4, persistent=True),
    "64x128/4w/3s": Config(64, 128, 128, 8, 4, 3), "64x128/4w/3s+tail": Config(64, 128, 128, 8, 4, 3, tail_split=4),
}  # fmt: skip


def part_lintune(args, report) -> int:
    """Row-format GEMM configurations chosen by the time of the whole linear (act quant + GEMM, as the issue
    measures it), not the GEMM alone: the GEMM after an act quant ran at a different speed than alone (part gap)."""
    shapes = [s for s in SHAPES if s[1] >= 1024]
    rows = []
    for tag, m, n, k in shapes:
        x = torch.randn(m, k, device="cuda", dtype=torch.bfloat16)
        w = torch.randn(n, k, device="cuda", dtype=torch.bfloat16) * 0.02
        bias = torch.randn(n, device="cuda", dtype=torch.bfloat16) * 0.1
        fns = {"bf16": lambda: torch.nn.functional.linear(x, w, bias)}
        for fmt in ("int8-row", "fp8-row"):
            f = F.get_format(fmt)
            wq, ws = ops.quant_weight(w, fmt)
            cands = {"table": CF.get_config(fmt, m, n, k), **LIN_CANDIDATES}
            seen = set()
            for nm, c in cands.items():
                if tuple(c.as_list()) in seen or (c.block_m == 64 and m > 8192):
                    continue
                seen.add(tuple(c.as_list()))
                fn = lambda wq=wq, ws=ws, f=f, c=c: G.scaled_mm(*Q.act_quant(x, f), wq, ws, f, bias, config=c)
                try:
                    fn()
                except Exception as e:  # noqa: BLE001
                    print(f"  {fmt} {nm}: {type(e).__name__}: {str(e)[:80]}")
                    continue
                fns[f"{fmt} {nm}"] = fn
        times = _interleaved(fns, bench, args.rounds)
        ratio = _round_ratios(times)
        rows.append({"M": m, "N": n, "K": k, "ms": times, "ratio": ratio})
        line = []
        for fmt in ("int8-row", "fp8-row"):
            c = {nm.split(" ", 1)[1]: v for nm, v in ratio.items() if nm.startswith(fmt)}
            b = max(c, key=c.get)
            line.append(f"{fmt} table {c['table']:.2f} best {b} {c[b]:.2f}")
        print(f"  {m:6d}x{n:6d}x{k:6d} " + " | ".join(line), flush=True)
        del x, w, fns
        torch.cuda.empty_cache()
    report["lintune"] = rows
    return 0


def _sustained(fn, seconds: float, flops: float) -> dict:
    """Run fn back to back for ``seconds`` while nvidia-smi samples the SM clock, power and temperature every
    100 ms: median clock / power, and the achieved rate."""
    fn()
    torch.cuda.synchronize()
    mon = subprocess.Popen(["nvidia-smi", "--query-gpu=clocks.sm,power.draw,temperature.gpu", "--format=csv,noheader,nounits",
                            "-lms", "100"], stdout=subprocess.PIPE, text=True)  # fmt: skip
    t0, n = time.time(), 0
    while time.time() - t0 < seconds:
        for _ in range(10):
            fn()
        n += 10
        torch.cuda.synchronize()
    dt = time.time() - t0
    mon.terminate()
    samples = []
    for line in mon.stdout.read().splitlines():
        try:
            samples.append([float(v) for v in line.split(",")])
        except ValueError:
            pass
    samples = samples[len(samples) // 4 :]  # skip the ramp
    med = [statistics.median(c) for c in zip(*samples)] if samples else [0, 0, 0]
    return {"TFLOPs": flops * n / dt / 1e12, "sm_MHz": med[0], "W": med[1], "C": med[2], "samples": len(samples)}


def part_power(args, report) -> int:
    """Is int8's gap to fp8 at the same tile the chip's power limit? Each GEMM run back to back for 3 s with
    nvidia-smi sampling: SM clock, board power and the achieved rate (bf16, cuBLAS int8 / fp8, ditq int8-row /
    fp8-row with the same 128x256 tile). Then order: the int8-row linear timed right after 0.3 s of another
    kernel (bf16, cuBLAS fp8, itself) or after 0.3 s idle."""
    m, n, k = 16384, 4096, 4096
    x = torch.randn(m, k, device="cuda", dtype=torch.bfloat16)
    w = torch.randn(n, k, device="cuda", dtype=torch.bfloat16) * 0.02
    c = Config(128, 256, 128, 8, 8, 4)
    q = {fmt: (ops.act_quant(x, fmt), ops.quant_weight(w, fmt)) for fmt in ("int8-row", "fp8-row")}
    (xi, xsi), (wi, wsi) = q["int8-row"]
    (xf, xsf), (wf, wsf) = q["fp8-row"]
    fns = {
        "bf16 cuBLAS": lambda: x @ w.t(),
        "int8 torch._int_mm": lambda: torch._int_mm(xi, wi.t()),
        "fp8 torch._scaled_mm": lambda: torch._scaled_mm(xf, wf.t(), scale_a=xsf, scale_b=wsf.reshape(1, n),
                                                         out_dtype=torch.bfloat16),  # fmt: skip
        "ditq int8-row GEMM": lambda: G.scaled_mm(xi, xsi, wi, wsi, "int8-row", config=c),
        "ditq fp8-row GEMM": lambda: G.scaled_mm(xf, xsf, wf, wsf, "fp8-row", config=c),
    }
    res = {}
    for nm, fn in fns.items():
        res[nm] = _sustained(fn, 3.0, 2.0 * m * n * k)
        print(f"  {nm:22s} " + " ".join(f"{kk}={v:.0f}" for kk, v in res[nm].items()), flush=True)
    lin = lambda: ops.linear(x, wi, wsi, "int8-row")
    order = {}
    for before in ("idle", "bf16 cuBLAS", "fp8 torch._scaled_mm", "ditq int8-row GEMM"):
        ts = []
        for _ in range(args.rounds):
            t0 = time.time()
            while time.time() - t0 < 0.3:
                if before == "idle":
                    time.sleep(0.3)
                else:
                    fns[before]()
                    torch.cuda.synchronize()
            ts.append(do_bench(lin, warmup=1, rep=10, return_mode="median"))
        order[before] = statistics.median(ts) * 1e3
    print("  int8-row linear (us) right after 0.3 s of: " + ", ".join(f"{kk} {v:.1f}" for kk, v in order.items()))
    report["power"] = {"shape": [m, n, k], "sustained": res, "after": order}
    return 0


def part_gluon(args, report) -> int:
    """The Gluon int8-row GEMM (async wgmma kept in flight, ``bench/gluon_int8.py``) against the Triton one
    (``wait_group 0`` every K step): bit-equality first, then GPU time from CUDA-graph replays, each settled
    (200 ms of itself) and in two interleaved rounds with cuBLAS bf16; GEMM alone and act quant + GEMM."""
    from ditq.bench.timing import captured
    import gluon_int8 as GG  # bench/gluon_int8.py, beside this script

    failures = 0
    rows = []
    shapes = [s for s in SHAPES if s[1] >= (4096 if args.gluon_persistent else 1024)]
    odd = [("odd", 1000, 3000, 3072), ("odd", 77, 136, 256)]
    for tag, m, n, k in odd + shapes:
        x = torch.randn(m, k, device="cuda", dtype=torch.bfloat16)
        w = torch.randn(n, k, device="cuda", dtype=torch.bfloat16) * 0.02
        bias = torch.randn(n, device="cuda", dtype=torch.bfloat16) * 0.1
        wq, ws = ops.quant_weight(w, "int8-row")
        xq, xs = ops.act_quant(x, "int8-row")
        ref = G.scaled_mm(xq, xs, wq, ws, "int8-row", bias)
        variants = {"gluon 4st": dict(stages=4), "gluon regA": dict(stages=4, a_in_regs=True)}
        if args.gluon_all:  # round 5's first call: also 3 stages and the 256x128 tile
            variants.update({"gluon 3st": dict(stages=3), "gluon 256x128": dict(block=(256, 128, 128), stages=3)})
        if args.gluon_persistent:  # round 6: the persistent kernel with the TMA-store epilogue
            variants = {"gluon 4st": dict(stages=4), "persistent 3st": dict(persistent=True, stages=3),
                        "persistent 4st halves": dict(persistent=True, stages=4, epi_halves=2)}  # fmt: skip

        def run(kw, *a):
            kw = dict(kw)
            return (GG.int8_row_mm_persistent if kw.pop("persistent", False) else GG.int8_row_mm)(*a, **kw)

        ok = {}
        for nm, kw in variants.items():
            try:
                y = run(kw, xq, xs, wq, ws, bias)
                ok[nm] = torch.equal(y, ref)
            except Exception as e:  # noqa: BLE001
                print(f"  {nm} {m}x{n}x{k}: {type(e).__name__}: {str(e)[:200]}", flush=True)
                ok[nm] = None
            if ok[nm] is False:
                failures += 1
                print(f"FAIL {nm} {m}x{n}x{k}: differs from the Triton int8-row GEMM "
                      f"(max |diff| {float((y.float() - ref.float()).abs().max()):.3g})", flush=True)  # fmt: skip
        if tag == "odd":
            print(f"  {m}x{n}x{k} equal to Triton: {ok}", flush=True)
            continue
        fns = {"bf16": lambda: torch.nn.functional.linear(x, w, bias),
               "triton gemm": lambda: G.scaled_mm(xq, xs, wq, ws, "int8-row", bias),
               "triton linear": lambda: G.scaled_mm(*Q.act_quant(x, "int8-row"), wq, ws, "int8-row", bias)}  # fmt: skip
        for nm, kw in variants.items():
            if ok[nm]:
                fns[nm + " gemm"] = lambda kw=kw: run(kw, xq, xs, wq, ws, bias)
                fns[nm + " linear"] = lambda kw=kw: run(kw, *Q.act_quant(x, "int8-row"), wq, ws, bias)
        import contextlib

        with contextlib.ExitStack() as stack:
            graphs = {nm: stack.enter_context(captured(fn)).replay for nm, fn in fns.items()}
            times = _interleaved(graphs, _settled, 2)
        ratio = _round_ratios(times)
        rows.append({"M": m, "N": n, "K": k, "ms": times, "ratio": ratio, "equal": ok})
        print(f"  {m:6d}x{n:6d}x{k:6d} " + " ".join(f"{nm}={r:.2f}" for nm, r in ratio.items() if nm != "bf16"), flush=True)
        del x, w, fns
        torch.cuda.empty_cache()
    import math

    big = [r for r in rows if r["M"] >= 4096]
    geo = {nm: math.exp(sum(math.log(r["ratio"][nm]) for r in big) / len(big)) for nm in big[0]["ratio"]
           if all(nm in r["ratio"] for r in big)}  # fmt: skip
    print("  geomean M >= 4096 (graph replays, settled): " + " ".join(f"{nm}={g:.3f}" for nm, g in geo.items()))
    best_lin = math.exp(sum(math.log(max(v for nm, v in r["ratio"].items() if nm.endswith("linear"))) for r in big) / len(big))
    print(f"  best linear per shape (triton or gluon), geomean: {best_lin:.3f}")
    if args.gluon_persistent:  # no sustained-power part in round 6's call
        report["gluon"] = {"rows": rows, "geomean_M_ge_4096": geo}
        return failures
    m, n, k = 16384, 4096, 4096
    x = torch.randn(m, k, device="cuda", dtype=torch.bfloat16)
    w = torch.randn(n, k, device="cuda", dtype=torch.bfloat16) * 0.02
    wq, ws = ops.quant_weight(w, "int8-row")
    xq, xs = ops.act_quant(x, "int8-row")
    sus = {"triton int8-row": _sustained(lambda: G.scaled_mm(xq, xs, wq, ws, "int8-row", config=Config(128, 256, 128, 8, 8, 4)),
                                         3.0, 2.0 * m * n * k),
           "gluon int8-row": _sustained(lambda: GG.int8_row_mm(xq, xs, wq, ws), 3.0, 2.0 * m * n * k),
           "gluon regA": _sustained(lambda: GG.int8_row_mm(xq, xs, wq, ws, a_in_regs=True), 3.0, 2.0 * m * n * k)}  # fmt: skip
    for nm, v in sus.items():
        print(f"  sustained {nm:16s} " + " ".join(f"{kk}={vv:.0f}" for kk, vv in v.items()), flush=True)
    report["gluon"] = {"rows": rows, "geomean_M_ge_4096": geo, "sustained": sus}
    return failures


def _triton_config(fmt: str, m: int, n: int, k: int) -> Config:
    """The Triton kernel's configuration (tuned, else the heuristic): what ``get_config`` gave before round 7
    routed int8-row / int8-block / fp8-block at large M to the warp-specialized kernel."""
    return CF.tuned().get(CF.key(fmt, m, n, k)) or CF._nearest_tuned(fmt, m, n, k) or CF.heuristic(fmt, m, n, k)


def _ref_block(xq, xs, wq, ws) -> torch.Tensor:
    """float64 sum over 128-K blocks of (xq_kb @ wq_kb^T) * x_scale[:, kb] * w_scale[n // 128, kb]."""
    m, k = xq.shape
    n = wq.shape[0]
    y = torch.zeros(m, n, dtype=torch.float64, device=xq.device)
    wsn = ws.double().repeat_interleave(128, 0)[:n]
    for kb in range(k // 128):
        sl = slice(kb * 128, (kb + 1) * 128)
        y += (xq[:, sl].double() @ wq[:, sl].double().T) * xs[:, kb:kb + 1].double() * wsn[:, kb][None, :]
    return y


def part_gblock(args, report) -> int:
    """Round 6: the Gluon block-scaled GEMM (``bench/gluon_block.py``: the previous K block promoted while the
    next one's wgmma runs) against the shipped Triton block kernel: accuracy against float64 first (odd
    shapes, 1-4 K steps), then GPU time from CUDA-graph replays, settled, two interleaved rounds with bf16."""
    import contextlib
    import math

    from ditq.bench.timing import captured
    import gluon_block as GB  # bench/gluon_block.py, beside this script

    failures = 0
    if args.gblock_ws:  # round 7: the warp-specialized kernel (now ditq.kernels.hopper; the probe's 128-wide
        # variant and its direct-store epilogue are in bench/gluon_ws.py at commit 658702e)
        from ditq.kernels.configs import WS_CONFIG

        wsc = {"ws256/4s": WS_CONFIG, "ws256/3s": dataclasses.replace(WS_CONFIG, num_stages=3)}
        kernels = {nm: (lambda *a, c=c: G.scaled_mm(*a, config=c)) for nm, c in wsc.items()}
    else:
        cfgs = {"g128/8w/3s pair": dict(block=(128, 128), num_warps=8, stages=3, pair=1),
                "g128/8w/4s pair": dict(block=(128, 128), num_warps=8, stages=4, pair=1),
                "g128/8w/3s one": dict(block=(128, 128), num_warps=8, stages=3, pair=0),
                "g64/4w/3s pair": dict(block=(64, 128), num_warps=4, stages=3, pair=1)}  # fmt: skip
        kernels = {nm: (lambda *a, kw=kw: GB.block_mm(*a, **kw)) for nm, kw in cfgs.items()}
    odd = [(1000, 2944, 3072), (77, 128, 256), (77, 256, 384), (130, 384, 128), (4608, 3072, 3072)]  # N, K: multiples of 128
    report["gblock"] = {"check": [], "rows": []}
    for fmt in args.formats.split(","):
        if not F.get_format(fmt).is_block:
            continue
        for m, n, k in odd:
            x = torch.randn(m, k, device="cuda", dtype=torch.bfloat16)
            w = torch.randn(n, k, device="cuda", dtype=torch.bfloat16) * 0.02
            bias = torch.randn(n, device="cuda", dtype=torch.bfloat16) * 0.1
            wq, ws = ops.quant_weight(w, fmt)
            xq, xs = ops.act_quant(x, fmt)
            ref = _ref_block(xq, xs, wq, ws) + bias.double()
            den = float(ref.norm())
            tri = G.scaled_mm(xq, xs, wq, ws, fmt, bias, config=_triton_config(fmt, m, n, k))
            e_tri = float((tri.double() - ref).norm()) / den
            row = {"fmt": fmt, "M": m, "N": n, "K": k, "triton_rel": e_tri}
            for nm, kern in kernels.items():
                y = kern(xq, xs, wq, ws, fmt, bias)
                e = float((y.double() - ref).norm()) / den
                row[nm] = {"rel": e, "equal_triton": bool(torch.equal(y, tri)), "finite": bool(torch.isfinite(y).all())}
                if not (e <= 2 * e_tri + 1e-6) or not row[nm]["finite"]:
                    failures += 1
                    print(f"FAIL {fmt} {nm} {m}x{n}x{k}: rel err {e:.3g} vs triton {e_tri:.3g}", flush=True)
            report["gblock"]["check"].append(row)
            print(f"  check {fmt} {m}x{n}x{k}: triton {e_tri:.2e} " + " ".join(
                f"{nm}={row[nm]['rel']:.2e}{'=' if row[nm]['equal_triton'] else ''}" for nm in kernels), flush=True)
    if failures:
        return failures

    shapes = [s for s in SHAPES if s[1] >= 4096 or (s[1] == 1024 and args.quick is False)]
    if args.quick:  # one call's worth: a shape of each model
        shapes = [s for s in shapes if (s[2], s[3]) in ((3072, 3072), (3072, 12288), (5120, 5120), (4096, 4096),
                                                        (4096, 16384), (1792, 7168))]  # fmt: skip
    for fmt in args.formats.split(","):
        if not F.get_format(fmt).is_block:
            continue
        rows = []
        for tag, m, n, k in shapes:
            x = torch.randn(m, k, device="cuda", dtype=torch.bfloat16)
            w = torch.randn(n, k, device="cuda", dtype=torch.bfloat16) * 0.02
            bias = torch.randn(n, device="cuda", dtype=torch.bfloat16) * 0.1
            wq, ws = ops.quant_weight(w, fmt)
            xq, xs = ops.act_quant(x, fmt)
            tc = _triton_config(fmt, m, n, k)
            fns = {"bf16": lambda: torch.nn.functional.linear(x, w, bias),
                   "triton gemm": lambda: G.scaled_mm(xq, xs, wq, ws, fmt, bias, config=tc),
                   "triton linear": lambda: G.scaled_mm(*Q.act_quant(x, fmt), wq, ws, fmt, bias, config=tc)}  # fmt: skip
            for nm, kern in kernels.items():
                fns[nm + " gemm"] = lambda kern=kern: kern(xq, xs, wq, ws, fmt, bias)
                fns[nm + " linear"] = lambda kern=kern: kern(*Q.act_quant(x, fmt), wq, ws, fmt, bias)
            with contextlib.ExitStack() as stack:
                graphs = {nm: stack.enter_context(captured(fn)).replay for nm, fn in fns.items()}
                times = _interleaved(graphs, _settled, 2)
            ratio = _round_ratios(times)
            rows.append({"M": m, "N": n, "K": k, "ms": times, "ratio": ratio})
            print(f"  {fmt} {m:6d}x{n:6d}x{k:6d} " + " ".join(f"{nm}={r:.2f}" for nm, r in ratio.items() if nm != "bf16"),
                  flush=True)  # fmt: skip
            del x, w, fns
            torch.cuda.empty_cache()
        big = [r for r in rows if r["M"] >= 4096]
        geo = {nm: math.exp(sum(math.log(r["ratio"][nm]) for r in big) / len(big)) for nm in big[0]["ratio"]}
        best = math.exp(sum(math.log(max(v for nm, v in r["ratio"].items() if nm.endswith("linear"))) for r in big) / len(big))
        print(f"  {fmt} geomean M >= 4096 (graph replays, settled): " + " ".join(f"{nm}={g:.3f}" for nm, g in geo.items()))
        print(f"  {fmt} best linear per shape, geomean: {best:.3f}", flush=True)
        report["gblock"]["rows"] += [dict(r, fmt=fmt) for r in rows]
        report["gblock"].setdefault("geomean", {})[fmt] = dict(geo, best_linear=best)
    return failures


def part_wsrow(args, report) -> int:
    """Round 7: the warp-specialized Gluon kernel for the row formats (``ditq.kernels.hopper``)
    against the shipped Triton kernel: equality with it first (odd shapes, K tails), then GPU time from CUDA-graph
    replays, settled, two interleaved rounds with bf16 (as part gblock)."""
    import contextlib
    import math

    from ditq.bench.timing import captured
    from ditq.kernels.configs import WS_CONFIG

    failures = 0
    wsc = {"wsr/4s": WS_CONFIG, "wsr/3s": dataclasses.replace(WS_CONFIG, num_stages=3)}
    kernels = {nm: (lambda *a, c=c: G.scaled_mm(*a, config=c)) for nm, c in wsc.items()}
    odd = [(1000, 2944, 3072), (77, 136, 256), (77, 256, 400), (130, 384, 128), (4608, 3072, 3072)]
    report["wsrow"] = {"check": [], "rows": []}
    fmts = [f for f in args.formats.split(",") if not F.get_format(f).is_block]
    for fmt in fmts:
        for m, n, k in odd:
            x = torch.randn(m, k, device="cuda", dtype=torch.bfloat16)
            w = torch.randn(n, k, device="cuda", dtype=torch.bfloat16) * 0.02
            bias = torch.randn(n, device="cuda", dtype=torch.bfloat16) * 0.1
            wq, ws = ops.quant_weight(w, fmt)
            xq, xs = ops.act_quant(x, fmt)
            tri = G.scaled_mm(xq, xs, wq, ws, fmt, bias, config=_triton_config(fmt, m, n, k))
            ref = (xq.double() @ wq.double().T) * xs.double().reshape(-1, 1) * ws.double().reshape(1, -1) + bias.double()
            den = float(ref.norm())
            row = {"fmt": fmt, "M": m, "N": n, "K": k, "triton_rel": float((tri.double() - ref).norm()) / den}
            for nm, kern in kernels.items():
                y = kern(xq, xs, wq, ws, fmt, bias)
                row[nm] = {"rel": float((y.double() - ref).norm()) / den, "equal_triton": bool(torch.equal(y, tri))}
                if not row[nm]["rel"] <= 2 * row["triton_rel"] + 1e-6:
                    failures += 1
                    print(f"FAIL {fmt} {nm} {m}x{n}x{k}: {row[nm]}", flush=True)
            report["wsrow"]["check"].append(row)
            print(f"  check {fmt} {m}x{n}x{k}: triton {row['triton_rel']:.2e} " + " ".join(
                f"{nm}={row[nm]['rel']:.2e}{'=' if row[nm]['equal_triton'] else ''}" for nm in kernels), flush=True)
    if failures:
        return failures
    shapes = [s for s in SHAPES if s[1] >= 4096]
    if args.quick:
        shapes = [s for s in shapes if (s[2], s[3]) in ((3072, 3072), (3072, 12288), (5120, 5120), (4096, 4096),
                                                        (4096, 16384), (1792, 7168), (1792, 1792))]  # fmt: skip
    for fmt in fmts:
        rows = []
        for tag, m, n, k in shapes:
            x = torch.randn(m, k, device="cuda", dtype=torch.bfloat16)
            w = torch.randn(n, k, device="cuda", dtype=torch.bfloat16) * 0.02
            bias = torch.randn(n, device="cuda", dtype=torch.bfloat16) * 0.1
            wq, ws = ops.quant_weight(w, fmt)
            xq, xs = ops.act_quant(x, fmt)
            tc = _triton_config(fmt, m, n, k)
            fns = {"bf16": lambda: torch.nn.functional.linear(x, w, bias),
                   "triton gemm": lambda: G.scaled_mm(xq, xs, wq, ws, fmt, bias, config=tc),
                   "triton linear": lambda: G.scaled_mm(*Q.act_quant(x, fmt), wq, ws, fmt, bias, config=tc)}  # fmt: skip
            for nm, kern in kernels.items():
                fns[nm + " gemm"] = lambda kern=kern: kern(xq, xs, wq, ws, fmt, bias)
                fns[nm + " linear"] = lambda kern=kern: kern(*Q.act_quant(x, fmt), wq, ws, fmt, bias)
            with contextlib.ExitStack() as stack:
                graphs = {nm: stack.enter_context(captured(fn)).replay for nm, fn in fns.items()}
                times = _interleaved(graphs, _settled, 2)
            ratio = _round_ratios(times)
            rows.append({"M": m, "N": n, "K": k, "ms": times, "ratio": ratio})
            print(f"  {fmt} {m:6d}x{n:6d}x{k:6d} " + " ".join(f"{nm}={r:.2f}" for nm, r in ratio.items() if nm != "bf16"),
                  flush=True)  # fmt: skip
            del x, w, fns
            torch.cuda.empty_cache()
        geo = {nm: math.exp(sum(math.log(r["ratio"][nm]) for r in rows) / len(rows)) for nm in rows[0]["ratio"]}
        print(f"  {fmt} geomean (graph replays, settled): " + " ".join(f"{nm}={g:.3f}" for nm, g in geo.items()), flush=True)
        report["wsrow"]["rows"] += [dict(r, fmt=fmt) for r in rows]
        report["wsrow"].setdefault("geomean", {})[fmt] = geo
    return failures


def part_lingap(args, report) -> int:
    """Round 6: why int8-row's linear costs its GEMM + the whole act quant while fp8-row's costs about its GEMM
    alone (final run: 16384x4096x4096 int8 536 vs 483 us, fp8 512 vs 496). Per shape and format, CUDA-graph
    replays timed by ``do_bench`` (L2 flushed between calls, as the benchmark), each settled: act quant alone,
    GEMM alone, act quant + GEMM (the linear), the *other* format's act quant + this GEMM (bytes reinterpreted),
    a copy of the same bytes + GEMM (a low-power phase that leaves xq out of L2), a read of xq + GEMM (xq in L2,
    little time), with the SM clock sampled by nvidia-smi while each settles."""
    import contextlib
    import threading

    from ditq.bench.timing import captured

    def clocks_during(fn):
        vals, stop = [], threading.Event()

        def poll():
            while not stop.is_set():
                out = subprocess.run(["nvidia-smi", "--query-gpu=clocks.sm,power.draw", "--format=csv,noheader,nounits"],
                                     capture_output=True, text=True, timeout=5, check=False).stdout.strip()  # fmt: skip
                try:
                    c, w = out.split(",")
                    vals.append((float(c), float(w)))
                except ValueError:
                    pass
                time.sleep(0.05)

        th = threading.Thread(target=poll)
        th.start()
        try:
            r = fn()
        finally:
            stop.set()
            th.join()
        return r, vals

    rows = []
    shapes = [(4608, 3072, 3072), (4608, 12288, 3072), (16384, 4096, 4096), (8192, 1792, 1792)]
    for m, n, k in shapes:
        x = torch.randn(m, k, device="cuda", dtype=torch.bfloat16)
        w = torch.randn(n, k, device="cuda", dtype=torch.bfloat16) * 0.02
        bias = torch.randn(n, device="cuda", dtype=torch.bfloat16) * 0.1
        src = torch.empty(m * k * 3 // 2, dtype=torch.uint8, device="cuda")
        dst = torch.empty_like(src)
        for fmt, other in (("int8-row", "fp8-row"), ("fp8-row", "int8-row")):
            wq, ws = ops.quant_weight(w, fmt)
            xq, xs = ops.act_quant(x, fmt)
            dt = xq.dtype
            fns = {"aq": lambda fmt=fmt: Q.act_quant(x, fmt),
                   "gemm": lambda: G.scaled_mm(xq, xs, wq, ws, fmt, bias),
                   "aq+gemm": lambda fmt=fmt: G.scaled_mm(*Q.act_quant(x, fmt), wq, ws, fmt, bias),
                   "linear": lambda: ops.linear(x, wq, ws, fmt, bias),
                   f"aq({other})+gemm": lambda other=other, dt=dt: (lambda q, s: G.scaled_mm(q.view(dt), s, wq, ws, fmt, bias))(
                       *Q.act_quant(x, other)),
                   "copy+gemm": lambda: (dst.copy_(src), G.scaled_mm(xq, xs, wq, ws, fmt, bias)),
                   "readxq+gemm": lambda: (xq.view(torch.uint8)[::64].sum(), G.scaled_mm(xq, xs, wq, ws, fmt, bias))}  # fmt: skip
            res = {}
            with contextlib.ExitStack() as stack:
                graphs = {nm: stack.enter_context(captured(fn)).replay for nm, fn in fns.items()}
                for rnd in range(2):
                    for nm, g in graphs.items():
                        t, cl = clocks_during(lambda g=g: timed(g, 30.0, 300.0, min_calls=10))
                        res.setdefault(nm, {"us": [], "mhz": [], "w": []})
                        res[nm]["us"].append(t * 1e3)
                        res[nm]["mhz"] += [c for c, _ in cl]
                        res[nm]["w"] += [p for _, p in cl]
            row = {"M": m, "N": n, "K": k, "fmt": fmt}
            for nm, v in res.items():
                row[nm] = {"us": statistics.median(v["us"]), "mhz": statistics.median(v["mhz"]) if v["mhz"] else None,
                           "w": statistics.median(v["w"]) if v["w"] else None}  # fmt: skip
            rows.append(row)
            print(f"  {fmt:8s} {m}x{n}x{k}: " + " | ".join(f"{nm} {row[nm]['us']:.1f}us {row[nm]['mhz']}MHz {row[nm]['w']}W"
                                                          for nm in res), flush=True)  # fmt: skip
        del x, w, src, dst
        torch.cuda.empty_cache()
    report["lingap"] = rows
    return 0


def part_epi(args, report) -> int:
    """Round 6: ``_scaled_mm_kernel`` with one ``_epilogue`` call (the tail's sum joins the accumulator) against
    the previous three-call kernel: the previous one spills 128 registers in its tail-split int8 / fp8 128x256
    kernels. ``--old-gemm PATH``: that kernel's module (round 6 ran 676bfc4's ``src/ditq/kernels/gemm.py`` with its
    relative imports made absolute). Same configs, bit-equality, then settled interleaved timing."""
    import importlib.util

    spec = importlib.util.spec_from_file_location("ditq_gemm_old", args.old_gemm)
    OLD = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = OLD  # dataclasses look their module up
    spec.loader.exec_module(OLD)

    failures = 0
    rows = []
    shapes = [s for s in SHAPES if s[1] >= 4096]
    for tag, m, n, k in shapes:
        x = torch.randn(m, k, device="cuda", dtype=torch.bfloat16)
        w = torch.randn(n, k, device="cuda", dtype=torch.bfloat16) * 0.02
        bias = torch.randn(n, device="cuda", dtype=torch.bfloat16) * 0.1
        fns = {"bf16": lambda: torch.nn.functional.linear(x, w, bias)}
        for fmt in args.formats.split(","):
            f = F.get_format(fmt)
            wq, ws = ops.quant_weight(w, fmt)
            xq, xs = ops.act_quant(x, fmt)
            c = CF.get_config(fmt, m, n, k)
            y_new = G.scaled_mm(xq, xs, wq, ws, f, bias, torch.bfloat16, config=c)
            y_old = OLD.scaled_mm(xq, xs, wq, ws, f, bias, torch.bfloat16, config=OLD.Config.from_list(c.as_list()))
            if not torch.equal(y_new, y_old):
                failures += 1
                print(f"FAIL {fmt} {m}x{n}x{k}: new epilogue differs (max {float((y_new.float() - y_old.float()).abs().max()):.3g})")
            fns[f"{fmt} new"] = lambda xq=xq, xs=xs, wq=wq, ws=ws, f=f, c=c: G.scaled_mm(xq, xs, wq, ws, f, bias, torch.bfloat16, config=c)
            oc = OLD.Config.from_list(c.as_list())
            fns[f"{fmt} old"] = lambda xq=xq, xs=xs, wq=wq, ws=ws, f=f, oc=oc: OLD.scaled_mm(xq, xs, wq, ws, f, bias, torch.bfloat16, config=oc)
        times = _interleaved(fns, _settled, 2)
        ratio = _round_ratios(times)
        rows.append({"M": m, "N": n, "K": k, "ratio": ratio, "ms": times})
        print(f"  {m}x{n}x{k} " + " ".join(f"{nm}={r:.3f}" for nm, r in ratio.items() if nm != "bf16"), flush=True)
        del x, w, fns
        torch.cuda.empty_cache()
    import math

    geo = {nm: math.exp(sum(math.log(r["ratio"][nm]) for r in rows) / len(rows)) for nm in rows[0]["ratio"]}
    print("  geomean M >= 4096 (GEMM alone, settled): " + " ".join(f"{nm}={g:.3f}" for nm, g in geo.items()))
    report["epi"] = {"rows": rows, "geomean_M_ge_4096": geo}
    return failures


def part_act(args, report) -> int:
    a = torch.empty(1 << 30, dtype=torch.uint8, device="cuda")
    b = torch.empty_like(a)
    copy_gbps = 2 * a.numel() / bench(lambda: b.copy_(a)) / 1e6
    del a, b
    print(f"\n# act quant (int8-row), copy {copy_gbps:.0f} GB/s; GB/s per (rows, warps)")
    out = []
    f = F.get_format("int8-row")
    sizes = ((1024, 3072), (4608, 3072), (4608, 12288), (4608, 15360), (8192, 1792), (8192, 7168),
             (16384, 4096), (32760, 5120), (32760, 13824))
    for m, k in sizes:
        x = torch.randn(m, k, device="cuda", dtype=torch.bfloat16)
        q = torch.empty(m, k, dtype=torch.int8, device="cuda")
        s = torch.empty(m, 1, dtype=torch.float32, device="cuda")
        qr, sr = Q.act_quant(x, f)
        block = 1 << (k - 1).bit_length()
        res = {}
        configs = [(rows, warps) for rows in (1, 2, 4, 8) for warps in (4, 8, 16) if 8 <= rows * block // (32 * warps) <= 64]
        for cfg in configs:
            rows, warps = cfg[:2]
            spec = Q.act_quant_spec(x, q, s, f, False, config=cfg)
            q.fill_(-128)
            Q.launch(spec)
            if not (torch.equal(q, qr) and torch.equal(s, sr)):
                print(f"FAIL act quant {m}x{k} config {cfg}")
                return 1
            ts = [bench(lambda: Q.launch(spec)) for _ in range(args.rounds)]
            res[f"{rows}x{warps}w"] = statistics.median(ts)
        nbytes = m * k * 3 + 4 * m
        shipped = Q.token_config(k)
        line = {kk: nbytes / t / 1e6 for kk, t in res.items()}
        out.append({"M": m, "K": k, "ms": res, "GBps": line, "shipped": list(shipped)})
        bestk = max(line, key=line.get)
        print(f"  {m:6d}x{k:<6d} shipped {shipped} {line.get(f'{shipped[0]}x{shipped[1]}w', 0):5.0f} | best {bestk} "
              f"{line[bestk]:5.0f} ({line[bestk] / copy_gbps:.0%}) | " + " ".join(f"{kk}={v:.0f}" for kk, v in line.items()),
              flush=True)  # fmt: skip
    report["act"] = {"copy_GBps": copy_gbps, "shapes": out}
    return 0


def main() -> int:
    p = argparse.ArgumentParser()
    p.add_argument("--part", default="plans,gemm,act")
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--formats", default=",".join(FMTS))
    p.add_argument("--quick", action="store_true")
    p.add_argument("--old-gemm", default="bench/_gemm_old.py", help="part epi: the previous gemm module's path")
    p.add_argument("--gluon-persistent", action="store_true", help="part gluon: the persistent TMA-store kernel (round 6)")
    p.add_argument("--settled", action="store_true", help="part gemm: settled timing, shapes with M >= 4096")
    p.add_argument("--block-occupancy", action="store_true",
                   help="part gemm: size the tail split by the block kernels' occupancy (product tile registers)")
    p.add_argument("--bk256", action="store_true", help="part gemm: 256-wide K step variants, settled timing")
    p.add_argument("--gblock-ws", action="store_true", help="part gblock: the warp-specialized kernel (round 7)")
    p.add_argument("--gluon-all", action="store_true", help="part gluon: also the 3-stage and 256x128 variants")
    args = p.parse_args()
    report = {"gpu": torch.cuda.get_device_name(), "torch": torch.__version__, "date": time.strftime("%Y-%m-%d %H:%M"),
              "smi_start": smi()}  # fmt: skip
    print(f"# {report['gpu']} | smi (sm MHz, max MHz, W, limit W, C): {report['smi_start']}", flush=True)
    failures = 0
    t0 = time.time()
    for part in args.part.split(","):
        failures += {"gemm": part_gemm, "plans": part_plans, "act": part_act, "gap": part_gap, "lintune": part_lintune,
                     "power": part_power, "gluon": part_gluon, "gblock": part_gblock, "wsrow": part_wsrow, "lingap": part_lingap, "epi": part_epi}[part](args, report)
        print(f"== {part}: {time.time() - t0:.0f} s, smi {smi()}", flush=True)
        report["failures"] = failures
        with open(os.path.join(os.environ.get("OUT", "/tmp"), "probe.json"), "w") as fh:  # after every part
            json.dump(report, fh, indent=1)
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
