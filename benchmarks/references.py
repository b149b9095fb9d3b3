"""Straightforward reference implementations that the fast code is checked and timed against."""

from __future__ import annotations

import numpy as np


def per_object_encode(labels: np.ndarray) -> list[tuple[int, str]]:
    """Run-length encode a label image one object at a time: a full-image mask and diff each.

    Simple enough to trust, and slow: one pass over the image per object.
    """
    encoded = []
    for label in np.unique(labels):
        if label == 0:
            continue
        m = (labels == label).ravel(order="F").astype(np.int8)
        edges = np.diff(np.concatenate(([0], m, [0])))
        starts = np.flatnonzero(edges == 1) + 1
        lengths = np.flatnonzero(edges == -1) + 1 - starts
        text = " ".join(f"{s} {n}" for s, n in zip(starts, lengths, strict=True))
        encoded.append((int(label), text))
    return encoded
