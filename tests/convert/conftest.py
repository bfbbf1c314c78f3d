"""Converter tests quantize many small layers. Under TRITON_INTERPRET each kernel launch costs ~0.5 s on
the CPU, so these tests run ditq's pure-torch reference (the same math, which the kernel tests compare the
kernels against); ``interpreted_kernels`` switches one end-to-end test back to the Triton kernels."""

import pytest

from ditq import kernels


@pytest.fixture(autouse=True)
def reference_kernels(monkeypatch):
    monkeypatch.setattr(kernels, "INTERPRET", False)


@pytest.fixture
def interpreted_kernels(monkeypatch):
    import os

    monkeypatch.setattr(kernels, "INTERPRET", os.environ.get("TRITON_INTERPRET") == "1")
