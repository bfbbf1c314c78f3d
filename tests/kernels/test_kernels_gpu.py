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
    x = torch.randn(1000, 3072, device="cuda", dtype=torch.bfloat16)
    wq, ws = ops.quant_weight(torch.randn(1536, 3072, device="cuda") * 0.02, fmt)
    b = torch.randn(1536, device="cuda", dtype=torch.bfloat16)
    ys = [ops.linear(x, wq, ws, fmt, b) for _ in range(3)]
    assert all(torch.equal(ys[0], y) for y in ys[1:]), f"seed {seed}"
    xt = x.t().contiguous().t()  # column-major: another act-quant specialization, same result
    assert torch.equal(ops.linear(xt, wq, ws, fmt, b), ys[0]) and torch.equal(ops.linear(xt, wq, ws, fmt, b), ys[0])
    assert F.relative_error(ys[0], F.linear_ref(x, wq, ws, fmt, b, torch.float32)) < 6e-3
