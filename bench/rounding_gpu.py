"""Learned rounding on CUDA: time per 4096x4096 layer and output-error reduction vs round-to-nearest.

    PYTHONPATH=src python3 bench/rounding_gpu.py [--n 4096] [--k 4096] [--quick]

For every format: a low-rank-plus-noise weight and inputs with correlated, outlier-carrying channels
(the structure of tests/test_rounding.py, scaled up), calibration statistics from 4 x K rows, and fresh
rows that neither the moment nor the guard saw. Each variant is checked before it is timed (learned
never worse than nearest on the fresh rows; qdata on the grid), then timed as the best of `--reps`
synchronized runs. Prints a table; writes JSON to $OUT/rounding_gpu.json (or ./rounding_gpu.json).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
import time
from pathlib import Path

import torch

from ditq import formats as F
from ditq import rounding as R

FORMATS = ("int8-row", "int8-block", "fp8-tensor", "fp8-row", "fp8-block")
VARIANTS = {  # name -> learned_quantize options (calibration given unless data_free)
    "default": {},
    "no-scale-search": {"optimize_scale": False},
    "cd-1-sweep": {"iters": 1},
    "adamw-100": {"optimizer": "adamw", "iters": 100},
    "data-free-weight": {"data_free": True, "objective": "weight"},
    "data-free-svd": {"data_free": True, "objective": "svd"},
}


def structured_layer(n, k, device, seed=0, spectrum=1.0, noise=0.3, rank=64, outliers=32):
    g = torch.Generator(device=device).manual_seed(seed)
    u = torch.randn(n, rank, generator=g, device=device)
    v = torch.randn(k, rank, generator=g, device=device)
    w = (u * torch.logspace(0, -1, rank, device=device)) @ v.t() / math.sqrt(k)
    w += 0.02 * torch.randn(n, k, generator=g, device=device)
    q, _ = torch.linalg.qr(torch.randn(k, k, generator=g, device=device))
    spec = torch.arange(1, k + 1, device=device).float() ** -spectrum
    spec = spec / spec.mean()
    mu = 0.3 * torch.randn(k, generator=g, device=device)
    gain = torch.ones(k, device=device)
    gain[torch.randperm(k, generator=g, device=device)[:outliers]] = 20.0

    def sample(m, s):
        gg = torch.Generator(device=device).manual_seed(s)
        z = torch.randn(m, k, generator=gg, device=device) * spec.sqrt()
        return (z @ q.t() + noise * torch.randn(m, k, generator=gg, device=device) + mu) * gain

    return w, sample


def out_mse(x, w_dq, w):
    return float((x.double() @ (w_dq.double() - w.double()).t()).pow(2).mean())


def timed(fn, reps):
    sync = torch.cuda.synchronize if torch.cuda.is_available() else (lambda: None)
    best, out = math.inf, None
    for _ in range(reps):
        sync()
        t0 = time.perf_counter()
        out = fn()
        sync()
        best = min(best, time.perf_counter() - t0)
    return best, out


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--n", type=int, default=4096)
    ap.add_argument("--k", type=int, default=4096)
    ap.add_argument("--reps", type=int, default=2)
    ap.add_argument("--quick", action="store_true", help="default variant only")
    ap.add_argument("--cpu", action="store_true", help="run on the CPU (smoke test / CPU timings)")
    args = ap.parse_args()
    if not args.cpu and not torch.cuda.is_available():
        print("rounding_gpu: needs CUDA (or --cpu)", file=sys.stderr)
        return 2
    dev = torch.device("cpu" if args.cpu else "cuda")
    gpu = "cpu" if args.cpu else torch.cuda.get_device_name()
    n, k = args.n, args.k
    w, sample = structured_layer(n, k, dev)
    stats = R.LayerStats.from_activations(sample(4 * k, 1), heldout_fraction=0.0625)  # 3840 fit, 256 held out
    fresh = sample(4096, 2)
    # warm-up (CUDA context, cuSOLVER, kernels) on a small layer
    ws, ss = structured_layer(256, 256, dev, seed=9)
    R.learned_quantize(ws, "int8-row", R.LayerStats.from_activations(ss(1024, 1)), device=dev)
    variants = {"default": {}} if args.quick else VARIANTS
    rows = []
    for fmt in FORMATS:
        t_near, (q0, s0) = timed(lambda: F.quantize_weight_ref(w, fmt), args.reps)
        mse0 = out_mse(fresh, F.dequantize_ref(q0, s0, fmt), w)
        for vname, opts in variants.items():
            opts = dict(opts)
            cal = None if opts.pop("data_free", False) else stats
            if vname != "default" and fmt not in ("int8-block", "fp8-tensor", "int8-row"):
                continue
            t, (q, s, rep) = timed(lambda: R.learned_quantize(w, fmt, cal, device=dev, **opts), args.reps)
            mse1 = out_mse(fresh, F.dequantize_ref(q, s, fmt), w)
            # correctness before the number counts: on the grid, shapes right, never worse on fresh rows
            assert q.dtype == F.get_format(fmt).storage and tuple(s.shape) == F.get_format(fmt).weight_scale_shape(n, k)
            ok = mse1 <= mse0 * (1 + 1e-9) or rep["heldout_rows"] == 0
            rows.append({
                "format": fmt, "variant": vname, "seconds": t, "nearest_seconds": t_near,
                "fresh_mse_reduction": 1 - mse1 / mse0, "heldout_reduction": rep["heldout_reduction"],
                "objective": rep["objective"], "scale": rep.get("scale"), "fallback": rep["fallback"],
                "w8a8_error_nearest": rep["w8a8_error_nearest"], "w8a8_error_learned": rep["w8a8_error_learned"],
                "changed_fraction": rep["changed_fraction"], "never_worse": ok, "worse_than_nearest": mse1 > mse0,
            })
            r = rows[-1]
            print(f"{fmt:11s} {vname:17s} {t:7.3f} s  fresh-row output MSE {100 * r['fresh_mse_reduction']:+6.1f}%  "
                  f"{'fallback' if r['fallback'] else 'learned '}  "
                  f"{'WORSE' if not ok else 'worse (no held-out data)' if mse1 > mse0 else 'ok'}", flush=True)
    result = {"gpu": gpu, "torch": torch.__version__, "shape": [n, k], "calibration_rows": stats.count,
              "heldout_rows": int(stats.sample.shape[0]), "fresh_rows": fresh.shape[0], "rows": rows}
    out_dir = Path(os.environ.get("OUT", "."))
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / "rounding_gpu.json").write_text(json.dumps(result, indent=1))
    print(f"\n{gpu}, {n}x{k}; wrote {out_dir / 'rounding_gpu.json'}")
    return 0 if all(r["never_worse"] for r in rows) else 1


if __name__ == "__main__":
    sys.exit(main())
