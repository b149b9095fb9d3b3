"""Overlapping tiles: cutting a large image, and blending dense outputs back seamlessly.

An image is reflect-padded to a multiple of the network stride, then covered by
as few tiles of at most ``tile`` pixels a side as share at least ``overlap``
pixels with their neighbours; the tiles are then made as small as that number
allows (to a multiple of the stride) and spread evenly from edge to edge, so
they hold as few pixels as the overlap lets them (a 1024 px side in 512 px
tiles with 128 px of overlap takes three tiles of 448 px, not three of 512).
Tiles never leave the image. Dense outputs (probability maps) are
blended with weights that fall off linearly over the overlap towards each
tile edge and stay positive, so each pixel is a weighted mean of the tiles that
saw it, weighted towards the tile that saw it furthest from its edges; where
one tile alone covers a pixel, its value is kept as it is.

Each tile also has a *core*, the part of the image it answers for: the
overlaps are split at their middle, so the cores cut the image into disjoint
pieces (instances are kept by the tile whose core holds their centre; see
:mod:`nucleiseg.inference.detection`).

Images too large for a memory budget are cut into tiles even when no tile
size is asked for (:func:`auto_tile`): the largest tile whose forward pass fits
the budget.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator
from dataclasses import dataclass

import numpy as np
import torch

from nucleiseg.data.dataset import to_tensor

STRIDE = 32


def padded_shape(shape: tuple[int, int], stride: int = STRIDE) -> tuple[int, int]:
    """(H, W) of an image of this (H, W) once :func:`pad_to_stride` has padded it."""
    return (-(-shape[0] // stride) * stride, -(-shape[1] // stride) * stride)


def pad_to_stride(image: np.ndarray, stride: int = STRIDE) -> np.ndarray:
    """Reflect-pad an (H, W, C) image at the bottom and right to multiples of ``stride``."""
    height, width = image.shape[:2]
    pad_y, pad_x = -height % stride, -width % stride
    if not pad_y and not pad_x:
        return image
    # Reflection needs the pad to be shorter than the side; symmetric has no such limit.
    mode = "reflect" if pad_y < height and pad_x < width else "symmetric"
    return np.pad(image, ((0, pad_y), (0, pad_x), (0, 0)), mode=mode)


@dataclass(frozen=True)
class Tile:
    """One tile: its top-left corner and size in the padded image, and its core.

    Attributes:
        y: Top row.
        x: Left column.
        height: Rows.
        width: Columns.
        core: (y0, x0, y1, x1) of the part of the image this tile answers for,
            end-exclusive; the cores of a layout cut the image into disjoint pieces.
    """

    y: int
    x: int
    height: int
    width: int
    core: tuple[float, float, float, float]

    def window(self) -> tuple[slice, slice]:
        return slice(self.y, self.y + self.height), slice(self.x, self.x + self.width)


def tile_side(length: int, tile: int, overlap: int) -> int:
    """Side of the tiles covering ``length``: at most ``tile``, as small as their number allows.

    The number of tiles is the fewest of ``tile`` pixels that share at least
    ``overlap`` pixels with their neighbours; the side is the smallest multiple
    of the stride with which that many tiles still share ``overlap``.

    Raises:
        ValueError: If the overlap is negative or not smaller than the tile.
    """
    if not 0 <= overlap < tile:
        raise ValueError(f"overlap must be in [0, tile), got {overlap} for tile {tile}")
    if length <= tile:
        return length
    count = math.ceil((length - overlap) / (tile - overlap))
    needed = math.ceil((length + (count - 1) * overlap) / count)
    return min(tile, math.ceil(needed / STRIDE) * STRIDE)


def tile_starts(length: int, side: int, overlap: int) -> list[int]:
    """Start offsets of the fewest tiles of ``side`` pixels covering ``length`` with
    at least ``overlap`` shared, spread evenly from 0 to ``length - side``.

    Raises:
        ValueError: If the overlap is negative or not smaller than the side.
    """
    if not 0 <= overlap < side:
        raise ValueError(f"overlap must be in [0, tile), got {overlap} for tile {side}")
    if length <= side:
        return [0]
    count = math.ceil((length - overlap) / (side - overlap))
    return [k * (length - side) // (count - 1) for k in range(count)]


def _cores(starts: list[int], side: int, length: int) -> list[tuple[float, float]]:
    """Each tile's share of the axis: overlaps split at their middle."""
    pairs = zip(starts[:-1], starts[1:], strict=True)
    cuts = [(previous + side + start) / 2 for previous, start in pairs]
    return list(zip([0.0, *cuts], [*cuts, float(length)], strict=True))


def tiles(shape: tuple[int, int], tile: int, overlap: int) -> list[Tile]:
    """The tiles covering an image of this (H, W), row by row (see :func:`tile_side`)."""
    height, width = shape
    side_h, side_w = tile_side(height, tile, overlap), tile_side(width, tile, overlap)
    # A side held by one tile may be shorter than the overlap.
    rows = tile_starts(height, side_h, overlap) if height > side_h else [0]
    cols = tile_starts(width, side_w, overlap) if width > side_w else [0]
    row_cores, col_cores = _cores(rows, side_h, height), _cores(cols, side_w, width)
    return [
        Tile(y, x, side_h, side_w, (y0, x0, y1, x1))
        for y, (y0, y1) in zip(rows, row_cores, strict=True)
        for x, (x0, x1) in zip(cols, col_cores, strict=True)
    ]


def count_tiles(shape: tuple[int, int], tile: int | None, overlap: int) -> int:
    """Forward passes over an image of this (H, W): its tiles, or 1 for the whole image."""
    if tile is None or (shape[0] <= tile and shape[1] <= tile):
        return 1
    return len(tiles(shape, tile, overlap))


def auto_tile(
    shape: tuple[int, int], bytes_per_pixel: float, max_bytes: float, overlap: int
) -> int | None:
    """The tile side for an image whose whole-image pass would exceed a memory budget.

    Args:
        shape: (H, W) of the network input.
        bytes_per_pixel: Memory a forward pass takes per input pixel.
        max_bytes: Memory one forward pass may take.
        overlap: Pixels tiles will share.

    Returns:
        None if the whole image fits the budget, else the largest multiple of
        the stride whose square tile fits it, but at least 8 strides and more
        than the overlap.
    """
    if shape[0] * shape[1] * bytes_per_pixel <= max_bytes:
        return None
    side = math.isqrt(int(max_bytes / bytes_per_pixel)) // STRIDE * STRIDE
    return max(side, 8 * STRIDE, (overlap // STRIDE + 1) * STRIDE)


def blend_weights(height: int, width: int, overlap: int) -> np.ndarray:
    """float32 (height, width) weights: 1 inside, falling linearly over ``overlap`` px to the edges.

    The edge pixel keeps ``1 / (overlap + 1)``, never 0, so a pixel seen by
    one tile only is still defined.
    """

    def ramp(n: int) -> np.ndarray:
        distance = np.minimum(np.arange(n), np.arange(n)[::-1])
        return np.minimum(distance + 1, overlap + 1) / (overlap + 1)

    return np.outer(ramp(height), ramp(width)).astype(np.float32)


def batches(items: list, size: int) -> Iterator[list]:
    """Consecutive groups of ``size`` items (the last may be shorter)."""
    for start in range(0, len(items), size):
        yield items[start : start + size]


def check_tile(tile: int, overlap: int) -> None:
    """Raise ValueError unless the tile is a positive multiple of the stride and overlap fits."""
    if tile <= 0 or tile % STRIDE:
        raise ValueError(f"tile must be a positive multiple of {STRIDE}, got {tile}")
    if not 0 <= overlap < tile:
        raise ValueError(f"overlap must be in [0, tile), got {overlap} for tile {tile}")


def predict_dense_tiled(
    fn: Callable[[torch.Tensor], torch.Tensor],
    image: np.ndarray,
    tile: int | None,
    overlap: int,
    batch_size: int = 4,
    progress: Callable[[int], None] | None = None,
) -> np.ndarray:
    """A dense network output for a whole image, computed tile by tile and blended.

    Each tile is made a network input (:func:`nucleiseg.data.dataset.to_tensor`)
    only when its batch runs, so a large image is never held as float32.

    Args:
        fn: Maps a batch (N, 3, h, w) with sides multiples of the stride to
            outputs (N, C, h, w), e.g. a U-Net++ followed by a sigmoid.
        image: RGB uint8 (H, W, 3).
        tile: Tile side in pixels (a multiple of the stride), or None for one
            pass over the whole (padded) image.
        overlap: Pixels shared by neighbouring tiles.
        batch_size: Tiles per call of ``fn``.
        progress: Called with the number of tiles each call of ``fn`` covered
            (1 for a whole-image pass).

    Returns:
        float32 (C, H, W).
    """
    height, width = image.shape[:2]
    padded = pad_to_stride(image)
    shape = padded.shape[:2]
    if tile is None or (shape[0] <= tile and shape[1] <= tile):
        output = fn(to_tensor(padded)[None])[0, :, :height, :width].float().cpu().numpy()
        if progress is not None:
            progress(1)
        return output
    check_tile(tile, overlap)
    layout = tiles(shape, tile, overlap)
    weights = blend_weights(layout[0].height, layout[0].width, overlap)
    total = weight_sum = None
    for group in batches(layout, batch_size):
        batch = torch.stack([to_tensor(padded[t.window()]) for t in group])
        outputs = fn(batch).float().cpu().numpy()
        if total is None:
            total = np.zeros((outputs.shape[1], *shape), np.float32)
            weight_sum = np.zeros(shape, np.float32)
        for t, output in zip(group, outputs, strict=True):
            rows, cols = t.window()
            total[:, rows, cols] += output * weights
            weight_sum[rows, cols] += weights
        if progress is not None:
            progress(len(group))
    total /= weight_sum
    return total[:, :height, :width]
