"""The kernels on a real GPU at diffusion-transformer shapes (skipped without CUDA). Same bounds as the CPU
tests; the shapes are the ones the tiles, TMA boxes and pipelining are tuned for."""

import pytest
import torch

from ditq import formats as F
from ditq.kernels import gemm as G
from ditq.kernels import ops
from ditq.kernels import quant as Q

FMTS = list(F.FORMATS)
BOUND = {True: 0.025, False: 0.06}
pytestmark = pytest.mark.gpu


@pytest.mark.parametrize("fmt", FMTS)
@pytest.mark.parametrize("mnk", [(4608, 3072, 12288), (1000, 1536, 3072)])
def test_linear_at_diffusion_shapes(fmt, mnk, poisoned, seed):
    m, n, k = mnk
    f = F.get_format(fmt)
    x = torch.randn(m, k, device="cuda", dtype=torch.bfloat16)
    w = torch.randn(n, k, device="cuda") * 0.02
    b = torch.randn(n, device="cuda", dtype=torch.bfloat16)
    wq, ws = ops.quant_weight(w, f)
    wq_r, ws_r = F.quantize_weight_ref(w, f)
    assert torch.equal(ws, ws_r) and torch.equal(wq.view(torch.int8), wq_r.view(torch.int8)), f"seed {seed}"
    assert torch.equal(ops.dequant_weight(wq, ws, f, torch.bfloat16), F.dequantize_ref(wq, ws, f, torch.bfloat16))
    q, s = ops.act_quant(x, f)
    qr, sr = F.quantize_activation_ref(x, f)
    assert torch.equal(s, sr), f"seed {seed}: activation scales"
    qd = (q.float() - qr.float()).abs()
    step = 1.0 if f.is_int else qr.float().abs() * 2.0**-3 + 2.0**-9
    assert bool((qd <= step).all()) and (qd > 0).float().mean().item() < 5e-3, f"seed {seed}: activation q"
    q_exact, _ = Q.act_quant(x, f, exact_div=True)
    assert torch.equal(q_exact.view(torch.int8), qr.view(torch.int8)), f"seed {seed}: exact division"
    y = ops.linear(x, wq, ws, f, b)
    y_ref = F.linear_ref(x, wq, ws, f, b, torch.float32)
    assert F.relative_error(y, y_ref) < 6e-3, f"seed {seed}: kernel vs reference"
    truth = torch.nn.functional.linear(x.float(), w, b.float())
    assert F.relative_error(y, truth) < BOUND[f.is_int], f"seed {seed}: vs float"
    for cfg in _alt_configs(f):  # the other code paths compile and agree too
        y2 = G.scaled_mm(q, s, wq, ws, f, b, torch.bfloat16, config=cfg)
        assert F.relative_error(y2, y) < 6e-3, f"seed {seed}: {cfg}"


def _alt_configs(f):
    C = G.Config
    if f.is_block:
        return [
            C(128, 128, 128, 8, 8, 3, tma=False, dot2=True),
            C(64, 128, 128, 8, 4, 3, tma=True, magic_i2f=f.is_int),
            C(128, 128, 128, 8, 8, 3, tma=True, persistent=True),
        ]
    return [C(128, 128, 64, 8, 4, 3, tma=False), C(64, 128, 128, 8, 4, 3, tma=True), C(128, 256, 128, 8, 8, 3, persistent=True)]


@pytest.mark.parametrize("fmt", ["int8-row", "fp8-block"])
def test_compiled_linear_matches_eager(fmt, seed):
    x = torch.randn(2, 333, 1024, device="cuda", dtype=torch.bfloat16)
    wq, ws = ops.quant_weight(torch.randn(2048, 1024, device="cuda") * 0.02, fmt)
    b = torch.randn(2048, device="cuda", dtype=torch.bfloat16)
    torch._dynamo.reset()
    f = torch.compile(lambda x: ops.linear(x, wq, ws, fmt, b) * 2, fullgraph=True)
    assert torch.equal(f(x), ops.linear(x, wq, ws, fmt, b) * 2)


@pytest.mark.parametrize("raw", [False, True])
@pytest.mark.parametrize("fmt", FMTS)
def test_repeated_launches_agree(fmt, raw, seed, monkeypatch):
    """The first launch of a specialization compiles through Triton; later ones take ditq's cached launch
    path (raw: the C launcher directly, with cached TMA maps): they must compute the same, also when the
    activation's strides change between calls."""
    monkeypatch.setattr(Q, "RAW_LAUNCH", raw)
    ops.clear_plans()
    x = torch.randn(1000, 3072, device="cuda", dtype=torch.bfloat16)
    wq, ws = ops.quant_weight(torch.randn(1536, 3072, device="cuda") * 0.02, fmt)
    b = torch.randn(1536, device="cuda", dtype=torch.bfloat16)
    ys = [ops.linear(x, wq, ws, fmt, b) for _ in range(3)]
    assert all(torch.equal(ys[0], y) for y in ys[1:]), f"seed {seed}"
    xt = x.t().contiguous().t()  # column-major: another act-quant specialization, same result
    assert torch.equal(ops.linear(xt, wq, ws, fmt, b), ys[0]) and torch.equal(ops.linear(xt, wq, ws, fmt, b), ys[0])
    assert F.relative_error(ys[0], F.linear_ref(x, wq, ws, fmt, b, torch.float32)) < 6e-3
    ops.clear_plans()


@pytest.mark.parametrize("fmt", FMTS)
def test_launch_plans_match_the_general_path(fmt, poisoned, seed):
    """ops.linear's plans (built at the first call of a weight and activation shape, replayed by direct C
    launcher calls with kept buffers) give bit-for-bit the result of the regular wrappers, for the weight-only
    rows, the W8A8 path with kept and with fresh activation buffers, 3-D and strided x, no bias, fp32 out;
    also when new data arrives at the same addresses, and on another stream."""
    ops.clear_plans()
    f = F.get_format(fmt)
    n, k = 640, 1536
    wq, ws = ops.quant_weight(torch.randn(n, k, device="cuda") * 0.02, f)
    b = torch.randn(n, device="cuda", dtype=torch.bfloat16)
    limit = ops.weight_only_max_m(b, f)
    cases = [((1, k), b, None), ((2, 8, k), b, None), ((limit, k), None, torch.float32), ((limit + 1, k), b, None),
             ((3, 100, k), b, torch.float32), ((5000, k), b, None)]  # fmt: skip
    for shape, bias, out_dtype in cases:
        m = int(torch.tensor(shape[:-1]).prod())
        for layout in ("contiguous", "column-major"):
            x = torch.randn(*shape, device="cuda", dtype=torch.bfloat16)
            if layout == "column-major":
                if len(shape) != 2:
                    continue
                x = x.t().contiguous().t()
            general = ops._linear_general(x, wq, ws, f, bias, out_dtype, 0 < m <= limit)
            ys = [ops.linear(x, wq, ws, f, bias, out_dtype) for _ in range(3)]
            what = f"seed {seed} {shape} {layout} bias={bias is not None} {out_dtype}"
            assert all(torch.equal(y, general) for y in ys), what
            x.copy_(torch.randn_like(x))  # same addresses, new values: the plan reads them
            general = ops._linear_general(x, wq, ws, f, bias, out_dtype, 0 < m <= limit)
            assert torch.equal(ops.linear(x, wq, ws, f, bias, out_dtype), general), what
            side = torch.cuda.Stream()
            side.wait_stream(torch.cuda.current_stream())
            with torch.cuda.stream(side):
                y_side = ops.linear(x, wq, ws, f, bias, out_dtype)
            torch.cuda.current_stream().wait_stream(side)
            assert torch.equal(y_side, general), what + " (side stream)"
            if m <= limit:
                ref = x.reshape(-1, k).double() @ F.dequantize_ref(wq, ws, f, torch.float64).t()
            else:
                ref = F.linear_ref(x.reshape(-1, k), wq, ws, f, None, torch.float64, torch.float64)
            ref = ref if bias is None else ref + bias.double()
            assert F.relative_error(general.reshape(-1, n), ref) < 6e-3, what
    ops.clear_plans()


@pytest.mark.parametrize("fmt", ["int8-row", "fp8-block"])
def test_linear_in_a_cuda_graph(fmt, seed):
    """Captured linears (weight-only and W8A8: buffers come from the graph's pool) replay with new inputs."""
    ops.clear_plans()
    wq, ws = ops.quant_weight(torch.randn(512, 1024, device="cuda") * 0.02, fmt)
    xs = [torch.randn(m, 1024, device="cuda", dtype=torch.bfloat16) for m in (4, 700)]
    for x in xs:  # warm: plans exist before the capture
        ops.linear(x, wq, ws, fmt)
    g = torch.cuda.CUDAGraph()
    with torch.cuda.graph(g):
        outs = [ops.linear(x, wq, ws, fmt) for x in xs]
    for x in xs:
        x.copy_(torch.randn_like(x))
    g.replay()
    for x, y in zip(xs, outs):
        eager = ops.linear(x, wq, ws, fmt)
        if x.shape[0] > ops.weight_only_max_m(x, fmt):
            assert torch.equal(y, eager), f"seed {seed} M={x.shape[0]}"
        else:  # the capture stream had no split-K workspace yet: unsplit K, another summation order
            assert F.relative_error(y, eager) < 5e-3, f"seed {seed} M={x.shape[0]}"
    ops.clear_plans()
