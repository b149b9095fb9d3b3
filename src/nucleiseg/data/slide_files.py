"""Whole-slide TIFFs, larger than memory: read window by window, and label images written
tile by tile.

A slide is the first page of a TIFF (for a pyramidal OME-TIFF, its full
resolution), stored in tiles or in strips. :class:`SlideReader` reads a
window of it by decoding only the tiles or strips the window touches, through
tifffile's own segment decoder (``TiffPage.decode``, the one its zarr store
uses), so no more than a window and the segments around it are ever in
memory. Windows come out as RGB uint8, as :func:`nucleiseg.data.reading.read_image`
reads the whole file: a 16-bit or floating-point slide is stretched from the
range of the whole slide, found in one pass over its segments when it opens,
so that every window shares one scale.

:func:`write_tiled_labels` writes a uint32 label image as a tiled,
deflate-compressed TIFF from its tiles, encoded as they come, so the label
image is never whole in memory; like every file it is written beside its
destination and renamed onto it only once complete and read back.
"""

from __future__ import annotations

import math
import zlib
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import tifffile

from nucleiseg.atomic import WriteError, atomic_path
from nucleiseg.data.reading import DataError, as_rgb_uint8, stretch_to_uint8

# Side of the label TIFF's tiles.
LABEL_TILE = 256
# The largest tile or strip a slide may hold, in pixels: a TIFF stored as one
# huge strip cannot be read in pieces.
MAX_SEGMENT_PIXELS = 64 * 2**20
_PIXEL_TYPES = ("uint8", "uint16", "int16", "int32", "float32", "float64")
_RESAVE = "save it tiled (e.g. vips tiffsave --tile, or bfconvert -tilex 512 -tiley 512)"


class SlideReader:
    """Windows of a whole-slide TIFF, decoded from the tiles or strips they touch.

    Args:
        path: A TIFF file, tiled or in strips (OME-TIFF and pyramids included:
            the first page, the full resolution, is read).

    Raises:
        DataError: If the file cannot be read window by window, saying why
            (see :func:`slide_problem`).
    """

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)
        problem = slide_problem(self.path)
        if problem is not None:
            raise DataError(problem)
        self._tiff = tifffile.TiffFile(self.path)
        page = self._tiff.pages.first
        self._page = page
        self.shape = (int(page.imagelength), int(page.imagewidth))
        self._chunk = page.chunks[:2]  # (rows, columns) of one tile or strip
        self._columns = math.ceil(self.shape[1] / self._chunk[1])
        self._range = None if page.dtype == np.uint8 else self._value_range()

    def __enter__(self) -> SlideReader:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def close(self) -> None:
        self._tiff.close()

    def _segment(self, index: int) -> tuple[np.ndarray, int, int]:
        try:
            return _decode(self._tiff, index)
        except _DECODE_ERRORS as error:
            message = f"{self.path}: tile or strip {index} cannot be read ({error})"
            raise DataError(message) from error

    def _value_range(self) -> tuple[float, float]:
        """The lowest and highest finite values of the whole slide (its first three channels)."""
        lo, hi = math.inf, -math.inf
        for index in range(len(self._page.dataoffsets)):
            segment, y, x = self._segment(index)
            values = segment[: self.shape[0] - y, : self.shape[1] - x, :3]
            values = values[np.isfinite(values)]
            if values.size:
                lo, hi = min(lo, float(values.min())), max(hi, float(values.max()))
        if lo > hi:
            raise DataError(f"{self.path}: no pixel has a finite value (all NaN or infinite)")
        return lo, hi

    def window(self, y0: int, x0: int, y1: int, x1: int) -> np.ndarray:
        """The pixels ``[y0:y1, x0:x1]`` as RGB uint8 (H, W, 3), as the whole file would read.

        Raises:
            ValueError: If the window is empty or leaves the slide.
            DataError: If a tile or strip under it cannot be decoded.
        """
        if not (0 <= y0 < y1 <= self.shape[0] and 0 <= x0 < x1 <= self.shape[1]):
            raise ValueError(f"window {(y0, x0, y1, x1)} is not inside the slide {self.shape}")
        rows, columns = self._chunk
        samples = self._page.samplesperpixel
        window = np.empty((y1 - y0, x1 - x0, samples), self._page.dtype)
        for row in range(y0 // rows, (y1 - 1) // rows + 1):
            for column in range(x0 // columns, (x1 - 1) // columns + 1):
                segment, y, x = self._segment(row * self._columns + column)
                top, left = max(y0, y), max(x0, x)
                bottom = min(y1, y + segment.shape[0], self.shape[0])
                right = min(x1, x + segment.shape[1])
                window[top - y0 : bottom - y0, left - x0 : right - x0] = segment[
                    top - y : bottom - y, left - x : right - x
                ]
        if self._range is not None:
            window = stretch_to_uint8(window[..., :3], *self._range)
        return as_rgb_uint8(window, self.path)


_DECODE_ERRORS = (OSError, ValueError, NotImplementedError, tifffile.TiffFileError)


def _decode(tiff: tifffile.TiffFile, index: int) -> tuple[np.ndarray, int, int]:
    """One tile or strip of the first page, decoded as (rows, columns, samples), and the
    row and column of its top-left pixel."""
    page = tiff.pages.first
    offset, count = page.dataoffsets[index], page.databytecounts[index]
    data = None
    if count:
        tiff.filehandle.seek(offset)
        data = tiff.filehandle.read(count)
    segment, (_, _, y, x, _), shape = page.decode(data, index, jpegtables=page.jpegtables)
    if segment is None:  # a tile the writer left empty
        segment = np.zeros(shape, page.dtype)
    return segment[0], y, x


def slide_problem(path: str | Path) -> str | None:
    """What stops a TIFF from being read window by window, found from its header and
    first tile; None if nothing does.

    Refused: a file that is not a TIFF; a first page with depth or separate
    colour planes; a pixel type other than grey, RGB or RGBA in 8, 16 or 32-bit
    integers or floats; one tile or strip over :data:`MAX_SEGMENT_PIXELS`; a
    compression this environment cannot decode.
    """
    path = Path(path)
    if not path.is_file():
        return f"{path}: no such file"
    try:
        with tifffile.TiffFile(path) as tiff:
            page = tiff.pages.first
            if page.imagedepth > 1:
                return f"{path}: a 3-D TIFF (depth {page.imagedepth}); a slide is one 2-D image"
            if page.samplesperpixel not in (1, 3, 4):
                return (
                    f"{path}: {page.samplesperpixel} samples per pixel; expected grey, RGB or RGBA"
                )
            if page.samplesperpixel > 1 and page.planarconfig != 1:
                return f"{path}: colour planes stored separately; {_RESAVE} with interleaved RGB"
            if page.dtype is None or page.dtype.name not in _PIXEL_TYPES:
                return f"{path}: unsupported pixel type {page.dtype}"
            rows, columns = page.chunks[:2]
            if rows * columns > MAX_SEGMENT_PIXELS:
                return (
                    f"{path}: stored as strips or tiles of {rows}x{columns} pixels, too large "
                    f"to read in pieces; {_RESAVE}"
                )
            if not page.dataoffsets:
                return f"{path}: holds no image data"
            _decode(tiff, 0)
    except _DECODE_ERRORS as error:
        return f"{path}: cannot be read as a TIFF slide ({error})"
    return None


def encode_label_tile(tile: np.ndarray) -> bytes:
    """One label tile as the tiled label TIFF stores it: uint32 little-endian, deflated.

    Args:
        tile: Labels of at most :data:`LABEL_TILE` pixels a side (an edge tile
            is padded with 0 to the full side).
    """
    full = np.zeros((LABEL_TILE, LABEL_TILE), "<u4")
    full[: tile.shape[0], : tile.shape[1]] = tile
    return zlib.compress(full.tobytes(), 6)


def write_tiled_labels(path: str | Path, shape: tuple[int, int], tiles: Iterator[bytes]) -> Path:
    """Write a uint32 label image of this (H, W) as a tiled TIFF from its encoded tiles.

    The file is written beside ``path`` and renamed onto it only once every
    tile is in and the file reads back as a tiled image of that shape; if
    ``tiles`` raises, nothing is left behind and the error passes on.

    Args:
        path: The label TIFF to write.
        shape: (H, W) of the label image.
        tiles: :func:`encode_label_tile` of each tile of :data:`LABEL_TILE`
            pixels, row by row, made as the writer asks for them.

    Returns:
        ``path``.

    Raises:
        WriteError: If the file cannot be written or does not read back, naming ``path``.
    """
    path = Path(path)
    count = math.ceil(shape[0] / LABEL_TILE) * math.ceil(shape[1] / LABEL_TILE)
    with atomic_path(path) as tmp:
        tifffile.imwrite(
            tmp,
            tiles,
            shape=shape,
            dtype="<u4",
            tile=(LABEL_TILE, LABEL_TILE),
            compression="zlib",
            bigtiff=shape[0] * shape[1] * 4 >= 2**31,
            photometric="minisblack",
        )
        with tifffile.TiffFile(tmp) as written:
            page = written.pages.first
            complete = (
                page.shape == tuple(shape)
                and page.is_tiled
                and len(page.databytecounts) == count
                and all(page.databytecounts)
            )
        if not complete:
            raise WriteError(path, f"the written file does not read back as {shape} in tiles")
    return path
