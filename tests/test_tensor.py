"""QuantizedTensor: F.linear routing, data movement, (de)serialization and torch.compile without graph breaks."""

import copy
import io

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as Fn

import ditq
from ditq import formats as F
from ditq.errors import FormatError, ShapeError
from ditq.kernels import triton_runs_on
from ditq.tensor import QuantizedTensor

ALL = list(F.FORMATS)
# block formats need N, K divisible by 128; the row/tensor ones get odd shapes
SHAPES = {"int8-row": (72, 200), "fp8-tensor": (40, 136), "fp8-row": (56, 96), "int8-block": (256, 384), "fp8-block": (128, 256)}


def _qweight(fmt, seed, dtype=torch.float32):
    g = torch.Generator().manual_seed(seed)
    n, k = SHAPES[fmt]
    w = torch.randn(n, k, generator=g).to(dtype)
    return w, ditq.quantize_weight(w, fmt)


@pytest.mark.parametrize("fmt", ALL)
def test_f_linear_runs_the_quantized_linear(fmt):
    seed = torch.randint(0, 2**31, ()).item()
    w, q = _qweight(fmt, seed)
    g = torch.Generator().manual_seed(seed + 1)
    x = torch.randn(3, 5, w.shape[1], generator=g)
    b = torch.randn(w.shape[0], generator=g)
    y = Fn.linear(x, q, b)
    ref = F.linear_ref(x.double(), q.qdata, q.scale, fmt, b.double(), compute_dtype=torch.float64)
    assert y.shape == (3, 5, w.shape[0]) and y.dtype == x.dtype
    assert F.relative_error(y, ref) < 1e-5, f"seed {seed}"
    # bias as keyword, and through nn.Linear
    assert torch.equal(Fn.linear(x, q, bias=b), y)
    lin = nn.Linear(w.shape[1], w.shape[0])
    lin.bias.data.copy_(b)
    lin.weight = nn.Parameter(q, requires_grad=False)
    assert torch.equal(lin(x), y)
    # and the quantized product is close to the float one (the format's error, not a routing error)
    assert F.relative_error(y, Fn.linear(x, w, b)) < 0.08


def test_wrong_input_width_names_both_shapes():
    _, q = _qweight("int8-row", 1)
    with pytest.raises(ShapeError, match="expects 200"):
        Fn.linear(torch.randn(2, 199), q)


def test_constructor_refuses_inconsistent_parts():
    _, q = _qweight("int8-row", 2)
    with pytest.raises(FormatError, match="stores"):
        QuantizedTensor(q.qdata.float(), q.scale, "int8-row")
    with pytest.raises(FormatError, match="scale of shape"):
        QuantizedTensor(q.qdata, q.scale[:-1], "int8-row")
    with pytest.raises(FormatError, match="unknown format"):
        QuantizedTensor(q.qdata, q.scale, "int4")
    with pytest.raises(FormatError, match="already quantized"):
        ditq.quantize_weight(q, "int8-row")


def test_math_on_the_wrapper_is_refused_with_advice():
    _, q = _qweight("fp8-row", 3)
    with pytest.raises(NotImplementedError, match="dequantize"):
        q + 1


@pytest.mark.parametrize("fmt", ["int8-row", "fp8-block"])
def test_moves_keep_qdata_and_scale_together(fmt):
    w, q = _qweight(fmt, 4)
    d = q.detach()
    assert isinstance(d, QuantizedTensor) and d.qdata.data_ptr() == q.qdata.data_ptr()
    c = q.clone()
    assert c.qdata.data_ptr() != q.qdata.data_ptr() and torch.equal(c, q)
    h = q.to(torch.bfloat16)  # a model-wide .to(dtype): reported dtype changes, 8-bit data does not
    assert h.dtype == torch.bfloat16 and h.qdata.dtype == q.qdata.dtype and torch.equal(h.qdata, q.qdata)
    assert h.dequantize().dtype == torch.bfloat16
    m = q.to("meta")
    assert m.device.type == "meta" and m.qdata.device.type == "meta" and m.scale.device.type == "meta"
    assert m.format == fmt and m.shape == q.shape
    with pytest.raises(FormatError, match="qdata"):
        q.to(torch.int8)
    e = torch.empty_like(q)
    assert isinstance(e, QuantizedTensor) and e.scale.shape == q.scale.shape


def test_data_setter_moves_the_inner_tensors():
    # diffusers' group offloading and accelerate move weights with `param.data = moved`
    _, q = _qweight("int8-row", 5)
    lin = nn.Linear(200, 72)
    lin.weight = nn.Parameter(q, requires_grad=False)
    _, other = _qweight("int8-row", 6)
    lin.weight.data = other
    assert torch.equal(lin.weight.qdata, other.qdata)
    lin.weight.data = lin.weight.data.to("meta")
    assert lin.weight.device.type == "meta" and lin.weight.qdata.device.type == "meta"
    with pytest.raises(FormatError, match="plain"):
        lin.weight.data = torch.zeros(72, 200)


def test_copy_between_float_and_quantized():
    w, q = _qweight("int8-row", 7)
    dst = ditq.quantize_weight(torch.randn_like(w), "int8-row")
    dst.copy_(q)
    assert torch.equal(dst.qdata, q.qdata) and torch.equal(dst.scale, q.scale)
    w2 = torch.randn_like(w)
    dst.copy_(w2)  # a float source is quantized into the destination's format
    ref = ditq.quantize_weight(w2, "int8-row")
    assert torch.equal(dst.qdata, ref.qdata) and torch.equal(dst.scale, ref.scale)
    f = torch.full_like(w, float("nan"))
    f.copy_(q)  # a quantized source into a float tensor dequantizes
    assert torch.equal(f, q.dequantize(torch.float32))
    with pytest.raises(FormatError, match="fp8-row"):
        dst.copy_(ditq.quantize_weight(w, "fp8-row"))
    with pytest.raises(ShapeError):
        dst.copy_(torch.randn(3, 3))


def _mlp(fmt, seed):
    torch.manual_seed(seed)
    m = nn.Sequential(nn.Linear(256, 384), nn.GELU(), nn.Linear(384, 128))
    for lin in (m[0], m[2]):
        lin.weight = nn.Parameter(ditq.quantize_weight(lin.weight.data, fmt), requires_grad=False)
    return m


def test_state_dict_round_trip_and_assign_into_meta_model():
    m = _mlp("int8-block", 8)
    sd = m.state_dict()
    assert isinstance(sd["0.weight"], QuantizedTensor)
    m2 = _mlp("int8-block", 9)
    m2.load_state_dict(sd)
    assert torch.equal(m2[0].weight.qdata, m[0].weight.qdata) and torch.equal(m2[2].weight.scale, m[2].weight.scale)
    with torch.device("meta"):
        m3 = nn.Sequential(nn.Linear(256, 384), nn.GELU(), nn.Linear(384, 128))
    m3.load_state_dict(sd, assign=True)
    x = torch.randn(4, 256)
    assert torch.equal(m3(x), m(x))
    # a float checkpoint loads into the quantized model by quantizing each weight
    fm = nn.Sequential(nn.Linear(256, 384), nn.GELU(), nn.Linear(384, 128))
    m2.load_state_dict(fm.state_dict())
    assert torch.equal(m2[0].weight.qdata, ditq.quantize_weight(fm[0].weight.data, "int8-block").qdata)


def test_torch_save_load_weights_only_and_deepcopy():
    m = _mlp("fp8-row", 10)
    buf = io.BytesIO()
    torch.save(m.state_dict(), buf)
    buf.seek(0)
    sd = torch.load(buf, weights_only=True)
    assert isinstance(sd["2.weight"], QuantizedTensor) and torch.equal(sd["2.weight"], m[2].weight)
    m2 = copy.deepcopy(m)
    assert isinstance(m2[0].weight, QuantizedTensor) and m2[0].weight.qdata.data_ptr() != m[0].weight.qdata.data_ptr()
    x = torch.randn(2, 256)
    assert torch.equal(m2(x), m(x))


def test_module_to_dtype_and_requires_grad():
    m = _mlp("int8-row", 11)
    m.to(torch.bfloat16)
    assert m[0].weight.dtype == torch.bfloat16 and isinstance(m[0].weight, QuantizedTensor)
    assert m[0].weight.qdata.dtype == torch.int8
    y = m(torch.randn(2, 256, dtype=torch.bfloat16))
    assert y.dtype == torch.bfloat16 and torch.isfinite(y).all()
    m.requires_grad_(False)
    assert not any(p.requires_grad for p in m.parameters())


def test_cat_along_rows_keeps_scales():
    # diffusers' fuse_qkv_projections concatenates q, k, v weights
    qs = [ditq.quantize_weight(torch.randn(128 * (i + 1), 256), "int8-block") for i in range(3)]
    c = torch.cat(qs)
    assert c.shape == (768, 256) and torch.equal(c.dequantize(), torch.cat([q.dequantize() for q in qs]))
    with pytest.raises(FormatError):
        torch.cat([ditq.quantize_weight(torch.randn(8, 16), "fp8-tensor")] * 2)


@pytest.mark.parametrize("fmt", ALL)
def test_compiles_without_graph_breaks(fmt):
    m = _mlp(fmt, 12)
    x = torch.randn(5, 256)
    explained = torch._dynamo.explain(m)(x)
    assert explained.graph_break_count == 0, explained.break_reasons
    compiled = torch.compile(m, fullgraph=True, backend="aot_eager")
    assert F.relative_error(compiled(x), m(x)) < 1e-6


def test_compiles_with_inductor():
    # one quantized linear only: the custom op is an extern call, so inductor generates no C++ (fast test)
    m = _mlp("int8-row", 13)[0]
    x = torch.randn(7, 256)
    torch._dynamo.reset()
    compiled = torch.compile(m, fullgraph=True)
    with torch.no_grad():
        assert F.relative_error(compiled(x), m(x)) < 1e-5


class _SharedInput(nn.Module):
    """Three quantized linears reading one normalized x, as Flux's / Wan's q, k, v projections do."""

    def __init__(self, fmt, seed):
        super().__init__()
        torch.manual_seed(seed)
        self.norm = nn.LayerNorm(256)
        self.q, self.k, self.v = (nn.Linear(256, 128) for _ in range(3))
        for lin in (self.q, self.k, self.v):
            lin.weight = nn.Parameter(ditq.quantize_weight(lin.weight.data, fmt), requires_grad=False)

    def forward(self, x):
        h = self.norm(x) * 1.5 + 0.25
        return self.q(h), self.k(h), self.v(h)


@pytest.mark.parametrize("fmt", ["int8-row", "fp8-row", "int8-block"])
@pytest.mark.parametrize("mode", ["inductor", "op"])
def test_compiled_graph_quantizes_activations_once_per_input(fmt, mode, monkeypatch):
    # "inductor": the activation quantization is traced as torch ops (fusable into the LayerNorm, shared by the
    # three linears after CSE) and the GEMM is ditq.scaled_mm; "op": one ditq.linear per projection
    from torch._dynamo.backends.common import aot_autograd

    import ditq.tensor as T

    monkeypatch.setattr(T, "COMPILE_ACT_QUANT", mode)
    seen = []

    def fw(gm, example_inputs):
        seen.append([n.target for n in gm.graph.nodes if n.op == "call_function"])
        return gm

    m = _SharedInput(fmt, 21)
    x = torch.randn(3, 7, 256)
    if not triton_runs_on(x):  # a GPU machine: CPU tensors take the torch reference, which has no ditq ops to trace
        pytest.skip("needs the Triton interpreter for CPU tensors (TRITON_INTERPRET=1)")
    torch._dynamo.reset()
    with torch.no_grad():
        got = torch.compile(m, fullgraph=True, backend=aot_autograd(fw_compiler=fw))(x)
        want = m(x)
    for g, w in zip(got, want):
        assert F.relative_error(g, w) < 1e-6  # the same scales and rounding as the eager kernel
    ops_ = [str(t) for t in seen[-1]]
    if mode == "inductor":
        assert sum("ditq.scaled_mm" in o for o in ops_) == 3 and not any("ditq.linear" in o for o in ops_)
        assert sum("amax" in o for o in ops_) == 1, ops_  # one quantization of h for three linears
    else:
        assert sum("ditq.linear" in o for o in ops_) == 3 and not any("ditq.scaled_mm" in o for o in ops_)


@pytest.mark.gpu
@pytest.mark.parametrize("fmt", ["int8-row", "fp8-row", "int8-block"])
def test_pinned_non_blocking_round_trip_on_gpu(fmt):
    w, q = _qweight(fmt, 14)
    p = q.pin_memory()
    assert p.is_pinned() and p.qdata.is_pinned() and p.scale.is_pinned()
    g = p.to("cuda", non_blocking=True)
    assert g.qdata.is_cuda and g.scale.is_cuda
    g.record_stream(torch.cuda.current_stream())
    x = torch.randn(9, w.shape[1], device="cuda", dtype=torch.bfloat16)
    y = Fn.linear(x, g.to(torch.bfloat16))
    # few rows may take the weight-only kernel or the W8A8 GEMM: either is within the format's linear bound
    ref = x.double() @ w.double().cuda().t()
    assert F.relative_error(y, ref) < (0.025 if fmt.startswith("int8") else 0.06)
    back = g.cpu()
    assert torch.equal(back.qdata, q.qdata) and torch.equal(back.scale, q.scale)


def test_gradients_flow_to_input_and_bias_through_a_frozen_quantized_weight():
    # LoRA training and anything upstream of a quantized layer need d(loss)/dx; the weight stays frozen
    w, q = _qweight("int8-row", 15)
    x = torch.randn(4, w.shape[1], requires_grad=True)
    b = torch.randn(w.shape[0], requires_grad=True)
    y = Fn.linear(x, q, b)
    gy = torch.randn_like(y)
    y.backward(gy)
    wd = q.dequantize(torch.float64)
    assert F.relative_error(x.grad, gy.double() @ wd) < 1e-6
    assert F.relative_error(b.grad, gy.double().sum(0)) < 1e-6
    assert not q.requires_grad


def test_compiles_when_ops_cannot_tell_it_is_traced(monkeypatch):
    # torch 2.11 does not report is_compiling() while Dynamo runs a node on fake tensors; the eager Triton
    # wrapper would then meet tensors without data. QuantizedTensor routes traced inputs to the custom op.
    from ditq.kernels import ops

    if not ops.triton_runs_on(torch.empty(1)):
        pytest.skip("needs the Triton path (GPU or TRITON_INTERPRET=1)")
    monkeypatch.setattr(ops, "_compiling", lambda: False)
    m = _mlp("fp8-row", 16)
    x = torch.randn(3, 256)
    torch._dynamo.reset()
    with torch.no_grad():
        compiled = torch.compile(m, fullgraph=True, backend="aot_eager")
        assert F.relative_error(compiled(x), m(x)) < 1e-5


def test_rebuilding_a_parameter_from_its_type_and_data_ptr():
    # accelerate rebuilds parameters with `type(param)(value, requires_grad=...)` and maps tied ones by data_ptr
    _, q = _qweight("int8-row", 17)
    p = nn.Parameter(q, requires_grad=False)
    r = type(p)(q.to("meta"), requires_grad=False)
    assert isinstance(r, QuantizedTensor) and isinstance(r, nn.Parameter) and r.device.type == "meta"
    assert r.format == "int8-row" and not r.requires_grad
    assert q.data_ptr() == q.qdata.data_ptr() and q.detach().data_ptr() == q.data_ptr()
