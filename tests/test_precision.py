"""ditq.precision: the speed table read from the GEMM benchmark (shape matching, the rotation factor, the
fallback order), the Ladder's budget walk (first acceptable state, monotone in the budget), candidate
checks, and the offline output error against ditq's runtime linear."""

import json
import secrets

import pytest
import torch

import ditq
from ditq import formats as F
from ditq import kernels
from ditq import precision as P
from ditq.errors import FormatError

GEMM = P.DEFAULT_TABLE
ROT = GEMM.with_name(GEMM.name.replace("gemm", "rotation"))


@pytest.mark.skipif(not GEMM.is_file() or not ROT.is_file(), reason="bench/results not in this checkout")
def test_committed_tables_are_read_as_measured():
    table = P.SpeedTable.load()
    data, rot = json.loads(GEMM.read_text()), json.loads(ROT.read_text())
    assert table.source == str(GEMM) and table.gpu == data["gpu"] and len(table.rows) == len(data["shapes"])
    for r in data["shapes"]:  # a benchmarked shape is its own nearest row
        for f in F.FORMATS:
            assert table.speed(f, r["N"], r["K"], tokens=r["M"]).ratio == r["ratio"][f]
    for r in rot["rows"]:
        g = next(s for s in data["shapes"] if (s["M"], s["N"], s["K"]) == (r["M"], r["N"], r["K"]))
        s = table.speed(P.ROTATED, r["N"], r["K"], tokens=r["M"])
        assert s.ratio == pytest.approx(g["ratio"]["int8-row"] * r["us"]["int8-row"] / r["us"]["rotated"], rel=1e-12)
        assert "rotation bench" in s.basis
    assert table.speed("bf16", 3072, 3072).ratio == 1.0
    assert "GEMM benchmark" in table.describe() and data["gpu"] in table.describe()


def table(tmp_path, rows, name="gemm-x.json"):
    p = tmp_path / name
    p.write_text(json.dumps({"gpu": "G", "shapes": [
        {"model": m, "M": mm, "N": n, "K": k, "ratio": ratio} for m, mm, n, k, ratio in rows]}))
    return P.SpeedTable.load(p)


def test_nearest_shape_and_order(tmp_path):
    t = table(tmp_path, [("small", 4096, 1024, 1024, {"int8-row": 1.5, "fp8-row": 0.8, "int8-block": 0.7}),
                         ("big", 4096, 8192, 8192, {"int8-row": 1.2, "fp8-row": 1.6, "int8-block": 1.1})])
    assert t.speed("int8-row", 1536, 1024).gemm == "4096x1024x1024 (small)"
    assert t.speed("int8-row", 6000, 6000).gemm == "4096x8192x8192 (big)"
    cands = ["fp8-row", "int8-row", "int8-block", "bf16"]
    # formats slower than bf16 stay ahead of it: every 8-bit format also halves the weight's memory
    assert t.order(cands, 1024, 1024) == ["int8-row", "fp8-row", "int8-block", "bf16"]
    assert t.order(cands, 8192, 8192) == ["fp8-row", "int8-row", "int8-block", "bf16"]
    # a format the table lacks is assumed as fast as the one before it in SPEED_ORDER; ties go by SPEED_ORDER
    s = t.speed("fp8-block", 8192, 8192)
    assert s.ratio == 1.1 and "assumed = int8-block" in s.basis
    assert t.order(["fp8-block", "int8-block"], 8192, 8192) == ["int8-block", "fp8-block"]
    assert t.speed(P.ROTATED, 1024, 1024).ratio == 1.5  # no rotation file beside it
    assert t.rotation_source is None


def test_rotation_file_beside_the_table(tmp_path):
    (tmp_path / "rotation-x.json").write_text(json.dumps({"rows": [
        {"M": 4096, "N": 1024, "K": 1024, "us": {"int8-row": 90.0, "rotated": 100.0}}]}))
    t = table(tmp_path, [("a", 4096, 1024, 1024, {"int8-row": 1.5, "fp8-row": 0.8})])
    assert t.speed(P.ROTATED, 1024, 1024).ratio == pytest.approx(1.5 * 0.9)
    assert t.order(["int8-row", P.ROTATED, "fp8-row"], 1024, 1024) == ["int8-row", P.ROTATED, "fp8-row"]


def test_no_table(tmp_path, monkeypatch):
    t = P.SpeedTable.load("none")
    assert t.order(["bf16", "int8-block", "int8-row", "fp8-row"], 64, 64) == ["fp8-row", "int8-row", "int8-block", "bf16"]
    assert t.speed("int8-row", 64, 64).ratio is None and "default order" in t.describe()
    monkeypatch.setattr(P, "DEFAULT_TABLE", tmp_path / "absent.json")
    assert not P.SpeedTable.load().rows  # an installed package without bench/results: the default order
    with pytest.raises(P.PrecisionError, match="does not exist"):
        P.SpeedTable.load(tmp_path / "absent.json")  # asked for by name: an error
    (tmp_path / "bad.json").write_text("{not json")
    with pytest.raises(P.PrecisionError, match="cannot read"):
        P.SpeedTable.load(tmp_path / "bad.json")
    (tmp_path / "empty.json").write_text(json.dumps({"shapes": []}))
    with pytest.raises(P.PrecisionError, match="no 'shapes'"):
        P.SpeedTable.load(tmp_path / "empty.json")


def walk(options, errors):
    """Every state of the ladder from the start, with its total."""
    lad, states = P.Ladder(options, errors), []
    while True:
        states.append((lad.choices(), lad.total()))
        if not lad.step():
            return states


def test_ladder_first_acceptable_state_and_monotone():
    seed = secrets.randbits(31)
    g = torch.Generator().manual_seed(seed)
    n = 12
    options, errors = [], []
    for _ in range(n):
        opts = ["fp8-row", "int8-row", "int8-block", "bf16"][int(torch.randint(0, 2, (), generator=g)):]
        errs = {c: float(torch.rand((), generator=g)) * 1e-3 for c in opts}
        errs["bf16"] = 0.0
        options.append(opts)
        errors.append(errs)
    states = walk(options, errors)
    assert states[-1][1] == 0.0 and all(c == "bf16" for c in states[-1][0])
    prev = None
    for budget in sorted({0.0, 1.0, *(float(b) for b in torch.rand(20, generator=g) * states[0][1])}, reverse=True):
        lad = P.Ladder(options, errors)
        assert lad.fit(budget)
        first = next(c for c, tot in states if tot <= budget)
        assert lad.choices() == first, seed
        rungs = [o.index(c) for o, c in zip(options, lad.choices())]
        if prev is not None:  # a tighter budget never moves a layer to a faster rung
            assert all(a >= b for a, b in zip(rungs, prev)), seed
        prev = rungs
    # without bf16 a too tight budget cannot be met; fit says so and every layer is on its last rung
    lad = P.Ladder([o[:-1] for o in options], errors)
    assert not lad.fit(0.0) and all(lad.level[i] == len(o) - 2 for i, o in enumerate(options))


def test_candidates_and_target():
    assert P.check_candidates("bf16, int8-row,fp8-row") == ("fp8-row", "int8-row", "bf16")
    for bad, err in (("int4", FormatError), ("", P.PrecisionError), (("int8-row", "int8-row"), P.PrecisionError)):
        with pytest.raises(err):
            P.check_candidates(bad)
    assert P.check_target("0.999") == 0.999
    for bad in (0, 1.01, float("inf"), "x", None):
        with pytest.raises(P.PrecisionError):
            P.check_target(bad)


def test_mix_speed():
    assert P.mix_speed([(10, 10, 2.0), (10, 30, 1.0)]) == pytest.approx(400 / (100 / 2 + 300))
    assert P.mix_speed([(10, 10, 2.0), (10, 10, None)]) is None and P.mix_speed([]) is None


@pytest.mark.parametrize("cand", ["int8-row", P.ROTATED, "fp8-row", "int8-block"])
def test_output_error_is_the_runtime_linear_error(cand, monkeypatch):
    monkeypatch.setattr(kernels, "INTERPRET", False)  # the runtime's CPU reference path
    seed = secrets.randbits(31)
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(192 if "block" not in cand else 256, 256, generator=g) / 16
    x = torch.randn(40, 256, generator=g)
    x[:, [5, 77, 200]] *= 30.0  # outlier channels
    qt = P.quantize_candidate(w, cand, "w")
    rel, cos = P.output_error(w, qt, x)
    y = x.double() @ w.double().t()
    assert rel == pytest.approx(F.relative_error(ditq.linear(x, qt).double(), y), rel=1e-3), seed
    assert 0 < 1 - cos <= rel * rel, seed  # only the error orthogonal to the output lowers the cosine
    if cand == P.ROTATED:  # the rotation is what makes rotated int8-row better on outlier channels
        assert rel < 0.5 * P.output_error(w, P.quantize_candidate(w, "int8-row"), x)[0], seed


def walk_costs(options, errors, costs):
    lad, states = P.Ladder(options, errors, costs), []
    while True:
        states.append((list(lad.level), lad.total()))
        if not lad.step():
            return states


def test_ladder_with_costs_buys_error_cheapest_first():
    """With a time per candidate, the move removing the most error per added time goes first: here layer 0's
    fp8 -> int8-row (cheap, large gain) before layer 1's int8-row -> bf16 (costly), and a layer whose
    precise rungs err as much as its current one is not moved through them."""
    options = [["fp8-row", "int8-row", "bf16"], ["int8-row", "int8-block", "bf16"]]
    errors = [{"fp8-row": 4e-4, "int8-row": 1e-4, "bf16": 0.0}, {"int8-row": 5e-4, "int8-block": 5e-4, "bf16": 0.0}]
    costs = [{"fp8-row": 1.0, "int8-row": 1.05, "bf16": 1.6}, {"int8-row": 1.0, "int8-block": 1.2, "bf16": 1.5}]
    states = walk_costs(options, errors, costs)
    # 0: fp8->int8 removes 3e-4 for 0.05 (6e-3/unit); 1: ->bf16 removes 5e-4 for 0.5 (1e-3/unit); block: no gain
    assert [s[0] for s in states] == [[0, 0], [1, 0], [1, 2], [2, 2]]
    assert states[-1][1] == 0.0
    # the error-only ladder (no costs) moves layer 1 first and walks it through int8-block
    assert [s[0] for s in walk(options, errors)][:3] == [["fp8-row", "int8-row"], ["fp8-row", "int8-block"],
                                                        ["fp8-row", "bf16"]]


def test_ladder_with_costs_monotone_in_budget():
    seed = secrets.randbits(31)
    g = torch.Generator().manual_seed(seed)
    options, errors, costs = [], [], []
    for _ in range(15):
        opts = ["fp8-row", "int8-row", "int8-row+hadamard", "int8-block", "bf16"]
        errs = {c: float(torch.rand((), generator=g)) * 1e-3 for c in opts}
        errs["bf16"] = 0.0
        nk = float(torch.randint(1, 10, (), generator=g))
        sp = sorted((float(v) for v in 1 + torch.rand(4, generator=g)), reverse=True)
        costs.append({**{c: nk / s for c, s in zip(opts, sp)}, "bf16": nk})
        options.append(opts)
        errors.append(errs)
    states = walk_costs(options, errors, costs)
    assert states[-1][1] == 0.0  # bf16 is a candidate: it ends with no error left
    assert all(b <= a for (_, a), (_, b) in zip(states, states[1:])), seed  # every move lowers the total
    prev = None
    for budget in sorted({0.0, *(float(b) for b in torch.rand(20, generator=g) * states[0][1])}, reverse=True):
        lad = P.Ladder(options, errors, costs)
        assert lad.fit(budget)
        assert lad.level == next(lv for lv, tot in states if tot <= budget), seed
        if prev is not None:
            assert all(a >= b for a, b in zip(lad.level, prev)), seed
        prev = list(lad.level)
    with pytest.raises(P.PrecisionError, match="costs"):
        P.Ladder(options, errors, costs[:-1])
