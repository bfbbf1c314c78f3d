"""Hadamard-rotated int8 ("ConvRot") in files: what `ditq convert --rotation hadamard` writes against the
FORMATS.md definition restated here, reading such files (ditq's and other tools' key placement), verify."""

import json
import math

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file

from checkpoint.fixtures_ckpt import comfy_bytes, fresh_gen, rand, save, small_model
from ditq import cli
from ditq import formats as F
from ditq.checkpoint import layout as L
from ditq.convert import convert_checkpoint
from ditq.errors import DitqError
from ditq.tensor import QuantizedTensor
from ditq.verify import verify_checkpoint


def regular_hadamard(g):
    """FORMATS.md: H_4 = [[1,1,1,-1],[1,1,-1,1],[1,-1,1,1],[-1,1,1,1]], Kronecker powers up to g, / sqrt(g)."""
    h4 = torch.tensor([[1, 1, 1, -1], [1, 1, -1, 1], [1, -1, 1, 1], [-1, 1, 1, 1]], dtype=torch.float64)
    h = h4
    while h.shape[0] < g:
        h = torch.kron(h, h4)
    return h / math.sqrt(g)


def formats_md_convrot(w, g):
    """(q int8 [N, K], scale [N, 1], dequantized [N, K] in the original basis) per FORMATS.md: W viewed as
    [N, K/g, g] times H_g^T, int8 per output row (scale = amax / 127), dequantize q * scale then times H_g^T."""
    n, k = w.shape
    h = regular_hadamard(g)
    wr = (w.double().reshape(n, k // g, g) @ h.t()).reshape(n, k).float()
    s = wr.abs().amax(1, keepdim=True).clamp(min=F.AMAX_EPS) / 127.0
    q = torch.round(wr / s).clamp(-127, 127).to(torch.int8)
    deq = ((q.float() * s).double().reshape(n, k // g, g) @ h.t()).reshape(n, k)
    return q, s, deq


def test_converted_file_matches_the_formats_md_formula(tmp_path):
    gen, seed = fresh_gen()
    sd = small_model(gen)
    sd["blocks.1.odd.weight"] = rand((64, 40), gen)  # K = 40: no power-of-4 group >= 16 divides it
    src = save(tmp_path / "src.safetensors", sd)
    dst = tmp_path / "dst.safetensors"
    # on the CPU, where the test computes the formula (CUDA may round a scale's last bit differently)
    rep = convert_checkpoint(src, dst, preset="generic", min_elements=0, rotation="hadamard", device="cpu")
    by_key = {r.key: r for r in rep.layers}
    raw = load_file(str(dst))
    got = dict(L.iter_layers(dst))
    with safe_open(str(dst), "pt") as fh:
        header = json.loads(fh.metadata()[L.QUANT_METADATA_KEY])["layers"]
    expect_g = {"blocks.0.attn.to_q": 64, "blocks.0.attn.to_k": 64, "blocks.0.ff.up": 256, "blocks.0.ff.down": 64,
                "blocks.1.attn.to_q": 64}  # the largest power of 4 up to 256 dividing K (384, 256, 128)
    for layer, g in expect_g.items():
        w = sd[f"{layer}.weight"]
        q, s, deq = formats_md_convrot(w, g)
        conf = {"format": "int8_tensorwise", "convrot": True, "convrot_groupsize": g}
        assert bytes(raw[f"{layer}.comfy_quant"].tolist()) == json.dumps(conf).encode(), layer
        assert header[layer] == conf
        assert torch.equal(raw[f"{layer}.weight"], q), (layer, seed)
        assert torch.equal(raw[f"{layer}.weight_scale"], s), (layer, seed)
        qt = got[f"{layer}.weight"]
        assert isinstance(qt, QuantizedTensor) and qt.rotation == g and qt.format == "int8-row"
        torch.testing.assert_close(qt.dequantize(torch.float32).double(), deq, rtol=1e-6, atol=1e-7)
        assert by_key[f"{layer}.weight"].rotation == g
    r = by_key["blocks.1.odd.weight"]
    assert r.action == "quantized" and r.rotation is None and "not rotated" in r.reason
    assert json.loads(bytes(raw["blocks.1.odd.comfy_quant"].tolist())) == {"format": "int8_tensorwise"}
    vr = verify_checkpoint(src, dst)
    assert vr.ok, vr.summary()
    assert "hadamard-64" in rep.summary()


def test_verify_catches_a_wrong_rotated_layer(tmp_path):
    gen, seed = fresh_gen()
    sd = {"a.weight": rand((128, 256), gen), "b.weight": rand((128, 256), gen)}
    src = save(tmp_path / "src.safetensors", sd)
    dst = tmp_path / "dst.safetensors"
    convert_checkpoint(src, dst, preset="generic", min_elements=0, rotation="hadamard", rotation_group=16)
    raw = load_file(str(dst))
    assert json.loads(bytes(raw["a.comfy_quant"].tolist()))["convrot_groupsize"] == 16
    bad = dict(raw)
    bad["a.weight"], bad["b.weight"] = raw["b.weight"], raw["a.weight"]  # swapped layers
    save(tmp_path / "bad.safetensors", bad)
    vr = verify_checkpoint(src, tmp_path / "bad.safetensors")
    assert not vr.ok and "a.weight" in vr.summary() and "rotating back" in vr.summary(), seed


@pytest.mark.parametrize("nested", [False, True])
def test_round_trip_and_other_tools_key_placement(tmp_path, nested):
    gen, seed = fresh_gen()
    w = rand((96, 512), gen)
    for g in (16, 64, 256):
        q, s, _ = formats_md_convrot(w, g)
        qt = QuantizedTensor(q, s, "int8-row", torch.bfloat16, rotation=g)
        if nested:  # another tool's placement of the keys: inside "params"
            conf = {"format": "int8_tensorwise", "params": {"convrot": True, "convrot_groupsize": g}}
            t = {"l.weight": q, "l.weight_scale": s, "l.comfy_quant": comfy_bytes(conf)}
        else:
            t = L.quantized_to_disk("l", qt)
        path = save(tmp_path / f"r{g}.safetensors", t)
        (key, back), = L.iter_layers(path)
        assert key == "l.weight" and back.rotation == g, seed
        assert torch.equal(back.qdata, q) and torch.equal(back.scale, s)
        assert torch.equal(back.dequantize(torch.float32), qt.dequantize(torch.float32))


def test_rotation_requests_that_cannot_apply(tmp_path, capsys):
    gen, _ = fresh_gen()
    src = save(tmp_path / "src.safetensors", small_model(gen))
    for kw, match in (({"format": "int8-block", "rotation": "hadamard"}, "int8-row only"),
                      ({"rotation": "hadamard", "rotation_group": 32}, "not supported"),
                      ({"rotation": "givens"}, "unknown rotation"),
                      ({"rotation_group": 64}, "needs --rotation hadamard"),
                      ({"rotation": "hadamard", "rounding": "learned"}, "not implemented")):
        with pytest.raises(DitqError, match=match):
            convert_checkpoint(src, tmp_path / "x.safetensors", **kw)
    code = cli.main(["convert", str(src), "-o", str(tmp_path / "y.safetensors"), "--format", "fp8-row",
                     "--rotation", "hadamard"])
    assert code != 0 and "int8-row only" in capsys.readouterr().err
    assert not (tmp_path / "x.safetensors").exists() and not (tmp_path / "y.safetensors").exists()
