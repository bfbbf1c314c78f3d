"""How ditq calls a user's model on one user-given input and reads its output, shared by calibration
(convert) and autoquant (nn), which may not import each other."""

from __future__ import annotations

import torch

from .errors import DitqError


class ModelOutputError(DitqError, ValueError):
    """The model's output is not a tensor ditq can compare."""


def call_model(model, inp):
    """``model(**inp)`` for a dict, ``model(*inp)`` for a tuple or list, else ``model(inp)``."""
    if isinstance(inp, dict):
        return model(**inp)
    if isinstance(inp, (tuple, list)):
        return model(*inp)
    return model(inp)


def output_tensor(out) -> torch.Tensor:
    """The tensor of a model's output: itself, the first element of a tuple or list, or ``.sample``
    (diffusers' Transformer2DModelOutput)."""
    if isinstance(out, torch.Tensor):
        return out
    if isinstance(out, (tuple, list)) and out and isinstance(out[0], torch.Tensor):
        return out[0]
    sample = getattr(out, "sample", None)
    if isinstance(sample, torch.Tensor):
        return sample
    raise ModelOutputError(
        f"the model returned {type(out).__name__}; pass a forward function returning the output tensor "
        f"(forward_fn=lambda model, inp: ... / --forward module:function)"
    )
