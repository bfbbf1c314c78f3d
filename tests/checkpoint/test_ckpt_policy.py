"""Presets, family detection and per-layer decisions."""

import re

import pytest
import torch

from checkpoint.fixtures_ckpt import fresh_gen
from ditq import formats as F
from ditq.checkpoint.policy import FAMILY_KEEP, PRESETS, Policy, detect_family, outlier_ratio
from ditq.errors import FormatError

BF16 = torch.bfloat16

# key names as the original releases and diffusers spell them (a few per family)
BFL_FLUX = ["double_blocks.0.img_attn.qkv.weight", "double_blocks.0.img_mod.lin.weight", "single_blocks.0.linear1.weight",
            "single_blocks.0.modulation.lin.weight", "img_in.weight", "txt_in.weight", "time_in.in_layer.weight",
            "vector_in.in_layer.weight", "guidance_in.in_layer.weight", "final_layer.linear.weight"]
WAN = ["blocks.0.self_attn.q.weight", "blocks.0.ffn.0.weight", "text_embedding.0.weight", "time_embedding.0.weight",
       "time_projection.1.weight", "head.head.weight", "patch_embedding.weight", "blocks.0.modulation"]
HUNYUAN = ["double_blocks.0.img_attn_qkv.weight", "txt_in.individual_token_refiner.blocks.0.mlp.fc1.weight",
           "img_in.proj.weight", "vision_in.proj.0.weight", "double_blocks.0.img_attn_k_norm.weight"]
SD3 = ["joint_blocks.0.x_block.attn.qkv.weight", "joint_blocks.0.x_block.adaLN_modulation.1.weight",
       "x_embedder.proj.weight", "t_embedder.mlp.0.weight", "context_embedder.weight", "final_layer.linear.weight"]
T5 = ["shared.weight", "encoder.block.0.layer.0.SelfAttention.q.weight", "encoder.final_layer_norm.weight",
      "decoder.block.0.layer.0.SelfAttention.q.weight", "lm_head.weight"]
FLUX2 = ["double_blocks.0.img_attn.qkv.weight", "double_stream_modulation_img.lin.weight", "img_in.weight"]
KANDINSKY = ["visual_transformer_blocks.0.visual_modulation.out_layer.weight", "time_embeddings.in_layer.weight",
             "visual_transformer_blocks.0.self_attention.to_query.weight", "out_layer.out_layer.weight"]


@pytest.mark.parametrize(
    "keys, family",
    [(BFL_FLUX, "flux"), (WAN, "wan"), (HUNYUAN, "hunyuanvideo"), (SD3, "sd3"), (T5, "t5xxl"), (FLUX2, "flux2"),
     (KANDINSKY, "kandinsky5"), (["model.diffusion_model." + k for k in BFL_FLUX], "flux"),
     (["layers.0.mlp.weight", "layers.0.attn.weight"], "generic")],
)
def test_detect_family_from_original_names(keys, family):
    assert detect_family(keys) == family


def _diffusers_keys(cls_name, **cfg):
    diffusers = pytest.importorskip("diffusers")
    with torch.device("meta"):
        model = getattr(diffusers, cls_name)(**cfg)
    return {k: tuple(v.shape) for k, v in model.state_dict().items()}


DIFFUSERS = [
    ("FluxTransformer2DModel", dict(num_layers=1, num_single_layers=1), "flux"),
    ("Flux2Transformer2DModel", dict(num_layers=1, num_single_layers=1), "flux2"),
    ("WanTransformer3DModel", dict(num_layers=1), "wan"),
    ("HunyuanVideoTransformer3DModel", dict(num_layers=1, num_single_layers=1, num_refiner_layers=1), "hunyuanvideo"),
    ("SD3Transformer2DModel", dict(num_layers=1), "sd3"),
    ("Kandinsky5Transformer3DModel", dict(num_text_blocks=1, num_visual_blocks=1), "kandinsky5"),
]


@pytest.mark.parametrize("cls_name, cfg, family", DIFFUSERS)
def test_presets_on_diffusers_models(cls_name, cfg, family):
    shapes = _diffusers_keys(cls_name, **cfg)
    pol = Policy("int8-row", "auto", list(shapes), min_elements=0)
    assert pol.preset == family and pol.detected
    decisions = {k: pol.decide(k, s, BF16) for k, s in shapes.items()}
    quantized = [k for k, d in decisions.items() if d.quantize]
    # every quantized tensor is a 2-D .weight; every 2-D weight inside a transformer block's attention
    # projections is quantized; norms and the model's last projection are not
    assert quantized and all(k.endswith(".weight") and len(shapes[k]) == 2 for k in quantized)
    attn = [k for k in shapes if re.search(r"blocks\.0\.(attn|attn1|self_attention)\.(to_q|to_query)\.weight$", k)]
    assert attn and all(decisions[k].quantize for k in attn), attn
    for k, d in decisions.items():
        if len(shapes[k]) == 1:
            assert d.action == "keep"
        if re.match(r"(proj_out|out_layer\.out_layer|norm_out\.linear)\.weight$", k):
            assert d.action == "keep" and "preset" in d.reason, k
    if family == "flux":  # the big per-block proj_out is quantized, only the top-level one is kept
        assert decisions["single_transformer_blocks.0.proj_out.weight"].quantize
    if family == "kandinsky5":  # _keep_in_fp32_modules are written in fp32
        mod = [k for k in shapes if "modulation" in k and k.endswith(".weight")]
        assert mod and all(decisions[k].out_dtype == torch.float32 for k in mod)


def test_bfl_flux_keeps_first_last_modulation_and_time_layers():
    pol = Policy("int8-row", "flux", min_elements=0)
    decide = {k: pol.decide(k, (256, 256), BF16) for k in BFL_FLUX}
    assert decide["double_blocks.0.img_attn.qkv.weight"].quantize
    assert decide["single_blocks.0.linear1.weight"].quantize
    for k in BFL_FLUX[3:] + ["double_blocks.0.img_mod.lin.weight"]:
        assert decide[k].action == "keep", k


def test_t5_drops_decoder_and_lm_head():
    pol = Policy("int8-row", "auto", T5, min_elements=0)
    acts = {k: pol.decide(k, (256, 256), BF16).action for k in T5}
    assert acts == {"shared.weight": "keep", "encoder.block.0.layer.0.SelfAttention.q.weight": "quantize",
                    "encoder.final_layer_norm.weight": "keep", "decoder.block.0.layer.0.SelfAttention.q.weight": "drop",
                    "lm_head.weight": "drop"}


def test_include_exclude_and_order():
    pol = Policy("int8-row", "flux", include=[r"img_in"], exclude=[r"qkv", r"img_in\.bias"], min_elements=0)
    d = pol.decide("img_in.weight", (256, 64), BF16)
    assert d.quantize and "--include" in d.reason
    assert pol.decide("double_blocks.0.img_attn.qkv.weight", (256, 256), BF16).action == "keep"
    d = pol.decide("img_in.bias", (256,), BF16)
    assert d.action == "keep" and "--exclude" in d.reason
    with pytest.raises(FormatError, match="regular expression"):
        Policy(include=["("])
    with pytest.raises(FormatError, match="preset"):
        Policy(preset="sdxl")
    with pytest.raises(FormatError, match="keep-dtype"):
        Policy(keep_dtype="int4")


def test_reasons_for_kept_tensors():
    pol = Policy("int8-block", "generic", min_elements=20000, keep_dtype="fp16")
    cases = {
        ("a.weight", (256,), BF16): "1-D tensor",
        ("conv.weight", (256, 16, 2, 2), BF16): "4-D tensor",
        ("a.table", (256, 256), BF16): "not a .weight",
        ("emb.weight", (256, 256), torch.int64): "dtype int64",
        ("small.weight", (128, 128), BF16): "< 20000 elements",
        ("odd.weight", (200, 384), BF16): "needs dims % 128",
        ("blk.norm.weight", (256, 256), BF16): "preset generic: 'norm'",
    }
    for (name, shape, dtype), reason in cases.items():
        d = pol.decide(name, shape, dtype)
        assert d.action == "keep" and reason in d.reason, (name, d)
        assert d.out_dtype == (torch.float16 if dtype.is_floating_point else None)
    assert pol.decide("ok.weight", (256, 384), BF16).quantize
    assert Policy("int8-row", "generic", min_elements=0).decide("odd.weight", (200, 384), BF16).quantize


def test_every_preset_is_constructible():
    for p in PRESETS:
        Policy("fp8-row", p, keys=BFL_FLUX)
    assert set(FAMILY_KEEP) == set(PRESETS) - {"auto"}


def _outlier_ratio_loops(w, fmt):
    """Straightforward restatement: max over scale groups of amax / rms."""
    f = F.get_format(fmt)
    n, k = w.shape
    if f.weight_granularity == "tensor":
        groups = [w.flatten()]
    elif f.weight_granularity == "row":
        groups = [w[i] for i in range(n)]
    else:
        groups = [w[i:i + 128, j:j + 128].flatten() for i in range(0, n, 128) for j in range(0, k, 128)]
    return max(float(g.abs().max() / g.pow(2).mean().sqrt()) for g in groups)


@pytest.mark.parametrize("fmt", list(F.FORMATS))
def test_outlier_ratio(fmt):
    gen, seed = fresh_gen()
    w = torch.randn(256, 384, generator=gen, dtype=torch.float64)
    base = outlier_ratio(w, fmt)
    assert base == pytest.approx(_outlier_ratio_loops(w, fmt), rel=1e-6), seed
    w[7, 11] = 500.0  # one outlier raises its group's ratio (to at most sqrt(group size))
    spiked = outlier_ratio(w, fmt)
    assert spiked == pytest.approx(_outlier_ratio_loops(w, fmt), rel=1e-6) and spiked > 3 * base, seed
