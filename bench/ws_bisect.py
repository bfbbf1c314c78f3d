"""Issue 3, round 5: bisect round 4's hang of Triton 3.6's Hopper warp specialization. Each variant runs in its
own subprocess with a timeout, so a hung launch costs only that variant's seconds:

- bf16 / int8 / e4m3 operands, the same K loop (``tl.range(..., warp_specialize=True)``), 2 or 3 stages;
- the non-persistent tile loop and the persistent form Triton's own tutorial uses (``flatten=True``).

A variant prints ``ok`` with its max error vs torch and its time, or is killed. Writes $OUT/ws_bisect.json.

    PYTHONPATH=src python3 bench/ws_bisect.py            # all variants, one subprocess each
    PYTHONPATH=src python3 bench/ws_bisect.py --one NAME  # one variant (what each subprocess runs)
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time

VARIANTS = {  # name: (dtype, persistent, stages)
    "bf16 tile 3st": ("bf16", False, 3),
    "bf16 persistent 3st": ("bf16", True, 3),
    "int8 tile 2st": ("int8", False, 2),
    "int8 persistent 3st": ("int8", True, 3),
    "fp8 tile 3st": ("fp8", False, 3),
}


def one(name: str) -> None:
    import torch
    import triton
    import triton.language as tl
    from triton.testing import do_bench
    from triton.tools.tensor_descriptor import TensorDescriptor

    @triton.jit
    def store(c_ptr, acc, off_m, off_n, N, BM: tl.constexpr, BN: tl.constexpr):
        rm = off_m + tl.arange(0, BM)
        rn = off_n + tl.arange(0, BN)
        tl.store(c_ptr + rm[:, None] * N + rn[None, :], acc.to(tl.float32))

    @triton.jit
    def tile_kernel(a_desc, b_desc, c_ptr, M, N, K, BM: tl.constexpr, BN: tl.constexpr, BK: tl.constexpr,
                    IS_INT: tl.constexpr):  # fmt: skip
        pid = tl.program_id(0)
        nn = tl.cdiv(N, BN)
        off_m, off_n = (pid // nn) * BM, (pid % nn) * BN
        acc = tl.zeros([BM, BN], dtype=tl.int32 if IS_INT else tl.float32)
        for k in tl.range(0, tl.cdiv(K, BK), warp_specialize=True):  # the specialized loop is the K loop
            acc = tl.dot(a_desc.load([off_m, k * BK]), b_desc.load([off_n, k * BK]).T, acc,
                         out_dtype=tl.int32 if IS_INT else tl.float32)  # fmt: skip
        store(c_ptr, acc, off_m, off_n, N, BM, BN)

    @triton.jit
    def persistent_kernel(a_desc, b_desc, c_ptr, M, N, K, BM: tl.constexpr, BN: tl.constexpr, BK: tl.constexpr,
                          IS_INT: tl.constexpr, NUM_SMS: tl.constexpr):  # fmt: skip
        nn = tl.cdiv(N, BN)
        tiles = tl.cdiv(M, BM) * nn
        for tile in tl.range(tl.program_id(0), tiles, NUM_SMS, flatten=True, warp_specialize=True):  # the tile loop
            off_m, off_n = (tile // nn) * BM, (tile % nn) * BN
            acc = tl.zeros([BM, BN], dtype=tl.int32 if IS_INT else tl.float32)
            for k in range(tl.cdiv(K, BK)):
                acc = tl.dot(a_desc.load([off_m, k * BK]), b_desc.load([off_n, k * BK]).T, acc,
                             out_dtype=tl.int32 if IS_INT else tl.float32)  # fmt: skip
            store(c_ptr, acc, off_m, off_n, N, BM, BN)

    dt, persistent, stages = VARIANTS[name]
    m = n = k = 2048
    torch.manual_seed(0)
    if dt == "int8":
        a = torch.randint(-127, 128, (m, k), dtype=torch.int8, device="cuda")
        b = torch.randint(-127, 128, (n, k), dtype=torch.int8, device="cuda")
        ref = (a.double() @ b.double().t()).float()
        bk = 128
    else:
        a = torch.randn(m, k, device="cuda").to(torch.bfloat16 if dt == "bf16" else torch.float8_e4m3fn)
        b = torch.randn(n, k, device="cuda").to(a.dtype)
        ref = (a.double() @ b.double().t()).float()
        bk = 64 if dt == "bf16" else 128
    bm, bn = 128, 128
    c = torch.empty(m, n, device="cuda")

    def alloc(size, alignment, stream):
        return torch.empty(size, dtype=torch.int8, device="cuda")

    triton.set_allocator(alloc)
    ad = TensorDescriptor(a, [m, k], [k, 1], [bm, bk])
    bd = TensorDescriptor(b, [n, k], [k, 1], [bn, bk])
    sms = torch.cuda.get_device_properties(0).multi_processor_count
    if persistent:
        run = lambda: persistent_kernel[(sms,)](ad, bd, c, m, n, k, bm, bn, bk, dt == "int8", sms, num_warps=4,
                                                num_stages=stages)  # fmt: skip
    else:
        run = lambda: tile_kernel[(m // bm * (n // bn),)](ad, bd, c, m, n, k, bm, bn, bk, dt == "int8", num_warps=4,
                                                          num_stages=stages)  # fmt: skip
    t0 = time.time()
    ck = run()
    print(f"launched ({time.time() - t0:.1f} s incl. compile); partitions in TTGIR: "
          f"{ck.asm['ttgir'].count('ttg.warp_specialize')}, n_regs {ck.n_regs}", flush=True)
    torch.cuda.synchronize()
    err = float((c - ref).abs().max() / ref.abs().max())
    ms = do_bench(run, warmup=5, rep=25, return_mode="median")
    print(json.dumps({"name": name, "ok": err < 1e-2, "err": err, "us": ms * 1e3,
                      "TFLOPs": 2 * m * n * k / ms / 1e9}), flush=True)  # fmt: skip


def main() -> int:
    p = argparse.ArgumentParser()
    p.add_argument("--one")
    p.add_argument("--timeout", type=float, default=25)
    args = p.parse_args()
    if args.one:
        one(args.one)
        return 0
    out = {}
    for name in VARIANTS:
        t0 = time.time()
        try:
            r = subprocess.run([sys.executable, __file__, "--one", name], capture_output=True, text=True,
                               timeout=args.timeout)  # fmt: skip
            lines = (r.stdout + r.stderr).strip().splitlines()
            out[name] = {"rc": r.returncode, "tail": lines[-3:]}
        except subprocess.TimeoutExpired as e:
            so = e.stdout.decode() if isinstance(e.stdout, bytes) else (e.stdout or "")
            out[name] = {"rc": "timeout", "tail": so.strip().splitlines()[-2:]}
        print(f"{name:22s} {time.time() - t0:5.1f} s  {out[name]}", flush=True)
    with open(os.path.join(os.environ.get("OUT", "/tmp"), "ws_bisect.json"), "w") as fh:
        json.dump(out, fh, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
