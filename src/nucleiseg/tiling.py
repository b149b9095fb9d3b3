"""Overlapping tiles: cutting a large image, and blending dense outputs back seamlessly.

An image is reflect-padded to a multiple of the network stride, then covered by
tiles of at most ``tile`` pixels a side whose neighbours share ``overlap``
pixels; the last tile of a row or column is moved back to end at the image's
edge, so tiles never leave the image. Dense outputs (probability maps) are
blended with weights that fall off linearly over the overlap towards each
tile edge and stay positive, so each pixel is a weighted mean of the tiles that
saw it, weighted towards the tile that saw it furthest from its edges; where
one tile alone covers a pixel, its value is kept as it is.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import dataclass

import numpy as np
import torch

STRIDE = 32


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
    """One tile: its top-left corner and size in the padded image."""

    y: int
    x: int
    height: int
    width: int

    def window(self) -> tuple[slice, slice]:
        return slice(self.y, self.y + self.height), slice(self.x, self.x + self.width)


def tile_starts(length: int, tile: int, overlap: int) -> list[int]:
    """Start offsets of tiles of ``tile`` pixels covering ``length`` with ``overlap`` shared.

    Raises:
        ValueError: If the overlap is negative or not smaller than the tile.
    """
    if not 0 <= overlap < tile:
        raise ValueError(f"overlap must be in [0, tile), got {overlap} for tile {tile}")
    if length <= tile:
        return [0]
    step = tile - overlap
    starts = list(range(0, length - tile, step))
    return [*starts, length - tile]


def tiles(shape: tuple[int, int], tile: int, overlap: int) -> list[Tile]:
    """The tiles covering an image of this (H, W), row by row."""
    height, width = shape
    tile_h, tile_w = min(tile, height), min(tile, width)
    return [
        Tile(y, x, tile_h, tile_w)
        for y in tile_starts(height, tile_h, overlap)
        for x in tile_starts(width, tile_w, overlap)
    ]


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
    image: torch.Tensor,
    tile: int | None,
    overlap: int,
    batch_size: int = 4,
) -> np.ndarray:
    """A dense network output for a whole image, computed tile by tile and blended.

    Args:
        fn: Maps a batch (N, 3, h, w) with sides multiples of the stride to
            outputs (N, C, h, w), e.g. a U-Net++ followed by a sigmoid.
        image: The network input (3, H, W) of one image (see
            :func:`nucleiseg.dataset.to_tensor`).
        tile: Tile side in pixels (a multiple of the stride), or None for one
            pass over the whole (padded) image.
        overlap: Pixels shared by neighbouring tiles.
        batch_size: Tiles per call of ``fn``.

    Returns:
        float32 (C, H, W).
    """
    _, height, width = image.shape
    padded = pad_to_stride(image.permute(1, 2, 0).numpy()).transpose(2, 0, 1)
    # Contiguous, as a whole-image pass feeds it: convolutions may pick other kernels,
    # and round differently, for strided inputs.
    padded = torch.from_numpy(np.ascontiguousarray(padded))
    padded_shape = tuple(padded.shape[1:])
    if tile is None or (padded_shape[0] <= tile and padded_shape[1] <= tile):
        return fn(padded[None])[0, :, :height, :width].float().cpu().numpy()
    check_tile(tile, overlap)
    layout = tiles(padded_shape, tile, overlap)
    weights = blend_weights(layout[0].height, layout[0].width, overlap)
    total = weight_sum = None
    for group in batches(layout, batch_size):
        batch = torch.stack([padded[(slice(None), *t.window())] for t in group])
        outputs = fn(batch).float().cpu().numpy()
        if total is None:
            total = np.zeros((outputs.shape[1], *padded_shape), np.float32)
            weight_sum = np.zeros(padded_shape, np.float32)
        for t, output in zip(group, outputs, strict=True):
            rows, cols = t.window()
            total[:, rows, cols] += output * weights
            weight_sum[rows, cols] += weights
    return (total / weight_sum)[:, :height, :width]
