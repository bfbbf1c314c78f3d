"""Triton quantization kernels, each beside its wrapper: dynamic activation quantization (per token, and per
token per 128 channels), weight quantization (all five formats) and weight dequantization.

The math is ``ditq.formats``' (the references): ``scale = max(amax, AMAX_EPS) / qmax``,
``q = clamp(round_half_even(v / scale), -qmax, qmax)``. Two portable tricks keep one code path for the GPU
and Triton's CPU interpreter:

- int8 rounding adds 1.5 * 2^23: the fp32 add rounds half to even at integer precision and the low bits of
  the sum *are* the integer (read by a bitcast), so no float->int conversion instruction is needed.
- fp8: the GPU's cast rounds to nearest even; the interpreter's cast (triton 3.6) drops the carry into the
  exponent (31.8 -> 16), so under the interpreter values are first rounded onto the e4m3 grid by hand,
  which makes its cast exact.

Activation quantization may divide by multiplying with the reciprocal of the scale (``exact_div=False``,
the fast default on the GPU): ``q`` then differs from the reference by one step on the rare values that sit
within an ulp of a rounding boundary. Weight quantization always divides exactly (IEEE, ``div_rn``).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

import os

import numpy as np

from .. import formats as F
from ..errors import ShapeError
from . import INTERPRET

_MAGIC = 12582912.0  # 1.5 * 2^23: fp32 adds of |v| < 2^22 round to an integer
_MAGIC_BITS = 0x4B400000  # bit pattern of _MAGIC
_MAX_ROW = 16384  # widest row quantized in one pass from registers (per-token scale)


def empty(shape, dtype, device) -> torch.Tensor:
    """Every kernel output is allocated here (tests replace it to poison outputs before kernels write)."""
    return torch.empty(shape, dtype=dtype, device=device)


class Tma:
    """A TMA operand of a kernel launch: ``tensor`` (2-D, unit inner stride) seen in ``block`` boxes. Turned
    into Triton's TensorDescriptor for the first (compiling) launch (Gluon's, for a Gluon kernel: ``layout`` is
    then its shared-memory layout); later launches reuse encoded maps."""

    __slots__ = ("t", "block", "layout")

    def __init__(self, t: torch.Tensor, block: tuple, layout=None):
        self.t, self.block, self.layout = t, block, layout

    def descriptor(self):
        if self.layout is not None:
            from triton.experimental.gluon.nvidia.hopper import TensorDescriptor as GluonDescriptor

            return GluonDescriptor(self.t, list(self.t.shape), list(self.t.stride()), list(self.block), self.layout)
        from triton.tools.tensor_descriptor import TensorDescriptor

        return TensorDescriptor(self.t, list(self.t.shape), list(self.t.stride()), list(self.block))


class _Compiled:
    """A compiled kernel plus what launching it without Triton's per-call Python needs."""

    __slots__ = ("ck", "raw", "metas", "descs", "launcher")

    def __init__(self, ck, args):
        self.ck, self.raw, self.metas = ck, None, None
        self.descs = [i for i, a in enumerate(args) if a.__class__ is Tma]
        try:  # the C launch function under Triton's launcher, when nothing else needs doing per call
            launcher = ck.run
            fn = launcher.launch
            if launcher.global_scratch_size or launcher.profile_scratch_size:
                return
            if self.descs:  # Triton wraps it to encode descriptors: take the wrapped builtin
                cells = [c.cell_contents for c in (fn.__closure__ or ())]
                fn = next(c for c in cells if type(c).__name__ == "builtin_function_or_method")
                self.metas = getattr(ck.metadata, "tensordesc_meta", None) or [None] * len(self.descs)
            self.launcher, self.raw = launcher, fn
        except Exception:  # another triton layout: the regular launch path stays
            self.raw = None


class Spec:
    """Everything one launch needs: ``kernel[grid](*args, **constexprs, num_warps=.., num_stages=.., **options)``.
    ``key`` captures what Triton specializes the non-constexpr ``args`` on (see ``launch``)."""

    __slots__ = ("kernel", "grid", "args", "constexprs", "num_warps", "num_stages", "key", "options")

    def __init__(self, kernel, grid, args, constexprs, num_warps, num_stages=1, key=None, **options):
        self.kernel, self.grid, self.args, self.constexprs = kernel, grid, args, constexprs
        self.num_warps, self.num_stages, self.key, self.options = num_warps, num_stages, key, options


class Bound:
    """A launched specialization with its grid and constexprs fixed: ``bound(stream, *flat)`` launches it again
    by one call of Triton's C launcher. ``flat`` are the non-constexpr arguments in kernel order, each TMA
    operand expanded by ``bound.tma(i, tensor)`` (i-th TMA operand). Made by ``bind``; valid for arguments with
    the same specialization key as the launch it was made from."""

    __slots__ = ("entry", "head", "mid", "tail", "blocks")

    def __init__(self, entry: _Compiled, spec: Spec):
        g, ck = entry.launcher, entry.ck
        grid = tuple(spec.grid) + (1, 1)
        self.entry, self.head, self.tail = entry, grid[:3], tuple(spec.constexprs.values())
        self.mid = (ck.function, g.launch_cooperative_grid, g.launch_pdl, None, None, ck.packed_metadata, None, None, None)
        self.blocks = [a.block for a in spec.args if a.__class__ is Tma]

    def tma(self, j: int, t: torch.Tensor) -> list:
        """The expanded launcher arguments of TMA operand j for tensor ``t`` (cached by address and layout)."""
        return _encoded(self.entry, j, Tma(t, self.blocks[j]))

    def __call__(self, stream, *flat):
        self.entry.raw(*self.head, stream, *self.mid, *flat, *self.tail)


_COMPILED: dict = {}
_TMA_MAPS: dict = {}
RAW_LAUNCH = os.environ.get("DITQ_RAW_LAUNCH", "1") == "1"
"""Launch compiled kernels through Triton's C launcher directly, with cached TMA maps (default; verified on an
H200, see bench/NOTES.md). ``DITQ_RAW_LAUNCH=0`` takes Triton's launcher object on every call instead (it
re-encodes TMA descriptors each time) -- still without Triton's argument binding and cache lookup."""


def _encoded(entry: _Compiled, j: int, a: Tma) -> list:
    """Expanded launcher arguments of TMA operand j (encoded map, shape, strides), cached: a map depends only
    on address, shape, strides, dtype and box, so a cached one is valid for any tensor that matches them."""
    t = a.t
    key = (id(entry), j, t.data_ptr(), t.shape, t.stride(), t.dtype)
    got = _TMA_MAPS.get(key)
    if got is None:
        from triton.backends.nvidia.driver import make_tensordesc_arg

        if len(_TMA_MAPS) > 4096:
            _TMA_MAPS.clear()
        got = _TMA_MAPS[key] = make_tensordesc_arg(a.descriptor(), entry.metas[j])
    return got


def hooked() -> bool:
    """Whether a launch hook (a profiler) is installed: then launches take Triton's regular path. In triton
    3.6 the hook is a HookChain that is never None; it is active when it holds calls."""
    h = triton.knobs.runtime.launch_enter_hook
    return h is not None and bool(getattr(h, "calls", True))


_hooked = hooked


def _spec_key(a):
    """What Triton specializes an argument on (used when the caller gives no key)."""
    if isinstance(a, torch.Tensor):
        return (a.dtype, a.data_ptr() & 15)
    if a.__class__ is Tma:
        return (a.t.dtype, a.t.shape[1:], a.t.stride(), a.block)
    if isinstance(a, int):
        return (a & 15, a == 1, a > 0x7FFFFFFF)
    return a


def launch(spec: Spec):
    """Run ``spec`` at a fraction of Triton's host time and return its ``_Compiled`` entry (None under the
    interpreter). The first launch of each specialization goes through Triton (compiles, caches); later ones
    call the C launcher directly, with cached TMA maps. ``spec.key`` must capture what Triton specializes on
    (dtypes and 16-byte alignment of tensors, integers' divisibility by 16 and equality to 1); without it
    every argument is inspected. ``spec.constexprs`` must follow the kernel's parameter order."""
    kernel, grid, args, constexprs = spec.kernel, spec.grid, spec.args, spec.constexprs
    if INTERPRET:
        args = tuple(a.descriptor() if a.__class__ is Tma else a for a in args)
        kernel[grid](*args, **constexprs, num_warps=spec.num_warps, num_stages=spec.num_stages, **spec.options)
        return None
    dev = torch.cuda.current_device()
    key = spec.key if spec.key is not None else tuple([_spec_key(a) for a in args])
    key = (kernel, dev, spec.num_warps, spec.num_stages, tuple(spec.options.items()), tuple(constexprs.values()), key)
    entry = _COMPILED.get(key)
    stream = torch._C._cuda_getCurrentRawStream(dev)
    if RAW_LAUNCH and entry is not None and entry.raw is not None and not hooked():
        flat = []
        j = 0
        for a in args:
            if a.__class__ is Tma:
                flat.extend(_encoded(entry, j, a))
                j += 1
            else:
                flat.append(a)
        g = entry.launcher
        try:
            entry.raw(grid[0], grid[1] if len(grid) > 1 else 1, grid[2] if len(grid) > 2 else 1, stream,
                      entry.ck.function, g.launch_cooperative_grid, g.launch_pdl, None, None,
                      entry.ck.packed_metadata, None, None, None, *flat, *constexprs.values())  # fmt: skip
            return entry
        except (TypeError, ValueError, SystemError):  # an argument layout this triton does not take
            entry.raw = None
    full = tuple(a.descriptor() if a.__class__ is Tma else a for a in args)
    if entry is None:
        names = kernel.arg_names[len(args) :]
        assert list(constexprs) == names, f"launch({kernel.fn.__name__}): constexprs must be given in order {names}"
        ck = kernel[grid](*full, **constexprs, num_warps=spec.num_warps, num_stages=spec.num_stages, **spec.options)
        entry = _COMPILED[key] = _Compiled(ck, args)
        return entry
    ck = entry.ck
    full = (*full, *constexprs.values())
    enter = triton.knobs.runtime.launch_enter_hook
    meta = ck.launch_metadata(grid, stream, *full) if hooked() else None
    ck.run(grid[0], grid[1] if len(grid) > 1 else 1, grid[2] if len(grid) > 2 else 1, stream, ck.function,
           ck.packed_metadata, meta, enter, triton.knobs.runtime.launch_exit_hook, *full)  # fmt: skip
    return entry


def bind(spec: Spec) -> Bound | None:
    """Launch ``spec`` and return a ``Bound`` that relaunches its specialization by one C call, or None where
    that is not possible (interpreter, a profiler hook, ``DITQ_RAW_LAUNCH=0``, a triton whose launcher
    differs): then callers keep launching through ``launch``."""
    entry = launch(spec)
    if entry is None or entry.raw is None or not RAW_LAUNCH or hooked():
        return None
    return Bound(entry, spec)


def _rcp(qmax: float) -> float:
    """float32(1) / float32(qmax): the reciprocal torch's CUDA division by a Python scalar multiplies with."""
    return float(np.float32(1.0) / np.float32(qmax))


@triton.jit
def _round_e4m3_grid(v):
    """Round fp32 ``v`` (|v| <= 448) half to even onto the float8_e4m3fn grid, staying fp32."""
    bits = v.to(tl.int32, bitcast=True)
    e = tl.maximum(((bits >> 23) & 0xFF) - 127, -6)  # e4m3 subnormals share the 2^-6 exponent
    up = ((3 - e + 127) << 23).to(tl.float32, bitcast=True)  # 2^(3-e): one e4m3 ulp becomes 1
    down = ((e - 3 + 127) << 23).to(tl.float32, bitcast=True)
    r = ((tl.abs(v) * up + 12582912.0) - 12582912.0) * down
    # the sign goes back on as a bit (triton's -x is 0 - x: +0.0), so tiny negatives give -0.0 like the cast
    return (r.to(tl.int32, bitcast=True) | (bits & -2147483648)).to(tl.float32, bitcast=True)


@triton.jit
def cast_rne(y, dt: tl.constexpr, MANUAL: tl.constexpr):
    """fp32 -> ``dt`` rounding to nearest even. The interpreter's fp32 -> bf16 cast truncates (triton 3.6),
    so with MANUAL the value is first rounded onto the bf16 grid by integer arithmetic on its bits."""
    if MANUAL and dt == tl.bfloat16:
        bits = y.to(tl.uint32, bitcast=True)
        bits = (bits + 0x7FFF + ((bits >> 16) & 1)) & 0xFFFF0000
        y = bits.to(tl.float32, bitcast=True)
    return y.to(dt)


@triton.jit
def _to_storage(v, QMAX: tl.constexpr, IS_INT: tl.constexpr, FP8_MANUAL: tl.constexpr):
    """fp32 values already divided by their scale -> int8 / float8_e4m3fn (clamp, round half to even)."""
    v = tl.minimum(tl.maximum(v, -QMAX), QMAX)
    if IS_INT:
        i = (v + 12582912.0).to(tl.int32, bitcast=True) - 0x4B400000
        return i.to(tl.int8)
    else:
        if FP8_MANUAL:
            v = _round_e4m3_grid(v)
        return v.to(tl.float8e4nv, fp_downcast_rounding="rtne")


@triton.jit
def _scale_of(amax, QMAX: tl.constexpr, RCP_QMAX: tl.constexpr):
    """max(amax, AMAX_EPS) / qmax, rounded as the reference on this device rounds it: torch divides by a
    Python scalar exactly on the CPU but multiplies by its fp32 reciprocal on CUDA (RCP_QMAX > 0)."""
    a = tl.maximum(amax, 1e-12)
    if RCP_QMAX > 0:
        return a * RCP_QMAX
    else:
        return tl.div_rn(a, tl.full(a.shape, QMAX, tl.float32))


@triton.jit
def _divide(x, scale, inv, EXACT_DIV: tl.constexpr):
    if EXACT_DIV:
        return tl.div_rn(x, scale)
    else:
        return x * inv


# ----------------------------------------------------------------------------------------------------------
# activation quantization


@triton.jit(do_not_specialize=["M"])
def _act_quant_token_kernel(
    x_ptr, q_ptr, s_ptr, M, K, stride_xm, stride_xk,
    QMAX: tl.constexpr, RCP_QMAX: tl.constexpr, IS_INT: tl.constexpr, FP8_MANUAL: tl.constexpr,
    EXACT_DIV: tl.constexpr, BLOCK_K: tl.constexpr, ONE_PASS: tl.constexpr, ROWS: tl.constexpr,
):  # fmt: skip
    """ROWS rows of x [M, K] (any strides) per program: scale [M] = max|row| / qmax, q [M, K] contiguous."""
    if ONE_PASS:  # whole rows live in registers: one read of x
        rows = tl.program_id(0) * ROWS + tl.arange(0, ROWS)
        r_ok = rows < M
        rows64 = rows.to(tl.int64)
        offs = tl.arange(0, BLOCK_K)
        m = r_ok[:, None] & (offs < K)[None, :]
        x = tl.load(x_ptr + rows64[:, None] * stride_xm + offs[None, :] * stride_xk, mask=m, other=0.0)
        x = x.to(tl.float32)
        scale = _scale_of(tl.max(tl.abs(x), axis=1), QMAX, RCP_QMAX)
        inv = tl.div_rn(tl.full(scale.shape, 1.0, tl.float32), scale)
        q = _to_storage(_divide(x, scale[:, None], inv[:, None], EXACT_DIV), QMAX, IS_INT, FP8_MANUAL)
        tl.store(q_ptr + rows64[:, None] * K + offs[None, :], q, mask=m)
        tl.store(s_ptr + rows, scale, mask=r_ok)
    else:  # very wide rows, one per program: amax pass, then a quantize pass (the second read mostly hits L2)
        row = tl.program_id(0).to(tl.int64)
        x_row = x_ptr + row * stride_xm
        q_row = q_ptr + row * K
        offs = tl.arange(0, BLOCK_K)
        amax = tl.zeros([BLOCK_K], dtype=tl.float32)
        for k0 in range(0, K, BLOCK_K):
            m = k0 + offs < K
            x = tl.load(x_row + (k0 + offs) * stride_xk, mask=m, other=0.0).to(tl.float32)
            amax = tl.maximum(amax, tl.abs(x))
        scale = _scale_of(tl.max(amax), QMAX, RCP_QMAX)
        inv = tl.div_rn(1.0, scale)
        for k0 in range(0, K, BLOCK_K):
            m = k0 + offs < K
            x = tl.load(x_row + (k0 + offs) * stride_xk, mask=m, other=0.0).to(tl.float32)
            q = _to_storage(_divide(x, scale, inv, EXACT_DIV), QMAX, IS_INT, FP8_MANUAL)
            tl.store(q_row + k0 + offs, q, mask=m)
        tl.store(s_ptr + row, scale)


@triton.jit
def _act_quant_group_kernel(
    x_ptr, q_ptr, s_ptr, K, stride_xm, stride_xk,
    QMAX: tl.constexpr, RCP_QMAX: tl.constexpr, IS_INT: tl.constexpr, FP8_MANUAL: tl.constexpr,
    EXACT_DIV: tl.constexpr, GROUP: tl.constexpr, GROUPS_PER_PROGRAM: tl.constexpr,
):  # fmt: skip
    """Grid (M, cdiv(K/GROUP, GROUPS_PER_PROGRAM)): a [GROUPS_PER_PROGRAM, GROUP] slab of one row of x;
    scale [M, K/GROUP] = max|group| / qmax. Each group is self-contained, so one read of x always."""
    row = tl.program_id(0).to(tl.int64)
    n_groups = K // GROUP
    g = tl.program_id(1) * GROUPS_PER_PROGRAM + tl.arange(0, GROUPS_PER_PROGRAM)
    col = g[:, None] * GROUP + tl.arange(0, GROUP)[None, :]
    m = (g < n_groups)[:, None]
    x = tl.load(x_ptr + row * stride_xm + col * stride_xk, mask=m, other=0.0).to(tl.float32)
    scale = _scale_of(tl.max(tl.abs(x), axis=1), QMAX, RCP_QMAX)
    inv = tl.div_rn(tl.full(scale.shape, 1.0, tl.float32), scale)
    q = _to_storage(_divide(x, scale[:, None], inv[:, None], EXACT_DIV), QMAX, IS_INT, FP8_MANUAL)
    tl.store(q_ptr + row * K + col, q, mask=m)
    tl.store(s_ptr + row * n_groups + g, scale, mask=g < n_groups)


def token_config(k: int) -> tuple[int, int]:
    """(rows per program, warps) of the per-token kernel for rows of k elements: one row, up to 64 elements per
    thread (H200 sweep, bench/NOTES.md round 5: more rows per program or more warps were no faster)."""
    block = min(triton.next_power_of_2(k), _MAX_ROW)
    return 1, max(4, block // 2048)


def act_quant_spec(x: torch.Tensor, q: torch.Tensor, s: torch.Tensor, fmt: F.Format, exact: bool,
                   config: tuple[int, int] | None = None) -> Spec:  # fmt: skip
    """The launch of the activation-quantization kernel of x [M, K] (M, K > 0) into q [M, K] contiguous and
    s f32 [M, 1] (per token) or [M, K/128] contiguous (block formats; K % 128 == 0 checked by the caller).
    ``config``: (rows per program, warps) of the per-token kernel instead of ``token_config``'s."""
    m, k = x.shape
    sm, sk = x.stride()
    rcp = _rcp(fmt.qmax) if x.is_cuda else 0.0
    # what Triton specializes on besides the constexprs (q and s are fresh, aligned, contiguous allocations)
    key = (x.dtype, x.data_ptr() & 15, k & 15, k == 1, sm & 15, sm == 1, sk & 15, sk == 1, sm > 0x7FFFFFFF)
    if fmt.act_granularity == "token":
        block = min(triton.next_power_of_2(k), _MAX_ROW)
        rows, warps = config or token_config(k)
        rows = rows if k <= block else 1
        return Spec(_act_quant_token_kernel, (triton.cdiv(m, rows),), (x, q, s, m, k, sm, sk),
                    dict(QMAX=fmt.qmax, RCP_QMAX=rcp, IS_INT=fmt.is_int, FP8_MANUAL=INTERPRET, EXACT_DIV=exact,
                         BLOCK_K=block, ONE_PASS=k <= block, ROWS=rows), warps, key=key)  # fmt: skip
    groups = k // F.BLOCK
    gpp = min(triton.next_power_of_2(groups), 32)
    warps = 4 if gpp <= 16 else 8
    return Spec(_act_quant_group_kernel, (m, triton.cdiv(groups, gpp)), (x, q, s, k, sm, sk),
                dict(QMAX=fmt.qmax, RCP_QMAX=rcp, IS_INT=fmt.is_int, FP8_MANUAL=INTERPRET, EXACT_DIV=exact,
                     GROUP=F.BLOCK, GROUPS_PER_PROGRAM=gpp), warps, key=key)  # fmt: skip


def act_scale_shape(fmt: F.Format, m: int, k: int) -> tuple[int, int]:
    return (m, k // F.BLOCK) if fmt.is_block else (m, 1)


def act_quant(x: torch.Tensor, fmt, exact_div: bool | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Dynamic activation quantization with Triton. x: [M, K] bf16/fp16/fp32, any strides.

    Returns q [M, K] (int8 or float8_e4m3fn, contiguous) and scale f32 [M, 1] (per token) or [M, K/128]
    (block formats: per token per 128 channels). ``exact_div`` (default: only under the interpreter) divides
    by the scale exactly instead of multiplying by its reciprocal."""
    fmt = F.get_format(fmt)
    if x.dim() != 2:
        raise ShapeError(f"act_quant takes a 2-D [M, K] activation, got shape {tuple(x.shape)}; reshape first")
    m, k = x.shape
    if fmt.is_block and k % F.BLOCK:
        raise ShapeError(f"activation has K={k}: format {fmt.name} needs K divisible by {F.BLOCK}")
    exact = INTERPRET if exact_div is None else exact_div
    q = empty((m, k), fmt.storage, x.device)
    s = empty(act_scale_shape(fmt, m, k), torch.float32, x.device)
    if m and k:
        launch(act_quant_spec(x, q, s, fmt, exact))
    elif m and not fmt.is_block:
        s.fill_(F.AMAX_EPS / fmt.qmax)
    return q, s


# ----------------------------------------------------------------------------------------------------------
# weight quantization and dequantization (offline: clarity over speed; division is exact)


@triton.jit
def _amax_kernel(
    w_ptr, out_ptr, N, K, stride_wn, stride_wk,
    PER_BLOCK: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
):  # fmt: skip
    """PER_BLOCK: program (i, j) writes max|w| of the [BLOCK_N, BLOCK_K] block (i, j) to out[i, j].
    Else: program i writes max|w| of each of rows i*BLOCK_N.. to out[row] (looping over K)."""
    pid_n = tl.program_id(0)
    rn = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    rk = tl.arange(0, BLOCK_K)
    if PER_BLOCK:
        pid_k = tl.program_id(1)
        ck = pid_k * BLOCK_K + rk
        m = (rn < N)[:, None] & (ck < K)[None, :]
        w = tl.load(w_ptr + rn[:, None].to(tl.int64) * stride_wn + ck[None, :] * stride_wk, mask=m, other=0.0)
        tl.store(out_ptr + pid_n * tl.num_programs(1) + pid_k, tl.max(tl.max(tl.abs(w.to(tl.float32)), axis=1)))
    else:
        amax = tl.zeros([BLOCK_N, BLOCK_K], dtype=tl.float32)
        for k0 in range(0, K, BLOCK_K):
            m = (rn < N)[:, None] & (k0 + rk < K)[None, :]
            ptr = w_ptr + rn[:, None].to(tl.int64) * stride_wn + (k0 + rk)[None, :] * stride_wk
            amax = tl.maximum(amax, tl.abs(tl.load(ptr, mask=m, other=0.0).to(tl.float32)))
        tl.store(out_ptr + rn, tl.max(amax, axis=1), mask=rn < N)


@triton.jit
def _scale_at(s_ptr, rn, rk, s_stride_n, s_stride_k, GROUP_N: tl.constexpr, GROUP_K: tl.constexpr):
    """Gather the scale of every element of a tile: scale[rn // GROUP_N, rk // GROUP_K] (strides may be 0)."""
    return tl.load(s_ptr + (rn // GROUP_N)[:, None] * s_stride_n + (rk // GROUP_K)[None, :] * s_stride_k)


@triton.jit
def _weight_quant_kernel(
    w_ptr, q_ptr, s_ptr, N, K, stride_wn, stride_wk, s_stride_n, s_stride_k,
    QMAX: tl.constexpr, IS_INT: tl.constexpr, FP8_MANUAL: tl.constexpr,
    GROUP_N: tl.constexpr, GROUP_K: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
):  # fmt: skip
    """q [N, K] contiguous = round(w / scale) for the scale that covers each element."""
    rn = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    rk = tl.program_id(1) * BLOCK_K + tl.arange(0, BLOCK_K)
    m = (rn < N)[:, None] & (rk < K)[None, :]
    rn_c = tl.minimum(rn, N - 1)  # clamped so the scale gather of masked lanes stays in bounds
    rk_c = tl.minimum(rk, K - 1)
    w = tl.load(w_ptr + rn[:, None].to(tl.int64) * stride_wn + rk[None, :] * stride_wk, mask=m, other=0.0)
    s = _scale_at(s_ptr, rn_c, rk_c, s_stride_n, s_stride_k, GROUP_N, GROUP_K)
    q = _to_storage(tl.div_rn(w.to(tl.float32), s), QMAX, IS_INT, FP8_MANUAL)
    tl.store(q_ptr + rn[:, None].to(tl.int64) * K + rk[None, :], q, mask=m)


@triton.jit
def _weight_dequant_kernel(
    q_ptr, s_ptr, out_ptr, N, K, s_stride_n, s_stride_k,
    IS_INT: tl.constexpr, GROUP_N: tl.constexpr, GROUP_K: tl.constexpr,
    BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, MANUAL_RNE: tl.constexpr,
):  # fmt: skip
    """out [N, K] = q * scale, bit-for-bit as ComfyUI: int8 multiplies in fp32 then casts; fp8 casts q and
    the scale to the output dtype first (a product of two such values is exact in fp32, then rounded once)."""
    rn = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    rk = tl.program_id(1) * BLOCK_K + tl.arange(0, BLOCK_K)
    m = (rn < N)[:, None] & (rk < K)[None, :]
    off = rn[:, None].to(tl.int64) * K + rk[None, :]
    q = tl.load(q_ptr + off, mask=m)
    s = _scale_at(s_ptr, tl.minimum(rn, N - 1), tl.minimum(rk, K - 1), s_stride_n, s_stride_k, GROUP_N, GROUP_K)
    dt = out_ptr.dtype.element_ty
    if IS_INT:
        y = q.to(tl.float32) * s
    else:
        y = cast_rne(q.to(tl.float32), dt, MANUAL_RNE).to(tl.float32) * cast_rne(s, dt, MANUAL_RNE).to(tl.float32)
    tl.store(out_ptr + off, cast_rne(y, dt, MANUAL_RNE), mask=m)


def _scale_layout(fmt: F.Format, scale: torch.Tensor, k: int) -> tuple[int, int, int, int]:
    """(GROUP_N, GROUP_K, stride_n, stride_k) to find the scale of element (n, k)."""
    if fmt.weight_granularity == "tensor":
        return 1, 1, 0, 0
    if fmt.weight_granularity == "row":
        return 1, 1, scale.stride(0), 0
    return F.BLOCK, F.BLOCK, scale.stride(0), scale.stride(1)


def weight_amax_scale(w: torch.Tensor, fmt) -> torch.Tensor:
    """The f32 scale of a weight [N, K] (shape ``fmt.weight_scale_shape``); amax by Triton, the final
    ``max(amax, AMAX_EPS) / qmax`` by the same torch ops as the reference (so scales match exactly)."""
    fmt = F.get_format(fmt)
    n, k = w.shape
    if fmt.is_block:
        amax = empty((n // F.BLOCK, k // F.BLOCK), torch.float32, w.device)
        _amax_kernel[amax.shape](w, amax, n, k, w.stride(0), w.stride(1), PER_BLOCK=True, BLOCK_N=F.BLOCK, BLOCK_K=F.BLOCK)
    else:
        amax = empty((n, 1), torch.float32, w.device)
        bn, bk = 16, min(triton.next_power_of_2(k), 256)
        _amax_kernel[(triton.cdiv(n, bn),)](w, amax, n, k, w.stride(0), w.stride(1), PER_BLOCK=False, BLOCK_N=bn, BLOCK_K=bk)
        if fmt.weight_granularity == "tensor":
            amax = amax.amax()
    return amax.clamp(min=F.AMAX_EPS) / fmt.qmax


def quant_weight(w: torch.Tensor, fmt, scale: torch.Tensor | None = None, name: str | None = None):
    """Weight quantization with Triton. w: [N, K] float, any strides. Returns (q [N, K] storage dtype,
    contiguous; scale f32 of shape ``fmt.weight_scale_shape(N, K)``). A given ``scale`` is used as is."""
    fmt = F.get_format(fmt)
    F.check_weight(w, fmt, name)
    n, k = w.shape
    scale = weight_amax_scale(w, fmt) if scale is None else scale.to(device=w.device, dtype=torch.float32)
    expect = fmt.weight_scale_shape(n, k)
    if tuple(scale.shape) != expect:
        raise ShapeError(f"scale has shape {tuple(scale.shape)}; format {fmt.name} with weight [{n}, {k}] needs {expect}")
    q = empty((n, k), fmt.storage, w.device)
    gn, gk, ssn, ssk = _scale_layout(fmt, scale, k)
    bn, bk = (F.BLOCK, F.BLOCK) if fmt.is_block else (32, 128)
    grid = (triton.cdiv(n, bn), triton.cdiv(k, bk))
    if not (n and k):
        return q, scale
    _weight_quant_kernel[grid](
        w, q, scale, n, k, w.stride(0), w.stride(1), ssn, ssk,
        QMAX=fmt.qmax, IS_INT=fmt.is_int, FP8_MANUAL=INTERPRET, GROUP_N=gn, GROUP_K=gk, BLOCK_N=bn, BLOCK_K=bk,
    )  # fmt: skip
    return q, scale


def dequant_weight(q: torch.Tensor, scale: torch.Tensor, fmt, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """Weight dequantization with Triton: q [N, K] storage dtype -> [N, K] ``dtype``, as ``dequantize_ref``."""
    fmt = F.get_format(fmt)
    if q.dim() != 2 or q.dtype != fmt.storage:
        raise ShapeError(f"dequant_weight: expected a 2-D {fmt.storage} tensor for {fmt.name}, got {q.dtype} {tuple(q.shape)}")
    n, k = q.shape
    if tuple(scale.shape) != fmt.weight_scale_shape(n, k):
        raise ShapeError(
            f"dequant_weight: scale has shape {tuple(scale.shape)}; {fmt.name} [{n}, {k}] needs {fmt.weight_scale_shape(n, k)}"
        )
    q = q.contiguous()
    scale = scale.to(torch.float32)
    out = empty((n, k), dtype, q.device)
    if n and k:
        gn, gk, ssn, ssk = _scale_layout(fmt, scale, k)
        bn, bk = 32, 128
        grid = (triton.cdiv(n, bn), triton.cdiv(k, bk))
        _weight_dequant_kernel[grid](
            q, scale, out, n, k, ssn, ssk, IS_INT=fmt.is_int, GROUP_N=gn, GROUP_K=gk, BLOCK_N=bn, BLOCK_K=bk,
            MANUAL_RNE=INTERPRET,
        )
    return out
