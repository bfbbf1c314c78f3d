"""`ditq bench gemm`'s interleaved timing, on the CPU with a stand-in for do_bench: every function is timed once
per round in order, and a ratio is the median of the per-round ratios against bf16 (so a baseline that drifts
between rounds moves both sides of a ratio alike)."""

from ditq.bench import gemm as B


def test_interleaved_rounds_and_median_of_round_ratios():
    calls = []
    # the GPU slows down by 20% in round 2: bf16 and the variant drift together
    times = {"bf16": iter([100.0, 120.0, 100.0]), "int8-row": iter([50.0, 60.0, 80.0])}

    def bench(fn):
        name = fn()
        calls.append(name)
        return next(times[name])

    got = B._interleaved({"bf16": lambda: "bf16", "int8-row": lambda: "int8-row"}, bench, 3)
    assert calls == ["bf16", "int8-row"] * 3
    assert got == {"bf16": [100.0, 120.0, 100.0], "int8-row": [50.0, 60.0, 80.0]}
    r = B._round_ratios(got)
    assert r["bf16"] == 1.0
    assert r["int8-row"] == 2.0  # per-round ratios 2.0, 2.0, 1.25: the median, not 100 / 60 from the medians


def test_settle_runs_the_call_for_the_requested_time(monkeypatch):
    """settle() calls fn about settle_ms / est_ms times (at least once) and then synchronizes; 0 turns it off."""
    import torch

    calls, syncs = [], []
    monkeypatch.setattr(torch.cuda, "synchronize", lambda: syncs.append(1))
    B.settle(lambda: calls.append(1), est_ms=0.5, settle_ms=200.0)
    assert len(calls) == 400 and len(syncs) == 1
    B.settle(lambda: calls.append(1), est_ms=500.0, settle_ms=200.0)
    assert len(calls) == 401
    B.settle(lambda: calls.append(1), est_ms=0.5, settle_ms=0)
    assert len(calls) == 401 and len(syncs) == 2


def test_timed_estimates_settles_then_times_enough_calls(monkeypatch):
    """timed(): a short estimate, then settle() for settle_ms, then a do_bench over at least min_calls calls."""
    import torch
    import triton.testing

    runs, seen = [], []
    monkeypatch.setattr(torch.cuda, "synchronize", lambda: None)

    def fake_do_bench(fn, warmup, rep, return_mode):
        seen.append((warmup, rep))
        return 2.0  # ms per call

    monkeypatch.setattr(triton.testing, "do_bench", fake_do_bench)
    assert B.timed(lambda: runs.append(1), 30, settle_ms=100.0) == 2.0
    assert seen == [(2, 2), (7, 30)] and len(runs) == 50  # settle: 100 ms / 2 ms
    seen.clear()
    B.timed(lambda: runs.append(1), 8, min_calls=10)  # large call: rep grows to 10 calls; no settling
    assert seen == [(2, 2), (5, 20.0)] and len(runs) == 50
