"""Ground truth in the competition's forms: a labelled folder, or a CSV of RLE masks."""

from __future__ import annotations

import warnings
from collections.abc import Mapping
from pathlib import Path

import numpy as np
import pandas as pd

from nucleiseg.competition import rle
from nucleiseg.data.reading import DataError, OverlapWarning, find_images, image_size, labels_of


def read_labels_csv(
    path: str | Path, sizes: Mapping[str, tuple[int, int]] | None = None
) -> dict[str, np.ndarray]:
    """Label images from a competition CSV of run-length encoded masks.

    Understands ``stage1_train_labels.csv`` (ImageId, EncodedPixels; the image
    sizes must then be given) and ``stage1_solution.csv`` (with Height and
    Width; rows whose Usage is ``Ignored`` are skipped, other extra columns are
    ignored). A row with empty EncodedPixels stands for an image without
    nuclei. Overlapping masks are resolved as in :func:`read_labels`.

    Args:
        path: The CSV file.
        sizes: Image id -> (H, W); needed when the CSV has no Height/Width.

    Returns:
        Image id -> int32 label image, sorted by id.
    """
    path = Path(path)
    try:
        frame = pd.read_csv(path, dtype=str, keep_default_na=False)
    except (OSError, pd.errors.ParserError, UnicodeDecodeError) as error:
        raise DataError(f"{path}: unreadable CSV ({error})") from error
    missing = {"ImageId", "EncodedPixels"} - set(frame.columns)
    if missing:
        raise DataError(f"{path}: missing column(s) {', '.join(sorted(missing))}")
    if "Usage" in frame.columns:
        frame = frame[frame["Usage"] != "Ignored"]
    has_sizes = {"Height", "Width"} <= set(frame.columns)
    if not has_sizes and sizes is None:
        raise DataError(f"{path}: no Height/Width columns; the image sizes must be given")
    labels_by_image: dict[str, np.ndarray] = {}
    for image_id, rows in frame.groupby("ImageId", sort=True):
        if has_sizes:
            shape = (int(rows["Height"].iloc[0]), int(rows["Width"].iloc[0]))
        elif image_id in sizes:
            shape = tuple(sizes[image_id])
        else:
            raise DataError(f"{path}: no image size known for {image_id}")
        encoded = [e for e in rows["EncodedPixels"] if e.strip()]
        try:
            decoded = rle.decode_labels(encoded, shape)
        except rle.RLEError as error:
            raise DataError(f"{path}: image {image_id}: {error}") from error
        if decoded.overlap_pixels:
            warnings.warn(
                f"{path}: image {image_id}: {decoded.overlap_pixels} pixels claimed by more than "
                "one mask went to the first in row order",
                OverlapWarning,
                stacklevel=2,
            )
        labels_by_image[image_id] = decoded.labels
    return labels_by_image


def load_truth(path: str | Path, images: str | Path | None = None) -> dict[str, np.ndarray]:
    """Ground-truth label images from a labelled folder or a competition CSV.

    Args:
        path: A labelled folder (competition layout with masks, or
            ``images/`` + ``labels/``), or a CSV (see :func:`read_labels_csv`).
        images: Image folder giving the sizes, for a CSV without Height/Width.

    Returns:
        Image id -> int32 label image, sorted by id.
    """
    path = Path(path)
    if path.is_dir():
        return {image_id: labels_of(p) for image_id, p in find_images(path).items()}
    if not path.is_file():
        raise DataError(f"{path}: no such truth folder or CSV")
    sizes = None
    if images is not None:
        sizes = {image_id: image_size(p) for image_id, p in find_images(images).items()}
    return read_labels_csv(path, sizes)
