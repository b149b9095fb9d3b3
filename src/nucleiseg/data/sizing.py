"""Nucleus size of a label image, and the rescaling that brings it to the training set's.

Size-adaptive inference (``InferenceOptions.size_adaptive``) segments an image
once, measures the median equivalent diameter of the nuclei found, and, when
it lies outside a band around the training set's median, predicts again with
every test-time scale multiplied by ``target / diameter``; the outputs are
mapped back to the image's own pixels as for any scaled view (see
:func:`nucleiseg.inference.tta.resize_maps`), so the label image keeps the image's size.

:data:`TRAIN_MEDIAN_DIAMETER` is the median over the 664 stage-1 training
images of each image's median equivalent diameter (18.05 px; 16.6 on
fluorescence, 17.2 on brightfield, 21.3 on tissue), as printed by
``python scripts/nucleus_sizes.py ../shared/data/dsb2018/stage1_train``.
"""

from __future__ import annotations

import math

import cv2
import numpy as np

TRAIN_MEDIAN_DIAMETER = 18.0
# Fewer nuclei than this in the first pass say too little about the size.
MIN_NUCLEI = 5
# Rescaling never goes beyond these factors: past them the first pass is
# more likely wrong than the nuclei that large or small.
MIN_FACTOR, MAX_FACTOR = 0.25, 4.0


def equivalent_diameters(labels: np.ndarray) -> np.ndarray:
    """Diameter of the disc of equal area, one per nucleus of a label image.

    Args:
        labels: Integer label image, 0 = background.

    Returns:
        float64 diameters in pixels, in label order (empty when no nucleus).
    """
    labels = np.asarray(labels)
    if labels.ndim != 2 or labels.dtype.kind not in "iu":
        raise ValueError(f"expected a 2-D integer label image, got {labels.dtype} {labels.shape}")
    areas = np.bincount(labels.ravel().astype(np.int64))[1:]
    areas = areas[areas > 0]
    return np.sqrt(4.0 * areas / math.pi)


def median_diameter(labels: np.ndarray) -> float:
    """Median equivalent diameter of the nuclei of a label image (NaN when there are none)."""
    diameters = equivalent_diameters(labels)
    return float(np.median(diameters)) if diameters.size else math.nan


def rescale_factor(labels: np.ndarray, target: float, tolerance: float) -> float:
    """Factor that brings the nuclei of a first-pass label image to the target size.

    Args:
        labels: First-pass label image.
        target: Median equivalent diameter to match, in pixels.
        tolerance: No rescaling while the median diameter lies within
            ``[target / tolerance, target * tolerance]`` (1 rescales always).

    Returns:
        ``target / median diameter``, limited to [0.25, 4]; 1 when the
        diameter is within the band or fewer than 5 nuclei were found.
    """
    if target <= 0 or tolerance < 1:
        raise ValueError(f"need target > 0 and tolerance >= 1, got {target}, {tolerance}")
    diameters = equivalent_diameters(labels)
    if diameters.size < MIN_NUCLEI:
        return 1.0
    diameter = float(np.median(diameters))
    if target / tolerance <= diameter <= target * tolerance:
        return 1.0
    return float(np.clip(target / diameter, MIN_FACTOR, MAX_FACTOR))


def resize_image(image: np.ndarray, scale: float) -> np.ndarray:
    """An (H, W, C) image resized by ``scale`` (bilinear), sides rounded to whole pixels."""
    if scale == 1.0:
        return image
    height, width = image.shape[:2]
    size = (max(1, round(width * scale)), max(1, round(height * scale)))
    return cv2.resize(image, size, interpolation=cv2.INTER_LINEAR)
