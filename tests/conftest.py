"""Test set-up. Without a GPU, Triton kernels run through Triton's CPU interpreter: the variable must be set
before anything imports triton, which is why it is set here, at the top of the first file pytest loads."""

import os

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402

HAS_GPU = torch.cuda.is_available()


def pytest_collection_modifyitems(config, items):
    skip = pytest.mark.skip(reason="needs a CUDA GPU")
    for item in items:
        if "gpu" in item.keywords and not HAS_GPU:
            item.add_marker(skip)


@pytest.fixture
def device():
    """The device kernels run on: CUDA when present, else CPU (through the Triton interpreter)."""
    return torch.device("cuda" if HAS_GPU else "cpu")


@pytest.fixture
def one_thread():
    """One intra-op thread: the CI machine's few cores are shared, and at tiny model sizes more threads only
    oversubscribe them."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)
