"""QuantizedTensor: an 8-bit weight that behaves like the float tensor it replaces.

It holds ``qdata`` ([N, K], int8 or float8_e4m3fn), ``scale`` (float32, shape per format, see
``ditq.formats``) and the format name, reports the original weight's shape [N, K] and dtype (the compute
dtype), and moves its two inner tensors together: ``.to`` / ``.cpu()`` / ``.cuda(non_blocking=True)``,
``pin_memory``, ``copy_``, ``param.data = other``, ``record_stream``, ``state_dict`` / ``load_state_dict``,
``torch.save`` / ``torch.load(weights_only=True)``, ``copy.deepcopy``.

``F.linear(x, qweight, bias)`` (so every ``nn.Linear`` holding one) goes straight to
``ditq.kernels.ops.linear``: ``__torch_function__`` intercepts it before autograd and aten see the call,
so an eager call costs one Python function on top of the kernel wrapper. Every other torch function runs
as usual on the wrapper and reaches ``__torch_dispatch__``, which supports the data-movement ops and
refuses math (``.dequantize()`` first).

It is a traceable wrapper subclass (``__tensor_flatten__`` / ``__tensor_unflatten__``): under
``torch.compile`` Dynamo inlines ``__torch_function__``, the graph sees the plain ``qdata`` / ``scale``
tensors and the kernel custom op, and there is no graph break.
"""

from __future__ import annotations

import weakref

import torch
import torch.nn.functional as Fn

from . import formats as F
from .errors import FormatError, ShapeError
from .kernels import HAS_TRITON, ops

aten = torch.ops.aten

_F_LINEAR = Fn.linear
_DATA_SET = torch.Tensor.data.__set__
_DATA_PTR = torch.Tensor.data_ptr


class QuantizedTensor(torch.Tensor):
    """An [N, K] weight stored as ``qdata`` (storage dtype of ``format``) times ``scale`` (float32).

    ``dtype`` is the dtype the weight reports and dequantizes to by default (the original weight's, or
    the one a later ``model.to(dtype)`` asked for); ``qdata`` never changes dtype."""

    qdata: torch.Tensor
    scale: torch.Tensor
    format: str
    rotation: int | None  # Hadamard group size g of a rotated int8-row weight (qdata holds W H_g), else None

    @staticmethod
    def __new__(cls, qdata, scale=None, format=None, dtype: torch.dtype = torch.bfloat16, requires_grad: bool = False,
                rotation: int | None = None):
        if isinstance(qdata, QuantizedTensor) and scale is None:
            # `type(param)(value, requires_grad=...)`, as accelerate rebuilds a parameter after moving it
            # (enable_sequential_cpu_offload): the same as nn.Parameter(value)
            return torch.nn.Parameter(qdata, requires_grad=requires_grad)
        if scale is None or format is None:
            raise TypeError("QuantizedTensor(qdata, scale, format, dtype=torch.bfloat16)")
        return torch.Tensor._make_wrapper_subclass(
            cls, qdata.shape, dtype=dtype, device=qdata.device, requires_grad=False
        )

    def __init__(self, qdata, scale=None, format=None, dtype: torch.dtype = torch.bfloat16, requires_grad: bool = False,
                 rotation: int | None = None):
        if scale is None:  # built by __new__ from another QuantizedTensor
            return
        fmt = F.get_format(format)
        if qdata.dim() != 2:
            raise ShapeError(f"a QuantizedTensor holds a 2-D [N, K] weight, got qdata of shape {list(qdata.shape)}")
        if qdata.dtype != fmt.storage:
            raise FormatError(f"format {fmt.name} stores {fmt.storage}, got qdata of dtype {qdata.dtype}")
        expected = fmt.weight_scale_shape(*qdata.shape)
        if tuple(scale.shape) != expected:
            raise FormatError(
                f"format {fmt.name} with weight shape {list(qdata.shape)} needs a scale of shape {list(expected)}, "
                f"got {list(scale.shape)}"
            )
        if scale.device != qdata.device:
            raise FormatError(f"qdata is on {qdata.device} but its scale on {scale.device}; move both together")
        if rotation is not None:
            check_rotation(fmt.name, rotation, qdata.shape)
        self._set_inner(qdata, scale, fmt.name, rotation)

    def _set_inner(self, qdata: torch.Tensor, scale: torch.Tensor, format: str, rotation: int | None = None) -> None:
        self.qdata = qdata
        self.scale = scale
        self.format = format
        self.rotation = rotation
        # a plain int, so the per-call check in F.linear costs no tensor-attribute round trip
        self._in_features = qdata.shape[1]

    @classmethod
    def _wrap(cls, qdata, scale, format, dtype, rotation=None) -> "QuantizedTensor":
        """Internal constructor without validation (inner tensors already known to be consistent)."""
        t = torch.Tensor._make_wrapper_subclass(cls, qdata.shape, dtype=dtype, device=qdata.device, requires_grad=False)
        t._set_inner(qdata, scale, format, rotation)
        return t

    # -- torch.compile / serialization support -------------------------------------------------------
    def __tensor_flatten__(self):
        return ["qdata", "scale"], (self.format, self.dtype, self.rotation)

    @staticmethod
    def __tensor_unflatten__(inner, meta, outer_size, outer_stride):
        return QuantizedTensor._wrap(inner["qdata"], inner["scale"], *meta)

    def __repr__(self) -> str:
        rot = f", rotation=hadamard-{self.rotation}" if self.rotation else ""
        return (
            f"QuantizedTensor(format={self.format}{rot}, shape={list(self.shape)}, dtype={self.dtype}, "
            f"device={self.device}, scale={list(self.scale.shape)})"
        )

    def __reduce_ex__(self, protocol):
        # pickle (torch.save) the parts, not the wrapper's empty storage; unrotated weights keep the
        # 4-argument form older ditq versions read
        if self.rotation:
            return (QuantizedTensor, (self.qdata, self.scale, self.format, self.dtype, False, self.rotation))
        return (QuantizedTensor, (self.qdata, self.scale, self.format, self.dtype))

    # -- what users call -------------------------------------------------------------------------------
    def dequantize(self, dtype: torch.dtype | None = None) -> torch.Tensor:
        """The float weight [N, K] (``dtype`` defaults to the reported dtype), as ComfyUI computes it (a rotated
        weight back in the original basis: ``q * scale`` in float32, each group times H_g^T, then the cast)."""
        return _dequant(self.qdata, self.scale, self.format, dtype or self.dtype, self.rotation)

    def linear(self, x: torch.Tensor, bias: torch.Tensor | None = None, out_dtype: torch.dtype | None = None):
        """``x @ W^T + bias`` with dynamic 8-bit activations. x: [..., K]; returns [..., N] in x's dtype
        unless ``out_dtype`` is given."""
        if x.shape[-1] != self._in_features:
            raise ShapeError(
                f"linear: input of shape {list(x.shape)} has {x.shape[-1]} features, the {self.format} weight "
                f"{list(self.qdata.shape)} expects {self._in_features}"
            )
        if torch.is_grad_enabled() and (x.requires_grad or (bias is not None and bias.requires_grad)):
            return _QuantizedLinearFn.apply(x, self.qdata, self.scale, self.format, bias, out_dtype, self.rotation)
        if self.rotation:
            return _rotated_linear(x, self.qdata, self.scale, self.rotation, bias, out_dtype)
        return _linear(x, self.qdata, self.scale, self.format, bias, out_dtype)

    @property
    def nbytes_quantized(self) -> int:
        """Bytes actually held: qdata plus scale."""
        return self.qdata.numel() * self.qdata.element_size() + self.scale.numel() * self.scale.element_size()

    def _with(self, fn, dtype: torch.dtype | None = None) -> "QuantizedTensor":
        return QuantizedTensor._wrap(fn(self.qdata), fn(self.scale), self.format, dtype or self.dtype, self.rotation)

    # -- dispatch --------------------------------------------------------------------------------------
    @classmethod
    def __torch_function__(cls, func, types, args=(), kwargs=None):
        # The hot path: F.linear(x, qweight[, bias]) -> the kernel, with one int comparison of checking.
        if func is _F_LINEAR:
            x, w = args[0], args[1]
            if isinstance(w, QuantizedTensor) and not isinstance(x, QuantizedTensor):
                bias = args[2] if len(args) > 2 else (kwargs.get("bias") if kwargs else None)
                return w.linear(x, bias)
        elif func == _DATA_SET:
            # `param.data = other` (diffusers' group offloading, accelerate) would only swap the wrapper's
            # metadata and leave qdata/scale where they were: move the inner tensors too.
            dst, src = args
            if isinstance(dst, QuantizedTensor):
                if not isinstance(src, QuantizedTensor):
                    raise FormatError(
                        f"cannot set .data of a {dst.format} QuantizedTensor to a plain {src.dtype} tensor; "
                        f"assign a QuantizedTensor (ditq.quantize_weight) or replace the parameter"
                    )
                _set_data(dst, src)
                return None
        elif func == _DATA_PTR and isinstance(args[0], QuantizedTensor):
            # the wrapper has no storage; its identity is qdata's (accelerate maps tied weights by data_ptr)
            return args[0].qdata.data_ptr()
        with torch._C.DisableTorchFunctionSubclass():
            return func(*args, **(kwargs or {}))

    @classmethod
    def __torch_dispatch__(cls, func, types, args=(), kwargs=None):
        handler = _DISPATCH.get(func)
        if handler is not None:
            return handler(*args, **(kwargs or {}))
        raise NotImplementedError(
            f"QuantizedTensor does not support {func}; call .dequantize() first to get a float tensor"
        )


def _traced_op(name: str, t: torch.Tensor):
    """The registered custom op ``torch.ops.ditq.<name>`` when ``t`` is not a plain tensor (a FakeTensor or
    FunctionalTensor while torch.compile traces) and the kernels would run on its device, else None.

    ``ops`` takes the custom op only when ``torch.compiler.is_compiling()`` says so, which some torch
    versions (2.11) do not report while Dynamo runs a graph node on fake tensors: the eager Triton
    wrapper then meets a tensor without data. The type check costs nothing on the eager path."""
    if type(t) is torch.Tensor or not ops.triton_runs_on(t):
        return None
    return getattr(torch.ops.ditq, name, None)


COMPILE_ACT_QUANT = "op"
"""How a compiled graph quantizes activations for the W8A8 GEMM: "op" (inside ``torch.ops.ditq.linear``,
ditq's own kernel, as in eager mode) or "inductor" (torch ops that Inductor can fuse into the producer of x,
e.g. a LayerNorm + modulation, shared by the linears reading the same x, as Flux's q/k/v, then
``torch.ops.ditq.scaled_mm``). Measured on the full Flux transformer (H200, bench/NOTES.md, runtime round 3):
the same GPU time (102.1 ms each as one CUDA graph), and a longer first compile, so "op" stays the default."""


def _traced_act_quant(x2: torch.Tensor, fmt: str) -> tuple[torch.Tensor, torch.Tensor]:
    """``kernels.quant.act_quant`` written as torch ops for a compiled graph: the same scale (max |x| / qmax per
    token or per 1x128 block) and rounding; on CUDA x is multiplied by the scale's reciprocal as the kernel
    does, on the CPU (interpreter) divided exactly as the kernel there does."""
    f = F.get_format(fmt)
    m, k = x2.shape
    xf = x2.float() if f.act_granularity == "token" else x2.float().reshape(m, k // F.BLOCK, F.BLOCK)
    scale = xf.abs().amax(dim=-1, keepdim=True).clamp(min=F.AMAX_EPS) / f.qmax
    v = xf / scale if x2.device.type == "cpu" else xf * (1.0 / scale)
    q = F.round_to_storage(v, f).reshape(m, k)
    return q, (scale if f.act_granularity == "token" else scale.reshape(m, k // F.BLOCK))


_TRACED: dict = {}
"""id(x) -> (weakref to x, weakref to the tracing proxy mode, x._version, activation kind, (xq, xs)): the
quantized activation traced for x, reused by the next linear that reads the same x in the same trace."""


def _shared_traced_act_quant(x: torch.Tensor, fmt: str) -> tuple[torch.Tensor, torch.Tensor]:
    """``_traced_act_quant`` of x [..., K] as [M, K] / scales, traced once per (x, activation kind) in a
    graph: Flux's q/k/v projections read one x, so the graph holds one quantization instead of three (the
    graph compiler does not merge them itself). The key is x's identity (held weakly, so a freed x can never
    match a new one), the tracer that owns the result and x's version counter (in-place changes bump it)."""
    f = F.get_format(fmt)
    kind = (f.act_granularity, f.storage)
    mode = torch._C._get_dispatch_mode(torch._C._TorchDispatchModeKey.PROXY)
    hit = _TRACED.get(id(x))
    if hit is not None and mode is not None:
        xr, mr, version, k, out = hit
        if xr() is x and mr() is mode and version == x._version and k == kind:
            return out
    out = _traced_act_quant(x.reshape(-1, x.shape[-1]), fmt)
    if mode is not None:
        for key in [key for key, v in _TRACED.items() if v[0]() is None]:  # forget dead entries
            del _TRACED[key]
        _TRACED[id(x)] = (weakref.ref(x), weakref.ref(mode), x._version, kind, out)
    return out


def _linear(x, qdata, scale, fmt, bias, out_dtype):
    op = _traced_op("linear", x)
    if op is None:
        return ops.linear(x, qdata, scale, fmt, bias, out_dtype)
    k = x.shape[-1]
    rows = x.numel() // k if k else 0
    if COMPILE_ACT_QUANT != "inductor" or rows <= ops.weight_only_max_m(x, fmt) or not k:
        return op(x, qdata, scale, fmt, bias, out_dtype or x.dtype)
    if F.get_format(fmt).is_block and k % F.BLOCK:
        raise ShapeError(f"activation has K={k}: format {fmt} needs K divisible by {F.BLOCK}")
    xq, xs = _shared_traced_act_quant(x, fmt)
    y = torch.ops.ditq.scaled_mm(xq, xs, qdata, scale, fmt, bias, out_dtype or x.dtype)
    return y.reshape(*x.shape[:-1], qdata.shape[0])


def _dequant(qdata, scale, fmt, dtype, rotation=None):
    if rotation:
        # FORMATS.md: q * scale (float32, as ComfyUI's int8 dequantization), then each group of g
        # channels times H_g^T, in float32, then the cast
        w = _dequant(qdata, scale, fmt, torch.float32)
        h = F.hadamard(rotation, torch.float32, w.device)
        return (w.reshape(w.shape[0], -1, rotation) @ h.t()).reshape(w.shape).to(dtype)
    op = _traced_op("dequant_weight", qdata)
    if op is None:
        return ops.dequant_weight(qdata, scale, fmt, dtype)
    return op(qdata, scale, fmt, dtype)


def _rotated_linear(x, qdata, scale, g, bias, out_dtype):
    if not HAS_TRITON:  # the kernels module needs triton; the reference is the same math
        return F.linear_ref(F.rotate(x.float(), g), qdata, scale, "int8-row", bias, out_dtype or x.dtype)
    from .kernels import rotate as _rot

    op = _traced_op("rotated_linear", x)
    if op is None:
        return _rot.rotated_linear(x, qdata, scale, g, bias, out_dtype)
    return op(x, qdata, scale, g, bias, out_dtype or x.dtype)


def check_rotation(format: str, g: int, shape) -> None:
    """FormatError unless ``format`` is int8-row and g a supported Hadamard group size; ShapeError unless g
    divides K of the [N, K] ``shape``."""
    if format != "int8-row":
        raise FormatError(f"Hadamard rotation applies to int8-row weights only, not {format}")
    if g not in (16, 64, 256):
        raise FormatError(f"rotation group size {g} is not supported; choose 16, 64 or 256 (powers of 4)")
    if shape[-1] % g:
        raise ShapeError(f"weight of shape {list(shape)}: K={shape[-1]} is not divisible by the rotation group size {g}")


class _QuantizedLinearFn(torch.autograd.Function):
    """The quantized linear with gradients for x and bias (the weight is frozen), so LoRA adapters and
    anything upstream of a quantized layer can train. Forward is the 8-bit kernel; backward multiplies by
    the dequantized weight in the gradient's dtype."""

    @staticmethod
    def forward(ctx, x, qdata, scale, fmt, bias, out_dtype, rotation=None):
        ctx.save_for_backward(qdata, scale)
        ctx.fmt, ctx.rotation = fmt, rotation
        if rotation:
            return _rotated_linear(x, qdata, scale, rotation, bias, out_dtype)
        return _linear(x, qdata, scale, fmt, bias, out_dtype)

    @staticmethod
    def backward(ctx, grad_out):
        qdata, scale = ctx.saved_tensors
        grad_x = grad_bias = None
        if ctx.needs_input_grad[0]:
            grad_x = grad_out @ _dequant(qdata, scale, ctx.fmt, grad_out.dtype, ctx.rotation)
        if ctx.needs_input_grad[4]:
            grad_bias = grad_out.reshape(-1, grad_out.shape[-1]).sum(0)
        return grad_x, None, None, None, grad_bias, None, None


def _set_data(dst: QuantizedTensor, src: QuantizedTensor) -> None:
    """``dst.data = src`` for wrappers: the wrapper's metadata (device, dtype) and the inner tensors."""
    try:
        with torch._C.DisableTorchFunctionSubclass():
            _DATA_SET(dst, src)
    except RuntimeError:
        # set_data refuses some device pairs (e.g. to or from meta): swap in a fresh wrapper of src's parts,
        # keeping dst's identity and its Python attributes (nn.Parameter's _is_param, hooks' tags).
        tmp = QuantizedTensor._wrap(src.qdata, src.scale, src.format, src.dtype, src.rotation)
        tmp.requires_grad_(dst.requires_grad)
        keep = {k: v for k, v in dst.__dict__.items() if k not in _INNER_ATTRS}
        torch.utils.swap_tensors(dst, tmp)
        dst.__dict__.update(keep)
    dst._set_inner(src.qdata, src.scale, src.format, src.rotation)


_INNER_ATTRS = ("qdata", "scale", "format", "rotation", "_in_features")


# -- aten handlers: data movement only ------------------------------------------------------------------
def _detach(t, *a, **k):
    return t._with(lambda x: x.detach())


def _clone(t, *a, **k):
    return t._with(lambda x: x.clone())


def _to_copy(t, *a, dtype=None, device=None, non_blocking=False, **k):
    if dtype is not None and not dtype.is_floating_point:
        raise FormatError(
            f"cannot convert a {t.format} QuantizedTensor to {dtype}; its 8-bit data is .qdata, "
            f"its float value .dequantize()"
        )
    if device is not None:
        move = lambda x: x.to(device=device, non_blocking=non_blocking, copy=True)  # noqa: E731
    else:
        move = lambda x: x.clone()  # noqa: E731
    # A model-wide .to(dtype) changes only the dtype the weight reports (its compute dtype).
    return t._with(move, dtype)


def _copy_(dst, src, non_blocking=False, **k):
    if not isinstance(dst, QuantizedTensor):
        # float param <- quantized weight (load_state_dict of a quantized file into a float model)
        return dst.copy_(src.dequantize(dst.dtype), non_blocking=non_blocking)
    if not isinstance(src, QuantizedTensor):
        # quantized param <- float weight (load_state_dict of a float checkpoint into a quantized model)
        if tuple(src.shape) != tuple(dst.shape):
            raise ShapeError(f"cannot copy a {list(src.shape)} tensor into a {list(dst.shape)} {dst.format} weight")
        src = quantize_weight(src.to(dst.qdata.device), dst.format, rotation=_rotation_name(dst.rotation),
                              rotation_group=dst.rotation)
    elif src.format != dst.format or src.shape != dst.shape or src.rotation != dst.rotation:
        raise FormatError(
            f"cannot copy a {_describe(src)} {list(src.shape)} weight into a {_describe(dst)} {list(dst.shape)} one; "
            f"dequantize() and quantize it again, or replace the parameter"
        )
    dst.qdata.copy_(src.qdata, non_blocking=non_blocking)
    dst.scale.copy_(src.scale, non_blocking=non_blocking)
    return dst


def _is_pinned(t, *a, **k):
    return t.qdata.is_pinned() and t.scale.is_pinned()


def _pin_memory(t, *a, **k):
    return t._with(lambda x: x.pin_memory())


def _record_stream(t, stream):
    t.qdata.record_stream(stream)
    t.scale.record_stream(stream)


def _empty_like(t, *a, dtype=None, device=None, **k):
    dev = t.device if device is None else device
    return QuantizedTensor._wrap(
        torch.empty_like(t.qdata, device=dev), torch.empty_like(t.scale, device=dev), t.format, dtype or t.dtype,
        t.rotation,
    )


def _equal(a, b):
    if not (isinstance(a, QuantizedTensor) and isinstance(b, QuantizedTensor)):
        return False
    return (a.format == b.format and a.rotation == b.rotation and torch.equal(a.qdata, b.qdata)
            and torch.equal(a.scale, b.scale))  # fmt: skip


def _cat(tensors, dim=0):
    """Concatenate weights along N (e.g. diffusers' fuse_qkv_projections): rows keep their scales."""
    first = tensors[0]
    fmt = F.get_format(first.format)
    if dim not in (0, -2) or fmt.weight_granularity == "tensor":
        raise FormatError(
            f"cannot concatenate {first.format} weights along dim {dim}; only row and block formats along dim 0"
        )
    if any(not isinstance(t, QuantizedTensor) or t.format != first.format or t.rotation != first.rotation
           for t in tensors):  # fmt: skip
        raise FormatError("torch.cat of QuantizedTensors needs all of them in the same format (and rotation)")
    return QuantizedTensor(
        torch.cat([t.qdata for t in tensors]), torch.cat([t.scale for t in tensors]), first.format, first.dtype,
        rotation=first.rotation,
    )


_DISPATCH = {
    aten.detach.default: _detach,
    aten.alias.default: _detach,
    aten.clone.default: _clone,
    aten._to_copy.default: _to_copy,
    aten.copy_.default: _copy_,
    aten.is_pinned.default: _is_pinned,
    aten._pin_memory.default: _pin_memory,
    aten.record_stream.default: _record_stream,
    aten.empty_like.default: _empty_like,
    aten.equal.default: _equal,
    aten.cat.default: _cat,
}


# -- public functions ------------------------------------------------------------------------------------
def quantize_weight(
    w: torch.Tensor,
    format: str = "int8-row",
    *,
    rounding: str = "nearest",
    name: str | None = None,
    rotation: str | None = None,
    rotation_group: int | None = None,
    **options,
) -> QuantizedTensor:
    """Quantize a 2-D float weight [N, K] into a QuantizedTensor of ``format``.

    ``rounding="nearest"`` is round-to-nearest; ``"learned"`` optimizes the rounding (see
    ``ditq.rounding``; ``options`` go there). ``rotation="hadamard"`` (int8-row only) stores W H_g per group
    of ``rotation_group`` input channels (default: the largest of 256 / 64 / 16 dividing K), as ComfyUI's
    "convrot" int8; F.linear then rotates the activations at run time. Raises ShapeError / NonFiniteError
    naming ``name``."""
    fmt = F.get_format(format)
    if isinstance(w, QuantizedTensor):
        what = f"weight {name!r}" if name else "weight"
        raise FormatError(f"{what} is already quantized ({w.format}); dequantize() it first")
    F.check_weight(w, fmt, name)
    g = rotation_group_of(rotation, rotation_group, fmt.name, tuple(w.shape), name)
    if g:
        if rounding != "nearest":
            raise FormatError(f"rounding={rounding!r} with rotation is not implemented; use rounding='nearest'")
        # offline, so in float64: the rotated weight is then exactly rounded to fp32 on every device
        q, s = ops.quant_weight(F.rotate(w.detach().double(), g).float(), fmt.name)
        return QuantizedTensor(q, s, fmt.name, w.dtype, rotation=g)
    if rounding == "nearest":
        if options:
            raise TypeError(f"quantize_weight: options {sorted(options)} only apply to rounding='learned'")
        q, s = ops.quant_weight(w.detach(), fmt.name)
    elif rounding == "learned":
        from .rounding import learned_quantize  # optional and heavier; imported on use

        q, s = learned_quantize(w.detach(), fmt.name, name=name, **options)[:2]  # name: its calibration stats
    else:
        raise FormatError(f"unknown rounding {rounding!r}; choose 'nearest' or 'learned'")
    return QuantizedTensor(q, s, fmt.name, w.dtype)


def rotation_group_of(rotation, rotation_group, format: str, shape, name: str | None = None) -> int | None:
    """The Hadamard group size a ``rotation`` / ``rotation_group`` request means for an [N, K] weight of
    ``format`` (None: no rotation). FormatError for a rotation other than "hadamard" or a format other than
    int8-row; ShapeError naming the shape when K is not divisible by 16 (or by the requested group)."""
    if rotation in (None, False, "none"):
        if rotation_group is not None:
            raise FormatError(f"rotation_group={rotation_group} needs rotation='hadamard'")
        return None
    if rotation not in (True, "hadamard"):
        raise FormatError(f"unknown rotation {rotation!r}; the one implemented is 'hadamard'")
    if format != "int8-row":
        raise FormatError(f"Hadamard rotation applies to int8-row weights only, not {format}; use format='int8-row'")
    what = f"weight {name!r}" if name else "weight"
    if rotation_group is None:
        if shape[-1] % 16:
            raise ShapeError(
                f"{what} has shape {list(shape)}: a Hadamard rotation needs K divisible by 16 (groups of 16, 64 or "
                f"256 channels); quantize this layer without rotation or keep it in high precision"
            )
        return F.rotation_group_size(shape[-1])
    check_rotation(format, int(rotation_group), shape)
    return int(rotation_group)


def _rotation_name(g: int | None) -> str | None:
    return "hadamard" if g else None


def _describe(t: QuantizedTensor) -> str:
    return f"{t.format} (hadamard-{t.rotation})" if t.rotation else t.format


def quantize_activation(x: torch.Tensor, format: str = "int8-row") -> tuple[torch.Tensor, torch.Tensor]:
    """Dynamic activation quantization for ``format``. x: [..., K] -> (q [..., K], scale f32 [..., 1] per
    token, or [..., K/128] per token and 128-channel group for the block formats)."""
    fmt = F.get_format(format)
    lead, k = x.shape[:-1], x.shape[-1]
    q, s = ops.act_quant(x.reshape(-1, k), fmt.name)
    return q.reshape(*lead, k), s.reshape(*lead, s.shape[-1])


def linear(
    x: torch.Tensor,
    qweight: QuantizedTensor,
    bias: torch.Tensor | None = None,
    out_dtype: torch.dtype | None = None,
) -> torch.Tensor:
    """``x @ W^T + bias`` for a quantized W. x: [..., K] in bf16/fp16/fp32; output in x's dtype unless
    ``out_dtype`` is given."""
    if not isinstance(qweight, QuantizedTensor):
        raise FormatError(f"ditq.linear needs a QuantizedTensor weight, got {type(qweight).__name__}")
    return qweight.linear(x, bias, out_dtype)


torch.serialization.add_safe_globals([QuantizedTensor])
