"""Swap the attention of diffusers transformers (Flux, Wan, Kandinsky 5, SD3, HunyuanVideo, and any model
whose processors call ``dispatch_attention_fn`` or ``F.scaled_dot_product_attention``) for
``ditq.attention``, optionally only for a range of denoising steps.

How: the modules that define the model's attention processors get their ``dispatch_attention_fn`` (and
for SD3-style processors their ``F``) replaced, once, by a router; the router sends a call to ditq only
while a forward of an enabled model is running and its step policy says 8-bit (a forward pre-hook sets
that), and when the call is one ditq can do (no dropout, no context-parallel config, no mask other than
a key-padding one, a 16-bit dtype, a device Triton runs on). Everything else goes to the original
function, so a partially supported model still runs.

Classifier-free guidance: when a pipeline batches cond + uncond (Flux, SD3, HunyuanVideo pipelines do),
both halves go through one kernel launch, each with its own key-padding mask and its own K/V statistics.
"""

from __future__ import annotations

import contextvars
import sys
import types
import weakref
from dataclasses import dataclass, field

import torch

from ..errors import DitqError

PV_MODES = ("fp8", "bf16")
_ACTIVE: contextvars.ContextVar = contextvars.ContextVar("ditq_int8_attention", default=None)
_ACTIVE_TRACED: list = [None]
"""The policy of the call in flight as a plain global, for compiled regions: Dynamo cannot trace
``ContextVar.get`` but reads a global (guarding on it, so int8 and full-precision steps get one graph each)."""


def _active_policy():
    if torch.compiler.is_compiling():
        return _ACTIVE_TRACED[0]
    return _ACTIVE.get()
_STATE = "_ditq_int8_attention"
_PATCHED: dict = {}  # module name -> {global name: original}
_ENABLED = weakref.WeakSet()  # models with the hooks installed (the patches stay while any is alive)


@dataclass
class AttentionPolicy:
    """What an enabled model runs. ``steps``: (start, stop) of the denoising steps that use 8-bit attention
    (ints, negative counting from the end, or floats in [0, 1] as fractions of the run; None = all),
    read from ``scheduler.step_index``. ``timestep_range``: (low, high), inclusive, of the transformer's
    ``timestep`` argument in the model's own units, for use without a scheduler. ``min_tokens``: shorter key
    sequences stay in full precision (tiny attentions gain nothing)."""

    pv: str = "fp8"
    smooth_k: bool = True
    steps: tuple | None = None
    timestep_range: tuple | None = None
    min_tokens: int = 0
    scheduler: object = None
    calls: dict = field(default_factory=lambda: {"int8": 0, "fallback": 0})

    def use_int8(self, kwargs) -> bool:
        if self.steps is not None:
            total = len(self.scheduler.timesteps)
            idx = self.scheduler.step_index
            i = 0 if idx is None else int(idx)  # None: the first step has not called scheduler.step() yet
            start, stop = (_resolve_step(s, total) for s in self.steps)
            if not start <= i < stop:
                return False
        if self.timestep_range is not None:
            t = kwargs.get("timestep")
            if t is None:
                raise DitqError("int8 attention: timestep_range needs the transformer called with timestep=...")
            t = float(t.flatten()[0]) if torch.is_tensor(t) else float(t)  # one host sync per forward
            lo, hi = self.timestep_range
            if not lo <= t <= hi:
                return False
        return True


def _resolve_step(s, total: int) -> int:
    if isinstance(s, float):
        return int(round(s * total))
    return s + total if s < 0 else s


def enable_int8_attention(
    model_or_pipeline,
    *,
    pv: str = "fp8",
    smooth_k: bool = True,
    steps: tuple | None = None,
    timestep_range: tuple | None = None,
    min_tokens: int = 0,
    scheduler=None,
):
    """Run the attention of a diffusers transformer (or of every transformer of a pipeline: ``transformer``,
    ``transformer_2``) through ``ditq.attention``. Returns the model(s)' policy objects, whose ``calls``
    count the attention calls that went to ditq and those that fell back.

    steps=(0, -2): 8-bit for all denoising steps but the last two (needs the pipeline, or ``scheduler=``).
    timestep_range=(lo, hi): 8-bit while the transformer's timestep argument is in [lo, hi].
    Calling it again replaces the options; ``disable_int8_attention`` restores the original attention.
    """
    if pv not in PV_MODES:
        raise DitqError(f"enable_int8_attention: pv={pv!r}; use one of {PV_MODES}")
    models, sched = _models(model_or_pipeline)
    scheduler = scheduler if scheduler is not None else sched
    if steps is not None:
        if scheduler is None or not hasattr(scheduler, "step_index"):
            raise DitqError(
                "enable_int8_attention: steps=... reads the denoising step from scheduler.step_index; pass the "
                "pipeline (or scheduler=) with a diffusers scheduler, or use timestep_range=(lo, hi) instead"
            )
        if len(steps) != 2:
            raise DitqError(f"enable_int8_attention: steps={steps!r}; expected (start, stop)")
    policies = []
    for model in models:
        _patch_processor_modules(model)
        disable_int8_attention(model, _unpatch=False)
        policy = AttentionPolicy(pv, smooth_k, tuple(steps) if steps else None,
                                 tuple(timestep_range) if timestep_range else None, min_tokens, scheduler)

        def pre_hook(module, args, kwargs, policy=policy):
            active = policy if policy.use_int8(kwargs) else None
            # a whole-model compile traces this hook: only the global then (no ContextVar in a graph)
            token = None if torch.compiler.is_compiling() else _ACTIVE.set(active)
            getattr(module, _STATE)["tokens"].append((token, _ACTIVE_TRACED[0]))
            _ACTIVE_TRACED[0] = active

        def post_hook(module, args, kwargs, output):
            tokens = getattr(module, _STATE)["tokens"]
            if tokens:
                token, _ACTIVE_TRACED[0] = tokens.pop()
                if token is not None:
                    _ACTIVE.reset(token)

        handles = [
            model.register_forward_pre_hook(pre_hook, with_kwargs=True),
            model.register_forward_hook(post_hook, with_kwargs=True, always_call=True),
        ]
        setattr(model, _STATE, {"policy": policy, "handles": handles, "tokens": []})
        _ENABLED.add(model)
        policies.append(policy)
    return policies[0] if len(policies) == 1 else policies


def disable_int8_attention(model_or_pipeline, *, _unpatch: bool = True) -> None:
    """Undo ``enable_int8_attention``: the model(s) run their original attention again."""
    models, _ = _models(model_or_pipeline)
    for model in models:
        state = getattr(model, _STATE, None)
        if state is not None:
            for h in state["handles"]:
                h.remove()
            delattr(model, _STATE)
        _ENABLED.discard(model)
    if _unpatch:
        _unpatch_if_unused()


def _models(obj):
    """(transformers, scheduler) of a pipeline, or ([model], None) of a model."""
    if isinstance(obj, torch.nn.Module):
        return [obj], None
    found = [getattr(obj, n) for n in ("transformer", "transformer_2") if isinstance(getattr(obj, n, None), torch.nn.Module)]
    if not found:
        raise DitqError(
            f"int8 attention: {type(obj).__name__} is neither a torch module nor a pipeline with a .transformer"
        )
    return found, getattr(obj, "scheduler", None)


def _patch_processor_modules(model) -> None:
    names = set()
    for m in model.modules():
        proc = getattr(m, "processor", None)
        if proc is not None:
            names.add(type(proc).__module__)
    hits = 0
    for name in names:
        mod = sys.modules.get(name)
        if mod is None:
            continue
        if name in _PATCHED:
            hits += 1
            continue
        saved = {}
        if callable(getattr(mod, "dispatch_attention_fn", None)):
            saved["dispatch_attention_fn"] = mod.dispatch_attention_fn
            mod.dispatch_attention_fn = _make_dispatch(mod.dispatch_attention_fn)
        if getattr(mod, "F", None) is torch.nn.functional:
            saved["F"] = mod.F
            mod.F = _functional_proxy()
        if saved:
            _PATCHED[name] = saved
            hits += 1
    if not hits:
        raise DitqError(
            f"int8 attention: no attention processor of {type(model).__name__} calls dispatch_attention_fn or "
            "F.scaled_dot_product_attention; this model is not supported"
        )


def _unpatch_if_unused() -> None:
    if len(_ENABLED):
        return
    for name, saved in list(_PATCHED.items()):
        mod = sys.modules.get(name)
        if mod is not None:
            for attr, orig in saved.items():
                setattr(mod, attr, orig)
        del _PATCHED[name]


def _make_dispatch(original):
    def dispatch_attention_fn(query, key, value, attn_mask=None, dropout_p=0.0, is_causal=False, scale=None,
                              enable_gqa=False, attention_kwargs=None, *, backend=None, parallel_config=None):
        policy = _active_policy()
        if policy is not None and parallel_config is None and not attention_kwargs:
            out = _int8(policy, query, key, value, attn_mask, dropout_p, is_causal, scale, "NHD")
            if out is not None:
                return out
        return original(query, key, value, attn_mask, dropout_p, is_causal, scale, enable_gqa, attention_kwargs,
                        backend=backend, parallel_config=parallel_config)

    dispatch_attention_fn._ditq_original = original
    return dispatch_attention_fn


def _functional_proxy():
    """torch.nn.functional with scaled_dot_product_attention routed through ditq (SD3-style processors)."""
    proxy = types.ModuleType("ditq_functional_proxy")
    proxy.__getattr__ = lambda name: getattr(torch.nn.functional, name)
    sdpa = torch.nn.functional.scaled_dot_product_attention

    def scaled_dot_product_attention(query, key, value, attn_mask=None, dropout_p=0.0, is_causal=False, scale=None,
                                     enable_gqa=False):
        policy = _active_policy()
        if policy is not None:
            out = _int8(policy, query, key, value, attn_mask, dropout_p, is_causal, scale, "HND")
            if out is not None:
                return out
        return sdpa(query, key, value, attn_mask=attn_mask, dropout_p=dropout_p, is_causal=is_causal, scale=scale,
                    enable_gqa=enable_gqa)

    proxy.scaled_dot_product_attention = scaled_dot_product_attention
    return proxy


def _int8(policy, q, k, v, attn_mask, dropout_p, is_causal, scale, layout):
    """ditq's attention for this call, or None where it does not apply (the caller then runs the original)."""
    from ..attn import attention
    from ..kernels import triton_runs_on

    seq = 1 if layout == "NHD" else 2
    ok = (
        dropout_p == 0.0
        and q.dim() == 4 and k.dim() == 4 and v.dim() == 4
        and q.dtype in (torch.bfloat16, torch.float16) and q.dtype == k.dtype == v.dtype
        and q.shape[-1] <= 256 and k.shape == v.shape
        and q.shape[2 if layout == "NHD" else 1] % k.shape[2 if layout == "NHD" else 1] == 0
        and k.shape[seq] >= max(policy.min_tokens, 1)
        and triton_runs_on(q)
    )
    kpm = None
    if ok and attn_mask is not None:
        kpm = key_padding_from_mask(attn_mask, q.shape[0], k.shape[seq])
        ok = kpm is not None and not is_causal
    if not ok:
        if not torch.compiler.is_compiling():  # a counter in a graph would recompile it per call
            policy.calls["fallback"] += 1
        return None
    if not torch.compiler.is_compiling():  # a counter in a graph would recompile it per call
        policy.calls["int8"] += 1
    return attention(q, k, v, layout=layout, causal=is_causal, sm_scale=scale, pv=policy.pv,
                     smooth_k=policy.smooth_k, key_padding_mask=kpm)


def key_padding_from_mask(mask: torch.Tensor, batch: int, n_kv: int) -> torch.Tensor | None:
    """A boolean mask that only hides keys ([B, Nk], [B, 1, Nk] or [B, 1, 1, Nk], True = attend) as [B, Nk];
    None for any other mask (per-query masks, additive float masks: those keep the original attention)."""
    if mask.dtype != torch.bool or mask.shape[-1] != n_kv or mask.dim() < 2:
        return None
    if any(s != 1 for s in mask.shape[1:-1]) or mask.shape[0] not in (1, batch):
        return None
    return mask.reshape(mask.shape[0], n_kv).expand(batch, n_kv)
