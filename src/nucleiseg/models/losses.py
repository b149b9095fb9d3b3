"""Losses, looked up by name from the configuration."""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F


def bce_dice_loss(logits: torch.Tensor, targets: torch.Tensor, eps: float = 1.0) -> torch.Tensor:
    """Per-channel sigmoid binary cross-entropy plus soft Dice, averaged over channels.

    Each channel is its own binary problem (body, border and separation
    overlap, so a softmax over them would be wrong). BCE gives every pixel a
    gradient; Dice counters the imbalance of the thin border and separation
    maps, whose pixels are rare. Dice is computed over the whole batch per
    channel, so crops without nuclei do not produce a degenerate 0/0.

    Args:
        logits: (N, C, H, W) raw outputs.
        targets: (N, C, H, W) binary targets.
        eps: Smoothing of the Dice ratio.

    Returns:
        Scalar loss.
    """
    logits = logits.float()
    targets = targets.float()
    bce = F.binary_cross_entropy_with_logits(logits, targets)
    probabilities = torch.sigmoid(logits)
    dims = (0, 2, 3)
    intersection = (probabilities * targets).sum(dims)
    total = probabilities.sum(dims) + targets.sum(dims)
    dice = 1.0 - (2.0 * intersection + eps) / (total + eps)
    return bce + dice.mean()


def bce_loss(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Per-channel sigmoid binary cross-entropy alone (the Dice ablation)."""
    return F.binary_cross_entropy_with_logits(logits.float(), targets.float())


LOSSES: dict[str, Callable[[torch.Tensor, torch.Tensor], torch.Tensor]] = {
    "bce_dice": bce_dice_loss,
    "bce": bce_loss,
}


def get_loss(name: str) -> Callable[[torch.Tensor, torch.Tensor], torch.Tensor]:
    """The loss function called ``name``."""
    if name not in LOSSES:
        raise KeyError(f"unknown loss {name!r}; choose from {', '.join(LOSSES)}")
    return LOSSES[name]
