"""`ditq bench autoquant`: ``ditq.autoquant_`` on a full-size transformer against every single format.

Issue 8 (part 3) asks that on the full-size Flux and Wan architectures autoquant meets its target and is at
least as fast as the best single format that also meets it. In one process, on ``ditq bench model``'s
model (diffusers class from the published config, seeded random weights in bf16) and inputs:

1. the benchmark inputs at several timesteps (``--timesteps``: fractions of the schedule; the model
   bench's input builders put the schedule's midpoint, so fraction f scales that timestep by 2f; each
   timestep also has its own seeded latents and text);
2. bf16 is the reference: its outputs on those inputs;
3. each single format (``--formats``, through ``ditq.quantize_`` and the preset; ``int8-row+hadamard`` is
   rotated int8-row), bf16 weights set aside and restored (``bench.model.quantized``);
4. ``ditq.autoquant_(model, calib, target_cos=T)`` on the restored bf16 model, measured the same way, then
   the bf16 weights restored again; with several targets (``--target-cos 0.99995,0.999``) once per target,
   the tightest first, each later one reusing the per-layer sensitivity the first measured (if it measured
   any: a target the all-fastest state meets needs none). The first target given is the primary one: its
   autoquant row is "autoquant", the others' "autoquant@T".

Per variant: median forward time on the first input (CUDA events on a GPU), ``--graph`` the forward
replayed as one CUDA graph, the output cosine vs bf16 on every input (the minimum decides "meets target"),
weight bytes and the linear layers per format. The best single format meeting the target is the fastest
one (median eager time) whose minimum cosine is >= T; autoquant's ratio to it is best ms / autoquant ms
(>= 1: autoquant at least as fast).

Random weights say nothing about a real model's sensitivity: the target here is the whole-model output
cosine vs bf16 on the benchmark's own inputs; random-weight models are robust (every format meets 0.999 on
Flux), so a tighter second target (``--target-cos 0.999,0.99995``) is where the choice matters. Cost: when the
all-fastest state misses the tightest target, autoquant runs one forward per calibration input for each
(eligible layer, candidate) pair, ~418 x 4 x 3 for Flux, which at the full benchmark size (Flux 0.17 s, Wan
3.3 s a forward) would take minutes to hours; on a full-size model ``--calib small`` (default) gives it
the same timesteps at a small size (``CALIB_SIZES``), and whether its choice still meets the target on the
full-size inputs is what the table reports. ``--calib bench`` gives it the benchmark inputs themselves
(what ``--tiny`` always does).
"""

from __future__ import annotations

import contextlib
import gc
import re
import statistics
import sys
import time

import torch
import torch.nn as nn

from . import model as M

DEFAULT_FORMATS = "fp8-row,int8-row,int8-row+hadamard,int8-block"
ROTATED = "int8-row+hadamard"
DEFAULT_TIMESTEPS = "0.9,0.5,0.1"
ARCHS = ("flux", "wan-14b")
# Autoquant's calibration inputs on a full-size model: the benchmark's inputs at a small size (Flux: 256 image
# + 64 text tokens; Wan: 2 x 16 x 16 latents = 128 video + 64 text tokens), where a forward of the full
# model costs its weight traffic and launches rather than the GEMMs'.
CALIB_SIZES = {
    "flux": dict(height=256, width=256, text_tokens=64),
    "wan-14b": dict(height=128, width=128, frames=5, text_tokens=64),
}


def add_arguments(p) -> None:
    p.add_argument("--arch", default="flux", choices=ARCHS, help="architecture (default flux)")
    p.add_argument("--tiny", action="store_true", help="tiny config and size (runs on CPU)")
    p.add_argument("--target-cos", default="0.999",
                   help="autoquant's target and the bar for 'meets' (default 0.999); several, comma-separated: one autoquant "
                        "run each, the first is the primary")
    p.add_argument("--formats", default=DEFAULT_FORMATS,
                   help=f"single formats to compare, comma-separated (default {DEFAULT_FORMATS}); "
                        f"'{ROTATED}' is Hadamard-rotated int8-row")
    p.add_argument("--candidates", default=None, help="autoquant's candidates (default: autoquant_'s DEFAULT_CANDIDATES)")
    p.add_argument("--speed-table", default=None, help="autoquant's speed table: a `ditq bench gemm --json` file or 'none' "
                                                       "(default bench/results/gemm-h200.json when present)")
    p.add_argument("--timesteps", default=DEFAULT_TIMESTEPS, help=f"fractions of the schedule, one input each (default {DEFAULT_TIMESTEPS})")
    p.add_argument("--calib", default="small", choices=("small", "bench"),
                   help="autoquant's inputs on a full-size model: the timesteps at CALIB_SIZES (small, default) or the "
                        "benchmark inputs themselves (bench; always with --tiny)")
    p.add_argument("--graph", action="store_true", help="also time each variant's forward replayed as one CUDA graph (GPU)")
    p.add_argument("--reps", type=int, default=0, help="timed calls per variant (default: 10 for images, 3 for video)")
    p.add_argument("--warmup", type=int, default=1, help="untimed calls before timing, after the cosine pass (default 1)")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--time-limit", type=float, default=0,
                   help="seconds: skip the remaining single formats, and autoquant when its estimated cost exceeds what is left")
    p.add_argument("--json", metavar="PATH", help="write all numbers to this JSON file (rewritten after each variant)")


# -- inputs ---------------------------------------------------------------------------------------------------
def timestep_inputs(arch: M.Arch, cfg: dict, size: dict, device, fracs, seed: int) -> tuple[list[dict], str]:
    """One forward-kwargs dict per fraction: ``bench.model.make_inputs`` with seed + i, its timestep (the
    schedule's midpoint: Flux 0.5, Wan 500) scaled by 2 x fraction in the builder's dtype."""
    inputs, desc = [], ""
    for i, f in enumerate(fracs):
        kw, desc = M.make_inputs(arch, cfg, size, device, torch.bfloat16, seed + i)
        t = kw["timestep"]
        kw["timestep"] = (t.double() * (2.0 * f)).round().to(t.dtype) if not t.is_floating_point() else (t * (2.0 * f)).to(t.dtype)
        inputs.append(kw)
    return inputs, desc


# -- measuring ------------------------------------------------------------------------------------------------
def layers_per_format(model: nn.Module) -> dict[str, int]:
    """Linear layers per weight format ("int8-row+hadamard" for a rotated int8-row weight; "bf16": a float
    weight, kept by the preset or chosen)."""
    from ..nn.quantize import linear_layers
    from ..tensor import QuantizedTensor

    counts: dict[str, int] = {}
    for _, m in linear_layers(model):
        w = m.weight
        f = (w.format + ("+hadamard" if w.rotation else "")) if isinstance(w, QuantizedTensor) else "bf16"
        counts[f] = counts.get(f, 0) + 1
    return counts


def measure(variant: str, model: nn.Module, inputs: list[dict], refs, args, reps: int) -> dict:
    """One variant: ``max(reps, len(inputs))`` timed calls cycling through the inputs after ``args.warmup``
    (same shapes, so the same cost; each input's output comes from its last timed call: no extra forwards),
    then ``--graph``: the first input's forward replayed as one CUDA graph. Returns (row, outputs in fp32)."""
    from ..nn.quantize import model_bytes

    dev = args.device
    outs: list = [None] * len(inputs)
    calls = [0]

    def cycle():
        k = calls[0] % len(inputs)
        calls[0] += 1
        outs[k] = M.forward(model, inputs[k])

    times = M.time_forward(cycle, dev, args.warmup, max(reps, len(inputs)))
    outs = [y.float() for y in outs]
    call = lambda: M.forward(model, inputs[0])  # noqa: E731
    r = {"variant": variant, "median_ms": statistics.median(times), "times_ms": times,
         "weight_gb": model_bytes(model) / M.GB, "layers": layers_per_format(model)}
    if args.graph and torch.device(dev).type == "cuda":
        try:
            r["graph_times_ms"] = M.graph_times(call, reps)
            r["graph_median_ms"] = statistics.median(r["graph_times_ms"])
        except Exception as e:  # keep the variant's other numbers
            r["graph_error"] = f"{type(e).__name__}: {str(e)[:500]}"
            print(f"  {variant}: CUDA graph capture failed: {r['graph_error'][:200]}", flush=True)
    if refs is not None:
        cmp = [M.compare(y, ref) for y, ref in zip(outs, refs)]
        r["cos_per_input"] = [c["cosine"] for c in cmp]
        r["cos_min"] = min(r["cos_per_input"])
        r["rel_err_max"] = max(c["rel_err"] for c in cmp)
        r["finite"] = all(c["finite"] for c in cmp)
        r["meets"] = {str(t): bool(r["finite"] and r["cos_min"] >= t) for t in args.targets}
        r["meets_target"] = r["meets"][str(args.targets[0])]
    return r, outs


@contextlib.contextmanager
def autoquantized(model: nn.Module, calib: list[dict], target: float, **kw):
    """``ditq.autoquant_`` for the duration of the block, from the bf16 model; its bf16 weights are set aside
    and put back afterwards (as ``bench.model.quantized`` does for one format). Yields the report (its
    ``seconds``: the autoquant_ wall time)."""
    from ..nn.autoquant import autoquant_
    from ..nn.quantize import linear_layers
    from ..tensor import QuantizedTensor

    saved = {name: m.weight for name, m in linear_layers(model)}
    already = [n for n, w in saved.items() if isinstance(w, QuantizedTensor)]
    if already:  # a variant before did not restore its weights: autoquant would measure from the wrong model
        raise RuntimeError(f"autoquant must start from the bf16 model; {len(already)} layers are quantized ({already[0]}, ...)")
    try:
        t = time.perf_counter()
        report = autoquant_(model, calib, target_cos=target, forward_fn=M.forward, **kw)
        report.seconds = time.perf_counter() - t
        yield report
    finally:
        for name, m in linear_layers(model):
            m.weight = saved[name]


def _eligible(model: nn.Module) -> int:
    """Linear layers autoquant_ will measure (its default preset's quantizable ones), for its cost estimate."""
    from ..nn.quantize import linear_layers, make_policy

    policy = make_policy(model, "int8-row", "auto", None, None, 16384)
    return sum(policy.decide(f"{n}.weight", tuple(m.weight.shape), m.weight.dtype).quantize for n, m in linear_layers(model))


# -- the command ------------------------------------------------------------------------------------------
def main(args) -> int:
    from ..precision import DEFAULT_CANDIDATES, DEFAULT_TOKENS, check_candidates, check_target

    targets = [check_target(t) for t in str(args.target_cos).split(",") if t.strip()]
    if not targets or len(set(targets)) != len(targets):
        raise SystemExit(f"--target-cos: one or more distinct cosines, got {args.target_cos!r}")
    args.targets = targets
    target = targets[0]
    cands = check_candidates(args.candidates) if args.candidates else DEFAULT_CANDIDATES
    formats = [f for f in args.formats.split(",") if f]
    fracs = [float(f) for f in args.timesteps.split(",") if f]
    run = M._Run(args)
    run.out.pop("archs")
    run.out["command"] = "ditq bench autoquant " + " ".join(
        sys.argv[3:] if sys.argv[1:3] == ["bench", "autoquant"] else sys.argv[1:])
    arch = M.ARCHS[args.arch]
    dev = args.device
    cfg = arch.tiny_config if args.tiny else arch.config
    size = arch.tiny_size if args.tiny else arch.size
    reps = args.reps or (3 if "frames" in size else 10)
    out = run.out
    out.update(arch=args.arch, describe=arch.describe, target_cos=target, targets=targets, timesteps=fracs, candidates=list(cands),
               results=[])
    results = out["results"]

    t = time.perf_counter()
    model = M.build(arch, dev, torch.bfloat16, args.seed, tiny=args.tiny)
    out["build_s"] = time.perf_counter() - t
    out["params"] = sum(p.numel() for p in model.parameters())
    inputs, out["inputs"] = timestep_inputs(arch, cfg, size, dev, fracs, args.seed)
    # the speed table is read at the benchmark's own token count (Wan's GEMMs have 32760 rows, not 4096); the
    # tiny models' handful of tokens would match the table's M=256 rows, not what the CPU test is about
    m = re.search(r"(\d+) (?:image|video) \+", out["inputs"])
    out["tokens"] = int(m.group(1)) if m and not args.tiny else DEFAULT_TOKENS
    small = args.calib == "small" and not args.tiny and args.arch in CALIB_SIZES
    if small:
        calib, out["calib"] = timestep_inputs(arch, cfg, CALIB_SIZES[args.arch], dev, fracs, args.seed + 100)
    else:
        calib, out["calib"] = inputs, "the benchmark inputs"
    print(f"[{args.arch}] {arch.describe}: {out['params'] / 1e9:.2f} B params, built in {out['build_s']:.1f} s; "
          f"{out['inputs']}; timesteps {fracs}; autoquant calibrates on {out['calib']}; {out['gpu']}", flush=True)

    with torch.inference_mode():
        base, refs = measure("bf16", model, inputs, None, args, reps)
        base.update(cos_min=1.0, cos_per_input=[1.0] * len(inputs), rel_err_max=0.0,
                    finite=all(bool(torch.isfinite(y).all()) for y in refs), meets_target=True,
                    meets={str(t): True for t in targets})
        base["speedup_vs_bf16"] = 1.0
        results.append(base)
        run.save()
        print(f"  {'bf16':>18}: {base['median_ms']:9.2f} ms", flush=True)

        def finish(r):
            r["speedup_vs_bf16"] = base["median_ms"] / r["median_ms"]
            if "graph_median_ms" in r and "graph_median_ms" in base:
                r["graph_speedup_vs_bf16"] = base["graph_median_ms"] / r["graph_median_ms"]
            results.append(r)
            run.save()
            print(f"  {r['variant']:>18}: {r['median_ms']:9.2f} ms  x{r['speedup_vs_bf16']:.2f}  cos min {r['cos_min']:.6f}"
                  "  " + ", ".join(f"{'meets' if ok else 'misses'} {t}" for t, ok in r["meets"].items()), flush=True)

        for fmt in formats:
            if run.out_of_time():
                print(f"  time limit: skipping {fmt}", flush=True)
                results.append({"variant": fmt, "skipped": "time limit"})
                continue
            try:
                kw = dict(rotation="hadamard") if fmt == ROTATED else {}
                with M.quantized(model, "int8-row" if fmt == ROTATED else fmt, **kw) as rep:
                    r, _ = measure(fmt, model, inputs, refs, args, reps)
                    r["quantize_s"] = rep.seconds
                finish(r)
            except Exception as e:  # keep the other variants' numbers
                results.append({"variant": fmt, "error": f"{type(e).__name__}: {e}"})
                print(f"  {fmt} FAILED: {type(e).__name__}: {e}", flush=True)
            gc.collect()
            torch.cuda.empty_cache() if torch.cuda.is_available() else None

        # autoquant: one forward per calibration input for each (layer, candidate), plus a few whole-model rounds
        M.forward(model, calib[0])  # first call at this size (allocator, autotuning) left out of the estimate
        M._sync(dev)
        t = time.perf_counter()
        for kw in calib:
            M.forward(model, kw)
        M._sync(dev)
        per_fwd = (time.perf_counter() - t) / len(calib)
        n_layers = _eligible(model)
        est = per_fwd * len(calib) * (n_layers * sum(c != "bf16" for c in cands) + 3)
        out["autoquant_estimate_s"] = est
        left = args.time_limit - (time.perf_counter() - run.t0) if args.time_limit else float("inf")
        print(f"  autoquant: {n_layers} layers x {len(cands)} candidates x {len(calib)} inputs, estimated {est:.0f} s "
              f"(bf16 forward {per_fwd * 1e3:.1f} ms on the calibration inputs)", flush=True)
        if est > left:
            print(f"  time limit: skipping autoquant ({left:.0f} s left)", flush=True)
            for t in targets:
                results.append({"variant": _auto_name(t, targets), "skipped": f"time limit: estimated {est:.0f} s, {left:.0f} s left"})
        else:
            sens = "auto"
            for t in sorted(targets, reverse=True):  # tightest first: it measures the sensitivity the others reuse
                name = _auto_name(t, targets)
                try:
                    with autoquantized(model, calib, t, candidates=cands, speed_table=args.speed_table,
                                       sensitivity=sens, tokens=out["tokens"]) as rep:
                        print(f"  [{name}] " + "\n  ".join(rep.summary().splitlines()[:2]), flush=True)
                        print("  " + next(line for line in rep.summary().splitlines() if line.startswith("chosen:")), flush=True)
                        print(f"  probes (what, state, cos): {[(w, k, round(c, 6)) for w, k, c in rep.probes]}"
                              + (f" of {rep.states} states" if rep.states else " (the fastest state met the target)")
                              + f"; {rep.seconds:.1f} s", flush=True)
                        r, _ = measure(name, model, inputs, refs, args, reps)
                        r.update(target_cos=t, meets_target=r["meets"][str(t)], autoquant_s=rep.seconds,
                                 autoquant_final_cos=rep.final_cos, autoquant_met=rep.met, autoquant_rounds=rep.rounds,
                                 autoquant_forwards=rep.forwards, autoquant_measured=rep.measured,
                                 autoquant_probes=rep.probes, autoquant_states=rep.states, est_linear_speed=rep.est_speed)
                        out["autoquant_report" if t == target else f"autoquant_report@{t}"] = rep.to_dict()
                        if rep.measured and sens == "auto":
                            sens = rep
                    finish(r)
                except Exception as e:
                    results.append({"variant": name, "error": f"{type(e).__name__}: {e}"})
                    print(f"  {name} FAILED: {type(e).__name__}: {e}", flush=True)
                    import traceback

                    traceback.print_exc()
            order = {_auto_name(t, targets): i for i, t in enumerate(targets)}  # rows in the order the targets were given
            results.sort(key=lambda r: order.get(r["variant"], -1))

    out["per_target"] = {str(t): compare_to_best(results, t, _auto_name(t, targets)) for t in targets}
    out.update(out["per_target"][str(target)])
    out["total_s"] = time.perf_counter() - run.t0
    run.save()
    print(table(out))
    del model, inputs, calib, refs
    gc.collect()
    return 0


def _auto_name(t: float, targets) -> str:
    return "autoquant" if t == targets[0] else f"autoquant@{t}"


def compare_to_best(results: list[dict], target: float, auto_name: str = "autoquant") -> dict:
    """The best single format meeting ``target`` (fastest median eager; also by graph time where there is one)
    and the autoquant row ``auto_name``'s ratio to it: best ms / autoquant ms (>= 1: autoquant at least as
    fast)."""
    ok = [r for r in results if r["variant"] != "bf16" and not r["variant"].startswith("autoquant")
          and r.get("meets", {}).get(str(target), False)]
    auto = next((r for r in results if r["variant"] == auto_name and "median_ms" in r), None)
    d: dict = {"best_single": None, "best_single_graph": None, "autoquant_vs_best_single": None,
               "autoquant_vs_best_single_graph": None}
    if ok:
        best = min(ok, key=lambda r: r["median_ms"])
        d["best_single"] = best["variant"]
        if auto:
            d["autoquant_vs_best_single"] = best["median_ms"] / auto["median_ms"]
        g = [r for r in ok if "graph_median_ms" in r]
        if g:
            bg = min(g, key=lambda r: r["graph_median_ms"])
            d["best_single_graph"] = bg["variant"]
            if auto and "graph_median_ms" in auto:
                d["autoquant_vs_best_single_graph"] = bg["graph_median_ms"] / auto["graph_median_ms"]
    return d


def table(out: dict) -> str:
    targets = out.get("targets") or [out["target_cos"]]
    per = out.get("per_target") or {str(targets[0]): out}
    lines = [f"\n{out['arch']}: {out['describe']} ({out['params'] / 1e9:.2f} B), {out['inputs']}, timesteps {out['timesteps']}, "
             f"{out['gpu']}; autoquant target cos {', '.join(map(str, targets))}, calibrated on {out['calib']}",
             "| variant | ms | vs bf16 | graph ms | cosine min | " + " | ".join(f"meets {t}" for t in targets)
             + " | linear layers per format (bf16: kept by the preset or chosen) |",
             "| --- | ---: | ---: | ---: | ---: | " + " | ".join("---" for _ in targets) + " | --- |"]
    for r in out["results"]:
        if "median_ms" not in r:
            lines.append(f"| {r['variant']} | {r.get('error') or r.get('skipped')} | | | | " + " | ".join("" for _ in targets) + " | |")
            continue
        best = [t for t in targets if per.get(str(t), {}).get("best_single") == r["variant"]]
        mark = f" (best single meeting {', '.join(map(str, best))})" if best else ""
        meets = r.get("meets") or {str(targets[0]): r["meets_target"]}
        lines.append(
            f"| {r['variant']}{mark} | {r['median_ms']:.1f} | {r['speedup_vs_bf16']:.2f}x | {M._fmt(r.get('graph_median_ms'), '{:.1f}')} | "
            f"{r['cos_min']:.6f} | " + " | ".join('yes' if meets.get(str(t)) else 'NO' for t in targets) + " | "
            + ", ".join(f"{k} x{v}" for k, v in sorted(r["layers"].items())) + " |")
    for t in targets:
        d = per.get(str(t), {})
        name = "autoquant" if t == targets[0] else f"autoquant@{t}"
        if d.get("best_single") is None:
            lines.append(f"no single format meets cos >= {t}")
        if d.get("autoquant_vs_best_single") is not None:
            lines.append(f"{name} vs best single meeting {t} ({d['best_single']}): {d['autoquant_vs_best_single']:.3f}x eager"
                         + (f", {d['autoquant_vs_best_single_graph']:.3f}x as CUDA graphs (vs {d['best_single_graph']})"
                            if d.get("autoquant_vs_best_single_graph") is not None else "")
                         + " (best ms / autoquant ms; >= 1: autoquant at least as fast)")
    return "\n".join(lines)
