"""QuantizedTensor: an 8-bit weight that behaves like the float tensor it replaces.

It holds ``qdata`` ([N, K], int8 or float8_e4m3fn), ``scale`` (float32, shape per format, see
``ditq.formats``) and the format name, reports the original weight's shape and dtype, moves its two
inner tensors together (``.to``, ``.cpu()``, ``pin_memory``, ``copy_``, ``state_dict`` round trips) and
sends ``F.linear`` to ditq's kernels. It is a traceable wrapper subclass (``__tensor_flatten__``), so
``torch.compile`` sees through it.
"""

from __future__ import annotations

import torch
import torch.nn.functional as Fn

from . import formats as F
from .errors import FormatError, ShapeError
from .kernels import ops

aten = torch.ops.aten


class QuantizedTensor(torch.Tensor):
    qdata: torch.Tensor
    scale: torch.Tensor
    format: str

    @staticmethod
    def __new__(cls, qdata: torch.Tensor, scale: torch.Tensor, format: str, dtype: torch.dtype = torch.bfloat16):
        return torch.Tensor._make_wrapper_subclass(
            cls, qdata.shape, dtype=dtype, device=qdata.device, requires_grad=False
        )

    def __init__(self, qdata: torch.Tensor, scale: torch.Tensor, format: str, dtype: torch.dtype = torch.bfloat16):
        fmt = F.get_format(format)
        if qdata.dtype != fmt.storage:
            raise FormatError(f"format {fmt.name} stores {fmt.storage}, got qdata of dtype {qdata.dtype}")
        expected = fmt.weight_scale_shape(*qdata.shape)
        if tuple(scale.shape) != expected:
            raise FormatError(
                f"format {fmt.name} with weight shape {list(qdata.shape)} needs a scale of shape {list(expected)}, "
                f"got {list(scale.shape)}"
            )
        self.qdata = qdata
        self.scale = scale
        self.format = fmt.name

    # -- torch.compile / serialization support -------------------------------------------------------
    def __tensor_flatten__(self):
        return ["qdata", "scale"], (self.format, self.dtype)

    @staticmethod
    def __tensor_unflatten__(inner, meta, outer_size, outer_stride):
        return QuantizedTensor(inner["qdata"], inner["scale"], *meta)

    def __repr__(self) -> str:
        return (
            f"QuantizedTensor(format={self.format}, shape={list(self.shape)}, dtype={self.dtype}, "
            f"device={self.device}, scale={list(self.scale.shape)})"
        )

    def __reduce_ex__(self, protocol):
        # pickle (torch.save) the parts, not the wrapper's empty storage
        return (QuantizedTensor, (self.qdata, self.scale, self.format, self.dtype))

    # -- what users call -------------------------------------------------------------------------------
    def dequantize(self, dtype: torch.dtype | None = None) -> torch.Tensor:
        """The float weight [N, K] (``dtype`` defaults to the original dtype), as ComfyUI computes it."""
        return ops.dequant_weight(self.qdata, self.scale, self.format, dtype or self.dtype)

    def linear(self, x: torch.Tensor, bias: torch.Tensor | None = None, out_dtype: torch.dtype | None = None):
        """``x @ W^T + bias`` with dynamic 8-bit activations. x: [..., K]; returns [..., N]."""
        if x.shape[-1] != self.shape[1]:
            raise ShapeError(
                f"linear: input has {x.shape[-1]} features, the {self.format} weight {list(self.shape)} expects "
                f"{self.shape[1]}"
            )
        return ops.linear(x, self.qdata, self.scale, self.format, bias, out_dtype)

    @property
    def nbytes_quantized(self) -> int:
        return self.qdata.numel() * self.qdata.element_size() + self.scale.numel() * self.scale.element_size()

    def _with(self, fn) -> "QuantizedTensor":
        return QuantizedTensor(fn(self.qdata), fn(self.scale), self.format, self.dtype)

    # -- dispatch --------------------------------------------------------------------------------------
    @classmethod
    def __torch_function__(cls, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func is Fn.linear:
            x, w = args[0], args[1]
            bias = args[2] if len(args) > 2 else kwargs.get("bias")
            if isinstance(w, QuantizedTensor) and not isinstance(x, QuantizedTensor):
                return w.linear(x, bias)
        with torch._C.DisableTorchFunctionSubclass():
            return func(*args, **kwargs)

    @classmethod
    def __torch_dispatch__(cls, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        handler = _DISPATCH.get(func)
        if handler is not None:
            return handler(*args, **kwargs)
        raise NotImplementedError(
            f"QuantizedTensor does not support {func}; call .dequantize() first to get a float tensor"
        )


def _detach(t, *a, **k):
    return t._with(lambda x: x.detach())


def _clone(t, *a, **k):
    return t._with(lambda x: x.clone())


def _to_copy(t, *a, dtype=None, device=None, non_blocking=False, **k):
    out = t._with(lambda x: x.to(device=device, non_blocking=non_blocking) if device is not None else x.clone())
    if dtype is not None and dtype.is_floating_point:
        # a model-wide .to(dtype) changes the compute dtype the weight reports; its 8-bit data stays
        out = QuantizedTensor(out.qdata, out.scale, out.format, dtype)
    return out


def _copy_(dst, src, *a, **k):
    if not isinstance(src, QuantizedTensor):
        raise FormatError(
            f"cannot copy a plain {src.dtype} tensor into a {dst.format} QuantizedTensor; "
            f"quantize it first with ditq.quantize_weight(w, {dst.format!r})"
        )
    if src.format != dst.format or src.shape != dst.shape:
        raise FormatError(
            f"cannot copy a {src.format} {list(src.shape)} weight into a {dst.format} {list(dst.shape)} one"
        )
    dst.qdata.copy_(src.qdata)
    dst.scale.copy_(src.scale)
    return dst


def _is_pinned(t, *a, **k):
    return t.qdata.is_pinned()


def _pin_memory(t, *a, **k):
    return t._with(lambda x: x.pin_memory())


def _requires_grad_(t, requires_grad=True):
    if requires_grad:
        raise FormatError("a QuantizedTensor cannot require grad; train a LoRA or the float weight instead")
    return t


_DISPATCH = {
    aten.detach.default: _detach,
    aten.alias.default: _detach,
    aten.clone.default: _clone,
    aten._to_copy.default: _to_copy,
    aten.copy_.default: _copy_,
    aten.is_pinned.default: _is_pinned,
    aten._pin_memory.default: _pin_memory,
}


# -- public functions ------------------------------------------------------------------------------------
def quantize_weight(
    w: torch.Tensor, format: str = "int8-row", *, rounding: str = "nearest", name: str | None = None, **options
) -> QuantizedTensor:
    """Quantize a 2-D float weight [N, K] into a QuantizedTensor of ``format``.

    ``rounding="nearest"`` is round-to-nearest; ``"learned"`` optimizes the rounding (see
    ``ditq.rounding``; ``options`` go there). Raises ShapeError / NonFiniteError naming ``name``."""
    fmt = F.get_format(format)
    F.check_weight(w, fmt, name)
    if rounding == "nearest":
        if options:
            raise TypeError(f"quantize_weight: options {sorted(options)} only apply to rounding='learned'")
        q, s = ops.quant_weight(w.detach(), fmt.name)
    elif rounding == "learned":
        from .rounding import learned_quantize  # optional and heavier; imported on use

        q, s = learned_quantize(w.detach(), fmt.name, **options)[:2]
    else:
        raise FormatError(f"unknown rounding {rounding!r}; choose 'nearest' or 'learned'")
    return QuantizedTensor(q, s, fmt.name, w.dtype)


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
