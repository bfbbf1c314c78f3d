"""Per-layer precision under a whole-model quality budget: what ``ditq convert --target-cos`` (offline, from a
calibration file) and ``ditq.autoquant_`` (at run time, from the model's outputs) share. Neither may import
the other, so the pieces live here, above ``tensor`` and below both.

* Candidates: the names of ``SPEED_ORDER``; ``"int8-row+hadamard"`` is Hadamard-rotated int8-row and
  ``"bf16"`` keeps the float weight as it is. ``quantize_candidate`` makes one.
* Speed: ``SpeedTable``, each format's linear speed relative to bf16 as measured by ``ditq bench gemm``
  (``bench/results/gemm-h200.json``: eager, activation quantization included), taken from the benchmarked
  GEMM nearest to a layer's shape; rotated int8-row is int8-row's speed times the rotated / plain time
  ratio of ``ditq``'s rotation benchmark (``rotation-h200.json`` beside it). Without a table the order is
  ``SPEED_ORDER``.
* Error: ``cosine`` of two outputs; ``output_error`` of a quantized layer on given input rows (offline).
* Budget: ``Ladder``. Each layer has its candidates fastest first (bf16, when a candidate, last) and an
  error contribution per candidate; all start at their fastest; while the summed contribution exceeds the
  budget, a layer moves toward precision: with a time per candidate (``costs``, from the speed table), the
  move that removes the most error per added time, else the layer contributing most, one rung. Every budget
  walks the same sequence of states and stops at its first acceptable one, so a looser budget never picks a
  slower format for any layer than a tighter one.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from pathlib import Path

import torch

from . import formats as F
from .errors import DitqError, FormatError
from .tensor import QuantizedTensor, quantize_weight

# Without a speed table, fastest first (bench/NOTES.md, H200): fp8 GEMMs reach the highest rate, int8-row next;
# rotated int8-row adds the activation rotation; the block formats are the slowest 8-bit ones; bf16 last.
SPEED_ORDER = ("fp8-row", "fp8-tensor", "int8-row", "int8-row+hadamard", "int8-block", "fp8-block", "bf16")
FLOAT = "bf16"
ROTATED = "int8-row+hadamard"
DEFAULT_CANDIDATES = ("fp8-row", "int8-row", "int8-row+hadamard", "int8-block", "bf16")
DEFAULT_TOKENS = 4096
"""Rows (tokens) of the GEMM a layer is matched at: a 1024x1024 Flux image has 4096 image tokens."""
DEFAULT_TABLE = Path(__file__).resolve().parents[2] / "bench" / "results" / "gemm-h200.json"
"""Read when present (a source checkout); an installed package without it uses SPEED_ORDER."""


class PrecisionError(DitqError, ValueError):
    """A bad precision request (target, candidates, inputs, speed table), raised before anything is changed."""


def check_target(target_cos) -> float:
    try:
        t = float(target_cos)
    except (TypeError, ValueError):
        raise PrecisionError(f"target_cos must be a number in (0, 1], got {target_cos!r}") from None
    if not (math.isfinite(t) and 0.0 < t <= 1.0):
        raise PrecisionError(f"target cos must be in (0, 1] (e.g. 0.999), got {target_cos!r}")
    return t


def check_candidates(candidates) -> tuple[str, ...]:
    """The candidates as a tuple in SPEED_ORDER; FormatError for an unknown name, PrecisionError for none
    or a repeat."""
    if isinstance(candidates, str):
        candidates = tuple(c.strip() for c in candidates.split(",") if c.strip())
    cands = tuple(candidates)
    if not cands:
        raise PrecisionError(f"no candidate formats; choose from {', '.join(SPEED_ORDER)}")
    bad = [c for c in cands if c not in SPEED_ORDER]
    if bad:
        raise FormatError(f"unknown candidate format(s) {bad}; choose from {', '.join(SPEED_ORDER)}")
    if len(set(cands)) != len(cands):
        raise PrecisionError(f"candidates {list(cands)} repeat a format")
    return tuple(sorted(cands, key=SPEED_ORDER.index))


def quantize_candidate(w: torch.Tensor, cand: str, name: str | None = None) -> QuantizedTensor:
    """w [N, K] float -> QuantizedTensor of candidate ``cand`` (not "bf16"); rotated int8-row takes the
    default group (the largest of 256 / 64 / 16 dividing K). ShapeError / FormatError when it does not apply."""
    if cand == ROTATED:
        return quantize_weight(w, "int8-row", rotation="hadamard", name=name)
    return quantize_weight(w, cand, name=name)


def cosine(a: torch.Tensor, b: torch.Tensor) -> float:
    """Cosine of two tensors flattened, in float64: exactly 1.0 only when they are equal."""
    a, b = a.detach().double().flatten(), b.detach().double().flatten()
    if torch.equal(a, b):
        return 1.0  # exact: the dot-product formula may round to 1 +- 1e-16
    den = a.norm() * b.norm()
    if den == 0:
        return 0.0
    # strictly below 1 when the outputs differ at all, so a target of 1.0 admits only the float weights
    return min(float((a @ b) / den), 1.0 - 2.0**-52)


def output_error(w: torch.Tensor, qt: QuantizedTensor, x: torch.Tensor) -> tuple[float, float]:
    """(relative error ||Y_q - Y|| / ||Y||, cosine(Y_q, Y)) of a quantized linear (W8A8 as ditq runs it:
    per-token activation quantization, after the Hadamard rotation of a rotated weight) against the float
    one, on input rows x [S, K]; float64 reference math (``formats.linear_ref``), bias left out (it only
    adds to ||Y||, so the error is not understated)."""
    x64 = x.to(device=w.device, dtype=torch.float64)
    y = x64 @ w.double().t()
    xin = F.rotate(x64, qt.rotation) if qt.rotation else x64
    yq = F.linear_ref(xin, qt.qdata, qt.scale, qt.format, out_dtype=torch.float64, compute_dtype=torch.float64)
    return F.relative_error(yq, y), cosine(yq, y)


# -- speed ---------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Speed:
    """A layer's estimated speed in one format: ``ratio`` (bf16 time / format time of the matched GEMM; None
    without a table), ``gemm`` (the benchmarked M x N x K it was matched to) and ``basis`` (how it was got)."""

    ratio: float | None
    gemm: str = ""
    basis: str = "default order"


@dataclass
class SpeedTable:
    """Measured linear speed vs bf16 per format and benchmarked shape. ``rows``: dicts with M, N, K, label and
    ``ratio`` {format: bf16 time / format time}; ``rotation``: dicts with M, N, K and ``factor`` (plain
    int8-row time / rotated int8-row time, same run)."""

    source: str | None = None
    gpu: str | None = None
    rows: list[dict] = field(default_factory=list)
    rotation: list[dict] = field(default_factory=list)
    rotation_source: str | None = None
    tokens: int = DEFAULT_TOKENS
    """The rows (tokens) a layer's GEMM is matched at when a call gives none: the model's token count."""

    @classmethod
    def load(cls, path=None) -> "SpeedTable":
        """``path``: a ``ditq bench gemm --json`` file; None: DEFAULT_TABLE when present, else an empty table
        (SPEED_ORDER); "none": an empty table. A rotation benchmark beside it (``gemm`` -> ``rotation`` in the
        file name) is read too."""
        if path is not None and str(path).lower() == "none":
            return cls()
        p = Path(path) if path is not None else DEFAULT_TABLE
        if not p.is_file():
            if path is None:
                return cls()
            raise PrecisionError(f"speed table {p} does not exist; give a `ditq bench gemm --json` file or 'none'")
        data = _read_json(p)
        rows = []
        for r in data.get("shapes", []) if isinstance(data, dict) else []:
            ratio = {f: float(v) for f, v in (r.get("ratio") or {}).items() if f in F.FORMATS and v}
            if ratio and all(r.get(d) for d in "MNK"):
                rows.append({"M": int(r["M"]), "N": int(r["N"]), "K": int(r["K"]), "label": str(r.get("model", "")),
                             "ratio": ratio})
        if not rows:
            raise PrecisionError(f"speed table {p} has no 'shapes' with M, N, K and 'ratio' per format; give a "
                                 f"`ditq bench gemm --json` file or 'none'")
        table = cls(str(p), data.get("gpu"), rows)
        rp = p.with_name(p.name.replace("gemm", "rotation"))
        if rp != p and rp.is_file():
            for r in _read_json(rp).get("rows", []):
                us = r.get("us") or {}
                if us.get("int8-row") and us.get("rotated") and all(r.get(d) for d in "MNK"):
                    table.rotation.append({"M": int(r["M"]), "N": int(r["N"]), "K": int(r["K"]),
                                           "factor": float(us["int8-row"]) / float(us["rotated"])})
            table.rotation_source = str(rp) if table.rotation else None
        return table

    def speed(self, cand: str, n: int, k: int, tokens: int | None = None) -> Speed:
        """The estimated speed of an [N, K] layer in ``cand`` at ``tokens`` rows (default ``self.tokens``)."""
        tokens = tokens or self.tokens
        if cand == FLOAT:
            return Speed(1.0, basis="bf16")
        if not self.rows:
            return Speed(None)
        row = _nearest(self.rows, tokens, n, k)
        gemm = f"{row['M']}x{row['N']}x{row['K']}" + (f" ({row['label']})" if row["label"] else "")
        if cand == ROTATED:
            base = row["ratio"].get("int8-row")
            if base is not None and self.rotation:
                rot = _nearest(self.rotation, tokens, n, k)
                return Speed(base * rot["factor"], gemm, f"int8-row x rotation bench {rot['M']}x{rot['N']}x{rot['K']}")
            return Speed(base, gemm, "assumed = int8-row (no rotation benchmark)")
        if cand in row["ratio"]:
            return Speed(row["ratio"][cand], gemm, "GEMM bench")
        # a format the table lacks: assumed no faster than the one before it in SPEED_ORDER
        for prev in reversed(SPEED_ORDER[: SPEED_ORDER.index(cand)]):
            if prev in row["ratio"]:
                return Speed(row["ratio"][prev], gemm, f"assumed = {prev} (not in the table)")
        return Speed(None, gemm)

    def order(self, cands, n: int, k: int, tokens: int | None = None) -> list[str]:
        """``cands`` fastest first for an [N, K] layer; bf16 always last (every 8-bit format also halves the
        weight's memory); ties and a missing table fall back to SPEED_ORDER."""
        def key(c):
            r = self.speed(c, n, k, tokens).ratio
            return (c == FLOAT, -r if r is not None else 0.0, SPEED_ORDER.index(c))

        return sorted(cands, key=key)

    def describe(self, tokens: int | None = None) -> str:
        if not self.rows:
            return "no speed table: default order " + " > ".join(SPEED_ORDER)
        rot = f" and {Path(self.rotation_source).name}" if self.rotation_source else ""
        return (f"speed vs bf16 from the GEMM benchmark {Path(self.source).name}{rot} ({self.gpu or 'GPU ?'}), "
                f"eager linear incl. activation quantization, at the benchmarked shape nearest to "
                f"{tokens or self.tokens} tokens x N x K")


def _read_json(p: Path) -> dict:
    try:
        return json.loads(p.read_text())
    except (OSError, ValueError) as e:
        raise PrecisionError(f"cannot read speed table {p}: {e}") from None


def _nearest(rows: list[dict], m: int, n: int, k: int) -> dict:
    """The row whose (M, N, K) is nearest in log space (ties: the first)."""
    def dist(r):
        return abs(math.log(r["M"] / m)) + abs(math.log(r["N"] / n)) + abs(math.log(r["K"] / k))

    return min(rows, key=dist)


def layer_costs(table: "SpeedTable", order: list[str], n: int, k: int, tokens: int | None = None) -> dict[str, float] | None:
    """Each candidate of ``order`` (fastest first, bf16 last, as ``SpeedTable.order`` gives it): its estimated
    time for an [N, K] layer, N x K / speed vs bf16, never less than an earlier candidate's (bf16 stays last
    even where the table has an 8-bit format slower than bf16: the 8-bit formats also halve the weight's
    memory); None when a speed is unknown (no table)."""
    out, floor = {}, 0.0
    for c in order:
        r = table.speed(c, n, k, tokens).ratio
        if r is None or r <= 0:
            return None
        floor = out[c] = max(floor, n * k / r)
    return out


def mix_speed(layers) -> float | None:
    """The speed vs bf16 of a set of layers [(N, K, speed ratio)], each weighted by its GEMM work N x K
    (time adds up); None when any ratio is unknown."""
    work = sum(n * k for n, k, _ in layers)
    if not layers or any(s is None for _, _, s in layers):
        return None
    return work / sum(n * k / s for n, k, s in layers)


# -- budget --------------------------------------------------------------------------------------------------
class Ladder:
    """Per layer: ``options[i]`` its candidates fastest first (most precise last) and ``errors[i][c]`` the error
    contribution of candidate c (0 for bf16). ``level[i]`` is the rung layer i stands on.

    ``costs[i][c]`` (optional): the layer's time in candidate c (e.g. N x K / measured speed). Without costs a
    step moves the layer with the largest current error one rung up. With costs a step makes the move, over
    all layers and every more precise rung with a smaller error, that removes the most error per unit of
    added time (``(err_now - err_new) / (cost_new - cost_now)``): a layer whose 8-bit formats all err alike
    is not walked through each of them to bf16 while a cheaper fp8 -> int8-row move elsewhere removes as
    much. Either way the sequence of states is fixed by the errors (and costs), not by the budget, and levels
    only rise."""

    def __init__(self, options: list[list[str]], errors: list[dict[str, float]], costs: list[dict[str, float]] | None = None):
        if len(options) != len(errors) or any(not o for o in options):
            raise PrecisionError("Ladder: every layer needs at least one candidate and its errors")
        if costs is not None and (len(costs) != len(options) or any(set(o) - set(c) for o, c in zip(options, costs))):
            raise PrecisionError("Ladder: costs need one entry per layer and candidate")
        self.options, self.errors, self.costs = options, errors, costs
        self.level = [0] * len(options)

    def format(self, i: int) -> str:
        return self.options[i][self.level[i]]

    def error(self, i: int) -> float:
        return max(0.0, self.errors[i][self.format(i)])

    def total(self) -> float:
        return sum(self.error(i) for i in range(len(self.options)))

    def step(self) -> bool:
        """One move up (see the class); False when there is none left (without costs: every layer on its last
        rung; with costs: no more precise rung lowers any layer's error)."""
        if self.costs is not None:
            return self._step_by_cost()
        movable = [i for i in range(len(self.options)) if self.level[i] + 1 < len(self.options[i])]
        if not movable:
            return False
        i = max(movable, key=lambda j: (self.error(j), -j))
        self.level[i] += 1
        return True

    def _step_by_cost(self) -> bool:
        best = None  # (efficiency, -added cost, -layer, -rung)
        for i, opts in enumerate(self.options):
            now = self.error(i)
            c_now = self.costs[i][opts[self.level[i]]]
            for j in range(self.level[i] + 1, len(opts)):
                gain = now - max(0.0, self.errors[i][opts[j]])
                if gain <= 0.0:
                    continue
                added = self.costs[i][opts[j]] - c_now
                eff = gain / added if added > 0 else math.inf
                key = (eff, -added, -i, -j)
                if best is None or key > best[0]:
                    best = (key, i, j)
        if best is None:
            return False
        self.level[best[1]] = best[2]
        return True

    def fit(self, budget: float) -> bool:
        """Step until the summed error is within ``budget``; True when it is."""
        while self.total() > budget and self.step():
            pass
        return self.total() <= budget

    def choices(self) -> list[str]:
        return [self.format(i) for i in range(len(self.options))]
