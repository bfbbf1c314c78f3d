"""`ditq bench autoquant --tiny` end to end on the CPU, through the CLI: every variant measured with finite
numbers, autoquant's mixed model meets its target on the benchmark's inputs, the best single format marked.

At 0.99999 the tiny random Flux's fp8-row output misses (cos ~0.999986) while the int8 formats meet it
(~0.999994), so autoquant has to move layers off the fastest format and the "meets" bar can fail."""

import json
import math

import pytest
import torch

from ditq.cli import main as cli

FORMATS = ("fp8-row", "int8-row", "int8-row+hadamard", "int8-block")


pytestmark = pytest.mark.usefixtures("one_thread")


def run(tmp_path, *extra):
    out = tmp_path / "aq.json"
    assert cli(["bench", "autoquant", "--tiny", "--device", "cpu", "--arch", "flux", "--reps", "1", "--warmup", "0",
                "--json", str(out), *extra]) == 0
    return json.loads(out.read_text())


def check(res, target, formats):
    rows = {r["variant"]: r for r in res["results"]}
    assert list(rows) == ["bf16", *formats, "autoquant"]
    n_linear = sum(rows["bf16"]["layers"].values())
    for name, r in rows.items():
        assert "error" not in r and "skipped" not in r, r
        assert r["finite"], name
        nums = [r["median_ms"], r["weight_gb"], r["cos_min"], r["rel_err_max"], r["speedup_vs_bf16"], *r["times_ms"]]
        assert all(math.isfinite(v) for v in nums), (name, nums)
        assert len(r["cos_per_input"]) == len(res["timesteps"])
        assert sum(r["layers"].values()) == n_linear, name  # every linear layer counted once
        assert r["meets_target"] == (r["cos_min"] >= target)
    for f in formats:  # each single format quantized its layers, from the bf16 model (restored in between)
        assert rows[f]["layers"].get(f, 0) > 0 and rows[f]["cos_min"] < 1.0
    auto = rows["autoquant"]
    assert res["target_cos"] == target
    assert auto["autoquant_met"] and auto["autoquant_final_cos"] >= target
    assert auto["cos_min"] >= target and auto["meets_target"]  # re-measured by the bench on its own inputs
    meeting = [f for f in formats if rows[f]["meets_target"]]
    assert res["best_single"] == (min(meeting, key=lambda f: rows[f]["median_ms"]) if meeting else None)
    if meeting:
        assert res["autoquant_vs_best_single"] == pytest.approx(rows[res["best_single"]]["median_ms"] / auto["median_ms"])
    return rows


@pytest.fixture
def reference_kernels(monkeypatch):
    # the CPU reference kernels (what a CPU user runs; tests/nn does the same)
    import ditq.kernels
    from ditq.kernels import ops, rotate

    for mod in (ditq.kernels, ops, rotate):  # rotate.py holds its own reference to the dispatch test
        monkeypatch.setattr(mod, "triton_runs_on", lambda t: bool(t.is_cuda))


def test_every_variant_and_autoquant_meets_tight_target(tmp_path, reference_kernels):
    # every format and every autoquant candidate, three timesteps
    target = 0.99999
    res = run(tmp_path, "--target-cos", str(target))
    rows = check(res, target, FORMATS)
    assert res["timesteps"] == [0.9, 0.5, 0.1] and res["calib"] == "the benchmark inputs"
    assert res["tokens"] == 4096  # tiny: the speed table at the default token count (full size: the model's own)
    auto = rows["autoquant"]["layers"]
    # fp8-row (the fastest) misses here, so autoquant cannot have kept every eligible layer on it
    assert not rows["fp8-row"]["meets_target"], rows["fp8-row"]["cos_min"]
    assert auto.get("fp8-row", 0) < rows["fp8-row"]["layers"]["fp8-row"]
    rep = res["autoquant_report"]
    assert len(rep["layers"]) == rows["fp8-row"]["layers"]["fp8-row"]  # the eligible layers: the preset's


def test_through_triton_interpreter(tmp_path):
    # the Triton kernels themselves, interpreted (~0.1 s per quantized linear, ~0.3 s per weight quantized), so
    # one input, one format and one 8-bit candidate: autoquant then puts every eligible layer on fp8-row, and
    # its model must compute exactly what the single fp8-row model computes
    res = run(tmp_path, "--formats", "fp8-row", "--candidates", "fp8-row,bf16", "--timesteps", "0.5", "--target-cos", "0.999")
    rows = check(res, 0.999, ("fp8-row",))
    assert rows["autoquant"]["layers"] == rows["fp8-row"]["layers"]
    assert rows["autoquant"]["cos_per_input"] == rows["fp8-row"]["cos_per_input"]


def test_time_limit_skips_and_says_so(tmp_path, reference_kernels):
    res = run(tmp_path, "--time-limit", "1e-9")
    rows = {r["variant"]: r for r in res["results"]}
    assert list(rows) == ["bf16", *FORMATS, "autoquant"]
    assert all(rows[v]["skipped"].startswith("time limit") for v in (*FORMATS, "autoquant"))
    assert res["best_single"] is None and res["autoquant_vs_best_single"] is None
    assert res["autoquant_estimate_s"] > 0


@pytest.mark.parametrize("arch, expect", [("flux", [0.9, 0.5, 0.1]), ("wan-14b", [900, 500, 100])])
def test_timesteps_span_the_schedule(arch, expect):
    from ditq.bench import model as M
    from ditq.bench.autoquant import timestep_inputs

    a = M.ARCHS[arch]
    inputs, _ = timestep_inputs(a, a.tiny_config, a.tiny_size, "cpu", [0.9, 0.5, 0.1], seed=3)
    ts = [float(kw["timestep"]) for kw in inputs]
    assert ts == pytest.approx(expect, rel=1e-2)  # Flux's timestep is bf16
    assert inputs[0]["timestep"].dtype == M.make_inputs(a, a.tiny_config, a.tiny_size, "cpu", torch.bfloat16)[0]["timestep"].dtype
    # each timestep has its own latents
    assert not torch.equal(inputs[0]["hidden_states"], inputs[1]["hidden_states"])


def test_two_targets_share_one_sensitivity_pass(tmp_path, reference_kernels):
    # 0.99999: fp8-row misses, so the per-layer sensitivity is measured once; 0.9: the all-fastest state meets,
    # autoquant@0.9 reuses the measurements and stops at the fastest state after one probe
    res = run(tmp_path, "--target-cos", "0.99999,0.9", "--formats", "fp8-row,int8-row", "--timesteps", "0.9,0.1")
    rows = {r["variant"]: r for r in res["results"]}
    assert list(rows) == ["bf16", "fp8-row", "int8-row", "autoquant", "autoquant@0.9"]
    assert res["targets"] == [0.99999, 0.9] and res["target_cos"] == 0.99999
    tight, loose = rows["autoquant"], rows["autoquant@0.9"]
    assert tight["autoquant_measured"] and tight["autoquant_met"] and tight["meets_target"]
    assert loose["target_cos"] == 0.9 and loose["autoquant_met"] and loose["autoquant_rounds"] == 1
    n_calib = len(res["timesteps"])
    assert loose["autoquant_forwards"] == 2 * n_calib  # reference + one probe: the sensitivity was reused
    assert tight["autoquant_forwards"] > 10 * n_calib
    assert loose["layers"] == rows["fp8-row"]["layers"]  # fastest everywhere
    for r in rows.values():
        assert r["meets"] == {"0.99999": r["cos_min"] >= 0.99999, "0.9": r["cos_min"] >= 0.9}
    per = res["per_target"]
    best = min(("fp8-row", "int8-row"), key=lambda f: rows[f]["median_ms"])  # both meet 0.9; CPU timings decide
    assert per["0.9"]["best_single"] == best
    assert per["0.9"]["autoquant_vs_best_single"] == pytest.approx(rows[best]["median_ms"] / loose["median_ms"])
    assert res["best_single"] == per["0.99999"]["best_single"]
    assert res["autoquant_report"]["target_cos"] == 0.99999 and res["autoquant_report@0.9"]["target_cos"] == 0.9
