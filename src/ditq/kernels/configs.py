"""GEMM launch configurations: pre-tuned ones for known shapes, a heuristic for the rest.

The key is (format, M bucket, N, K). Tuned entries live in ``gemm_configs.json`` beside this file, written by
``ditq bench gemm --tune`` on an H100/H200 (so nothing is searched when a process starts); an entry is a
``Config.as_list()``. M is bucketed to the next power of two (min 16, max 32768) because the best tile
depends on how many row tiles there are, not on the exact token count.
"""

from __future__ import annotations

import json
from functools import lru_cache
from pathlib import Path

from . import INTERPRET, hopper
from .gemm import Config
from .hopper import BLOCK_K, BLOCK_M, BLOCK_N

TUNED_PATH = Path(__file__).with_name("gemm_configs.json")

BLOCK_FORMATS = ("int8-block", "fp8-block")


def m_bucket(m: int) -> int:
    b = 16
    while b < m and b < 32768:
        b *= 2
    return b


def key(fmt: str, m: int, n: int, k: int) -> str:
    return f"{fmt}|{m_bucket(m)}|{n}|{k}"


@lru_cache(maxsize=1)
def tuned() -> dict[str, Config]:
    """The shipped table ({} when the file is missing or unreadable: the heuristic then applies)."""
    try:
        raw = json.loads(TUNED_PATH.read_text())
    except (OSError, ValueError):
        return {}
    return {k: Config.from_list(v) for k, v in raw.get("configs", {}).items()}


def heuristic(fmt: str, m: int, n: int, k: int) -> Config:
    """A reasonable configuration without tuning (Hopper: 128-wide K steps feed the int8/fp8 tensor cores)."""
    if INTERPRET:  # the CPU interpreter: few programs, small tiles
        if fmt in BLOCK_FORMATS:
            return Config(32, 64, 128, 4, 4, 1, tma=True, dot2=True)
        return Config(32, 32, 64, 4, 4, 1, tma=True)
    if fmt in BLOCK_FORMATS:
        if m <= 8192:
            return Config(64, 128, 128, 8, 4, 4, tma=True)
        return Config(128, 128, 128, 8, 8, 3, tma=False, dot2=True)
    if m <= 128:
        return Config(64, 64, 128, 8, 4, 4)
    if m <= 1024:
        return Config(128, 128, 128, 8, 4, 4)
    return Config(128, 256, 128, 8, 8, 3)


def _nearest_tuned(fmt: str, m: int, n: int, k: int) -> Config | None:
    """The tuned config of the same format and M bucket whose (N, K) is closest in log scale."""
    import math

    prefix = f"{fmt}|{m_bucket(m)}|"
    best, best_d = None, math.inf
    for key_, c in tuned().items():
        if key_.startswith(prefix):
            tn, tk = (int(v) for v in key_[len(prefix) :].split("|"))
            d = abs(math.log(tn / n)) + abs(math.log(tk / k))
            if d < best_d:
                best, best_d = c, d
    return best


WS_CONFIG = Config(BLOCK_M, BLOCK_N, BLOCK_K, 8, 4, 4, tail_split=4, ws=True)
"""The warp-specialized Gluon kernel (``hopper.py``) with 4 stages, the last wave's tiles split over K into up to 4
slices: int8-row, int8-block and fp8-block from ``hopper.MIN_M`` rows on a Hopper GPU (NOTES, GEMM round 7)."""


@lru_cache(maxsize=4096)
def get_config(fmt: str, m: int, n: int, k: int) -> Config:
    """The launch configuration for a GEMM: the warp-specialized kernel where it applies (on the current
    device); else the tuned one for (format, M bucket, N, K); else the tuned one of the nearest (N, K) in that M
    bucket; else the heuristic."""
    if not INTERPRET:
        if fmt in hopper.FORMATS and m >= hopper.MIN_M and hopper.available():
            return WS_CONFIG
        c = tuned().get(key(fmt, m, n, k)) or _nearest_tuned(fmt, m, n, k)
        if c is not None:
            return c
    return heuristic(fmt, m, n, k)


WEIGHT_ONLY_MAX_M = {"int8": 32, "fp8": 16}
"""Rows up to which ``ops.linear`` on a GPU takes the weight-only kernel (one launch, x unquantized) instead of
act quant + W8A8 GEMM, per storage kind: measured on an H200 (bench/NOTES.md, "Small M": at M=64 every
weight-only variant was slower than bf16; e4m3 -> bf16 conversion costs more than int8 -> bf16)."""


def weight_only_max_m(fmt: str) -> int:
    return WEIGHT_ONLY_MAX_M["fp8" if fmt.startswith("fp8") else "int8"]


def weight_only_config(fmt: str, m: int, n: int, k: int) -> Config:
    """Launch configuration of the weight-only kernel (block_m covers all rows), from the H200 sweep
    (bench/NOTES.md, "Small M"). The kernel is bound by reading the weight, so it needs enough programs on
    every SM: K is split until there are >= 2 programs per SM (at most 4 slices: 8 and 16 measured slower), each
    slice at least two K steps. e4m3 weights take 64-row tiles with 3 stages (their conversion to bf16 costs
    more ALU; that tile was fastest for every fp8 case swept)."""
    bm = 16
    while bm < m:
        bm *= 2
    if INTERPRET:
        return Config(bm, 32, 128, 1, 4, 1, split_k=2)
    import torch

    from .gemm import _num_sms

    sms = _num_sms(torch.device("cuda", torch.cuda.current_device()))
    if fmt.startswith("fp8") or bm >= 64:
        bn, bk, stages = 64, (256 if bm <= 64 else 128), 3
    else:
        bn, bk, stages = 32, (256 if bm <= 16 else 128), 4
    tiles = -(-n // bn)
    steps = -(-k // bk)
    split = 1
    fp8_or_wide = fmt.startswith("fp8") or bm >= 64
    while split < 4 and split * 2 <= max(1, steps // 2) and (fp8_or_wide or tiles * split < 2 * sms):
        split *= 2
    return Config(bm, bn, bk, 1, 4, stages, split_k=split)
