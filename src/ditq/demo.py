"""`ditq demo`: the whole offline path on a small but real diffusion transformer, in under two minutes on a
CPU.

1. builds a reduced diffusers ``FluxTransformer2DModel`` (2 double + 4 single blocks, width 512, head dim
   128: every linear dimension a multiple of 128; seeded weights) and saves it as a bf16 safetensors file;
2. ``analyze``: per-layer errors of the five formats and the size each would reach;
3. ``convert`` to int8-row and int8-block (Flux preset);
4. ``verify`` both files against the source;
5. loads each converted file into a copy of the model (every quantized ``nn.Linear.weight`` becomes a
   ``QuantizedTensor`` parameter, so ``F.linear`` runs ditq's kernels) and runs original and converted
   models on the same input: sizes, reduction, output cosine similarity, time per forward.

Needs diffusers (``pip install 'ditq[diffusers]'``).
"""

from __future__ import annotations

import copy
import importlib.util
import shutil
import statistics
import tempfile
import time
from pathlib import Path

import torch

from .analyze import analyze_checkpoint
from .checkpoint.layout import iter_layers
from .convert.convert import _size, convert_checkpoint
from .errors import DitqError
from .tensor import QuantizedTensor
from .verify import verify_checkpoint

DEMO_CONFIG = dict(
    patch_size=1, in_channels=128, num_layers=2, num_single_layers=4, attention_head_dim=128, num_attention_heads=4,
    joint_attention_dim=512, pooled_projection_dim=256, guidance_embeds=True, axes_dims_rope=(16, 56, 56),
)
DEMO_FORMATS = ("int8-row", "int8-block")


def build_model(config: dict, seed: int):
    """A seeded diffusers FluxTransformer2DModel in bf16, eval mode."""
    if importlib.util.find_spec("diffusers") is None:
        raise DitqError("ditq demo needs diffusers: pip install 'ditq[diffusers]'")
    import diffusers
    from diffusers import FluxTransformer2DModel

    diffusers.utils.logging.set_verbosity_error()  # its float32-modules notice does not apply to Flux
    torch.manual_seed(seed)
    return FluxTransformer2DModel(**config).to(torch.bfloat16).eval()


def make_inputs(config: dict, image_side: int, text_tokens: int, seed: int) -> dict:
    """One denoising step's inputs: packed latents [1, side^2, in_channels], text states, pooled text, ids."""
    g = torch.Generator().manual_seed(seed + 1)
    n = image_side * image_side
    img_ids = torch.zeros(n, 3)
    img_ids[:, 1] = torch.arange(n) // image_side
    img_ids[:, 2] = torch.arange(n) % image_side
    bf = torch.bfloat16
    inputs = dict(
        hidden_states=torch.randn(1, n, config["in_channels"], generator=g).to(bf),
        encoder_hidden_states=torch.randn(1, text_tokens, config["joint_attention_dim"], generator=g).to(bf),
        pooled_projections=torch.randn(1, config["pooled_projection_dim"], generator=g).to(bf),
        timestep=torch.tensor([0.5]),
        img_ids=img_ids,
        txt_ids=torch.zeros(text_tokens, 3),
        return_dict=False,
    )
    if config.get("guidance_embeds"):
        inputs["guidance"] = torch.tensor([3.5])
    return inputs


def load_converted(model, path) -> tuple[torch.nn.Module, int]:
    """A copy of ``model`` holding the tensors of the converted file: quantized weights become
    QuantizedTensor parameters (F.linear then runs ditq's kernels), the rest is copied in."""
    qmodel = copy.deepcopy(model)
    params = dict(qmodel.named_parameters())
    swapped = 0
    for key, value in iter_layers(path, dtype=torch.bfloat16):
        if key not in params:
            raise DitqError(f"{path}: tensor {key!r} has no place in the model")
        module_name, _, attr = key.rpartition(".")
        module = qmodel.get_submodule(module_name)
        if isinstance(value, QuantizedTensor):
            setattr(module, attr, torch.nn.Parameter(value, requires_grad=False))
            swapped += 1
        else:
            params[key].data.copy_(value)
    return qmodel, swapped


def time_forward(model, inputs, repeats: int) -> tuple[torch.Tensor, float]:
    """(output, median seconds per forward) after one warm-up call."""
    times = []
    with torch.inference_mode():
        out = model(**inputs)[0]
        for _ in range(repeats):
            t0 = time.perf_counter()
            out = model(**inputs)[0]
            times.append(time.perf_counter() - t0)
    return out, statistics.median(times)


def cosine(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.double().flatten(), b.double().flatten()
    return float(a @ b / (a.norm() * b.norm()))


def run_demo(out_dir=None, config: dict | None = None, seed: int = 0, image_side: int = 16, text_tokens: int = 64,
             repeats: int = 2, formats=DEMO_FORMATS, log=print) -> dict:
    """Run the demo; files go to ``out_dir`` (kept) or a temporary folder (removed). Returns the results."""
    config = dict(config or DEMO_CONFIG)
    t_start = time.perf_counter()
    model = build_model(config, seed)
    n_params = sum(p.numel() for p in model.parameters())
    width = config["num_attention_heads"] * config["attention_head_dim"]
    log(f"ditq demo: diffusers FluxTransformer2DModel, {config['num_layers']} double + {config['num_single_layers']} "
        f"single blocks, width {width}, {n_params / 1e6:.1f}M parameters, seed {seed}")
    tmp = None
    if out_dir is None:
        tmp = tempfile.mkdtemp(prefix="ditq-demo-")
        folder = Path(tmp)
    else:
        folder = Path(out_dir)
        folder.mkdir(parents=True, exist_ok=True)
    try:
        from safetensors.torch import save_file

        src = folder / "flux-tiny-bf16.safetensors"
        save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(src))
        log(f"\n[1/5] saved {src} ({_size(src.stat().st_size)})")

        t0 = time.perf_counter()
        rep = analyze_checkpoint(src, preset="flux")
        log(f"\n[2/5] ditq analyze ({time.perf_counter() - t0:.1f} s): size and weight error per policy")
        log(_indent(rep.totals_table()))

        results = {"params": n_params, "src": str(src), "src_bytes": src.stat().st_size, "models": {}}
        converted = {}
        log("\n[3/5] ditq convert")
        for fmt in formats:
            dst = folder / f"flux-tiny-{fmt}.safetensors"
            crep = convert_checkpoint(src, dst, format=fmt, preset="flux")
            converted[fmt] = (dst, crep)
            log(f"  {fmt:<11} {dst.name}: {crep.count('quantized')} layers quantized, {crep.count('kept')} kept; "
                f"{_size(crep.src_file_bytes)} -> {_size(crep.dst_file_bytes)} ({100 * crep.reduction:.1f}% smaller), "
                f"{crep.seconds:.1f} s")

        log("\n[4/5] ditq verify")
        for fmt, (dst, _) in converted.items():
            vrep = verify_checkpoint(src, dst)
            steps = max((c.max_steps for c in vrep.checks if c.max_steps is not None), default=0.0)
            log(f"  {fmt:<11} {'OK' if vrep.ok else 'FAILED'}: {len(vrep.checks)} keys, largest error "
                f"{steps:.3f} step of the format (round-to-nearest bound 0.5)")
            if not vrep.ok:
                raise DitqError(f"verify failed for {dst}:\n{vrep.summary()}")

        log(f"\n[5/5] one forward pass ({image_side * image_side} image + {text_tokens} text tokens), same input")
        inputs = make_inputs(config, image_side, text_tokens, seed)
        ref, t_ref = time_forward(model, inputs, repeats)
        rows = [("bf16 (original)", results["src_bytes"], None, 1.0, t_ref)]
        results["models"]["bf16"] = {"bytes": results["src_bytes"], "cosine": 1.0, "seconds": t_ref}
        for fmt, (dst, crep) in converted.items():
            qmodel, swapped = load_converted(model, dst)
            out, t = time_forward(qmodel, inputs, repeats)
            cos = cosine(out, ref)
            rows.append((fmt, crep.dst_file_bytes, crep.reduction, cos, t))
            results["models"][fmt] = {"bytes": crep.dst_file_bytes, "reduction": crep.reduction, "cosine": cos,
                                      "seconds": t, "quantized_linears": swapped}
            del qmodel
        log(f"  {'model':<16} {'file size':>10} {'reduction':>10} {'output cosine':>14} {'time/forward':>13}")
        for name, size, red, cos, t in rows:
            log(f"  {name:<16} {_size(size):>10} {('-' if red is None else f'{100 * red:.1f}%'):>10} {cos:>14.6f} "
                f"{t * 1000:>10.0f} ms")
        if next(model.parameters()).device.type == "cpu":
            log("  (on a CPU ditq runs its pure-torch reference, dequantize + float matmul: 8-bit saves memory here, "
                "not time; the speedup needs a GPU, see `ditq bench model`)")
        results["seconds"] = time.perf_counter() - t_start
        log(f"\ndone in {results['seconds']:.0f} s; files " + (f"kept in {folder}" if tmp is None else "removed (keep them with --out DIR)"))
        return results
    finally:
        if tmp is not None:
            shutil.rmtree(tmp, ignore_errors=True)


def _indent(text: str, n: int = 2) -> str:
    return "\n".join(" " * n + line for line in text.splitlines())


def add_arguments(p) -> None:
    p.add_argument("--out", default=None, metavar="DIR", help="keep the checkpoints in DIR (default: a temporary folder)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--json", default=None, metavar="REPORT", help="write the results as JSON ('-' for stdout)")


def main(args) -> int:
    from .convert.convert import write_json

    results = run_demo(args.out, seed=args.seed)
    if args.json:
        write_json(results, args.json)
    return 0
