"""The network input's intensity scale: fixed, or stretched between two percentiles per image.

The default keeps the image as it is: :func:`nucleiseg.data.dataset.to_tensor`
divides by 255, so a dim fluorescence image (nuclei at 20-40 of 255, as in
the DAPI tissue sections of BitDepth) reaches the network dim. Percentile
normalization maps each image's ``low``-th percentile to 0 and its
``high``-th to 255 (over all three channels together, so colours keep their
hue), clipping beyond; CSBDeep/StarDist (1st to 99.8th) and Cellpose (1st
to 99th) normalize every input this way. It is computed on the whole image
before cropping or tiling, so that every crop and tile of one image shares
one scale, and applied by the model family in training, validation and
inference alike: a run's ``input_norm`` setting travels with its
``config.yaml`` into every bundle that holds it.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

FIXED = "fixed"
PERCENTILE = "percentile"
MODES = (FIXED, PERCENTILE)


@dataclass(frozen=True)
class InputNorm:
    """How an image's intensities are scaled before it becomes a network input.

    Attributes:
        mode: ``fixed`` (the image as it is, /255 in the tensor) or
            ``percentile`` (each image stretched between two of its percentiles).
        low: Percentile mapped to 0 in ``percentile`` mode.
        high: Percentile mapped to 255 in ``percentile`` mode.
    """

    mode: str = FIXED
    low: float = 1.0
    high: float = 99.8

    def __post_init__(self) -> None:
        if self.mode not in MODES:
            raise ValueError(f"input_norm.mode must be one of {MODES}, got {self.mode!r}")
        if not 0.0 <= self.low < self.high <= 100.0:
            raise ValueError(
                f"input_norm needs 0 <= low < high <= 100, got low {self.low}, high {self.high}"
            )


def normalize_input(image: np.ndarray, norm: InputNorm) -> np.ndarray:
    """``image`` on the intensity scale ``norm`` asks for, still RGB uint8.

    In ``percentile`` mode the ``low`` and ``high`` percentiles of all pixels
    of all channels map to 0 and 255; values beyond are clipped. An image
    whose two percentiles are less than one grey level apart (a blank image)
    is returned unchanged rather than stretched from noise.

    Args:
        image: RGB uint8 image, shape (H, W, 3).
        norm: The scaling.

    Returns:
        A uint8 image of the same shape (``image`` itself in ``fixed`` mode).
    """
    if norm.mode == FIXED:
        return image
    lo, hi = np.percentile(image, (norm.low, norm.high))
    if hi - lo < 1.0:
        return image
    lut = np.clip((np.arange(256, dtype=np.float64) - lo) * (255.0 / (hi - lo)), 0.0, 255.0)
    return np.rint(lut).astype(np.uint8)[image]
