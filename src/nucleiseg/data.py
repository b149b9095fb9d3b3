"""Reading DSB 2018 images and their instance labels.

Two layouts are understood:

- the competition's: ``<root>/<id>/images/<id>.png`` with one binary PNG per
  nucleus in ``<root>/<id>/masks/``;
- a plain folder of PNG or TIFF files, for a user's own images (no labels).

Labels can also come from the competition's CSV forms (``stage1_train_labels.csv``:
ImageId, EncodedPixels; ``stage1_solution.csv``: the same plus Height, Width, Usage).

Every image comes out as RGB uint8 of shape (H, W, 3) and every label image as
int32 with 0 for background. Bad input raises :class:`DataError` naming the
file and what is wrong with it.
"""

from __future__ import annotations

import struct
import warnings
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

import cv2
import numpy as np
import pandas as pd

from nucleiseg import rle

IMAGE_SUFFIXES = (".png", ".tif", ".tiff")
TRAIN_STAGE = "stage1_train"
TEST_STAGE = "stage1_test"
SAMPLE_DIR = Path("data/sample")

_PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


class DataError(ValueError):
    """An input file or folder that cannot be used, with the reason."""


class OverlapWarning(UserWarning):
    """Instance masks of one image claimed the same pixels; the overlap was resolved."""


@dataclass(frozen=True)
class Sample:
    """One image, with its instance labels when they are known."""

    image_id: str
    image: np.ndarray
    labels: np.ndarray | None = None


def read_raw(path: Path) -> np.ndarray:
    """Decode an image file as stored (any depth and channel count, BGR order).

    Raises:
        DataError: If the file is missing, unreadable or truncated.
    """
    if not path.is_file():
        raise DataError(f"{path}: no such file")
    # imdecode on the bytes rather than imread on the name: works for any path encoding.
    raw = cv2.imdecode(np.fromfile(path, dtype=np.uint8), cv2.IMREAD_UNCHANGED)
    if raw is None:
        raise DataError(f"{path}: unreadable or truncated image")
    return raw


def _stretch_to_uint8(array: np.ndarray) -> np.ndarray:
    # A 12- or 16-bit microscope image rarely fills its range, so a fixed shift
    # would leave it nearly black; stretch the image's own range instead.
    lo, hi = float(array.min()), float(array.max())
    if hi <= lo:
        return np.zeros(array.shape, dtype=np.uint8)
    scaled = (array.astype(np.float64) - lo) * (255.0 / (hi - lo))
    return np.rint(scaled).astype(np.uint8)


def read_image(path: str | Path) -> np.ndarray:
    """Read an image file as RGB uint8.

    Grey images are repeated over three channels, an alpha channel is dropped,
    and 16-bit or floating-point images are stretched from their own minimum
    and maximum to 0..255.

    Args:
        path: A PNG or TIFF file.

    Returns:
        Array of shape (H, W, 3), dtype uint8, channels in RGB order.

    Raises:
        DataError: If the file is missing, unreadable, truncated, or not a
            grey, RGB or RGBA image.
    """
    path = Path(path)
    raw = read_raw(path)
    if raw.ndim == 3 and raw.shape[2] == 1:
        raw = raw[..., 0]
    if raw.ndim == 2:
        raw = np.repeat(raw[..., None], 3, axis=2)
    elif raw.ndim == 3 and raw.shape[2] in (3, 4):
        raw = np.ascontiguousarray(raw[..., 2::-1])  # BGR(A) -> RGB, alpha dropped
    else:
        raise DataError(f"{path}: expected a grey, RGB or RGBA image, got shape {raw.shape}")
    if raw.dtype == np.uint8:
        return raw
    if raw.dtype in (np.uint16, np.int16, np.int32, np.float32, np.float64):
        return _stretch_to_uint8(raw)
    raise DataError(f"{path}: unsupported pixel type {raw.dtype}")


def image_size(path: str | Path) -> tuple[int, int]:
    """Height and width of an image file, from the PNG header when it is a PNG.

    Args:
        path: A PNG or TIFF file.

    Returns:
        (height, width).
    """
    path = Path(path)
    if path.suffix.lower() == ".png" and path.is_file():
        with path.open("rb") as f:
            head = f.read(24)
        if len(head) == 24 and head[:8] == _PNG_SIGNATURE:
            width, height = struct.unpack(">II", head[16:24])
            return int(height), int(width)
    return read_image(path).shape[:2]


def read_mask(path: str | Path, shape: tuple[int, int]) -> np.ndarray:
    """Read one binary instance mask.

    Args:
        path: Mask image; background 0 and a single foreground value.
        shape: (H, W) of the image the mask belongs to.

    Returns:
        Boolean array of shape ``shape``.

    Raises:
        DataError: If the mask is unreadable, of another size than its image,
            in colour, or has more than one non-zero value.
    """
    path = Path(path)
    raw = read_raw(path)
    if raw.ndim == 3:
        channels = raw[..., : min(raw.shape[2], 3)]
        if not (channels == channels[..., :1]).all():
            raise DataError(f"{path}: mask is in colour; expected a binary grey mask")
        raw = raw[..., 0]
    if raw.shape != tuple(shape):
        raise DataError(
            f"{path}: mask is {raw.shape[0]}x{raw.shape[1]} but its image is {shape[0]}x{shape[1]}"
        )
    foreground = raw[raw != 0]
    if foreground.size and foreground.min() != foreground.max():
        values = np.unique(foreground)
        raise DataError(
            f"{path}: mask is not binary: {values.size} distinct non-zero values "
            f"(e.g. {', '.join(str(v) for v in values[:4])})"
        )
    return raw != 0


def read_labels(masks_dir: str | Path, shape: tuple[int, int]) -> np.ndarray:
    """Combine a folder of binary masks into one label image.

    Masks are numbered 1, 2, ... in sorted file-name order. A pixel claimed by
    several masks goes to the first of them, so the result does not depend on
    the file system's listing order; such pixels, masks left with nothing and
    empty masks are reported in one :class:`OverlapWarning`.

    Args:
        masks_dir: Folder of mask PNGs.
        shape: (H, W) of the image.

    Returns:
        int32 label image, 0 = background.
    """
    masks_dir = Path(masks_dir)
    if not masks_dir.is_dir():
        raise DataError(f"{masks_dir}: no masks folder")
    labels = np.zeros(shape, dtype=np.int32)
    flat = labels.reshape(-1)
    overlap_pixels = swallowed = empty = 0
    label = 0
    for path in sorted(p for p in masks_dir.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES):
        pixels = np.flatnonzero(read_mask(path, shape))
        if pixels.size == 0:
            empty += 1
            continue
        free = pixels[flat[pixels] == 0]
        overlap_pixels += pixels.size - free.size
        if free.size == 0:
            swallowed += 1
            continue
        label += 1
        flat[free] = label
    if overlap_pixels or empty:
        warnings.warn(
            f"{masks_dir}: {overlap_pixels} pixels claimed by more than one mask went to the "
            f"first mask in file-name order ({swallowed} masks left empty); "
            f"{empty} empty mask files skipped",
            OverlapWarning,
            stacklevel=2,
        )
    return labels


def _image_in_folder(images_dir: Path, image_id: str) -> Path:
    candidates = sorted(p for p in images_dir.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES)
    named = [p for p in candidates if p.stem == image_id]
    if named:
        return named[0]
    if len(candidates) == 1:
        return candidates[0]
    if not candidates:
        raise DataError(f"{images_dir}: image folder with no image (PNG or TIFF)")
    raise DataError(
        f"{images_dir}: {len(candidates)} images, none named {image_id}; cannot tell which to use"
    )


def find_images(root: str | Path) -> dict[str, Path]:
    """Map image ids to image files under ``root``.

    Args:
        root: A folder in the competition layout (``<id>/images/<id>.png``) or
            a plain folder of PNG/TIFF files (the id is the file name without
            its extension).

    Returns:
        Image id -> image file, sorted by id.

    Raises:
        DataError: If ``root`` is missing, holds no image, or an image folder
            of the competition layout is empty.
    """
    root = Path(root)
    if not root.is_dir():
        raise DataError(f"{root}: no such folder")
    found: dict[str, Path] = {}
    items = sorted(root.iterdir())
    for item in items:
        if (item / "images").is_dir():
            found[item.name] = _image_in_folder(item / "images", item.name)
    if not found:
        for item in items:
            if item.is_file() and item.suffix.lower() in IMAGE_SUFFIXES:
                if item.stem in found:
                    raise DataError(f"{root}: two images share the name {item.stem}")
                found[item.stem] = item
    if not found:
        raise DataError(
            f"{root}: no images found (expected <id>/images/<id>.png folders or PNG/TIFF files)"
        )
    return dict(sorted(found.items()))


def masks_dir_of(image_path: str | Path) -> Path:
    """The competition layout's masks folder for an image file."""
    return Path(image_path).parent.parent / "masks"


def labels_of(image_path: str | Path) -> np.ndarray:
    """The label image of an image in the competition layout, from its masks folder."""
    return read_labels(masks_dir_of(image_path), image_size(image_path))


def load_sample(image_id: str, image_path: str | Path, with_labels: bool = True) -> Sample:
    """Read one image, and its labels from the masks folder beside it.

    Args:
        image_id: Id of the image.
        image_path: Its file, as returned by :func:`find_images`.
        with_labels: Read the masks too (the image must be in the competition layout).

    Returns:
        The sample; ``labels`` is None when ``with_labels`` is False.
    """
    image = read_image(image_path)
    labels = read_labels(masks_dir_of(image_path), image.shape[:2]) if with_labels else None
    return Sample(image_id, image, labels)


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
        path: A folder in the competition layout with masks, or a CSV
            (see :func:`read_labels_csv`).
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
