"""The LoRA branch in the kernels: the GEMM epilogue ``acc += xa @ lb^T`` (gemm.scaled_mm(lora_xa, lora_b)),
x @ A^T fused into activation quantization (kernels.lora) and ``ops.linear_lora``, against float64.

Tolerances: the branch is accumulated in fp32 from 16-bit (or fp32) operands, so next to the GEMM's own bounds
(tests/kernels/test_gemm.py) it adds the rounding of xa to its 16-bit dtype (2^-11 fp16, 2^-8 bf16 relative on
the branch). Under the interpreter the operands are fp16 / fp32 (its bf16 dot is wrong); bf16 runs on a GPU."""

import pytest
import torch

from ditq import formats as F
from ditq.errors import ShapeError
from ditq.kernels import gemm as G
from ditq.kernels import lora as KL
from ditq.kernels import ops, quant
from ditq.kernels.gemm import Config

DEV = "cuda" if torch.cuda.is_available() else "cpu"
ROW_FMTS = ["int8-row", "fp8-row", "fp8-tensor"]
DTYPES = [torch.bfloat16, torch.float16] if DEV == "cuda" else [torch.float16, torch.float32]
# TMA, pointer loads with a K tail, persistent (more tiles than the interpreter's 4 programs)
CFGS = [
    Config(32, 32, 64, 4, 4, 1, tma=True),
    Config(16, 64, 32, 2, 4, 1, tma=False),
    Config(32, 32, 64, 2, 4, 1, tma=True, persistent=True),
]
TOL = {torch.float32: 2e-5, torch.float16: 2e-3, torch.bfloat16: 1e-2}  # out dtype rounding + xa rounding


def _branch(n, k, r, dtype, gen):
    a = (torch.randn(r, k, generator=gen) / k**0.5).to(DEV, dtype)
    b = (torch.randn(n, r, generator=gen) * 0.5).to(DEV, dtype)
    return a, b


def _ref64(x, fmt, wq, ws, a, b, bias):
    """float64 of the fused product: the quantized GEMM (of the kernel's own quantized x) + x @ A^T @ B^T + bias."""
    xq, xs = F.quantize_activation_ref(x.reshape(-1, x.shape[-1]), fmt)
    y = F.scaled_mm_ref(xq, xs, wq, ws, fmt, None, torch.float64, torch.float64)
    y = y + (x.reshape(-1, x.shape[-1]).double() @ a.double().t()) @ b.double().t()
    return y + bias.double() if bias is not None else y


@pytest.mark.parametrize("fmt", ROW_FMTS)
@pytest.mark.parametrize("r", [16, 48])
@pytest.mark.parametrize("cfg,chunked", [(CFGS[0], False), (CFGS[1], False), (CFGS[2], False), (CFGS[0], True),
                                         (CFGS[2], True)], ids=["tma", "pointer", "persistent", "tma-chunked",
                                                                "persistent-chunked"])  # fmt: skip
def test_gemm_lora_epilogue(fmt, r, cfg, chunked, seed, poisoned, monkeypatch):
    if chunked:  # no shared memory to spare: r in 16-wide chunks (r 48: three, the fourth masked away)
        monkeypatch.setattr(G, "SMEM_BYTES", 0)
    gen = torch.Generator().manual_seed(seed)
    m, n, k = 37, 45, 96 if cfg.tma else 100  # odd M, N; K with a tail on the pointer path
    for dtype in DTYPES:
        x = torch.randn(m, k, generator=gen).to(DEV)
        wq, ws = F.quantize_weight_ref(torch.randn(n, k, generator=gen).to(DEV) * 0.05, fmt)
        xq, xs = F.quantize_activation_ref(x, fmt)
        a, b = _branch(n, k, r, dtype, gen)
        xa = (x.to(dtype) @ a.t()).to(dtype)
        bias = torch.randn(n, generator=gen).to(DEV, dtype)
        y = G.scaled_mm(xq, xs, wq, ws, fmt, bias, dtype, cfg, lora_xa=xa, lora_b=b)
        want = F.scaled_mm_ref(xq, xs, wq, ws, fmt, bias, torch.float64, torch.float64) + xa.double() @ b.double().t()
        plain = G.scaled_mm(xq, xs, wq, ws, fmt, bias, dtype, cfg)
        err, err_plain = F.relative_error(y, want), F.relative_error(plain, want)
        fp8_gpu = DEV == "cuda" and fmt.startswith("fp8")  # wgmma's fp8 accumulation: test_gemm.py's 1e-3
        assert err < TOL[dtype] + (1e-3 if fp8_gpu else 0) and err_plain > 10 * err, (seed, dtype, err, err_plain)
        # a zero branch adds exactly 0.0 to the fp32 tile: the plain GEMM's output bit for bit in the interpreter;
        # on a GPU the compiler may contract scale * acc + bias into one FMA without the branch between them
        # (seen on an H200), which changes the last bit before the cast
        zero = G.scaled_mm(xq, xs, wq, ws, fmt, bias, dtype, cfg, lora_xa=xa, lora_b=torch.zeros_like(b))
        if DEV == "cuda":
            assert F.relative_error(zero, plain) < 2e-3, (seed, dtype)
        else:
            assert torch.equal(zero, plain), (seed, dtype)


def test_lora_launch_drops_stages_until_it_fits(seed, monkeypatch):
    """A LoRA launch that runs out of shared memory is retried with a shallower pipeline, remembered per config."""
    real = G._launch
    tried = []

    def launch(spec):
        tried.append(spec.num_stages)
        if spec.num_stages > 2:
            raise G.OutOfResources(300000, 232448, "shared memory")
        return real(spec)

    monkeypatch.setattr(G, "_launch", launch)
    monkeypatch.setattr(G, "_LORA_CONFIGS", {})
    gen = torch.Generator().manual_seed(seed)
    dtype = DTYPES[0]
    xq, xs = F.quantize_activation_ref(torch.randn(20, 64, generator=gen).to(DEV), "int8-row")
    wq, ws = F.quantize_weight_ref(torch.randn(24, 64, generator=gen).to(DEV), "int8-row")
    xa, b = torch.randn(20, 16, generator=gen).to(DEV, dtype), torch.randn(24, 16, generator=gen).to(DEV, dtype)
    cfg = Config(16, 32, 32, 2, 4, 4, tma=False)
    for _ in range(2):
        y = G.scaled_mm(xq, xs, wq, ws, "int8-row", None, torch.float32, cfg, lora_xa=xa, lora_b=b)
        want = F.scaled_mm_ref(xq, xs, wq, ws, "int8-row", None, torch.float64, torch.float64) + xa.double() @ b.double().t()
        assert F.relative_error(y, want) < 1e-5
    assert tried == [4, 3, 2, 2] and G._LORA_CONFIGS[(cfg, 16, xa.element_size())].num_stages == 2


def test_gemm_lora_checks():
    xq, xs = F.quantize_activation_ref(torch.randn(8, 64, device=DEV), "int8-row")
    wq, ws = F.quantize_weight_ref(torch.randn(16, 64, device=DEV), "int8-row")
    xa, b = torch.randn(8, 16, device=DEV), torch.randn(16, 16, device=DEV)
    with pytest.raises(ShapeError, match="xa"):
        G.scaled_mm(xq, xs, wq, ws, "int8-row", lora_xa=xa[:7], lora_b=b)
    with pytest.raises(ShapeError, match="dtype"):
        G.scaled_mm(xq, xs, wq, ws, "int8-row", lora_xa=xa, lora_b=b.half())
    bq, bs = F.quantize_activation_ref(torch.randn(8, 128, device=DEV), "int8-block")
    wbq, wbs = F.quantize_weight_ref(torch.randn(128, 128, device=DEV), "int8-block")
    with pytest.raises(ShapeError, match="block formats"):
        G.scaled_mm(bq, bs, wbq, wbs, "int8-block", lora_xa=xa, lora_b=torch.randn(128, 16, device=DEV))


@pytest.mark.parametrize("fmt", ROW_FMTS)
@pytest.mark.parametrize("r", [5, 16, 48])
def test_act_quant_lora(fmt, r, seed, poisoned):
    """q and scale bit for bit those of act_quant; xa = x @ A^T against float64 (odd M, K not a multiple of the
    K tile, strided x, x in another dtype than A)."""
    gen = torch.Generator().manual_seed(seed)
    m, k = 37, 300
    for xdt, adt in [(DTYPES[0], DTYPES[0]), (torch.float32, DTYPES[0])]:
        x = (torch.randn(m, 2 * k, generator=gen) * 3).to(DEV, xdt)[:, ::2]
        x[3, 7] = 40.0  # an outlier sets one row's scale
        a = torch.randn(r, k, generator=gen).to(DEV, adt)
        q, s, xa = KL.act_quant_lora(x, fmt, a)
        q0, s0 = quant.act_quant(x, fmt)
        assert torch.equal(q.view(torch.uint8), q0.view(torch.uint8)) and torch.equal(s, s0)
        ref = x.to(adt).double() @ a.double().t()
        assert xa.dtype == adt and F.relative_error(xa, ref) < TOL[adt], (seed, xdt, adt)


@pytest.mark.parametrize("fused_xa", [True, False])
def test_linear_lora_paths(fused_xa, seed, poisoned, monkeypatch):
    """ops.linear_lora on every path: row formats (epilogue), a block format and few rows (branch after the
    product), 3-D input, no bias; two adapters packed along r (48 + 16)."""
    monkeypatch.setattr(KL, "FUSED_XA", fused_xa)
    gen = torch.Generator().manual_seed(seed)
    dtype = DTYPES[0]
    k = 256
    cases = [("int8-row", 45, (3, 13, k), True), ("fp8-row", 45, (29, k), False),
             ("int8-block", 128, (2, 11, k), True), ("fp8-tensor", 45, (5, k), True)]  # fmt: skip
    for fmt, n, shape, has_bias in cases:
        a1, b1 = _branch(n, k, 48, dtype, gen)
        a2, b2 = _branch(n, k, 16, dtype, gen)
        a, b = torch.cat([a1, a2]), torch.cat([b1, b2 * 0.5], dim=1)
        for wo_rows in (0, 8) if fmt == "fp8-tensor" else (0,):  # 5 rows within 8: the weight-only kernel
            monkeypatch.setattr(ops, "WEIGHT_ONLY_CPU", wo_rows)
            x = torch.randn(*shape, generator=gen).to(DEV, dtype)
            wq, ws = ops.quant_weight(torch.randn(n, k, generator=gen).to(DEV) * 0.05, fmt)
            bias = torch.randn(n, generator=gen).to(DEV, dtype) if has_bias else None
            y = ops.linear_lora(x, wq, ws, fmt, a, b, bias)
            assert y.shape == (*shape[:-1], n) and y.dtype == dtype
            plain = ops.linear(x, wq, ws, fmt, bias)
            if wo_rows:  # weight-only: x is not quantized
                want = (x.double() @ ops.dequant_weight(wq, ws, fmt, torch.float64).t()).reshape(-1, n)
                want = want + (x.reshape(-1, k).double() @ a.double().t()) @ b.double().t() + bias.double()
            else:
                want = _ref64(x, fmt, wq, ws, a, b, bias)
            err = F.relative_error(y.reshape(-1, n), want)
            err_plain = F.relative_error(plain.reshape(-1, n), want)
            assert err < 2 * TOL[dtype] and err_plain > 10 * err, (seed, fmt, wo_rows, err, err_plain)


def test_linear_lora_shape_errors():
    x = torch.randn(4, 64, device=DEV, dtype=DTYPES[0])
    wq, ws = ops.quant_weight(torch.randn(32, 64, device=DEV), "int8-row")
    a, b = torch.randn(16, 64, device=DEV, dtype=DTYPES[0]), torch.randn(32, 16, device=DEV, dtype=DTYPES[0])
    with pytest.raises(ShapeError, match="lora_a"):
        ops.linear_lora(x, wq, ws, "int8-row", a[:, :32], b)
    with pytest.raises(ShapeError, match="lora_b"):
        ops.linear_lora(x, wq, ws, "int8-row", a, b[:31])
    with pytest.raises(ShapeError, match="dtype"):
        ops.linear_lora(x, wq, ws, "int8-row", a, b.float())


def test_linear_lora_fake_for_compile():
    """The registered op's fake implementation: output shape and dtype without running a kernel."""
    from torch._subclasses.fake_tensor import FakeTensorMode

    with FakeTensorMode():
        x = torch.empty(2, 7, 64, dtype=torch.float16)
        wq, ws = torch.empty(32, 64, dtype=torch.int8), torch.empty(32, 1)
        a, b = torch.empty(16, 64, dtype=torch.float16), torch.empty(32, 16, dtype=torch.float16)
        y = torch.ops.ditq.linear_lora(x, wq, ws, "int8-row", a, b, None, torch.bfloat16)
        assert y.shape == (2, 7, 32) and y.dtype == torch.bfloat16


def test_lora_launch_falls_back_from_a_refused_persistent_kernel(seed, monkeypatch):
    real = G._launch

    def launch(spec):
        if spec.kernel is G._scaled_mm_persistent_kernel:
            raise RuntimeError("compiler refused the flattened loop")
        return real(spec)

    monkeypatch.setattr(G, "_launch", launch)
    monkeypatch.setattr(G, "_LORA_CONFIGS", {})
    gen = torch.Generator().manual_seed(seed)
    xq, xs = F.quantize_activation_ref(torch.randn(20, 64, generator=gen).to(DEV), "fp8-row")
    wq, ws = F.quantize_weight_ref(torch.randn(24, 64, generator=gen).to(DEV), "fp8-row")
    xa, b = torch.randn(20, 16, generator=gen).to(DEV, DTYPES[0]), torch.randn(24, 16, generator=gen).to(DEV, DTYPES[0])
    cfg = CFGS[2]
    y = G.scaled_mm(xq, xs, wq, ws, "fp8-row", None, torch.float32, cfg, lora_xa=xa, lora_b=b)
    want = F.scaled_mm_ref(xq, xs, wq, ws, "fp8-row", None, torch.float64, torch.float64) + xa.double() @ b.double().t()
    assert F.relative_error(y, want) < 1e-3 and not G._LORA_CONFIGS[(cfg, 16, xa.element_size())].persistent
