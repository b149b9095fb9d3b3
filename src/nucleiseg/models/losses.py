"""Losses, looked up by name from the configuration.

A target pixel equal to :data:`nucleiseg.data.targets.IGNORE` (an unknown pixel
of a pseudo-label) is left out: it adds nothing to the loss, and its logit
gets a gradient of exactly zero. Where no pixel is ignored, the losses are
computed as they always were, to the bit.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F

from nucleiseg.data.targets import IGNORE


def _counted(targets: torch.Tensor) -> torch.Tensor | None:
    """1 where a target pixel counts, 0 where it is ignored; None when every pixel counts."""
    ignored = targets == IGNORE
    if not ignored.any():
        return None
    return (~ignored).float()


def _bce(logits: torch.Tensor, targets: torch.Tensor, counted: torch.Tensor | None):
    if counted is None:
        return F.binary_cross_entropy_with_logits(logits, targets)
    # Ignored targets become 0 before the loss, then their terms are multiplied by 0:
    # no IGNORE value reaches the arithmetic, so nothing of it can leak (not even a NaN).
    per_pixel = F.binary_cross_entropy_with_logits(
        logits, targets * counted, weight=counted, reduction="sum"
    )
    return per_pixel / counted.sum().clamp(min=1.0)


def bce_dice_loss(logits: torch.Tensor, targets: torch.Tensor, eps: float = 1.0) -> torch.Tensor:
    """Per-channel sigmoid binary cross-entropy plus soft Dice, averaged over channels.

    Each channel is its own binary problem (body, border and separation
    overlap, so a softmax over them would be wrong). BCE gives every pixel a
    gradient; Dice counters the imbalance of the thin border and separation
    maps, whose pixels are rare. Dice is computed over the whole batch per
    channel, so crops without nuclei do not produce a degenerate 0/0.
    Ignored pixels (targets equal to ``IGNORE``) are left out of both: BCE is
    the mean over the pixels that count, and Dice sums over them alone.

    Args:
        logits: (N, C, H, W) raw outputs.
        targets: (N, C, H, W) binary targets, ``IGNORE`` where unknown.
        eps: Smoothing of the Dice ratio.

    Returns:
        Scalar loss.
    """
    logits = logits.float()
    targets = targets.float()
    counted = _counted(targets)
    bce = _bce(logits, targets, counted)
    probabilities = torch.sigmoid(logits)
    if counted is not None:
        probabilities = probabilities * counted
        targets = targets * counted
    dims = (0, 2, 3)
    intersection = (probabilities * targets).sum(dims)
    total = probabilities.sum(dims) + targets.sum(dims)
    dice = 1.0 - (2.0 * intersection + eps) / (total + eps)
    return bce + dice.mean()


def bce_loss(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Per-channel sigmoid binary cross-entropy alone (the Dice ablation); ignored pixels
    left out as in :func:`bce_dice_loss`."""
    targets = targets.float()
    return _bce(logits.float(), targets, _counted(targets))


LOSSES: dict[str, Callable[[torch.Tensor, torch.Tensor], torch.Tensor]] = {
    "bce_dice": bce_dice_loss,
    "bce": bce_loss,
}


def get_loss(name: str) -> Callable[[torch.Tensor, torch.Tensor], torch.Tensor]:
    """The loss function called ``name``."""
    if name not in LOSSES:
        raise KeyError(f"unknown loss {name!r}; choose from {', '.join(LOSSES)}")
    return LOSSES[name]
