"""What the GPU benchmarks share for timing: a call captured as one CUDA graph."""

from __future__ import annotations

import contextlib

import torch


@contextlib.contextmanager
def captured(fn, warmup: int = 2):
    """``fn`` captured as one CUDA graph (after ``warmup`` calls on a side stream, as capture requires); yields
    the graph, whose replay is the GPU's time of the call with no host work between its kernels. The graph's
    memory is released on exit. Raises where ``fn`` cannot be captured."""
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        for _ in range(warmup):
            fn()
    torch.cuda.current_stream().wait_stream(side)
    g = torch.cuda.CUDAGraph()
    try:
        with torch.cuda.graph(g):
            fn()
        yield g
    finally:
        g.reset()
        torch.cuda.empty_cache()
