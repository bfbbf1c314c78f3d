"""`ditq bench model`: one full-size transformer forward, bf16 against each 8-bit format, eager and compiled.

The architecture is diffusers' class built from its published config: parameters are created on the meta
device, then materialized on the GPU with seeded random values in bf16 (PyTorch's default init scales:
uniform +-1/sqrt(fan_in) for linear and conv weights and biases, ones for norm scales; the model's
``_keep_in_fp32_modules`` in float32, as diffusers loads them). Inputs are seeded random tensors of the
size a real generation uses. Every variant runs in one process on the same model and inputs:

- bf16 eager (the baseline); each format through ``ditq.quantize_`` (the policy's kept layers stay bf16;
  the bf16 weights are set aside and restored afterwards);
- compiled (``--compile regional``: each repeated block compiled, diffusers' ``compile_repeated_blocks``;
  ``full``: the whole transformer) for bf16 and the formats in ``--compile-formats`` ("best" = the fastest
  eager format), with the first call's wall time (compilation included).

Reported per variant: median forward time (CUDA events), speedup vs bf16 eager, weight bytes, forward peak
(weights + the allocator's peak above them during the call), output cosine similarity and relative error
vs bf16 eager, and, before the models, the Python dispatch overhead of ``F.linear`` on a QuantizedTensor.
Correctness gates: every output finite; a quantized variant whose cosine is below 0.99 is flagged.
"""

from __future__ import annotations

import contextlib
import gc
import json
import math
import platform
import statistics
import sys
import time
from dataclasses import dataclass, field
from typing import Callable

import torch
import torch.nn as nn

from .. import formats as F

GB = 1e9


# -- architectures ------------------------------------------------------------------------------------------
@dataclass
class Arch:
    """A diffusers transformer class, its published config, and a function that builds forward kwargs
    from a config and a size (dict)."""

    cls: str
    config: dict
    size: dict
    inputs: Callable
    tiny_config: dict = field(default_factory=dict)
    tiny_size: dict = field(default_factory=dict)
    describe: str = ""


def _flux_inputs(cfg, size, device, dtype, g):
    h, w, n_txt = size["height"] // 16, size["width"] // 16, size["text_tokens"]
    n_img = h * w
    ids = torch.zeros(h, w, 3)
    ids[..., 1] = torch.arange(h)[:, None]
    ids[..., 2] = torch.arange(w)[None, :]
    kw = dict(
        hidden_states=_randn((1, n_img, cfg.get("in_channels", 64)), g, device, dtype),
        encoder_hidden_states=_randn((1, n_txt, cfg.get("joint_attention_dim", 4096)), g, device, dtype),
        pooled_projections=_randn((1, cfg.get("pooled_projection_dim", 768)), g, device, dtype),
        timestep=torch.tensor([0.5], device=device, dtype=dtype),
        img_ids=ids.reshape(-1, 3).to(device),
        txt_ids=torch.zeros(n_txt, 3, device=device),
    )
    if cfg.get("guidance_embeds", False):
        kw["guidance"] = torch.tensor([3.5], device=device, dtype=dtype)
    return kw, f"{size['height']}x{size['width']}: {n_img} image + {n_txt} text tokens"


def _video_latent(size):
    t = (size["frames"] - 1) // 4 + 1
    return t, size["height"] // 8, size["width"] // 8


def _wan_inputs(cfg, size, device, dtype, g):
    t, h, w = _video_latent(size)
    pt, ph, pw = cfg.get("patch_size", (1, 2, 2))
    kw = dict(
        hidden_states=_randn((1, cfg.get("in_channels", 16), t, h, w), g, device, dtype),
        timestep=torch.tensor([500], device=device),
        encoder_hidden_states=_randn((1, size["text_tokens"], cfg.get("text_dim", 4096)), g, device, dtype),
    )
    n = (t // pt) * (h // ph) * (w // pw)
    return kw, f"{size['height']}x{size['width']}, {size['frames']} frames: {n} video + {size['text_tokens']} text tokens"


def _hunyuan_inputs(cfg, size, device, dtype, g):
    t, h, w = _video_latent(size)
    n_txt = size["text_tokens"]
    kw = dict(
        hidden_states=_randn((1, cfg.get("in_channels", 16), t, h, w), g, device, dtype),
        timestep=torch.tensor([500], device=device),
        encoder_hidden_states=_randn((1, n_txt, cfg.get("text_embed_dim", 4096)), g, device, dtype),
        encoder_attention_mask=torch.ones(1, n_txt, device=device, dtype=torch.bool),
        pooled_projections=_randn((1, cfg.get("pooled_projection_dim", 768)), g, device, dtype),
        guidance=torch.tensor([6000.0], device=device, dtype=dtype),
    )
    p, pt = cfg.get("patch_size", 2), cfg.get("patch_size_t", 1)
    n = (t // pt) * (h // p) * (w // p)
    return kw, f"{size['height']}x{size['width']}, {size['frames']} frames: {n} video + {n_txt} text tokens"


def _kandinsky_inputs(cfg, size, device, dtype, g):
    t, h, w = _video_latent(size)
    c = cfg.get("in_visual_dim", 4)
    c = 2 * c + 1 if cfg.get("visual_cond", False) else c
    n_txt = size["text_tokens"]
    pt, ph, pw = cfg.get("patch_size", (1, 2, 2))
    kw = dict(
        hidden_states=_randn((1, t, h, w, c), g, device, dtype),
        encoder_hidden_states=_randn((1, n_txt, cfg.get("in_text_dim", 3584)), g, device, dtype),
        timestep=torch.tensor([500.0], device=device, dtype=dtype),
        pooled_projections=_randn((1, cfg.get("in_text_dim2", 768)), g, device, dtype),
        visual_rope_pos=[torch.arange(t, device=device), torch.arange(h // ph, device=device), torch.arange(w // pw, device=device)],
        text_rope_pos=torch.arange(n_txt, device=device),
        scale_factor=tuple(size.get("scale_factor", (1.0, 1.0, 1.0))),
    )
    n = (t // pt) * (h // ph) * (w // pw)
    return kw, f"{size['height']}x{size['width']}, {size['frames']} frames: {n} video + {n_txt} text tokens"


def _sd3_inputs(cfg, size, device, dtype, g):
    h, w = size["height"] // 8, size["width"] // 8
    kw = dict(
        hidden_states=_randn((1, cfg.get("in_channels", 16), h, w), g, device, dtype),
        encoder_hidden_states=_randn((1, size["text_tokens"], cfg.get("joint_attention_dim", 4096)), g, device, dtype),
        pooled_projections=_randn((1, cfg.get("pooled_projection_dim", 2048)), g, device, dtype),
        timestep=torch.tensor([500.0], device=device, dtype=dtype),
    )
    p = cfg.get("patch_size", 2)
    return kw, f"{size['height']}x{size['width']}: {(h // p) * (w // p)} image + {size['text_tokens']} text tokens"


# Kandinsky 5 Pro and Lite share inputs ("5 s SD": 512x768, 121 frames, scale factor of the 512 pipelines)
_K5_SIZE = dict(height=512, width=768, frames=121, text_tokens=256, scale_factor=(1.0, 2.0, 2.0))
_K5_TINY = dict(in_visual_dim=4, out_visual_dim=4, time_dim=32, patch_size=(1, 2, 2), model_dim=128, ff_dim=256,
                num_text_blocks=1, num_visual_blocks=2, axes_dims=(8, 12, 12), visual_cond=True, in_text_dim=64,
                in_text_dim2=32)
_K5_TINY_SIZE = dict(height=64, width=64, frames=5, text_tokens=8)

ARCHS: dict[str, Arch] = {
    # black-forest-labs/FLUX.1-dev transformer/config.json
    "flux": Arch(
        "FluxTransformer2DModel",
        dict(patch_size=1, in_channels=64, num_layers=19, num_single_layers=38, attention_head_dim=128,
             num_attention_heads=24, joint_attention_dim=4096, pooled_projection_dim=768, guidance_embeds=True,
             axes_dims_rope=(16, 56, 56)),
        dict(height=1024, width=1024, text_tokens=512),
        _flux_inputs,
        dict(patch_size=1, in_channels=16, num_layers=1, num_single_layers=1, attention_head_dim=32,
             num_attention_heads=4, joint_attention_dim=64, pooled_projection_dim=32, guidance_embeds=True,
             axes_dims_rope=(8, 12, 12)),
        dict(height=64, width=64, text_tokens=8),
        "FLUX.1-dev transformer (11.9 B)",
    ),
    # Wan-AI/Wan2.1-T2V-14B-Diffusers transformer/config.json
    "wan-14b": Arch(
        "WanTransformer3DModel",
        dict(patch_size=(1, 2, 2), num_attention_heads=40, attention_head_dim=128, in_channels=16, out_channels=16,
             text_dim=4096, freq_dim=256, ffn_dim=13824, num_layers=40, cross_attn_norm=True,
             qk_norm="rms_norm_across_heads", eps=1e-6, rope_max_seq_len=1024),
        dict(height=480, width=832, frames=81, text_tokens=512),
        _wan_inputs,
        dict(patch_size=(1, 2, 2), num_attention_heads=4, attention_head_dim=32, in_channels=4, out_channels=4,
             text_dim=64, freq_dim=32, ffn_dim=256, num_layers=2, cross_attn_norm=True,
             qk_norm="rms_norm_across_heads", eps=1e-6, rope_max_seq_len=64),
        dict(height=32, width=32, frames=5, text_tokens=8),
        "Wan 2.1 T2V 14B transformer",
    ),
    # kandinskylab Kandinsky-5.0 T2V Pro / Lite (sft 5s) transformer configs; "5 s SD": 512x768, 121 frames
    "kandinsky5-pro": Arch(
        "Kandinsky5Transformer3DModel",
        dict(in_visual_dim=16, out_visual_dim=16, time_dim=1024, patch_size=(1, 2, 2), model_dim=4096, ff_dim=16384,
             num_text_blocks=4, num_visual_blocks=60, axes_dims=(32, 48, 48), visual_cond=True, in_text_dim=3584,
             in_text_dim2=768),
        _K5_SIZE,
        _kandinsky_inputs,
        _K5_TINY,
        _K5_TINY_SIZE,
        "Kandinsky 5.0 Video Pro transformer (19 B)",
    ),
    "kandinsky5-lite": Arch(
        "Kandinsky5Transformer3DModel",
        dict(in_visual_dim=16, out_visual_dim=16, time_dim=512, patch_size=(1, 2, 2), model_dim=1792, ff_dim=7168,
             num_text_blocks=2, num_visual_blocks=32, axes_dims=(16, 24, 24), visual_cond=True, in_text_dim=3584,
             in_text_dim2=768),
        _K5_SIZE,
        _kandinsky_inputs,
        _K5_TINY,
        _K5_TINY_SIZE,
        "Kandinsky 5.0 Video Lite transformer (2 B)",
    ),
    # stabilityai/stable-diffusion-3.5-large transformer/config.json
    "sd3": Arch(
        "SD3Transformer2DModel",
        dict(sample_size=128, patch_size=2, in_channels=16, num_layers=38, attention_head_dim=64, num_attention_heads=38,
             joint_attention_dim=4096, caption_projection_dim=2432, pooled_projection_dim=2048, out_channels=16,
             pos_embed_max_size=192, qk_norm="rms_norm"),
        dict(height=1024, width=1024, text_tokens=333),
        _sd3_inputs,
        dict(sample_size=32, patch_size=2, in_channels=4, num_layers=2, attention_head_dim=32, num_attention_heads=4,
             joint_attention_dim=64, caption_projection_dim=128, pooled_projection_dim=32, out_channels=4,
             pos_embed_max_size=32, qk_norm="rms_norm"),
        dict(height=128, width=128, text_tokens=8),
        "Stable Diffusion 3.5 Large transformer (8.1 B)",
    ),
    # hunyuanvideo-community/HunyuanVideo transformer/config.json (CI only: tiny)
    "hunyuanvideo": Arch(
        "HunyuanVideoTransformer3DModel",
        dict(in_channels=16, out_channels=16, num_attention_heads=24, attention_head_dim=128, num_layers=20,
             num_single_layers=40, num_refiner_layers=2, mlp_ratio=4.0, patch_size=2, patch_size_t=1, qk_norm="rms_norm",
             guidance_embeds=True, text_embed_dim=4096, pooled_projection_dim=768, rope_theta=256.0,
             rope_axes_dim=(16, 56, 56)),
        dict(height=544, width=960, frames=61, text_tokens=256),
        _hunyuan_inputs,
        dict(in_channels=4, out_channels=4, num_attention_heads=4, attention_head_dim=32, num_layers=1,
             num_single_layers=1, num_refiner_layers=1, mlp_ratio=2.0, patch_size=2, patch_size_t=1, qk_norm="rms_norm",
             guidance_embeds=True, text_embed_dim=64, pooled_projection_dim=32, rope_theta=256.0, rope_axes_dim=(8, 12, 12)),
        dict(height=64, width=64, frames=5, text_tokens=8),
        "HunyuanVideo transformer (13 B)",
    ),
}


def _randn(shape, g, device, dtype):
    return torch.randn(shape, generator=g, device="cpu").to(device=device, dtype=dtype)


def model_class(arch: Arch):
    import diffusers

    return getattr(diffusers, arch.cls)


def make_inputs(arch: Arch, config: dict, size: dict, device, dtype, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    return arch.inputs(config, size, device, dtype, g)


def forward(model, kwargs) -> torch.Tensor:
    out = model(**kwargs, return_dict=False)
    return out[0] if isinstance(out, (tuple, list)) else out


# -- building -------------------------------------------------------------------------------------------------
def _fp32_names(model) -> list[str]:
    return list(getattr(model, "_keep_in_fp32_modules", None) or [])


@torch.no_grad()
def materialize_(model: nn.Module, device, dtype=torch.bfloat16, seed: int = 0) -> nn.Module:
    """Replace every meta parameter by a seeded random one on ``device`` (default-init scales), module by
    module, so no CPU copy of the weights ever exists. Buffers (built real) move to ``device``."""
    g = torch.Generator(device=device).manual_seed(seed)
    fp32 = _fp32_names(model)
    for mname, module in model.named_modules():
        for pname, p in list(module._parameters.items()):
            if p is None:
                continue
            # diffusers' rule for _keep_in_fp32_modules: a listed name is one component of the key
            keep32 = any(k in f"{mname}.{pname}".split(".") for k in fp32)
            dt = torch.float32 if keep32 else dtype
            t = torch.empty(p.shape, device=device, dtype=dt)
            weight_like = p.dim() >= 2
            if isinstance(module, (nn.Linear, nn.Conv1d, nn.Conv2d, nn.Conv3d)) or (weight_like and pname == "weight"):
                w = module._parameters.get("weight")
                fan_in = math.prod(w.shape[1:]) if w is not None and w.dim() >= 2 else p.shape[-1]
                bound = 1.0 / math.sqrt(max(fan_in, 1))
                t.uniform_(-bound, bound, generator=g)
            elif isinstance(module, nn.Embedding):
                t.normal_(0.0, 1.0, generator=g)
            elif p.dim() == 1 and pname.endswith("bias"):
                t.zero_()
            elif p.dim() == 1:
                t.fill_(1.0)  # norm scales
            else:  # free parameters such as Wan's scale_shift_table (randn / sqrt(dim) in diffusers)
                t.normal_(0.0, 1.0 / math.sqrt(p.shape[-1]), generator=g)
            module._parameters[pname] = nn.Parameter(t, requires_grad=False)
    return model.to(device)


def build(arch: Arch, device, dtype=torch.bfloat16, seed: int = 0, tiny: bool = False) -> nn.Module:
    """The architecture on ``device`` with seeded random weights (see ``materialize_``)."""
    from ..nn.load import empty_weights

    cls = model_class(arch)
    with empty_weights():
        model = cls(**(arch.tiny_config if tiny else arch.config))
    return materialize_(model, device, dtype, seed).eval()


# -- measuring ------------------------------------------------------------------------------------------------
def _sync(device):
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize()


def time_forward(fn, device, warmup: int, reps: int) -> list[float]:
    """Times of ``reps`` calls in ms (CUDA events on a GPU, perf_counter elsewhere), after ``warmup``."""
    for _ in range(warmup):
        fn()
    _sync(device)
    times = []
    cuda = torch.device(device).type == "cuda"
    for _ in range(reps):
        if cuda:
            a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            a.record()
            fn()
            b.record()
            b.synchronize()
            times.append(a.elapsed_time(b))
        else:
            t = time.perf_counter()
            fn()
            times.append((time.perf_counter() - t) * 1e3)
    return times


def graph_times(fn, reps: int) -> list[float]:
    """Times in ms of ``reps`` replays of one CUDA graph that captured a whole call of ``fn`` (GPU time with no
    host work between kernels: what a captured pipeline, or reduce-overhead compilation of the whole model,
    sees). Raises where ``fn`` cannot be captured."""
    from .timing import captured

    with captured(fn) as g:
        g.replay()
        torch.cuda.synchronize()
        times = []
        for _ in range(reps):
            a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            a.record()
            g.replay()
            b.record()
            b.synchronize()
            times.append(a.elapsed_time(b))
        return times


def forward_peak(fn, device):
    """(output, bytes the allocator held above its level before the call at the call's peak; GPU only)."""
    if torch.device(device).type != "cuda":
        return fn(), float("nan")
    _sync(device)
    base = torch.cuda.memory_allocated()
    torch.cuda.reset_peak_memory_stats()
    y = fn()
    _sync(device)
    return y, torch.cuda.max_memory_allocated() - base


def compare(y: torch.Tensor, ref: torch.Tensor) -> dict:
    a, b = y.detach().double().flatten(), ref.detach().double().flatten()
    cos = torch.nn.functional.cosine_similarity(a, b, dim=0).item()
    return {"cosine": cos, "rel_err": F.relative_error(a, b), "finite": bool(torch.isfinite(a).all())}


# "<format>+mod": also quantize the per-block adaLN modulation linears (diffusers' `norm1.linear`,
# `norm1_context.linear`, `norm.linear`), which the presets keep; they run on one token (the conditioning
# vector), so they cost memory, not time. "<format>+attn": ditq's INT8 attention (ditq.enable_int8_attention,
# pv=fp8) replaces the model's attention as well. Modifiers combine: "fp8-row+mod+attn".
MODULATION = r"blocks\.\d+\.(norm1|norm1_context|norm)\.linear\.weight$"


@contextlib.contextmanager
def quantized(model: nn.Module, variant: str, **kw):
    """Quantize ``model`` with ditq.quantize_ for the duration of the block; the bf16 weights are set
    aside and put back afterwards. Yields the QuantizeReport (its ``seconds``: the quantize_ wall time)."""
    from ..nn.quantize import linear_layers, quantize_

    fmt, *extras = variant.split("+")
    unknown = set(extras) - {"mod", "attn"}
    if unknown:
        raise ValueError(f"variant {variant!r}: unknown modifier(s) {sorted(unknown)}; use +mod and/or +attn")
    if "mod" in extras:
        kw["include"] = [MODULATION]
    saved = {name: m.weight for name, m in linear_layers(model)}
    attn = "attn" in extras
    try:
        t = time.perf_counter()
        report = quantize_(model, fmt, **kw)
        report.seconds = time.perf_counter() - t
        if attn:  # ditq's INT8 attention (pv=fp8) in place of the model's SDPA
            from ..nn.attention import enable_int8_attention

            enable_int8_attention(model)
        yield report
    finally:
        if attn:
            from ..nn.attention import disable_int8_attention

            disable_int8_attention(model)
        for name, m in linear_layers(model):
            m.weight = saved[name]


def compile_model(
    model: nn.Module, how: str, backend: str = "inductor", fullgraph: bool = True, mode: str | None = None
) -> Callable[[], None]:
    """Compile in place (``regional``: each repeated block; ``full``: the whole model). Returns an undo."""
    opts = dict(backend=backend, fullgraph=fullgraph)
    if mode:
        opts["mode"] = mode
    if how == "full":
        model.compile(**opts)
        return lambda: setattr(model, "_compiled_call_impl", None)
    names = set(getattr(model, "_repeated_blocks", None) or [])
    blocks = [m for m in model.modules() if type(m).__name__ in names]
    if not blocks:  # no declared repeated blocks: every child of every ModuleList
        blocks = [b for m in model.modules() if isinstance(m, nn.ModuleList) for b in m]
    for b in blocks:
        b.compile(**opts)

    def undo():
        for b in blocks:
            b._compiled_call_impl = None

    return undo


def dispatch_overhead(device, fmt: str = "int8-row", calls: int = 2000) -> dict:
    """Per-call host time of F.linear on a QuantizedTensor vs calling ditq.kernels.ops.linear directly on
    its parts, at a tiny shape (the kernels' own time is the same in both; the difference is what the
    QuantizedTensor dispatch adds). Also plain bf16 F.linear for scale."""
    import torch.nn.functional as Fn

    from ..kernels import ops
    from ..tensor import quantize_weight

    dt = torch.bfloat16
    w = torch.randn(256, 256, device=device, dtype=dt)
    q = quantize_weight(w, fmt)
    x = torch.randn(4, 256, device=device, dtype=dt)
    qd, sc, name = q.qdata, q.scale, q.format

    def rounds(fns, n_rounds=7):
        """Best host time per call of each function, the functions alternating round by round so that
        clock or load drift hits all of them alike (measuring one after the other once gave -30 us)."""
        for fn in fns:
            for _ in range(50):
                fn()
        _sync(device)
        best = [float("inf")] * len(fns)
        for _ in range(n_rounds):
            for i, fn in enumerate(fns):
                t = time.perf_counter()
                for _ in range(calls):
                    fn()
                _sync(device)
                best[i] = min(best[i], (time.perf_counter() - t) / calls * 1e6)
        return best

    with torch.no_grad():
        direct, wrapped, plain = rounds(
            [lambda: ops.linear(x, qd, sc, name), lambda: Fn.linear(x, q), lambda: Fn.linear(x, w)]
        )
    return {"format": fmt, "shape": [4, 256, 256], "direct_us": direct, "f_linear_us": wrapped, "overhead_us": wrapped - direct,
            "bf16_f_linear_us": plain}


# -- the command ------------------------------------------------------------------------------------------
def add_arguments(p) -> None:
    p.add_argument("--arch", default="flux", help=f"comma-separated: {', '.join(ARCHS)} (default flux)")
    p.add_argument("--formats", default="int8-row,fp8-row,int8-block",
                   help="comma-separated formats to run eagerly; '<format>+mod' also quantizes the adaLN modulation linears")
    p.add_argument("--compile", default="regional", choices=("regional", "full", "none"), help="how to compile (default regional)")
    p.add_argument("--compile-formats", default="best", help="formats to also run compiled: comma list ('<format>@inductor' / '@op': activation quantization as traced torch ops / inside ditq's op), 'best' or 'none'")
    p.add_argument("--compile-archs", default=None, help="archs to compile (default: all of --arch)")
    p.add_argument("--backend", default="inductor", help="torch.compile backend (default inductor)")
    p.add_argument("--compile-mode", default=None, help="torch.compile modes, comma list: default, reduce-overhead (CUDA graphs), ...")
    p.add_argument("--graph", action="store_true", help="also time each variant's whole forward captured as one CUDA graph (GPU)")
    p.add_argument("--reps", type=int, default=0, help="timed calls per variant (default: 10 for images, 3 for video)")
    p.add_argument("--warmup", type=int, default=2, help="untimed calls before timing (default 2)")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--tiny", action="store_true", help="tiny configs and sizes (a smoke test, runs on CPU)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--time-limit", type=float, default=0, help="skip remaining variants after this many seconds")
    p.add_argument("--json", metavar="PATH", help="write all numbers to this JSON file (rewritten after each variant)")


class _Run:
    def __init__(self, args):
        self.args = args
        self.t0 = time.perf_counter()
        self.out = {
            "gpu": torch.cuda.get_device_name() if torch.cuda.is_available() else platform.processor() or "cpu",
            "torch": torch.__version__,
            "python": sys.version.split()[0],
            "command": "ditq bench model " + " ".join(sys.argv[3:] if sys.argv[1:3] == ["bench", "model"] else sys.argv[1:]),
            "archs": {},
        }
        try:
            import triton

            self.out["triton"] = triton.__version__
        except ImportError:
            pass
        try:
            import diffusers

            self.out["diffusers"] = diffusers.__version__
        except ImportError:
            pass

    def out_of_time(self) -> bool:
        return bool(self.args.time_limit) and time.perf_counter() - self.t0 > self.args.time_limit

    def save(self):
        if self.args.json:
            with open(self.args.json, "w") as f:
                json.dump(self.out, f, indent=1)


def _run_arch(run: _Run, name: str) -> None:
    args = run.args
    arch = ARCHS[name]
    dev = args.device
    cfg = arch.tiny_config if args.tiny else arch.config
    size = arch.tiny_size if args.tiny else arch.size
    video = "frames" in size
    reps = args.reps or (3 if video else 10)
    warmup = min(args.warmup, 1) if video else args.warmup
    entry = run.out["archs"].setdefault(name, {"describe": arch.describe, "class": arch.cls, "config": cfg, "results": []})
    results = entry["results"]
    t = time.perf_counter()
    model = build(arch, dev, torch.bfloat16, args.seed, tiny=args.tiny)
    from ..nn.quantize import model_bytes

    entry["build_s"] = time.perf_counter() - t
    entry["params"] = sum(p.numel() for p in model.parameters())
    kwargs, entry["inputs"] = make_inputs(arch, cfg, size, dev, torch.bfloat16, args.seed)
    print(f"[{name}] {arch.describe}: {entry['params'] / 1e9:.2f} B params, built in {entry['build_s']:.1f} s; {entry['inputs']}", flush=True)
    call = lambda: forward(model, kwargs)  # noqa: E731

    def measure(variant, mode, report=None, compile_s=None):
        times = time_forward(call, dev, warmup, reps)
        y, peak = forward_peak(call, dev)
        y = y.float()
        wbytes = model_bytes(model)
        r = {"variant": variant, "mode": mode, "median_ms": statistics.median(times), "times_ms": times,
             "weight_gb": wbytes / GB, "forward_peak_gb": (wbytes + peak) / GB, "workspace_gb": peak / GB}
        if compile_s is not None:
            r["first_call_s"] = compile_s
        if args.graph and torch.device(dev).type == "cuda":
            try:
                r["graph_times_ms"] = graph_times(call, reps)
                r["graph_median_ms"] = statistics.median(r["graph_times_ms"])
            except Exception as e:  # keep the variant's other numbers
                r["graph_error"] = f"{type(e).__name__}: {str(e)[:500]}"
                print(f"  {variant} {mode}: CUDA graph capture failed: {r['graph_error'][:200]}", flush=True)
        if report is not None:
            r["quantize_s"] = report.seconds
            r["quantized_layers"] = len(report.quantized)
            r["kept_layers"] = len(report.kept)
        return r, y

    with torch.inference_mode():
        base, ref = measure("bf16", "eager")
        results.append(base)
        run.save()
        bf16_ms, bf16_w = base["median_ms"], base["weight_gb"]

        def finish(r, y):
            r.update(compare(y, ref))
            r["speedup_vs_bf16_eager"] = bf16_ms / r["median_ms"]
            r["weight_vs_bf16"] = r["weight_gb"] / bf16_w
            results.append(r)
            run.save()
            flag = "" if r["finite"] and (r["variant"] == "bf16" or r["cosine"] >= 0.99) else "  <-- CHECK"
            print(f"  {r['variant']:>10} {r['mode']:>8}: {r['median_ms']:9.2f} ms  x{r['speedup_vs_bf16_eager']:.2f}  "
                  f"weights {r['weight_gb']:.2f} GB  cos {r['cosine']:.5f}{flag}", flush=True)

        print(f"  {'bf16':>10} {'eager':>8}: {bf16_ms:9.2f} ms  weights {bf16_w:.2f} GB", flush=True)
        formats = [f for f in args.formats.split(",") if f]
        for fmt in formats:
            if run.out_of_time():
                print(f"  time limit: skipping {fmt}")
                break
            try:
                with quantized(model, fmt) as report:
                    plain = fmt.replace("+mod", "")
                    same = [r for r in results if "+mod" in fmt and r.get("quantized_layers") == len(report.quantized)
                            and r["variant"] == plain]
                    if same:  # e.g. "+mod" on a model without modulation linears: nothing new to measure
                        print(f"  {fmt}: same layers as {same[0]['variant']}, skipped")
                        continue
                    r, y = measure(fmt, "eager", report)
                    finish(r, y)
            except Exception as e:  # keep the other variants' numbers
                results.append({"variant": fmt, "mode": "eager", "error": f"{type(e).__name__}: {e}"})
                print(f"  {fmt} eager FAILED: {type(e).__name__}: {e}", flush=True)
            gc.collect()
            torch.cuda.empty_cache() if torch.cuda.is_available() else None

        compile_archs = (args.compile_archs or args.arch).split(",")
        if args.compile == "none" or name not in compile_archs:
            return
        cf = args.compile_formats
        if cf == "best":
            ok = [r for r in results if r["mode"] == "eager" and r["variant"] != "bf16" and "error" not in r]
            cf = min(ok, key=lambda r: r["median_ms"])["variant"] if ok else "none"
        compiled = ["bf16"] + [f for f in cf.split(",") if f and f != "none"]
        from .. import tensor as _tensor

        for cmode in (args.compile_mode or "default").split(","):
            label = f"compiled-{args.compile}" + ("" if cmode == "default" else f"-{cmode}")
            for variant in compiled:
                if run.out_of_time():
                    print(f"  time limit: skipping compiled {variant}")
                    break
                torch._dynamo.reset()
                # "<format>@inductor" / "@op": activation quantization as traced torch ops / inside ditq's op
                fmt, _, aq = variant.partition("@")
                ctx = contextlib.nullcontext(None) if variant == "bf16" else quantized(model, fmt)
                undo, before = None, _tensor.COMPILE_ACT_QUANT
                _tensor.COMPILE_ACT_QUANT = aq or before
                try:
                    with ctx as report:
                        undo = compile_model(model, args.compile, args.backend, mode=None if cmode == "default" else cmode)
                        t = time.perf_counter()
                        call()
                        _sync(dev)
                        first = time.perf_counter() - t
                        r, y = measure(variant, label, report, first)
                        finish(r, y)
                        print(f"             {label}: first compiled call {first:.1f} s", flush=True)
                except Exception as e:
                    results.append({"variant": variant, "mode": label, "error": f"{type(e).__name__}: {str(e)[:2000]}"})
                    print(f"  {variant} {label} FAILED: {type(e).__name__}: {str(e)[:500]}", flush=True)
                finally:
                    _tensor.COMPILE_ACT_QUANT = before
                    if undo:
                        undo()
        for r in results:
            if r["mode"].startswith("compiled") and "error" not in r:
                cb = next((b for b in results if b["variant"] == "bf16" and b["mode"] == r["mode"] and "error" not in b), None)
                if cb:
                    r["speedup_vs_bf16_compiled"] = cb["median_ms"] / r["median_ms"]
        for r in results:  # CUDA-graph replays against bf16's in the same mode
            cb = next((b for b in results if b["variant"] == "bf16" and b["mode"] == r["mode"] and "graph_median_ms" in b), None)
            if cb and "graph_median_ms" in r:
                r["graph_speedup_vs_bf16_same_mode"] = cb["graph_median_ms"] / r["graph_median_ms"]
        run.save()
    del model, kwargs, ref
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def table(out: dict) -> str:
    lines = []
    for name, entry in out["archs"].items():
        lines.append(f"\n{name}: {entry['describe']} ({entry.get('params', 0) / 1e9:.2f} B), {entry.get('inputs', '')}, {out['gpu']}")
        lines.append(f"| variant | mode | median ms | vs bf16 eager | vs bf16 compiled | CUDA graph ms | graph vs bf16 graph | weights GB | vs bf16 | peak GB | cosine | rel err | first call s |")
        lines.append("| --- | --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |")
        for r in entry["results"]:
            if "error" in r:
                lines.append(f"| {r['variant']} | {r['mode']} | failed: {r['error'][:80]} |")
                continue
            lines.append(
                f"| {r['variant']} | {r['mode']} | {r['median_ms']:.1f} | {r.get('speedup_vs_bf16_eager', 1.0):.2f}x | "
                f"{_fmt(r.get('speedup_vs_bf16_compiled'), '{:.2f}x')} | {_fmt(r.get('graph_median_ms'), '{:.1f}')} | "
                f"{_fmt(r.get('graph_speedup_vs_bf16_same_mode'), '{:.2f}x')} | {r['weight_gb']:.2f} | {r.get('weight_vs_bf16', 1.0):.1%} | "
                f"{r['forward_peak_gb']:.1f} | {_fmt(r.get('cosine'), '{:.5f}')} | {_fmt(r.get('rel_err'), '{:.4f}')} | "
                f"{_fmt(r.get('first_call_s'), '{:.0f}')} |"
            )
    if "dispatch" in out:
        d = out["dispatch"]
        lines.append(
            f"\nF.linear dispatch on a QuantizedTensor ({d['format']}, x {d['shape'][:2]}, W {d['shape'][1:]}): "
            f"{d['f_linear_us']:.1f} us/call vs {d['direct_us']:.1f} us calling the kernel wrapper: overhead "
            f"{d['overhead_us']:.1f} us (bf16 F.linear {d['bf16_f_linear_us']:.1f} us)"
        )
    return "\n".join(lines)


def _fmt(v, spec):
    return "-" if v is None else spec.format(v)


def main(args) -> int:
    run = _Run(args)
    names = [a for a in args.arch.split(",") if a]
    for a in names:
        if a not in ARCHS:
            from ..errors import DitqError

            raise DitqError(f"unknown --arch {a!r}; choose from {', '.join(ARCHS)}")
    if args.device != "cpu":
        run.out["dispatch"] = dispatch_overhead(args.device)
        d = run.out["dispatch"]
        print(f"dispatch: F.linear {d['f_linear_us']:.1f} us, direct {d['direct_us']:.1f} us, overhead {d['overhead_us']:.1f} us", flush=True)
    for a in names:
        if run.out_of_time():
            print(f"time limit: skipping {a}")
            continue
        try:
            _run_arch(run, a)
        except Exception as e:
            run.out["archs"].setdefault(a, {"results": []})["error"] = f"{type(e).__name__}: {e}"
            print(f"[{a}] FAILED: {type(e).__name__}: {e}", flush=True)
            import traceback

            traceback.print_exc()
        run.save()
    run.out["total_s"] = time.perf_counter() - run.t0
    run.save()
    print(table(run.out))
    return 0
