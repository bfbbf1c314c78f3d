"""The INT8 attention kernels (through the Triton interpreter on CPU) against float64 attention and against
the torch reference that reproduces their quantization. Small odd shapes: tails in both sequence axes,
GQA, causal, key padding, windows, LSE merging across key shards, poisoned work buffers."""

import math
import secrets

import pytest
import torch

import ditq.attn as A
from ditq.attn import attention, attention_ref, merge_attention
from ditq.errors import FormatError, ShapeError
from ditq.kernels import attention as K


@pytest.fixture
def fresh_seed():
    s = secrets.randbits(31)
    torch.manual_seed(s)
    return s


@pytest.fixture(autouse=True)
def poison(monkeypatch):
    """Every work buffer and output starts as NaN / -128, so a tile the kernels skip shows up."""
    monkeypatch.setattr(K, "POISON", True)


DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


def block_n(D, pv):
    """BLOCK_N the wrapper picks (the K scale block), for the reference's emulation."""
    return K.pick_config(K.padded_head_dim(D), pv == "fp8", K.INTERPRET)[1]


def make_qkv(B, H, HK, NQ, NK, D, dtype=torch.bfloat16, layout="HND", device=DEVICE, k_bias=4.0):
    """q, k, v ~ N(0, 1); K carries a per-channel bias shared by all tokens (as real DiT keys do), V a small
    one. Scores are sharpened (x2) so the softmax is not uniform."""
    q = 2 * torch.randn(B, H, NQ, D)
    k = torch.randn(B, HK, NK, D) + k_bias * torch.randn(1, HK, 1, D)
    v = torch.randn(B, HK, NK, D) + 0.5 * torch.randn(1, HK, 1, D)
    q, k, v = (t.to(dtype).to(device) for t in (q, k, v))
    if layout == "NHD":
        q, k, v = (t.transpose(1, 2).contiguous() for t in (q, k, v))
    return q, k, v


def hnd(t, layout):
    return t.transpose(1, 2) if layout == "NHD" else t


def metrics(out, ref):
    o, r = out.double().flatten(), ref.double().flatten()
    cos = torch.nn.functional.cosine_similarity(o, r, dim=0).item()
    rel_l1 = ((o - r).abs().sum() / r.abs().sum()).item()
    return cos, rel_l1


# pv -> (min cosine, max relative L1) against float64 attention: the goals on DiT-like keys
GOALS = {"bf16": (0.9995, 0.02), "fp8": (0.999, 0.05)}


@pytest.mark.parametrize(
    "pv,dtype,layout,shape",
    [
        ("bf16", torch.bfloat16, "HND", (1, 2, 2, 67, 67, 64)),
        ("fp8", torch.bfloat16, "NHD", (1, 2, 2, 131, 131, 64)),
        ("fp8", torch.float16, "HND", (2, 4, 2, 70, 97, 64)),  # GQA, Nq != Nk
        ("bf16", torch.float16, "NHD", (1, 4, 1, 45, 150, 64)),  # MQA
        ("fp8", torch.bfloat16, "HND", (1, 2, 1, 40, 77, 96)),  # head dim padded to 128
        ("bf16", torch.bfloat16, "NHD", (1, 1, 1, 33, 50, 256)),
    ],
)
def test_matches_float64(pv, dtype, layout, shape, fresh_seed):
    B, H, HK, NQ, NK, D = shape
    q, k, v = make_qkv(B, H, HK, NQ, NK, D, dtype, layout)
    out = attention(q, k, v, layout=layout, pv=pv)
    assert out.shape == q.shape and out.dtype == dtype
    assert torch.isfinite(out).all(), f"seed {fresh_seed}: non-finite output (unwritten tile?)"
    exact, _ = attention_ref(hnd(q, layout), hnd(k, layout), hnd(v, layout), quantize=False)
    cos, rel = metrics(hnd(out, layout), exact)
    min_cos, max_rel = GOALS[pv]
    assert cos >= min_cos and rel <= max_rel, f"seed {fresh_seed}: cos {cos:.6f} rel L1 {rel:.4f}"
    # the kernel computes what the reference quantization says (differences: online-softmax order and
    # rounding of P against the running rather than the final max)
    emu, _ = attention_ref(hnd(q, layout), hnd(k, layout), hnd(v, layout), pv=pv, block_n=block_n(D, pv))
    cos_e, rel_e = metrics(hnd(out, layout), emu)
    assert cos_e >= 0.9999 and rel_e <= (0.006 if pv == "bf16" else 0.02), f"seed {fresh_seed}: {cos_e}, {rel_e}"


def test_smoothing_matters(fresh_seed):
    """With a large per-channel key bias, INT8 keys without smoothing lose most of their resolution."""
    q, k, v = make_qkv(1, 2, 2, 64, 96, 64, k_bias=20.0)
    exact, _ = attention_ref(q, k, v, quantize=False)
    on = metrics(attention(q, k, v, pv="bf16"), exact)
    off = metrics(attention(q, k, v, pv="bf16", smooth_k=False), exact)
    assert on[1] < 0.5 * off[1], f"seed {fresh_seed}: smoothing {on} vs none {off}"


@pytest.mark.parametrize("pv", ["bf16", "fp8"])
@pytest.mark.parametrize(
    "opts",
    [
        dict(causal=True),
        dict(window=(9, 30)),
        dict(window=5, causal=True),
        dict(mask=True),
        dict(mask=True, window=(40, 0)),
    ],
)
def test_masks(pv, opts, fresh_seed):
    B, H, N, D = 2, 2, 101, 64
    q, k, v = make_qkv(B, H, H, N, N, D)
    kpm = None
    if opts.get("mask"):
        lens = torch.tensor([N, 37], device=DEVICE)  # batch 1: text padding after 37 keys
        kpm = torch.arange(N, device=DEVICE)[None, :] < lens[:, None]
    window = opts.get("window")
    causal = opts.get("causal", False)
    out, lse = attention(q, k, v, pv=pv, causal=causal, window=window, key_padding_mask=kpm, return_lse=True)
    w = None if window is None else ((window, window) if isinstance(window, int) else window)
    exact, lse_x = attention_ref(q, k, v, quantize=False, causal=causal, window=w, key_padding_mask=kpm)
    assert torch.isfinite(out).all()
    cos, rel = metrics(out, exact)
    assert cos >= GOALS[pv][0] and rel <= GOALS[pv][1], f"seed {fresh_seed}: cos {cos:.6f} rel L1 {rel:.4f}"
    seen = torch.isfinite(lse_x)
    assert torch.equal(torch.isfinite(lse), seen), f"seed {fresh_seed}: rows with no key differ"
    assert (out.float()[~seen] == 0).all()
    err = (lse - lse_x)[seen].abs()
    # int8 scores: a row that sees one or two keys carries their quantization error undiluted
    assert err.max() < 0.15 and err.mean() < 0.02, f"seed {fresh_seed}: lse error {err.max()}, {err.mean()}"


def test_row_without_keys(fresh_seed):
    """A batch element whose keys are all padding: zeros and lse -inf, no NaN; the other is unaffected."""
    q, k, v = make_qkv(2, 2, 2, 50, 70, 64)
    kpm = torch.ones(2, 70, dtype=torch.bool, device=DEVICE)
    kpm[1] = False
    out, lse = attention(q, k, v, key_padding_mask=kpm, return_lse=True)
    assert (out[1] == 0).all() and torch.isneginf(lse[1]).all()
    exact, _ = attention_ref(q[:1], k[:1], v[:1], quantize=False)
    assert metrics(out[:1], exact)[0] >= GOALS["fp8"][0]


@pytest.mark.parametrize("pv", ["bf16", "fp8"])
def test_lse_merges_key_shards(pv, fresh_seed):
    """Attention over two key shards (each smoothed by its own K mean), merged by LSE, equals attention
    over all keys: what ring / context-parallel inference does."""
    B, H, NQ, NK, D = 1, 2, 60, 150, 64
    q, k, v = make_qkv(B, H, H, NQ, NK, D)
    cut = 83
    o1, l1 = attention(q, k[:, :, :cut], v[:, :, :cut], pv=pv, return_lse=True)
    o2, l2 = attention(q, k[:, :, cut:], v[:, :, cut:], pv=pv, return_lse=True)
    merged, lse = merge_attention([o1, o2], [l1, l2])
    # the merge itself, tightly: float64 log-sum-exp weights of the two shards' own outputs
    l64 = torch.logaddexp(l1.double(), l2.double())
    ref = sum(torch.exp(li.double() - l64)[..., None] * oi.double() for oi, li in ((o1, l1), (o2, l2)))
    assert (lse.double() - l64).abs().max() < 1e-5, f"seed {fresh_seed}: merged lse vs float64 merge"
    assert (merged.double() - ref).abs().max() < 1e-5 * ref.abs().max(), f"seed {fresh_seed}: merged out vs float64"
    exact, lse_x = attention_ref(q, k, v, quantize=False)
    # the LSE error is the int8 QK product's (the unsharded kernel's: median 0.028, max 0.048 over 70 seeds;
    # merged shards, each smoothed and quantized on its own: median 0.027, max 0.056); a wrong merge is off by
    # O(log 2) = 0.69 (a shard lost or counted twice)
    assert (lse - lse_x).abs().max() < 0.08, f"seed {fresh_seed}: lse error {(lse - lse_x).abs().max()}"
    cos, rel = metrics(merged, exact)
    assert cos >= GOALS[pv][0] and rel <= GOALS[pv][1], f"seed {fresh_seed}: cos {cos:.6f} rel L1 {rel:.4f}"


def test_configs_agree(fresh_seed):
    """The result does not depend on the tile shape (the K scale block follows BLOCK_N)."""
    q, k, v = make_qkv(1, 2, 2, 90, 90, 64)
    a = attention(q, k, v, pv="bf16", window=(20, 3), _config=(32, 32, 4, 1))
    b = attention(q, k, v, pv="bf16", window=(20, 3), _config=(64, 64, 4, 1, 0))  # plain int->float cast
    exact, _ = attention_ref(q, k, v, quantize=False, window=(20, 3))
    assert metrics(a, exact)[0] >= 0.9995 and metrics(b, exact)[0] >= 0.9995
    assert metrics(a, b)[1] < 0.02


def test_fallback_without_triton(monkeypatch, fresh_seed):
    """Where Triton cannot run, the torch reference (same quantization) answers."""
    monkeypatch.setattr(A, "triton_runs_on", lambda t: False)
    q, k, v = make_qkv(1, 2, 1, 33, 40, 64, layout="NHD")
    out, lse = attention(q, k, v, layout="NHD", causal=True, return_lse=True)
    exact, lse_x = attention_ref(hnd(q, "NHD"), hnd(k, "NHD"), hnd(v, "NHD"), quantize=False, causal=True)
    assert out.shape == q.shape and out.dtype == q.dtype
    assert metrics(hnd(out, "NHD"), exact)[0] >= 0.999
    err = (lse - lse_x).abs()  # causal: the first rows see one or two keys and keep their int8 error
    assert err.max() < 0.15 and err.mean() < 0.02, f"seed {fresh_seed}: {err.max()}, {err.mean()}"


def test_fake_impl_matches(fresh_seed):
    """The fake implementation (torch.compile, CUDA graphs) gives the real output's shapes and strides."""
    from torch._subclasses.fake_tensor import FakeTensorMode

    q, k, v = make_qkv(1, 2, 2, 20, 30, 64, layout="NHD")
    real = attention(q, k, v, layout="NHD", return_lse=True)
    with FakeTensorMode() as mode:
        fq, fk, fv = (mode.from_tensor(t) for t in (q, k, v))
        fake = attention(fq, fk, fv, layout="NHD", return_lse=True)
    for r, f in zip(real, fake):
        assert r.shape == f.shape and r.stride() == f.stride() and r.dtype == f.dtype


def test_errors():
    q = torch.randn(1, 2, 8, 64, dtype=torch.bfloat16)
    with pytest.raises(FormatError, match="bfloat16 or float16"):
        attention(q.float(), q.float(), q.float())
    with pytest.raises(FormatError, match="layout"):
        attention(q, q, q, layout="BHND")
    with pytest.raises(FormatError, match="pv"):
        attention(q, q, q, pv="int4")
    with pytest.raises(ShapeError, match="multiple"):
        attention(torch.randn(1, 3, 8, 64, dtype=torch.bfloat16), q, q)
    with pytest.raises(ShapeError, match="key_padding_mask"):
        attention(q, q, q, key_padding_mask=torch.ones(1, 9, dtype=torch.bool))
    with pytest.raises(ShapeError, match="window"):
        attention(q, q, q, window=(-1, 3))
    with pytest.raises(ShapeError, match="256"):
        x = torch.randn(1, 1, 4, 512, dtype=torch.bfloat16)
        attention(x, x, x)


def test_sm_scale_is_honoured(fresh_seed):
    q, k, v = make_qkv(1, 2, 2, 40, 40, 64)
    scale = 0.3 / math.sqrt(64)
    out = attention(q, k, v, sm_scale=scale, pv="bf16")
    exact, _ = attention_ref(q, k, v, quantize=False, sm_scale=scale)
    default, _ = attention_ref(q, k, v, quantize=False)
    assert metrics(out, exact)[0] >= 0.9995
    assert metrics(out, exact)[1] < 0.5 * metrics(out, default)[1]


def _e4m3(x):
    return x.to(torch.float8_e4m3fn).double()


@pytest.mark.parametrize("D,N,layout", [(64, 1000, "HND"), (96, 333, "NHD"), (128, 77, "HND")])
def test_prepass_buffers(D, N, layout, fresh_seed):
    """The K/V pre-pass against float64: channel sums and max |V| (several stats programs per head, the last
    one partial), K int8 within half a step of K - mean, V's e4m3 copy and the sum of its rounding error;
    pad rows and columns zero (buffers start poisoned)."""
    B, HK, bn = 1, 2, 32
    k = (torch.randn(B, N, HK, D) + 3 * torch.randn(1, 1, HK, D)).to(torch.bfloat16).to(DEVICE)
    v = (torch.randn(B, N, HK, D) + torch.randn(1, 1, HK, D)).to(torch.bfloat16).to(DEVICE)
    if layout == "NHD":
        k, v = k.transpose(1, 2), v.transpose(1, 2)  # strided [B, HK, N, D] views, as the wrapper passes them
    else:
        k, v = k.transpose(1, 2).contiguous(), v.transpose(1, 2).contiguous()
    stats, kq, ks, vt = K.kv_prepass(k, v, bn, True, True)
    DP, NP, G = K.padded_head_dim(D), triton_cdiv(N, bn) * bn, B * HK
    kd, vd = k.double().reshape(G, N, D).cpu(), v.double().reshape(G, N, D).cpu()
    stats, kq, ks, vt = stats.cpu().double(), kq.cpu(), ks.cpu().double(), vt.cpu()
    assert torch.allclose(stats[:, 0, :D], kd.sum(1), rtol=1e-5, atol=1e-3), f"seed {fresh_seed}: sum k"
    assert torch.allclose(stats[:, 1, :D], vd.sum(1), rtol=1e-5, atol=1e-3), f"seed {fresh_seed}: sum v"
    assert torch.equal(stats[:, 2, :D], vd.abs().amax(1)), f"seed {fresh_seed}: max |v|"
    assert (stats[:, :, D:] == 0).all()
    # K: int8, one scale per block of bn tokens, within half a step of the smoothed keys
    kc = kd - stats[:, 0, None, :D] / N
    kdq = kq[:, :N, :D].double() * ks.repeat_interleave(bn, 1)[:, :N, None]
    assert (kdq - kc).abs().le(0.5001 * ks.repeat_interleave(bn, 1)[:, :N, None]).all(), f"seed {fresh_seed}"
    assert (kq[:, N:] == 0).all() and (kq[:, :, D:] == 0).all() and kq.abs().max() <= 127
    # V: centred, one e4m3 scale per channel, transposed; the rounding error summed per channel
    nu = stats[:, 1, :D] / N
    vs = (stats[:, 2, :D] + nu.abs()) / 448
    vc = ((vd - nu[:, None]) / vs[:, None]).clamp(-448, 448)
    v8 = vt[:, :D, :N].transpose(1, 2).double()
    # within half an e4m3 step of vc (2^-4 of it in the normal range, 2^-10 among subnormals); the kernel
    # rounds its own f32 vc, which may fall on the other side of a tie than the float64 one
    assert ((v8 - vc).abs() <= 0.0625 * vc.abs() * 1.0001 + 2**-10).all(), f"seed {fresh_seed}: V e4m3"
    assert (vt[:, :, N:].double() == 0).all() and (vt[:, D:].double() == 0).all()
    err = (v8 - vc).sum(1)  # ~ +-100 here; f32 sums of f32 vc agree to ~0.005
    assert torch.allclose(stats[:, 3, :D], err, rtol=1e-4, atol=0.02), f"seed {fresh_seed}: V rounding error sum"


def triton_cdiv(a, b):
    return -(-a // b)


def test_fp8_mean_rounding_error_removed(fresh_seed):
    """V with half its entries exactly zero (ReLU-like) and a channel mean: the e4m3 rounding errors of the
    zeros (all -nu / vs) are alike, so their mean does not average away; the kernel subtracts it. Its error
    against float64 stays well below that of the same quantization without the correction (~0.55x at
    1536 keys in emulation)."""
    B, H, NQ, NK, D = 1, 2, 32, 1536, 64
    q = (2 * torch.randn(B, H, NQ, D)).to(torch.bfloat16).to(DEVICE)
    k = (torch.randn(B, H, NK, D) + 4 * torch.randn(1, H, 1, D)).to(torch.bfloat16).to(DEVICE)
    v = torch.relu(torch.randn(B, H, NK, D)).to(torch.bfloat16).to(DEVICE)
    out = attention(q, k, v, pv="fp8")
    exact, _ = attention_ref(q, k, v, quantize=False)
    emu, _ = attention_ref(q, k, v, pv="fp8", block_n=block_n(D, "fp8"))
    vf = v.double()
    nu = vf.mean(2, keepdim=True)
    vs = (vf.abs().amax(2, keepdim=True) + nu.abs()) / 448
    vc = ((vf - nu) / vs).clamp(-448, 448)
    uncorrected = emu + vs * (_e4m3(vc) - vc).mean(2, keepdim=True)
    rel = lambda a: ((a.double() - exact).norm() / exact.norm()).item()  # noqa: E731
    assert rel(out) < 0.75 * rel(uncorrected), f"seed {fresh_seed}: {rel(out):.5f} vs {rel(uncorrected):.5f}"
    assert metrics(out, exact)[0] >= GOALS["fp8"][0] and metrics(out, emu)[0] >= 0.9999, f"seed {fresh_seed}"


def test_bench_table_sage_columns():
    """`ditq bench attention`'s table: ditq / SageAttention ratios appear when SageAttention was timed."""
    from ditq.bench.attention import _table

    row = {"shape": [1, 2, 64, 64], "causal": False, "tflops": {"sdpa-cudnn": 100.0, "ditq-fp8": 130.0},
           "accuracy": {"ditq-fp8": {"cos": 0.9991}}, "vs_cudnn": {"ditq-fp8": 1.3, "sdpa-cudnn": 1.0}}
    plain = _table([dict(row, vs_sageattention={})])
    assert "Sage" not in plain and "| 1.30x | - |" in plain
    row["tflops"]["sageattention"] = 80.0
    with_sage = _table([dict(row, vs_sageattention={"ditq-fp8": 1.625})]).splitlines()
    assert with_sage[0].endswith("ditq-fp8 / Sage | ditq-bf16 / Sage |")
    assert with_sage[2].endswith("| 1.30x | - | 1.62x | - |") and "130 (cos 0.99910)" in with_sage[2]
