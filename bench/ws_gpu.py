"""Issue 3, round 4 probe: Triton 3.6's Hopper warp specialization (``tl.range(..., warp_specialize=True)``,
Meta's autoWS pass, which ``compiler.py`` runs for sm_90) on ditq's GEMMs, against the shipped kernels.

Round 3's notes name the block formats' limit: inside one program each 128-K block's wgmma must finish before
its partial product is scaled and added, and Triton overlapped that only across programs on an SM. With
warp specialization a producer warp group issues the TMA loads and two consumer warp groups (each 64 rows of a
128-row tile, 232 registers each after ``setmaxnreg``) run MMA + promotion; while one consumer promotes, the
other's wgmma can run (compiled on the CPU machine for sm_90a: 12 warps, ``setmaxnreg`` 40 / 232, 8 wgmma per
K step for a 128x128 tile at num_warps=4; num_warps=8 gets no partitions).

One process, correctness first (vs the shipped ``gemm.scaled_mm`` and the float64 product of the quantized
operands on the first rows), then CUDA-graph GPU time of the shipped GEMM and each warp-specialized
configuration; activation quantization is timed once per shape so the linear ratio vs cuBLAS bf16 can be
computed as the issue defines it. Writes $OUT/ws.json.

    PYTHONPATH=src python3 bench/ws_gpu.py

Outcome on an H200 (bench/NOTES.md, GEMM round 4): the warp-specialized launches never complete (deadlock),
the same kernel with warp_specialize=False is correct. Kept as the reproduction.
"""

from __future__ import annotations

import json
import math
import os
import sys

import torch
import triton
import triton.language as tl
from triton.testing import do_bench

from ditq import formats as F
from ditq.bench.gemm import _graph_ms
from ditq.kernels import gemm as G
from ditq.kernels import ops
from ditq.kernels import quant as Q
from ditq.kernels.gemm import _tile_coords


@triton.jit(do_not_specialize=["M"])
def _ws_kernel(x_desc, w_desc, xs_ptr, ws_ptr, bias_ptr, out_ptr, M, N, K, stride_om, stride_xsm, stride_xsk,
               stride_wsn, stride_wsk, IS_INT: tl.constexpr, BLOCK_SCALED: tl.constexpr, W_SCALE_ROW: tl.constexpr,
               BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, GROUP_M: tl.constexpr, WS: tl.constexpr):  # fmt: skip
    off_m, off_n = _tile_coords(tl.program_id(0), M, N, BLOCK_M, BLOCK_N, GROUP_M)
    rm = off_m + tl.arange(0, BLOCK_M)
    rn = off_n + tl.arange(0, BLOCK_N)
    n_kb = tl.cdiv(K, 128)
    if BLOCK_SCALED:
        xs_row = xs_ptr + (rm % M).to(tl.int64) * stride_xsm
        ws_row = ws_ptr + (off_n // 128) * stride_wsn
        acc = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
        for kb in tl.range(0, n_kb, warp_specialize=WS):
            a = x_desc.load([off_m, kb * 128])
            b = w_desc.load([off_n, kb * 128])
            p = tl.dot(a, tl.trans(b), out_dtype=tl.int32 if IS_INT else tl.float32)
            s = tl.load(xs_row + kb * stride_xsk) * tl.load(ws_row + kb * stride_wsk)
            acc += p.to(tl.float32) * s[:, None]
        y = acc
    else:
        acc = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.int32 if IS_INT else tl.float32)
        for kb in tl.range(0, n_kb, warp_specialize=WS):
            a = x_desc.load([off_m, kb * 128])
            b = w_desc.load([off_n, kb * 128])
            acc = tl.dot(a, tl.trans(b), acc, out_dtype=tl.int32 if IS_INT else tl.float32)
        xs = tl.load(xs_ptr + (rm % M).to(tl.int64) * stride_xsm)
        if W_SCALE_ROW:
            y = acc.to(tl.float32) * xs[:, None] * tl.load(ws_ptr + (rn % N) * stride_wsn)[None, :]
        else:
            y = acc.to(tl.float32) * (xs * tl.load(ws_ptr))[:, None]
    y += tl.load(bias_ptr + rn, mask=rn < N, other=0.0).to(tl.float32)[None, :]
    out = out_ptr + rm[:, None].to(tl.int64) * stride_om + rn[None, :]
    tl.store(out, y.to(out_ptr.dtype.element_ty), mask=(rm < M)[:, None] & (rn < N)[None, :])


def ws_mm(xq, xs, wq, ws, fmt: F.Format, bias, cfg):
    from triton.tools.tensor_descriptor import TensorDescriptor

    bm, bn, warps, stages, wspec = cfg
    m, k = xq.shape
    n = wq.shape[0]
    out = torch.empty(m, n, device=xq.device, dtype=torch.bfloat16)
    xd = TensorDescriptor(xq, [m, k], [k, 1], [bm, 128])
    wd = TensorDescriptor(wq, [n, k], [k, 1], [bn, 128])
    xs2 = xs if xs.dim() == 2 else xs[:, None]
    ws2 = ws if ws.dim() == 2 else ws[:, None]
    grid = (triton.cdiv(m, bm) * triton.cdiv(n, bn),)
    _ws_kernel[grid](xd, wd, xs2, ws2, bias, out, m, n, k, out.stride(0), xs2.stride(0), xs2.stride(1),
                     ws2.stride(0), ws2.stride(1), IS_INT=fmt.storage == torch.int8, BLOCK_SCALED=fmt.is_block,
                     W_SCALE_ROW=fmt.weight_granularity == "row", BLOCK_M=bm, BLOCK_N=bn, GROUP_M=8, WS=wspec,
                     num_warps=warps, num_stages=stages)  # fmt: skip
    return out


SHAPES = [(4608, 3072, 3072), (4608, 12288, 3072), (4608, 3072, 12288), (4608, 3072, 15360), (32760, 5120, 5120),
          (16384, 4096, 4096), (8192, 7168, 1792), (1024, 3072, 3072)]  # fmt: skip
# (BLOCK_M, BLOCK_N, num_warps, num_stages, warp_specialize)
CFGS = {
    "block": [(128, 128, 4, 3, True), (128, 128, 4, 4, True), (64, 128, 4, 3, True), (64, 128, 4, 4, True)],
    "row": [(128, 128, 4, 4, True), (128, 256, 4, 3, True), (128, 256, 4, 4, True), (128, 256, 8, 3, False)],
}
FMTS = ("int8-block", "fp8-block", "int8-row", "fp8-row")


def bench(fn):
    return _graph_ms(fn, lambda f: do_bench(f, warmup=5, rep=25, return_mode="median")) * 1e3


def main() -> int:
    torch.manual_seed(0)
    rep = {"gpu": torch.cuda.get_device_name(), "torch": torch.__version__, "triton": triton.__version__,
           "rows": [], "failures": 0}  # fmt: skip
    print(rep["gpu"], torch.__version__, triton.__version__, flush=True)
    for m, n, k in SHAPES:
        x = torch.randn(m, k, device="cuda", dtype=torch.bfloat16)
        x[:, 5] *= 30
        w = torch.randn(n, k, device="cuda") * 0.02
        bias = torch.randn(n, device="cuda", dtype=torch.bfloat16) * 0.1
        wb = w.to(torch.bfloat16)
        row = {"M": m, "N": n, "K": k, "us": {}}
        u = row["us"]
        u["bf16"] = bench(lambda: torch.nn.functional.linear(x, wb, bias))
        for fname in FMTS:
            fmt = F.get_format(fname)
            wq, ws = ops.quant_weight(w, fname)
            xq, xs = Q.act_quant(x, fname)
            u[f"{fname} act_quant"] = bench(lambda: Q.act_quant(x, fname))
            y0 = G.scaled_mm(xq, xs, wq, ws, fname, bias, torch.bfloat16)
            sub = slice(0, 64)
            ref = F.scaled_mm_ref(xq[sub], xs[sub], wq, ws, fname, bias, torch.float64, torch.float64)
            u[f"{fname} shipped"] = bench(lambda: G.scaled_mm(xq, xs, wq, ws, fname, bias, torch.bfloat16))
            best = None
            for cfg in CFGS["block" if fmt.is_block else "row"]:
                name = f"{fname} ws{cfg}"
                try:
                    y = ws_mm(xq, xs, wq, ws, fmt, bias, cfg)
                    torch.cuda.synchronize()
                except Exception as e:  # compile / launch failure: record it, go on
                    row.setdefault("errors", {})[name] = f"{type(e).__name__}: {str(e)[:300]}"
                    print(f"  {name}: FAILED {type(e).__name__}: {str(e)[:200]}", flush=True)
                    continue
                diff = float((y.float() - y0.float()).abs().max() / y0.float().abs().max())
                err = F.relative_error(y[sub], ref)
                row.setdefault("diff_vs_shipped", {})[name] = diff
                row.setdefault("rel_err_vs_ref", {})[name] = err
                if not (math.isfinite(diff) and diff < 2e-2):
                    rep["failures"] += 1
                    print(f"  FAIL {name}: max diff vs shipped {diff:.2e}", flush=True)
                    continue
                t = bench(lambda: ws_mm(xq, xs, wq, ws, fmt, bias, cfg))
                u[name] = t
                if best is None or t < best[0]:
                    best = (t, cfg)
            aq, sh = u[f"{fname} act_quant"], u[f"{fname} shipped"]
            line = f"{m:6d}x{n:6d}x{k:6d} {fname:10s} bf16 {u['bf16']:7.1f} us | shipped {sh:7.1f} ({u['bf16'] / (aq + sh):.2f}x linear)"
            if best:
                row.setdefault("best", {})[fname] = {"us": best[0], "cfg": list(best[1]),
                                                     "linear_ratio": u["bf16"] / (aq + best[0]),
                                                     "shipped_linear_ratio": u["bf16"] / (aq + sh)}
                line += f" | ws best {best[0]:7.1f} {best[1]} ({u['bf16'] / (aq + best[0]):.2f}x linear, {sh / best[0]:.2f}x the shipped GEMM)"
            print(line, flush=True)
        rep["rows"].append(row)
        out = os.environ.get("OUT", "/tmp")
        with open(os.path.join(out, "ws.json"), "w") as f:
            json.dump(rep, f, indent=1)
    big = [r for r in rep["rows"] if r["M"] >= 4096]
    for fname in FMTS:
        sh = [r["best"][fname]["shipped_linear_ratio"] for r in big if fname in r.get("best", {})]
        be = [max(r["best"][fname]["linear_ratio"], r["best"][fname]["shipped_linear_ratio"]) for r in big if fname in r.get("best", {})]
        if sh:
            g = lambda v: math.exp(sum(map(math.log, v)) / len(v))  # noqa: E731
            print(f"geomean M>=4096 {fname}: shipped {g(sh):.2f}x, best of shipped / ws {g(be):.2f}x (GPU time, linear incl. act quant)")
    print("failures", rep["failures"])
    return 1 if rep["failures"] else 0


if __name__ == "__main__":
    sys.exit(main())
