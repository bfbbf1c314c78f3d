"""Model-level tests run the CPU path users get without a GPU: the pure-torch references of
ditq.formats (the Triton kernels themselves are checked against those references in tests/kernels, and
through the CPU interpreter they would take minutes at model sizes). On a GPU the kernels run."""

import pytest


@pytest.fixture(autouse=True)
def reference_kernels_on_cpu(monkeypatch):
    from ditq.kernels import ops

    if hasattr(ops, "triton_runs_on"):
        monkeypatch.setattr(ops, "triton_runs_on", lambda t: bool(t.is_cuda))
    yield


@pytest.fixture(autouse=True)
def _one_thread(one_thread):
    yield
