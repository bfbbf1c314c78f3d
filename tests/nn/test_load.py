"""load_quantized: files written the way ComfyUI / convert-to-quant / legacy tools write them (built here
with safetensors directly, not with ditq's writer) fill a meta skeleton and run like quantize_."""

import json

import pytest
import torch
import torch.nn as nn
from safetensors.torch import save_file

import ditq
from ditq import formats as F
from ditq.errors import CheckpointError
from ditq.nn import empty_weights
from ditq.tensor import QuantizedTensor

from .test_quantize import TinyDiT

COMFY = {"int8-row": "int8_tensorwise", "int8-block": "int8_blockwise", "fp8-row": "float8_e4m3fn_rowwise", "fp8-tensor": "float8_e4m3fn"}


def _conf_tensor(conf):
    return torch.tensor(list(json.dumps(conf).encode()), dtype=torch.uint8)


def _comfy_file(model, path, fmt, prefix="model.diffusion_model.", header=False):
    """Quantize every block linear of ``model`` the way a ComfyUI file stores it; the rest as bf16."""
    sd, layers = {}, {}
    for name, t in model.state_dict().items():
        layer = name[: -len(".weight")]
        if name.endswith(".weight") and t.dim() == 2 and "blocks" in name:
            q, s = F.quantize_weight_ref(t, fmt)
            conf = {"format": COMFY[fmt]}
            if fmt == "int8-block":
                conf["group_size"] = 128
            if fmt == "fp8-row":
                s = s.reshape(-1)  # float8_e4m3fn_rowwise stores [N]
            elif fmt == "fp8-tensor":
                s = s.reshape(())
            sd[prefix + name] = q
            sd[prefix + layer + ".weight_scale"] = s
            if header:
                layers[prefix + layer] = conf
            else:
                sd[prefix + layer + ".comfy_quant"] = _conf_tensor(conf)
        else:
            sd[prefix + name] = t.to(torch.bfloat16)
    meta = {"_quantization_metadata": json.dumps({"format_version": "1.0", "layers": layers})} if header else None
    save_file(sd, str(path), metadata=meta)


def _skeleton():
    with empty_weights():
        m = TinyDiT()
    return m


@pytest.mark.parametrize("fmt,header", [("int8-row", False), ("fp8-row", True), ("int8-block", False), ("fp8-tensor", True)])
def test_comfy_file_fills_a_meta_skeleton(tmp_path, fmt, header):
    torch.manual_seed(0)
    src = TinyDiT().eval().to(torch.bfloat16)
    path = tmp_path / "model.safetensors"
    _comfy_file(src, path, fmt, header=header)
    m = _skeleton()
    assert m.transformer_blocks[0].to_q.weight.is_meta
    report = ditq.load_quantized(m, path)
    assert report.quantized == {fmt: 12} and not report.missing and not report.unexpected
    assert not any(p.is_meta for p in m.parameters())
    w = m.transformer_blocks[1].ff[2].weight
    assert isinstance(w, QuantizedTensor) and w.format == fmt and w.dtype == torch.bfloat16 and not w.requires_grad
    assert m.x_embedder.weight.dtype == torch.bfloat16  # unquantized tensors load as stored
    # same weights as quantizing the float model at run time
    ref = TinyDiT().eval().to(torch.bfloat16)
    ref.load_state_dict(src.state_dict())
    ditq.quantize_(ref, fmt, include=r"blocks", exclude=[r"norm"])
    x = torch.randn(2, 11, 64, dtype=torch.bfloat16)
    with torch.no_grad():
        assert F.relative_error(m(x), ref(x)) < 1e-3
        exact = m.transformer_blocks[1].ff[2].weight
        assert torch.equal(exact.qdata, ref.transformer_blocks[1].ff[2].weight.qdata)
    assert "quantized layers" in report.summary()


def test_legacy_scaled_fp8_file(tmp_path):
    torch.manual_seed(1)
    src = TinyDiT().eval()
    sd = {"scaled_fp8": torch.zeros(2, dtype=torch.float8_e4m3fn)}
    for name, t in src.state_dict().items():
        if name.endswith(".weight") and t.dim() == 2 and "blocks" in name:
            q, s = F.quantize_weight_ref(t, "fp8-tensor")
            sd[name] = q
            sd[name[: -len(".weight")] + ".scale_weight"] = s.reshape(())
            sd[name[: -len(".weight")] + ".scale_input"] = torch.ones(())
        else:
            sd[name] = t.to(torch.bfloat16)
    path = tmp_path / "legacy.safetensors"
    save_file(sd, str(path))
    m = _skeleton()
    report = ditq.load_quantized(m, path, dtype=torch.float32)
    assert report.layout == "legacy-scaled-fp8" and report.quantized == {"fp8-tensor": 12}
    assert m.proj_out.weight.dtype == torch.float32 and m.transformer_blocks[0].to_q.weight.dtype == torch.float32
    x = torch.randn(3, 64)
    with torch.no_grad():
        y, r = m(x), src(x)
    assert F.relative_error(y, r) < 0.1 and torch.isfinite(y).all()


def test_strict_mismatch_is_refused_before_reading(tmp_path):
    torch.manual_seed(2)
    src = TinyDiT().eval()
    path = tmp_path / "m.safetensors"
    _comfy_file(src, path, "int8-row", prefix="")
    small = TinyDiT(depth=1)
    with pytest.raises(CheckpointError, match="does not match"):
        ditq.load_quantized(small, path)
    assert small.transformer_blocks[0].to_q.weight.dtype == torch.float32  # untouched
    report = ditq.load_quantized(small, path, strict=False)
    assert report.unexpected and all("transformer_blocks.1" in k for k in report.unexpected)
    wrong = TinyDiT(d=128)
    with pytest.raises(CheckpointError, match="shape"):
        ditq.load_quantized(wrong, path)


def test_key_map_and_device(tmp_path):
    torch.manual_seed(3)
    src = TinyDiT().eval()
    path = tmp_path / "m.safetensors"
    _comfy_file(src, path, "fp8-row", prefix="net.blocks_are_renamed.")
    m = _skeleton()
    report = ditq.load_quantized(m, path, key_map=lambda k: k.replace("net.blocks_are_renamed.", ""), device="cpu")
    assert report.quantized == {"fp8-row": 12} and m.proj_out.weight.device.type == "cpu"


def test_rotated_int8_loads_as_a_rotated_layer(tmp_path):
    """A ComfyUI ConvRot layer (weight rotated by H_g per group of K, then int8 per row) loads as a rotated
    QuantizedTensor whose linear equals x @ W^T within int8-row error."""
    torch.manual_seed(4)
    src = TinyDiT().eval()
    sd = dict(src.state_dict())
    w = src.transformer_blocks[0].to_q.weight.data
    g = 64
    q, s = F.quantize_weight_ref(F.rotate(w, g), "int8-row")
    sd["transformer_blocks.0.to_q.weight"] = q
    sd["transformer_blocks.0.to_q.weight_scale"] = s
    sd["transformer_blocks.0.to_q.comfy_quant"] = _conf_tensor(
        {"format": "int8_tensorwise", "convrot": True, "convrot_groupsize": g})
    path = tmp_path / "rot.safetensors"
    save_file(sd, str(path))
    m = _skeleton()
    ditq.load_quantized(m, path)
    qw = m.transformer_blocks[0].to_q.weight
    assert isinstance(qw, ditq.QuantizedTensor) and qw.rotation == g
    assert torch.equal(qw.qdata, q)
    x = torch.randn(3, w.shape[1])
    y = torch.nn.functional.linear(x, qw)
    assert F.relative_error(y, x.double() @ w.double().t()) < 0.025


def test_quantized_weight_for_a_non_linear_is_refused(tmp_path):
    m = nn.Sequential(nn.Conv1d(128, 128, 1))
    q, s = F.quantize_weight_ref(torch.randn(128, 128), "int8-row")
    path = tmp_path / "c.safetensors"
    save_file({"0.weight": q, "0.weight_scale": s, "0.comfy_quant": _conf_tensor({"format": "int8_tensorwise"}),
               "0.bias": torch.zeros(128)}, str(path))
    with pytest.raises(CheckpointError, match="shape|nn.Linear"):
        ditq.load_quantized(m, path)


def test_empty_weights_keeps_buffers_real():
    class WithBuffer(nn.Module):
        def __init__(self):
            super().__init__()
            self.lin = nn.Linear(4, 4)
            self.register_buffer("freqs", torch.arange(4.0), persistent=False)

    with empty_weights():
        m = WithBuffer()
    assert m.lin.weight.is_meta and not m.freqs.is_meta and torch.equal(m.freqs, torch.arange(4.0))
    assert not nn.Linear(2, 2).weight.is_meta  # the patch is gone
