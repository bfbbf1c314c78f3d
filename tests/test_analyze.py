"""`ditq analyze`: per-layer errors against an independent computation, sizes against a real conversion."""

import json
import sys

import pytest
import torch

from checkpoint.fixtures_ckpt import reference_kernels  # noqa: F401 (fixture)
from checkpoint.fixtures_ckpt import fresh_gen, save, small_model
from ditq import cli
from ditq import formats as F
from ditq.analyze import SPEED_ORDER, TOLERANCE, analyze_checkpoint, recommend
from ditq.checkpoint.policy import outlier_ratio
from ditq.convert import convert_checkpoint
from ditq.errors import DitqError

pytestmark = pytest.mark.usefixtures("reference_kernels")


@pytest.fixture
def model(tmp_path):
    gen, seed = fresh_gen()
    sd = small_model(gen)
    sd["blocks.1.attn.to_q.weight"][0, 0] = float("nan")
    return save(tmp_path / "src.safetensors", sd), sd, seed


def test_per_layer_errors_and_outliers(model):
    src, sd, seed = model
    rep = analyze_checkpoint(src, preset="generic", min_elements=0)
    layers = {r.key: r for r in rep.layers}
    assert set(layers) == {k for k, v in sd.items() if v.dim() == 2 and k.endswith(".weight")}
    for key, r in layers.items():
        w = sd[key].float()
        if not torch.isfinite(w).all():
            assert all(e is None for e in r.errors.values()) and r.recommended == "keep"
            continue
        for f in F.FORMATS:
            fmt = F.get_format(f)
            if fmt.is_block and any(d % 128 for d in w.shape):
                assert r.errors[f] is None
                continue
            q, s = F.quantize_weight_ref(sd[key], f)
            expected = F.relative_error(F.dequantize_ref(q, s, f, torch.float32), w)
            assert r.errors[f] == pytest.approx(expected, rel=1e-5), (key, f, seed)  # float32 norms
        assert r.outliers["row"] == pytest.approx(outlier_ratio(w, "int8-row"), rel=1e-6)
        assert r.recommended == recommend(r.errors, 0.05) != "keep"


def test_recommendation_rule():
    assert recommend({"int8-row": 0.01, "fp8-row": 0.03, "int8-block": 0.009}, 0.05) == "int8-row"
    assert recommend({"int8-row": 0.02, "int8-block": 0.01, "fp8-row": 0.03}, 0.05) == "int8-block"
    assert recommend({"int8-row": 0.2, "int8-block": None}, 0.05) == "keep"
    assert recommend({"fp8-row": 0.010, "int8-row": 0.009}, 0.05) == "fp8-row"  # faster and within 1.25x
    assert SPEED_ORDER[0] == "fp8-row" and TOLERANCE > 1


@pytest.mark.parametrize("fmt", ["int8-row", "int8-block"])
def test_predicted_size_equals_the_conversion(tmp_path, fmt):
    gen, _ = fresh_gen()
    src = save(tmp_path / "src.safetensors", small_model(gen))
    rep = analyze_checkpoint(src, preset="generic", min_elements=0, formats=[fmt], format=fmt)
    conv = convert_checkpoint(src, tmp_path / "dst.safetensors", format=fmt, preset="generic", min_elements=0)
    pol = rep.totals["policies"][f"--format {fmt}"]
    # the converter also writes one small .comfy_quant tensor per quantized layer
    comfy = sum(r.bytes_out - F.qdata_bytes(*r.shape, fmt) for r in conv.layers if r.action == "quantized")
    assert pol["bytes"] + comfy == conv.bytes_out and pol["quantized"] == conv.count("quantized")
    assert rep.totals["original_bytes"] == conv.bytes_in


def test_cli_json_and_plot(model, tmp_path, capsys):
    src, _, _ = model
    out_json, png = tmp_path / "a.json", tmp_path / "a.png"
    assert cli.main(["analyze", str(src), "--min-elements", "0", "--json", str(out_json), "--plot", str(png)]) == 0
    text = capsys.readouterr().out
    assert "recommended per layer" in text and "blocks.0.attn.to_q.weight" in text
    data = json.loads(out_json.read_text())
    assert data["totals"]["policies"]["--format int8-row"]["quantized"] >= 3
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and png.stat().st_size > 10_000


def test_plot_without_matplotlib_says_how_to_get_it(model, tmp_path, monkeypatch, capsys):
    src, _, _ = model
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # import fails
    assert cli.main(["analyze", str(src), "--plot", str(tmp_path / "a.png")]) == 1
    assert "pip install 'ditq[plot]'" in capsys.readouterr().err
    assert not (tmp_path / "a.png").exists()


def test_refuses_quantized_input(model, tmp_path):
    src, _, _ = model
    src_ok = tmp_path / "ok.safetensors"
    sd = small_model(fresh_gen()[0])
    save(src_ok, sd)
    convert_checkpoint(src_ok, tmp_path / "q.safetensors", preset="generic", min_elements=0)
    with pytest.raises(DitqError, match="already quantized"):
        analyze_checkpoint(tmp_path / "q.safetensors")
