"""Memory and speed of `ditq convert` on a synthetic multi-GB bf16 checkpoint.

Builds a Flux-shaped bf16 safetensors file of about --gb GB in a temporary folder (streamed: the builder
holds one tensor at a time), converts it in a child process with `ditq convert`, and reports the child's
peak resident memory (``ru_maxrss``), wall time and read throughput. Run it at two sizes to see that peak
memory does not grow with the checkpoint:

    python bench/convert_memory.py --gb 1.5 --gb 3.5                      # CPU
    PYTHONPATH=src python3 bench/convert_memory.py --gb 4 --gb 24 --device cuda --json $OUT/convert_memory.json

The source file was just written, so it is read from the page cache (a warm read): the numbers show the
converter's own throughput; a cold read is bounded by the disk instead. Goal (issue 4): a 24 GB bf16
checkpoint under 3 GB of resident memory, at disk speed with a GPU.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))

from ditq.checkpoint.io import SafetensorsWriter, header_reserve  # noqa: E402

D = 3072  # Flux.1 width; one double block's linear layers, then repeat
BLOCK = [("attn.to_q", D, D), ("attn.to_k", D, D), ("attn.to_v", D, D), ("attn.to_out.0", D, D),
         ("ff.net.0.proj", 4 * D, D), ("ff.net.2", D, 4 * D)]


def build(path: Path, gb: float, device: str) -> int:
    """Write a synthetic checkpoint of about ``gb`` GB; returns its size in bytes."""
    per_block = sum(2 * n * k + 2 * n for _, n, k in BLOCK) + 4 * D
    blocks = max(1, round(gb * 1e9 / per_block))
    names = [f"transformer_blocks.{b}.{name}.{p}" for b in range(blocks) for name, _, _ in BLOCK for p in ("weight", "bias")]
    g = torch.Generator(device=device).manual_seed(0)
    with SafetensorsWriter(path, header_reserve(names, small_bytes=blocks * 8 * 4 * D)) as w:
        for b in range(blocks):
            for name, n, k in BLOCK:
                t = torch.randn(n, k, generator=g, device=device, dtype=torch.bfloat16) * 0.02
                w.add(f"transformer_blocks.{b}.{name}.weight", t)
                w.add(f"transformer_blocks.{b}.{name}.bias", torch.zeros(n, dtype=torch.bfloat16))
            w.add(f"transformer_blocks.{b}.norm.weight", torch.ones(2 * D, dtype=torch.bfloat16))
        w.commit({"format": "pt"})
    return path.stat().st_size


def convert(src: Path, dst: Path, fmt: str, device: str, extra: list[str]) -> dict:
    """Run `ditq convert` in a child process, so that its peak RSS (the child's VmHWM, which the report
    records) covers the conversion alone: interpreter, torch and the streamed tensors. (The child's
    ``ru_maxrss`` would not do: Linux carries it over exec from this process, which built the file.)"""
    report = dst.with_suffix(".json")
    cmd = [sys.executable, "-m", "ditq.cli", "convert", str(src), "-o", str(dst), "--format", fmt,
           "--device", device, "--json", str(report), "-q", *extra]
    env = {**os.environ, "PYTHONPATH": str(ROOT / "src") + os.pathsep + os.environ.get("PYTHONPATH", "")}
    t0 = time.perf_counter()
    subprocess.run(cmd, check=True, env=env)
    wall = time.perf_counter() - t0
    totals = json.loads(report.read_text())["totals"]
    return {"wall_s": wall, "peak_rss_bytes": totals["peak_rss_gb"] * 1e9, "convert_s": totals["seconds"],
            "read_gb_per_s": totals["read_gb_per_s"], "dst_bytes": totals["dst_file_bytes"],
            "quantized": totals["quantized"], "kept": totals["kept"]}


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--gb", type=float, action="append", help="checkpoint size(s) in GB (repeatable; default 1.5 and 3.5)")
    p.add_argument("--format", default="int8-row")
    p.add_argument("--device", default="auto", help="device for building and converting (auto: cuda if available)")
    p.add_argument("--dir", default=None, help="folder for the temporary files (default: system temp)")
    p.add_argument("--no-error", action="store_true", help="pass --no-error to convert (skip per-layer error)")
    p.add_argument("--json", default=None, help="write the results as JSON")
    args = p.parse_args()
    device = ("cuda" if torch.cuda.is_available() else "cpu") if args.device == "auto" else args.device
    sizes = args.gb or [1.5, 3.5]
    results = []
    gpu = torch.cuda.get_device_name() if device.startswith("cuda") else None
    for gb in sizes:
        folder = Path(tempfile.mkdtemp(prefix="ditq-convmem-", dir=args.dir))
        try:
            src, dst = folder / "synthetic-bf16.safetensors", folder / "synthetic-int8.safetensors"
            t0 = time.perf_counter()
            size = build(src, gb, device)
            built = time.perf_counter() - t0
            r = convert(src, dst, args.format, device, ["--no-error"] if args.no_error else [])
            r.update(src_bytes=size, build_s=built, format=args.format, device=device, gpu=gpu,
                     cpu_count=os.cpu_count(), torch=torch.__version__)
            results.append(r)
            print(f"{size / 1e9:6.2f} GB {args.format} on {gpu or device}: converted in {r['convert_s']:.1f} s "
                  f"({r['read_gb_per_s']:.2f} GB/s), peak RSS {r['peak_rss_bytes'] / 1e9:.2f} GB, "
                  f"output {r['dst_bytes'] / 1e9:.2f} GB", flush=True)
        finally:
            shutil.rmtree(folder, ignore_errors=True)
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
