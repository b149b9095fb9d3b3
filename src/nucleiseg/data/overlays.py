"""Pictures for a person to check a segmentation: nucleus outlines drawn over the image."""

from __future__ import annotations

from pathlib import Path

import numpy as np
from skimage.segmentation import find_boundaries

from nucleiseg.atomic import write_png

OUTLINE_RGB = (255, 255, 0)


def draw_outlines(image: np.ndarray, labels: np.ndarray, color=OUTLINE_RGB) -> np.ndarray:
    """The RGB image with the inner outline of every nucleus in ``color``.

    Args:
        image: RGB uint8 (H, W, 3).
        labels: int label image (H, W), 0 = background.
        color: RGB of the outlines.

    Returns:
        A new RGB uint8 image; touching nuclei keep separate outlines.
    """
    if image.shape[:2] != labels.shape:
        raise ValueError(f"image {image.shape[:2]} and labels {labels.shape} differ in size")
    out = image.copy()
    out[find_boundaries(labels, mode="inner")] = color
    return out


def write_overlay(path: Path, image: np.ndarray, labels: np.ndarray) -> None:
    """Write :func:`draw_outlines` as a PNG, atomically.

    Raises:
        nucleiseg.atomic.WriteError: If the file cannot be written, naming it.
    """
    write_png(path, np.ascontiguousarray(draw_outlines(image, labels)[..., ::-1]))
