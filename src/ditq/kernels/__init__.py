"""Triton kernels, one file per op family, each kernel beside its wrapper. ``ops`` is the entry point the
rest of ditq uses: it registers the kernels as torch custom ops and falls back to the pure-torch
references of ``ditq.formats`` where Triton cannot run (no GPU, no interpreter)."""

import os

try:  # Triton is Linux-only; everything works without it through the references
    import triton  # noqa: F401

    HAS_TRITON = True
except ImportError:  # pragma: no cover
    HAS_TRITON = False

INTERPRET = os.environ.get("TRITON_INTERPRET", "0") == "1"
"""True when Triton runs kernels through its CPU interpreter (tests on machines without a GPU)."""


def triton_runs_on(t) -> bool:
    """Whether the Triton kernels can run on ``t``'s device: CUDA with Triton, or CPU under the interpreter."""
    if not HAS_TRITON:
        return False
    return t.is_cuda or (INTERPRET and t.device.type == "cpu")
