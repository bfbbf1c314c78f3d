"""enable_int8_attention / disable_int8_attention on tiny diffusers transformers (random weights, bf16,
CPU through the Triton interpreter): the swap happens, the output stays close, disabling restores the
exact original, the step policy picks the right steps, and a CFG batch runs in one launch."""

import pytest
import torch

pytest.importorskip("diffusers")
import diffusers  # noqa: E402

import ditq.attn as A  # noqa: E402
from ditq.errors import DitqError  # noqa: E402
from ditq.nn.attention import disable_int8_attention, enable_int8_attention, key_padding_from_mask  # noqa: E402

DEV = "cuda" if torch.cuda.is_available() else "cpu"
DT = torch.bfloat16


def _flux(B=1):
    m = diffusers.FluxTransformer2DModel(
        patch_size=1, in_channels=16, num_layers=1, num_single_layers=1, attention_head_dim=32,
        num_attention_heads=2, joint_attention_dim=32, pooled_projection_dim=16, axes_dims_rope=(4, 14, 14),
    )
    n_img, n_txt = 64, 8
    ids = torch.stack(torch.meshgrid(torch.zeros(1), torch.arange(8.0), torch.arange(8.0), indexing="ij"), -1)
    x = dict(
        hidden_states=torch.randn(B, n_img, 16), encoder_hidden_states=torch.randn(B, n_txt, 32),
        pooled_projections=torch.randn(B, 16), timestep=torch.full((B,), 0.5),
        img_ids=ids.reshape(-1, 3), txt_ids=torch.zeros(n_txt, 3),
    )
    return m, x


def _wan(B=1):
    m = diffusers.WanTransformer3DModel(
        patch_size=(1, 2, 2), num_attention_heads=2, attention_head_dim=32, in_channels=4, out_channels=4,
        text_dim=32, freq_dim=32, ffn_dim=64, num_layers=1, rope_max_seq_len=32,
    )
    x = dict(hidden_states=torch.randn(B, 4, 2, 8, 8), timestep=torch.full((B,), 500.0),
             encoder_hidden_states=torch.randn(B, 8, 32))
    return m, x


def _sd3(B=1):
    m = diffusers.SD3Transformer2DModel(
        sample_size=8, patch_size=2, in_channels=4, num_layers=1, attention_head_dim=32, num_attention_heads=2,
        joint_attention_dim=32, caption_projection_dim=64, pooled_projection_dim=16, out_channels=4,
        pos_embed_max_size=16,
    )
    x = dict(hidden_states=torch.randn(B, 4, 8, 8), encoder_hidden_states=torch.randn(B, 8, 32),
             pooled_projections=torch.randn(B, 16), timestep=torch.full((B,), 500.0))
    return m, x


def _hunyuan(B=1):
    m = diffusers.HunyuanVideoTransformer3DModel(
        in_channels=4, out_channels=4, num_attention_heads=2, attention_head_dim=32, num_layers=1,
        num_single_layers=1, num_refiner_layers=1, patch_size=2, patch_size_t=1, text_embed_dim=32,
        pooled_projection_dim=16, rope_axes_dim=(8, 12, 12),
    )
    mask = torch.ones(B, 8, dtype=torch.long)
    mask[-1, 5:] = 0  # the last prompt is shorter: text padding, a key-padding mask in the joint attention
    x = dict(hidden_states=torch.randn(B, 4, 1, 8, 8), timestep=torch.full((B,), 500.0),
             encoder_hidden_states=torch.randn(B, 8, 32), encoder_attention_mask=mask,
             pooled_projections=torch.randn(B, 16), guidance=torch.full((B,), 3500.0))
    return m, x


def _kandinsky(B=1):
    m = diffusers.Kandinsky5Transformer3DModel(
        in_visual_dim=4, in_text_dim=32, in_text_dim2=16, time_dim=32, out_visual_dim=4, patch_size=(1, 2, 2),
        model_dim=64, ff_dim=128, num_text_blocks=1, num_visual_blocks=1, axes_dims=(8, 12, 12),
    )
    x = dict(hidden_states=torch.randn(B, 2, 8, 8, 4), encoder_hidden_states=torch.randn(B, 8, 32),
             pooled_projections=torch.randn(B, 16), timestep=torch.full((B,), 500.0),
             visual_rope_pos=[torch.arange(2), torch.arange(4), torch.arange(4)], text_rope_pos=torch.arange(8),
             scale_factor=(1.0, 1.0, 1.0))
    return m, x


MODELS = {"flux": _flux, "wan": _wan, "sd3": _sd3, "hunyuan-video": _hunyuan, "kandinsky5": _kandinsky}


def build(name, B=1, seed=0):
    torch.manual_seed(seed)
    m, x = MODELS[name](B)
    m = m.to(DEV, DT).eval()
    keep = getattr(m, "_keep_in_fp32_modules", None) or []  # what from_pretrained(torch_dtype=) does
    for name, sub in m.named_modules():
        if any(k in name.split(".") for k in keep):
            sub.float()
    x = {k: (v.to(DEV, DT) if torch.is_tensor(v) and v.is_floating_point() else
             v.to(DEV) if torch.is_tensor(v) else [t.to(DEV) for t in v] if isinstance(v, list) else v)
         for k, v in x.items()}
    return m, x


def run(m, x):
    with torch.no_grad():
        out = m(**x, return_dict=False)[0]
    return out.float()


def cos(a, b):
    return torch.nn.functional.cosine_similarity(a.flatten().double(), b.flatten().double(), dim=0).item()


@pytest.mark.parametrize("name", list(MODELS))
def test_swap_and_restore(name):
    m, x = build(name)
    ref = run(m, x)
    policy = enable_int8_attention(m, pv="bf16")
    out = run(m, x)
    assert policy.calls["int8"] > 0, f"{name}: no attention call went to ditq ({policy.calls})"
    assert torch.isfinite(out).all()
    assert cos(out, ref) >= 0.999, f"{name}: cos {cos(out, ref)}"
    disable_int8_attention(m)
    assert torch.equal(run(m, x), ref), f"{name}: disabling did not restore the original attention"


@pytest.mark.parametrize("how", ["model", "blocks"])
def test_compiles_without_graph_breaks(how):
    # the policy of the call in flight reaches compiled code through a global (Dynamo cannot read a ContextVar):
    # a whole-model compile traces the hooks too, a regional one (diffusers' compile_repeated_blocks) does not
    m, x = build("flux")
    ref = run(m, x)
    enable_int8_attention(m, pv="fp8")
    eager = run(m, x)
    assert not torch.equal(eager, ref)
    torch._dynamo.reset()
    if how == "model":
        compiled = torch.compile(m, fullgraph=True, backend="aot_eager")
    else:
        compiled = m
        for block in [*m.transformer_blocks, *m.single_transformer_blocks]:
            block.compile(fullgraph=True, backend="aot_eager")
    out = run(compiled, x)  # (compiled graphs do not count calls: a counter would recompile them)
    # ditq's attention ran in the graph: its output is far closer to eager ditq than to the SDPA output
    assert (out - eager).abs().max() <= 0.1 * (ref - eager).abs().max(), ((out - eager).abs().max(), (ref - eager).abs().max())
    disable_int8_attention(m)
    back = run(compiled, x)  # the guard on the policy sends the call to a full-precision graph
    assert cos(back, ref) > 0.99999 and not torch.allclose(back, eager, rtol=0, atol=1e-6)
    if how == "blocks":
        for block in [*m.transformer_blocks, *m.single_transformer_blocks]:
            block._compiled_call_impl = None


def test_fp8_and_reenable_replaces_options():
    m, x = build("flux")
    ref = run(m, x)
    enable_int8_attention(m, pv="bf16")
    p = enable_int8_attention(m, pv="fp8")  # replaces, does not stack hooks
    out = run(m, x)
    assert p.pv == "fp8" and p.calls["int8"] == 2  # one joint block + one single block
    assert cos(out, ref) >= 0.995
    disable_int8_attention(m)


class _Sched:
    """The two things the step policy reads from a diffusers scheduler."""

    def __init__(self, n):
        self.timesteps = torch.linspace(1000, 0, n)
        self.step_index = None


def test_step_policy_and_its_effect():
    """steps=(0, -1): 8-bit for every step but the last; the last step runs the original attention."""
    m, x = build("flux")
    sched = _Sched(4)
    p = enable_int8_attention(m, pv="fp8", steps=(0, -1), scheduler=sched)
    per_step, outs = [], []
    for i in range(4):
        sched.step_index = None if i == 0 else i
        before = p.calls["int8"]
        outs.append(run(m, x))
        per_step.append(p.calls["int8"] - before)
    assert per_step == [2, 2, 2, 0], per_step
    disable_int8_attention(m)
    ref = run(m, x)
    assert torch.equal(outs[3], ref)  # the full-precision step is the original computation
    assert cos(outs[0], ref) >= 0.995 and not torch.equal(outs[0], ref)


def test_fractional_steps_and_timestep_range():
    m, x = build("wan")
    sched = _Sched(10)
    p = enable_int8_attention(m, steps=(0.0, 0.5), scheduler=sched)
    sched.step_index = 4
    run(m, x)
    n = p.calls["int8"]
    sched.step_index = 5
    run(m, x)
    assert n > 0 and p.calls["int8"] == n
    p = enable_int8_attention(m, timestep_range=(400, 1000))
    run(m, x)  # timestep 500: inside
    n = p.calls["int8"]
    run(m, {**x, "timestep": torch.full((1,), 100.0, device=DEV, dtype=DT)})
    assert n > 0 and p.calls["int8"] == n
    disable_int8_attention(m)


def test_cfg_batch_in_one_launch(monkeypatch):
    """cond + uncond with different prompt lengths: one launch per attention for the pair, and each half
    equals running it alone."""
    m, x = build("hunyuan-video", B=2)
    launches = []
    real = A.attention

    def spy(q, *a, **k):
        launches.append(q.shape[0])
        return real(q, *a, **k)

    monkeypatch.setattr(A, "attention", spy)
    enable_int8_attention(m, pv="bf16")
    both = run(m, x)
    assert launches and all(b == 2 for b in launches), launches
    for i in range(2):
        xi = {k: (v[i:i + 1] if torch.is_tensor(v) and v.dim() > 0 and v.shape[0] == 2 else v) for k, v in x.items()}
        assert cos(run(m, xi), both[i:i + 1]) >= 0.9999
    disable_int8_attention(m)


def test_key_padding_from_mask():
    keep = torch.rand(2, 7) > 0.3
    assert torch.equal(key_padding_from_mask(keep[:, None, None, :], 2, 7), keep)
    assert torch.equal(key_padding_from_mask(keep[:1], 2, 7), keep[:1].expand(2, 7))
    assert key_padding_from_mask(torch.ones(2, 1, 7, 7, dtype=torch.bool), 2, 7) is None  # per-query mask
    assert key_padding_from_mask(torch.zeros(2, 1, 1, 7), 2, 7) is None  # additive float mask
    assert key_padding_from_mask(keep, 2, 8) is None


def test_errors():
    m, _ = build("flux")
    with pytest.raises(DitqError, match="scheduler"):
        enable_int8_attention(m, steps=(0, -1))
    with pytest.raises(DitqError, match="pv"):
        enable_int8_attention(m, pv="int4")
    with pytest.raises(DitqError, match="pipeline"):
        enable_int8_attention(object())
    with pytest.raises(DitqError, match="not supported"):
        enable_int8_attention(torch.nn.Linear(2, 2))
