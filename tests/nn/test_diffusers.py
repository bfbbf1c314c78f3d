"""diffusers transformers with ditq weights: tiny configs of the five supported families on the CPU
(quantize_, forward, cosine vs float, state_dict round trip, compile without graph breaks, group offloading
hooks), and the CUDA-only offloading paths (model / sequential CPU offload, streamed group offload)."""

import copy
import io

import pytest
import torch

import ditq
from ditq import formats as F
from ditq.bench.model import ARCHS, forward, make_inputs, model_class
from ditq.tensor import QuantizedTensor

pytest.importorskip("diffusers")

FAMILIES = ["flux", "wan-14b", "kandinsky5-lite", "sd3", "hunyuanvideo"]


def _tiny(name, seed=0, dtype=torch.float32):
    arch = ARCHS[name]
    torch.manual_seed(seed)
    model = model_class(arch)(**arch.tiny_config).to(dtype).eval()
    kwargs, _ = make_inputs(arch, arch.tiny_config, arch.tiny_size, "cpu", dtype, seed)
    return model, kwargs


def _cos(a, b):
    return torch.nn.functional.cosine_similarity(a.double().flatten(), b.double().flatten(), dim=0).item()


@pytest.mark.parametrize("name", FAMILIES)
def test_quantized_forward_matches_float(name):
    model, kw = _tiny(name, seed=1)
    with torch.no_grad():
        ref = forward(model, kw)
        report = ditq.quantize_(model, "int8-row", min_elements=0)
        y = forward(model, kw)
    assert report.preset != "generic", "family not detected from diffusers' names"
    assert len(report.quantized) >= 4 and report.kept  # embedders / final layers stay in high precision
    assert report.model_bytes_after < report.model_bytes_before
    assert torch.isfinite(y).all() and y.shape == ref.shape
    assert _cos(y, ref) > 0.995, _cos(y, ref)


@pytest.mark.parametrize("name", ["flux", "wan-14b"])
def test_state_dict_round_trip_into_a_fresh_model(name):
    model, kw = _tiny(name, seed=2)
    ditq.quantize_(model, "fp8-row", min_elements=0)
    buf = io.BytesIO()
    torch.save(model.state_dict(), buf)
    buf.seek(0)
    sd = torch.load(buf, weights_only=True)
    with ditq.nn.empty_weights():
        fresh = model_class(ARCHS[name])(**ARCHS[name].tiny_config)
    fresh.load_state_dict(sd, assign=True)
    fresh.eval()
    n_q = sum(isinstance(p, QuantizedTensor) for p in fresh.parameters())
    assert n_q == sum(isinstance(p, QuantizedTensor) for p in model.parameters()) > 0
    with torch.no_grad():
        assert torch.equal(forward(fresh, kw), forward(model, kw))


def test_compiles_without_graph_breaks():
    model, kw = _tiny("flux", seed=3)
    ditq.quantize_(model, "int8-row", min_elements=0)
    torch._dynamo.reset()
    with torch.no_grad():
        explained = torch._dynamo.explain(lambda: forward(model, kw))()
        assert explained.graph_break_count == 0, explained.break_reasons
        compiled = torch.compile(model, fullgraph=True, backend="aot_eager")
        assert F.relative_error(forward(compiled, kw), forward(model, kw)) < 1e-5


def test_group_offloading_hooks_keep_quantized_weights_whole():
    # diffusers' block-level group offloading ("block swap") moves weights with `param.data = ...`; on a
    # CPU-only machine onload and offload devices are both the CPU, which still runs every hook and setter.
    # diffusers' offloading hooks need accelerate (the `diffusers` extra of ditq installs it)
    pytest.importorskip("accelerate")
    from diffusers.hooks import apply_group_offloading

    model, kw = _tiny("wan-14b", seed=4)
    ditq.quantize_(model, "int8-row", min_elements=0)
    with torch.no_grad():
        ref = forward(model, kw)
    apply_group_offloading(model, onload_device=torch.device("cpu"), offload_type="block_level", num_blocks_per_group=1)
    with torch.no_grad():
        y1, y2 = forward(model, kw), forward(model, kw)
    assert torch.equal(y1, ref) and torch.equal(y2, ref)
    assert all(p.qdata.device.type == "cpu" for p in model.parameters() if isinstance(p, QuantizedTensor))


def test_model_to_dtype_keeps_8bit_data():
    model, kw = _tiny("sd3", seed=5)
    ditq.quantize_(model, "int8-row", min_elements=0)
    model.to(torch.bfloat16)
    qs = [p for p in model.parameters() if isinstance(p, QuantizedTensor)]
    assert qs and all(p.dtype == torch.bfloat16 and p.qdata.dtype == torch.int8 for p in qs)
    kw = {k: (v.to(torch.bfloat16) if torch.is_tensor(v) and v.is_floating_point() else v) for k, v in kw.items()}
    with torch.no_grad():
        assert torch.isfinite(forward(model, kw)).all()


@pytest.mark.parametrize("sequential", [False, True])
def test_accelerate_offload_hooks_on_cpu(sequential):
    # what enable_model_cpu_offload / enable_sequential_cpu_offload install on each pipeline component, with
    # the CPU as execution device: weights go to meta and come back from the offloaded copy at every call
    accelerate = pytest.importorskip("accelerate")
    model, kw = _tiny("flux", seed=7)
    ditq.quantize_(model, "int8-row", min_elements=0)
    with torch.no_grad():
        ref = forward(model, kw)
    if sequential:
        accelerate.cpu_offload(model, execution_device="cpu")
        assert all(p.is_meta for p in model.parameters())
    else:
        _, hook = accelerate.cpu_offload_with_hook(model, execution_device="cpu")
    with torch.no_grad():
        y1, y2 = forward(model, kw), forward(model, kw)
    assert torch.equal(y1, ref) and torch.equal(y2, ref)
    if sequential:
        q = [p for p in model.parameters() if isinstance(p, QuantizedTensor)]
        assert q and all(p.is_meta and p.qdata.is_meta for p in q)


# -- CUDA only: the offloading modes that move weights between host and GPU ----------------------------------
def _gpu_pair(name, fmt="int8-row"):
    model, kw = _tiny(name, seed=6, dtype=torch.bfloat16)
    ditq.quantize_(model, fmt, min_elements=0)
    ref_model = copy.deepcopy(model).cuda()
    kw = {k: (v.cuda() if torch.is_tensor(v) else v) for k, v in kw.items()}
    with torch.no_grad():
        ref = forward(ref_model, kw)
    return model, kw, ref


@pytest.mark.gpu
@pytest.mark.parametrize("use_stream", [False, True])
def test_group_offloading_to_gpu(use_stream):
    from diffusers.hooks import apply_group_offloading

    model, kw, ref = _gpu_pair("flux")
    apply_group_offloading(
        model, onload_device=torch.device("cuda"), offload_type="block_level", num_blocks_per_group=1,
        use_stream=use_stream, record_stream=use_stream,
    )
    with torch.no_grad():
        y1, y2 = forward(model, kw), forward(model, kw)
    torch.cuda.synchronize()
    assert torch.equal(y1, ref) and torch.equal(y2, ref)
    blocks = [p for n, p in model.named_parameters() if "blocks" in n and isinstance(p, QuantizedTensor)]
    assert blocks and all(p.qdata.device.type == "cpu" and p.scale.device.type == "cpu" for p in blocks)


@pytest.mark.gpu
def test_accelerate_model_and_sequential_offload():
    # what enable_model_cpu_offload / enable_sequential_cpu_offload install on each pipeline component
    accelerate = pytest.importorskip("accelerate")
    model, kw, ref = _gpu_pair("wan-14b")
    m1 = copy.deepcopy(model)
    _, hook = accelerate.cpu_offload_with_hook(m1, execution_device="cuda")
    with torch.no_grad():
        assert torch.equal(forward(m1, kw), ref)
    hook.offload()
    assert all(p.device.type == "cpu" for p in m1.parameters())
    m2 = copy.deepcopy(model)
    accelerate.cpu_offload(m2, execution_device="cuda")
    with torch.no_grad():
        y = forward(m2, kw)
    assert F.relative_error(y, ref) < 1e-3


def test_bench_model_smoke_on_tiny_configs(tmp_path):
    # the GPU benchmark's own path (build on meta, seeded init, quantize_ in and out, compare) on the CPU
    import argparse
    import json

    from ditq.bench import model as bench

    p = argparse.ArgumentParser()
    bench.add_arguments(p)
    out = tmp_path / "b.json"
    args = p.parse_args(["--tiny", "--device", "cpu", "--arch", "flux", "--formats", "int8-row,fp8-row+mod",
                         "--compile", "none", "--reps", "1", "--warmup", "0", "--json", str(out)])
    assert bench.main(args) == 0
    res = json.loads(out.read_text())["archs"]["flux"]["results"]
    assert [r["variant"] for r in res] == ["bf16", "int8-row", "fp8-row+mod"]
    assert all("error" not in r and r["finite"] for r in res[1:])
    assert res[1]["cosine"] > 0.99 and res[2]["quantized_layers"] > res[1]["quantized_layers"]
    assert res[2]["weight_gb"] < res[1]["weight_gb"] < res[0]["weight_gb"]
