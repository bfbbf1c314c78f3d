"""The kernel entry points the rest of ditq calls. Each takes plain tensors and a format name, runs the
Triton kernel where it can (``triton_runs_on``) and the pure-torch reference of ``ditq.formats``
elsewhere, so every op works on any device.

Layouts (M tokens, K in, N out):
    act_quant(x [M, K], fmt)                  -> q [M, K] storage dtype, scale f32 [M, 1] | [M, K/128]
    quant_weight(w [N, K], fmt)               -> q [N, K] storage dtype, scale f32 (formats.py table)
    dequant_weight(q, scale, fmt, dtype)      -> w [N, K] dtype
    scaled_mm(xq, xs, wq, ws, fmt, bias, out_dtype) -> y [M, N] out_dtype
    linear(x [..., K], wq, ws, fmt, bias, out_dtype) -> y [..., N]   (act_quant + scaled_mm)

The runtime ops (act_quant, scaled_mm, linear, dequant_weight) are also registered as torch custom ops
``torch.ops.ditq.*`` with fake implementations, so ``torch.compile`` traces them without graph breaks.
Eager calls skip the custom-op dispatcher (it costs tens of microseconds a call) and launch the Triton
wrappers directly; only a graph being compiled goes through the registered ops.
"""

from __future__ import annotations

import dataclasses
import threading
from typing import Callable, NamedTuple

import torch

from .. import formats as F
from . import HAS_TRITON, triton_runs_on

if HAS_TRITON:
    from . import configs as _configs
    from . import gemm as _gemm
    from . import quant as _quant


def _fmt(fmt) -> F.Format:
    return fmt if isinstance(fmt, F.Format) else (F.FORMATS.get(fmt) or F.get_format(fmt))


# ----------------------------------------------------------------------------------------------------------
# eager implementations (Triton)
#
# An eager linear on a GPU is host-bound unless its launches are cheap: Triton's launcher costs tens of
# microseconds a call. So the first call for a (weight, activation shape) builds a plan: it checks the operands,
# picks the kernels and their configurations, launches through Triton (compiling if needed) and keeps the
# ready argument tuples of Triton's C launcher (pointers as integers, so the plan holds no tensor alive; TMA
# maps encoded once). Later calls with the same key allocate the output and make one or two C calls.


class ActQuant(NamedTuple):
    """Another activation quantization in front of the W8A8 GEMM (``kernels.rotate``: Hadamard rotation +
    per-token int8): ``spec(x2, xq, xs)`` is the launch of a kernel that writes xq [M, K] and xs [M, 1] from x2
    [M, K]; ``run(x2)`` returns (xq, xs) through the regular wrappers; ``tag`` (hashable) joins the plan key.
    Linears with one never take the weight-only path."""

    tag: tuple
    spec: Callable
    run: Callable


def _linear_general(x, wq, w_scale, fmt: F.Format, bias, out_dtype, weight_only: bool, kept: bool = True,
                    act: ActQuant | None = None):  # fmt: skip
    """The linear through the regular wrappers (any device Triton runs on, any strides). ``kept=False``: no
    buffer outlives the call (no split-K workspace)."""
    k = x.shape[-1]
    _gemm.check_weight_side(wq, w_scale, fmt, bias, k)
    lead = x.shape[:-1]
    x2 = x if x.dim() == 2 else x.reshape(-1, k)  # the kernels read any strides, so no copy for 2-D views
    if weight_only:
        c = None
        if not kept and x2.is_cuda:
            c = dataclasses.replace(_configs.weight_only_config(fmt.name, x2.shape[0], wq.shape[0], k), split_k=1)
        y = _gemm.weight_only_linear(x2, wq, w_scale, fmt, bias, out_dtype or x.dtype, c)
    else:
        xq, xs = act.run(x2) if act is not None else _quant.act_quant(x2, fmt)
        # the activation side was made here, so only the weight side above needed checking
        y = _gemm.scaled_mm(xq, xs, wq, w_scale, fmt, bias, out_dtype or x.dtype, check=False)
    return y if x.dim() == 2 else y.reshape(*lead, wq.shape[0])


def weight_only_max_m(x, fmt="int8-row") -> int:
    """Rows up to which ``linear`` takes the weight-only kernel for ``fmt``: ``configs.WEIGHT_ONLY_MAX_M`` on a
    GPU (int8 formats by default: ``kernels.rotate`` asks for its int8 rotated linear). Under the CPU interpreter 0 (the W8A8 result, as the CPU reference computes it) unless
    ``WEIGHT_ONLY_CPU`` is set."""
    if x.is_cuda:
        return _configs.weight_only_max_m(_fmt(fmt).name)
    return WEIGHT_ONLY_CPU


WEIGHT_ONLY_CPU = 0
"""Row limit of the weight-only path for CPU tensors under the interpreter (tests set it)."""

_X, _XQ, _XQD, _XS, _OUT, _WP, _WC, _TP, _TC = (object() for _ in range(9))  # per-call / per-stream slots of a template
_PLANS: dict = {}
_SCRATCH: dict = {}
_SCRATCH_GEN = [0]
SCRATCH_MAX_BYTES = 1 << 23
"""Activations of at most this many bytes (8-bit) are quantized into a buffer kept per (stream, thread, shape)
instead of fresh allocations: the GEMM that reads it is queued on the same stream before the next write."""


class _Plan:
    """Ready launches of one linear (see above). ``wo``: weight-only (one launch) else act quant + GEMM."""

    __slots__ = ("wo", "aq", "mm", "aq_t", "mm_t", "aq_seg", "mm_seg", "out_shape", "out_dtype", "device",
                 "stream", "thread", "gen", "scratch_key", "xq_shape", "xs_shape", "storage", "wo_cfg", "n",
                 "tail_cfg", "kept", "out_j")  # fmt: skip


def _template(spec, bound, marks: dict) -> list:
    """The C launcher's argument list of ``spec`` in kernel order, tensors as integer pointers except those in
    ``marks`` (object id -> marker); TMA operands expanded (xq's as the marker _XQD, the output's as its one
    slot _OUT, expanded per call); constexprs appended."""
    flat, j = [], 0
    for a in spec.args:
        if a.__class__ is _quant.Tma:
            m = marks.get(id(a.t))
            flat.extend([_XQD] if m is _XQ else [_OUT] if m is _OUT else bound.tma(j, a.t))
            j += 1
        elif isinstance(a, torch.Tensor):
            flat.append(marks.get(id(a)) or a.data_ptr())
        else:
            flat.append(a)
    return flat + list(bound.tail)


def _segments(bound, stream, flat: list) -> list:
    """Split a template at its per-call slots: [(launcher prefix + args before the first slot), ..., rest]."""
    segs, cur = [], [*bound.head, stream, *bound.mid]
    for a in flat:
        if a is _X or a is _OUT:
            segs.append(tuple(cur))
            cur = []
        else:
            cur.append(a)
    segs.append(tuple(cur))
    return segs


def _resolve(p: _Plan, bound, flat: list, xq, xs, ws=None, tw=None) -> list:
    """Fill the activation-side slots of a template with this call's xq / xs (W8A8), the split-K workspace
    ``ws`` = (partials, counters) of this stream (weight-only), or the GEMM's tail-split workspace ``tw``."""
    out = []
    for a in flat:
        if a is _WP:
            out.append(ws[0].data_ptr())
        elif a is _WC:
            out.append(ws[1].data_ptr())
        elif a is _TP:
            out.append(tw[0].data_ptr())
        elif a is _TC:
            out.append(tw[1].data_ptr())
        elif a is _XQ:
            out.append(xq.data_ptr())
        elif a is _XS:
            out.append(xs.data_ptr())
        elif a is _XQD:
            out.extend(bound.tma(0, xq))
        else:
            out.append(a)
    return out


def _scratch(p: _Plan, stream, thread):
    """Kept (xq, xs) buffers of this plan's activation shape for this stream and thread."""
    key = (*p.scratch_key, stream, thread)
    got = _SCRATCH.get(key)
    if got is None:
        if len(_SCRATCH) >= 64:  # plans notice the new generation and rebind
            _SCRATCH.clear()
            _SCRATCH_GEN[0] += 1
        got = _SCRATCH[key] = (torch.empty(p.xq_shape, dtype=p.storage, device=p.device),
                               torch.empty(p.xs_shape, dtype=torch.float32, device=p.device))  # fmt: skip
    return got


def _bind_stream(p: _Plan, stream, thread) -> None:
    """(Re)build the plan's per-call segments for this stream and thread (and the current scratch buffers).
    Not called while a CUDA graph is captured (its buffers would come from the graph's pool)."""
    p.stream, p.thread, p.gen = stream, thread, _SCRATCH_GEN[0]
    if p.wo:
        ws = _gemm.wo_workspace(p.device, stream, p.wo_cfg, p.n) if p.wo_cfg.split_k > 1 else None
        p.mm_seg = _segments(p.mm, stream, _resolve(p, p.mm, p.mm_t, None, None, ws))
        return
    xq, xs = _scratch(p, stream, thread)
    tw = _gemm.tail_buffers(p.device, p.tail_cfg, p.kept) if p.tail_cfg is not None else None
    p.aq_seg = _segments(p.aq, stream, _resolve(p, p.mm, p.aq_t, xq, xs))
    p.mm_seg = _segments(p.mm, stream, _resolve(p, p.mm, p.mm_t, xq, xs, tw=tw))


def _build_plan(x, wq, w_scale, fmt: F.Format, bias, out_dtype, kept: bool, act: ActQuant | None = None):
    """Check the operands, run the linear once through the regular launches, and return (y, plan or None).
    ``kept=False``: a plan that keeps no buffer between calls (no split K, fresh activation buffers)."""
    k = x.shape[-1]
    _gemm.check_weight_side(wq, w_scale, fmt, bias, k)
    out_dtype = out_dtype or x.dtype
    try:
        x2 = x.view(-1, k)
    except RuntimeError:  # not viewable as 2-D: the regular path copies
        x2 = None
    m, n = x.numel() // k if k else 0, wq.shape[0]
    weight_only = act is None and 0 < m <= weight_only_max_m(x, fmt) and wq.is_contiguous()
    if x2 is None or m == 0 or n == 0 or k == 0 or not x.is_cuda or not x.is_floating_point():
        return _linear_general(x, wq, w_scale, fmt, bias, out_dtype, weight_only, kept, act), None
    y = _quant.empty((*x.shape[:-1], n), out_dtype, x.device)
    y2 = y.view(m, n)
    p = _Plan()
    p.out_shape, p.out_dtype, p.device, p.wo, p.kept, p.tail_cfg = tuple(y.shape), out_dtype, x.device, weight_only, kept, None
    p.out_j = None
    if weight_only:
        c = _configs.weight_only_config(fmt.name, m, n, k)
        if not kept:
            c = dataclasses.replace(c, split_k=1)
        ws = None
        if c.split_k > 1:
            ws = _gemm.wo_workspace(x.device, torch._C._cuda_getCurrentRawStream(x.device.index), c, n)
            if ws is None:  # first use inside a CUDA graph capture: no plan
                return _linear_general(x, wq, w_scale, fmt, bias, out_dtype, True), None
        spec = _gemm.weight_only_spec(x2, wq, w_scale, fmt, bias, y2, c, ws)
        p.mm = _quant.bind(spec)
        if p.mm is None:
            return y, None
        marks = {id(x2): _X, id(y2): _OUT}
        if ws is not None:
            marks.update({id(ws[0]): _WP, id(ws[1]): _WC})
        p.mm_t = _template(spec, p.mm, marks)
        p.wo_cfg, p.n = c, n
    else:
        xq, xs = _quant.empty((m, k), fmt.storage, x.device), _quant.empty(_quant.act_scale_shape(fmt, m, k), torch.float32, x.device)
        aspec = act.spec(x2, xq, xs) if act is not None else _quant.act_quant_spec(x2, xq, xs, fmt, False)
        p.aq = _quant.bind(aspec)
        c = _configs.get_config(fmt.name, m, n, k)
        tw = _gemm.tail_args(xq, c, kept)
        mspec = _gemm.scaled_mm_spec(xq, xs, wq, w_scale, fmt, bias, y2, c, tail=tw)
        p.mm = _quant.bind(mspec)
        if p.aq is None or p.mm is None:
            return y, None
        marks = {id(x2): _X, id(xq): _XQ, id(xs): _XS, id(y2): _OUT}
        p.tail_cfg = c if mspec.constexprs.get("TAIL") else None
        tmas = [a.t for a in mspec.args if a.__class__ is _quant.Tma]
        p.out_j = next((j for j, t in enumerate(tmas) if t is y2), None)  # an output written by TMA stores
        if p.tail_cfg is not None:  # the tail's workspace (or a view of it): this stream's kept one, or fresh per call
            slots = {tw[0].data_ptr(): _TP, tw[1].data_ptr(): _TC}
            marks.update({id(a): slots[a.data_ptr()] for a in mspec.args
                          if isinstance(a, torch.Tensor) and a.data_ptr() in slots})  # fmt: skip
        p.aq_t = _template(aspec, p.aq, marks)
        p.mm_t = _template(mspec, p.mm, marks)
        p.xq_shape, p.xs_shape, p.storage = tuple(xq.shape), tuple(xs.shape), fmt.storage
        small = m * k <= SCRATCH_MAX_BYTES
        p.scratch_key = (x.device.index, p.storage, p.xq_shape, p.xs_shape) if small and kept else None
    p.stream = p.thread = p.gen = None  # bound at the first call that uses the plan
    return y, p


def clear_plans() -> None:
    """Forget every launch plan and kept buffer (after changing ``configs.WEIGHT_ONLY_MAX_M``, a config table or
    ``quant.RAW_LAUNCH``: plans keep the choices they were built with)."""
    _PLANS.clear()
    _SCRATCH.clear()
    _gemm._WO_WORKSPACE.clear()
    _gemm._TAIL_WORKSPACE.clear()
    _SCRATCH_GEN[0] += 1


def _linear_triton(x, wq, w_scale, fmt: F.Format, bias, out_dtype, kept: bool = True, act: ActQuant | None = None):
    """The linear on Triton: through a launch plan on a GPU (see above), else the regular wrappers. ``kept``
    (eager calls) lets plans keep buffers between calls: split-K workspaces and activation buffers. The
    registered op passes False: inside torch.compile's CUDA graphs (cudagraph trees) every allocation of the
    warm-up run goes to the graph's pool, which refuses tensors that outlive the call."""
    if not x.is_cuda or not _quant.RAW_LAUNCH or _quant.hooked():
        m = x.numel() // x.shape[-1] if x.shape[-1] else 0
        wo = act is None and 0 < m <= weight_only_max_m(x, fmt) and wq.is_contiguous()
        return _linear_general(x, wq, w_scale, fmt, bias, out_dtype, wo, kept, act)
    xp = x.data_ptr()
    key = (fmt.name, out_dtype, kept, act and act.tag, _configs.weight_only_max_m(fmt.name), x.shape, x.stride(),
           x.dtype, xp & 15,
           wq.data_ptr(), wq.shape, wq.stride(), wq.dtype, w_scale.data_ptr(), w_scale.shape, w_scale.stride(),
           None if bias is None else (bias.data_ptr(), bias.shape, bias.dtype))  # fmt: skip
    p = _PLANS.get(key)
    if p is None:
        y, p = _build_plan(x, wq, w_scale, fmt, bias, out_dtype, kept, act)
        if p is not None:
            if len(_PLANS) >= 4096:
                _PLANS.clear()
            _PLANS[key] = p
        return y
    stream = torch._C._cuda_getCurrentRawStream(p.device.index)
    out = _quant.empty(p.out_shape, p.out_dtype, p.device)
    op = out.data_ptr()
    if p.wo:
        if stream != p.stream:
            if torch.cuda.is_current_stream_capturing():  # the split-K workspace of a new stream: made outside
                return _linear_general(x, wq, w_scale, fmt, bias, out_dtype, True, kept)
            _bind_stream(p, stream, None)
        s = p.mm_seg
        p.mm.entry.raw(*s[0], xp, *s[1], op, *s[2])
    elif p.scratch_key is not None and not torch.cuda.is_current_stream_capturing():
        thread = threading.get_ident()
        if stream != p.stream or thread != p.thread or p.gen != _SCRATCH_GEN[0]:
            _bind_stream(p, stream, thread)
        a, s = p.aq_seg, p.mm_seg
        p.aq.entry.raw(*a[0], xp, *a[1])
        p.mm.entry.raw(*s[0], *((op,) if p.out_j is None else p.mm.tma(p.out_j, out)), *s[1])
    else:  # fresh activation buffers (large activations, or a CUDA graph being captured)
        xq, xs = (_quant.empty(p.xq_shape, p.storage, p.device), _quant.empty(p.xs_shape, torch.float32, p.device))
        tw = _gemm.tail_buffers(p.device, p.tail_cfg, p.kept) if p.tail_cfg is not None else None
        a = _segments(p.aq, stream, _resolve(p, p.mm, p.aq_t, xq, xs))
        s = _segments(p.mm, stream, _resolve(p, p.mm, p.mm_t, xq, xs, tw=tw))
        p.aq.entry.raw(*a[0], xp, *a[1])
        p.mm.entry.raw(*s[0], *((op,) if p.out_j is None else p.mm.tma(p.out_j, out)), *s[1])
    return out


# ----------------------------------------------------------------------------------------------------------
# custom ops for torch.compile
#
# Registered through torch.library.Library with plain CPU / CUDA kernels and fake (meta) implementations rather
# than torch.library.custom_op: a compiled graph calls the op once per linear, and custom_op's Python autograd
# and aliasing wrappers cost ~10 us a call more (measured: bench/NOTES.md). The ops have no autograd formula;
# gradients through a quantized linear come from the autograd.Function in ditq.tensor around them.

_SCHEMAS = {
    "act_quant": "act_quant(Tensor x, str fmt) -> (Tensor, Tensor)",
    "scaled_mm": "scaled_mm(Tensor xq, Tensor x_scale, Tensor wq, Tensor w_scale, str fmt, Tensor? bias, "
    "ScalarType out_dtype) -> Tensor",
    "linear": "linear(Tensor x, Tensor wq, Tensor w_scale, str fmt, Tensor? bias, ScalarType out_dtype) -> Tensor",
    "dequant_weight": "dequant_weight(Tensor q, Tensor scale, str fmt, ScalarType dtype) -> Tensor",
}


def _act_quant_impl(x, fmt):
    return _quant.act_quant(x, fmt)


def _act_quant_fake(x, fmt):
    f = _fmt(fmt)
    m, k = x.shape
    return x.new_empty((m, k), dtype=f.storage), x.new_empty(_quant.act_scale_shape(f, m, k), dtype=torch.float32)


def _scaled_mm_impl(xq, x_scale, wq, w_scale, fmt, bias, out_dtype):
    return _gemm.scaled_mm(xq, x_scale, wq, w_scale, fmt, bias, out_dtype)


def _scaled_mm_fake(xq, x_scale, wq, w_scale, fmt, bias, out_dtype):
    return xq.new_empty((xq.shape[0], wq.shape[0]), dtype=out_dtype)


def _linear_impl(x, wq, w_scale, fmt, bias, out_dtype):
    return _linear_triton(x, wq, w_scale, _fmt(fmt), bias, out_dtype, kept=False)


def _linear_fake(x, wq, w_scale, fmt, bias, out_dtype):
    return x.new_empty((*x.shape[:-1], wq.shape[0]), dtype=out_dtype)


def _dequant_impl(q, scale, fmt, dtype):
    return _quant.dequant_weight(q, scale, fmt, dtype)


def _dequant_fake(q, scale, fmt, dtype):
    return q.new_empty(q.shape, dtype=dtype)


if HAS_TRITON:
    _LIB = torch.library.Library("ditq", "FRAGMENT")
    for _name, (_impl, _fake) in {
        "act_quant": (_act_quant_impl, _act_quant_fake),
        "scaled_mm": (_scaled_mm_impl, _scaled_mm_fake),
        "linear": (_linear_impl, _linear_fake),
        "dequant_weight": (_dequant_impl, _dequant_fake),
    }.items():
        _LIB.define(_SCHEMAS[_name])
        _LIB.impl(_name, _impl, "CUDA")
        _LIB.impl(_name, _impl, "CPU")  # the Triton interpreter
        torch.library.register_fake(f"ditq::{_name}", _fake, lib=_LIB)


def _compiling() -> bool:
    return torch.compiler.is_compiling()


# ----------------------------------------------------------------------------------------------------------
# public entry points


def act_quant(x: torch.Tensor, fmt) -> tuple[torch.Tensor, torch.Tensor]:
    """Dynamic activation quantization of x [..., K] (bf16/fp16/fp32, any strides): (q, scale) as
    ``formats.quantize_activation_ref`` (scale [..., 1] per token or [..., K/128] for block formats)."""
    f = _fmt(fmt)
    if not triton_runs_on(x):
        return F.quantize_activation_ref(x, f)
    lead, k = x.shape[:-1], x.shape[-1]
    x2 = x if x.dim() == 2 else x.reshape(-1, k)
    q, s = torch.ops.ditq.act_quant(x2, f.name) if _compiling() else _quant.act_quant(x2, f)
    if x.dim() != 2:
        q, s = q.reshape(*lead, k), s.reshape(*lead, s.shape[-1])
    return q, s


def quant_weight(w: torch.Tensor, fmt, scale: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Weight quantization of w [N, K]: (q [N, K], scale f32) as ``formats.quantize_weight_ref``; a given
    ``scale`` (e.g. an optimized one) replaces the amax scale. Offline: no custom op."""
    f = _fmt(fmt)
    if not triton_runs_on(w):
        return F.quantize_weight_ref(w, f, scale)
    return _quant.quant_weight(w, f, scale)


def dequant_weight(q: torch.Tensor, scale: torch.Tensor, fmt, dtype: torch.dtype) -> torch.Tensor:
    """q [N, K] -> [N, K] ``dtype``, bit-for-bit as ``formats.dequantize_ref`` (ComfyUI's rounding)."""
    f = _fmt(fmt)
    if not triton_runs_on(q):
        return F.dequantize_ref(q, scale, f, dtype)
    if _compiling():
        return torch.ops.ditq.dequant_weight(q, scale, f.name, dtype)
    return _quant.dequant_weight(q, scale, f, dtype)


def scaled_mm(xq, x_scale, wq, w_scale, fmt, bias=None, out_dtype=torch.bfloat16) -> torch.Tensor:
    """y [M, N] = dequant(xq [M, K]) @ dequant(wq [N, K])^T + bias, in ``out_dtype``."""
    f = _fmt(fmt)
    if not triton_runs_on(xq):
        return F.scaled_mm_ref(xq, x_scale, wq, w_scale, f, bias, out_dtype)
    if _compiling():
        return torch.ops.ditq.scaled_mm(xq, x_scale, wq, w_scale, f.name, bias, out_dtype)
    return _gemm.scaled_mm(xq, x_scale, wq, w_scale, f, bias, out_dtype)


def linear(x, wq, w_scale, fmt, bias=None, out_dtype=None) -> torch.Tensor:
    """W8A8 linear: y [..., N] = act_quant(x [..., K]) times the quantized weight wq [N, K], + bias, in
    ``out_dtype`` (default x's dtype). One activation-quantization kernel, then one GEMM whose epilogue
    applies both scales, adds the bias and casts."""
    f = _fmt(fmt)
    if not triton_runs_on(x):
        return F.linear_ref(x, wq, w_scale, f, bias, out_dtype)
    if _compiling():
        return torch.ops.ditq.linear(x, wq, w_scale, f.name, bias, out_dtype or x.dtype)
    return _linear_triton(x, wq, w_scale, f, bias, out_dtype)


# ----------------------------------------------------------------------------------------------------------
# linear with a LoRA branch: y = linear(x) + (x @ lora_a^T) @ lora_b^T
#
# int8-row adds the up-projection inside the GEMM's epilogue, on the output tile in registers (after the GEMM
# it costs a read and a write of y: bench/NOTES.md, LoRA). Other formats, few rows (the weight-only kernel) and
# devices without Triton add it after the product (``EPILOGUE_FORMATS``). Fused calls take the regular
# launches, not the launch plans (their host time shows at N = K = 3072: NOTES).


EPILOGUE_FORMATS = {"int8-row"}
"""Formats whose LoRA branch runs in the GEMM's epilogue. fp8-row / fp8-tensor take the branch after the product:
on an H200 their epilogue cost +18% to +80% of the GEMM (the persistent fp8 kernel worst), more than the
extra pass over y (bench/NOTES.md, LoRA round 3); the epilogue itself works for them (tests) and can be
switched on here. Block formats have no LoRA epilogue."""


def _check_lora_weights(lora_a, lora_b, n: int, k: int) -> None:
    from ..errors import ShapeError

    if lora_a.dim() != 2 or lora_b.dim() != 2 or lora_a.shape[1] != k or lora_b.shape[0] != n or \
            lora_a.shape[0] != lora_b.shape[1]:  # fmt: skip
        raise ShapeError(f"linear_lora: needs lora_a [r, K={k}] and lora_b [N={n}, r], got {tuple(lora_a.shape)} "
                         f"and {tuple(lora_b.shape)}")  # fmt: skip
    if not (lora_a.is_floating_point() and lora_b.dtype == lora_a.dtype):
        raise ShapeError(f"linear_lora: lora_a and lora_b must share a float dtype, got {lora_a.dtype} and {lora_b.dtype}")


def _lora_after(y, xa, lora_b):
    """y [M, N] (fresh, contiguous) += xa [M, r] @ lora_b^T, in place (one more pass over y)."""
    return y.addmm_(xa.to(y.dtype), lora_b.to(y.dtype).t())


def linear_lora_ref(x, wq, w_scale, fmt, lora_a, lora_b, bias=None, out_dtype=None):
    """Reference: the W8A8 linear in float32, plus (x @ A^T, rounded to A's dtype as the kernels keep it) @ B^T,
    plus the bias, one cast."""
    f = _fmt(fmt)
    y = F.linear_ref(x, wq, w_scale, f, None, torch.float32)
    xa = torch.nn.functional.linear(x.to(lora_a.dtype), lora_a)
    y = y + (xa.float().reshape(-1, xa.shape[-1]) @ lora_b.float().t()).reshape(y.shape)
    if bias is not None:
        y = y + bias.float()
    return y.to(out_dtype or x.dtype)


def _linear_lora_triton(x, wq, w_scale, fmt: F.Format, lora_a, lora_b, bias, out_dtype, kept: bool = True):
    k = x.shape[-1]
    n = wq.shape[0]
    _gemm.check_weight_side(wq, w_scale, fmt, bias, k)
    _check_lora_weights(lora_a, lora_b, n, k)
    lead = x.shape[:-1]
    x2 = x.reshape(-1, k)
    m = x2.shape[0]
    out_dtype = out_dtype or x.dtype
    wo = 0 < m <= weight_only_max_m(x, fmt) and wq.is_contiguous()
    if fmt.name not in EPILOGUE_FORMATS or wo or not (m and n and k):
        y = _linear_triton(x2, wq, w_scale, fmt, bias, out_dtype, kept)
        y = _lora_after(y, torch.nn.functional.linear(x2.to(lora_a.dtype), lora_a), lora_b) if m and n else y
    else:
        xq, xs, xa = _act_quant_lora(x2, fmt, lora_a)
        y = _gemm.scaled_mm(xq, xs, wq, w_scale, fmt, bias, out_dtype, check=False, lora_xa=xa,
                            lora_b=lora_b.contiguous())  # fmt: skip
    return y.reshape(*lead, n)


def _act_quant_lora(x2, fmt: F.Format, lora_a):
    """(xq, x_scale, xa = x @ lora_a^T [M, r] in lora_a's dtype) of x2 [M, K]: one kernel (``kernels.lora``),
    or act_quant and a cuBLAS GEMM."""
    from . import lora as _lora

    if _lora.FUSED_XA and lora_a.stride(1) == 1:
        return _lora.act_quant_lora(x2, fmt, lora_a)
    xa = torch.nn.functional.linear(x2.to(lora_a.dtype), lora_a)
    xq, xs = _quant.act_quant(x2, fmt)
    return xq, xs, xa


def _linear_lora_impl(x, wq, w_scale, fmt, lora_a, lora_b, bias, out_dtype):
    return _linear_lora_triton(x, wq, w_scale, _fmt(fmt), lora_a, lora_b, bias, out_dtype, kept=False)


def _linear_lora_fake(x, wq, w_scale, fmt, lora_a, lora_b, bias, out_dtype):
    return x.new_empty((*x.shape[:-1], wq.shape[0]), dtype=out_dtype)


if HAS_TRITON:
    _LIB.define("linear_lora(Tensor x, Tensor wq, Tensor w_scale, str fmt, Tensor lora_a, Tensor lora_b, Tensor? bias, "
                "ScalarType out_dtype) -> Tensor")  # fmt: skip
    _LIB.impl("linear_lora", _linear_lora_impl, "CUDA")
    _LIB.impl("linear_lora", _linear_lora_impl, "CPU")
    torch.library.register_fake("ditq::linear_lora", _linear_lora_fake, lib=_LIB)


def linear_lora(x, wq, w_scale, fmt, lora_a, lora_b, bias=None, out_dtype=None) -> torch.Tensor:
    """``linear`` plus a low-rank branch: y [..., N] = act_quant(x) times wq [N, K] + (x @ lora_a^T) @ lora_b^T
    + bias, in ``out_dtype`` (default x's). lora_a [r, K], lora_b [N, r]: one float dtype (the 16-bit compute
    dtype; x is cast to it for the down-projection), any r, several adapters concatenated along r with their
    factors folded into lora_b. ``EPILOGUE_FORMATS`` (int8-row) add the branch in the GEMM's epilogue (y
    written once); other formats and few rows after the product. Raises ShapeError on operands that do not fit."""
    f = _fmt(fmt)
    if not triton_runs_on(x):
        k = x.shape[-1]
        _check_lora_weights(lora_a, lora_b, wq.shape[0], k)
        return linear_lora_ref(x, wq, w_scale, f, lora_a, lora_b, bias, out_dtype)
    if _compiling() or type(x) is not torch.Tensor:  # see tensor._traced_op: fake tensors without is_compiling
        return torch.ops.ditq.linear_lora(x, wq, w_scale, f.name, lora_a, lora_b, bias, out_dtype or x.dtype)
    return _linear_lora_triton(x, wq, w_scale, f, lora_a, lora_b, bias, out_dtype)
