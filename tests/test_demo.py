"""`ditq demo` on a smaller configuration than the default (same code path)."""

import sys

import pytest

from checkpoint.fixtures_ckpt import reference_kernels  # noqa: F401 (fixture)
from ditq import cli
from ditq.demo import DEMO_CONFIG, run_demo
from ditq.verify import verify_checkpoint

pytestmark = pytest.mark.usefixtures("reference_kernels")

SMALL = {**DEMO_CONFIG, "num_layers": 1, "num_single_layers": 1, "num_attention_heads": 2,
         "joint_attention_dim": 256, "pooled_projection_dim": 128}


def test_demo_runs_end_to_end(tmp_path):
    pytest.importorskip("diffusers")  # optional dependency (installed for CI; absent on the GPU machines)
    lines = []
    res = run_demo(tmp_path, config=SMALL, image_side=4, text_tokens=8, repeats=1, log=lines.append)
    text = "\n".join(lines)
    for step in ("[1/5]", "[2/5]", "[3/5]", "[4/5]", "[5/5]", "output cosine", "recommended per layer"):
        assert step in text
    src = tmp_path / "flux-tiny-bf16.safetensors"
    assert res["src_bytes"] == src.stat().st_size
    for fmt in ("int8-row", "int8-block"):
        m = res["models"][fmt]
        dst = tmp_path / f"flux-tiny-{fmt}.safetensors"
        assert m["bytes"] == dst.stat().st_size < res["src_bytes"] and 0.1 < m["reduction"] < 0.6
        assert m["quantized_linears"] > 5 and m["cosine"] > 0.999, (fmt, m)
        assert verify_checkpoint(src, dst).ok


def test_demo_without_diffusers_says_how_to_get_it(monkeypatch, capsys):
    monkeypatch.setitem(sys.modules, "diffusers", None)
    monkeypatch.setattr("importlib.util.find_spec", lambda name, *a: None if name == "diffusers" else object())
    assert cli.main(["demo"]) == 1
    assert "pip install 'ditq[diffusers]'" in capsys.readouterr().err
