"""GPU check and timing of the block-format experiments of issue 3, round 3, against the two-kernel path
(act_quant + scaled_mm, what ops.linear runs) and cuBLAS bf16, at the issue-3 shapes with M >= 1024.

Parts (``--part a,b``; correctness first in each, against the float64 product of the quantized operands):
- ``sweep``: the fused block linear (src/ditq/kernels/fused.py), every configuration in CFGS at every shape,
  exact-match fraction vs the two-kernel result, registers / spills of each compiled variant.
- ``check``: the fused kernel's default configuration and two 8-warp probes at four shapes (bit-exactness).
- ``probe``: an fp8-block GEMM whose wgmma accumulates in place (``_fp8_block_rescaled_kernel``) vs the
  shipped fp8-block GEMM.
- ``int8row``: int8-row GEMM configurations at 1024x3072x3072 (CUDA-graph GPU time) and ops.linear there.
Writes $OUT/fused.json (or --json PATH).

    PYTHONPATH=src python3 bench/fused_gpu.py --part sweep,int8row      # round 3, first GPU call
    PYTHONPATH=src python3 bench/fused_gpu.py --part check,probe,int8row  # second GPU call
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
import time

import torch
import triton
from triton.testing import do_bench

from ditq import formats as F
from ditq.bench.gemm import SHAPES, _graph_ms
from ditq.kernels import configs as CF
from ditq.kernels import fused as FU
from ditq.kernels import gemm as G
from ditq.kernels import ops
from ditq.kernels import quant as Q
from ditq.kernels.fused import FusedConfig as FC
from ditq.kernels.gemm import _tile_coords
from ditq.kernels.quant import cast_rne
import triton.language as tl


@triton.jit(do_not_specialize=["M"])
def _fp8_block_rescaled_kernel(x_desc, w_desc, xs_ptr, ws_ptr, bias_ptr, out_ptr, M, N, K, stride_om, stride_xsm,
                               stride_wsn, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, GROUP_M: tl.constexpr):  # fmt: skip
    """Probe: fp8-block GEMM whose wgmma accumulates in place. acc holds sum_j s_j P_j / s_k (s_k = x_scale[m, k]
    * w_scale[k] of the latest K block), so each step is acc *= s_prev / s_k, then acc += P_k by the tensor
    cores: one multiply per element and no separate partial-product registers (the current kernel keeps a
    fresh product tile and adds it with an FFMA), which frees 64 registers per thread for more programs per SM."""
    off_m, off_n = _tile_coords(tl.program_id(0), M, N, BLOCK_M, BLOCK_N, GROUP_M)
    rm = off_m + tl.arange(0, BLOCK_M)
    xs_row = xs_ptr + (rm % M).to(tl.int64) * stride_xsm
    ws_row = ws_ptr + (off_n // 128) * stride_wsn
    acc = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
    s_prev = tl.full([BLOCK_M], 1.0, tl.float32)
    for kb in range(0, K // 128):
        a = x_desc.load([off_m, kb * 128])
        b = w_desc.load([off_n, kb * 128])
        s = tl.load(xs_row + kb) * tl.load(ws_row + kb)
        acc = tl.dot(a, tl.trans(b), acc * (s_prev / s)[:, None])
        s_prev = s
    y = acc * s_prev[:, None]
    rn = off_n + tl.arange(0, BLOCK_N)
    y += tl.load(bias_ptr + rn, mask=rn < N, other=0.0).to(tl.float32)[None, :]
    out = out_ptr + rm[:, None].to(tl.int64) * stride_om + rn[None, :]
    tl.store(out, cast_rne(y, out_ptr.dtype.element_ty, False), mask=(rm < M)[:, None] & (rn < N)[None, :])


def rescaled_mm(xq, xs, wq, ws, bias, bm, bn, warps, stages):
    from triton.tools.tensor_descriptor import TensorDescriptor

    m, k = xq.shape
    n = wq.shape[0]
    out = torch.empty(m, n, device=xq.device, dtype=torch.bfloat16)
    xd = TensorDescriptor(xq, [m, k], [k, 1], [bm, 128])
    wd = TensorDescriptor(wq, [n, k], [k, 1], [bn, 128])
    grid = (triton.cdiv(m, bm) * triton.cdiv(n, bn),)
    _fp8_block_rescaled_kernel[grid](xd, wd, xs, ws, bias, out, m, n, k, out.stride(0), xs.stride(0), ws.stride(0),
                                     BLOCK_M=bm, BLOCK_N=bn, GROUP_M=8, num_warps=warps, num_stages=stages)  # fmt: skip
    return out

CFGS = [
    FC(64, 128, 4, 3), FC(64, 128, 4, 4), FC(64, 128, 4, 3, x_tma=True), FC(64, 128, 4, 4, x_tma=True),
    FC(64, 128, 4, 3, maxnreg=168), FC(128, 128, 8, 3, x_tma=True), FC(64, 256, 8, 3), FC(64, 256, 8, 3, x_tma=True),
    FC(128, 256, 8, 2, x_tma=True),
]  # fmt: skip
FMTS = ("int8-block", "fp8-block")


def bench(fn, rep=30):
    return do_bench(fn, warmup=8, rep=rep, return_mode="median")


def _operands(m, n, k):
    x = torch.randn(m, k, device="cuda", dtype=torch.bfloat16)
    x[:, 5] *= 30  # an outlier channel, as real activations have
    w = torch.randn(n, k, device="cuda") * 0.02
    bias = torch.randn(n, device="cuda", dtype=torch.bfloat16) * 0.1
    return x, w, bias


def _check(rep, name, y, y2, ref, sub, bound=6e-3):
    """Relative errors of y and of the two-kernel y2 vs the float64 ref (first rows), exact-match fraction."""
    e_f, e_2 = F.relative_error(y[sub], ref), F.relative_error(y2[sub], ref)
    r = {"rel_err": e_f, "rel_err_two_kernel": e_2, "equal_fraction": float((y == y2).float().mean()),
         "max_abs_diff": float((y.float() - y2.float()).abs().max())}  # fmt: skip
    if not (math.isfinite(e_f) and e_f < bound and e_f < 1.5 * e_2 + 1e-6):
        rep["failures"] += 1
        print(f"FAIL {name}: {e_f:.2e} (two-kernel {e_2:.2e})", flush=True)
    return r


def part_check(rep):
    """Fused default config + 8-warp probes: bit-exactness vs the two-kernel path and time, four shapes."""
    cfgs = [None, FC(64, 128, 8, 3, x_tma=True), FC(64, 128, 8, 2, x_tma=True), FC(128, 128, 8, 2, x_tma=True)]
    for m, n, k in [(4608, 3072, 3072), (16384, 4096, 4096), (1024, 3072, 3072), (4608, 3072, 12288)]:
        x, w, bias = _operands(m, n, k)
        row = {"M": m, "N": n, "K": k, "us": {}, "check": {}}
        wb = w.bfloat16()
        row["us"]["bf16"] = bench(lambda: torch.nn.functional.linear(x, wb, bias)) * 1e3
        sub = slice(0, min(m, 4096))
        for fmt in FMTS:
            wq, ws = ops.quant_weight(w, fmt)
            xq, xs = Q.act_quant(x, fmt)
            y2 = G.scaled_mm(xq, xs, wq, ws, fmt, bias, torch.bfloat16)
            ref = F.linear_ref(x[sub], wq, ws, fmt, bias, torch.float64, torch.float64)
            row["us"][f"{fmt} two-kernel"] = bench(lambda: ops.linear(x, wq, ws, fmt, bias)) * 1e3
            for c in cfgs:
                name = f"{fmt} fused {'default' if c is None else c.as_list()}"
                try:
                    y = FU.fused_linear(x, wq, ws, fmt, bias, config=c)
                    row["check"][name] = _check(rep, f"{name} {m}x{n}x{k}", y, y2, ref, sub)
                    row["us"][name] = bench(lambda: FU.fused_linear(x, wq, ws, fmt, bias, config=c)) * 1e3
                except Exception as e:
                    print(f"  {name}: {type(e).__name__}: {str(e)[:120]}", flush=True)
            del ref, y2
        rep["check"].append(row)
        u = row["us"]
        print(f"check {m}x{n}x{k}: " + " ".join(f"{kk}={u['bf16'] / v:.2f}x" for kk, v in u.items() if kk != "bf16"), flush=True)
        print("   " + " ".join(f"{kk.split(' fused ')[-1]}: eq {v['equal_fraction']:.4f} err {v['rel_err']:.2e}/{v['rel_err_two_kernel']:.2e}"
                             for kk, v in row["check"].items()), flush=True)  # fmt: skip


# (the second GPU call also ran (128, 256, 8, 3): invalid for this kernel, which takes one weight scale per tile)
PROBE_CFGS = [(128, 128, 8, 3), (128, 128, 8, 4), (128, 128, 8, 2), (64, 128, 4, 3), (128, 128, 4, 3)]


def part_probe(rep):
    """fp8-block: in-place-accumulating GEMM (probe) vs the shipped GEMM (same quantized operands), all shapes."""
    for tag, m, n, k in [s for s in SHAPES if s[1] >= 1024]:
        x, w, bias = _operands(m, n, k)
        fmt = "fp8-block"
        wq, ws = ops.quant_weight(w, fmt)
        xq, xs = Q.act_quant(x, fmt)
        wb = w.bfloat16()
        row = {"M": m, "N": n, "K": k, "us": {}, "check": {}}
        row["us"]["bf16"] = bench(lambda: torch.nn.functional.linear(x, wb, bias)) * 1e3
        row["us"]["act_quant"] = bench(lambda: Q.act_quant(x, fmt)) * 1e3
        row["us"]["shipped"] = bench(lambda: G.scaled_mm(xq, xs, wq, ws, fmt, bias, torch.bfloat16)) * 1e3
        y2 = G.scaled_mm(xq, xs, wq, ws, fmt, bias, torch.bfloat16)
        sub = slice(0, min(m, 4096))
        ref = F.scaled_mm_ref(xq[sub], xs[sub], wq, ws, fmt, bias, torch.float64, torch.float64)
        for c in PROBE_CFGS:
            try:
                y = rescaled_mm(xq, xs, wq, ws, bias, *c)
                row["check"][str(c)] = _check(rep, f"probe {c} {m}x{n}x{k}", y, y2, ref, sub)
                row["us"][str(c)] = bench(lambda: rescaled_mm(xq, xs, wq, ws, bias, *c)) * 1e3
            except Exception as e:
                print(f"  probe {c}: {type(e).__name__}: {str(e)[:150]}", flush=True)
        rep["probe"].append(row)
        u = row["us"]
        best = min((v, kk) for kk, v in u.items() if kk.startswith("("))
        print(f"probe {m:6d} {n:6d} {k:6d}: bf16 {u['bf16']:.0f} us, shipped gemm {u['shipped']:.0f} us ({u['bf16'] / (u['shipped'] + u['act_quant']):.2f}x as linear), "
              f"best probe {best[1]} {best[0]:.0f} us ({u['bf16'] / (best[0] + u['act_quant']):.2f}x) | "
              + " ".join(f"{kk}={v:.0f}" for kk, v in u.items() if kk.startswith("(")), flush=True)  # fmt: skip
        del ref, y2, x, w, xq


def part_sweep(rep):
    """Every fused configuration at every shape (the first GPU call of round 3)."""
    shapes = [s for s in SHAPES if s[1] >= 1024]
    t_start = time.time()
    for tag, m, n, k in shapes:
        x = torch.randn(m, k, device="cuda", dtype=torch.bfloat16)
        x[:, 5] *= 30  # an outlier channel, as real activations have
        w = torch.randn(n, k, device="cuda") * 0.02
        bias = torch.randn(n, device="cuda", dtype=torch.bfloat16) * 0.1
        wb = w.bfloat16()
        row = {"model": tag, "M": m, "N": n, "K": k, "us": {}, "check": {}}
        row["us"]["bf16"] = bench(lambda: torch.nn.functional.linear(x, wb, bias)) * 1e3
        for fmt in FMTS:
            wq, ws = ops.quant_weight(w, fmt)
            # ---- correctness: fused vs float64 reference and vs the two-kernel path
            xq, xs = Q.act_quant(x, fmt)
            y2 = G.scaled_mm(xq, xs, wq, ws, fmt, bias, torch.bfloat16)
            yf = FU.fused_linear(x, wq, ws, fmt, bias)
            sub = slice(0, min(m, 4096))  # float64 reference on the first rows (memory, time)
            ref = F.linear_ref(x[sub], wq, ws, fmt, bias, torch.float64, torch.float64)
            e_f, e_2 = F.relative_error(yf[sub], ref), F.relative_error(y2[sub], ref)
            same = float((yf == y2).float().mean())
            maxd = float((yf.float() - y2.float()).abs().max())
            ok = math.isfinite(e_f) and e_f < 6e-3 and e_f < 1.5 * e_2 + 1e-6
            row["check"][fmt] = {"rel_err_fused": e_f, "rel_err_two_kernel": e_2, "equal_fraction": same, "max_abs_diff": maxd}
            if not ok:
                rep["failures"] += 1
                print(f"FAIL {fmt} {m}x{n}x{k}: fused {e_f:.2e} two-kernel {e_2:.2e}", flush=True)
            del ref, yf, y2
            # ---- timing
            row["us"][f"{fmt} two-kernel (ops.linear)"] = bench(lambda: ops.linear(x, wq, ws, fmt, bias)) * 1e3
            row["us"][f"{fmt} act_quant"] = bench(lambda: Q.act_quant(x, fmt)) * 1e3
            row["us"][f"{fmt} scaled_mm"] = bench(lambda: G.scaled_mm(xq, xs, wq, ws, fmt, bias, torch.bfloat16)) * 1e3
            best = None
            for c in CFGS:
                name = f"{fmt} fused {c.as_list()}"
                try:
                    t = bench(lambda: FU.fused_linear(x, wq, ws, fmt, bias, config=c)) * 1e3
                except Exception as e:  # a config that does not compile or fit: said, skipped
                    print(f"  {name}: {type(e).__name__}: {str(e)[:120]}", flush=True)
                    continue
                row["us"][name] = t
                key = f"{fmt} {c.as_list()}"
                if key not in rep["resources"]:
                    entry = Q.launch(FU.fused_linear_spec(x, wq.contiguous(), ws, F.get_format(fmt), bias,
                                                          torch.empty(m, n, device="cuda", dtype=torch.bfloat16), c, False))  # fmt: skip
                    ck = entry.ck
                    rep["resources"][key] = {"n_regs": ck.n_regs, "n_spills": ck.n_spills, "shared": ck.metadata.shared}
                if best is None or t < best[0]:
                    best = (t, c)
            if best is None:
                rep["failures"] += 1
                continue
            if m == 1024:  # host-bound region: GPU time from CUDA graphs for both paths
                row["us"][f"{fmt} two-kernel graph"] = _graph_ms(lambda: ops.linear(x, wq, ws, fmt, bias), bench) * 1e3
                row["us"][f"{fmt} fused graph best"] = _graph_ms(
                    lambda: FU.fused_linear(x, wq, ws, fmt, bias, config=best[1]), bench) * 1e3  # fmt: skip
                row["us"]["bf16 graph"] = _graph_ms(lambda: torch.nn.functional.linear(x, wb, bias), bench) * 1e3
            row.setdefault("best", {})[fmt] = [best[1].as_list(), best[0]]
            del xq, xs
        u = row["us"]
        rep["rows"].append(row)
        line = f"{tag:8s} {m:6d} {n:6d} {k:6d} bf16 {u['bf16']:8.1f} us |"
        for fmt in row.get("best", {}):
            b = row["best"][fmt]
            line += (f" {fmt}: 2k {u['bf16'] / u[f'{fmt} two-kernel (ops.linear)']:.2f}x"
                     f" (aq {u[f'{fmt} act_quant']:.0f} + mm {u[f'{fmt} scaled_mm']:.0f} us)"
                     f" fused {u['bf16'] / b[1]:.2f}x {b[0]} err {row['check'][fmt]['rel_err_fused']:.1e}"
                     f" eq {row['check'][fmt]['equal_fraction']:.3f} |")  # fmt: skip
        print(line, flush=True)
        print("    " + " ".join(f"{kk.split(' fused ')[-1] if ' fused ' in kk else kk}={v:.0f}"
                               for kk, v in u.items() if "fused" in kk), flush=True)  # fmt: skip
        del x, w, wb, bias
    print(f"# shapes done in {time.time() - t_start:.0f} s", flush=True)
    for key, r in rep["resources"].items():
        print(f"  {key}: {r}")


def part_int8row(rep):
    """int8-row at M=1024, 3072x3072 (the one shape below 1.0x): GEMM configurations and the shipped linear."""
    m, n, k = 1024, 3072, 3072
    x = torch.randn(m, k, device="cuda", dtype=torch.bfloat16)
    w = torch.randn(n, k, device="cuda") * 0.02
    bias = torch.randn(n, device="cuda", dtype=torch.bfloat16) * 0.1
    wq, ws = ops.quant_weight(w, "int8-row")
    xq, xs = Q.act_quant(x, "int8-row")
    wb = w.bfloat16()
    tb = _graph_ms(lambda: torch.nn.functional.linear(x, wb, bias), bench) * 1e3
    shipped = CF.get_config("int8-row", m, n, k)
    C = G.Config
    cs = [C(64, 128, 128, 8, 4, 4), C(64, 128, 128, 8, 4, 3), C(64, 128, 128, 8, 4, 2), C(64, 128, 128, 4, 4, 3),
          C(64, 128, 128, 16, 4, 3), C(64, 64, 128, 8, 4, 3), C(128, 128, 128, 8, 4, 3)]  # fmt: skip
    ref = G.scaled_mm(xq, xs, wq, ws, "int8-row", bias, torch.float32, config=shipped)
    for c in [shipped] + cs:
        try:
            y = G.scaled_mm(xq, xs, wq, ws, "int8-row", bias, torch.float32, config=c)
            err = F.relative_error(y, ref)
            t = _graph_ms(lambda: G.scaled_mm(xq, xs, wq, ws, "int8-row", bias, torch.bfloat16, config=c), bench) * 1e3
        except Exception as e:
            print(f"  int8-row {c.as_list()}: {type(e).__name__}: {str(e)[:100]}")
            continue
        rep["int8_row_1024"].append([c.as_list(), t, err])
    taq = _graph_ms(lambda: Q.act_quant(x, "int8-row"), bench) * 1e3
    print(f"\n# int8-row 1024x3072x3072 (graph GPU time): bf16 {tb:.1f} us, act_quant {taq:.1f} us, shipped {shipped.as_list()}")
    for c, t, err in sorted(rep["int8_row_1024"], key=lambda r: r[1]):
        print(f"  {c}: gemm {t:.1f} us, linear ~{tb / (t + taq):.2f}x bf16, err vs shipped {err:.1e}")
    rep["int8_row_1024_bf16_us"], rep["int8_row_1024_act_quant_us"] = tb, taq
    ops.clear_plans()
    rep["int8_row_1024_linear"] = {
        "eager_us": bench(lambda: ops.linear(x, wq, ws, "int8-row", bias)) * 1e3,
        "graph_us": _graph_ms(lambda: ops.linear(x, wq, ws, "int8-row", bias), bench) * 1e3,
        "bf16_eager_us": bench(lambda: torch.nn.functional.linear(x, wb, bias)) * 1e3,
        "config": CF.get_config("int8-row", m, n, k).as_list(),
    }
    r = rep["int8_row_1024_linear"]
    print(f"  ops.linear int8-row (config {r['config']}): eager {r['bf16_eager_us'] / r['eager_us']:.2f}x, graph {tb / r['graph_us']:.2f}x bf16")


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--part", default="check,probe,int8row")
    ap.add_argument("--json", default=os.path.join(os.environ.get("OUT", "."), "fused.json"))
    args = ap.parse_args()
    gpu = torch.cuda.get_device_name()
    print(f"# {gpu} torch {torch.__version__} triton {triton.__version__}", flush=True)
    torch.manual_seed(int(time.time()) & 0xFFFF)
    rep = {"gpu": gpu, "parts": args.part, "rows": [], "resources": {}, "int8_row_1024": [], "check": [], "probe": [],
           "failures": 0}  # fmt: skip
    t0 = time.time()
    for part in args.part.split(","):
        {"sweep": part_sweep, "check": part_check, "probe": part_probe, "int8row": part_int8row}[part](rep)
        print(f"# part {part} done at {time.time() - t0:.0f} s", flush=True)
        with open(args.json, "w") as fh:
            json.dump(rep, fh, indent=1)
    print(f"# wrote {args.json}; failures {rep['failures']}")
    return 1 if rep["failures"] else 0


if __name__ == "__main__":
    sys.exit(main())
