"""`ditq convert --rounding learned`: learned rounding per layer in the stream, its report, and the bias
correction written in place of the source bias (whether the bias comes before or after its weight)."""

import json
import math

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file

from checkpoint.fixtures_ckpt import fresh_gen, save
from ditq import cli
from ditq import formats as F
from ditq import rounding as R
from ditq.checkpoint import layout as L
from ditq.checkpoint.io import open_checkpoint
from ditq.convert import convert_checkpoint
from ditq.errors import DitqError
from ditq.verify import verify_checkpoint

REPORT_FIELDS = ("objective", "objective_nearest", "objective_learned", "heldout_mse_nearest", "heldout_mse_learned",
                 "iterations", "time_s", "fallback", "fallback_reason")


def _layer(gen, n, k, dtype):
    """A low-rank-plus-noise weight [n, k], its bias, and a sampler of inputs with a per-channel mean and a
    few 20x outlier channels (the structure learned rounding exploits)."""
    rank = 8
    w = (torch.randn(n, rank, generator=gen) @ torch.randn(rank, k, generator=gen)) / math.sqrt(k)
    w = w + 0.02 * torch.randn(n, k, generator=gen)
    mix = torch.randn(k, k, generator=gen) / math.sqrt(k)
    mu = 0.5 * torch.randn(k, generator=gen)
    gain = torch.ones(k)
    gain[torch.randperm(k, generator=gen)[:4]] = 20.0

    def sample(m):
        z = torch.randn(m, k, generator=gen)
        return (z @ mix + 0.3 * torch.randn(m, k, generator=gen) + mu) * gain

    return w.to(dtype), (0.1 * torch.randn(n, generator=gen)).to(torch.bfloat16), sample


@pytest.fixture
def case(tmp_path):
    """A checkpoint where one layer's bias precedes its weight in the file (same dtype: name order) and
    another's follows it (float32 weight: safetensors puts wider dtypes first), plus a calibration file
    written with ditq.rounding's own API."""
    gen, seed = fresh_gen()
    sd, samplers = {}, {}
    for name, n, k, dtype in (("blocks.0.attn.to_q", 128, 256, torch.bfloat16),
                              ("blocks.0.ff.up", 256, 256, torch.float32)):
        w, b, sample = _layer(gen, n, k, dtype)
        sd[f"{name}.weight"], sd[f"{name}.bias"], samplers[name] = w, b, sample
    sd["blocks.0.norm.weight"] = torch.ones(256, dtype=torch.bfloat16)
    src = save(tmp_path / "src.safetensors", sd)
    cal = R.CalibrationStats({name: R.LayerStats.from_activations(s(1536), heldout_fraction=0.25, seed=seed)
                              for name, s in samplers.items()})
    cal.save(tmp_path / "cal.safetensors")
    with open_checkpoint(src) as ck:
        names = list(ck.names)
    order = {name: names.index(f"{name}.bias") < names.index(f"{name}.weight") for name in samplers}
    assert sorted(order.values()) == [False, True], names  # both stream orders are covered
    return src, tmp_path / "cal.safetensors", sd, cal, seed


def _out_mse(x, w_dq, w):
    return float((x.double() @ (w_dq.double() - w.double()).t()).pow(2).mean())


@pytest.mark.parametrize("fmt", ["int8-row", "fp8-tensor"])
def test_learned_never_worse_than_nearest_and_bias_replaced(case, tmp_path, fmt):
    src, cal_path, sd, cal, seed = case
    dst = tmp_path / "dst.safetensors"
    rep = convert_checkpoint(src, dst, format=fmt, preset="generic", min_elements=0, rounding="learned",
                             calibration=cal_path)
    got = dict(L.iter_layers(dst))
    raw = load_file(str(dst))
    by_key = {r.key: r for r in rep.layers}
    corrected = 0
    for name in ("blocks.0.attn.to_q", "blocks.0.ff.up"):
        w = sd[f"{name}.weight"].float()
        r = by_key[f"{name}.weight"]
        assert r.action == "quantized" and r.rounding is not None, (name, seed)
        assert all(f in r.rounding for f in REPORT_FIELDS), (sorted(r.rounding), seed)
        x = cal.get(name).sample
        q0, s0 = F.quantize_weight_ref(w, fmt)
        learned = got[f"{name}.weight"].dequantize(torch.float32)
        # the output error on held-out rows is what the converter promises never to worsen
        assert _out_mse(x, learned, w) <= _out_mse(x, F.dequantize_ref(q0, s0, fmt), w), (name, fmt, seed)
        assert r.rounding["heldout_mse_learned"] <= r.rounding["heldout_mse_nearest"] or r.rounding["fallback"]
        b_src, b_out = sd[f"{name}.bias"], raw[f"{name}.bias"]
        assert b_out.dtype == b_src.dtype and b_out.shape == b_src.shape
        if r.rounding.get("bias_correction"):
            corrected += 1
            # FORMATS.md / issue 7: b + (W - W_dq) E[x], with E[x] the calibration mean
            want = (b_src.double() + (w.double() - learned.double()) @ cal.get(name).mean.double()).to(b_src.dtype)
            assert torch.equal(b_out, want), (name, seed)
            assert not torch.equal(b_out, b_src)
            assert "corrected" in by_key[f"{name}.bias"].reason
        else:
            assert torch.equal(b_out, b_src)
    assert corrected >= 1, seed  # inputs with a real mean: the correction helps on held-out rows
    assert not any(r.rounding["fallback"] for r in (by_key[k] for k in by_key) if r.rounding), seed
    with safe_open(str(dst), "pt") as fh:
        meta = json.loads(fh.metadata()["ditq"])
    assert meta["rounding"] == "learned"
    vr = verify_checkpoint(src, dst)
    assert vr.ok, vr.summary()
    text = rep.summary()
    assert "learned rounding: 2 of 2 layers learned" in text and "held-out output MSE" in text
    d = rep.to_dict()
    assert d["layers"][[r["key"] for r in d["layers"]].index("blocks.0.ff.up.weight")]["rounding"]["iterations"] >= 0
    json.dumps(d)  # the JSON report holds no tensors


def test_learned_without_calibration_keeps_nearest_and_warns(case, tmp_path, capsys):
    src, _, sd, _, seed = case
    dst = tmp_path / "dst.safetensors"
    code = cli.main(["convert", str(src), "-o", str(dst), "--preset", "generic", "--min-elements", "0",
                     "--rounding", "learned", "--json", str(tmp_path / "r.json"), "--device", "cpu"])
    out = capsys.readouterr().out
    assert code == 0 and "warning" in out and "without --calibration" in out and "keeps round-to-nearest" in out
    got = dict(L.iter_layers(dst))
    for name in ("blocks.0.attn.to_q", "blocks.0.ff.up"):
        q0, s0 = F.quantize_weight_ref(sd[f"{name}.weight"], "int8-row")
        assert torch.equal(got[f"{name}.weight"].qdata, q0), seed
        assert torch.equal(load_file(str(dst))[f"{name}.bias"], sd[f"{name}.bias"])
    layers = json.loads((tmp_path / "r.json").read_text())["layers"]
    reps = [r["rounding"] for r in layers if r["rounding"]]
    assert len(reps) == 2 and all(r["fallback"] and "calibration" in r["fallback_reason"] for r in reps)


def test_cli_learned_flags(case, tmp_path, capsys):
    src, cal_path, _, _, seed = case
    dst = tmp_path / "dst.safetensors"
    code = cli.main(["convert", str(src), "-o", str(dst), "--preset", "generic", "--min-elements", "0",
                     "--format", "int8-block", "--rounding", "learned", "--calibration", str(cal_path),
                     "--optimizer", "adamw", "--iters", "3", "--no-scale-search", "--json", str(tmp_path / "r.json")])
    assert code == 0, capsys.readouterr()
    layers = json.loads((tmp_path / "r.json").read_text())["layers"]
    reps = {r["key"]: r["rounding"] for r in layers if r["rounding"]}
    assert set(reps) == {"blocks.0.attn.to_q.weight", "blocks.0.ff.up.weight"}
    for r in reps.values():
        assert r["optimizer"] == "adamw" and r["iterations"] == 3 and r["scale"] == "amax", r
    # learned-rounding flags without --rounding learned are an error, not silently ignored
    code = cli.main(["convert", str(src), "-o", str(tmp_path / "x.safetensors"), "--calibration", str(cal_path)])
    assert code != 0 and "--rounding learned" in capsys.readouterr().err
    with pytest.raises(DitqError, match="unknown rounding option"):
        convert_checkpoint(src, tmp_path / "y.safetensors", rounding="learned", rounding_options={"itres": 3})
