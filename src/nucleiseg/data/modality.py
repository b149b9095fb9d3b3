"""Imaging modality of a nucleus image, read off the pixels.

The DSB 2018 images come from three kinds of microscopy, which look nothing
alike and which a model must all learn:

- ``fluorescence``: stained nuclei glow on a dark background (most images);
- ``brightfield``: grey images with dark nuclei on a light background;
- ``tissue``: colour (H&E-like) stained tissue on a light background.

Two numbers separate them on the 664 training and 65 stage-1 test images with
wide margins: the median grey level (fluorescence at most 52, the others at
least 131) and the mean difference between colour channels (0 for every grey
image, at least 15.5 for every colour one). The thresholds sit in those gaps.
"""

from __future__ import annotations

from typing import NamedTuple

import numpy as np

FLUORESCENCE = "fluorescence"
BRIGHTFIELD = "brightfield"
TISSUE = "tissue"
MODALITIES = (FLUORESCENCE, BRIGHTFIELD, TISSUE)

DARK_MEDIAN = 90.0
COLOUR_CHROMA = 4.0


class ModalityFeatures(NamedTuple):
    """The two numbers the modality is decided on."""

    median_grey: float
    chroma: float


def modality_features(image: np.ndarray) -> ModalityFeatures:
    """Median grey level and mean absolute difference between neighbouring channels.

    Args:
        image: RGB uint8 image, shape (H, W, 3).

    Returns:
        The features, both on the 0..255 scale.
    """
    if image.ndim != 3 or image.shape[2] != 3:
        raise ValueError(f"expected an RGB image of shape (H, W, 3), got {image.shape}")
    rgb = image.astype(np.float32)
    chroma = np.abs(rgb[..., 0] - rgb[..., 1]).mean() + np.abs(rgb[..., 1] - rgb[..., 2]).mean()
    return ModalityFeatures(float(np.median(rgb.mean(axis=2))), float(chroma))


def classify_modality(image: np.ndarray) -> str:
    """Classify an image as ``fluorescence``, ``brightfield`` or ``tissue``.

    A dark background means fluorescence whatever the colour (a few
    fluorescence images are stored in false colour); on a light background,
    colour means stained tissue and grey means brightfield.

    Args:
        image: RGB uint8 image, shape (H, W, 3).

    Returns:
        One of :data:`MODALITIES`.
    """
    features = modality_features(image)
    if features.median_grey < DARK_MEDIAN:
        return FLUORESCENCE
    return TISSUE if features.chroma > COLOUR_CHROMA else BRIGHTFIELD
