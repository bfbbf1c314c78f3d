"""Key layouts: ditq's ComfyUI output, files in convert-to-quant layout, legacy scaled fp8, and the
formats ditq refuses. Foreign files are built from FORMATS.md by checkpoint/fixtures_ckpt.py."""

import json

import pytest
import torch

import ditq
from checkpoint.fixtures_ckpt import comfy_bytes, comfy_layer, fresh_gen, legacy_fp8_layer, rand, save
from ditq import formats as F
from ditq.checkpoint import layout as L
from ditq.checkpoint.io import open_checkpoint
from ditq.errors import CheckpointError, UnsupportedFormatError


def test_comfy_quant_bytes_are_json_dumps_default_separators():
    for fmt in F.FORMATS:
        conf = L.comfy_conf(fmt)
        t = L.encode_comfy_quant(conf)
        assert t.dtype == torch.uint8 and t.dim() == 1
        assert t.numpy().tobytes() == json.dumps(conf).encode("utf-8")  # '{"format": "..."}' with spaces
        assert L.decode_comfy_quant(t) == conf
    assert L.comfy_conf("int8-row") == {"format": "int8_tensorwise"}
    assert L.comfy_conf("int8-block") == {"format": "int8_blockwise", "group_size": 128}
    assert L.decode_comfy_quant(comfy_bytes("int8_tensorwise")) == {"format": "int8_tensorwise"}
    with pytest.raises(CheckpointError, match="valid JSON"):
        L.decode_comfy_quant(torch.tensor(list(b"{nope"), dtype=torch.uint8), "f: x")


# block formats need N % 128 == 0 (other layers are kept), so only row / tensor formats get N = 1
@pytest.mark.parametrize(
    "fmt, n", [(f, 256) for f in F.FORMATS] + [(f, 1) for f in ("int8-row", "fp8-row", "fp8-tensor")] + [("int8-block", 128)]
)
def test_disk_scale_shapes_and_back(fmt, n):
    gen, seed = fresh_gen()
    f = F.get_format(fmt)
    k = 384 if n != 128 else 128  # a single 128x128 block keeps its [1, 1] grid
    qt = ditq.quantize_weight(rand((n, k), gen, torch.float32), fmt)
    disk = L.quantized_to_disk("l", qt)
    s = disk["l.weight_scale"]
    expected = {"tensor": (), "row": (n, 1) if fmt == "int8-row" else (n,), "block": (n // 128, k // 128)}[f.weight_granularity]
    if s.numel() == 1 and not f.is_block:
        expected = ()  # FORMATS.md: one-element scales are stored with shape []
    assert tuple(s.shape) == expected and s.dtype == torch.float32, seed
    assert disk["l.weight"].dtype == f.storage
    back = L.memory_scale(s, f, n, k, "x")
    assert torch.equal(back, qt.scale), seed


def _roundtrip(tmp_path, tensors, metadata=None, dtype=torch.bfloat16):
    path = save(tmp_path / "f.safetensors", tensors, metadata)
    return dict(L.iter_layers(path, dtype=dtype)), path


@pytest.mark.parametrize(
    "comfy_format, kw, ditq_format",
    [
        ("int8_tensorwise", {}, "int8-row"),
        ("int8_tensorwise", {"scalar_int8": True}, "int8-row"),
        ("int8_blockwise", {}, "int8-block"),
        ("int8_blockwise", {"nested_params": True}, "int8-block"),
        ("float8_e4m3fn", {}, "fp8-tensor"),
        ("float8_e4m3fn_rowwise", {}, "fp8-row"),
        ("float8_e4m3fn_blockwise", {}, "fp8-block"),
    ],
)
@pytest.mark.parametrize("where", ["tensors", "header", "both"])
def test_reads_convert_to_quant_layout(tmp_path, comfy_format, kw, ditq_format, where):
    gen, seed = fresh_gen()
    w = rand((256, 384), gen)
    tensors, conf, deq = comfy_layer("blk.0.proj", w, comfy_format, **kw)
    tensors["blk.0.proj.bias"] = rand((256,), gen)
    meta = None
    if where != "tensors":
        meta = {"_quantization_metadata": json.dumps({"format_version": "1.0", "layers": {"blk.0.proj": conf}})}
    if where == "header":
        del tensors["blk.0.proj.comfy_quant"]
    got, path = _roundtrip(tmp_path, tensors, meta)
    assert set(got) == {"blk.0.proj.weight", "blk.0.proj.bias"}
    qt = got["blk.0.proj.weight"]
    assert isinstance(qt, ditq.QuantizedTensor) and qt.format == ditq_format and qt.dtype == torch.bfloat16, seed
    assert torch.equal(qt.dequantize(torch.float32), deq), seed  # the same numbers ComfyUI computes
    assert torch.equal(got["blk.0.proj.bias"], tensors["blk.0.proj.bias"])
    with open_checkpoint(path) as ck:
        lay = L.scan(ck)
        assert lay.kind == "comfy" and [e.key for e in lay.quantized] == ["blk.0.proj.weight"]


def test_partial_block_grid_of_other_tools_loads_dequantized(tmp_path):
    gen, seed = fresh_gen()
    w = rand((200, 300), gen, torch.float32)
    s = torch.rand(2, 3, generator=gen) * 0.01 + 1e-3  # ceil(200/128) x ceil(300/128) blocks
    s_full = s.repeat_interleave(128, 0)[:200].repeat_interleave(128, 1)[:, :300]
    q = torch.round(w / s_full).clamp(-127, 127).to(torch.int8)
    tensors = {"p.weight": q, "p.weight_scale": s, "p.comfy_quant": comfy_bytes({"format": "int8_blockwise", "group_size": 128})}
    got, _ = _roundtrip(tmp_path, tensors, dtype=torch.float32)
    assert not isinstance(got["p.weight"], ditq.QuantizedTensor)
    assert torch.equal(got["p.weight"], q.float() * s_full), seed


def test_reads_legacy_scaled_fp8(tmp_path):
    gen, seed = fresh_gen()
    a, deq_a = legacy_fp8_layer("double_blocks.0.img_attn.qkv", rand((384, 256), gen), input_scale=0.5)
    b, deq_b = legacy_fp8_layer("double_blocks.0.img_mlp.0", rand((256, 256), gen), input_scale=1.0, scale_shape=(1,))
    tensors = {**a, **b, "scaled_fp8": torch.zeros(0, dtype=torch.float8_e4m3fn), "img_in.weight": rand((256, 64), gen)}
    got, path = _roundtrip(tmp_path, tensors)
    assert set(got) == {
        "double_blocks.0.img_attn.qkv.weight", "double_blocks.0.img_mlp.0.weight", "img_in.weight",
        "double_blocks.0.img_attn.qkv.input_scale",  # scale_input renamed; the 1.0 one dropped, as ComfyUI does
    }
    for key, deq in (("double_blocks.0.img_attn.qkv.weight", deq_a), ("double_blocks.0.img_mlp.0.weight", deq_b)):
        assert got[key].format == "fp8-tensor"
        assert torch.equal(got[key].dequantize(torch.float32), deq), seed
    assert float(got["double_blocks.0.img_attn.qkv.input_scale"]) == 0.5
    with open_checkpoint(path) as ck:
        lay = L.scan(ck)
        assert lay.kind == "legacy-scaled-fp8" and len(lay.skipped_input_scales) == 1


@pytest.mark.parametrize(
    "conf, match",
    [
        # rotated variants ditq does not implement (rotated int8_tensorwise with 16/64/256 loads: test_convert_rotation)
        ({"format": "float8_e4m3fn", "convrot": True, "convrot_groupsize": 256}, "convrot"),
        ({"format": "int8_tensorwise", "convrot": True, "convrot_groupsize": 4}, "convrot_groupsize 4"),
        ({"format": "int8_tensorwise", "params": {"convrot": True, "convrot_groupsize": 1024}}, "convrot_groupsize 1024"),
        ({"format": "float8_e5m2"}, "float8_e5m2"),
        ({"format": "nvfp4"}, "nvfp4"),
        ({"format": "int8_blockwise", "group_size": 64}, "group_size 64"),
    ],
)
def test_refuses_formats_ditq_does_not_implement(tmp_path, conf, match):
    gen, _ = fresh_gen()
    q, s = F.quantize_weight_ref(rand((256, 256), gen), "int8-row")
    tensors = {"l.weight": q, "l.weight_scale": s, "l.comfy_quant": comfy_bytes(conf)}
    path = save(tmp_path / "u.safetensors", tensors)
    with pytest.raises(UnsupportedFormatError, match=match) as e:
        list(L.iter_layers(path))
    assert "l.weight" in str(e.value) and str(path) in str(e.value)


def test_refuses_legacy_e5m2(tmp_path):
    gen, _ = fresh_gen()
    t, _ = legacy_fp8_layer("l", rand((128, 128), gen))
    t["scaled_fp8"] = torch.zeros(0, dtype=torch.float8_e5m2)
    with pytest.raises(UnsupportedFormatError, match="e5m2"):
        list(L.iter_layers(save(tmp_path / "e.safetensors", t)))


def test_inconsistent_files(tmp_path):
    gen, _ = fresh_gen()
    tensors, _, _ = comfy_layer("l", rand((256, 256), gen), "int8_tensorwise")
    cases = {
        "missing scale": {k: v for k, v in tensors.items() if not k.endswith("weight_scale")},
        "wrong scale shape": {**tensors, "l.weight_scale": torch.ones(3, 1)},
        "wrong storage": {**tensors, "l.weight": tensors["l.weight"].to(torch.bfloat16)},
        "no weight": {k: v for k, v in tensors.items() if not k.endswith(".weight")},
        "int scale": {**tensors, "l.weight_scale": torch.ones(256, 1, dtype=torch.int32)},
    }
    matches = {"missing scale": "weight_scale' is missing", "wrong scale shape": r"\[3, 1\]",
               "wrong storage": "bfloat16", "no weight": "no tensor 'l.weight'", "int scale": "int32"}
    for name, t in cases.items():
        path = save(tmp_path / f"{name.replace(' ', '_')}.safetensors", t)
        with pytest.raises(CheckpointError, match=matches[name]):
            list(L.iter_layers(path))


def test_plain_file_yields_tensors_in_file_order(tmp_path):
    gen, _ = fresh_gen()
    tensors = {f"b{i}.weight": rand((8, 8), gen) for i in range(5)}
    got = list(L.iter_layers(save(tmp_path / "p.safetensors", tensors)))
    with open_checkpoint(tmp_path / "p.safetensors") as ck:
        assert [k for k, _ in got] == ck.names
    for k, v in got:
        assert torch.equal(v, tensors[k])
