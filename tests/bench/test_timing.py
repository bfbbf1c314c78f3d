"""bench.timing.captured, the CUDA-graph capture the GPU benchmarks share, checked on the CPU with a stand-in for
torch.cuda: warm-up calls on a side stream, one captured call, the graph yielded, its memory released on exit
(also when the timing inside fails)."""

import contextlib

import pytest
import torch

from ditq.bench import timing


class _Graph:
    def __init__(self, log):
        self.log = log

    def replay(self):
        self.log.append("replay")

    def reset(self):
        self.log.append("reset")


@pytest.fixture
def fake_cuda(monkeypatch):
    log = []

    class Stream:
        def wait_stream(self, other):
            log.append("wait")

    @contextlib.contextmanager
    def stream(s):
        log.append("side")
        yield
        log.append("main")

    @contextlib.contextmanager
    def graph(g):
        log.append("capture")
        yield
        log.append("captured")

    for name, value in dict(Stream=Stream, stream=stream, current_stream=lambda: Stream(), graph=graph,
                            CUDAGraph=lambda: _Graph(log), empty_cache=lambda: log.append("empty_cache")).items():
        monkeypatch.setattr(torch.cuda, name, value)
    return log


@pytest.mark.parametrize("warmup", [1, 2])
def test_captured_order_and_release(fake_cuda, warmup):
    log = fake_cuda
    with timing.captured(lambda: log.append("fn"), warmup=warmup) as g:
        g.replay()
    assert log == ["wait", "side", *["fn"] * warmup, "main", "wait", "capture", "fn", "captured", "replay", "reset",
                   "empty_cache"]


def test_captured_releases_on_error(fake_cuda):
    with pytest.raises(RuntimeError, match="timing failed"):
        with timing.captured(lambda: None) as g:
            raise RuntimeError("timing failed")
    assert fake_cuda[-2:] == ["reset", "empty_cache"] and isinstance(g, _Graph)
