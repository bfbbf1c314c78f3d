"""`ditq calibrate`: capture the input statistics of every linear layer of a model from a few real forward
passes (several timesteps and prompts or latents), for learned rounding and bias correction
(``ditq convert --rounding learned --calibration FILE``).

``capture_calibration(model, inputs)`` hooks the input of each selected ``nn.Linear``, accumulates per layer
the sum and second moment of its input rows (full ``[K, K]`` up to ``max_full_k`` features, above that a
Nyström sketch of rank ``sketch_rank`` plus the exact diagonal), and diverts a small random set of rows
from every call into a held-out sample that the moment never sees. Layers that receive the very same
input tensor (to_q / to_k / to_v) share one set of statistics. The file format is
``ditq.rounding.CalibrationStats``.
"""

from __future__ import annotations

import argparse
import copy
import importlib
import importlib.util
import json
import math
import sys
import time
from collections import OrderedDict
from pathlib import Path

import torch
from torch import nn

from ..errors import CheckpointError, DitqError
from ..modelcall import call_model, output_tensor
from ..rounding import CalibrationStats, LayerStats

GAIN_EPS = 0.02
"""Relative size of the noise ``measure_gains`` adds to a layer's output: the size of 8-bit output errors
(0.7-3.7% measured per layer), small enough for the model's response to stay linear."""

_RECENT = 4  # inputs kept alive (and so with unique addresses) to detect layers that share one


class _Accumulator:
    """Running statistics of one layer's input rows [M, K]."""

    def __init__(self, k: int, device, full: bool, sketch_rank: int, sample_per_call: int, gen: torch.Generator):
        self.k, self.full, self.count, self.adds = k, full, 0, 0
        self.sum = torch.zeros(k, dtype=torch.float64, device=device)
        self.sample_per_call, self.gen, self.samples = sample_per_call, gen, []
        if full:
            self.moment = torch.zeros(k, k, device=device)
        else:
            r = min(k, sketch_rank + 16)  # oversampling makes the top sketch_rank directions accurate
            self.omega = torch.linalg.qr(torch.randn(k, r, generator=gen).to(device))[0]
            self.y = torch.zeros(k, r, device=device)
            self.diag = torch.zeros(k, dtype=torch.float64, device=device)
            self.rank = min(sketch_rank, r)

    def add(self, x: torch.Tensor) -> None:
        x = x.detach().reshape(-1, self.k).float()
        self.adds += 1
        m = x.shape[0]
        take = min(self.sample_per_call, m // 8)  # the moment keeps at least 7/8 of every call's rows
        if take > 0:
            idx = torch.randperm(m, generator=self.gen)[:take].to(x.device)
            keep = torch.ones(m, dtype=torch.bool, device=x.device)
            keep[idx] = False
            self.samples.append(x[idx].cpu())
            x = x[keep]
        self.count += x.shape[0]
        self.sum += x.sum(0, dtype=torch.float64)
        if self.full:
            self.moment.addmm_(x.t(), x)
        else:
            self.y.addmm_(x.t(), x @ self.omega)
            self.diag += x.double().square().sum(0)

    def finish(self, sample_rows: int, gen: torch.Generator) -> LayerStats:
        if self.count == 0:
            raise DitqError("calibration: a layer saw no input rows (inputs with fewer than 2 tokens?)")
        mean = (self.sum / self.count).float().cpu()
        sample = None
        if self.samples:
            sample = torch.cat(self.samples)
            if sample.shape[0] > sample_rows:
                sample = sample[torch.randperm(sample.shape[0], generator=gen)[:sample_rows]]
        if self.full:
            return LayerStats(mean, self.count, moment=(self.moment / self.count).cpu(), sample=sample)
        # Nyström: H ≈ Y (Ω^T Y)^+ Y^T with Y = H Ω, stabilized by a small shift (Tropp et al. 2017)
        y = (self.y / self.count).double()
        om = self.omega.double()
        nu = 1e-7 * float(torch.linalg.matrix_norm(y))
        y_nu = y + nu * om
        c = torch.linalg.cholesky(om.t() @ y_nu + 1e-12 * torch.eye(om.shape[1], dtype=y.dtype, device=y.device))
        b = torch.linalg.solve_triangular(c, y_nu.t(), upper=False).t()  # Y_nu C^-T
        u, sv, _ = torch.linalg.svd(b, full_matrices=False)
        lam = (sv.square() - nu).clamp(min=0)[: self.rank]
        return LayerStats(mean, self.count, eigvecs=u[:, : self.rank].float().cpu(), eigvals=lam.float().cpu(),
                          diag=(self.diag / self.count).float().cpu(), sample=sample)


def _select(model: nn.Module, layers) -> dict[str, nn.Linear]:
    """Linear modules by name; ``layers``: None (all), names / substrings, or a predicate(name, module)."""
    out = {}
    for name, mod in model.named_modules():
        if not isinstance(mod, nn.Linear):
            continue
        if layers is None or (callable(layers) and layers(name, mod)) or (
            not callable(layers) and any(p == name or p in name for p in layers)
        ):
            out[name] = mod
    return out


def capture_calibration(
    model: nn.Module,
    inputs,
    layers=None,
    *,
    forward_fn=None,
    max_full_k: int = 8192,
    sketch_rank: int = 512,
    sample_rows: int = 256,
    seed: int = 0,
    share_inputs: bool = True,
    progress: bool = False,
) -> CalibrationStats:
    """Run ``forward_fn(model, batch)`` (default ``model(**batch)``) for every batch of ``inputs`` under
    no_grad, hooking the inputs of the selected linear layers, and return their ``CalibrationStats``.

    inputs: an iterable of batches (a list lets the held-out sample spread evenly over the batches).
    layers: None (all nn.Linear), a list of names or substrings, or a predicate(name, module).
    Statistics accumulate in float32 on the device of each layer's input."""
    selected = _select(model, layers)
    if not selected:
        raise DitqError("calibration: no nn.Linear layer matches the selection; check --layers")
    n_batches = len(inputs) if hasattr(inputs, "__len__") else None
    per_call = math.ceil(sample_rows / n_batches) if n_batches else max(1, sample_rows // 8)
    gen = torch.Generator().manual_seed(seed)
    forward_fn = forward_fn or call_model
    accs: dict[str, _Accumulator] = {}
    alias: dict[str, str] = {}  # layer -> owner whose accumulator holds exactly this layer's inputs
    calls: dict[str, int] = {}
    partial: list[str] = []
    recent: OrderedDict = OrderedDict()  # (ptr, shape, stride, version) -> (owner, tensor kept alive)

    def hook(name):
        def fn(module, args, kwargs):
            x = args[0] if args else kwargs.get("input")
            if x is None or x.shape[-1] != module.in_features:
                return
            key = (x.data_ptr(), tuple(x.shape), tuple(x.stride()), x._version)
            hit = recent.get(key) if share_inputs else None
            first = name not in calls
            calls[name] = calls.get(name, 0) + 1
            if hit is not None and (first and name not in accs or alias.get(name) == hit[0]):
                alias[name] = hit[0]  # same tensor as the owner's input: nothing to accumulate
                return
            if name in alias:  # it shared inputs so far, not this time
                owner = accs[alias.pop(name)]
                if owner.adds == calls[name] - 1:  # the owner saw exactly this layer's inputs: continue from it
                    accs[name] = copy.deepcopy(owner)
                else:  # the owner saw more: start afresh, these statistics cover this layer's later calls only
                    partial.append(name)
            if name not in accs:
                full = x.shape[-1] <= max_full_k
                accs[name] = _Accumulator(x.shape[-1], x.device, full, sketch_rank, per_call, gen)
            accs[name].add(x)
            recent[key] = (name, x)
            while len(recent) > _RECENT:
                recent.popitem(last=False)

        return fn

    handles = [m.register_forward_pre_hook(hook(n), with_kwargs=True) for n, m in selected.items()]
    t0 = time.perf_counter()
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            for i, batch in enumerate(inputs):
                forward_fn(model, batch)
                recent.clear()
                if progress:
                    print(f"calibrate: batch {i + 1}{'/' + str(n_batches) if n_batches else ''} "
                          f"({time.perf_counter() - t0:.1f} s)", file=sys.stderr)
    finally:
        for h in handles:
            h.remove()
        model.train(was_training)
    missing = sorted(set(selected) - set(calls))
    stats = CalibrationStats(
        {name: acc.finish(sample_rows, gen) for name, acc in accs.items()},
        dict(alias),
        {"batches": n_batches, "seconds": round(time.perf_counter() - t0, 3), "not_called": missing, "partial": partial,
         "max_full_k": max_full_k, "sketch_rank": sketch_rank, "sample_rows": sample_rows},
    )
    return stats


def measure_gains(model: nn.Module, inputs, layers=None, *, forward_fn=None, batches: int = 2, eps: float = GAIN_EPS,
                  seed: int = 0, progress: bool = False) -> dict[str, float]:
    """Per selected linear layer, how much a relative error of its output moves the model's output: noise of
    relative size ``eps`` per token (Gaussian, scaled to each output row's RMS, as 8-bit quantization errors
    scale with each token's range) is added to the layer's output alone, and the gain is the model output's
    relative change over ``eps`` (the largest over the first ``batches`` inputs). A layer whose output is
    the model's output has gain 1; one feeding a residual stream much larger than itself, far less.

    ``ditq convert --target-cos`` weighs each layer's measured output error by it. Cost: one forward per
    layer and batch."""
    selected = _select(model, layers)
    if not selected:
        raise DitqError("calibration: no nn.Linear layer matches the selection; check --layers")
    fwd = forward_fn or call_model
    todo = list(inputs)[: max(1, batches)]
    gains: dict[str, float] = {}
    t0 = time.perf_counter()
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            refs = [output_tensor(fwd(model, b)).detach().double() for b in todo]
            for i, (name, mod) in enumerate(selected.items()):
                gen = torch.Generator().manual_seed(seed + i)

                def noisy(m, args, out, gen=gen):
                    z = torch.randn(out.shape, generator=gen).to(out.device)
                    rms = out.float().square().mean(dim=-1, keepdim=True).sqrt()
                    return (out.float() + eps * rms * z).to(out.dtype)

                h = mod.register_forward_hook(noisy)
                try:
                    worst = 0.0
                    for b, ref in zip(todo, refs):
                        y = output_tensor(fwd(model, b)).detach().double()
                        den = float(ref.norm())
                        worst = max(worst, float((y - ref).norm()) / den if den > 0 else 0.0)
                finally:
                    h.remove()
                gains[name] = worst / eps
                if progress and (i + 1) % 25 == 0:
                    print(f"calibrate: gains of {i + 1}/{len(selected)} layers ({time.perf_counter() - t0:.1f} s)",
                          file=sys.stderr)
    finally:
        model.train(was_training)
    return gains


# -- random inputs for diffusers transformers (tests, smoke runs) --------------------------------------------
def random_inputs(model: nn.Module, timesteps=(0.9, 0.6, 0.3, 0.1), batches: int = 1, tokens: int = 256,
                  text_tokens: int = 32, seed: int = 0, dtype=None, device=None) -> list[dict]:
    """Batches of random latents / text embeddings at several timesteps (fractions of the schedule) for
    the diffusers transformer families ditq knows (Flux, SD3). Real calibration should use real prompts
    through ``--inputs``; random inputs only exercise the path."""
    cls = type(model).__name__
    cfg = getattr(model, "config", None)
    p = next(model.parameters())
    dtype, device = dtype or p.dtype, device or p.device
    g = torch.Generator().manual_seed(seed)

    def rnd(*shape):
        return torch.randn(*shape, generator=g).to(device, dtype)

    out = []
    for b in range(batches):
        for t in timesteps:
            if cls == "FluxTransformer2DModel":
                side = max(1, int(math.sqrt(tokens)))
                ids = torch.stack(torch.meshgrid(torch.zeros(1), torch.arange(float(side)), torch.arange(float(side)),
                                                 indexing="ij"), -1).reshape(-1, 3)
                batch = dict(hidden_states=rnd(1, ids.shape[0], cfg.in_channels),
                             encoder_hidden_states=rnd(1, text_tokens, cfg.joint_attention_dim),
                             pooled_projections=rnd(1, cfg.pooled_projection_dim),
                             timestep=torch.full((1,), t, device=device, dtype=dtype),
                             img_ids=ids.to(device, dtype),
                             txt_ids=torch.zeros(text_tokens, 3, device=device, dtype=dtype))
                if cfg.guidance_embeds:
                    batch["guidance"] = torch.full((1,), 3.5, device=device, dtype=dtype)
            elif cls == "SD3Transformer2DModel":
                side = max(cfg.patch_size, int(math.sqrt(tokens)) * cfg.patch_size)
                batch = dict(hidden_states=rnd(1, cfg.in_channels, side, side),
                             encoder_hidden_states=rnd(1, text_tokens, cfg.joint_attention_dim),
                             pooled_projections=rnd(1, cfg.pooled_projection_dim),
                             timestep=torch.full((1,), 1000.0 * t, device=device, dtype=dtype))
            else:
                raise DitqError(f"calibration: no built-in random inputs for {cls}; pass --inputs module:function "
                                f"returning the batches (dicts of forward() arguments) of real prompts and latents")
            out.append(batch)
    return out


# -- command line -----------------------------------------------------------------------------------------
def _load_callable(path: str):
    mod, _, attr = path.partition(":")
    if not attr:
        raise DitqError(f"{path!r}: give a callable as module:function (e.g. my_calib:batches)")
    try:
        if mod.endswith(".py") or "/" in mod:
            spec = importlib.util.spec_from_file_location(Path(mod).stem, mod)
            m = importlib.util.module_from_spec(spec)
            spec.loader.exec_module(m)
        else:
            m = importlib.import_module(mod)
        return getattr(m, attr)
    except (ImportError, AttributeError, FileNotFoundError) as e:
        raise DitqError(f"cannot load {path!r}: {e}") from e


def load_diffusers_model(folder: str, dtype: torch.dtype, device):
    """A diffusers model from its folder (``config.json`` naming ``_class_name``), or from a pipeline folder's
    ``transformer`` subfolder."""
    root = Path(folder)
    if not (root / "config.json").exists() and (root / "transformer" / "config.json").exists():
        root = root / "transformer"
    cfg_path = root / "config.json"
    if not cfg_path.exists():
        raise CheckpointError(f"{folder}: no config.json (nor transformer/config.json); give a diffusers model folder")
    try:
        import diffusers
    except ImportError as e:
        raise DitqError("loading a diffusers model needs `pip install diffusers`") from e
    cls_name = json.loads(cfg_path.read_text()).get("_class_name")
    cls = getattr(diffusers, cls_name or "", None)
    if cls is None:
        raise CheckpointError(f"{cfg_path}: unknown diffusers class {cls_name!r}")
    return cls.from_pretrained(str(root), torch_dtype=dtype).to(device)


_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("model", help="diffusers model folder (or pipeline folder with transformer/), or module:function "
                                 "returning an nn.Module")
    p.add_argument("-o", "--output", required=True, help="statistics file to write (.safetensors)")
    p.add_argument("--inputs", help="module:function(model) returning the batches (dicts of forward() arguments); "
                                    "default: random latents at --timesteps (Flux, SD3 only; a smoke test, "
                                    "not real calibration)")
    p.add_argument("--forward", help="module:function(model, batch) running one forward (default model(**batch))")
    p.add_argument("--timesteps", default="0.9,0.7,0.5,0.3,0.1", help="schedule fractions for random inputs")
    p.add_argument("--batches", type=int, default=2, help="random batches per timestep")
    p.add_argument("--tokens", type=int, default=1024, help="image tokens per random batch")
    p.add_argument("--text-tokens", type=int, default=128, help="text tokens per random batch")
    p.add_argument("--layers", help="comma-separated names or substrings of the linear layers to capture (default all)")
    p.add_argument("--max-full-k", type=int, default=8192, help="largest input width stored as a full KxK moment")
    p.add_argument("--sketch-rank", type=int, default=512, help="rank of the summary of wider layers")
    p.add_argument("--sample-rows", type=int, default=256, help="held-out input rows kept per layer")
    p.add_argument("--dtype", default="bf16", choices=sorted(_DTYPES), help="model dtype")
    p.add_argument("--device", default="auto", help="cuda, cpu or auto")
    p.add_argument("--gains", type=int, default=0, metavar="B",
                   help="also measure each layer's gain (how much an error of its output moves the model output) "
                        "on the first B batches, for `ditq convert --target-cos` (one forward per layer and batch)")
    p.add_argument("--seed", type=int, default=0)


def main(args) -> int:
    if args.device == "auto":
        device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    else:
        device = torch.device(args.device)
    out = Path(args.output)
    if not out.parent.is_dir():
        raise CheckpointError(f"output folder {out.parent} does not exist; create it first")
    dtype = _DTYPES[args.dtype]
    if ":" in args.model and not Path(args.model).exists():
        model = _load_callable(args.model)().to(device, dtype)
    else:
        model = load_diffusers_model(args.model, dtype, device)
    if args.inputs:
        batches = _load_callable(args.inputs)(model)
    else:
        ts = tuple(float(t) for t in args.timesteps.split(","))
        batches = random_inputs(model, ts, args.batches, args.tokens, args.text_tokens, args.seed)
    layers = [s.strip() for s in args.layers.split(",") if s.strip()] if args.layers else None
    if args.gains > 0:
        batches = list(batches)  # read twice: statistics, then gains
    forward_fn = _load_callable(args.forward) if args.forward else None
    stats = capture_calibration(model, batches, layers, forward_fn=forward_fn, max_full_k=args.max_full_k,
                                sketch_rank=args.sketch_rank, sample_rows=args.sample_rows, seed=args.seed,
                                progress=True)
    if args.gains > 0:
        stats.meta["gains"] = measure_gains(model, batches, layers, forward_fn=forward_fn, batches=args.gains,
                                            seed=args.seed, progress=True)
        stats.meta["gain_eps"], stats.meta["gain_batches"] = GAIN_EPS, min(args.gains, len(batches))
    stats.meta["model"] = str(args.model)
    stats.meta["inputs"] = args.inputs or f"random latents at timesteps {args.timesteps}"
    stats.save(out)
    n_low = sum(st.summary == "lowrank" for st in stats.layers.values())
    tokens = max((st.count for st in stats.layers.values()), default=0)
    print(f"calibrate: {len(stats.layers)} layers with own statistics ({n_low} low-rank), {len(stats.aliases)} "
          f"sharing another layer's input, up to {tokens} tokens a layer; wrote {out} "
          f"({out.stat().st_size / 1e6:.1f} MB)")
    if stats.meta.get("gains"):
        g = sorted(stats.meta["gains"].values())
        print(f"calibrate: gains of {len(g)} layers measured (model-output change per relative output error: "
              f"{g[0]:.3g} to {g[-1]:.3g}, median {g[len(g) // 2]:.3g})")
    if stats.meta["not_called"]:
        print(f"calibrate: {len(stats.meta['not_called'])} selected layers never ran (e.g. "
              f"{stats.meta['not_called'][0]}); they will be rounded to nearest", file=sys.stderr)
    return 0
