"""GPU timing of dynamic LoRA on a quantized linear: ``ditq.apply_lora(..., mode="dynamic")`` against the plain
8-bit linear at Flux shapes (M = 4608 tokens), ranks 16 and 64, one and two adapters. Checks correctness
first (against float64), then times with ``triton.testing.do_bench`` medians, all variants in one process.
Goal (issue 8): dynamic LoRA <= 15% over the plain 8-bit linear.

Variants timed (``model(x)`` of a one-layer model, so the module forward is included):
- ``dynamic``: what ditq runs (``ops.linear_lora``): one kernel quantizes x and computes xa = x @ A^T
  (``kernels.lora``), then the 8-bit GEMM adds xa @ B^T in its epilogue (y written once);
- ``dynamic cublas-xa``: the same GEMM epilogue, xa by a separate cuBLAS GEMM after act_quant;
- ``unfused``: the previous path (``lora.FUSE = False``): the plain 8-bit linear, then cuBLAS x @ A^T and
  ``y.addmm_(xa, B^T)``.
And the pieces: act_quant alone, act_quant + xa in one kernel (``--explore``: several tile shapes), the
cuBLAS x @ A^T, the GEMM alone with and without the LoRA epilogue, the cuBLAS bf16 linear.

Usage (repository root): PYTHONPATH=src python3 bench/lora_gpu.py [--formats int8-row,fp8-row]
[--ranks 16,64] [--compile] [--explore] [--json PATH]   (JSON defaults to $OUT/lora_gpu.json when $OUT is set)
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time

import torch
import torch.nn as nn
import torch.nn.functional as Fn

import ditq
from ditq import formats as F
from ditq.nn import lora as L

SHAPES = [(4608, 3072, 3072), (4608, 12288, 3072), (4608, 3072, 12288)]  # Flux qkv/proj, ff1, ff2
GOAL_PCT = 15.0
EXPLORE = [(32, 128, 4, 3), (16, 256, 4, 3), (32, 64, 4, 4), (64, 128, 8, 3)]  # kernels.lora tiles

try:
    import triton
except ImportError:  # pragma: no cover
    triton = None


def _lora_pair(n, k, r, gen, device):
    a = (torch.randn(r, k, generator=gen) / k**0.5).to(device, torch.bfloat16)
    b = (torch.randn(n, r, generator=gen) * 0.02).to(device, torch.bfloat16)
    return a, b


def _overhead(t, base):
    return 100.0 * (t / base - 1.0)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--formats", default="int8-row,fp8-row")
    p.add_argument("--ranks", default="16,64")
    p.add_argument("--rep", type=int, default=100, help="do_bench rep in ms per timing")
    p.add_argument("--compile", action="store_true", help="also time both under torch.compile (slow to build)")
    p.add_argument("--explore", action="store_true", help="time kernels.lora tile shapes (act_quant + x @ A^T)")
    p.add_argument("--shapes", default=None, help="MxNxK,... (default: the Flux shapes)")
    p.add_argument("--device", default="cuda", help="cpu: a smoke test of the script under TRITON_INTERPRET=1")
    p.add_argument("--json", default=None)
    args = p.parse_args(argv)
    shapes = [tuple(int(v) for v in s.split("x")) for s in args.shapes.split(",")] if args.shapes else SHAPES
    if args.device == "cuda" and not torch.cuda.is_available():
        print("bench/lora_gpu.py needs a CUDA GPU", file=sys.stderr)
        return 2
    if args.device == "cuda":
        from triton.testing import do_bench
    else:  # smoke test: one call, no timing

        def do_bench(fn, **_):
            fn()
            return 1e-3

    from ditq.kernels import gemm as G
    from ditq.kernels import lora as KL
    from ditq.kernels import ops

    def bench(fn):
        return do_bench(fn, warmup=max(25, args.rep // 4), rep=args.rep, return_mode="median") * 1e3  # us

    gpu = torch.cuda.get_device_name() if args.device == "cuda" else args.device
    fmts = [f for f in args.formats.split(",") if f]
    ranks = [int(r) for r in args.ranks.split(",") if r]
    print(f"# {gpu}  torch {torch.__version__}  triton {triton.__version__}  python {platform.python_version()}")
    out = {"gpu": gpu, "torch": torch.__version__, "triton": triton.__version__, "date": time.strftime("%Y-%m-%d %H:%M"),
           "command": "PYTHONPATH=src python3 bench/lora_gpu.py " + " ".join(sys.argv[1:] if argv is None else argv),
           "goal_pct": GOAL_PCT, "rows": [], "failures": []}  # fmt: skip
    dev = torch.device(args.device)
    gen = torch.Generator().manual_seed(0)
    rows = []

    def variant(fuse, fused_xa, fn):
        L.FUSE, KL.FUSED_XA = fuse, fused_xa
        try:
            return fn()
        finally:
            L.FUSE, KL.FUSED_XA = True, True

    for fmt in fmts:
        for m, n, k in shapes:
            torch.manual_seed(len(rows))
            layer = nn.Linear(k, n, device=dev, dtype=torch.bfloat16)
            w = layer.weight.detach().clone()
            layer.weight = nn.Parameter(ditq.quantize_weight(w, fmt), requires_grad=False)
            model = nn.Sequential(layer)
            x = torch.randn(m, k, device=dev, dtype=torch.bfloat16)
            row = {"format": fmt, "M": m, "N": n, "K": k, "us": {}, "overhead_pct": {}, "err": {}}
            with torch.no_grad():
                y_plain = model(x)
                wdq = layer.weight.dequantize(torch.float32).double()
                row["err"]["plain"] = F.relative_error(y_plain, x.double() @ wdq.t() + layer.bias.double())
                t_plain = bench(lambda: model(x))
                row["us"]["plain"] = t_plain
                row["us"]["bf16 cuBLAS"] = bench(lambda: Fn.linear(x, w, layer.bias))
                xq, xs = ops.act_quant(x, fmt)
                row["us"]["act_quant"] = bench(lambda: ops.act_quant(x, fmt))
                row["us"]["gemm"] = bench(lambda: G.scaled_mm(xq, xs, layer.weight.qdata, layer.weight.scale, fmt,
                                                              layer.bias, check=False))  # fmt: skip
                for r in ranks:
                    for n_ad in (1, 2):
                        pairs = [_lora_pair(n, k, r, gen, dev) for _ in range(n_ad)]
                        for i, (a, b) in enumerate(pairs):
                            L.apply_lora(model, {"0.lora_A.weight": a, "0.lora_B.weight": b}, scale=0.5 + i,
                                         mode="dynamic", adapter_name=f"a{i}")
                        tag = f"r{r}" + (f" x{n_ad}" if n_ad > 1 else "")
                        # correctness: against the kernel's own output plus the exact branch (float64): bf16
                        # rounding of y only; the branch must be far larger than that error for the check to mean
                        # anything. Fresh input; every variant.
                        xc = torch.randn(m, k, device=dev, dtype=torch.bfloat16)
                        base = Fn.linear(xc, layer.weight, layer.bias)  # the kernel alone
                        ref = sum((xc.double() @ a.double().t()) @ b.double().t() * (0.5 + i) for i, (a, b) in enumerate(pairs))
                        want = base.double() + ref
                        e_without = F.relative_error(base, want)
                        timed = {"dynamic": (True, True), "dynamic cublas-xa": (True, False), "unfused": (False, True)}
                        for name, (fuse, fxa) in timed.items():
                            try:
                                y = variant(fuse, fxa, lambda: model(xc))
                            except Exception as ex:  # noqa: BLE001 -- recorded, the other variants still run
                                out["failures"].append(f"{fmt} {m}x{n}x{k} {name} {tag}: {type(ex).__name__}: {ex}"[:400])
                                continue
                            e = F.relative_error(y, want)
                            row["err"][f"{name} {tag}"] = e
                            if not (e < 1e-2 and e_without > 5 * e and torch.isfinite(y).all()):
                                out["failures"].append(f"{fmt} {m}x{n}x{k} {name} {tag}: error {e:.3g} (without LoRA {e_without:.3g})")
                            t = variant(fuse, fxa, lambda: bench(lambda: model(x)))
                            row["us"][f"{name} {tag}"] = t
                            row["overhead_pct"][f"{name} {tag}"] = _overhead(t, t_plain)
                        if n_ad == 1 and f"dynamic {tag}" in row["us"]:  # the pieces, with this adapter's operands
                            slot = layer.ditq_lora
                            A, B = slot.packed_A, slot.packed_B
                            xa = Fn.linear(x, A)
                            row["us"][f"x@A^T cuBLAS {tag}"] = bench(lambda: Fn.linear(x, A))
                            row["us"][f"act_quant+xa {tag}"] = bench(lambda: KL.act_quant_lora(x, fmt, A))
                            row["us"][f"gemm+lora {tag}"] = bench(lambda: G.scaled_mm(
                                xq, xs, layer.weight.qdata, layer.weight.scale, fmt, layer.bias, check=False,
                                lora_xa=xa, lora_b=B))  # fmt: skip
                            row["overhead_pct"][f"gemm epilogue {tag}"] = _overhead(row["us"][f"gemm+lora {tag}"], row["us"]["gemm"])
                            if args.explore and fmt == fmts[0]:  # the kernel differs only in its cast
                                _explore(row, bench, KL, x, fmt, A, tag)
                        L.remove_lora(model)
                        if not torch.equal(model(xc), base):
                            out["failures"].append(f"{fmt} {m}x{n}x{k} {tag}: removal did not restore the output")
                if args.compile:
                    _compiled(row, bench, model, x, n, k, ranks[-1], gen, dev)
            rows.append(row)
            out["rows"].append(row)
            print(_line(row), flush=True)

    for name in ("dynamic", "dynamic cublas-xa", "unfused"):
        print(f"\n{name}: | format | M x N x K | plain 8-bit us | bf16 us | " + " | ".join(
            f"r{r} (+%) | r{r} x2 (+%)" for r in ranks) + " |")
        print("|---|---|---|---|" + "---|---|" * len(ranks))
        for row in rows:
            cells = []
            for r in ranks:
                for tag in (f"{name} r{r}", f"{name} r{r} x2"):
                    cells.append(f"{row['us'][tag]:.1f} ({row['overhead_pct'][tag]:+.1f}%)" if tag in row["us"] else "failed")
            print(f"| {row['format']} | {row['M']}x{row['N']}x{row['K']} | {row['us']['plain']:.1f} | "
                  f"{row['us']['bf16 cuBLAS']:.1f} | " + " | ".join(cells) + " |")
    worst = max((v for row in rows for k, v in row["overhead_pct"].items() if k.startswith("dynamic r")), default=float("nan"))
    print(f"\nworst dynamic overhead: {worst:+.1f}% (goal <= {GOAL_PCT:.0f}%): {'MET' if worst <= GOAL_PCT else 'NOT MET'}")
    out["worst_dynamic_overhead_pct"] = worst
    out["lora_configs"] = {f"{c.as_list()} r{r} {e}B": got.as_list() for (c, r, e), got in G._LORA_CONFIGS.items()}
    for f in out["failures"]:
        print("FAIL", f)
    path = args.json or (os.path.join(os.environ["OUT"], "lora_gpu.json") if os.environ.get("OUT") else None)
    if path:
        with open(path, "w") as fh:
            json.dump(out, fh, indent=1)
        print(f"# wrote {path}")
    return 1 if out["failures"] else 0


def _explore(row, bench, KL, x, fmt, A, tag):
    """act_quant + x @ A^T in one kernel at several (BLOCK_M, BLOCK_K, warps, stages)."""
    saved = (KL.BLOCK_M, KL.BLOCK_K, KL.NUM_WARPS, KL.NUM_STAGES)
    try:
        for cfg in EXPLORE:
            KL.BLOCK_M, KL.BLOCK_K, KL.NUM_WARPS, KL.NUM_STAGES = cfg
            row["us"][f"act_quant+xa {tag} {cfg}"] = bench(lambda: KL.act_quant_lora(x, fmt, A))
    finally:
        KL.BLOCK_M, KL.BLOCK_K, KL.NUM_WARPS, KL.NUM_STAGES = saved


def _compiled(row, bench, model, x, n, k, r, gen, dev):
    """torch.compile(model) plain vs with one dynamic adapter of rank r."""
    torch._dynamo.reset()
    compiled = torch.compile(model, fullgraph=True)
    t0 = time.perf_counter()
    compiled(x)
    row["compile_s"] = time.perf_counter() - t0
    row["us"]["compiled plain"] = bench(lambda: compiled(x))
    a, b = _lora_pair(n, k, r, gen, dev)
    L.apply_lora(model, {"0.lora_A.weight": a, "0.lora_B.weight": b}, mode="dynamic", adapter_name="c")
    compiled(x)
    t = bench(lambda: compiled(x))
    row["us"][f"compiled dynamic r{r}"] = t
    row["overhead_pct"][f"compiled dynamic r{r}"] = _overhead(t, row["us"]["compiled plain"])
    L.remove_lora(model)


def _line(row) -> str:
    us = ", ".join(f"{k} {v:.1f}" for k, v in row["us"].items())
    errs = ", ".join(f"{k} {v:.1e}" for k, v in row["err"].items())
    return f"{row['format']} {row['M']}x{row['N']}x{row['K']}: us: {us}\n    errors: {errs}"


if __name__ == "__main__":
    sys.exit(main())
