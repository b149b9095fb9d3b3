"""Timing helpers shared by the benchmarks."""

from __future__ import annotations

import time

import torch
from torch import nn

from nucleiseg.inference.family import get_family
from nucleiseg.models.config import TrainConfig


def train_step_seconds(
    model: nn.Module, images: torch.Tensor, targets, config: TrainConfig, steps: int, lr: float
) -> float:
    """Fastest of ``steps`` training steps (forward with the family's loss, backward, AdamW).

    One extra step runs first and is not counted: it warms up allocators and kernels.
    """
    family = get_family(config.model)
    optimizer = torch.optim.AdamW(model.parameters(), lr=lr)
    model.train()
    times = []
    for _ in range(steps + 1):
        started = time.perf_counter()
        loss = family.training_loss(model, images, targets, config)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        times.append(time.perf_counter() - started)
    return min(times[1:])
