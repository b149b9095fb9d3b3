"""Outline overlays for checking a segmentation by eye."""

import numpy as np
import pytest
from skimage.draw import disk

from nucleiseg.data.overlays import OUTLINE_RGB, draw_outlines, write_overlay
from nucleiseg.data.reading import read_image


def test_outlines_ring_each_nucleus_inside_it(tmp_path):
    labels = np.zeros((40, 60), np.int32)
    labels[disk((20, 20), 8)] = 1
    second = np.zeros_like(labels, bool)
    second[disk((20, 34), 8, shape=labels.shape)] = True
    labels[second & (labels == 0)] = 2  # touching the first
    image = np.full((40, 60, 3), 30, np.uint8)
    drawn = draw_outlines(image, labels)
    outline = np.all(drawn == OUTLINE_RGB, axis=-1)
    assert not outline[labels == 0].any()
    # Every nucleus pixel next to another label or the background is outlined, no other.
    for label in (1, 2):
        inside = labels == label
        padded = np.pad(inside, 1)
        interior = (
            inside & padded[:-2, 1:-1] & padded[2:, 1:-1] & padded[1:-1, :-2] & padded[1:-1, 2:]
        )
        np.testing.assert_array_equal(outline & inside, inside & ~interior)
    np.testing.assert_array_equal(drawn[~outline], image[~outline])
    write_overlay(tmp_path / "o.png", image, labels)
    np.testing.assert_array_equal(read_image(tmp_path / "o.png"), drawn)
    with pytest.raises(ValueError, match="differ in size"):
        draw_outlines(image, labels[:10])
