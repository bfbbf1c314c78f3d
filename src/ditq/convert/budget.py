"""``ditq convert --target-cos T --calibration FILE``: each layer's format chosen offline, from its measured
sensitivity, under a whole-model quality budget.

Measured: the calibration file (``ditq calibrate``) holds, for every linear layer, input rows captured from
real forwards and kept out of its statistics. For each quantizable layer and candidate format the layer
runs as ditq runs it (W8A8: dynamic per-token activation quantization, after the Hadamard rotation for
rotated int8-row) on those rows, and its output's relative error ``e = ||Y_q - Y|| / ||Y||`` against the
float layer is measured (``precision.output_error``).

"Whole model" offline: without the model, the layer errors are combined into an estimate of the model
output's cosine. A relative error e_l of layer l's output moves the model output by g_l * e_l, where the
gain g_l is measured by ``ditq calibrate --gains`` (noise of known size added to that layer's output alone,
on real inputs) and taken as 1 when the file has none: a conservative choice wherever a layer feeds a
residual stream larger than its own output, which is most layers of a DiT. Independent small errors add in
quadrature, ``e_model^2 ~ sum_l (g_l e_l)^2``, and an error orthogonal to the output costs
``1 - cos ~ e^2 / 2``. The budget is therefore the per-layer criterion

    1/2 * sum_l (g_l * e_l)^2  <=  1 - T

over the quantized layers (an estimate of the model: ``ditq.autoquant_`` measures the model output itself
where the model can run). Each layer's candidates are ordered by their speed on the GEMM benchmark at the
nearest benchmarked shape (``precision.SpeedTable``) and ``precision.Ladder`` picks, from all layers at
their fastest, moving the layer whose move removes the most error per added time first, the first state within
the budget.

Streaming: the converter reads the weights twice, once here to measure (nothing is written yet, so a
mismatched calibration file or a NaN weight stops it before any output) and once to convert; memory stays
near a few tensors.
"""

from __future__ import annotations

import time

import torch

from ..checkpoint import layout as L
from ..checkpoint.io import prefetch
from ..checkpoint.policy import Decision, Policy
from ..errors import CheckpointError, FormatError, NonFiniteError, ShapeError
from ..rounding import CHECKPOINT_PREFIXES
from ..precision import FLOAT, ROTATED, Ladder, SpeedTable, layer_costs, mix_speed, output_error, quantize_candidate

CRITERION = ("1/2 * sum over layers of (gain x output relative error)^2 <= 1 - target_cos; gain: model-output "
             "change per relative error of the layer's output (`ditq calibrate --gains`), 1 where not measured")


def layer_gain(cal, key: str) -> float | None:
    """The measured gain of the layer of weight ``key`` (checkpoint prefixes ignored, as for its statistics)."""
    gains = cal.meta.get("gains") or {}
    name = key[: -len(".weight")] if key.endswith(".weight") else key
    for prefix in ("", *CHECKPOINT_PREFIXES):
        if name.startswith(prefix) and name[len(prefix):] in gains:
            return float(gains[name[len(prefix):]])
    return None


def plan_budget(ckpt, plan: list, pol: Policy, cal, cal_name: str, target: float, cands: tuple[str, ...],
                table: SpeedTable, dev: torch.device, keep_nonfinite: bool, dtype: torch.dtype):
    """(plan with the chosen format of every quantizable layer, the ``precision`` report, warnings).

    ``plan``: [(layout Entry, Decision)] as the converter built it; ``cal``: CalibrationStats. Raises
    CheckpointError when the file does not fit the checkpoint (no quantizable layer covered, an input width
    that differs, no held-out rows) and NonFiniteError for a NaN/Inf weight (unless ``keep_nonfinite``)."""
    t0 = time.perf_counter()
    quant = [(e, d) for e, d in plan if d.action == "quantize"]
    covered, uncovered, wrong_k, no_rows = [], [], [], []
    for e, d in quant:
        st = cal.get(e.key)
        if st is None:
            uncovered.append(e.key)
        elif st.k != e.shape[1]:
            wrong_k.append(f"{e.key} is [{e.shape[0]}, {e.shape[1]}] but its statistics have K={st.k}")
        elif st.sample is None or st.sample.shape[0] == 0:
            no_rows.append(e.key)
        else:
            covered.append((e, d, st))
    if wrong_k:
        raise CheckpointError(f"calibration file {cal_name} does not fit {ckpt.path}: {wrong_k[0]}"
                              + (f" (and {len(wrong_k) - 1} more)" if len(wrong_k) > 1 else "")
                              + "; run `ditq calibrate` on this model")
    if quant and not covered and not no_rows:
        names = cal.names()
        raise CheckpointError(
            f"calibration file {cal_name} covers none of the {len(quant)} quantizable layers of {ckpt.path} (e.g. "
            f"{quant[0][0].key!r}; the file has e.g. {names[0] if names else 'nothing'!r}); it belongs to another "
            f"model or names layers differently: run `ditq calibrate` on this model"
        )
    if no_rows:
        raise CheckpointError(f"calibration file {cal_name} has no held-out input rows for {no_rows[0]!r}"
                              + (f" and {len(no_rows) - 1} more layer(s)" if len(no_rows) > 1 else "")
                              + "; --target-cos measures on them: re-run `ditq calibrate` with --sample-rows 256")

    layers, options, errors = [], [], []
    kept_nonfinite, no_fit = set(), {}
    items = ((e, d, st, L.load(ckpt, e, dtype)) for e, d, st in covered)
    for e, d, st, w in prefetch(items, 2):
        w = w.to(dev) if dev.type != "cpu" else w
        if not bool(torch.isfinite(w).all()):
            if not keep_nonfinite:
                raise NonFiniteError(
                    f"{ckpt.info(e.sources[0]).file}: tensor {e.key!r} ({list(e.shape)}) holds NaN/Inf value(s); "
                    f"nothing was written. Fix the checkpoint, keep the layer unquantized with --keep-nonfinite, or "
                    f"--exclude it")
            kept_nonfinite.add(e.key)  # the converter keeps it and says why
            continue
        row = _measure(e.key, w, st.sample, cands)
        if not row["errors"]:  # e.g. only block formats asked for and N or K not a multiple of 128
            no_fit[e.key] = next(iter(row["skipped"].values()))
            continue
        n, k = e.shape
        row["order"] = table.order(list(row["errors"]), n, k)
        row["gain"] = layer_gain(cal, e.key)
        gain = 1.0 if row["gain"] is None else row["gain"]
        layers.append(row)
        options.append(row["order"])
        errors.append({c: 0.5 * (gain * r) ** 2 for c, r in row["errors"].items()})
        del w

    budget = 1.0 - target
    costs = [layer_costs(table, row["order"], *row["shape"]) for row in layers]
    ladder = Ladder(options, errors, None if any(c is None for c in costs) else costs) if layers else None
    met = ladder.fit(budget) if ladder else True
    chosen = {}
    for i, row in enumerate(layers):
        c = ladder.format(i)
        n, k = row["shape"]
        sp = table.speed(c, n, k)
        row.update(format=c, rel_error=row["errors"][c], cos=row["cos"][c], contribution=ladder.error(i),
                   speed=sp.ratio, gemm=sp.gemm, speed_basis=sp.basis,
                   speeds={o: table.speed(o, n, k).ratio for o in row["order"]})
        chosen[row["key"]] = (c, row["groups"].get(c))

    out, warnings = [], []
    for e, d in plan:
        if d.action == "quantize" and e.key in chosen:
            c, g = chosen[e.key]
            if c == FLOAT:
                d = pol.keep(e.key, e.dtype, "--target-cos: needs float")
            elif c == ROTATED:
                d = Decision("quantize", "--target-cos", "int8-row", options={"rotation": "hadamard", "rotation_group": g})
            else:
                d = Decision("quantize", "--target-cos", c)
        elif d.action == "quantize" and e.key in uncovered:
            d = pol.keep(e.key, e.dtype, "--target-cos: not in the calibration file")
        elif d.action == "quantize" and e.key in no_fit:
            d = pol.keep(e.key, e.dtype, "--target-cos: no candidate applies")
        out.append((e, d))
    if uncovered:
        warnings.append(f"{len(uncovered)} quantizable layer(s) are not in the calibration file and stay in float "
                        f"(e.g. {uncovered[0]!r}); calibrate them to let --target-cos choose a format")
    total = ladder.total() if ladder else 0.0
    if not met:
        warnings.append(f"--target-cos {target}: even the most precise candidates estimate 1 - cos {total:.3g} > "
                        f"{budget:.3g}; add bf16 to --candidates")
    report = {
        "target_cos": target, "budget": budget, "criterion": CRITERION, "estimate": total,
        "estimated_cos": 1.0 - total, "met": met, "candidates": list(cands), "calibration": cal_name,
        "speed_source": table.describe(), "speed_table": table.source,
        "est_speed": mix_speed([(*r["shape"], r["speed"]) for r in layers]),
        "layers": layers, "uncovered": uncovered, "kept_nonfinite": sorted(kept_nonfinite), "no_candidate": no_fit,
        "uniform": _uniform(layers, cands, budget, table), "seconds": round(time.perf_counter() - t0, 3),
    }
    return out, report, warnings


def _measure(key: str, w: torch.Tensor, x: torch.Tensor, cands) -> dict:
    """Output relative error and cosine of every candidate that applies to w [N, K] on rows x [S, K]."""
    row = {"key": key, "shape": list(w.shape), "rows": int(x.shape[0]), "errors": {}, "cos": {}, "skipped": {},
           "groups": {}}
    for c in cands:
        if c == FLOAT:
            row["errors"][c], row["cos"][c] = 0.0, 1.0
            continue
        try:
            qt = quantize_candidate(w, c, key)
        except (ShapeError, FormatError) as err:
            row["skipped"][c] = str(err)
            continue
        row["errors"][c], row["cos"][c] = output_error(w, qt, x)
        if qt.rotation:
            row["groups"][c] = qt.rotation
    return row


def _uniform(layers: list[dict], cands, budget: float, table: SpeedTable) -> list[dict]:
    """For comparison, each 8-bit candidate on every layer it applies to (float elsewhere, as ``--format``
    does): its estimate, whether it meets the budget, and its estimated speed."""
    out = []
    for c in cands:
        if c == FLOAT:
            continue
        est = sum(0.5 * (_gain(r) * r["errors"][c]) ** 2 for r in layers if c in r["errors"])
        speed = mix_speed([(*r["shape"], table.speed(c if c in r["errors"] else FLOAT, *r["shape"]).ratio)
                           for r in layers])
        out.append({"format": c, "estimate": est, "met": est <= budget, "est_speed": speed})
    return out


def _gain(row: dict) -> float:
    return 1.0 if row["gain"] is None else row["gain"]


def summary_lines(p: dict) -> list[str]:
    """The per-layer table printed after a ``--target-cos`` conversion."""
    def x(v):
        return "-" if v is None else f"{v:.2f}x"

    cands = [c for c in p["candidates"] if c != FLOAT]
    rows = p["layers"]
    n_rows = sorted({r["rows"] for r in rows})
    lines = ["", f"  --target-cos {p['target_cos']}: {len(rows)} layers measured on "
                 f"{'-'.join(map(str, n_rows[::max(1, len(n_rows) - 1)])) if n_rows else 0} calibration rows each "
                 f"({p['calibration']})",
             f"  estimate 1 - cos = 1/2 sum (gain e)^2 = {p['estimate']:.3g} {'<=' if p['met'] else '>'} {p['budget']:.3g}: "
             f"{'met' if p['met'] else 'MISSED'}; estimated linear speed vs bf16 {x(p['est_speed'])} (N x K weighted)",
             f"  est.speed: {p['speed_source']}"]
    if not rows:
        return lines
    w = min(60, max(len(r["key"]) for r in rows))
    lines.append(f"    {'layer':<{w}} {'shape':<11} {'chosen':<17} {'rel.err':>8} {'gain':>6} {'est.speed':>9}  "
                 f"{'GEMM matched':<24}"
                 + "".join(f" {c:>17}" for c in cands))
    for r in rows:
        cells = "".join(f" {r['errors'][c]:>17.3%}" if c in r["errors"] else f" {'-':>17}" for c in cands)
        key = r["key"] if len(r["key"]) <= w else "..." + r["key"][3 - w:]
        g = "-" if r["gain"] is None else f"{r['gain']:.3g}"
        lines.append(f"    {key:<{w}} {'x'.join(map(str, r['shape'])):<11} {r['format']:<17} "
                     f"{r['rel_error']:>8.3%} {g:>6} {x(r['speed']):>9}  {r['gemm']:<24}" + cells)
    measured = sum(r["gain"] is not None for r in rows)
    lines.append("    rel.err e: output relative error on the layer's calibration rows (W8A8 as run); gain: measured by "
                 "`ditq calibrate --gains`" + (f" ({len(rows) - measured} layers without: 1 assumed)" if measured < len(rows)
                                               else ""))
    uni = [f"{u['format']} {u['estimate']:.3g} ({'meets' if u['met'] else 'misses'}, {x(u['est_speed'])})"
           for u in p["uniform"]]
    if uni:
        lines.append("  one format for all, same estimate: " + "; ".join(uni))
    return lines
