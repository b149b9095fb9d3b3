"""Label images as files, named by image id: written so that any nucleus count fits, and
found and read again in either form.

A label image is written as ``<id>.png``, 16-bit, when its labels fit (up to
65,535), else as ``<id>.tif``, a 32-bit TIFF; asked for TIFF it is always
``<id>.tif``, 16-bit when the labels fit. Both forms open in Fiji and QuPath as
images. Writing one form removes a file of the other form for the same id, so
a folder never holds two label images of one image. Every reader of saved
label images takes either form.
"""

from __future__ import annotations

import io
from pathlib import Path

import numpy as np
import tifffile

from nucleiseg.atomic import write_bytes, write_png
from nucleiseg.data.reading import DataError, int32_labels, read_raw

PNG_SUFFIX = ".png"
TIFF_SUFFIXES = (".tif", ".tiff")
LABEL_FILE_SUFFIXES = (PNG_SUFFIX, *TIFF_SUFFIXES)
# The largest label a 16-bit file holds.
UINT16_MAX = int(np.iinfo(np.uint16).max)


def _largest_label(labels: np.ndarray) -> int:
    """The largest label of an integer label image (0 when empty), checked once.

    Raises:
        ValueError: If a label is negative or exceeds the int32 range of label images.
    """
    if not labels.size:
        return 0
    low, top = int(labels.min()), int(labels.max())
    if low < 0:
        raise ValueError("a label image cannot hold negative labels")
    if top > np.iinfo(np.int32).max:
        raise ValueError(f"label {top} exceeds the int32 range of label images")
    return top


def tiff_bytes(labels: np.ndarray) -> bytes:
    """A label image encoded as a deflate-compressed TIFF: uint16 when its labels fit, else uint32.

    Raises:
        ValueError: If a label is negative or exceeds the int32 range of label images.
    """
    labels = np.asarray(labels)
    return _encode_tiff(labels, _largest_label(labels))


def _encode_tiff(labels: np.ndarray, top: int) -> bytes:
    dtype = np.uint16 if top <= UINT16_MAX else np.uint32
    buffer = io.BytesIO()
    tifffile.imwrite(buffer, labels.astype(dtype), compression="zlib")
    return buffer.getvalue()


def write_label_image(
    folder: str | Path, image_id: str, labels: np.ndarray, tiff: bool = False
) -> Path:
    """Write one label image as ``<id>.png`` (uint16) when it fits and TIFF is not asked, else
    ``<id>.tif``; then remove the other form's file for that id, if any.

    Args:
        folder: Where to write (created if missing).
        image_id: The file name without its suffix.
        labels: Integer label image (H, W), 0 = background.
        tiff: Always write a TIFF (uint16 when the labels fit, else uint32).

    Returns:
        The file written.

    Raises:
        ValueError: If ``labels`` is not a 2-D image of labels in the int32 range.
        nucleiseg.atomic.WriteError: If the file cannot be written, naming it.
    """
    labels = np.asarray(labels)
    if labels.ndim != 2 or labels.dtype.kind not in "iu":
        raise ValueError(f"expected a 2-D integer label image, got {labels.dtype} {labels.shape}")
    folder = Path(folder)
    top = _largest_label(labels)
    if top <= UINT16_MAX and not tiff:
        path = write_png(folder / f"{image_id}{PNG_SUFFIX}", labels.astype(np.uint16))
    else:
        path = write_bytes(folder / f"{image_id}{TIFF_SUFFIXES[0]}", _encode_tiff(labels, top))
    for suffix in LABEL_FILE_SUFFIXES:
        if suffix != path.suffix:
            (folder / f"{image_id}{suffix}").unlink(missing_ok=True)
    return path


def label_files(folder: str | Path) -> dict[str, Path]:
    """The label images of a folder, by image id (the file name without its suffix), sorted.

    A missing folder has none.

    Raises:
        DataError: If one id has label images in two forms.
    """
    folder = Path(folder)
    found: dict[str, Path] = {}
    paths = sorted(folder.iterdir()) if folder.is_dir() else []
    for path in paths:
        if not path.is_file() or path.suffix.lower() not in LABEL_FILE_SUFFIXES:
            continue
        if path.stem in found:
            raise DataError(f"{path}: {path.stem} also has {found[path.stem].name}; keep one")
        found[path.stem] = path
    return dict(sorted(found.items()))


def label_file(folder: str | Path, image_id: str) -> Path | None:
    """The label image of one image id in a folder, in either form; None if there is none.

    Raises:
        DataError: If the id has label images in two forms.
    """
    candidates = [Path(folder) / f"{image_id}{suffix}" for suffix in LABEL_FILE_SUFFIXES]
    found = [path for path in candidates if path.is_file()]
    if len(found) > 1:
        raise DataError(f"{found[0]}: {image_id} also has {found[1].name}; keep one")
    return found[0] if found else None


def read_label_file(path: str | Path) -> np.ndarray:
    """An int32 label image from a saved label PNG or TIFF (8, 16 or 32-bit).

    Raises:
        DataError: If the file is unreadable, has several channels, or holds
            values that are not labels.
    """
    raw = read_raw(Path(path))
    if raw.ndim != 2:
        raise DataError(f"{path}: a label image must have one channel, got shape {raw.shape}")
    if raw.dtype.kind not in "iu":
        raise DataError(f"{path}: a label image holds integers, not {raw.dtype}")
    return int32_labels(raw, path)
