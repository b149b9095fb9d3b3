"""Reading DSB 2018 images and their instance labels.

Three layouts are understood:

- the competition's: ``<root>/<id>/images/<id>.png`` with one binary PNG per
  nucleus in ``<root>/<id>/masks/``;
- a folder pair of images and label images, ``<root>/images/<name>`` and
  ``<root>/labels/<name>`` (same stem; PNG or TIFF, 8, 16 or 32-bit integer
  labels, 0 = background), as StarDist and Cellpose annotations come;
- a plain folder of PNG or TIFF files, for a user's own images (no labels).

Labels can also come from the competition's CSV forms (``stage1_train_labels.csv``:
ImageId, EncodedPixels; ``stage1_solution.csv``: the same plus Height, Width, Usage).

Every image comes out as RGB uint8 of shape (H, W, 3) and every label image as
int32 with 0 for background. Bad input raises :class:`DataError` naming the
file and what is wrong with it.
"""

from __future__ import annotations

import io
import struct
import warnings
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO

import cv2
import numpy as np
import tifffile

IMAGE_SUFFIXES = (".png", ".tif", ".tiff")
TRAIN_STAGE = "stage1_train"
TEST_STAGE = "stage1_test"
SAMPLE_DIR = Path("data/sample")
LABEL_IMAGES = "images"
LABEL_LABELS = "labels"
LABEL_SUFFIXES = (".png", ".tif", ".tiff")

_PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


class DataError(ValueError):
    """An input file or folder that cannot be used, with the reason."""


class NonFiniteWarning(UserWarning):
    """A floating-point image has NaN or infinite pixels; they were shown as 0 or 255."""


class OverlapWarning(UserWarning):
    """Instance masks of one image claimed the same pixels; the overlap was resolved."""


class BinaryLabelsWarning(UserWarning):
    """A label image is a binary mask (one value, several regions); its regions became nuclei."""


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
    encoded = np.fromfile(path, dtype=np.uint8)
    if encoded.size == 0:
        raise DataError(f"{path}: empty file (0 bytes): unreadable or truncated image")
    if bytes(encoded[:8]) == _PNG_SIGNATURE and not _png_complete(io.BytesIO(encoded)):
        # libpng would print its own error line before failing.
        raise DataError(f"{path}: unreadable or truncated image")
    try:
        raw = cv2.imdecode(encoded, cv2.IMREAD_UNCHANGED)
    except cv2.error as error:
        raise DataError(f"{path}: unreadable or truncated image ({error})") from error
    if raw is None:
        raise DataError(f"{path}: unreadable or truncated image")
    return raw


def _stretch_to_uint8(array: np.ndarray, finite: np.ndarray) -> np.ndarray:
    # A 12- or 16-bit microscope image rarely fills its range, so a fixed shift
    # would leave it nearly black; stretch the image's own range instead. The
    # range is that of the finite pixels: one NaN or inf would blank the image.
    values = array[finite]
    return stretch_to_uint8(array, float(values.min()), float(values.max()))


def stretch_to_uint8(array: np.ndarray, lo: float, hi: float) -> np.ndarray:
    """Pixels stretched from ``lo``..``hi`` to 0..255 as :func:`as_rgb_uint8` stretches an
    image from its own range (a part of a larger image is given the whole's range).

    NaN and -inf become 0, +inf 255; a range with ``hi <= lo`` gives 0 everywhere.
    """
    finite = np.isfinite(array)
    if hi <= lo:
        scaled = np.zeros(array.shape)
    else:
        scaled = (array.astype(np.float64) - lo) * (255.0 / (hi - lo))
    # NaN and -inf go to black, +inf to white.
    scaled = np.where(finite, scaled, np.where(array == np.inf, 255.0, 0.0))
    return np.rint(scaled).astype(np.uint8)


def read_image(path: str | Path) -> np.ndarray:
    """Read an image file as RGB uint8 (see :func:`as_rgb_uint8`).

    Args:
        path: A PNG or TIFF file.

    Returns:
        Array of shape (H, W, 3), dtype uint8, channels in RGB order.

    Raises:
        DataError: If the file is missing, unreadable, truncated, not a
            grey, RGB or RGBA image, or has no finite pixel value.
    """
    path = Path(path)
    raw = read_raw(path)
    if raw.ndim == 3 and raw.shape[2] in (3, 4):
        raw = raw[..., 2::-1]  # cv2's BGR(A) -> RGB, alpha dropped
    return as_rgb_uint8(raw, path)


def as_rgb_uint8(image: np.ndarray, name: str | Path = "image") -> np.ndarray:
    """An image array as RGB uint8, the form every model takes.

    Grey images are repeated over three channels, an alpha channel is dropped,
    and 16-bit or floating-point images are stretched from their own minimum
    and maximum to 0..255. In a floating-point image the range is that of the
    finite pixels; NaN and -inf pixels become 0 and +inf ones 255, with a
    :class:`NonFiniteWarning`.

    Args:
        image: Grey (H, W) or (H, W, 1), RGB (H, W, 3) or RGBA (H, W, 4); uint8,
            uint16, int16, int32, float32 or float64.
        name: What the messages call the image (its file).

    Returns:
        Array of shape (H, W, 3), dtype uint8 (``image`` uncopied when it already is one).

    Raises:
        DataError: If the image is empty, not grey, RGB or RGBA, of another
            pixel type, or has no finite pixel value.
    """
    raw = image
    if raw.ndim == 3 and raw.shape[2] == 1:
        raw = raw[..., 0]
    if raw.ndim == 2:
        raw = np.repeat(raw[..., None], 3, axis=2)
    elif raw.ndim == 3 and raw.shape[2] in (3, 4):
        raw = np.ascontiguousarray(raw[..., :3])
    else:
        raise DataError(f"{name}: expected a grey, RGB or RGBA image, got shape {raw.shape}")
    if raw.size == 0:
        raise DataError(f"{name}: empty image, shape {image.shape}")
    if raw.dtype == np.uint8:
        return raw
    if raw.dtype not in (np.uint16, np.int16, np.int32, np.float32, np.float64):
        raise DataError(f"{name}: unsupported pixel type {raw.dtype}")
    finite = np.isfinite(raw)
    if not finite.any():
        raise DataError(_no_finite_pixel(name))
    if not finite.all():
        warnings.warn(
            f"{name}: {int(np.count_nonzero(~finite.all(axis=-1)))} NaN or infinite pixels "
            f"of {finite[..., 0].size}; the others are stretched to 0..255, NaN and -inf "
            "shown as 0, +inf as 255",
            NonFiniteWarning,
            stacklevel=3,
        )
    return _stretch_to_uint8(raw, finite)


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


_PNG_END = b"\x00\x00\x00\x00IEND\xaeB`\x82"
_TIFF_SIGNATURES = (b"II*\x00", b"MM\x00*", b"II+\x00", b"MM\x00+")


def _no_finite_pixel(name: str | Path) -> str:
    return f"{name}: no pixel has a finite value (all NaN or infinite)"


def _png_complete(handle: BinaryIO) -> bool:
    """Whether a PNG's chunks, walked from their length fields, reach IEND inside the file.

    Only the 8-byte chunk headers are read; a file cut short ends inside a
    chunk. Bytes after IEND do not matter, to the decoders either.
    """
    size = handle.seek(0, io.SEEK_END)
    offset = len(_PNG_SIGNATURE)
    while offset + 12 <= size:
        handle.seek(offset)
        length, kind = struct.unpack(">I4s", handle.read(8))
        if kind == b"IEND":
            return True
        offset += 12 + length  # length, type, data, CRC
    return False


def _float_tiff_problem(path: Path) -> str | None:
    """A floating-point TIFF without one finite pixel in its first page (the one read).

    Strips or tiles are decoded until a finite pixel turns up, so a usable
    image costs one of them; integer TIFFs are not decoded at all.
    """
    with tifffile.TiffFile(path) as tiff:
        page = tiff.pages.first
        if page.dtype is None or page.dtype.kind != "f":
            return None
        height, width = page.imagelength, page.imagewidth
        for segment, (_, _, y, x, _), _ in page.segments():
            # Tiles on the right and bottom edges are padded past the image.
            if segment is not None and np.isfinite(segment[:, : height - y, : width - x]).any():
                return None
    return _no_finite_pixel(path)


def image_file_problem(path: str | Path) -> str | None:
    """What makes an image file unreadable, found without decoding it where possible.

    A PNG is checked from its header and its chunk headers (a truncated PNG
    ends before its closing IEND chunk), never decoded; a TIFF from its header
    and, if its pixels are floating-point, from as many of them as it takes
    to find a finite one. A file that is neither, or a TIFF that tifffile
    cannot parse, is decoded to decide.

    Args:
        path: An image file.

    Returns:
        One line naming the file and the problem, or None.
    """
    path = Path(path)
    if not path.is_file():
        return f"{path}: no such file"
    try:
        size = path.stat().st_size
        with path.open("rb") as f:
            head = f.read(24)
            f.seek(max(size - len(_PNG_END), 0))
            png = head[:8] == _PNG_SIGNATURE
            complete = png and (f.read() == _PNG_END or _png_complete(f))
    except OSError as error:
        return f"{path}: cannot be read ({error.strerror or error})"
    if size == 0:
        return f"{path}: empty file (0 bytes)"
    if png:
        if head[12:16] != b"IHDR" or not complete:
            return f"{path}: unreadable or truncated image"
        width, height = struct.unpack(">II", head[16:24])
        return None if width and height else f"{path}: PNG header gives a {width}x{height} image"
    if head[:4] in _TIFF_SIGNATURES:
        try:
            return _float_tiff_problem(path)
        except (tifffile.TiffFileError, OSError, ValueError):
            pass  # the decoder decides
    try:
        read_raw(path)
    except DataError as error:
        return str(error)
    return None


def check_image_files(paths: Iterable[str | Path]) -> list[str]:
    """:func:`image_file_problem` of every file, one line per unreadable one, in order."""
    return [problem for path in paths if (problem := image_file_problem(path)) is not None]


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


def read_label_image(path: str | Path, shape: tuple[int, int]) -> np.ndarray:
    """Read an instance label image (0 = background, one value per nucleus).

    Args:
        path: Grey PNG or TIFF of integer labels (8, 16 or 32-bit; a float
            TIFF is accepted when every value is a whole number).
        shape: (H, W) of the image the labels belong to.

    Returns:
        int32 label image of shape ``shape``; a binary mask (one value in
        several separate regions) comes out as its connected regions, with a
        :class:`BinaryLabelsWarning`.

    Raises:
        DataError: If the file is missing, empty or unreadable, has colour
            channels, is of another size than its image, or holds negative
            or non-integer values.
    """
    path = Path(path)
    raw = read_raw(path)
    if raw.ndim == 3 and raw.shape[2] == 1:
        raw = raw[..., 0]
    if raw.ndim != 2:
        raise DataError(
            f"{path}: label image has {raw.shape[2]} channels; expected one channel of "
            "integer labels (an RGB label image is a picture of labels, not labels)"
        )
    if raw.shape != tuple(shape):
        raise DataError(
            f"{path}: label image is {raw.shape[0]}x{raw.shape[1]} "
            f"but its image is {shape[0]}x{shape[1]}"
        )
    if raw.dtype.kind == "f":
        if not np.isfinite(raw).all() or (raw != np.round(raw)).any():
            raise DataError(f"{path}: label image holds non-integer values")
    elif raw.dtype.kind not in "iu":
        raise DataError(f"{path}: unsupported label pixel type {raw.dtype}")
    return _instances_of_binary_mask(int32_labels(raw, path), path)


def int32_labels(raw: np.ndarray, path: str | Path) -> np.ndarray:
    """Integer label values as int32, refusing negative ones and ones past the int32 range.

    Raises:
        DataError: Naming ``path``, on a value that is not a label id.
    """
    if raw.size and raw.min() < 0:
        raise DataError(f"{path}: label image holds negative values")
    if raw.size and raw.max() > np.iinfo(np.int32).max:
        raise DataError(f"{path}: label values exceed the int32 range")
    return raw.astype(np.int32)


def _instances_of_binary_mask(labels: np.ndarray, path: Path) -> np.ndarray:
    """Instance labels of a label image; a binary mask becomes its connected regions.

    One non-zero value over several separate regions is a binary mask (0/1 or
    0/255) rather than instance labels: each 4-connected region becomes a
    nucleus, with a :class:`BinaryLabelsWarning`, since nuclei that touch
    cannot be told apart. One value in one region is a single nucleus.
    """
    foreground = labels > 0
    values = labels[foreground]
    if values.size == 0 or values.min() != values.max():
        return labels
    count, regions = cv2.connectedComponents(foreground.astype(np.uint8), connectivity=4)
    if count <= 2:  # the background and one nucleus
        return labels
    warnings.warn(
        f"{path}: a binary mask (0 and {values[0]}), not instance labels: its {count - 1} "
        "separate regions are taken as nuclei, so touching nuclei become one; give every "
        "nucleus its own value to keep them apart",
        BinaryLabelsWarning,
        stacklevel=3,
    )
    return regions.astype(np.int32)


def _files_by_stem(folder: Path) -> dict[str, Path]:
    found: dict[str, Path] = {}
    for item in sorted(folder.iterdir()):
        if item.is_file() and item.suffix.lower() in IMAGE_SUFFIXES:
            if item.stem in found:
                raise DataError(f"{folder}: two images share the name {item.stem}")
            found[item.stem] = item
    return found


def _image_in_folder(images_dir: Path, image_id: str) -> Path:
    candidates = sorted(p for p in images_dir.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES)
    named = [p for p in candidates if p.stem == image_id]
    if len(named) > 1:
        raise DataError(
            f"{images_dir}: several images named {image_id}: {', '.join(p.name for p in named)}; "
            "keep one"
        )
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
        root: A folder in the competition layout (``<id>/images/<id>.png``),
            a folder pair ``images/`` + ``labels/`` (the images are those in
            ``images/``), or a plain folder of PNG/TIFF files. Outside the
            competition layout the id is the file name without its extension.

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
    if (root / LABEL_IMAGES).is_dir():
        found = _files_by_stem(root / LABEL_IMAGES)
    else:
        for item in sorted(root.iterdir()):
            if (item / "images").is_dir():
                found[item.name] = _image_in_folder(item / "images", item.name)
    if not found:
        found = _files_by_stem(root)
    if not found:
        raise DataError(
            f"{root}: no images found (expected <id>/images/<id>.png folders, an images/ "
            "folder beside a labels/ folder, or PNG/TIFF files)"
        )
    return dict(sorted(found.items()))


def masks_dir_of(image_path: str | Path) -> Path:
    """The competition layout's masks folder for an image file."""
    return Path(image_path).parent.parent / "masks"


def label_image_of(image_path: str | Path) -> Path | None:
    """The label image of an image in the ``images/`` + ``labels/`` layout.

    Args:
        image_path: An image file.

    Returns:
        ``<root>/labels/<stem>.<png|tif|tiff>`` when the image lies in
        ``<root>/images/`` beside a ``labels/`` folder, else None (the
        competition layout, whose labels are a masks folder).

    Raises:
        DataError: If the layout is the folder pair but the image has no label
            image, or more than one.
    """
    matches = _label_images(image_path)
    if matches is None:
        return None
    if not matches:
        raise DataError(_no_label_image(image_path))
    if len(matches) > 1:
        raise DataError(_several_label_images(image_path, matches))
    return matches[0]


def _label_images(image_path: str | Path) -> list[Path] | None:
    """The label images named like an image of the ``images/`` + ``labels/`` layout.

    Returns:
        The files found (none, one or several), or None outside that layout.
    """
    image_path = Path(image_path)
    labels_dir = image_path.parent.parent / LABEL_LABELS
    if image_path.parent.name != LABEL_IMAGES or not labels_dir.is_dir():
        return None
    matches = [labels_dir / (image_path.stem + suffix) for suffix in LABEL_SUFFIXES]
    return [p for p in matches if p.is_file()]


def _no_label_image(image_path: Path) -> str:
    labels_dir = image_path.parent.parent / LABEL_LABELS
    return f"{image_path}: no label image {labels_dir / image_path.stem}.png/.tif"


def _several_label_images(image_path: Path, matches: list[Path]) -> str:
    return f"{image_path}: several label images: {', '.join(map(str, matches))}"


def check_labelled(images: Mapping[str, Path]) -> None:
    """Check that every image has its labels (a label image, or a masks folder), reading nothing.

    Args:
        images: Image id -> image file, as returned by :func:`find_images`.

    Raises:
        DataError: Naming every image without labels, then every image with
            several label images (one line each, under a header for each kind).
    """
    missing, ambiguous = [], []
    for path in map(Path, images.values()):
        matches = _label_images(path)
        if matches is None and not masks_dir_of(path).is_dir():
            missing.append(f"{path}: no labels (no {masks_dir_of(path)} folder)")
        elif matches == []:
            missing.append(_no_label_image(path))
        elif matches is not None and len(matches) > 1:
            ambiguous.append(_several_label_images(path, matches))
    sections = [
        f"{len(found)} of {len(images)} images {header}:\n  " + "\n  ".join(found)
        for found, header in (
            (missing, "have no labels"),
            (ambiguous, "have several label images; keep one each"),
        )
        if found
    ]
    if sections:
        raise DataError("\n".join(sections))


def read_labels_of(image_path: str | Path, shape: tuple[int, int]) -> np.ndarray:
    """The label image of an image in either labelled layout.

    Args:
        image_path: An image file, as returned by :func:`find_images`.
        shape: (H, W) of the image.

    Returns:
        int32 label image, 0 = background.
    """
    label_path = label_image_of(image_path)
    if label_path is not None:
        return read_label_image(label_path, shape)
    return read_labels(masks_dir_of(image_path), shape)


def labels_of(image_path: str | Path) -> np.ndarray:
    """The label image of an image in either labelled layout (masks folder or label image)."""
    return read_labels_of(image_path, image_size(image_path))


def load_sample(image_id: str, image_path: str | Path, with_labels: bool = True) -> Sample:
    """Read one image, and its labels from the masks folder or label image beside it.

    Args:
        image_id: Id of the image.
        image_path: Its file, as returned by :func:`find_images`.
        with_labels: Read the labels too (the image must be in a labelled layout).

    Returns:
        The sample; ``labels`` is None when ``with_labels`` is False.
    """
    image = read_image(image_path)
    labels = read_labels_of(image_path, image.shape[:2]) if with_labels else None
    return Sample(image_id, image, labels)


def labelled_root(data_dir: str | Path) -> Path:
    """The folder of labelled training images under a dataset root.

    Args:
        data_dir: A competition dataset root (holding ``stage1_train/``), or
            itself a labelled folder (competition layout or ``images/`` +
            ``labels/``).

    Returns:
        ``data_dir/stage1_train`` when it exists, else ``data_dir``.
    """
    data_dir = Path(data_dir)
    return data_dir / TRAIN_STAGE if (data_dir / TRAIN_STAGE).is_dir() else data_dir
