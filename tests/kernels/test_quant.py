"""Triton quantization kernels (activation, weight, dequant) against the references of ditq.formats.

Agreement: with exact division the kernels reproduce the references bit for bit (q and scale); with the
reciprocal multiply (the fast GPU default) the scales are still identical and q may move one step on at most
0.5% of the elements (values within an ulp of a rounding boundary)."""

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from ditq import formats as F
from ditq.errors import NonFiniteError, ShapeError
from ditq.kernels import quant as Q

FMTS = list(F.FORMATS)
DEV = "cuda" if torch.cuda.is_available() else "cpu"


def _act(m, k, dtype, layout, scale=3.0):
    """A random activation [m, k] with a few outliers, in one of three memory layouts."""
    x = torch.randn(m, k, device=DEV) * scale
    x[:, torch.randint(0, k, (3,))] *= 20  # outlier channels, like real DiT activations
    x = x.to(dtype)
    if layout == "transposed":  # column-major: stride (1, m)
        return x.t().contiguous().t()
    if layout == "sliced":  # a column slice of a wider tensor: row stride > k
        wide = torch.randn(m, k + 40, device=DEV).to(dtype)
        wide[:, 8 : 8 + k] = x
        return wide[:, 8 : 8 + k]
    return x


def _one_step(q, qr, fmt):
    """Elementwise: q within one quantization step of qr (int8: 1; e4m3: one ulp at that magnitude)."""
    d = (q.float() - qr.float()).abs()
    if fmt.is_int:
        return d <= 1
    return d <= torch.clamp(qr.float().abs() * 2.0**-3, min=2.0**-9) + 1e-12


@pytest.mark.parametrize("fmt", FMTS)
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
@pytest.mark.parametrize("layout", ["contiguous", "transposed", "sliced"])
def test_act_quant_matches_reference(fmt, dtype, layout, poisoned, seed):
    f = F.get_format(fmt)
    m, k = (37, 384) if f.is_block else (37, 203)
    x = _act(m, k, dtype, layout)
    qr, sr = F.quantize_activation_ref(x, f)
    q, s = Q.act_quant(x, f, exact_div=True)
    assert q.is_contiguous() and q.dtype == f.storage and s.shape == sr.shape, (seed, q.shape, s.shape)
    assert torch.equal(s, sr), f"seed {seed}: scales differ"
    assert torch.equal(q.view(torch.int8), qr.view(torch.int8)), f"seed {seed}: q differs with exact division"
    q2, s2 = Q.act_quant(x, f, exact_div=False)
    assert torch.equal(s2, sr), f"seed {seed}"
    assert bool(_one_step(q2, qr, f).all()), f"seed {seed}: reciprocal path moved q by more than one step"
    assert (q2.view(torch.int8) != qr.view(torch.int8)).float().mean().item() <= 5e-3, f"seed {seed}"


@pytest.mark.parametrize("fmt", ["int8-row", "fp8-row"])
@pytest.mark.parametrize("rows", [2, 4])
def test_act_quant_several_rows_per_program(fmt, rows, poisoned, seed):
    """The per-token kernel with several rows per program (the last program's extra rows masked): same q and
    scales as the reference, rows in any layout."""
    f = F.get_format(fmt)
    for layout in ("contiguous", "sliced"):
        x = _act(37, 203, torch.bfloat16, layout)
        qr, sr = F.quantize_activation_ref(x, f)
        q = Q.empty((37, 203), f.storage, x.device)
        s = Q.empty((37, 1), torch.float32, x.device)
        Q.launch(Q.act_quant_spec(x, q, s, f, True, config=(rows, 4)))
        assert torch.equal(s, sr), f"seed {seed}: scales differ"
        assert torch.equal(q.view(torch.int8), qr.view(torch.int8)), f"seed {seed} {layout}"


def test_act_quant_wide_rows_two_passes(poisoned, seed):
    """Rows wider than one register pass (K > 16384) take the amax-then-quantize loop."""
    x = torch.randn(3, Q._MAX_ROW + 77, device=DEV)
    qr, sr = F.quantize_activation_ref(x, "int8-row")
    q, s = Q.act_quant(x, "int8-row", exact_div=True)
    assert torch.equal(s, sr) and torch.equal(q, qr), f"seed {seed}"


@pytest.mark.parametrize("fmt", FMTS)
def test_act_quant_zero_rows_get_positive_scale(fmt, poisoned):
    f = F.get_format(fmt)
    x = torch.randn(4, 256, device=DEV)
    x[1] = 0
    x[2, :128] = 0  # one all-zero group for the block formats
    q, s = Q.act_quant(x, f)
    qr, sr = F.quantize_activation_ref(x, f)
    assert bool((s > 0).all()) and torch.equal(s, sr)
    assert not bool(q[1].float().abs().any())


def test_act_quant_errors():
    with pytest.raises(ShapeError, match="divisible by 128"):
        Q.act_quant(torch.randn(4, 200, device=DEV), "int8-block")
    with pytest.raises(ShapeError, match="2-D"):
        Q.act_quant(torch.randn(2, 4, 256, device=DEV), "int8-row")


@pytest.mark.parametrize("fmt", FMTS)
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_quant_weight_matches_reference(fmt, dtype, poisoned, seed):
    f = F.get_format(fmt)
    n, k = (256, 384) if f.is_block else (75, 203)
    w = (torch.randn(k, n, device=DEV) * 0.05).to(dtype).t()  # non-contiguous view [n, k]
    w[:, :128] *= 4  # blocks with different ranges
    if f.is_block:
        w[:128, 128:256] = 0  # an all-zero block: scale must be AMAX_EPS / qmax, q all zero
    qr, sr = F.quantize_weight_ref(w, f)
    q, s = Q.quant_weight(w, f)
    assert s.shape == sr.shape and torch.equal(s, sr), f"seed {seed}"
    assert torch.equal(q.view(torch.int8), qr.view(torch.int8)), f"seed {seed}"
    assert bool((s > 0).all())
    # a given (e.g. optimized) scale is used as is
    s_opt = sr * 0.9
    q2, s2 = Q.quant_weight(w, f, scale=s_opt)
    qr2, _ = F.quantize_weight_ref(w, f, scale=s_opt)
    assert torch.equal(q2.view(torch.int8), qr2.view(torch.int8)) and torch.equal(s2, s_opt)


@pytest.mark.parametrize("fmt", FMTS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_dequant_weight_bit_exact(fmt, dtype, poisoned, seed):
    """Dequantization must reproduce ComfyUI's rounding exactly (the round-trip test of the checkpoints)."""
    f = F.get_format(fmt)
    n, k = (128, 256) if f.is_block else (33, 150)
    q, s = F.quantize_weight_ref(torch.randn(n, k, device=DEV) * 0.1, f)
    out = Q.dequant_weight(q, s, f, dtype)
    ref = F.dequantize_ref(q, s, f, dtype)
    assert out.dtype == dtype and torch.equal(out, ref), f"seed {seed}"


def test_quant_weight_errors():
    w = torch.randn(200, 256, device=DEV)
    with pytest.raises(ShapeError, match="divisible by 128"):
        Q.quant_weight(w, "fp8-block")
    w[3, 7] = float("nan")
    with pytest.raises(NonFiniteError, match="NaN"):
        Q.quant_weight(w, "int8-row", name="blocks.0.attn.qkv.weight")
    with pytest.raises(ShapeError, match="scale has shape"):
        Q.quant_weight(torch.randn(8, 16, device=DEV), "int8-row", scale=torch.ones(8, 2))


@settings(max_examples=8, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(
    fmt=st.sampled_from(FMTS),
    m=st.integers(1, 24),
    groups=st.integers(1, 3),
    extra=st.integers(0, 127),
    log_scale=st.floats(-6, 6),
    seed=st.integers(0, 2**31 - 1),
)
def test_act_round_trip_property(fmt, m, groups, extra, log_scale, seed):
    """Quantize-dequantize of any activation: kernel == reference, and each element within half a step
    (int8) or half an e4m3 ulp (fp8) of the input, relative to its scale."""
    f = F.get_format(fmt)
    k = groups * 128 if f.is_block else groups * 128 - extra
    g = torch.Generator().manual_seed(seed)
    x = (torch.randn(m, k, generator=g) * 10.0**log_scale).to(DEV)
    q, s = Q.act_quant(x, f, exact_div=True)
    qr, sr = F.quantize_activation_ref(x, f)
    assert torch.equal(s, sr) and torch.equal(q.view(torch.int8), qr.view(torch.int8))
    xd = F.dequantize_activation_ref(q, s, f, torch.float64)
    s_el = s.double() if not f.is_block else s.double().repeat_interleave(128, -1)
    err = (xd - x.double()).abs() / s_el
    if f.is_int:
        assert err.max().item() <= 0.5 + 1e-6
    else:  # |x|/s <= 448; e4m3 keeps 3 mantissa bits: half an ulp is 2^-4 of the value (2^-10 subnormal)
        assert bool((err <= (x.double().abs() / s_el) * 2.0**-4 + 2.0**-10 + 1e-9).all())
