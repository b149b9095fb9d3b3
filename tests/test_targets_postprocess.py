"""Targets drawn from labels, and labels recovered from targets by the watershed."""

import numpy as np
import pytest
from skimage.draw import disk

from nucleiseg.competition.metric import average_precision
from nucleiseg.data.targets import TargetParams, make_targets
from nucleiseg.postprocessing.watershed import PostprocessParams, instances_from_probabilities


def _discs(centers, radius, shape=(64, 96)) -> np.ndarray:
    labels = np.zeros(shape, np.int32)
    for label, center in enumerate(centers, start=1):
        labels[disk(center, radius, shape=shape)] = label
    return labels


SEPARATE = _discs([(16, 16), (20, 60), (46, 36), (48, 80)], radius=9)
# Radius 10, centres 19 px apart on one row: the discs share a one-pixel-wide contact.
TOUCHING = _discs([(32, 30), (32, 49), (32, 68)], radius=10)


def test_body_is_the_foreground_and_border_a_ring_of_scaled_width():
    targets = make_targets(SEPARATE, TargetParams(border_fraction=0.25, border_min=1, border_max=4))
    body, border, separation = targets
    np.testing.assert_array_equal(body, SEPARATE > 0)
    assert not separation.any()  # the discs are far apart
    # disk() of radius 9 spans 17 pixels of its centre row. Border width
    # 0.25 * sqrt(area / pi) is about 2.2, so the ring holds the pixels at
    # distance 1 and 2 from the outside: 2 pixels on each side.
    row = border[16, 16 - 9 : 16 + 10]
    assert row.tolist() == [0, 1, 1] + [0] * 13 + [1, 1, 0]
    assert not (border & ~body).any()


def test_border_width_follows_nucleus_size():
    small_and_large = _discs([(16, 16)], radius=4) + 2 * _discs([(32, 60)], radius=24)
    border = make_targets(small_and_large)[1]
    assert border[16, 16 - 4 : 16 + 5].tolist() == [0, 1, 0, 0, 0, 0, 0, 1, 0]  # width 1
    assert border[32, 35:43].tolist() == [0, 0, 1, 1, 1, 1, 0, 0]  # width 4 (capped)


def test_separation_marks_the_contact_between_touching_nuclei_only():
    separation = make_targets(TOUCHING)[2]
    # The first contact is between columns 39 (label 1) and 40 (label 2); radius 2
    # marks two pixels on either side of it, and likewise at the second contact.
    assert np.flatnonzero(separation[32]).tolist() == [38, 39, 40, 41, 57, 58, 59, 60]
    assert not separation[:, :30].any() and not separation[:20].any()


@pytest.mark.parametrize("labels", [SEPARATE, TOUCHING], ids=["separate", "touching"])
def test_labels_to_targets_to_watershed_recovers_every_nucleus(labels):
    probabilities = make_targets(labels).astype(np.float32)
    recovered = instances_from_probabilities(probabilities, PostprocessParams())
    result = average_precision(labels, recovered)
    assert result.n_pred == result.n_true
    assert result.score == 1.0


def test_holes_inside_one_nucleus_are_filled_gaps_between_nuclei_are_not():
    probabilities = make_targets(TOUCHING).astype(np.float32)
    probabilities[0, 30:33, 28:31] = 0.0  # a hole in the first nucleus
    labels = instances_from_probabilities(probabilities)
    assert (labels[30:33, 28:31] == labels[32, 25]).all()


def test_postprocess_rejects_wrong_shapes_and_returns_consecutive_labels():
    with pytest.raises(ValueError, match=r"shape \(3, H, W\)"):
        instances_from_probabilities(np.zeros((2, 8, 8), np.float32))
    labels = instances_from_probabilities(make_targets(SEPARATE).astype(np.float32))
    assert sorted(np.unique(labels).tolist()) == [0, 1, 2, 3, 4]
    assert not instances_from_probabilities(np.zeros((3, 16, 16), np.float32)).any()
