"""Issue 3, round 7: hardware counters of the GEMM kernels under Nsight Compute (the H200 machines run
Firecracker, where ncu reads counters; rounds 1-6 had none). One process builds the operands of one shape per
format, compiles every variant (first call), then calls each once inside an NVTX range named after it; ncu
profiles only those calls:

    ncu --clock-control none --nvtx --nvtx-include 'prof/' --section SpeedOfLight ... \\
        python3 bench/ncu_gemm.py --shape 16384,4096,4096

Variants: the shipped Triton GEMM of each format (``gemm.scaled_mm``, tuned config) and the warp-specialized
Gluon kernel of ``ditq.kernels.hopper`` (round 7's first run used the probe's 128-wide block kernel, at commit
658702e). Prints nothing of its own but the variant order.
"""

from __future__ import annotations

import argparse
import sys

import torch

from ditq.kernels import configs as CF
from ditq.kernels import gemm as G
from ditq.kernels import ops
from ditq.kernels.configs import WS_CONFIG


def main() -> int:
    p = argparse.ArgumentParser()
    p.add_argument("--shape", default="16384,4096,4096")
    p.add_argument("--variants", default="int8-row,fp8-row,int8-block,fp8-block,ws:int8-row,ws:int8-block,ws:fp8-block")
    a = p.parse_args()
    m, n, k = (int(v) for v in a.shape.split(","))
    torch.manual_seed(0)
    x = torch.randn(m, k, device="cuda", dtype=torch.bfloat16)
    w = torch.randn(n, k, device="cuda", dtype=torch.bfloat16) * 0.02
    bias = torch.randn(n, device="cuda", dtype=torch.bfloat16) * 0.1
    calls = {}
    for v in a.variants.split(","):
        fmt = v.split(":")[-1]
        wq, ws = ops.quant_weight(w, fmt)
        xq, xs = ops.act_quant(x, fmt)
        if v.startswith("ws:"):
            calls[v] = lambda xq=xq, xs=xs, wq=wq, ws=ws, fmt=fmt: G.scaled_mm(xq, xs, wq, ws, fmt, bias, config=WS_CONFIG)
        else:  # the Triton kernel's tuned configuration
            c = CF.tuned().get(CF.key(fmt, m, n, k)) or CF.heuristic(fmt, m, n, k)
            calls[v] = lambda xq=xq, xs=xs, wq=wq, ws=ws, fmt=fmt, c=c: G.scaled_mm(xq, xs, wq, ws, fmt, bias, config=c)
    for fn in calls.values():  # compile
        fn()
    torch.cuda.synchronize()
    for name, fn in calls.items():
        print(f"variant {name} {m}x{n}x{k}", flush=True)
        torch.cuda.nvtx.range_push("prof")
        fn()
        torch.cuda.nvtx.range_pop()
        torch.cuda.synchronize()
    return 0


if __name__ == "__main__":
    sys.exit(main())
