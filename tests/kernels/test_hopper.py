"""The warp-specialized Gluon GEMMs of ``kernels/hopper.py``: equal bit for bit to the Triton kernel on a Hopper
GPU (odd shapes, tails, every output dtype), through launch plans and CUDA graphs (the output's TMA map is
encoded per call); elsewhere (CPU, LoRA, unaligned output rows) their configuration falls back to the Triton
kernel with the same result."""

import pytest
import torch

from ditq import formats as F
from ditq.kernels import configs as CF
from ditq.kernels import gemm as G
from ditq.kernels import hopper as H
from ditq.kernels import ops

HOPPER = torch.cuda.is_available() and H.available()
hopper_only = pytest.mark.skipif(not HOPPER, reason="needs a Hopper GPU and Gluon")


def _operands(fmt, m, n, k, device, seed_bias=True):
    f = F.get_format(fmt)
    x = torch.randn(m, k, device=device, dtype=torch.bfloat16)
    w = torch.randn(n, k, device=device) * 0.02
    b = torch.randn(n, device=device, dtype=torch.bfloat16) if seed_bias else None
    wq, ws = ops.quant_weight(w, f)
    xq, xs = ops.act_quant(x, f)
    return f, x, w, b, wq, ws, xq, xs


def _triton_config(fmt, m, n, k):
    return CF.tuned().get(CF.key(fmt, m, n, k)) or CF.heuristic(fmt, m, n, k)


def test_config_round_trip():
    c = CF.WS_CONFIG
    assert c.ws and G.Config.from_list(c.as_list()) == c
    old = c.as_list()[:13]  # a table written before the field existed
    assert not G.Config.from_list(old).ws


@pytest.mark.parametrize("fmt", H.FORMATS)
def test_fallback_where_the_kernel_does_not_apply(fmt, device, poisoned, seed):
    """A warp-specialized config given for operands the Gluon kernel does not take (no Hopper GPU here, or an
    output row of 100 bf16 = 200 bytes, not a multiple of 16): the Triton kernel runs instead, same result as
    with its fallback configuration."""
    if device.type == "cuda" and F.get_format(fmt).is_block:
        pytest.skip("block formats have N % 128 == 0: their outputs always fit the kernel on a Hopper GPU")
    m, n, k = (9, 128, 256) if device.type == "cpu" else (300, 100, 512)
    f, x, w, b, wq, ws, xq, xs = _operands(fmt, m, n, k, device)
    assert not H.usable(xq, wq, torch.empty(m, n, dtype=torch.bfloat16, device=device), f)
    y = G.scaled_mm(xq, xs, wq, ws, f, b, config=CF.WS_CONFIG)
    ref = F.linear_ref(x, wq, ws, f, b, torch.float64, torch.float64)
    assert F.relative_error(y, ref) < 6e-3, f"seed {seed}"
    if device.type == "cuda":
        assert torch.equal(y, G.scaled_mm(xq, xs, wq, ws, f, b, config=G.WS_FALLBACK[f.is_block])), f"seed {seed}"


@hopper_only
@pytest.mark.gpu
@pytest.mark.parametrize("fmt", H.FORMATS)
@pytest.mark.parametrize("mnk, out_dtype", [((m, n, k), torch.bfloat16) for m, n, k in (
    (77, 136, 256), (77, 128, 256), (130, 384, 1280), (1000, 2944, 3072), (4608, 3072, 3072), (2048, 256, 128),
    (3000, 1000, 400), (4608, 3072, 12288), (2432, 2048, 4224))] + [((m, n, k), dt) for m, n, k in (
    (1000, 2944, 3072), (2432, 2048, 4224)) for dt in (torch.float16, torch.float32)])  # fmt: skip
def test_equal_to_the_triton_kernel(fmt, mnk, out_dtype, poisoned, seed):
    """Same operands through both kernels: equal bit for bit (same products, same epilogue arithmetic), every
    element written (poisoned outputs), and within the float64 reference's bound. Shapes: row and column tails,
    one K step, a K tail (400, row format only), a half-empty 256-wide tile (N = 128, 384), a tile grid smaller
    and larger than the SMs, a last wave split over K into 3 and 2 slices (4608 x 3072 x 12288; 2432 x 2048 x
    4224, the last slice one step shorter). A split block format sums its slices' fp32 partial sums in another
    association than one loop does: within one bf16 rounding step there, not bit for bit."""
    m, n, k = mnk
    if F.get_format(fmt).is_block and (k % 128 or n % 128):
        pytest.skip("block formats need N and K divisible by 128")
    f, x, w, b, wq, ws, xq, xs = _operands(fmt, m, n, k, "cuda")
    out = torch.empty(m, n, device="cuda", dtype=out_dtype)
    assert H.usable(xq, wq, out, f)
    y = G.scaled_mm(xq, xs, wq, ws, f, b, out_dtype, config=CF.WS_CONFIG)
    assert G.last_compiled is not None and G.last_compiled.name == "_ws_gemm_kernel"
    tri = G.scaled_mm(xq, xs, wq, ws, f, b, out_dtype, config=_triton_config(fmt, m, n, k))
    assert G.last_compiled.name == "_scaled_mm_kernel"
    _assert_same(y, tri, f.is_block and _split(m, n, k), f"seed {seed}")
    ref = F.linear_ref(x, wq, ws, f, b, torch.float64, torch.float64)
    assert F.relative_error(y, ref) < 6e-3, f"seed {seed}"
    y_nobias = G.scaled_mm(xq, xs, wq, ws, f, None, out_dtype, config=CF.WS_CONFIG)
    tri_nobias = G.scaled_mm(xq, xs, wq, ws, f, None, out_dtype, config=_triton_config(fmt, m, n, k))
    _assert_same(y_nobias, tri_nobias, f.is_block and _split(m, n, k), f"seed {seed}, no bias")


def _split(m, n, k) -> bool:
    """Whether the warp-specialized launch splits its last wave over K at this shape."""
    tiles = -(-m // H.BLOCK_M) * -(-n // H.BLOCK_N)
    return G.tail_split(tiles, k, CF.WS_CONFIG, min(tiles, G._num_sms(torch.device("cuda"))))[1] > 1


def _assert_same(y, tri, reassociated: bool, what: str):
    if not reassociated:
        assert torch.equal(y, tri), f"{what}: max diff {float((y.float() - tri.float()).abs().max())}"
        return
    d = (y.float() - tri.float()).abs()
    step = tri.float().abs() * (2.0**-7 if y.dtype == torch.bfloat16 else 2.0**-10 if y.dtype == torch.float16 else 1e-5)
    assert bool((d <= step + 1e-6).all()), f"{what}: max diff {float(d.max())}"
    if y.dtype != torch.float32:  # fp32 keeps the last bits that the reassociation moves: most tail elements differ
        assert (d > 0).float().mean().item() < 0.05, f"{what}: {(d > 0).float().mean().item():.3f} of the elements differ"


@hopper_only
@pytest.mark.gpu
def test_routing():
    """get_config takes the warp-specialized kernel for its formats from MIN_M rows on a Hopper GPU."""
    for fmt in F.FORMATS:
        c = CF.get_config(fmt, H.MIN_M, 3072, 3072)
        assert c.ws == (fmt in H.FORMATS), fmt
        assert not CF.get_config(fmt, H.MIN_M - 1, 3072, 3072).ws, fmt


@hopper_only
@pytest.mark.gpu
@pytest.mark.parametrize("fmt", H.FORMATS)
def test_plans_and_graphs_write_each_calls_output(fmt, seed):
    """Through ops.linear's launch plans the output's TMA map is encoded per call: several live outputs, each
    with its own result; captured in a CUDA graph (its own tail workspace) and replayed with new inputs, equal
    to eager calls."""
    ops.clear_plans()
    m, n, k = 2432, 2048, 4224  # a last wave split over K: the partial sums' workspace goes through the plan
    f, x, w, b, wq, ws, _, _ = _operands(fmt, m, n, k, "cuda")
    xs_in = [torch.randn(m, k, device="cuda", dtype=torch.bfloat16) for _ in range(3)]
    general = [ops._linear_general(xi, wq, ws, f, b, None, False) for xi in xs_in]
    ys = [ops.linear(xi, wq, ws, f, b) for xi in xs_in]  # first builds the plan, the others replay it
    assert all(torch.equal(y, g) for y, g in zip(ys, general)), f"seed {seed}"
    for dt in (torch.float32, torch.float16):
        assert torch.equal(ops.linear(xs_in[0], wq, ws, f, b, dt), ops._linear_general(xs_in[0], wq, ws, f, b, dt, False))
    g = torch.cuda.CUDAGraph()
    with torch.cuda.graph(g):
        outs = [ops.linear(xi, wq, ws, f, b) for xi in xs_in]
    for xi in xs_in:
        xi.copy_(torch.randn_like(xi))
    g.replay()
    for xi, y in zip(xs_in, outs):
        assert torch.equal(y, ops.linear(xi, wq, ws, f, b)), f"seed {seed}"
    ops.clear_plans()


@hopper_only
@pytest.mark.gpu
def test_lora_takes_the_triton_kernel(seed):
    """A LoRA branch (in the Triton kernel's epilogue) with a warp-specialized config: the fallback runs it."""
    m, n, k, r = H.MIN_M, 512, 1024, 16
    f, x, w, b, wq, ws, xq, xs = _operands("int8-row", m, n, k, "cuda")
    xa = torch.randn(m, r, device="cuda", dtype=torch.bfloat16)
    lb = torch.randn(n, r, device="cuda", dtype=torch.bfloat16) * 0.1
    y = G.scaled_mm(xq, xs, wq, ws, f, b, config=CF.WS_CONFIG, lora_xa=xa, lora_b=lb)
    assert torch.equal(y, G.scaled_mm(xq, xs, wq, ws, f, b, config=G.WS_FALLBACK[False], lora_xa=xa, lora_b=lb))
    ref = F.linear_ref(x, wq, ws, f, b, torch.float64, torch.float64) + xa.double() @ lb.double().t()
    assert F.relative_error(y, ref) < 6e-3, f"seed {seed}"
