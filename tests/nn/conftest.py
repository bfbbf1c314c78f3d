"""Model-level tests run the CPU path users get without a GPU: the pure-torch references of
ditq.formats (the Triton kernels themselves are checked against those references in tests/kernels, and
through the CPU interpreter they would take minutes at model sizes). On a GPU the kernels run."""

import pytest
import torch


@pytest.fixture(autouse=True)
def reference_kernels_on_cpu(monkeypatch):
    from ditq.kernels import ops

    if hasattr(ops, "triton_runs_on"):
        monkeypatch.setattr(ops, "triton_runs_on", lambda t: bool(t.is_cuda))
    yield


@pytest.fixture(autouse=True)
def one_thread():
    # the CI machine's few cores are shared; one intra-op thread avoids oversubscription at these tiny sizes
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)
