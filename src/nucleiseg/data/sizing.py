"""Nucleus size of a label image or pixel size of an image file, and the rescaling that
brings either to the training set's.

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

An image whose pixel size is known (given, or recorded by an OME-TIFF or an
ImageJ TIFF: :func:`read_pixel_size`) can be brought to
:data:`TRAIN_PIXEL_SIZE` instead, by the factor :func:`pixel_size_scale`,
without a first pass. DSB 2018 records no pixel size; 0.25 micron is assumed
because the shipped bundle also trained on MoNuSeg at its own 0.25 micron (40x
H&E), whose nuclei, a median 22 px across per image, lie within the size
tolerance (1.25) of the DSB median of 18 px.
"""

from __future__ import annotations

import math
from pathlib import Path

import cv2
import numpy as np
import tifffile

from nucleiseg.data.reading import DataError

TRAIN_MEDIAN_DIAMETER = 18.0
# Microns per pixel the models are taken to have trained at (see the module docstring).
TRAIN_PIXEL_SIZE = 0.25
# Microns per unit of the pixel-size units OME-XML and ImageJ write.
MICRONS_PER_UNIT = {
    "µm": 1.0,
    "μm": 1.0,
    "\\u00B5m": 1.0,  # as ImageJ writes it
    "um": 1.0,
    "micron": 1.0,
    "microns": 1.0,
    "nm": 1e-3,
    "Å": 1e-4,
    "mm": 1e3,
    "cm": 1e4,
    "m": 1e6,
}
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


def pixel_size_scale(pixel_size: float) -> float:
    """Factor that brings an image of this pixel size (microns) to :data:`TRAIN_PIXEL_SIZE`.

    Raises:
        ValueError: If ``pixel_size`` is not a positive number.
    """
    if isinstance(pixel_size, bool) or not isinstance(pixel_size, (int, float)):
        raise ValueError(f"pixel size must be a number of microns, got {pixel_size!r}")
    if not (math.isfinite(pixel_size) and pixel_size > 0):
        raise ValueError(f"pixel size must be a positive number of microns, got {pixel_size}")
    return float(pixel_size) / TRAIN_PIXEL_SIZE


def read_pixel_size(path: str | Path) -> float | None:
    """The pixel width an OME-TIFF or an ImageJ (Fiji) TIFF records, in microns.

    OME-TIFF: ``PhysicalSizeX`` of the first image's ``Pixels`` (in
    ``PhysicalSizeXUnit``, microns by default); ImageJ TIFF: the inverse of the
    ``XResolution`` tag, in the ``unit`` of its description.

    Args:
        path: An image file.

    Returns:
        Microns per pixel, or None for a file that records none (a PNG, a plain
        TIFF, an ImageJ TIFF calibrated in pixels).

    Raises:
        DataError: If the TIFF's metadata cannot be read or names a unit of
            length not in :data:`MICRONS_PER_UNIT`.
    """
    path = Path(path)
    try:
        with tifffile.TiffFile(path) as tiff:
            if tiff.is_ome:
                image = tifffile.xml2dict(tiff.ome_metadata)["OME"]["Image"]
                pixels = (image[0] if isinstance(image, list) else image)["Pixels"]
                size, unit = pixels.get("PhysicalSizeX"), pixels.get("PhysicalSizeXUnit", "µm")
            elif tiff.is_imagej and "XResolution" in tiff.pages.first.tags:
                numerator, denominator = tiff.pages.first.tags["XResolution"].value
                size = denominator / numerator if numerator else None
                unit = (tiff.imagej_metadata or {}).get("unit", "pixel")
            else:
                return None
    except tifffile.TiffFileError:
        return None  # not a TIFF
    except (OSError, KeyError, TypeError, ValueError) as error:
        raise DataError(f"{path}: unreadable pixel size in its TIFF metadata ({error})") from error
    if size is None or unit in ("pixel", "pixels"):
        return None
    if unit not in MICRONS_PER_UNIT:
        raise DataError(f"{path}: pixel size in an unknown unit {unit!r}")
    microns = float(size) * MICRONS_PER_UNIT[unit]
    return microns if math.isfinite(microns) and microns > 0 else None
