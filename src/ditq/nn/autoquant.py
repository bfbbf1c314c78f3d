"""``autoquant_(model, inputs, target_cos)``: give each linear layer the fastest format that keeps the whole
model's output within a cosine budget of the float model, in place.

Method (issue 8, part 3):

1. Run the float model on ``inputs`` (several timesteps are several inputs) and keep its outputs.
2. The fastest state first: every eligible layer (the preset's quantizable ``nn.Linear`` layers, as
   ``quantize_`` picks them) in its fastest candidate (per the GEMM benchmark's speed at the nearest
   benchmarked shape, ``precision.SpeedTable``). If the whole model meets the target there, that is the
   answer: no assignment is faster, and no per-layer measurement is needed (``sensitivity="always"``
   measures it anyway, for the report).
3. Sensitivity: for each eligible layer and each candidate, quantize ONLY that layer, measure the
   model-output cosine (the minimum over the inputs), then put the exact float Parameter back.
4. Assignment: 1 - cos of independent small perturbations add (the errors add in squared norm), so the
   single-layer errors are summed as an estimate (``precision.Ladder``): every layer starts at its fastest
   candidate; then, again and again, the move (a layer to a more precise candidate) that removes the most
   estimated error per added estimated time (N x K / the speed table's ratio) is made. That is one fixed
   sequence of states, from all-fastest to where no move lowers an error (all bf16 when bf16 is a candidate).
   Ranking moves by error alone (the first version) walked sensitive layers through every 8-bit format to
   bf16: on full-size Wan at 0.9999 it kept 203 layers in bf16 and ran at 0.95x the speed of int8-row. The summed estimate only says where
   to look: real models do not add exactly (measured on full-size Flux, random weights: the single-layer
   errors summed to ~10x the whole-model error), so the state is chosen by measuring the whole model, a
   binary search along the sequence for the first state that meets the target (each probe one forward per
   input; ~log2 of the sequence's length probes). The search assumes the measured cosine does not fall as
   layers become more precise; the state it returns always met the target when measured.

   Every target searches the same sequence, so a looser target never picks a slower format for any layer
   than a tighter one (as long as that assumption holds).
5. Alternatives, measured the same way: the same search over the 8-bit candidates only (no layer to bf16)
   and each uniform state (one format everywhere it applies); the fastest meeting state by the speed table's
   estimate wins. On models whose single-layer measurements sit on a floor no format lowers (full-size
   random-weight Wan: bf16 rounding downstream decorrelates from the reference whatever the change), the
   ladder sees bf16 as the only real improvement; these keep autoquant at least as fast as the best single
   format that meets the target on the calibration inputs.

``bf16`` means the layer keeps its float weight as it is (whatever its dtype): with ``target_cos=1.0`` the
model is unchanged. ``sensitivity=<an earlier AutoquantReport>`` reuses that report's per-layer measurements
(same model, inputs and candidates) to re-target without measuring again.
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
    check_target, layer_costs, mix_speed,
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
    def error(self) -> float | None:
        """1 - the single-layer cosine of the chosen format (0 for bf16; None: not measured)."""
        if self.format == FLOAT:
            return 0.0
        c = self.cos.get(self.format)
        return None if c is None else 1.0 - c


@dataclass
class AutoquantReport:
    """What ``autoquant_`` chose. ``final_cos``: whole-model cosine (min over inputs) after applying the
    choices; ``met``: final_cos >= target_cos; ``rounds``: whole-model measurements; ``kept``: linear layers
    the preset keeps in float (name, reason); ``speed_source``: where the speed estimates come from;
    ``est_speed``: the chosen layers' estimated linear speed vs bf16, weighted by N x K (None: no table);
    ``measured``: whether the per-layer sensitivity was measured (False: the fastest state met the target);
    ``probes``: the whole-model measurements as (what: "fastest", "ladder", "8-bit", "uniform <format>" or
    "most precise",
    state index in that sequence, cosine), in order; ``states``: the length of the ladder's sequence of states
    (0 when not built)."""

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
    measured: bool = False
    probes: list[tuple[str, int, float]] = field(default_factory=list)
    states: int = 0

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
            ("single-layer model-output cosine per candidate (-: does not apply):" if self.measured else
             "the fastest state met the target: single-layer cosines not measured (sensitivity=\"always\" measures them)"),
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
    sensitivity="auto",
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
    ``tokens`` x N x K; the report shows each layer's estimate. sensitivity: "auto" (measure the per-layer
    sensitivity only when the all-fastest state misses the target), "always", or an earlier
    ``AutoquantReport`` of the same model, inputs and candidates whose measurements are reused. Cost: one
    forward per input for the reference, for each whole-model probe (1 when the fastest state meets the
    target, else ~log2 of the number of states) and, when measured, for each (layer, candidate) pair.
    Returns an AutoquantReport (``str(report)`` is a table); ``report.met`` is False only when even the most
    precise candidates miss."""
    if not isinstance(model, nn.Module):
        raise AutoquantError(f"autoquant_ needs a torch.nn.Module, got {type(model).__name__}")
    target, cands = _check_args(target_cos, candidates, inputs)
    reuse = _check_sensitivity(sensitivity, cands)
    fwd = forward_fn or call_model
    policy = make_policy(model, "int8-row", preset, include, exclude, min_elements)
    table = speed_table if isinstance(speed_table, SpeedTable) else SpeedTable.load(speed_table)
    report = AutoquantReport(target, policy.preset, cands, speed_source=table.describe(tokens))

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
    if reuse is not None:
        missing = [n for n, _, _ in eligible if n not in reuse]
        if missing:
            raise AutoquantError(f"sensitivity: the earlier report has no measurement of layer {missing[0]!r} "
                                 f"({len(missing)} missing); pass the report of the same model and candidates")

    refs = [_output_tensor(fwd(model, inp)).detach().clone() for inp in inputs]
    report.forwards += len(inputs)

    def model_cos() -> float:
        report.forwards += len(inputs)
        return min(_cosine(_output_tensor(fwd(model, inp)), r) for inp, r in zip(inputs, refs))

    # which candidates apply to each layer (a quantization that raises does not), fastest first
    measured: list[tuple[str, nn.Linear, nn.Parameter]] = []
    for name, m, w in eligible:
        row = AutoLayer(name, tuple(w.shape), FLOAT)
        ok = []
        for fmt in cands:
            if fmt != FLOAT:
                try:
                    _quantize(w.detach(), fmt, f"{name}.weight")
                except (ShapeError, FormatError) as e:
                    row.cos[fmt] = None
                    row.skipped[fmt] = str(e)
                    continue
            ok.append(fmt)
        if not ok:  # e.g. only block formats asked for and N or K not a multiple of 128
            report.kept.append((name, "no candidate applies: " + next(iter(row.skipped.values()))))
            continue
        n, k = row.shape
        row.order = table.order(ok, n, k, tokens)
        row.speed = {c: table.speed(c, n, k, tokens).ratio for c in row.order}
        row.gemm = table.speed(row.order[0], n, k, tokens).gemm if row.order[0] != FLOAT else ""
        report.layers.append(row)
        measured.append((name, m, w))

    current = [FLOAT] * len(measured)  # what each layer holds now

    def apply(formats) -> None:
        for i, (name, m, w) in enumerate(measured):
            fmt = formats[i]
            if fmt != current[i]:
                m.weight = w if fmt == FLOAT else nn.Parameter(_quantize(w.detach(), fmt, f"{name}.weight"), requires_grad=False)
                current[i] = fmt

    def probe(label: str, k: int, formats) -> float:
        apply(formats)
        report.rounds += 1
        c = model_cos()
        report.probes.append((label, k, c))
        if verbose:
            print(f"  autoquant probe: {label} state {k}, cos {c:.6f}")
        return c

    try:
        final = _assign(report, measured, target, sensitivity, reuse, apply, probe, model_cos, table, tokens, verbose)
    except BaseException:  # a failing forward (OOM, Ctrl-C): the model goes back to its float weights
        apply([FLOAT] * len(measured))
        raise
    apply(final[0])
    for row, fmt in zip(report.layers, final[0]):
        row.format = fmt
    report.final_cos = final[1]
    report.met = report.final_cos >= target
    report.est_speed = mix_speed([(*r.shape, r.speed.get(r.format)) for r in report.layers])
    if verbose:
        print(report.summary())
    return report


def _assign(report, measured, target, sensitivity, reuse, apply, probe, model_cos, table, tokens, verbose):
    """Steps 2-5 of the module docstring: (formats, measured cosine) of the chosen state."""
    # 2. the fastest state: all layers at their fastest candidate
    fastest = [r.order[0] for r in report.layers]
    cos0 = probe("fastest", 0, fastest)
    final = (fastest, cos0)
    if cos0 < target or sensitivity == "always" or reuse is not None:
        # 3. sensitivity, one layer at a time; the float Parameter object itself is put back (bit-exact)
        apply([FLOAT] * len(measured))
        for row, (name, m, w) in zip(report.layers, measured):
            for fmt in row.order:
                if fmt == FLOAT:
                    row.cos[fmt] = 1.0
                elif reuse is not None:
                    row.cos[fmt] = reuse[name].get(fmt)
                else:
                    m.weight = nn.Parameter(_quantize(w.detach(), fmt, f"{name}.weight"), requires_grad=False)
                    try:
                        row.cos[fmt] = model_cos()
                    finally:
                        m.weight = w
            if verbose:
                print(f"  {name}: " + ", ".join(f"{k} {v:.6f}" for k, v in row.cos.items() if v is not None))
        report.measured = True
        if cos0 < target:
            final = _choose(report, target, probe, table, tokens, known={tuple(fastest): cos0})
    return final


def _check_sensitivity(sensitivity, cands) -> dict[str, dict[str, float | None]] | None:
    """None for "auto" / "always"; for an earlier report, its measured cosines per layer name."""
    if isinstance(sensitivity, str) and sensitivity in ("auto", "always"):
        return None
    if not isinstance(sensitivity, AutoquantReport):
        raise AutoquantError(f"sensitivity must be 'auto', 'always' or an earlier AutoquantReport, got {sensitivity!r}")
    if not sensitivity.measured:
        raise AutoquantError("sensitivity: the earlier report measured no per-layer sensitivity (its fastest state "
                             "met its target); run it with sensitivity='always'")
    if set(cands) - set(sensitivity.candidates):
        raise AutoquantError(f"sensitivity: the earlier report measured {list(sensitivity.candidates)}, not all of "
                             f"{list(cands)}")
    return {r.name: dict(r.cos) for r in sensitivity.layers}


def _choose(report: AutoquantReport, target: float, probe, table: SpeedTable | None = None,
            tokens: int = DEFAULT_TOKENS, known: dict | None = None) -> tuple[list[str], float]:
    """The fastest (by the speed table's estimate) of the measured states that meet ``target``: the first
    meeting state of the ladder over all candidates (``_search``), the same over the 8-bit candidates only (no
    layer to bf16), and each uniform state (one 8-bit candidate on every layer it applies to, the most precise
    candidate elsewhere; probed only when its estimate beats the best found). Per-layer measurements on some
    models are dominated by a floor that no format lowers (full-size random-weight Wan: every 8-bit format of a
    layer within ~10% of the others, falling with depth: bf16 rounding downstream decorrelates from the
    reference whatever the change), which makes bf16 look like the only real improvement; the 8-bit ladder
    and the uniform states keep autoquant at least as fast as the best single format that meets the target on
    the calibration inputs. ``probe(label, k, formats) -> cosine``; ``known``: {tuple(formats): cosine} already
    measured. Returns (formats, measured cosine); none meeting: the most precise state."""
    layers = report.layers
    costs = [layer_costs(table, r.order, *r.shape, tokens) for r in layers] if table is not None else [None]
    if any(c is None for c in costs):  # no table: the candidates' ranks stand in for their times
        costs = [{c: r.shape[0] * r.shape[1] * (1.0 + j) for j, c in enumerate(r.order)} for r in layers]
    errors = [{c: 1.0 - v for c, v in r.cos.items() if v is not None} for r in layers]

    def total(formats) -> float:
        return sum(c[f] for c, f in zip(costs, formats))

    measured = dict(known or {})  # tuple(formats) -> cosine

    def run(label: str, k: int, formats) -> float:
        measured[tuple(formats)] = c = probe(label, k, formats)
        return c

    full = [r.order for r in layers]
    fmts, cos, report.states = _search(full, errors, costs, target, lambda k, f: run("ladder", k, f))
    last = (fmts, cos)
    found = [fmts] if cos >= target else []  # the states that may be chosen: each was measured meeting
    eight = [[c for c in o if c != FLOAT] or o for o in full]
    if eight != full:
        fmts, cos, _ = _search(eight, errors, costs, target, lambda k, f: run("8-bit", k, f))
        found += [fmts] if cos >= target else []
    for cand in [c for c in report.candidates if c != FLOAT]:
        uni = [cand if cand in o else o[-1] for o in full]
        if uni in found or (found and total(uni) >= min(map(total, found))):
            continue
        if run(f"uniform {cand}", 0, uni) >= target:
            found.append(uni)
    top = [o[-1] for o in full]  # every layer in its most precise candidate (bf16, when a candidate)
    if not found and tuple(top) not in measured and run("most precise", 0, top) >= target:
        found.append(top)  # the ladder stops where no single-layer error can fall further
    if not found:
        return last
    best = min(found, key=total)
    return best, measured[tuple(best)]


def _search(options, errors, costs, target: float, probe) -> tuple[list[str], float, int]:
    """The first state of the ladder's sequence (``precision.Ladder`` over ``options`` / ``errors`` /
    ``costs``) whose measured whole-model cosine meets ``target``, by binary search (state 0, all fastest, is
    known to miss). ``probe(k, formats) -> cosine``. Returns (formats, measured cosine, number of states);
    when even the last, most precise state misses, that state."""
    ladder = Ladder(options, errors, costs)
    budget = 1.0 - target
    states, est = [list(ladder.level)], None
    while True:
        if est is None and ladder.total() <= budget:
            est = len(states) - 1
        if not ladder.step():
            break
        states.append(list(ladder.level))
    last = len(states) - 1
    fmts = lambda k: [o[j] for o, j in zip(options, states[k])]  # noqa: E731
    seen: dict[int, float] = {}

    def meets(k: int) -> bool:
        if k not in seen:
            seen[k] = probe(k, fmts(k))
        return seen[k] >= target

    if last == 0:
        return fmts(0), probe(0, fmts(0)), 1
    lo, hi = 0, None  # lo: a state that misses; hi: the earliest state known to meet
    k = max(1, min(est if est is not None else last, last))
    if meets(k):
        hi = k
    else:  # the estimate was optimistic: gallop toward the most precise state
        lo, step = k, max(1, k)
        while hi is None and lo < last:
            k = min(lo + step, last)
            if meets(k):
                hi = k
            else:
                lo, step = k, 2 * step
        if hi is None:
            return fmts(last), seen[last], len(states)
    while hi - lo > 1:
        mid = (lo + hi) // 2
        if meets(mid):
            hi = mid
        else:
            lo = mid
    return fmts(hi), seen[hi], len(states)
