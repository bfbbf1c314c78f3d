"""`ditq calibrate`: input statistics of every linear layer, captured with hooks from real forwards of a
(tiny) diffusers transformer, checked against the rows the layers actually saw."""

import pytest
import torch
from torch import nn

from ditq import formats as F
from ditq import rounding as R
from ditq.cli import main as cli_main
from ditq.convert.calibrate import capture_calibration, random_inputs

diffusers = pytest.importorskip("diffusers")


def tiny_flux(seed=0):
    torch.manual_seed(seed)
    return diffusers.FluxTransformer2DModel(
        patch_size=1, in_channels=16, num_layers=1, num_single_layers=1, attention_head_dim=32,
        num_attention_heads=4, joint_attention_dim=64, pooled_projection_dim=32, axes_dims_rope=(4, 12, 16),
    )


def record_inputs(model, batches):
    """Every input row of every nn.Linear, by module name (the truth the statistics must match)."""
    rows, handles = {}, []
    for name, mod in model.named_modules():
        if isinstance(mod, nn.Linear):
            handles.append(mod.register_forward_pre_hook(
                lambda m, a, n=name: rows.setdefault(n, []).append(a[0].detach().reshape(-1, a[0].shape[-1]).double())))
    with torch.no_grad():
        for b in batches:
            model(**b)
    for h in handles:
        h.remove()
    return {n: torch.cat(r) for n, r in rows.items()}


@pytest.fixture(scope="module")
def flux_case():
    model = tiny_flux(int(torch.randint(0, 1000, ()).item()))
    batches = random_inputs(model, (0.9, 0.5, 0.1), batches=2, tokens=64, text_tokens=16, seed=1)
    return model, batches, record_inputs(model, batches)


def test_every_linear_is_captured_and_qkv_share_stats(flux_case):
    model, batches, truth = flux_case
    stats = capture_calibration(model, batches, sample_rows=0)
    linears = {n for n, m in model.named_modules() if isinstance(m, nn.Linear)}
    assert set(stats.names()) == linears
    # to_q / to_k / to_v read one tensor: one set of statistics
    assert stats.aliases["transformer_blocks.0.attn.to_k"] == "transformer_blocks.0.attn.to_q"
    assert stats.aliases["transformer_blocks.0.attn.add_v_proj"] == "transformer_blocks.0.attn.add_q_proj"
    for name in linears:
        st, x = stats.get(name), truth[name]
        assert st.count == x.shape[0] and st.sample is None
        assert torch.allclose(st.mean.double(), x.mean(0), rtol=1e-4, atol=1e-5)
        ref = x.t() @ x / x.shape[0]
        assert F.relative_error(st.moment, ref) < 1e-5, name


def test_heldout_rows_are_kept_out_of_the_moment(flux_case):
    model, batches, truth = flux_case
    stats = capture_calibration(model, batches, sample_rows=48, seed=3)
    name = "transformer_blocks.0.ff.net.0.proj"
    st, x = stats.get(name), truth[name]
    assert st.sample.shape == (48, x.shape[1])
    assert st.count + 48 == x.shape[0]  # 48 of 6 x 8 diverted rows, none lost, none counted twice
    # the sample rows are real input rows, and the moment is exactly that of all the others
    d = torch.cdist(st.sample.double(), x).min(1).values
    assert float(d.max()) < 1e-4
    held = torch.cdist(x, st.sample.double()).min(1).values < 1e-6
    rest = x[~held]
    assert rest.shape[0] == st.count
    assert F.relative_error(st.moment, rest.t() @ rest / rest.shape[0]) < 1e-5
    # layers called with one token per forward (timestep embedders) keep every row in the moment
    assert stats.get("time_text_embed.timestep_embedder.linear_1").sample is None


def test_wide_layers_get_a_faithful_low_rank_summary():
    torch.manual_seed(0)
    k = 320
    net = nn.Sequential(nn.Linear(k, 64), nn.ReLU(), nn.Linear(64, 8))
    mix = torch.randn(12, k)
    batches = [torch.randn(256, 12) @ mix + 0.01 * torch.randn(256, k) + 1.5 for _ in range(4)]
    stats = capture_calibration(net, batches, max_full_k=256, sketch_rank=24, sample_rows=0)
    st = stats.get("0")
    assert st.summary == "lowrank" and st.eigvecs.shape == (k, 24)
    x = torch.cat(batches).double()
    ref = x.t() @ x / x.shape[0]
    h = st.hessian(dtype=torch.float64)
    assert torch.allclose(torch.diagonal(h), torch.diagonal(ref), rtol=1e-4)
    assert F.relative_error(h, ref) < 1e-3
    assert stats.get("2").summary == "full"


def test_a_layer_that_stops_sharing_gets_its_own_statistics():
    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.a, self.b = nn.Linear(16, 4), nn.Linear(16, 4)

        def forward(self, x, split=False):
            return self.a(x) + self.b(x * 2 if split else x)

    net = Net()
    xs = [torch.randn(32, 16) for _ in range(3)]
    batches = [dict(x=xs[0]), dict(x=xs[1]), dict(x=xs[2], split=True)]
    stats = capture_calibration(net, batches, sample_rows=0)
    assert "b" not in stats.aliases
    # 'a' (the owner) already took this forward's input when 'b' diverged: b's statistics restart, exact
    # for the rows they cover, and the file says they are partial
    xb = 2 * xs[2].double()
    assert stats.get("b").count == 32 and stats.meta["partial"] == ["b"]
    assert F.relative_error(stats.get("b").moment, xb.t() @ xb / 32) < 1e-5
    xa = torch.cat(xs).double()
    assert stats.get("a").count == 96 and F.relative_error(stats.get("a").moment, xa.t() @ xa / 96) < 1e-5


def test_learned_rounding_with_captured_stats_never_loses(flux_case):
    model, batches, truth = flux_case
    stats = capture_calibration(model, batches, sample_rows=96)
    for name in ("transformer_blocks.0.attn.to_k", "transformer_blocks.0.ff.net.0.proj",
                 "single_transformer_blocks.0.proj_out"):
        w = model.get_submodule(name).weight.detach()
        for fmt in ("int8-block", "fp8-tensor"):
            q, s, rep = R.round_layer(f"{name}.weight", w, fmt, stats, min_tokens=0.5)
            x = stats.get(name).sample.double()
            err = lambda wd: float((x @ (wd.double() - w.double()).t()).pow(2).mean())  # noqa: E731
            q0, s0 = F.quantize_weight_ref(w, fmt)
            assert err(F.dequantize_ref(q, s, fmt)) <= err(F.dequantize_ref(q0, s0, fmt))
            assert rep["objective"] in ("activation", "weight")


def test_cli_writes_a_file_convert_can_read(tmp_path, capsys):
    model = tiny_flux(1)
    folder = tmp_path / "flux"
    model.save_pretrained(folder)
    out = tmp_path / "cal.safetensors"
    rc = cli_main(["calibrate", str(folder), "-o", str(out), "--timesteps", "0.8,0.2", "--batches", "1",
                   "--tokens", "16", "--text-tokens", "8", "--dtype", "fp32", "--device", "cpu",
                   "--layers", "transformer_blocks.0.attn", "--sample-rows", "8"])
    assert rc == 0
    assert "wrote" in capsys.readouterr().out
    stats = R.load_calibration(out)
    assert stats.get("transformer_blocks.0.attn.to_v.weight") is not None
    assert stats.get("transformer_blocks.0.ff.net.2") is None  # not selected
    assert stats.get("single_transformer_blocks.0.attn.to_q") is not None  # "...attn" is a substring of it
    assert stats.meta["inputs"].startswith("random latents")


def test_cli_errors(tmp_path, capsys):
    assert cli_main(["calibrate", str(tmp_path), "-o", str(tmp_path / "x.safetensors")]) == 1
    assert "config.json" in capsys.readouterr().err
    assert cli_main(["calibrate", "ditq.nope:model", "-o", str(tmp_path / "x.safetensors")]) == 1
    model = nn.Sequential(nn.Linear(4, 4))
    with pytest.raises(Exception, match="no nn.Linear"):
        capture_calibration(model, [torch.randn(2, 4)], layers=["missing"])
    with pytest.raises(Exception, match="random inputs"):
        random_inputs(model)
