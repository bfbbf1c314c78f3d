"""Learned rounding: choose each 8-bit weight value so that the layer's *output* error is small, not the
weight error (round-to-nearest already minimizes that), and keep the result only where it beats
round-to-nearest on held-out activations.

Objectives (``ΔW = W_dq - W``, ``W`` [N, K]):

* ``activation`` (needs calibration): ``E_x ||x ΔW^T||^2 / N = tr(ΔW H ΔW^T) / N`` with the input second
  moment ``H = E[x x^T]`` [K, K], i.e. the output MSE on the calibration distribution.
* ``weight`` (data-free, opt-in): ``||ΔW||_F^2 / N``, the output MSE for white inputs; nearest is optimal
  for a fixed scale, so only the per-row / block / tensor scale search can gain.
* ``svd`` (data-free, opt-in): ``||U_k^T ΔW V_k||_F^2`` with the top-k singular vectors of W; k =
  ``rank_fraction * min(N, K)`` clamped to ``[min_rank, max_rank]``. It assumes inputs live where W acts
  most.

Without data nothing can check a data-free result against real inputs, and both raised the output error
on some test layers (bench/NOTES.md), so ``objective="auto"`` without calibration keeps nearest.

Optimizers:

* ``original`` (default): GPTQ error feedback (columns in descending ``diag H`` order, lazy 128-column
  blocks, Cholesky of the damped ``H^-1``), optionally followed by ``iters`` sweeps of exact coordinate
  descent (each value may move one grid step up or down; rows are independent, so a sweep is column by
  column with all rows at once). Scales stay fixed: the format's amax scale and, when ``optimize_scale``,
  a per row / block / tensor shrink searched on the objective; the candidate with the lower objective wins.
* ``adamw`` / ``radam``: the GPTQ result refined by ``iters`` steps of the torch optimizer on the continuous
  weight with a straight-through rounding, keeping the best iterate on the objective.

Every candidate is scored on the objective; the best is then compared with round-to-nearest on held-out
activation rows (the calibration sample, or ``heldout``), and nearest is returned when it is not better.

The calibration file (``ditq calibrate`` writes it, ``LayerStats`` / ``CalibrationStats`` below) holds per
layer the input mean, the second moment (full ``[K, K]``, or a rank-r eigen summary plus the exact diagonal
for large K), a sample of held-out input rows that were *not* accumulated into the moment, and the token
count.
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass, field

import torch

from . import formats as F
from .errors import CheckpointError, DitqError, FormatError, ShapeError

OBJECTIVES = ("auto", "activation", "weight", "svd")
OPTIMIZERS = ("original", "adamw", "radam")
SCALE_GRID = (1.0, 0.98, 0.96, 0.94, 0.92, 0.9, 0.875, 0.85, 0.825, 0.8)
"""Shrink factors tried for each row / block / tensor scale (1.0 = the amax scale, no clipping)."""

CHECKPOINT_PREFIXES = ("model.diffusion_model.", "diffusion_model.", "transformer.", "model.")
"""Prefixes that checkpoints put before a model's module names (ComfyUI, pipelines)."""

CALIBRATION_MARKER = "ditq_calibration"
CALIBRATION_VERSION = "1"


# -- calibration statistics ------------------------------------------------------------------------------
@dataclass
class LayerStats:
    """Input statistics of one linear layer (K input features).

    mean [K] f32; count: tokens accumulated into the moment; moment [K, K] f32 = E[x x^T], or for large K
    the summary ``eigvecs`` [K, r] f32, ``eigvals`` [r] f32 and the exact ``diag`` [K] f32 of E[x x^T];
    sample [S, K] f32: input rows kept out of the moment, for held-out evaluation (may be None)."""

    mean: torch.Tensor
    count: int
    moment: torch.Tensor | None = None
    eigvecs: torch.Tensor | None = None
    eigvals: torch.Tensor | None = None
    diag: torch.Tensor | None = None
    sample: torch.Tensor | None = None

    @property
    def k(self) -> int:
        return int(self.mean.shape[0])

    @property
    def summary(self) -> str:
        return "full" if self.moment is not None else "lowrank"

    def hessian(self, device=None, dtype=torch.float32) -> torch.Tensor:
        """E[x x^T] as a dense [K, K] matrix. From a low-rank summary: ``V diag(λ) V^T`` plus the part of the
        exact diagonal it misses (so every channel keeps its true energy)."""
        if self.moment is not None:
            return self.moment.to(device=device, dtype=dtype)
        v = self.eigvecs.to(device=device, dtype=dtype)
        lam = self.eigvals.to(device=device, dtype=dtype)
        h = (v * lam) @ v.t()
        resid = (self.diag.to(device=device, dtype=dtype) - torch.diagonal(h)).clamp(min=0)
        h.diagonal().add_(resid)
        return h

    @classmethod
    def from_activations(cls, x: torch.Tensor, heldout_fraction: float = 0.2, seed: int = 0) -> "LayerStats":
        """Statistics from activation rows x [M, K]; a random ``heldout_fraction`` of the rows becomes the
        held-out sample and is left out of the moment."""
        x = x.detach().reshape(-1, x.shape[-1]).double()
        m = x.shape[0]
        g = torch.Generator().manual_seed(seed)
        perm = torch.randperm(m, generator=g).to(x.device)
        n_held = int(round(m * heldout_fraction)) if m > 1 else 0
        held, fit = x[perm[:n_held]], x[perm[n_held:]]
        if fit.shape[0] == 0:
            raise ShapeError("LayerStats.from_activations: no rows left for the moment; give more rows")
        return cls(
            mean=fit.mean(0).float(),
            count=int(fit.shape[0]),
            moment=(fit.t() @ fit / fit.shape[0]).float(),
            sample=held.float() if n_held else None,
        )

    def validate(self, name: str = "?") -> None:
        k = self.k
        bad = None
        if self.moment is not None and tuple(self.moment.shape) != (k, k):
            bad = f"moment {list(self.moment.shape)}"
        elif self.moment is None and (self.eigvecs is None or self.eigvals is None or self.diag is None):
            bad = "neither a moment nor a complete eigvecs/eigvals/diag summary"
        elif self.moment is None and (self.eigvecs.shape[0] != k or self.diag.shape != (k,)):
            bad = f"eigvecs {list(self.eigvecs.shape)} / diag {list(self.diag.shape)}"
        elif self.sample is not None and (self.sample.dim() != 2 or self.sample.shape[1] != k):
            bad = f"sample {list(self.sample.shape)}"
        if bad:
            raise CheckpointError(f"calibration stats for layer {name!r} (K={k}) are inconsistent: {bad}")


_FIELDS = ("mean", "moment", "eigvecs", "eigvals", "diag", "sample")


@dataclass
class CalibrationStats:
    """Per-layer ``LayerStats`` keyed by module name; ``aliases`` maps a layer to another one that saw the
    very same input tensor in every forward (e.g. to_k -> to_q), whose stats it shares."""

    layers: dict[str, LayerStats] = field(default_factory=dict)
    aliases: dict[str, str] = field(default_factory=dict)
    meta: dict = field(default_factory=dict)

    def __contains__(self, name: str) -> bool:
        return self.get(name) is not None

    def names(self) -> list[str]:
        return sorted([*self.layers, *self.aliases])

    def get(self, name: str) -> LayerStats | None:
        """Stats of a layer by module name or weight key (``blocks.0.attn.to_q`` or ``...to_q.weight``); the
        checkpoint prefixes of ``CHECKPOINT_PREFIXES`` are ignored (only those: a shorter suffix could name
        another layer)."""
        key = name[: -len(".weight")] if name.endswith(".weight") else name
        for prefix in ("", *CHECKPOINT_PREFIXES):
            if prefix and not key.startswith(prefix):
                continue
            k = key[len(prefix):]
            k = self.aliases.get(k, k)
            if k in self.layers:
                return self.layers[k]
        return None

    def save(self, path) -> None:
        from safetensors.torch import save_file

        tensors, info = {}, {}
        for name, st in self.layers.items():
            st.validate(name)
            for f in _FIELDS:
                t = getattr(st, f)
                if t is not None:  # own, packed storage: safetensors refuses shared or strided tensors
                    tensors[f"{name}.{f}"] = t.detach().to("cpu", torch.float32).clone(
                        memory_format=torch.contiguous_format)
            info[name] = {"k": st.k, "tokens": st.count, "summary": st.summary,
                          "sample_rows": 0 if st.sample is None else int(st.sample.shape[0])}
        meta = {
            CALIBRATION_MARKER: CALIBRATION_VERSION,
            "layers": json.dumps(info),
            "aliases": json.dumps(self.aliases),
            "info": json.dumps(self.meta),
        }
        save_file(tensors, str(path), metadata=meta)

    @classmethod
    def load(cls, path) -> "CalibrationStats":
        from safetensors import safe_open

        try:
            with safe_open(str(path), framework="pt") as f:
                meta = f.metadata() or {}
                if meta.get(CALIBRATION_MARKER) != CALIBRATION_VERSION:
                    raise CheckpointError(
                        f"{path}: not a ditq calibration file (metadata {CALIBRATION_MARKER!r} missing or not "
                        f"version {CALIBRATION_VERSION}); create one with `ditq calibrate`"
                    )
                info = json.loads(meta["layers"])
                layers = {}
                keys = set(f.keys())
                for name, li in info.items():
                    parts = {fl: f.get_tensor(f"{name}.{fl}") for fl in _FIELDS if f"{name}.{fl}" in keys}
                    if "mean" not in parts:
                        raise CheckpointError(f"{path}: layer {name!r} has no '{name}.mean' tensor")
                    st = LayerStats(count=int(li["tokens"]), **parts)
                    st.validate(name)
                    layers[name] = st
                return cls(layers, json.loads(meta.get("aliases", "{}")), json.loads(meta.get("info", "{}")))
        except (OSError, json.JSONDecodeError, KeyError) as e:
            raise CheckpointError(f"{path}: cannot read calibration statistics ({e})") from e


def load_calibration(path) -> CalibrationStats:
    return CalibrationStats.load(path)


# -- bias correction -------------------------------------------------------------------------------------
def bias_correction(w: torch.Tensor, w_dq: torch.Tensor, input_mean: torch.Tensor) -> torch.Tensor:
    """The term to add to a layer's bias so that its mean output is unchanged by weight quantization:
    ``(W - W_dq) @ E[x]`` [N] f32. w, w_dq [N, K]; input_mean [K] from real calibration inputs (a
    zero-mean guess gives zero: the correction needs the activations' true mean)."""
    d = w.double() - w_dq.to(w.device).double()
    return (d @ input_mean.to(w.device).double()).float()


# -- grid helpers ----------------------------------------------------------------------------------------
def _round_codes(v: torch.Tensor, fmt: F.Format, out: torch.Tensor | None = None) -> torch.Tensor:
    """Scaled values -> nearest grid values (float32, unscaled), exactly what ``round_to_storage`` stores;
    int8 skips the int8 round trip (torch.round is half-to-even too): fewer launches in GPTQ's column loop."""
    v = v.clamp(-fmt.qmax, fmt.qmax)
    if fmt.is_int:
        return torch.round(v, out=out)
    c = v.to(fmt.storage).float()
    return c if out is None else out.copy_(c)


def _grid_step(c: torch.Tensor, fmt: F.Format, up: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """The adjacent grid value of the grid values ``c`` (f32) toward +inf (``up``) or -inf, and a mask of
    where it exists (inside +-qmax). e4m3fn is sign-magnitude: moving away from zero is code magnitude + 1."""
    if fmt.is_int:
        n = c + (1.0 if up else -1.0)
        return n, n.abs() <= fmt.qmax
    b = c.to(torch.float8_e4m3fn).view(torch.uint8).to(torch.int16)
    mag = b & 0x7F
    away = (c >= 0) if up else (c <= 0)  # moving away from zero (from +-0 both directions count as away)
    sign_out = torch.where(away, torch.full_like(b, 0 if up else 1), b >> 7)
    mag_out = torch.where(away, mag + 1, mag - 1)
    ok = mag_out <= 0x7E  # 0x7F is NaN in e4m3fn; 0x7E = 448
    code = ((sign_out << 7) | mag_out.clamp(0, 0x7E)).to(torch.uint8)
    return code.view(torch.float8_e4m3fn).float(), ok


# -- objectives ------------------------------------------------------------------------------------------
class _Objective:
    """A quadratic output-error measure of ΔW [N, K]: value(ΔW) and its gradient; ``h`` [K, K] is the
    input-side matrix GPTQ uses (exact for ``activation``, a proxy for ``svd``)."""

    name: str
    h: torch.Tensor

    def value(self, d: torch.Tensor) -> float:
        raise NotImplementedError

    def grad(self, d: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError


class _ActivationObjective(_Objective):
    name = "activation"

    def __init__(self, h: torch.Tensor):
        self.h = h

    def value(self, d):
        return float(((d @ self.h) * d).sum().double() / d.shape[0])

    def grad(self, d):
        return 2.0 * (d @ self.h) / d.shape[0]


class _WeightObjective(_Objective):
    """``||ΔW||_F^2 / N``: the output MSE for white inputs (E[x x^T] = I). Round-to-nearest is optimal for a
    fixed scale, so only the scale search can gain here; it is the data-free default."""

    name = "weight"

    def __init__(self, k: int, device):
        self.h = torch.eye(k, device=device)

    def value(self, d):
        return float(d.double().pow(2).sum() / d.shape[0])

    def grad(self, d):
        return 2.0 * d / d.shape[0]


class _SvdObjective(_Objective):
    name = "svd"

    def __init__(self, w: torch.Tensor, rank: int, damping: float, seed: int):
        n, k = w.shape
        torch.manual_seed(seed)  # svd_lowrank draws a random test matrix
        if rank >= min(n, k) // 2:
            u, _, vh = torch.linalg.svd(w, full_matrices=False)
            u, v = u[:, :rank], vh[:rank].t()
        else:
            u, _, v = torch.svd_lowrank(w, q=min(rank + 16, min(n, k)), niter=4)
            u, v = u[:, :rank], v[:, :rank]
        self.u, self.v, self.rank = u.contiguous(), v.contiguous(), rank
        # GPTQ proxy: penalize error along V_k fully, elsewhere by `damping` (relative to mean diag = rank/K)
        self.h = v @ v.t()
        self.h.diagonal().add_(damping * rank / k)

    def value(self, d):
        return float((self.u.t() @ d @ self.v).double().pow(2).sum())

    def grad(self, d):
        return 2.0 * self.u @ (self.u.t() @ d @ self.v) @ self.v.t()


def auto_damping(k: int, tokens: int) -> float:
    """GPTQ damping (fraction of mean diag H added to H) for a moment estimated from ``tokens`` rows of K
    features: the fewer rows a feature, the more of H is estimation noise that GPTQ would fit, so the more
    damping. 0.4 K / tokens clamped to [0.02, 0.3] is within ~3 points of the best held-out reduction of
    {0.01, 0.03, 0.1, 0.3} over 2-32 tokens per feature on the structured test layers (bench/NOTES.md)."""
    return min(0.3, max(0.02, 0.4 * k / max(tokens, 1)))


def svd_rank(n: int, k: int, rank_fraction: float, min_rank: int, max_rank: int) -> int:
    r = int(round(rank_fraction * min(n, k)))
    return max(1, min(min(n, k), max(min_rank, min(max_rank, r))))


# -- scale search ----------------------------------------------------------------------------------------
def search_scale(w: torch.Tensor, h: torch.Tensor | None, fmt: F.Format, grid=SCALE_GRID) -> torch.Tensor:
    """Per row / 128x128 block / tensor, the shrink of the amax scale (from ``grid``) whose round-to-nearest
    result has the least output error under ``h`` [K, K] (None: the identity, i.e. the weight MSE). A block
    is scored with its own 128x128 diagonal block of h (the cross terms between blocks average out over
    independent rounding errors). w [N, K] f32; returns a scale of the format's shape, f32."""
    n, k = w.shape
    base = F.weight_scale(w, fmt).to(w.device)
    kb = k // F.BLOCK
    hb = None
    if h is not None and fmt.is_block:
        hb = torch.stack([h[j * F.BLOCK:(j + 1) * F.BLOCK, j * F.BLOCK:(j + 1) * F.BLOCK] for j in range(kb)])

    def unit_error(d):  # squared output error summed per scale unit, shaped like the scale
        if fmt.is_block:
            if hb is None:
                e = d * d
            else:
                db = d.reshape(n, kb, F.BLOCK).transpose(0, 1)  # [K/128, N, 128]
                e = (torch.bmm(db, hb) * db).transpose(0, 1).reshape(n, k)
            return e.reshape(n // F.BLOCK, F.BLOCK, kb, F.BLOCK).sum((1, 3))
        e = (d * d if h is None else (d @ h) * d).sum(1, keepdim=True)
        return e if fmt.weight_granularity == "row" else e.sum()

    best_err, best = None, base
    for a in grid:
        s = base * a
        sf = F.broadcast_weight_scale(s, fmt, n, k)
        err = unit_error(_round_codes(w / sf, fmt) * sf - w)
        if best_err is None:
            best_err, best = err, s
        else:
            better = err < best_err
            best_err, best = torch.where(better, err, best_err), torch.where(better, s, best)
    return best.float()


# -- GPTQ and refinements --------------------------------------------------------------------------------
def _damped_cholesky_inverse(h: torch.Tensor, damping: float) -> torch.Tensor:
    """Upper Cholesky factor U of (h + damping * mean(diag h) * I)^-1 = U^T U, in float64 for stability.

    Without forming the inverse: with J the reversal, chol(J h J) = L gives h = R R^T for the upper
    R = J L J, so h^-1 = R^-T R^-1 and U = R^-1 (one Cholesky, one triangular solve). More damping is
    added (x10, up to 4 times) when h is too ill-conditioned."""
    h = h.double()
    k = h.shape[0]
    mean_diag = float(torch.diagonal(h).mean().clamp(min=1e-30))
    eye = torch.eye(k, dtype=h.dtype, device=h.device)
    for _ in range(5):
        hd = h.flip(0, 1).clone()
        hd.diagonal().add_(damping * mean_diag)
        lc, info = torch.linalg.cholesky_ex(hd)
        if int(info) == 0:
            u = torch.linalg.solve_triangular(lc.flip(0, 1), eye, upper=True)
            if bool(torch.isfinite(u).all()):
                return u
        damping = max(damping * 10, 1e-6)
    raise DitqError(f"GPTQ: the input second moment ({k}x{k}) is not positive definite even with heavy damping")


def gptq(
    w: torch.Tensor, h: torch.Tensor, s_full: torch.Tensor, fmt: F.Format, damping: float = 0.01,
    block_size: int = 128, act_order: bool = True,
) -> torch.Tensor:
    """GPTQ error feedback with fixed scales. w [N, K] f32; h [K, K] (E[x x^T] or a proxy); s_full [N, K]
    f32 per-element scales. Returns grid values [N, K] f32 (so ``codes * s_full`` is the dequantized weight).

    Works on W^T so that each weight column is a contiguous row. Columns with a zero diagonal (inputs
    never active) get h_jj = 1 and no feedback, i.e. nearest."""
    n, k = w.shape
    h = h.double().clone()
    dead = torch.diagonal(h) <= 0
    h[dead, dead] = 1.0
    perm = torch.argsort(torch.diagonal(h), descending=True) if act_order else torch.arange(k, device=w.device)
    wt = w.t()[perm].float().contiguous()  # [K, N]
    st = s_full.expand(n, k).t()[perm].contiguous()
    hinv = _damped_cholesky_inverse(h[perm][:, perm], damping).float()
    codes = torch.empty_like(wt)
    for i1 in range(0, k, block_size):
        i2 = min(i1 + block_size, k)
        err1 = torch.empty(i2 - i1, n, device=w.device)
        hi = hinv[i1:i2, i1:i2]
        for i in range(i2 - i1):
            # the column's error-compensated target: feedback from this block's earlier columns is pulled
            # in one vector-matrix product (a rank-1 push per column is slow on a busy multi-core CPU)
            col = wt[i1 + i] - hi[:i, i] @ err1[:i] if i else wt[i1]
            s = st[i1 + i]
            c = _round_codes(col / s, fmt, out=codes[i1 + i])
            torch.addcmul(col, c, s, value=-1.0, out=err1[i]).div_(hi[i, i])
        if i2 < k:
            wt[i2:].addmm_(hinv[i1:i2, i2:].t(), err1, alpha=-1.0)
    out = torch.empty_like(codes)
    out[perm] = codes
    return out.t().contiguous()


def coordinate_descent(
    codes: torch.Tensor, w: torch.Tensor, s_full: torch.Tensor, h: torch.Tensor, fmt: F.Format,
    sweeps: int = 1, block_size: int = 128,
) -> tuple[torch.Tensor, int]:
    """Exact descent on tr(ΔW h ΔW^T): column by column (all rows at once, rows are independent), move each
    value one grid step up or down when that lowers its row's error. codes, w, s_full [N, K] f32.
    Returns (codes, values changed). Works on transposes so a column is a contiguous row."""
    n, k = w.shape
    ct = codes.t().contiguous()
    st = s_full.expand(n, k).t().contiguous()
    h = h.float()
    gt = h @ (ct * st - w.t())  # [K, N]: half the gradient of every row's error (h is symmetric)
    hd = torch.diagonal(h)
    changed = 0
    for _ in range(sweeps):
        for b1 in range(0, k, block_size):
            b2 = min(b1 + block_size, k)
            dd = torch.zeros(b2 - b1, n, device=w.device)
            for j in range(b1, b2):
                c, s = ct[j], st[j]
                g = gt[j] + h[j, b1:j] @ dd[: j - b1] if j > b1 else gt[j]  # this block's earlier moves
                best_gain = torch.zeros_like(g)
                best_c, best_u = c, torch.zeros_like(g)
                for up in (True, False):
                    c2, ok = _grid_step(c, fmt, up)
                    u = (c2 - c) * s
                    delta = u * (2.0 * g + u * hd[j])
                    better = ok & (delta < best_gain)
                    best_gain = torch.where(better, delta, best_gain)
                    best_c = torch.where(better, c2, best_c)
                    best_u = torch.where(better, u, best_u)
                changed += int((best_u != 0).sum())
                ct[j] = best_c
                dd[j - b1] = best_u
            gt.addmm_(h[:, b1:b2], dd)  # G catches up with the block's moves in one GEMM
    return ct.t().contiguous(), changed


def ste_refine(
    codes: torch.Tensor, w: torch.Tensor, s_full: torch.Tensor, fmt: F.Format, objective: _Objective,
    optimizer: str, iters: int, lr: float = 0.05,
) -> tuple[torch.Tensor, int]:
    """Refine grid values with a torch optimizer (AdamW / RAdam) on the continuous weight in grid units,
    rounding with a straight-through estimator; returns the best iterate on the objective and the number
    of the iteration that produced it (0: the start was never beaten)."""
    n, k = w.shape
    s_full = s_full.expand(n, k)
    p = codes.clone().requires_grad_(True)
    cls = {"adamw": torch.optim.AdamW, "radam": torch.optim.RAdam}[optimizer]
    opt = cls([p], lr=lr, weight_decay=0.0)
    best, best_val, best_it = codes, objective.value(codes * s_full - w), 0
    for it in range(1, iters + 1):
        opt.zero_grad(set_to_none=False)
        with torch.no_grad():
            c = _round_codes(p, fmt)
            p.grad = objective.grad(c * s_full - w) * s_full
        opt.step()
        with torch.no_grad():
            c = _round_codes(p, fmt)
            val = objective.value(c * s_full - w)
            if val < best_val:
                best, best_val, best_it = c, val, it
    return best.detach(), best_it


# -- the entry points ------------------------------------------------------------------------------------
def _as_stats(calibration, k: int, name) -> LayerStats | None:
    if calibration is None:
        return None
    if isinstance(calibration, CalibrationStats):
        if not name:
            raise DitqError("learned rounding with a calibration file needs the layer's name to find its statistics")
        st = calibration.get(name)
        if st is None:
            return None
    elif isinstance(calibration, LayerStats):
        st = calibration
    elif isinstance(calibration, torch.Tensor):
        st = LayerStats.from_activations(calibration)
    else:
        raise TypeError(f"calibration must be LayerStats, CalibrationStats, activation rows or None, "
                        f"got {type(calibration).__name__}")
    if st.k != k:
        raise ShapeError(f"calibration for layer {name!r} has K={st.k} input features, the weight has {k}; "
                         f"the calibration file does not belong to this model")
    return st


def _heldout_mse(x: torch.Tensor, d: torch.Tensor) -> float:
    return float((x.double() @ d.double().t()).pow(2).mean())


def _w8a8_error(x, q, s, fmt, w) -> float:
    y = F.linear_ref(x.double(), q, s, fmt, out_dtype=torch.float64, compute_dtype=torch.float64)
    return F.relative_error(y, x.double() @ w.double().t())


def learned_quantize(
    w: torch.Tensor,
    fmt,
    calibration=None,
    objective: str = "auto",
    optimizer: str = "original",
    iters: int | None = None,
    rank_fraction: float = 0.05,
    min_rank: int = 8,
    max_rank: int = 256,
    optimize_scale: bool = True,
    heldout: torch.Tensor | None = None,
    seed: int = 0,
    damping: float | None = None,
    block_size: int = 128,
    act_order: bool = True,
    lr: float = 0.05,
    bias: torch.Tensor | None = None,
    min_tokens: float = 1.0,
    device=None,
    name: str | None = None,
):
    """Quantize w [N, K] with rounding chosen for low output error. Returns (qdata [N, K] storage dtype,
    scale f32 of the format's shape, report dict), both tensors on w's device.

    calibration: LayerStats, CalibrationStats (looked up by ``name``), activation rows [M, K] (20% are held
    out), or None. objective: "activation" (needs calibration), "weight" or "svd" (data-free, opt-in),
    "auto" (activation when calibration is there, else nearest: unchecked data-free rounding can be worse).
    optimizer / iters: see the module docstring (iters defaults to 0 extra sweeps for "original": they lower
    the calibration objective but not the held-out error; 100 steps for "adamw" / "radam").
    heldout: input rows [S, K] to judge the result on (default: the calibration sample); the report's
    ``*_learned`` fields describe the learned candidate even when it was rejected.
    bias: the layer's bias [N]; with a calibration mean the report then holds ``corrected_bias`` when the
    correction lowers the held-out error (or, without held-out rows, always).
    damping: GPTQ's damping as a fraction of mean diag H (default ``auto_damping(K, tokens)``).
    min_tokens: with objective "auto", layers whose statistics hold fewer than min_tokens x K tokens use
    the data-free "weight" objective judged on the held-out rows, or nearest when there are none
    (report["note"] says so). device: where to compute (default CUDA when available)."""
    t0 = time.perf_counter()
    fmt = F.get_format(fmt)
    F.check_weight(w, fmt, name)
    if objective not in OBJECTIVES:
        raise FormatError(f"unknown rounding objective {objective!r}; choose one of {', '.join(OBJECTIVES)}")
    if optimizer not in OPTIMIZERS:
        raise FormatError(f"unknown rounding optimizer {optimizer!r}; choose one of {', '.join(OPTIMIZERS)}")
    n, k = w.shape
    out_device = w.device
    dev = torch.device(device) if device is not None else (
        torch.device("cuda") if torch.cuda.is_available() else w.device)
    wf = w.detach().to(dev, torch.float32)
    stats = _as_stats(calibration, k, name)
    if heldout is None and stats is not None and stats.sample is not None and stats.sample.shape[0] > 0:
        heldout = stats.sample
    note = None
    if objective == "auto":
        if stats is None:
            return nearest_result(w, fmt, name, "no calibration statistics for this layer (the data-free "
                                  "objectives 'weight' and 'svd' are opt-in: unchecked, they can raise the "
                                  "output error)", t0)
        objective = "activation"
        if stats.count < min_tokens * k:
            # fewer tokens than inputs: H is rank-deficient and GPTQ would hide the error in directions
            # that other inputs do use; the data-free objective is tried instead, where held-out rows can judge it
            note = f"{stats.count} calibration tokens < {min_tokens} x K = {min_tokens * k}"
            if heldout is None:
                return nearest_result(w, fmt, name, note + " and no held-out rows", t0)
            objective = "weight"
    if objective == "activation" and stats is None:
        raise FormatError(f"rounding objective 'activation' for layer {name!r} needs calibration statistics; "
                          f"run `ditq calibrate` and pass them, or use objective='weight' (data-free)")
    if iters is None:
        iters = 0 if optimizer == "original" else 100
    x_held = heldout.to(dev, torch.float32).reshape(-1, k) if heldout is not None else None

    rank = None
    if damping is None:
        damping = auto_damping(k, stats.count) if objective == "activation" else 0.1
    if objective == "activation":
        obj: _Objective = _ActivationObjective(stats.hessian(dev, torch.float32))
    elif objective == "weight":
        obj = _WeightObjective(k, dev)
    else:
        rank = svd_rank(n, k, rank_fraction, min_rank, max_rank)
        obj = _SvdObjective(wf, rank, max(damping, 0.1), seed)

    q0, s0 = F.quantize_weight_ref(wf, fmt)
    w0 = F.dequantize_ref(q0, s0, fmt)
    obj_nearest = obj.value(w0 - wf)

    scales = [("amax", s0)]
    if optimize_scale:
        s1 = search_scale(wf, None if objective == "weight" else obj.h, fmt)
        if not torch.equal(s1, s0):
            scales.append(("searched", s1))
    best = None
    iterations = 0
    for label, s in scales:
        sf = F.broadcast_weight_scale(s, fmt, n, k).expand(n, k)
        if objective == "weight":  # white inputs: nearest is optimal for this scale, nothing to feed back
            codes = _round_codes(wf / sf, fmt)
        else:
            codes = gptq(wf, obj.h, sf, fmt, damping, block_size, act_order)
            if iters > 0:
                if optimizer == "original":
                    codes, _ = coordinate_descent(codes, wf, sf, obj.h, fmt, iters, block_size)
                else:
                    codes, _ = ste_refine(codes, wf, sf, fmt, obj, optimizer, iters, lr)
                iterations += iters
        val = obj.value(codes * sf - wf)
        if best is None or val < best[0]:
            best = (val, label, codes, s)
    obj_learned, scale_kind, codes, s_l = best
    q_l = F.round_to_storage(codes, fmt)  # codes are grid values already: exact
    w_l = F.dequantize_ref(q_l, s_l, fmt)

    report = {
        "name": name, "format": fmt.name, "objective": objective, "optimizer": optimizer, "rank": rank,
        "iterations": iterations, "scale": scale_kind, "damping": damping,
        "objective_nearest": obj_nearest, "objective_learned": obj_learned,
        "heldout_rows": 0 if x_held is None else int(x_held.shape[0]),
        "heldout_mse_nearest": None, "heldout_mse_learned": None, "heldout_reduction": None,
        "w8a8_error_nearest": None, "w8a8_error_learned": None,
        "changed_fraction": float((q_l.float() != q0.float()).float().mean()),
        "fallback": False, "fallback_reason": None, "note": note,
    }
    if obj_learned >= obj_nearest:
        report.update(fallback=True, fallback_reason="not better than nearest on the objective")
    if x_held is not None:
        mse0, mse1 = _heldout_mse(x_held, w0 - wf), _heldout_mse(x_held, w_l - wf)
        report.update(heldout_mse_nearest=mse0, heldout_mse_learned=mse1,
                      heldout_reduction=(1.0 - mse1 / mse0) if mse0 > 0 else 0.0,
                      w8a8_error_nearest=_w8a8_error(x_held, q0, s0, fmt, wf),
                      w8a8_error_learned=_w8a8_error(x_held, q_l, s_l, fmt, wf))
        if not report["fallback"] and mse1 >= mse0:
            report.update(fallback=True, fallback_reason="not better than nearest on held-out activations")
    if report["fallback"]:
        q_l, s_l, w_l = q0, s0, w0
        report["changed_fraction"] = 0.0
    if bias is not None and stats is not None:
        corr = bias_correction(wf, w_l, stats.mean.to(dev))
        b = bias.detach().to(dev, torch.float32)
        keep = True
        if x_held is not None:  # keep it only where it helps on held-out rows (a mean from few tokens may not)
            err = x_held.double() @ (w_l - wf).double().t()
            keep = float((err + corr.double()).pow(2).mean()) < float(err.pow(2).mean())
        report["bias_correction"] = keep
        if keep:
            report["corrected_bias"] = (b + corr).to(out_device, bias.dtype)
    report["time_s"] = time.perf_counter() - t0
    return q_l.to(out_device), s_l.to(out_device), report


def nearest_result(w: torch.Tensor, fmt, name, reason: str, t0: float | None = None):
    """Round-to-nearest with a report saying why learned rounding did not run: (qdata, scale, report)."""
    t0 = time.perf_counter() if t0 is None else t0
    fmt = F.get_format(fmt)
    q, s = F.quantize_weight_ref(w, fmt, name=name)
    return q, s, {"name": name, "format": fmt.name, "objective": None, "optimizer": None, "iterations": 0,
                  "fallback": True, "fallback_reason": reason, "time_s": time.perf_counter() - t0}


def round_layer(name: str, w: torch.Tensor, fmt, calibration=None, **options):
    """The converter's per-layer hook: ``learned_quantize`` with the layer's own statistics looked up by
    ``name`` (module name or ``<L>.weight``) in a CalibrationStats. A layer the file does not cover is
    kept at nearest (report says why) unless a data-free ``objective`` ("weight", "svd") is asked for.

    Returns (qdata, scale, report); ``report["corrected_bias"]`` (if present) is the bias to write."""
    if isinstance(calibration, CalibrationStats) and calibration.get(name) is None and options.get(
            "objective", "auto") in ("auto", "activation"):
        return nearest_result(w, fmt, name, "layer not in the calibration file")
    return learned_quantize(w, fmt, calibration=calibration, name=name, **options)


def format_report(r: dict) -> str:
    """One line for a per-layer report."""
    def pct(x):
        return "n/a" if x is None else f"{100 * x:+.1f}%"

    if r.get("objective") is None:
        return f"{r['name']}: nearest ({r['fallback_reason']})"
    red = None if not r.get("objective_nearest") else 1 - r["objective_learned"] / r["objective_nearest"]
    what = "nearest (fallback: " + r["fallback_reason"] + ")" if r["fallback"] else "learned"
    return (f"{r['name']}: {what}; {r['objective']} objective {pct(red)}, held-out output MSE "
            f"{pct(r.get('heldout_reduction'))}, {r['iterations']} it, {r['time_s']:.2f} s")

