"""Converter tests quantize many small layers: they run ditq's pure-torch reference instead of the Triton
interpreter (see ``reference_kernels``); ``interpreted_kernels`` switches one end-to-end test back."""

import os

import pytest

from checkpoint.fixtures_ckpt import reference_kernels  # noqa: F401 (fixture)
from ditq import kernels


@pytest.fixture(autouse=True)
def _reference(reference_kernels):  # noqa: F811
    pass


@pytest.fixture
def interpreted_kernels(monkeypatch):
    monkeypatch.setattr(kernels, "INTERPRET", os.environ.get("TRITON_INTERPRET") == "1")
