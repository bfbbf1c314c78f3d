"""`ditq bench attention`: accuracy first (cosine, relative L1, RMSE against FP32 attention on inputs whose
K carries a per-channel bias, as real DiT keys do), then TFLOP/s of SDPA's flash, cuDNN and
memory-efficient backends, SageAttention when importable (its ``sageattn`` with smooth_k=True, on a copy of
K since it smooths K in place), and ditq (pv="fp8" and "bf16"), all in one run.
TFLOP/s are counted as 4 * B * H * N^2 * D (half of it when causal), timed eagerly (``do_bench``, which
includes the host's launch cost wherever the host is the slower side) and as CUDA-graph replays (the GPU
alone); host time per call is reported too. ``--tune`` also sweeps kernel
configs (tile shapes, warps, stages) at a few shapes and reports the fastest per head dim and pv mode."""

from __future__ import annotations

import datetime
import json
import math
import platform
import sys

import torch

from ..errors import DitqError

MUTATES_K = {"sageattention"}  # variants that modify K in place: timed on a copy
# variants also timed as one CUDA-graph replay (no host launch cost), cuDNN last: a failed capture is reported
GRAPHED = ("ditq-fp8", "ditq-bf16", "sageattention", "sdpa-cudnn")

# (B, H, N, D, causal)
SHAPES = [
    (1, 24, 4608, 128, False),  # Flux 1024px
    (1, 40, 32760, 128, False),  # Wan-14B 480p 81 frames
    (2, 24, 4096, 64, False),
    (2, 48, 17776, 64, False),  # CogVideoX-like
    (1, 32, 16384, 128, False),
    (1, 32, 16384, 128, True),
]
K_BIAS = 4.0  # std of K's per-channel bias, in units of the token-to-token std
INPUTS = f"q, v ~ N(0, 1); k ~ N(0, 1) + b, b ~ N(0, {K_BIAS}^2) per channel shared by all tokens; bf16"

# candidate (BLOCK_M, BLOCK_N, num_warps, num_stages, int-trick, maxnreg) per (D, pv); maxnreg 168 lets three
# one-warpgroup programs share an SM
TUNE = {
    (128, "fp8"): [(64, 128, 4, 3, 1, 0), (64, 64, 4, 4, 1, 0), (64, 64, 4, 3, 1, 168), (64, 64, 4, 2, 1, 168),
                   (64, 128, 4, 2, 1, 168)],
    (128, "bf16"): [(128, 64, 8, 3, 1, 0), (64, 128, 4, 2, 1, 0), (64, 64, 4, 2, 1, 168)],
    (64, "fp8"): [(64, 128, 4, 3, 1, 0), (64, 64, 4, 4, 1, 0), (64, 64, 4, 3, 1, 0), (64, 128, 4, 2, 1, 168)],
    (64, "bf16"): [(64, 128, 4, 3, 1, 0), (64, 64, 4, 3, 1, 0)],
}
TUNE_SHAPES = [(1, 24, 4608, 128, False), (1, 32, 16384, 128, False), (2, 24, 4096, 64, False),
               (2, 48, 17776, 64, False)]

def add_arguments(parser) -> None:
    parser.add_argument("--json", metavar="F", help="write the results to this JSON file")
    parser.add_argument("--tune", action="store_true", help="also sweep kernel configs (slower)")
    parser.add_argument("--shapes", metavar="B,H,N,D[,c]", nargs="*", help="shapes to run instead of the defaults")
    parser.add_argument("--rep", type=int, default=100, help="milliseconds of timed repetitions per variant")


def _parse_shape(s: str):
    parts = s.split(",")
    B, H, N, D = (int(x) for x in parts[:4])
    return B, H, N, D, len(parts) > 4 and parts[4].lower() in ("c", "causal", "1", "true")


def make_inputs(B, H, N, D, device, seed=0):
    g = torch.Generator(device=device).manual_seed(seed)
    q = torch.randn(B, H, N, D, device=device, generator=g)
    k = torch.randn(B, H, N, D, device=device, generator=g)
    k += K_BIAS * torch.randn(1, H, 1, D, device=device, generator=g)
    v = torch.randn(B, H, N, D, device=device, generator=g)
    return q.bfloat16(), k.bfloat16(), v.bfloat16()


def accuracy(out: torch.Tensor, ref: torch.Tensor) -> dict:
    o, r = out.float().flatten(), ref.float().flatten()
    return {
        "cos": torch.nn.functional.cosine_similarity(o.double(), r.double(), dim=0).item(),
        "rel_l1": ((o - r).abs().sum() / r.abs().sum()).item(),
        "rmse": (o - r).pow(2).mean().sqrt().item(),
    }


def _sdpa(backend):
    from torch.nn.attention import sdpa_kernel

    def run(q, k, v, causal):
        with sdpa_kernel(backend):
            return torch.nn.functional.scaled_dot_product_attention(q, k, v, is_causal=causal)

    return run


def _variants(configs=None):
    """Timed callables; ``configs`` {(D, pv): config} overrides ditq's built-in table (the tuned choice)."""
    configs = configs or {}

    from torch.nn.attention import SDPBackend

    from ..attn import attention

    v = {
        "sdpa-flash": _sdpa(SDPBackend.FLASH_ATTENTION),
        "sdpa-cudnn": _sdpa(SDPBackend.CUDNN_ATTENTION),
        "sdpa-mem-efficient": _sdpa(SDPBackend.EFFICIENT_ATTENTION),
    }
    try:
        from sageattention import sageattn

        # its recommended call for HND bf16 (v is cast to fp16 inside); run_shape hands it its own copy of
        # K, because sageattn smooths K by subtracting the mean in place
        v["sageattention"] = lambda q, k, vv, c: sageattn(q, k, vv, tensor_layout="HND", is_causal=c, smooth_k=True)
    except ImportError:
        pass
    for pv in ("fp8", "bf16"):
        v[f"ditq-{pv}"] = lambda q, k, vv, c, pv=pv: attention(
            q, k, vv, causal=c, pv=pv, _config=configs.get((q.shape[-1], pv))
        )
    return v


def _bench(fn, rep):
    import triton

    return triton.testing.do_bench(fn, warmup=max(10, rep // 4), rep=rep, return_mode="median")


def _graph_ms(fn, rep):
    """Median time of one replay of ``fn`` captured in a CUDA graph: the GPU's time without the host's
    launch cost (which do_bench's eager timing includes wherever the host is slower than the GPU)."""
    from .timing import captured

    with captured(fn, warmup=1) as g:
        return _bench(g.replay, rep)


def _host_ms(fn, n=10):
    """Host milliseconds per call: n calls issued back to back with no synchronization in between."""
    import time

    torch.cuda.synchronize()
    t0 = time.perf_counter()
    for _ in range(n):
        fn()
    t = (time.perf_counter() - t0) / n * 1e3
    torch.cuda.synchronize()
    return t


def _reference(q, k, v, causal):
    from ..attn import attention_ref

    B, H, N, _ = q.shape
    chunk = max(128, int(2**29 // (B * H * N)))  # ~2 GiB of f32 scores per chunk
    out, _ = attention_ref(q, k, v, quantize=False, causal=causal, compute_dtype=torch.float32, chunk=chunk)
    return out


def run_shape(shape, variants, rep, log, configs=None):
    B, H, N, D, causal = shape
    flops = 4 * B * H * N * N * D * (0.5 if causal else 1.0)
    q, k, v = make_inputs(B, H, N, D, "cuda")
    row = {"shape": [B, H, N, D], "causal": causal, "ms": {}, "tflops": {}, "accuracy": {}, "errors": {}}
    ref = _reference(q, k, v, causal)
    for name, fn in variants.items():
        kk = k.clone() if name in MUTATES_K else k
        try:
            out = fn(q, kk, v, causal)
            torch.cuda.synchronize()
            if not torch.isfinite(out).all():
                raise DitqError(f"{name}: non-finite output")
            row["accuracy"][name] = accuracy(out, ref)
            del out
            ms = _bench(lambda: fn(q, kk, v, causal), rep)
        except Exception as e:  # a backend that cannot run this shape is reported, not fatal
            row["errors"][name] = f"{type(e).__name__}: {str(e).splitlines()[0][:200]}"
            log(f"  {name}: {row['errors'][name]}")
            continue
        row["ms"][name] = ms
        row["tflops"][name] = flops / ms / 1e9
        del kk
    # host time per call (launches only, the GPU left to catch up) and the GPU time without it
    row["host_ms"], row["ms_graph"], row["tflops_graph"] = {}, {}, {}
    timed = [n for n in variants if n in row["ms"]]
    for name in timed + [n for n in GRAPHED if n in timed]:
        fn = variants[name]
        kk = k.clone() if name in MUTATES_K else k
        if name not in row["host_ms"]:
            row["host_ms"][name] = _host_ms(lambda: fn(q, kk, v, causal))
            continue
        try:
            row["ms_graph"][name] = _graph_ms(lambda: fn(q, kk, v, causal), rep)
            row["tflops_graph"][name] = flops / row["ms_graph"][name] / 1e9
        except Exception as e:
            row["errors"][f"{name} (graph)"] = f"{type(e).__name__}: {str(e).splitlines()[0][:200]}"
            log(f"  {name} (graph): {row['errors'][name + ' (graph)']}")
        del kk
    for key, ms in (("", row["ms"]), ("_graph", row["ms_graph"])):
        base = ms.get("sdpa-cudnn")
        row["vs_cudnn" + key] = {n: base / t for n, t in ms.items()} if base else {}
        sage = ms.get("sageattention")
        row["vs_sageattention" + key] = {n: sage / t for n, t in ms.items() if n.startswith("ditq")} if sage else {}
    # the K/V pre-pass alone, to see its share of ditq's time
    from ..kernels.attention import kv_prepass, padded_head_dim, pick_config

    cfg = (configs or {}).get((D, "fp8")) or pick_config(padded_head_dim(D), True, False)
    row["config"] = {pv: list((configs or {}).get((D, pv)) or pick_config(padded_head_dim(D), pv == "fp8", False))
                     for pv in ("fp8", "bf16")}
    bn = cfg[1]
    try:
        row["prepass_ms_fp8"] = _bench(lambda: kv_prepass(k, v, bn, True, True), rep)
        row["prepass_ms_fp8_graph"] = _graph_ms(lambda: kv_prepass(k, v, bn, True, True), rep)
    except Exception as e:
        row["errors"]["prepass"] = f"{type(e).__name__}: {str(e).splitlines()[0][:200]}"
    del q, k, v, ref
    torch.cuda.empty_cache()
    return row


def tune(rep, log):
    from ..attn import attention

    results = []
    for B, H, N, D, causal in TUNE_SHAPES:
        q, k, v = make_inputs(B, H, N, D, "cuda")
        flops = 4 * B * H * N * N * D * (0.5 if causal else 1.0)
        for pv in ("fp8", "bf16"):
            ref = None
            for cfg in TUNE[(D, pv)]:
                entry = {"shape": [B, H, N, D], "causal": causal, "pv": pv, "config": list(cfg)}
                try:
                    fn = lambda: attention(q, k, v, causal=causal, pv=pv, _config=cfg)  # noqa: E731
                    out = fn()
                    if ref is None:
                        ref = out
                    entry["cos_vs_first"] = accuracy(out, ref)["cos"]
                    ms = _bench(fn, rep)
                    entry["ms"], entry["tflops"] = ms, flops / ms / 1e9
                except Exception as e:
                    entry["error"] = f"{type(e).__name__}: {str(e).splitlines()[0][:200]}"
                log(f"  tune {entry}")
                results.append(entry)
        del q, k, v
        torch.cuda.empty_cache()
    return results


def kernel_report() -> list:
    """Registers, spills, shared memory and which tensor-core instructions each compiled attention kernel
    uses (wgmma on s8 for Q.K^T, on e4m3 for P.V), read from Triton's cache of compiled kernels."""
    from ..kernels.attention import _attn_fwd_kernel

    report = []
    try:
        for kernel_cache, *_ in _attn_fwd_kernel.device_caches.values():
            for k in kernel_cache.values():
                k._init_handles()
                ptx = k.asm.get("ptx", "")
                c = k.metadata
                report.append({
                    "num_warps": c.num_warps, "num_stages": c.num_stages, "regs": k.n_regs, "spills": k.n_spills,
                    "shared": c.shared, "wgmma_s8": "wgmma.mma_async" in ptx and ".s8" in ptx,
                    "wgmma_e4m3": "wgmma.mma_async" in ptx and "e4m3" in ptx, "mma_sync": "mma.sync" in ptx,
                    "name": c.name,
                })
    except Exception as e:  # diagnostics only
        report.append({"error": f"{type(e).__name__}: {e}"})
    return report


def best_configs(tuned) -> dict:
    """{(D, pv): the config with the highest geometric-mean TFLOP/s over the tune shapes of that D}."""
    score = {}
    for t in tuned:
        if "tflops" in t:
            key = (t["shape"][3], t["pv"], tuple(t["config"]))
            score.setdefault(key, []).append(math.log(t["tflops"]))
    best = {}
    for (d, pv, cfg), logs in score.items():
        n_shapes = len({tuple(t["shape"]) for t in tuned if t["shape"][3] == d and t["pv"] == pv})
        if len(logs) < n_shapes:
            continue  # failed on some shape
        g = sum(logs) / len(logs)
        if (d, pv) not in best or g > best[(d, pv)][1]:
            best[(d, pv)] = (cfg, g)
    return {k: v[0] for k, v in best.items()}


def _table(rows, graph=False) -> str:
    """Markdown table of TFLOP/s (cosine vs FP32) and ratios; graph=True: the CUDA-graph replay timings."""
    key = "_graph" if graph else ""
    rows = [dict(r, tflops=r.get("tflops" + key, {}), vs_cudnn=r.get("vs_cudnn" + key, {}),
                 vs_sageattention=r.get("vs_sageattention" + key, {})) for r in rows]
    names = []
    for r in rows:
        names += [n for n in r["tflops"] if n not in names]
    sage = any(r.get("vs_sageattention") for r in rows)
    ratio_cols = [("vs_cudnn", "ditq-fp8", "cuDNN"), ("vs_cudnn", "ditq-bf16", "cuDNN")]
    if sage:
        ratio_cols += [("vs_sageattention", "ditq-fp8", "Sage"), ("vs_sageattention", "ditq-bf16", "Sage")]
    heads = [f"{n} / {b}" for _, n, b in ratio_cols]
    lines = ["| shape (B, H, N, D) | " + " | ".join(names + heads) + " |"]
    lines.append("| --- " * (len(names) + len(heads) + 1) + "|")
    for r in rows:
        shape = "(" + ", ".join(map(str, r["shape"])) + ")" + (" causal" if r["causal"] else "")
        cells = []
        for n in names:
            if n in r["tflops"]:
                acc = r["accuracy"].get(n)
                cells.append(f"{r['tflops'][n]:.0f}" + (f" (cos {acc['cos']:.5f})" if acc else ""))
            else:
                cells.append("-")
        ratios = [f"{r[key][n]:.2f}x" if n in r.get(key, {}) else "-" for key, n, _ in ratio_cols]
        lines.append(f"| {shape} | " + " | ".join(cells) + " | " + " | ".join(ratios) + " |")
    return "\n".join(lines)


def main(args) -> int:
    if not torch.cuda.is_available():
        raise DitqError("bench attention needs a CUDA GPU (none visible); run it on an H100 / H200")
    import triton

    log = lambda s: print(s, file=sys.stderr, flush=True)  # noqa: E731
    shapes = [_parse_shape(s) for s in args.shapes] if args.shapes else SHAPES
    result = {
        "suite": "attention",
        "device": torch.cuda.get_device_name(),
        "torch": torch.__version__,
        "triton": triton.__version__,
        "python": platform.python_version(),
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "inputs": INPUTS,
        "reference": "FP32 attention (torch, chunked over queries)",
        "flops": "4*B*H*N*N*D, half when causal",
        "results": [],
    }
    log(f"device: {result['device']}")
    configs = None
    if args.tune:
        result["tune"] = tune(args.rep, log)
        result["kernels"] = kernel_report()
        configs = best_configs(result["tune"])
        result["tuned_configs"] = {f"D={d} pv={pv}": list(c) for (d, pv), c in configs.items()}
        log(f"tuned: {result['tuned_configs']}")
    variants = _variants(configs)
    for shape in shapes:
        log(f"shape {shape}")
        row = run_shape(shape, variants, args.rep, log, configs)
        log(f"  {json.dumps({k: row[k] for k in ('tflops', 'vs_cudnn')})}")
        result["results"].append(row)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(result, f, indent=1)
    print(f"{result['device']}, torch {result['torch']}, triton {result['triton']}; TFLOP/s (cosine vs FP32)")
    print(_table(result["results"]))
    print("\nCUDA graph replay (no host launch cost), TFLOP/s")
    print(_table(result["results"], graph=True))
    print("\nhost ms per call: " + "; ".join(
        f"N={r['shape'][2]}: " + ", ".join(f"{n} {t:.3f}" for n, t in r.get("host_ms", {}).items())
        for r in result["results"]))
    return 0

