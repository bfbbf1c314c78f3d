"""``autoquant_(model, inputs, target_cos)``: give each linear layer the fastest format that keeps the whole
model's output within a cosine budget of the float model, in place.

Method (issue 8, part 3):

1. Run the float model on ``inputs`` (several timesteps are several inputs) and keep its outputs.
2. Sensitivity: for each eligible layer (the preset's quantizable ``nn.Linear`` layers, as ``quantize_``
   picks them) and each candidate format, quantize ONLY that layer, measure the model-output cosine (the
   minimum over the inputs), then put the exact float Parameter back.
3. Assignment: 1 - cos of independent small perturbations add (the errors add in squared norm), so the
   single-layer errors are summed as an estimate (``precision.Ladder``). Every layer starts at its fastest
   candidate (per the GEMM benchmark's speed at the nearest benchmarked shape, ``precision.SpeedTable``); while the
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

from dataclasses import dataclass, field

import torch
import torch.nn as nn

from ..errors import FormatError, ShapeError
from ..modelcall import call_model
from ..modelcall import output_tensor as _output_tensor
from ..precision import (
    DEFAULT_CANDIDATES, DEFAULT_TOKENS, FLOAT, SPEED_ORDER, Ladder, PrecisionError, SpeedTable, check_candidates,
    check_target, mix_speed,
)
from ..precision import cosine as _cosine
from ..precision import quantize_candidate as _quantize
from ..tensor import QuantizedTensor
from .quantize import linear_layers, make_policy

AutoquantError = PrecisionError
"""A bad autoquant_ request (target, candidates, inputs), raised before the model is touched."""

__all__ = ["AutoLayer", "AutoquantError", "AutoquantReport", "DEFAULT_CANDIDATES", "SPEED_ORDER", "autoquant_"]


@dataclass
class AutoLayer:
    """One eligible layer: ``format`` chosen; ``cos``: model-output cosine with only this layer in each
    candidate tried (None: the candidate does not apply to this shape, ``skipped`` says why); ``order``: the
    candidates that apply, fastest first; ``speed``: each one's estimated linear speed vs bf16 from the GEMM
    benchmark at the benchmarked shape ``gemm`` nearest to this layer's (None: no speed table)."""

    name: str
    shape: tuple[int, int]
    format: str
    cos: dict[str, float | None] = field(default_factory=dict)
    skipped: dict[str, str] = field(default_factory=dict)
    order: list[str] = field(default_factory=list)
    speed: dict[str, float | None] = field(default_factory=dict)
    gemm: str = ""

    @property
    def error(self) -> float:
        return 1.0 - self.cos[self.format] if self.format != FLOAT else 0.0


@dataclass
class AutoquantReport:
    """What ``autoquant_`` chose. ``final_cos``: whole-model cosine (min over inputs) after applying the
    choices; ``met``: final_cos >= target_cos; ``rounds``: whole-model measurements; ``kept``: linear layers
    the preset keeps in float (name, reason); ``speed_source``: where the speed estimates come from;
    ``est_speed``: the chosen layers' estimated linear speed vs bf16, weighted by N x K (None: no table)."""

    target_cos: float
    preset: str
    candidates: tuple[str, ...]
    layers: list[AutoLayer] = field(default_factory=list)
    kept: list[tuple[str, str]] = field(default_factory=list)
    final_cos: float = 1.0
    met: bool = True
    rounds: int = 0
    forwards: int = 0
    speed_source: str = ""
    est_speed: float | None = None

    @property
    def choices(self) -> dict[str, str]:
        return {r.name: r.format for r in self.layers}

    def to_dict(self) -> dict:
        from dataclasses import asdict

        return asdict(self)

    def summary(self) -> str:
        cands = [c for c in self.candidates if c != FLOAT]
        w = max([len(r.name) for r in self.layers] + [5])
        head = (f"{'layer':<{w}}  {'shape':<12} {'chosen':<18} {'est.speed':>9}  {'GEMM matched':<24} "
                + " ".join(f"{c:>17}" for c in cands))
        lines = [
            f"ditq.autoquant_: target cos {self.target_cos}, final cos {self.final_cos:.6f} "
            f"({'met' if self.met else 'MISSED'}), preset {self.preset}, {self.rounds} whole-model round(s), "
            f"{self.forwards} forward(s)",
            f"est.speed: {self.speed_source}",
            "single-layer model-output cosine per candidate (-: does not apply):",
            head,
        ]
        for r in self.layers:
            cells = []
            for c in cands:
                v = r.cos.get(c)
                cells.append(f"{v:>17.6f}" if v is not None else f"{'-':>17}")
            sp = r.speed.get(r.format)
            lines.append(f"{r.name:<{w}}  {'x'.join(map(str, r.shape)):<12} {r.format:<18} "
                         f"{_x(sp):>9}  {r.gemm:<24} " + " ".join(cells))
        counts = {}
        for r in self.layers:
            counts[r.format] = counts.get(r.format, 0) + 1
        lines.append("chosen: " + ", ".join(f"{k} x{v}" for k, v in sorted(counts.items(), key=lambda kv: SPEED_ORDER.index(kv[0])))
                     + (f"; estimated linear speed vs bf16 {_x(self.est_speed)} (N x K weighted)"
                        if self.est_speed is not None else ""))
        if self.kept:
            lines.append(f"kept by the preset ({len(self.kept)}): " + ", ".join(n for n, _ in self.kept[:12]))
        return "\n".join(lines)

    __str__ = summary


def _x(v: float | None) -> str:
    return "-" if v is None else f"{v:.2f}x"


def _check_args(target_cos, candidates, inputs) -> tuple[float, tuple[str, ...]]:
    t, cands = check_target(target_cos), check_candidates(candidates)
    if inputs is None or isinstance(inputs, (torch.Tensor, dict)) or len(inputs) == 0:
        raise AutoquantError(
            "inputs must be a non-empty list of model inputs (each a tuple of positional args, a dict of "
            "kwargs or one tensor), e.g. [(x_t0, t0), (x_t1, t1)]"
        )
    return t, cands


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
    speed_table=None,
    tokens: int = DEFAULT_TOKENS,
    verbose: bool = False,
) -> AutoquantReport:
    """Quantize ``model``'s eligible linear layers in place, each to the fastest of ``candidates`` such that
    the model output keeps cosine >= ``target_cos`` against the float model on every one of ``inputs``.

    inputs: a list of model inputs (tuples of positional args, dicts of kwargs, or single tensors); use
    several timesteps / prompts. forward_fn(model, inp) -> output tensor (default: ``model(*inp)`` /
    ``model(**inp)``, first element of a tuple, ``.sample``). candidates: from SPEED_ORDER (any order; tried
    fastest first); "int8-row+hadamard" is rotated int8-row; "bf16" keeps the float weight. preset /
    include / exclude / min_elements: which layers are eligible, as in ``quantize_``. speed_table: a
    ``ditq bench gemm --json`` file, a ``SpeedTable`` or None (``precision.DEFAULT_TABLE`` when present, else
    ``SPEED_ORDER``): "fastest" per layer is the measured speed at the benchmarked GEMM nearest to
    ``tokens`` x N x K; the report shows each layer's estimate. Cost: one forward per
    input for each (layer, candidate) pair plus one per whole-model round. Returns an AutoquantReport
    (``str(report)`` is a table); ``report.met`` is False only when even the most precise candidates miss."""
    if not isinstance(model, nn.Module):
        raise AutoquantError(f"autoquant_ needs a torch.nn.Module, got {type(model).__name__}")
    target, cands = _check_args(target_cos, candidates, inputs)
    fwd = forward_fn or call_model
    policy = make_policy(model, "int8-row", preset, include, exclude, min_elements)
    table = speed_table if isinstance(speed_table, SpeedTable) else SpeedTable.load(speed_table)
    report = AutoquantReport(target, policy.preset, cands, speed_source=table.describe())

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
    measured = []
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
        if not ok:  # e.g. only block formats asked for and N or K not a multiple of 128
            report.kept.append((name, "no candidate applies: " + next(iter(row.skipped.values()))))
            continue
        n, k = row.shape
        row.order = table.order(ok, n, k, tokens)
        row.speed = {c: table.speed(c, n, k, tokens).ratio for c in row.order}
        row.gemm = table.speed(row.order[0], n, k, tokens).gemm if row.order[0] != FLOAT else ""
        report.layers.append(row)
        options.append(row.order)
        measured.append((name, m, w))
        if verbose:
            print(f"  {name}: " + ", ".join(f"{k} {v:.6f}" for k, v in row.cos.items() if v is not None))

    # 3. one fixed sequence of states: start fastest, step the largest-error layer toward bf16
    ladder = Ladder(options, [{c: 1.0 - v for c, v in r.cos.items() if v is not None} for r in report.layers])
    ladder.fit(1.0 - target)

    def apply():
        for i, (name, m, w) in enumerate(measured):
            fmt = ladder.format(i)
            report.layers[i].format = fmt
            m.weight = w if fmt == FLOAT else nn.Parameter(_quantize(w.detach(), fmt, f"{name}.weight"), requires_grad=False)

    while True:
        apply()
        report.rounds += 1
        report.final_cos = model_cos()
        if report.final_cos >= target or not ladder.step():
            break
    report.met = report.final_cos >= target
    report.est_speed = mix_speed([(*r.shape, r.speed.get(r.format)) for r in report.layers])
    if verbose:
        print(report.summary())
    return report
