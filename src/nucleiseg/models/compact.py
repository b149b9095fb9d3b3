"""Compact weight files: float16, or int8 per output channel for the reference bundle.

A finished fold keeps its weights in float16 (half the size of float32, and
every OOF prediction is made with them). When weights must take less room
still (the reference ensemble under ``weights/`` has a size budget), every
floating-point tensor of two or more dimensions (convolution and linear
weights, nearly all the parameters) is stored as int8 with one float32 scale
per output channel, ``w ~= q * scale`` with ``scale = max|w| / 127`` over
the channel; the rest (biases, batch-norm parameters and statistics) stays
float16. The rounding error of a weight is at most half its channel's scale.
"""

from __future__ import annotations

import torch

PRECISIONS = ("float16", "int8")
INT8_FORMAT = "nucleiseg-int8-per-channel-v1"
_FORMAT_KEY = "format"


def compact_state(state: dict[str, torch.Tensor], precision: str = "float16") -> dict:
    """A state dict in the stored form of ``precision`` (see the module docstring).

    Raises:
        ValueError: For a precision not in :data:`PRECISIONS`.
    """
    if precision not in PRECISIONS:
        raise ValueError(f"unknown precision {precision!r}; choose from {', '.join(PRECISIONS)}")
    half = {k: v.half() if v.is_floating_point() else v for k, v in state.items()}
    if precision == "float16":
        return half
    scales = {}
    for name, value in state.items():
        if value.is_floating_point() and value.ndim >= 2:
            weights = value.float()
            scales[name] = weights.abs().flatten(1).amax(dim=1).clamp_min(1e-12) / 127
            steps = torch.round(weights / _per_channel(scales[name], weights.ndim))
            half[name] = steps.clamp(-127, 127).to(torch.int8)
    return {_FORMAT_KEY: INT8_FORMAT, "tensors": half, "scales": scales}


def expand_state(stored: dict) -> dict[str, torch.Tensor]:
    """The state dict of a stored one: int8 tensors scaled back to float32, others as stored."""
    if stored.get(_FORMAT_KEY) != INT8_FORMAT:
        return stored
    state = {}
    for name, value in stored["tensors"].items():
        scale = stored["scales"].get(name)
        if scale is None:
            state[name] = value
        else:
            state[name] = value.float() * _per_channel(scale, value.ndim)
    return state


def _per_channel(scale: torch.Tensor, ndim: int) -> torch.Tensor:
    """One scale per output channel, shaped to broadcast over a weight of ``ndim`` dimensions."""
    return scale.view((-1,) + (1,) * (ndim - 1))
