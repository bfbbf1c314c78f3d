"""bench/precision_cpu.py (the README's --target-cos table) runs and its rows keep their promises: every
measured 1 - cos within its target, autoquant_ at least as fast (estimated) as convert with gains."""

import importlib.util
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
pytest.importorskip("diffusers")
pytestmark = pytest.mark.usefixtures("one_thread")


def test_table_rows_meet_their_targets(tmp_path, capsys, monkeypatch):
    import ditq.kernels
    from ditq.kernels import ops, rotate

    for mod in (ditq.kernels, ops, rotate):  # the CPU reference kernels, as tests/nn uses
        monkeypatch.setattr(mod, "triton_runs_on", lambda t: bool(t.is_cuda))
    spec = importlib.util.spec_from_file_location("precision_cpu", ROOT / "bench" / "precision_cpu.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    assert mod.main(["--out", str(tmp_path), "--targets", "0.9999"]) == 0
    rows = [line.split(" | ") for line in capsys.readouterr().out.splitlines() if line.startswith("| 0.9999 ")]
    assert [r[1] for r in rows] == ["convert, gain 1", "convert, --gains 2", "`autoquant_` (model measured)"]
    for r in rows:
        assert float(r[4]) <= 1e-4, r  # measured 1 - cos within the target
    speed = {r[1]: float(r[5].rstrip(" |x")) for r in rows}
    assert speed["`autoquant_` (model measured)"] >= speed["convert, --gains 2"] >= speed["convert, gain 1"] - 0.1
