"""The fused block linear (kernels/fused.py) against float64 and against the two-kernel path it replaces.

Tolerances: the kernel sums exact int32 (int8) / exact-product fp32 (fp8) partials and promotes them in fp32,
so with an fp32 output it agrees with the float64 product of the same quantized operands to ~1e-6 (bound
2e-5); a bf16 / fp16 output adds one rounding (bounds 6e-3 / 1e-3 on the norm; on Hopper fp8 wgmma accumulates
with fewer bits: 1e-3, as test_gemm.py). The float64 reference multiplies the operands as ``act_quant``
quantizes them (on a GPU it multiplies by the scale's reciprocal, which the torch reference does not: q then
differs by one step on rare elements; test_quant.py bounds that). Against ``act_quant`` + ``scaled_mm`` the
result is bit-identical (same scales, same quantized values, same promotion order: under the interpreter and,
measured, on an H200)."""

import pytest
import torch

from ditq import formats as F
from ditq.errors import ShapeError
from ditq.kernels import fused as FU
from ditq.kernels import gemm as G
from ditq.kernels import ops
from ditq.kernels import quant as Q
from ditq.kernels.fused import FusedConfig as FC

BLOCK_FMTS = ["int8-block", "fp8-block"]
DEV = "cuda" if torch.cuda.is_available() else "cpu"
TOL = {torch.float32: 2e-5, torch.bfloat16: 6e-3, torch.float16: 1e-3}
# each code path once in the interpreter: N tile 64 / 128 / 256 (two halves), TMA and pointer loads of x and w
CFGS = [FC(32, 128, 4, 1), FC(16, 256, 4, 1, x_tma=True), FC(16, 64, 4, 1, w_tma=False), FC(16, 256, 4, 1, w_tma=False)]


def tol(fmt, out_dtype):
    if DEV == "cuda" and not F.get_format(fmt).is_int:
        return max(TOL[out_dtype], 1e-3)
    return TOL[out_dtype]


def _weight(fmt, n, k):
    w = torch.randn(n, k, device=DEV) * 0.05
    return F.quantize_weight_ref(w, fmt)


def _ref64(x, wq, ws, fmt, bias):
    """float64 product of the activation as act_quant quantizes it and the quantized weight (+ bias)."""
    xq, xs = Q.act_quant(x.reshape(-1, x.shape[-1]), fmt)
    y = F.scaled_mm_ref(xq, xs, wq, ws, fmt, bias, torch.float64, torch.float64)
    return y.reshape(*x.shape[:-1], wq.shape[0])


def _x(m, k, dtype):
    x = torch.randn(m, k, device=DEV).to(dtype)
    x[:, 3] *= 40  # an outlier channel: its K block gets a large scale, the others do not
    x[1] = 0  # an all-zero row: AMAX_EPS scale, zero output (+ bias)
    return x


@pytest.mark.parametrize("fmt", BLOCK_FMTS)
@pytest.mark.parametrize("ci", range(len(CFGS)))
def test_fused_matches_float64_and_two_kernel_path(fmt, ci, poisoned, seed):
    """Odd M (row tail), N not a multiple of 256 (the last 256-wide tile's second half lies past N), 3 K blocks."""
    c = CFGS[ci]
    m, n, k = 37, 384, 384
    x = _x(m, k, torch.bfloat16)
    wq, ws = _weight(fmt, n, k)
    bias = torch.randn(n, device=DEV, dtype=torch.bfloat16)
    y = FU.fused_linear(x, wq, ws, fmt, bias, torch.float32, config=c)
    ref = _ref64(x, wq, ws, fmt, bias)
    assert y.shape == (m, n) and y.dtype == torch.float32
    err = F.relative_error(y, ref)
    assert err < tol(fmt, torch.float32), f"seed {seed} {c}: rel err {err:.2e}"
    if DEV == "cpu":  # the interpreter divides exactly, as the torch reference quantizer does
        err = F.relative_error(y, F.linear_ref(x, wq, ws, fmt, bias, torch.float64, torch.float64))
        assert err < tol(fmt, torch.float32), f"seed {seed} {c}: rel err vs linear_ref {err:.2e}"
    xq, xs = Q.act_quant(x, fmt)
    y2 = G.scaled_mm(xq, xs, wq, ws, fmt, bias, torch.float32,
                     config=G.Config(c.block_m, min(c.block_n, 128), 128, 8, 4, 1, tma=True))  # fmt: skip
    assert torch.equal(y, y2), f"seed {seed} {c}: differs from act_quant + scaled_mm"


@pytest.mark.parametrize("fmt", BLOCK_FMTS)
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32])
def test_fused_dtypes_strided_x_no_bias(fmt, dtype, poisoned, seed):
    """x of every float dtype, a strided view (row stride > K, non-unit column stride), output in x's dtype."""
    m, n, k = 21, 128, 256
    base = _x(m, 2 * k, dtype)
    x = base[:, ::2]  # column stride 2: pointer loads (TMA needs a unit inner stride)
    wq, ws = _weight(fmt, n, k)
    y = FU.fused_linear(x, wq, ws, fmt, None, config=FC(16, 128, 4, 1, x_tma=True))
    assert y.dtype == dtype
    err = F.relative_error(y, _ref64(x, wq, ws, fmt, None))
    assert err < tol(fmt, dtype), f"seed {seed}: {err:.2e}"
    assert torch.equal(y[1], torch.zeros_like(y[1])), "an all-zero row must give a zero output"


def test_fused_extremes_exact():
    """Values at the amax of their block map to +-qmax exactly and the largest int32 partial stays exact."""
    m, n, k = 16, 128, 256
    x = torch.full((m, k), 3.0, device=DEV)
    x[1::2] = -3.0
    wq = torch.full((n, k), 127, dtype=torch.int8, device=DEV)
    ws = torch.rand(n // 128, k // 128, device=DEV) + 0.5
    y = FU.fused_linear(x, wq, ws, "int8-block", None, torch.float32, config=FC(16, 128, 4, 1))
    assert F.relative_error(y, _ref64(x, wq, ws, "int8-block", None)) < 1e-6


def test_fused_errors_and_empty():
    wq, ws = _weight("int8-block", 128, 256)
    with pytest.raises(ShapeError, match="divisible by 128"):
        FU.fused_linear(torch.randn(4, 200, device=DEV), wq, ws, "int8-block")
    with pytest.raises(ShapeError, match="block formats"):
        FU.fused_linear(torch.randn(4, 256, device=DEV), wq, ws, "int8-row")
    with pytest.raises(ShapeError, match="K=384"):
        FU.fused_linear(torch.randn(4, 384, device=DEV), wq, ws, "int8-block")
    bias = torch.randn(128, device=DEV)
    y = FU.fused_linear(torch.randn(0, 256, device=DEV), wq, ws, "int8-block", bias)
    assert y.shape == (0, 128)


@pytest.mark.parametrize("fmt", BLOCK_FMTS)
def test_ops_linear_block_formats_match_reference(fmt, poisoned, seed):
    """ops.linear of a block format (routed through the fused kernel where configured) on a 3-D activation."""
    x = _x(45, 256, torch.bfloat16).reshape(3, 15, 256)
    wq, ws = _weight(fmt, 256, 256)
    bias = torch.randn(256, device=DEV, dtype=torch.bfloat16)
    y = ops.linear(x, wq, ws, fmt, bias)
    assert y.shape == (3, 15, 256) and y.dtype == torch.bfloat16
    err = F.relative_error(y, _ref64(x, wq, ws, fmt, bias))
    assert err < tol(fmt, torch.bfloat16), f"seed {seed}: {err:.2e}"


@pytest.mark.gpu
@pytest.mark.parametrize("fmt", BLOCK_FMTS)
def test_fused_gpu_default_configs(fmt, seed):
    """Shipped configurations on the GPU, Flux-like K and an odd M, vs float64 and the two-kernel path."""
    if not torch.cuda.is_available():
        pytest.skip("needs a CUDA GPU")
    m, n, k = 1037, 768, 3072
    x = _x(m, k, torch.bfloat16).cuda()
    wq, ws = (t.cuda() for t in _weight(fmt, n, k))
    bias = torch.randn(n, device="cuda", dtype=torch.bfloat16)
    y = FU.fused_linear(x, wq, ws, fmt, bias, torch.float32)
    err = F.relative_error(y, _ref64(x, wq, ws, fmt, bias))
    assert err < tol(fmt, torch.float32), f"seed {seed}: {err:.2e}"
    xq, xs = Q.act_quant(x, fmt)
    assert torch.equal(y, G.scaled_mm(xq, xs, wq, ws, fmt, bias, torch.float32)), f"seed {seed}"
