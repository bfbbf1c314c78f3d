"""Shared helpers of the kernel tests: fresh seeds and poisoned output buffers."""

import secrets

import pytest
import torch

from ditq.kernels import quant


def poison_fill(t: torch.Tensor) -> torch.Tensor:
    """Fill with values no kernel legitimately writes: NaN for floats (0x7F is NaN in e4m3fn), -128 for int8
    (the kernels clamp to [-127, 127])."""
    if t.dtype == torch.int8:
        return t.fill_(-128)
    if t.dtype == torch.float8_e4m3fn:
        return t.view(torch.uint8).fill_(0x7F).view(t.dtype)
    return t.fill_(float("nan"))


@pytest.fixture
def poisoned(monkeypatch):
    """Make every kernel output start as poison, so an element the kernel forgot to write fails the test."""

    def empty(shape, dtype, device):
        return poison_fill(torch.empty(shape, dtype=dtype, device=device))

    monkeypatch.setattr(quant, "empty", empty)


@pytest.fixture
def seed():
    """A fresh seed per test run (printed on failure through the test's assertion messages)."""
    s = secrets.randbits(31)
    torch.manual_seed(s)
    return s
