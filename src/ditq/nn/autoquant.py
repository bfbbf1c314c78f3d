"""``autoquant_(model, inputs, target_cos)``: give each linear layer the fastest format that keeps the whole
model's output within a cosine budget of the float model, in place.

Method (issue 8, part 3):

1. Run the float model on ``inputs`` (several timesteps are several inputs) and keep its outputs.
2. Sensitivity: for each eligible layer (the preset's quantizable ``nn.Linear`` layers, as ``quantize_``
   picks them) and each candidate format, quantize ONLY that layer, measure the model-output cosine (the
   minimum over the inputs), then put the exact float Parameter back.
3. Assignment: 1 - cos of independent small perturbations add (the errors add in squared norm), so the
   single-layer errors are summed as an estimate. Every layer starts at its fastest candidate; while the
   estimate exceeds the budget ``1 - target_cos``, the layer with the largest current error moves one step
   toward bf16. Then all choices are applied and the whole-model cosine measured; while it misses the
   target, the same rule moves one more layer one step and re-measures (bounded: each round moves a step,
   and there are finitely many).

   Every target walks the same sequence of states and stops at its first acceptable one, so a looser target
   never picks a slower format for any layer than a tighter one.

``bf16`` means the layer keeps its float weight as it is (whatever its dtype): with ``target_cos=1.0`` the
model is unchanged.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch
import torch.nn as nn

from ..errors import DitqError, FormatError, ShapeError
from ..modelcall import call_model
from ..tensor import QuantizedTensor, quantize_weight
from .quantize import linear_layers, make_policy

# Fastest first, from bench/NOTES.md (H200 GEMM and model sections): the fp8 formats reach the highest
# GEMM rate (fp8-row 1120-1310 TOPS, fp8-tensor 1140-1270) and the fastest Flux/Wan model times; int8-row
# next (910-1280 TOPS); the Hadamard-rotated int8-row adds the activation rotation (part 1's goal: within
# 10% of int8-row); the block formats are slowest of the 8-bit ones (int8-block 810-890, fp8-block
# 700-890); bf16 (the float weight) last.
SPEED_ORDER = ("fp8-row", "fp8-tensor", "int8-row", "int8-row+hadamard", "int8-block", "fp8-block", "bf16")
FLOAT = "bf16"
DEFAULT_CANDIDATES = ("fp8-row", "int8-row", "int8-row+hadamard", "int8-block", "bf16")


class AutoquantError(DitqError, ValueError):
    """A bad autoquant_ request (target, candidates, inputs), raised before the model is touched."""


@dataclass
class AutoLayer:
    """One eligible layer: ``format`` chosen; ``cos``: model-output cosine with only this layer in each
    candidate tried (None: the candidate does not apply to this shape, ``skipped`` says why)."""

    name: str
    shape: tuple[int, int]
    format: str
    cos: dict[str, float | None] = field(default_factory=dict)
    skipped: dict[str, str] = field(default_factory=dict)

    @property
    def error(self) -> float:
        return 1.0 - self.cos[self.format] if self.format != FLOAT else 0.0


@dataclass
class AutoquantReport:
    """What ``autoquant_`` chose. ``final_cos``: whole-model cosine (min over inputs) after applying the
    choices; ``met``: final_cos >= target_cos; ``rounds``: whole-model measurements; ``kept``: linear layers
    the preset keeps in float (name, reason)."""

    target_cos: float
    preset: str
    candidates: tuple[str, ...]
    layers: list[AutoLayer] = field(default_factory=list)
    kept: list[tuple[str, str]] = field(default_factory=list)
    final_cos: float = 1.0
    met: bool = True
    rounds: int = 0
    forwards: int = 0

    @property
    def choices(self) -> dict[str, str]:
        return {r.name: r.format for r in self.layers}

    def to_dict(self) -> dict:
        from dataclasses import asdict

        return asdict(self)

    def summary(self) -> str:
        cands = [c for c in self.candidates if c != FLOAT]
        w = max([len(r.name) for r in self.layers] + [5])
        head = f"{'layer':<{w}}  {'shape':<12} {'chosen':<18} " + " ".join(f"{c:>17}" for c in cands)
        lines = [
            f"ditq.autoquant_: target cos {self.target_cos}, final cos {self.final_cos:.6f} "
            f"({'met' if self.met else 'MISSED'}), preset {self.preset}, {self.rounds} whole-model round(s), "
            f"{self.forwards} forward(s)",
            "single-layer model-output cosine per candidate (-: does not apply):",
            head,
        ]
        for r in self.layers:
            cells = []
            for c in cands:
                v = r.cos.get(c)
                cells.append(f"{v:>17.6f}" if v is not None else f"{'-':>17}")
            lines.append(f"{r.name:<{w}}  {'x'.join(map(str, r.shape)):<12} {r.format:<18} " + " ".join(cells))
        counts = {}
        for r in self.layers:
            counts[r.format] = counts.get(r.format, 0) + 1
        lines.append("chosen: " + ", ".join(f"{k} x{v}" for k, v in sorted(counts.items(), key=lambda kv: SPEED_ORDER.index(kv[0]))))
        if self.kept:
            lines.append(f"kept by the preset ({len(self.kept)}): " + ", ".join(n for n, _ in self.kept[:12]))
        return "\n".join(lines)

    __str__ = summary


def _check_args(target_cos, candidates, inputs) -> tuple[float, tuple[str, ...]]:
    try:
        t = float(target_cos)
    except (TypeError, ValueError):
        raise AutoquantError(f"target_cos must be a number in (0, 1], got {target_cos!r}") from None
    if not (math.isfinite(t) and 0.0 < t <= 1.0):
        raise AutoquantError(f"target_cos must be in (0, 1] (e.g. 0.999), got {target_cos!r}")
    if isinstance(candidates, str):
        candidates = (candidates,)
    cands = tuple(candidates)
    if not cands:
        raise AutoquantError(f"candidates is empty; choose from {', '.join(SPEED_ORDER)}")
    bad = [c for c in cands if c not in SPEED_ORDER]
    if bad:
        raise FormatError(f"unknown autoquant candidate(s) {bad}; choose from {', '.join(SPEED_ORDER)}")
    if len(set(cands)) != len(cands):
        raise AutoquantError(f"candidates {list(cands)} repeat a format")
    if inputs is None or isinstance(inputs, (torch.Tensor, dict)) or len(inputs) == 0:
        raise AutoquantError(
            "inputs must be a non-empty list of model inputs (each a tuple of positional args, a dict of "
            "kwargs or one tensor), e.g. [(x_t0, t0), (x_t1, t1)]"
        )
    return t, tuple(sorted(cands, key=SPEED_ORDER.index))


def _output_tensor(out) -> torch.Tensor:
    if isinstance(out, torch.Tensor):
        return out
    if isinstance(out, (tuple, list)) and out and isinstance(out[0], torch.Tensor):
        return out[0]
    sample = getattr(out, "sample", None)
    if isinstance(sample, torch.Tensor):  # diffusers' Transformer2DModelOutput
        return sample
    raise AutoquantError(
        f"the model returned {type(out).__name__}; pass forward_fn=lambda model, inp: <output tensor>"
    )


def _cosine(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.detach().double().flatten(), b.detach().double().flatten()
    if torch.equal(a, b):
        return 1.0  # exact: the dot-product formula may round to 1 +- 1e-16
    den = a.norm() * b.norm()
    if den == 0:
        return 0.0
    # strictly below 1 when the outputs differ at all, so target_cos=1.0 admits only the float weights
    return min(float((a @ b) / den), 1.0 - 2.0**-52)


def _quantize(w: torch.Tensor, fmt: str, name: str) -> QuantizedTensor:
    if fmt == "int8-row+hadamard":
        return quantize_weight(w, "int8-row", rotation="hadamard", name=name)
    return quantize_weight(w, fmt, name=name)


@torch.no_grad()
def autoquant_(
    model: nn.Module,
    inputs,
    target_cos: float = 0.999,
    candidates=DEFAULT_CANDIDATES,
    preset: str = "auto",
    forward_fn=None,
    *,
    include=None,
    exclude=None,
    min_elements: int = 16384,
    verbose: bool = False,
) -> AutoquantReport:
    """Quantize ``model``'s eligible linear layers in place, each to the fastest of ``candidates`` such that
    the model output keeps cosine >= ``target_cos`` against the float model on every one of ``inputs``.

    inputs: a list of model inputs (tuples of positional args, dicts of kwargs, or single tensors); use
    several timesteps / prompts. forward_fn(model, inp) -> output tensor (default: ``model(*inp)`` /
    ``model(**inp)``, first element of a tuple, ``.sample``). candidates: from SPEED_ORDER (any order; tried
    fastest first); "int8-row+hadamard" is rotated int8-row; "bf16" keeps the float weight. preset /
    include / exclude / min_elements: which layers are eligible, as in ``quantize_``. Cost: one forward per
    input for each (layer, candidate) pair plus one per whole-model round. Returns an AutoquantReport
    (``str(report)`` is a table); ``report.met`` is False only when even the most precise candidates miss."""
    if not isinstance(model, nn.Module):
        raise AutoquantError(f"autoquant_ needs a torch.nn.Module, got {type(model).__name__}")
    target, cands = _check_args(target_cos, candidates, inputs)
    fwd = forward_fn or call_model
    policy = make_policy(model, "int8-row", preset, include, exclude, min_elements)
    report = AutoquantReport(target, policy.preset, cands)

    eligible: list[tuple[str, nn.Linear, nn.Parameter]] = []
    for name, m in linear_layers(model):
        w = m.weight
        if isinstance(w, QuantizedTensor):
            report.kept.append((name, f"already {w.format}"))
            continue
        d = policy.decide(f"{name}.weight", tuple(w.shape), w.dtype)
        if d.quantize:
            eligible.append((name, m, w))
        else:
            report.kept.append((name, d.reason))

    refs = [_output_tensor(fwd(model, inp)).detach().clone() for inp in inputs]
    report.forwards += len(inputs)

    def model_cos() -> float:
        report.forwards += len(inputs)
        return min(_cosine(_output_tensor(fwd(model, inp)), r) for inp, r in zip(inputs, refs))

    # 2. sensitivity, one layer at a time; the float Parameter object itself is put back (bit-exact)
    options: list[list[str]] = []  # per layer: the candidates that apply, fastest first
    for name, m, w in eligible:
        row = AutoLayer(name, tuple(w.shape), FLOAT)
        ok = []
        for fmt in cands:
            if fmt == FLOAT:
                row.cos[fmt] = 1.0
                ok.append(fmt)
                continue
            try:
                q = _quantize(w.detach(), fmt, f"{name}.weight")
            except (ShapeError, FormatError) as e:
                row.cos[fmt] = None
                row.skipped[fmt] = str(e)
                continue
            m.weight = nn.Parameter(q, requires_grad=False)
            try:
                row.cos[fmt] = model_cos()
            finally:
                m.weight = w
            ok.append(fmt)
        report.layers.append(row)
        options.append(ok)
        if verbose:
            print(f"  {name}: " + ", ".join(f"{k} {v:.6f}" for k, v in row.cos.items() if v is not None))

    # 3. one fixed sequence of states: start fastest, step the largest-error layer toward bf16
    level = [0] * len(eligible)

    def err(i: int) -> float:
        fmt = options[i][level[i]]
        return 0.0 if fmt == FLOAT else max(0.0, 1.0 - report.layers[i].cos[fmt])

    def step() -> bool:
        movable = [i for i in range(len(eligible)) if level[i] + 1 < len(options[i])]
        if not movable:
            return False
        i = max(movable, key=lambda j: (err(j), -j))  # ties: the earlier layer, deterministically
        level[i] += 1
        return True

    budget = 1.0 - target
    while sum(err(i) for i in range(len(eligible))) > budget and step():
        pass

    def apply():
        for i, (name, m, w) in enumerate(eligible):
            fmt = options[i][level[i]]
            report.layers[i].format = fmt
            m.weight = w if fmt == FLOAT else nn.Parameter(_quantize(w.detach(), fmt, f"{name}.weight"), requires_grad=False)

    while True:
        apply()
        report.rounds += 1
        report.final_cos = model_cos()
        if report.final_cos >= target or not step():
            break
    report.met = report.final_cos >= target
    if verbose:
        print(report.summary())
    return report
