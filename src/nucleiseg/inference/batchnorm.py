"""Test-time normalization statistics: BatchNorm re-estimated on the images to predict.

A model's BatchNorm layers normalize with the mean and variance they saw in
training. On images of another microscope or stain the features move, and the
layers normalize them with statistics that no longer fit. Re-estimating the
statistics over the target images (no labels, no training: the weights stay)
is the cheapest adaptation there is (AdaBN, Li et al. 2016).

:func:`adapt_batchnorm` replaces every BatchNorm layer's running statistics by
the mean and variance of its inputs over all pixels of all forward passes of the
target images, each image prepared as the family predicts it (intensity scale,
and Mask R-CNN's input scale) and cut into tiles of at most ``tile`` pixels a
side. The variance is that of the whole population, between images as well as
within them (as PreciseBN, Wu and Johnson 2021, estimates it): averaging each
pass's own variance, as BatchNorm's cumulative average would, leaves out how
the images differ from one another, and with one image a pass it shrinks the
variances enough to wreck a model (the DSB fold-0 model fell from 0.611 to
0.193 mean AP on its own validation images that way).
Both families have BatchNorm: U-Net++ in its encoder and decoder, Mask R-CNN
in its ResNet backbone.
"""

from __future__ import annotations

from collections.abc import Iterable

import numpy as np
import torch
from torch import nn
from tqdm import tqdm

from nucleiseg.data.dataset import to_tensor
from nucleiseg.data.reading import Sample
from nucleiseg.data.sources import tile_sample
from nucleiseg.inference.family import get_family
from nucleiseg.inference.tiling import pad_to_stride
from nucleiseg.models.config import TrainConfig
from nucleiseg.models.precision import autocast

# Tiles of at most this side: the statistics of a whole large image at once would
# take a whole-image pass's memory, and the layers see training-sized inputs.
BN_TILE = 512


def batchnorm_layers(model: nn.Module) -> list[nn.modules.batchnorm._BatchNorm]:
    """The model's BatchNorm layers that keep running statistics."""
    return [
        module
        for module in model.modules()
        if isinstance(module, nn.modules.batchnorm._BatchNorm) and module.track_running_stats
    ]


class _Moments:
    """Per-channel sums of a BatchNorm layer's inputs over every pixel it is given."""

    def __init__(self) -> None:
        self.count = 0
        self.sum: torch.Tensor | None = None
        self.squares: torch.Tensor | None = None

    def add(self, layer: nn.Module, inputs: tuple[torch.Tensor, ...]) -> None:
        x = inputs[0].detach().double().transpose(0, 1).flatten(1)  # (C, pixels)
        total, squares = x.sum(1), (x * x).sum(1)
        self.sum = total if self.sum is None else self.sum + total
        self.squares = squares if self.squares is None else self.squares + squares
        self.count += x.shape[1]

    def result(self) -> tuple[torch.Tensor, torch.Tensor]:
        """Mean and unbiased variance over all pixels seen."""
        mean = self.sum / self.count
        var = (self.squares / self.count - mean * mean).clamp(min=0.0)
        var = var * self.count / max(self.count - 1, 1)
        return mean.float(), var.float()


@torch.no_grad()
def adapt_batchnorm(
    model: nn.Module,
    images: Iterable[np.ndarray],
    config: TrainConfig,
    device: torch.device,
    tile: int = BN_TILE,
    total: int | None = None,
) -> int:
    """Re-estimate the model's BatchNorm statistics over target images; the weights stay.

    Args:
        model: A model of ``config``'s family, on ``device``; left in eval mode.
        images: RGB uint8 images (H, W, 3), as they would be predicted.
        config: The model's configuration (its family, intensity scale, input scale).
        device: Where the model runs.
        tile: Largest side of one forward pass's input.
        total: Number of images, for the progress bar.

    Returns:
        The number of forward passes the statistics average over (0 when the
        model has no BatchNorm layer; its statistics are then left alone).

    Raises:
        ValueError: If ``images`` is empty (the statistics would be lost).
    """
    layers = batchnorm_layers(model)
    if not layers:
        return 0
    family = get_family(config.model)
    saved = {layer: (layer.running_mean.clone(), layer.running_var.clone()) for layer in layers}
    moments = {layer: _Moments() for layer in layers}
    hooks = [layer.register_forward_pre_hook(moments[layer].add) for layer in layers]
    model.eval()
    for layer in layers:
        layer.train()  # normalize with each pass's own statistics, as in training
    passes = 0
    try:
        for image in tqdm(images, total=total, desc="batchnorm statistics", unit="image"):
            prepared = family.prepare(Sample("target", image, None), config)
            for part in tile_sample(prepared, tile):
                batch = to_tensor(pad_to_stride(part.image))[None].to(device)
                with autocast(device, config.amp):
                    # Detection models take a list of images; U-Net++ a batch.
                    model(list(batch) if config.model == "maskrcnn" else batch)
                passes += 1
        if passes == 0:
            raise ValueError("no image to estimate the BatchNorm statistics on")
    except BaseException:
        # Training-mode passes moved the running statistics: put the old ones back.
        for layer, (mean, var) in saved.items():
            layer.running_mean.copy_(mean)
            layer.running_var.copy_(var)
        raise
    finally:
        for hook in hooks:
            hook.remove()
        model.eval()
    for layer, moment in moments.items():
        mean, var = moment.result()
        layer.running_mean.copy_(mean)
        layer.running_var.copy_(var)
    return passes
