"""Test-time augmentation: the dihedral group D4 and rescaling, each inverted exactly.

A view of an image is ``rot90(fliplr(image) if flip else image, k)`` (counter-
clockwise quarter turns), optionally after a resize. Outputs computed on a view
are brought back to the image: probability maps (and box-cropped masks) by the
inverse array operation, points and boxes by the inverse coordinate map, both
exact for D4 since they only move pixels.
"""

from __future__ import annotations

from collections.abc import Sequence

import cv2
import numpy as np

# (quarter turns, horizontal flip first)
Transform = tuple[int, bool]

IDENTITY: Transform = (0, False)
TTA_SETS: dict[str, tuple[Transform, ...]] = {
    "none": (IDENTITY,),
    # identity, left-right flip, up-down flip (= half turn of a left-right flip)
    "flip": (IDENTITY, (0, True), (2, True)),
    "d4": tuple((k, flip) for flip in (False, True) for k in range(4)),
}


def transforms(name: str) -> tuple[Transform, ...]:
    """The views of a TTA kind: ``none``, ``flip`` or ``d4``."""
    if name not in TTA_SETS:
        raise ValueError(f"unknown TTA {name!r}; choose from {', '.join(TTA_SETS)}")
    return TTA_SETS[name]


def parse_scales(text: str | Sequence[float]) -> tuple[float, ...]:
    """Scales from ``"1.0,1.25"`` (or a sequence); every one must be positive."""
    values = [float(v) for v in text.split(",")] if isinstance(text, str) else list(text)
    if not values or any(not np.isfinite(v) or v <= 0 for v in values):
        raise ValueError(f"scales must be positive numbers, got {text!r}")
    return tuple(values)


def apply(image: np.ndarray, transform: Transform) -> np.ndarray:
    """The view of an (H, W, ...) image."""
    k, flip = transform
    view = image[:, ::-1] if flip else image
    return np.ascontiguousarray(np.rot90(view, k, axes=(0, 1)))


def invert_maps(maps: np.ndarray, transform: Transform) -> np.ndarray:
    """Maps (C, h, w) computed on a view, back in the image's orientation."""
    k, flip = transform
    back = np.rot90(maps, -k, axes=(1, 2))
    if flip:
        back = back[:, :, ::-1]
    return np.ascontiguousarray(back)


def invert_points(
    ys: np.ndarray, xs: np.ndarray, view_shape: tuple[int, int], transform: Transform
) -> tuple[np.ndarray, np.ndarray]:
    """Coordinates in a view -> coordinates in the image.

    Coordinates are in pixel units with pixel ``j``'s centre at ``j`` (so a
    left-right flip maps ``x`` to ``width - 1 - x``); they may be fractional.

    Args:
        ys: Row coordinates in the view.
        xs: Column coordinates in the view.
        view_shape: (H, W) of the view.
        transform: The view's transform.

    Returns:
        (ys, xs) in the image.
    """
    k, flip = transform
    ys, xs = np.asarray(ys, float), np.asarray(xs, float)
    height, width = view_shape
    for _ in range(k % 4):
        # B = rot90(A) puts A[r, c] at B[width_A - 1 - c, r], and width_A = height_B.
        ys, xs, height, width = xs, height - 1 - ys, width, height
    if flip:
        xs = width - 1 - xs
    return ys, xs


def invert_boxes(
    boxes: np.ndarray, view_shape: tuple[int, int], transform: Transform
) -> np.ndarray:
    """Boxes (N, 4) as x0, y0, x1, y1 in a view -> the same boxes in the image.

    Corners are moved as points (see :func:`invert_points`); a flip or a turn
    swaps which corner is the smaller, so the result is re-sorted per axis.
    """
    boxes = np.asarray(boxes, float).reshape(-1, 4)
    ya, xa = invert_points(boxes[:, 1], boxes[:, 0], view_shape, transform)
    yb, xb = invert_points(boxes[:, 3], boxes[:, 2], view_shape, transform)
    return np.stack(
        [np.minimum(xa, xb), np.minimum(ya, yb), np.maximum(xa, xb), np.maximum(ya, yb)], axis=1
    )


def view_shape(shape: tuple[int, int], scale: float, transform: Transform) -> tuple[int, int]:
    """(H, W) of the view of an image of this (H, W): resized by ``scale``, then transformed."""
    height, width = shape
    if scale != 1.0:
        height, width = max(1, round(height * scale)), max(1, round(width * scale))
    return (width, height) if transform[0] % 2 else (height, width)


def resize_maps(maps: np.ndarray, shape: tuple[int, int]) -> np.ndarray:
    """(C, h, w) maps resized (bilinear) to (C, *shape)."""
    if maps.shape[1:] == tuple(shape):
        return maps
    size = (shape[1], shape[0])
    return np.stack([cv2.resize(m, size, interpolation=cv2.INTER_LINEAR) for m in maps])
