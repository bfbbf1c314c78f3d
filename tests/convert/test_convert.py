"""`ditq convert` end to end on small synthetic checkpoints, good and bad."""

import json
import os

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file

import ditq
from checkpoint.fixtures_ckpt import comfy_layer, comfyui_load, fresh_gen, legacy_fp8_layer, rand, save, small_model
from ditq import cli
from ditq import formats as F
from ditq.checkpoint import layout as L
from ditq.checkpoint.io import open_checkpoint
from ditq.convert import convert_checkpoint
from ditq.errors import CheckpointError, DitqError, NonFiniteError
from ditq.verify import verify_checkpoint

QUANTIZABLE = ["blocks.0.attn.to_q.weight", "blocks.0.attn.to_k.weight", "blocks.0.ff.up.weight",
               "blocks.0.ff.down.weight", "blocks.1.attn.to_q.weight"]


def convert(src, dst, **kw):
    kw.setdefault("min_elements", 0)
    kw.setdefault("preset", "generic")
    return convert_checkpoint(src, dst, **kw)


def listing(folder):
    return sorted(os.listdir(folder))


@pytest.mark.parametrize("fmt", list(F.FORMATS))
def test_formats_end_to_end(tmp_path, fmt):
    gen, seed = fresh_gen()
    sd = small_model(gen)
    src = save(tmp_path / "src.safetensors", sd, {"modelspec.title": "tiny"})
    rep = convert(src, tmp_path / "dst.safetensors", format=fmt)
    f = F.get_format(fmt)
    by_key = {r.key: r for r in rep.layers}
    got = dict(L.iter_layers(tmp_path / "dst.safetensors"))
    assert set(got) == set(sd), seed
    for key in QUANTIZABLE:
        odd = any(d % 128 for d in sd[key].shape)
        if f.is_block and odd:  # kept in high precision and reported, not crashed on
            assert by_key[key].action == "kept" and "% 128" in by_key[key].reason
            assert torch.equal(got[key], sd[key])
            continue
        # the converter's default device is cuda when present; the reference quantizes on the same device
        # (CUDA and CPU may round a scale's last bit differently)
        dev = "cuda" if torch.cuda.is_available() else "cpu"
        ref = ditq.quantize_weight(sd[key].to(dev), fmt)._with(lambda t: t.cpu())
        qt = got[key]
        assert isinstance(qt, ditq.QuantizedTensor) and qt.format == fmt and qt.dtype == torch.bfloat16, (key, seed)
        assert torch.equal(qt.qdata.view(torch.uint8), ref.qdata.view(torch.uint8)) and torch.equal(qt.scale, ref.scale)
        assert by_key[key].action == "quantized" and 0 < by_key[key].rel_error < 0.05
    for key in ("blocks.0.attn.to_q.bias", "blocks.0.norm1.weight", "pos_table", "step_counter"):
        assert by_key[key].action == "kept" and torch.equal(got[key], sd[key]), key
    assert "1-D" in by_key["blocks.0.norm1.weight"].reason and "3-D" in by_key["pos_table"].reason
    assert 0.2 < rep.reduction < 0.55 and rep.dst_file_bytes == (tmp_path / "dst.safetensors").stat().st_size
    with safe_open(str(tmp_path / "dst.safetensors"), "pt") as fh:
        meta = fh.metadata()
    assert meta["modelspec.title"] == "tiny"
    ditq_meta = json.loads(meta["ditq"])
    assert ditq_meta["format"] == fmt and ditq_meta["source"] == "src.safetensors"
    assert ditq_meta["source_bytes"] == src.stat().st_size and ditq_meta["version"] == ditq.__version__
    assert verify_checkpoint(src, tmp_path / "dst.safetensors").ok
    assert listing(tmp_path) == ["dst.safetensors", "src.safetensors"]


def test_int8_row_file_is_what_stock_comfyui_loads(tmp_path):
    gen, seed = fresh_gen()
    sd = small_model(gen)
    sd["head.weight"] = rand((1, 256), gen)  # one output row: scale stored as []
    src = save(tmp_path / "src.safetensors", sd)
    dst = tmp_path / "dst.safetensors"
    convert(src, dst, format="int8-row")
    raw = load_file(str(dst))
    with safe_open(str(dst), "pt") as fh:
        meta = fh.metadata()
    layers = {k[: -len(".weight")]: {"format": "int8_tensorwise"} for k in QUANTIZABLE + ["head.weight"]}
    assert json.loads(meta["_quantization_metadata"]) == {"format_version": "1.0", "layers": layers}
    assert meta["_quantization_metadata"] == json.dumps(json.loads(meta["_quantization_metadata"]))  # default separators
    for layer in layers:
        assert raw[f"{layer}.comfy_quant"].numpy().tobytes() == b'{"format": "int8_tensorwise"}'
        assert raw[f"{layer}.weight"].dtype == torch.int8 and raw[f"{layer}.weight_scale"].dtype == torch.float32
        n = sd[f"{layer}.weight"].shape[0]
        assert tuple(raw[f"{layer}.weight_scale"].shape) == ((n, 1) if n > 1 else ())
    comfy = comfyui_load(dst, torch.bfloat16)
    ours = dict(L.iter_layers(dst, dtype=torch.bfloat16))
    assert set(comfy) == set(sd)
    for key in layers:
        w = f"{key}.weight"
        assert torch.equal(comfy[w], ours[w].dequantize(torch.bfloat16)), (w, seed)  # bit for bit
        assert F.relative_error(comfy[w], sd[w]) < 0.02
    # the block format is not a stock ComfyUI format: stock ComfyUI raises KeyError on it
    convert(src, tmp_path / "blk.safetensors", format="int8-block")
    with pytest.raises(KeyError):
        comfyui_load(tmp_path / "blk.safetensors")


def test_fp8_tensor_file_is_what_stock_comfyui_loads(tmp_path):
    gen, seed = fresh_gen()
    sd = small_model(gen)
    src = save(tmp_path / "src.safetensors", sd)
    convert(src, tmp_path / "dst.safetensors", format="fp8-tensor")
    comfy = comfyui_load(tmp_path / "dst.safetensors", torch.bfloat16)
    ours = dict(L.iter_layers(tmp_path / "dst.safetensors"))
    for w in QUANTIZABLE:
        assert torch.equal(comfy[w], ours[w].dequantize(torch.bfloat16)), (w, seed)


def test_truncated_and_corrupt_sources_write_nothing(tmp_path):
    gen, _ = fresh_gen()
    src = save(tmp_path / "src.safetensors", small_model(gen))
    raw = src.read_bytes()
    src.write_bytes(raw[:-1000])
    with pytest.raises(CheckpointError, match="truncated"):
        convert(src, tmp_path / "dst.safetensors")
    src.write_bytes(raw[:8] + b"#" + raw[9:])  # break the JSON header
    with pytest.raises(CheckpointError, match="not a valid safetensors"):
        convert(src, tmp_path / "dst.safetensors")
    assert listing(tmp_path) == ["src.safetensors"]


def test_nan_weight_is_named_and_nothing_is_written(tmp_path):
    gen, _ = fresh_gen()
    sd = small_model(gen)
    sd["blocks.0.ff.up.weight"][3, 5] = float("nan")
    sd["blocks.0.ff.up.weight"][7, 1] = float("inf")
    src = save(tmp_path / "src.safetensors", sd)
    dst = tmp_path / "dst.safetensors"
    with pytest.raises(NonFiniteError) as e:
        convert(src, dst)
    msg = str(e.value)
    assert str(src) in msg and "'blocks.0.ff.up.weight'" in msg and "2 NaN/Inf" in msg and "--keep-nonfinite" in msg
    assert listing(tmp_path) == ["src.safetensors"]
    rep = convert(src, dst, keep_nonfinite=True)
    rec = {r.key: r for r in rep.layers}["blocks.0.ff.up.weight"]
    assert rec.action == "kept" and "NaN/Inf" in rec.reason
    assert verify_checkpoint(src, dst).ok  # the kept layer is bit-identical, NaN included


def test_shard_index_pointing_at_missing_file(tmp_path):
    gen, _ = fresh_gen()
    sd = small_model(gen)
    folder = tmp_path / "src"
    folder.mkdir()
    keys = list(sd)
    save(folder / "a.safetensors", {k: sd[k] for k in keys[:4]})
    wm = {k: ("a.safetensors" if i < 4 else "b.safetensors") for i, k in enumerate(keys)}
    (folder / "model.safetensors.index.json").write_text(json.dumps({"weight_map": wm}))
    with pytest.raises(CheckpointError, match="b.safetensors.*missing"):
        convert(folder, tmp_path / "dst.safetensors")
    assert listing(tmp_path) == ["src"]
    save(folder / "b.safetensors", {k: sd[k] for k in keys[4:]})  # now complete
    convert(folder, tmp_path / "dst.safetensors")
    assert verify_checkpoint(folder, tmp_path / "dst.safetensors").ok


def test_refuses_to_overwrite_the_source(tmp_path):
    gen, _ = fresh_gen()
    src = save(tmp_path / "src.safetensors", small_model(gen))
    before = src.read_bytes()
    os.symlink(src, tmp_path / "link.safetensors")
    for dst in (src, tmp_path / "." / "src.safetensors", tmp_path / "link.safetensors"):
        with pytest.raises(CheckpointError, match="source"):
            convert(src, dst)
    folder = tmp_path / "sharded"
    folder.mkdir()
    save(folder / "m.safetensors", small_model(gen))
    for dst in (folder, folder / "m.safetensors"):
        with pytest.raises(CheckpointError, match="source"):
            convert(folder, dst)
    with pytest.raises(CheckpointError, match="is a folder"):
        convert(src, tmp_path / "sharded")
    assert src.read_bytes() == before


@pytest.mark.parametrize("exc", [RuntimeError("disk on fire"), KeyboardInterrupt()])
def test_failure_mid_write_leaves_no_partial_output(tmp_path, exc):
    gen, _ = fresh_gen()
    src = save(tmp_path / "src.safetensors", small_model(gen))
    dst = tmp_path / "dst.safetensors"
    dst.write_bytes(b"the previous conversion")
    calls = []

    def failing(key, w, decision):
        calls.append(key)
        if len(calls) == 3:
            raise exc
        return ditq.quantize_weight(w, decision.format)

    with pytest.raises(type(exc)):
        convert(src, dst, quantizer=failing)
    assert len(calls) == 3
    assert listing(tmp_path) == ["dst.safetensors", "src.safetensors"]
    assert dst.read_bytes() == b"the previous conversion"


def test_not_enough_disk_space_is_reported_before_writing(tmp_path, monkeypatch):
    import shutil

    gen, _ = fresh_gen()
    src = save(tmp_path / "src.safetensors", small_model(gen))
    monkeypatch.setattr(shutil, "disk_usage", lambda p: shutil._ntuple_diskusage(10**9, 10**9, 1000))
    with pytest.raises(CheckpointError, match="GB free"):
        convert(src, tmp_path / "dst.safetensors")
    assert listing(tmp_path) == ["src.safetensors"]


def test_sharded_output(tmp_path):
    gen, _ = fresh_gen()
    sd = small_model(gen)
    src = save(tmp_path / "src.safetensors", sd)
    rep = convert(src, tmp_path / "out", shard_size="100KB")
    shards = sorted((tmp_path / "out").glob("*.safetensors"))
    assert len(shards) >= 2 and rep.dst_file_bytes == sum(p.stat().st_size for p in shards)
    for p in shards:  # each shard's header lists exactly the quantized layers it holds
        with safe_open(str(p), "pt") as fh:
            keys = set(fh.keys())
            meta = fh.metadata()
        listed = set(json.loads(meta.get("_quantization_metadata", '{"layers": {}}'))["layers"])
        assert listed == {k[: -len(".comfy_quant")] for k in keys if k.endswith(".comfy_quant")}
    assert set(dict(L.iter_layers(tmp_path / "out"))) == set(sd)
    assert verify_checkpoint(src, tmp_path / "out").ok
    assert listing(tmp_path) == ["out", "src.safetensors"]


def test_torch_pickle_source(tmp_path):
    gen, _ = fresh_gen()
    sd = small_model(gen)
    torch.save({"state_dict": sd, "global_step": 10}, tmp_path / "m.ckpt")
    rep = convert(tmp_path / "m.ckpt", tmp_path / "dst.safetensors")
    assert rep.count("quantized") == len(QUANTIZABLE)
    assert verify_checkpoint(tmp_path / "m.ckpt", tmp_path / "dst.safetensors").ok


def test_already_quantized_sources_are_copied_into_comfyui_layout(tmp_path):
    gen, seed = fresh_gen()
    a, _, _ = comfy_layer("blk.a", rand((256, 256), gen), "int8_blockwise", nested_params=True)
    b, _, _ = comfy_layer("blk.b", rand((128, 256), gen), "int8_tensorwise", scalar_int8=True)
    legacy, _ = legacy_fp8_layer("blk.c", rand((128, 128), gen), input_scale=0.25)
    plain = {"blk.d.weight": rand((256, 128), gen), "blk.d.bias": rand((256,), gen)}
    src = save(tmp_path / "src.safetensors", {**a, **b, **legacy, **plain, "scaled_fp8": torch.zeros(2)})
    rep = convert(src, tmp_path / "dst.safetensors", format="int8-row")
    acts = {r.key: (r.action, r.out) for r in rep.layers}
    assert acts["blk.a.weight"] == ("copied", "int8-block") and acts["blk.b.weight"] == ("copied", "int8-row")
    assert acts["blk.c.weight"] == ("copied", "fp8-tensor") and acts["blk.d.weight"] == ("quantized", "int8-row")
    with safe_open(str(tmp_path / "dst.safetensors"), "pt") as fh:
        layers = json.loads(fh.metadata()["_quantization_metadata"])["layers"]
        assert "blk.c.scale_weight" not in fh.keys() and "blk.c.input_scale" in fh.keys()
    assert layers["blk.c"] == {"format": "float8_e4m3fn"} and layers["blk.a"] == {"format": "int8_blockwise", "group_size": 128}
    src_layers = dict(L.iter_layers(src))
    for key, qt in L.iter_layers(tmp_path / "dst.safetensors"):
        if isinstance(qt, ditq.QuantizedTensor) and key != "blk.d.weight":
            assert torch.equal(qt.dequantize(torch.float32), src_layers[key].dequantize(torch.float32)), (key, seed)
    assert verify_checkpoint(src, tmp_path / "dst.safetensors").ok


def test_keep_dtype_and_outlier_ratio(tmp_path):
    gen, _ = fresh_gen()
    sd = small_model(gen)
    sd["blocks.0.attn.to_k.weight"][5, 9] = 40.0  # one huge value: amax/rms of its row ~ sqrt(384)
    src = save(tmp_path / "src.safetensors", sd)
    rep = convert(src, tmp_path / "dst.safetensors", keep_dtype="fp32", max_outlier_ratio=12)
    rec = {r.key: r for r in rep.layers}
    assert rec["blocks.0.attn.to_k.weight"].action == "kept" and "outlier" in rec["blocks.0.attn.to_k.weight"].reason
    assert rec["blocks.0.attn.to_k.weight"].outlier_ratio > 12 and rec["blocks.0.attn.to_q.weight"].outlier_ratio < 12
    raw = load_file(str(tmp_path / "dst.safetensors"))
    assert raw["blocks.0.attn.to_k.weight"].dtype == torch.float32 and raw["blocks.0.norm1.weight"].dtype == torch.float32
    assert raw["step_counter"].dtype == torch.int64
    assert verify_checkpoint(src, tmp_path / "dst.safetensors").ok


def test_auto_preset_on_prefixed_bfl_flux_keys(tmp_path):
    gen, _ = fresh_gen()
    p = "model.diffusion_model."
    sd = {p + "double_blocks.0.img_attn.qkv.weight": rand((384, 128), gen), p + "single_blocks.0.linear1.weight": rand((256, 128), gen),
          p + "img_in.weight": rand((128, 128), gen), p + "final_layer.linear.weight": rand((128, 128), gen),
          p + "double_blocks.0.img_mod.lin.weight": rand((768, 128), gen)}
    src = save(tmp_path / "flux.safetensors", sd)
    rep = convert_checkpoint(src, tmp_path / "dst.safetensors", min_elements=0)
    assert rep.preset == "flux" and rep.preset_detected
    quantized = {r.key for r in rep.layers if r.action == "quantized"}
    assert quantized == {p + "double_blocks.0.img_attn.qkv.weight", p + "single_blocks.0.linear1.weight"}


def test_t5_decoder_is_dropped_and_verify_knows(tmp_path):
    gen, _ = fresh_gen()
    sd = {"shared.weight": rand((256, 128), gen), "encoder.block.0.layer.0.SelfAttention.q.weight": rand((128, 128), gen),
          "decoder.block.0.layer.0.SelfAttention.q.weight": rand((128, 128), gen), "lm_head.weight": rand((256, 128), gen)}
    src = save(tmp_path / "t5.safetensors", sd)
    rep = convert_checkpoint(src, tmp_path / "enc.safetensors", min_elements=0)
    assert rep.preset == "t5xxl" and rep.count("dropped") == 2
    assert set(dict(L.iter_layers(tmp_path / "enc.safetensors"))) == {"shared.weight", "encoder.block.0.layer.0.SelfAttention.q.weight"}
    res = verify_checkpoint(src, tmp_path / "enc.safetensors")
    assert res.ok and any("dropped by preset t5xxl" in n for n in res.notes)


def test_through_the_triton_kernels(tmp_path, interpreted_kernels):
    gen, seed = fresh_gen()
    sd = {"a.weight": rand((128, 256), gen), "b.weight": rand((256, 128), gen)}
    src = save(tmp_path / "src.safetensors", sd)
    for fmt in ("int8-row", "fp8-block"):
        convert(src, tmp_path / f"{fmt}.safetensors", format=fmt)
        got = dict(L.iter_layers(tmp_path / f"{fmt}.safetensors"))
        for k, w in sd.items():
            dev = "cuda" if torch.cuda.is_available() else "cpu"  # the converter's default device
            q, s = (t.cpu() for t in F.quantize_weight_ref(w.to(dev), fmt))
            assert torch.equal(got[k].qdata.view(torch.uint8), q.view(torch.uint8)) and torch.equal(got[k].scale, s), seed


def test_cli(tmp_path, capsys):
    gen, _ = fresh_gen()
    sd = small_model(gen)
    src = save(tmp_path / "src.safetensors", sd)
    dst, rep = tmp_path / "dst.safetensors", tmp_path / "r.json"
    code = cli.main(["convert", str(src), "-o", str(dst), "--min-elements", "0", "--json", str(rep), "--exclude", "to_k"])
    out = capsys.readouterr().out
    assert code == 0 and "quantized int8-row" in out and "kept: --exclude 'to_k'" in out and "smaller" in out
    report = json.loads(rep.read_text())
    assert report["totals"]["quantized"] == len(QUANTIZABLE) - 1 and report["totals"]["dst_file_bytes"] == dst.stat().st_size
    assert cli.main(["convert", str(src), "-o", str(dst), "-q"]) == 0 and capsys.readouterr().out == ""
    sd["blocks.0.attn.to_q.weight"][0, 0] = float("nan")
    save(src, sd)
    code = cli.main(["convert", str(src), "-o", str(tmp_path / "x.safetensors"), "-q"])
    err = capsys.readouterr().err
    assert code == 1 and "blocks.0.attn.to_q.weight" in err and str(src) in err
    with pytest.raises(SystemExit) as e:  # argparse rejects an unknown preset before anything runs
        cli.main(["convert", str(src), "-o", str(tmp_path / "x.safetensors"), "--preset", "nope"])
    assert e.value.code != 0 and "invalid choice: 'nope'" in capsys.readouterr().err


def test_learned_rounding_hook_reports_cleanly_when_missing(tmp_path):
    import importlib.util

    gen, _ = fresh_gen()
    src = save(tmp_path / "src.safetensors", small_model(gen))
    if importlib.util.find_spec("ditq.rounding") is None:
        with pytest.raises(DitqError, match="ditq.rounding"):
            convert(src, tmp_path / "dst.safetensors", rounding="learned")
    else:  # once learned rounding exists, the converter passes the option through to quantize_weight
        rep = convert(src, tmp_path / "dst.safetensors", rounding="learned", measure_error=True)
        assert rep.count("quantized") == len(QUANTIZABLE)


@pytest.mark.parametrize("fmt", ["int8-row", "int8-block", "fp8-row", "fp8-block", "fp8-tensor"])
def test_cpu_slices_give_the_same_codes(monkeypatch, fmt):
    from ditq.checkpoint.policy import Decision
    from ditq.convert import convert as C

    gen, seed = fresh_gen()
    w = rand((640, 256), gen)
    monkeypatch.setattr(C, "CPU_CHUNK_ELEMENTS", 128 * 256)  # 5 slices of 128 rows
    got = C.nearest_quantizer("w", w, Decision("quantize", "", fmt))
    ref = ditq.quantize_weight(w, fmt)
    assert got.format == fmt and got.dtype == w.dtype and got.scale.shape == ref.scale.shape
    assert torch.equal(got.qdata.view(torch.uint8), ref.qdata.view(torch.uint8)) and torch.equal(got.scale, ref.scale), seed
