"""The README's `--target-cos` table (CPU, a few minutes): how close `ditq convert --target-cos` (without and with
measured gains) and `ditq.autoquant_` come to their targets on a small random Flux, measured on the model.

    python bench/precision_cpu.py [--out DIR]

Model: the README's 1 + 1-block, 512-wide random Flux (bf16, seed 0); inputs: `ditq calibrate`'s random inputs
(5 timesteps, 256 image + 64 text tokens, seed 0), which are also the calibration batches and the inputs the
whole-model cosine is measured on (minimum over them, fp32 compute of the bf16 model vs each quantized one).
Speeds are estimates from the shipped GEMM benchmark table (as both tools rank candidates).
"""

from __future__ import annotations

import argparse
import copy
import sys
import tempfile
from pathlib import Path

import torch


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default=None, help="work folder (default: a temporary one)")
    ap.add_argument("--targets", default="0.999,0.9999,0.99999")
    a = ap.parse_args(argv)
    import diffusers

    import ditq
    from ditq.convert import convert_checkpoint
    from ditq.convert.calibrate import capture_calibration, measure_gains, random_inputs
    from ditq.nn.quantize import linear_layers
    from ditq.precision import cosine
    from ditq.tensor import QuantizedTensor

    work = Path(a.out or tempfile.mkdtemp(prefix="ditq-precision-"))
    work.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(0)
    model = diffusers.FluxTransformer2DModel(num_layers=1, num_single_layers=1, in_channels=64, num_attention_heads=4,
                                             joint_attention_dim=512, pooled_projection_dim=256,
                                             axes_dims_rope=(16, 56, 56)).to(torch.bfloat16).eval()  # fmt: skip
    model.save_pretrained(work / "flux-tiny")
    src = work / "flux-tiny" / "diffusion_pytorch_model.safetensors"
    inputs = random_inputs(model, (0.9, 0.7, 0.5, 0.3, 0.1), 1, 256, 64, 0)

    def fwd(m, kw):
        return m(**kw, return_dict=False)[0]

    with torch.no_grad():
        refs = [fwd(model, kw).float() for kw in inputs]

    def measured(m) -> float:
        with torch.no_grad():
            return min(cosine(fwd(m, kw).float(), r) for kw, r in zip(inputs, refs))

    def formats(m) -> str:
        counts = {}
        for _, lin in linear_layers(m):
            w = lin.weight
            if isinstance(w, QuantizedTensor):
                f = w.format + ("+hadamard" if w.rotation else "")
                counts[f] = counts.get(f, 0) + 1
        return ", ".join(f"{k} x{v}" for k, v in sorted(counts.items())) or "bf16 only"

    with torch.no_grad():
        stats = capture_calibration(model, inputs)
        plain = work / "cal.safetensors"
        stats.save(str(plain))
        stats.meta["gains"] = measure_gains(model, inputs, batches=2, forward_fn=fwd)
        gains = work / "cal-gains.safetensors"
        stats.save(str(gains))

    rows = []
    for t in [float(x) for x in a.targets.split(",")]:
        for how, cal in (("convert, gain 1", plain), ("convert, --gains 2", gains)):
            dst = work / f"auto-{t}-{'g' if cal is gains else 'p'}.safetensors"
            rep = convert_checkpoint(src, dst, target_cos=t, calibration=str(cal))
            p = rep.precision
            m = copy.deepcopy(model)
            ditq.load_quantized(m, dst, device="cpu")
            chosen = {}
            for r in p["layers"]:
                chosen[r["format"]] = chosen.get(r["format"], 0) + 1
            rows.append((t, how, ", ".join(f"{k} x{v}" for k, v in sorted(chosen.items())), p["estimate"],
                         1 - measured(m), p["est_speed"]))
        m = copy.deepcopy(model)
        rep = ditq.autoquant_(m, inputs, target_cos=t, forward_fn=fwd)
        counts = {}
        for r in rep.layers:
            counts[r.format] = counts.get(r.format, 0) + 1
        rows.append((t, "`autoquant_` (model measured)", ", ".join(f"{k} x{v}" for k, v in sorted(counts.items())),
                     None, 1 - measured(m), rep.est_speed))
        print(f"target {t} done", file=sys.stderr, flush=True)

    print("| target | how | formats (17 layers) | est. 1 - cos | measured 1 - cos | est. speed vs bf16 |")
    print("| --- | --- | --- | --- | --- | --- |")
    for t, how, f, est, meas, sp in rows:
        print(f"| {t} | {how} | {f} | {'-' if est is None else f'{est:.2g}'} | {max(meas, 0):.2g} | "
              f"{'-' if sp is None else f'{sp:.2f}x'} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
