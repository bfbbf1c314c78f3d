"""Triton scaled GEMMs against the float64 reference of the same quantized operands.

Tolerances: the kernels sum exact integer (int8) or exact-product fp32 (fp8) partials and apply the scales
in fp32, so with an fp32 output they agree with float64 to ~1e-6 (bound 2e-5); a bf16 / fp16 output adds
one rounding of the result (2^-9 / 2^-12 relative per element, bound 6e-3 / 1e-3 on the norm). On Hopper
the fp8 tensor-core product (wgmma) accumulates with fewer than fp32's mantissa bits, so fp8 formats get 1e-3
there (measured on an H200: up to ~1e-4)."""

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from ditq import formats as F
from ditq.errors import ShapeError
from ditq.kernels import gemm as G
from ditq.kernels.gemm import Config

FMTS = list(F.FORMATS)
DEV = "cuda" if torch.cuda.is_available() else "cpu"
TOL = {torch.float32: 2e-5, torch.bfloat16: 6e-3, torch.float16: 1e-3}


def tol(fmt, out_dtype):
    f = F.get_format(fmt)
    if DEV == "cuda" and not f.is_int:
        return max(TOL[out_dtype], 1e-3)
    return TOL[out_dtype]


def _operands(fmt, m, n, k, x_layout="contiguous"):
    f = F.get_format(fmt)
    x = torch.randn(m, k, device=DEV)
    w = torch.randn(n, k, device=DEV) * 0.05
    wq, ws = F.quantize_weight_ref(w, f)
    xq, xs = F.quantize_activation_ref(x, f)
    if x_layout == "transposed":  # column-major xq: pointer loads, strided
        xq = xq.t().contiguous().t()
    return xq, xs, wq, ws


def _ref(xq, xs, wq, ws, fmt, bias):
    return F.scaled_mm_ref(xq, xs, wq, ws, fmt, bias, torch.float64, torch.float64)


# configs that exercise each code path in the interpreter: TMA / pointer loads, one or two K blocks per
# iteration, both int32 -> fp32 promotions, N tiles narrower than the 128 weight block, K tails
# (persistent: more tiles than the interpreter's 4 programs, so each program loops over several tiles)
NONBLOCK_CFGS = [
    Config(32, 32, 64, 4, 4, 1, tma=True),
    Config(16, 64, 32, 2, 4, 1, tma=False),
    Config(32, 32, 64, 2, 4, 1, tma=True, persistent=True),
]
BLOCK_CFGS = [
    Config(32, 128, 128, 4, 4, 1, tma=True, dot2=True),
    Config(16, 64, 128, 2, 4, 1, tma=False, dot2=False, magic_i2f=True),
    Config(16, 128, 128, 2, 4, 1, tma=True, magic_i2f=True, persistent=True),
]


@pytest.mark.parametrize("fmt", FMTS)
@pytest.mark.parametrize("cfg_i", [0, 1, 2])
def test_scaled_mm_matches_float64(fmt, cfg_i, poisoned, seed):
    f = F.get_format(fmt)
    cfg = (BLOCK_CFGS if f.is_block else NONBLOCK_CFGS)[cfg_i]
    # odd M (row tail), N tail and K tail for the non-block formats; K = 3 blocks (odd count) for DOT2
    m, n, k = (37, 256, 384) if f.is_block else (37, 75, 208 if cfg.tma else 203)
    xq, xs, wq, ws = _operands(fmt, m, n, k)
    bias = torch.randn(n, device=DEV, dtype=torch.bfloat16)
    for out_dtype in (torch.float32, torch.bfloat16):
        y = G.scaled_mm(xq, xs, wq, ws, f, bias, out_dtype, config=cfg)
        ref = _ref(xq, xs, wq, ws, f, bias)
        assert y.dtype == out_dtype and y.shape == (m, n)
        err = F.relative_error(y, ref)
        assert err < tol(f, out_dtype), f"seed {seed} {cfg}: rel err {err:.2e} ({out_dtype})"


@pytest.mark.parametrize("fmt", FMTS)
def test_scaled_mm_default_config_no_bias_fp16_strided_x(fmt, poisoned, seed):
    f = F.get_format(fmt)
    m, n, k = (5, 128, 256) if f.is_block else (5, 40, 96)
    xq, xs, wq, ws = _operands(fmt, m, n, k, x_layout="transposed")
    y = G.scaled_mm(xq, xs, wq, ws, f, None, torch.float16)
    err = F.relative_error(y, _ref(xq, xs, wq, ws, f, None))
    assert err < tol(f, torch.float16), f"seed {seed}: {err:.2e}"


@pytest.mark.parametrize("fmt", FMTS)
@pytest.mark.parametrize("case", ["all", "mixed"])
def test_scaled_mm_tail_split(fmt, case, poisoned, seed):
    """The last wave's tiles split over K (tail_split): each slice's accumulator goes through the workspace and
    the last program of a tile sums them. int8-row sums exact int32 partials, so it equals the unsplit result
    bit for bit; the others sum fp32 partials in a fixed order (same bounds). Twice in a row: the counters
    must be back at zero after each launch. "all": every tile split (fewer tiles than slots); "mixed": one
    more row of tiles than the slots hold, so whole tiles and split ones."""
    f = F.get_format(fmt)
    cfg = Config(32, 128 if f.is_block else 32, 128 if f.is_block else 64, 4, 4, 1, tma=not f.is_block,
                 dot2=f.is_block, tail_split=4)  # fmt: skip
    n, k = (256, 640) if f.is_block else (75, 520)
    slots = G._num_sms(torch.device(DEV)) * G.ctas_per_sm(cfg)
    m = 37 if case == "all" else cfg.block_m * (slots // -(-n // cfg.block_n) + 1)
    tiles = -(-m // cfg.block_m) * -(-n // cfg.block_n)
    n_dp, s, k_slice = G.tail_split(tiles, k, cfg, slots)
    assert s >= 2 and (n_dp == 0) == (case == "all"), (tiles, slots, n_dp, s)  # the split this test is about
    xq, xs, wq, ws = _operands(fmt, m, n, k)
    bias = torch.randn(n, device=DEV, dtype=torch.bfloat16)
    plain = G.scaled_mm(xq, xs, wq, ws, f, bias, torch.float32, config=Config(*cfg.as_list()[:12]))
    ref = _ref(xq, xs, wq, ws, f, bias)
    for _ in range(2):
        y = G.scaled_mm(xq, xs, wq, ws, f, bias, torch.float32, config=cfg)
        if fmt == "int8-row":
            assert torch.equal(y, plain), f"seed {seed}"
        err = F.relative_error(y, ref)
        assert err < tol(f, torch.float32), f"seed {seed}: rel err {err:.2e}"
    _, counters = G.tail_buffers(torch.device(DEV), cfg)
    assert counters.count_nonzero().item() == 0


def test_tail_split_choice():
    """Whole waves are left alone; a partial wave is split so it fits the slots, each slice >= 2 K steps."""
    c = Config(128, 256, 128, 8, 8, 4, tail_split=4)
    assert G.tail_split(396, 3072, c, 132) == (396, 1, 3072)  # 3 whole waves
    assert G.tail_split(432, 3072, c, 132) == (396, 3, 1024)  # 36 tiles left: 3 slices of 8 K steps
    assert G.tail_split(432, 512, c, 132) == (396, 2, 256)  # 4 K steps: at most 2 slices
    assert G.tail_split(432, 256, c, 132) == (432, 1, 256)
    assert G.tail_split(500, 3072, c, 132) == (500, 1, 3072)  # 104 left: no room for 2 slices each
    assert G.tail_split(432, 3072, Config(128, 256, 128, 8, 8, 4), 132) == (432, 1, 3072)  # tail_split off
    assert G.ctas_per_sm(c) == 1 and G.ctas_per_sm(Config(64, 128, 128, 8, 4, 4)) == 2


def test_scaled_mm_magic_promotion_extremes(poisoned):
    """Largest int32 partial of one K block (128 * 127 * 127): the bit-trick promotion stays exact."""
    m, n, k = 16, 128, 256
    xq = torch.full((m, k), 127, dtype=torch.int8, device=DEV)
    xq[1::2] = -127
    wq = torch.full((n, k), 127, dtype=torch.int8, device=DEV)
    xs = torch.rand(m, k // 128, device=DEV) + 0.5
    ws = torch.rand(n // 128, k // 128, device=DEV) + 0.5
    cfg = Config(16, 128, 128, 2, 4, 1, tma=True, dot2=False, magic_i2f=True)
    y = G.scaled_mm(xq, xs, wq, ws, "int8-block", None, torch.float32, config=cfg)
    assert F.relative_error(y, _ref(xq, xs, wq, ws, "int8-block", None)) < 1e-6


def test_scaled_mm_errors():
    xq, xs, wq, ws = _operands("int8-row", 4, 8, 32)
    with pytest.raises(ShapeError, match="K="):
        G.scaled_mm(xq[:, :16], xs, wq, ws, "int8-row")
    with pytest.raises(ShapeError, match="x_scale"):
        G.scaled_mm(xq, xs[:2], wq, ws, "int8-row")
    with pytest.raises(ShapeError, match="must be"):
        G.scaled_mm(xq, xs, wq.to(torch.float8_e4m3fn), ws, "int8-row")
    with pytest.raises(ShapeError, match="bias"):
        G.scaled_mm(xq, xs, wq, ws, "int8-row", bias=torch.zeros(3, device=DEV))


@settings(max_examples=6, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(
    fmt=st.sampled_from(FMTS),
    m=st.integers(1, 70),
    n_units=st.integers(1, 2),
    k_units=st.integers(1, 3),
    tail=st.integers(0, 60),
    with_bias=st.booleans(),
    seed=st.integers(0, 2**31 - 1),
)
def test_scaled_mm_property(fmt, m, n_units, k_units, tail, with_bias, seed):
    """Any shape the format allows: kernel (default config) == float64 reference within fp32 rounding."""
    f = F.get_format(fmt)
    n = n_units * 128 if f.is_block else n_units * 64 - tail // 2
    k = k_units * 128 if f.is_block else k_units * 64 - tail
    torch.manual_seed(seed)
    xq, xs, wq, ws = _operands(fmt, m, n, k)
    bias = torch.randn(n, device=DEV) if with_bias else None
    y = G.scaled_mm(xq, xs, wq, ws, f, bias, torch.float32)
    err = F.relative_error(y, _ref(xq, xs, wq, ws, f, bias))
    assert err < tol(f, torch.float32), f"{fmt} M={m} N={n} K={k} seed {seed}: rel err {err:.2e}"


def _weight_only_ref(x, wq, ws, fmt, bias):
    """float64 x @ dequant(w)^T + bias: the weight-only product (x is not quantized)."""
    y = x.double() @ F.dequantize_ref(wq, ws, fmt, torch.float64).t()
    return y if bias is None else y + bias.double()


@pytest.mark.parametrize("fmt", FMTS)
def test_weight_only_matches_float64(fmt, poisoned, seed):
    """Few-row kernel (x unquantized): against the float64 product with the dequantized weight (exact products,
    fp32 sums: the out dtype's rounding bound) and against the unquantized float64 product (the format's bound).
    Odd M, N and K tails, strided x, all three x dtypes, both K steps (block formats: 2 scaled sub-blocks),
    split K (the last program of a tile sums the slices' partials) and not."""
    f = F.get_format(fmt)
    m, n, k = (7, 256, 384) if f.is_block else (7, 75, 203)
    w = torch.randn(n, k, device=DEV) * 0.05
    wq, ws = F.quantize_weight_ref(w, f)
    bias = torch.randn(n, device=DEV, dtype=torch.bfloat16)
    cfgs = [Config(16, 32, 128, 1, 4, 1, split_k=3), Config(16, 16, 256, 1, 4, 2)]  # K split in 2-3 slices
    cases = [(torch.bfloat16, torch.bfloat16, bias, 0), (torch.float16, torch.float32, None, 1),
             (torch.float32, torch.float32, bias, 1)]  # fmt: skip
    for (x_dtype, out_dtype, b, ci) in cases:
        x = (torch.randn(k, m + 3, device=DEV) * 2).to(x_dtype).t()[1 : m + 1]  # column-major rows of a slab
        y = G.weight_only_linear(x, wq, ws, f, b, out_dtype, config=cfgs[ci])
        assert y.shape == (m, n) and y.dtype == out_dtype
        err = F.relative_error(y, _weight_only_ref(x, wq, ws, f, b))
        assert err < max(TOL[out_dtype], 1e-5), f"seed {seed} {x_dtype} {cfgs[ci]}: rel err {err:.2e}"
        truth = x.double() @ w.double().t() + (0 if b is None else b.double())
        assert F.relative_error(y, truth) < (0.025 if f.is_int else 0.06), f"seed {seed}"
    # the split's counters are back at zero (the next launch on the stream relies on it)
    assert all(int(c.abs().sum()) == 0 for _, c in G._WO_WORKSPACE.values())


def test_weight_only_one_row_and_errors(poisoned, seed):
    """M = 1 (one sample's modulation vector) with a per-tensor scale; more than 128 rows is refused."""
    w = torch.randn(96, 160, device=DEV)
    wq, ws = F.quantize_weight_ref(w, "fp8-tensor")
    x = torch.randn(1, 160, device=DEV, dtype=torch.bfloat16)
    y = G.weight_only_linear(x, wq, ws, "fp8-tensor")
    assert y.dtype == torch.bfloat16 and F.relative_error(y, _weight_only_ref(x, wq, ws, "fp8-tensor", None)) < 6e-3
    with pytest.raises(ShapeError, match="at most 128 rows"):
        G.weight_only_linear(torch.randn(129, 160, device=DEV), wq, ws, "fp8-tensor")
    with pytest.raises(ShapeError, match="K=100"):
        G.weight_only_linear(torch.randn(2, 100, device=DEV), wq, ws, "fp8-tensor")
