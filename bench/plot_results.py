"""The README's figures, drawn from the committed benchmark results (no GPU needed; needs matplotlib).

    python bench/plot_results.py    # writes docs/img/{gemm,model,autoquant}-h200.png

- gemm: every format's full linear (activation quantization included) vs cuBLAS bf16 per benchmarked shape,
  eager and replayed as CUDA graphs, with issue 3's goals (``bench/results/gemm-h200.json``).
- model: one full transformer forward per architecture, each format's eager speed vs bf16 eager and weight
  memory vs bf16 (``bench/results/model-{flux,wan}-h200-round6.json``, ``model-others-h200.json``).
- autoquant: speed vs bf16 against output cosine for bf16, each single format and autoquant at each target,
  Flux and Wan (``bench/results/autoquant-{flux,wan}-h200.json``).
"""

from __future__ import annotations

import json
import math
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "bench" / "results"
IMG = ROOT / "docs" / "img"
FORMATS = ("int8-row", "fp8-row", "fp8-tensor", "int8-block", "fp8-block")
GOALS = {"int8-row": 1.6, "fp8-row": 1.6, "int8-block": 1.3, "fp8-block": 1.3}
COLORS = {"int8-row": "#1f77b4", "fp8-row": "#d62728", "fp8-tensor": "#ff7f0e", "int8-block": "#2ca02c",
          "fp8-block": "#9467bd", "int8-row+hadamard": "#17becf", "bf16": "#444444"}


def _plt():
    try:
        import matplotlib
    except ImportError:
        sys.exit("bench/plot_results.py needs matplotlib: pip install matplotlib")
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _save(fig, title: str, out: Path) -> Path:
    """Title, tight layout, PNG at ``out`` (its folder made), figure closed."""
    import matplotlib.pyplot as plt

    fig.suptitle(title, fontsize=11)
    fig.tight_layout()
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=90)
    plt.close(fig)
    return out


def gemm(path: Path, out: Path) -> Path:
    plt = _plt()
    d = json.loads(path.read_text())
    shapes = [s for s in d["shapes"] if s["M"] >= 1024]
    labels = [f"{s['M']}x{s['N']}x{s['K']}" for s in shapes]
    fig, axes = plt.subplots(2, 1, figsize=(13, 7.5), sharex=True)
    width = 0.8 / len(FORMATS)
    for ax, key, title in ((axes[0], "ratio", "eager (every call launched from Python)"),
                           (axes[1], "graph_ratio", "replayed as CUDA graphs (GPU time)")):
        for i, f in enumerate(FORMATS):
            xs = [j + (i - (len(FORMATS) - 1) / 2) * width for j in range(len(shapes))]
            ys = [s.get(key, {}).get(f, math.nan) for s in shapes]
            ax.bar(xs, ys, width, label=f, color=COLORS[f])
        ax.axhline(1.0, color="black", lw=0.8)
        for g, ls in ((1.6, "--"), (1.3, ":")):
            ax.axhline(g, color="gray", lw=0.8, ls=ls)
        ax.text(len(shapes) - 0.45, 1.62, "goal row formats 1.6x", fontsize=7, ha="right", color="gray")
        ax.text(len(shapes) - 0.45, 1.32, "goal block formats 1.3x", fontsize=7, ha="right", color="gray")
        ax.set_ylabel("speed vs cuBLAS bf16")
        ax.set_title(title, fontsize=10)
        ax.set_ylim(0, 2.1)
    axes[0].legend(ncol=5, fontsize=8, loc="upper left")
    axes[1].set_xticks(range(len(shapes)), labels, rotation=45, ha="right", fontsize=8)
    return _save(fig, f"ditq quantized linear (activation quantization + GEMM + bias) vs cuBLAS bf16, {d.get('gpu', 'GPU ?')}, "
                 f"M x N x K", out)


def model(paths: list[Path], out: Path) -> Path:
    plt = _plt()
    archs = []
    for p in paths:
        d = json.loads(p.read_text())
        for name, a in d["archs"].items():
            eager = [r for r in a.get("results", []) if r.get("mode", "eager") == "eager" and r.get("median_ms")]
            base = next((r for r in eager if r["variant"] == "bf16"), None)
            if base:
                archs.append((a.get("describe", name).replace(" transformer", ""), base, eager, d.get("gpu", "GPU ?")))
    variants = ["int8-row", "fp8-row", "fp8-row+attn"]
    colors = {"int8-row": COLORS["int8-row"], "fp8-row": COLORS["fp8-row"], "fp8-row+attn": "#8c564b"}
    fig, (ax, ax2) = plt.subplots(1, 2, figsize=(13, 4.6), gridspec_kw={"width_ratios": [3, 2]})
    width = 0.8 / len(variants)
    for i, v in enumerate(variants):
        xs, ys, ws = [], [], []
        for j, (_, base, eager, _) in enumerate(archs):
            r = next((r for r in eager if r["variant"] == v), None)
            if r:
                xs.append(j + (i - (len(variants) - 1) / 2) * width)
                ys.append(base["median_ms"] / r["median_ms"])
                ws.append((j, r.get("weight_gb", math.nan) / base.get("weight_gb", math.nan)))
        ax.bar(xs, ys, width, label=v + (" (+ ditq INT8 attention)" if v.endswith("+attn") else ""), color=colors[v])
        if v != "fp8-row+attn":
            ax2.bar([j + (i - 0.5) * 0.4 for j, _ in ws], [w for _, w in ws], 0.4, label=v, color=colors[v])
    ax.axhline(1.0, color="black", lw=0.8)
    ax.axhline(1.4, color="gray", lw=0.8, ls="--")
    ax.text(len(archs) - 0.5, 1.41, "goal 1.4x", fontsize=7, color="gray", ha="right")
    ax.set_xticks(range(len(archs)), [a[0] for a in archs], rotation=20, ha="right", fontsize=8)
    ax.set_ylabel("forward speed vs bf16 (eager)")
    ax.set_ylim(0.8, 1.5)
    ax.legend(fontsize=8, loc="upper left")
    ax.set_title("one full-size transformer forward", fontsize=10)
    ax2.set_xticks(range(len(archs)), [a[0] for a in archs], rotation=20, ha="right", fontsize=8)
    ax2.set_ylabel("weight memory vs bf16")
    ax2.set_ylim(0, 1.05)
    ax2.axhline(0.5, color="gray", lw=0.8, ls=":")
    ax2.set_title("weights (preset keeps norms / embeddings in bf16)", fontsize=10)
    return _save(fig, f"ditq runtime, {archs[0][3] if archs else ''} (seeded random weights, published configs)", out)


def autoquant(paths: list[Path], out: Path) -> Path:
    plt = _plt()
    fig, axes = plt.subplots(1, len(paths), figsize=(6.5 * len(paths), 4.6))
    axes = axes if len(paths) > 1 else [axes]
    for ax, p in zip(axes, paths):
        d = json.loads(p.read_text())
        rows = [r for r in d["results"] if "median_ms" in r]
        singles = {r["variant"]: r for r in rows if not r["variant"].startswith("autoquant")}
        n_auto = 0
        for r in rows:
            v = r["variant"]
            auto = v.startswith("autoquant")
            err = max(1.0 - r["cos_min"], 1e-7)  # bf16 itself: 0, drawn at 1e-7
            color = "black" if auto else COLORS.get(v, "gray")
            ax.scatter(err, r["speedup_vs_bf16"], s=70 if auto else 45, marker="*" if auto else "o", color=color,
                       zorder=3)
            if auto:
                same = [f for f, sr in singles.items() if sr["layers"] == r["layers"]]
                name = f"autoquant {r.get('target_cos', d['target_cos'])}" + (f" (= {same[0]} model)" if same else "")
                ax.annotate(name, (err, r["speedup_vs_bf16"]), textcoords="offset points",
                            xytext=(-8, 6 if n_auto % 2 == 0 else -12), ha="right", fontsize=8)
                n_auto += 1
            else:
                ax.annotate(v + (" (exact)" if v == "bf16" else ""), (err, r["speedup_vs_bf16"]),
                            textcoords="offset points", xytext=(6, -11), fontsize=8, color=color)
        for t in d.get("targets", [d["target_cos"]]):
            ax.axvline(1.0 - t, color="gray", lw=0.8, ls="--")
            ax.text(1.0 - t, 0.985, f" target {t}", fontsize=7, color="gray", rotation=90, va="bottom")
        ax.set_xscale("log")
        ax.set_xlabel("1 - output cosine vs bf16 (min over timesteps; lower is better)")
        ax.set_ylabel("forward speed vs bf16 (eager)")
        ax.set_ylim(0.98, max(r.get("speedup_vs_bf16", 1) for r in d["results"]) + 0.05)
        ax.set_title(f"{d['describe']}\n{d['inputs']}, {d['gpu']}", fontsize=9)
        ax.grid(alpha=0.3)
    return _save(fig, "autoquant_ vs single formats (stars: autoquant at each target; dashed: the targets)", out)


def main(argv=None) -> int:
    import argparse

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--results", default=str(RESULTS), help="folder of the JSON results (default bench/results)")
    ap.add_argument("--out", default=str(IMG), help="folder for the PNGs (default docs/img)")
    a = ap.parse_args(argv)
    res, img = Path(a.results), Path(a.out)
    made = [gemm(res / "gemm-h200.json", img / "gemm-h200.png"),
            model([res / "model-flux-h200-round6.json", res / "model-wan-h200-round6.json", res / "model-others-h200.json"],
                  img / "model-h200.png"),
            autoquant([res / "autoquant-flux-h200.json", res / "autoquant-wan-h200.json"], img / "autoquant-h200.png")]
    for m in made:
        print(f"wrote {m} ({m.stat().st_size / 1e3:.0f} kB)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
