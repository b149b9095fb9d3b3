"""Scored instances: duplicates suppressed, overlaps resolved, independent of input order."""

import numpy as np
import pytest
from skimage.draw import disk

from nucleiseg.competition.metric import average_precision
from nucleiseg.postprocessing.instances import (
    InstanceParams,
    Instances,
    instances_to_labels,
    mask_iou,
    resolve_overlaps,
    suppress_duplicates,
)

SHAPE = (64, 80)


def _disc(center, radius=8) -> np.ndarray:
    mask = np.zeros(SHAPE, bool)
    mask[disk(center, radius, shape=SHAPE)] = True
    return mask


def _instances(masks, scores) -> Instances:
    return Instances.from_full_masks(np.stack(masks), np.asarray(scores, float))


def test_duplicates_are_suppressed_keeping_the_highest_score():
    a = _disc((20, 20))
    shifted = np.roll(a, 1, axis=1)  # IoU with a well above 0.5, boxes overlap
    other = _disc((40, 55))
    kept = suppress_duplicates(_instances([shifted, a, other], [0.8, 0.9, 0.7]))
    assert kept.scores.tolist() == [0.9, 0.7]
    assert mask_iou(kept, 0, _instances([a], [1.0]), 0) == 1.0


def test_overlaps_go_to_the_higher_score_and_labels_are_disjoint():
    low, high = _disc((30, 30), 10), _disc((30, 44), 10)  # IoU well below 0.5: both kept
    labels = instances_to_labels(_instances([low, high], [0.6, 0.95]))
    assert sorted(np.unique(labels).tolist()) == [0, 1, 2]
    np.testing.assert_array_equal(labels == 1, high)  # label 1 = highest score, whole
    np.testing.assert_array_equal(labels == 2, low & ~high)


def test_score_threshold_and_small_remnants_are_dropped():
    big = _disc((30, 30), 10)
    inside = _disc((30, 30), 9) & ~_disc((30, 30), 8)  # a ring inside the big disc
    faint = _disc((10, 70), 5)
    labels = instances_to_labels(
        _instances([big, inside, faint], [0.9, 0.8, 0.3]),
        InstanceParams(score_threshold=0.5, min_size=8),
    )
    # The ring loses every pixel to the big disc; the faint disc is below threshold.
    assert np.unique(labels).tolist() == [0, 1]
    np.testing.assert_array_equal(labels == 1, big)


def test_a_given_painting_order_overrides_the_scores():
    low, high = _disc((30, 30), 10), _disc((30, 44), 10)
    both = Instances.concatenate([_instances([low], [0.6]), _instances([high], [0.95])])
    labels = resolve_overlaps(both, min_size=8, order=np.array([0, 1]))
    np.testing.assert_array_equal(labels == 1, low)  # painted first, keeps the shared pixels
    np.testing.assert_array_equal(labels == 2, high & ~low)
    with pytest.raises(ValueError, match="each of the 2 instances once"):
        resolve_overlaps(both, order=np.array([1, 1]))


def test_result_does_not_depend_on_input_order():
    rng = np.random.default_rng(0)
    masks = [_disc(tuple(rng.integers(10, 54, 2)), int(rng.integers(5, 12))) for _ in range(12)]
    scores = np.round(rng.uniform(0.5, 1.0, 12), 1)  # ties on purpose
    expected = instances_to_labels(_instances(masks, scores))
    for seed in range(5):
        order = np.random.default_rng(seed).permutation(12)
        shuffled = _instances([masks[i] for i in order], scores[order])
        np.testing.assert_array_equal(instances_to_labels(shuffled), expected)


def test_label_image_round_trip():
    labels = np.zeros(SHAPE, np.int32)
    for label, center in [(3, (15, 15)), (9, (40, 30)), (4, (30, 65))]:
        labels[_disc(center, 7)] = label
    recovered = instances_to_labels(Instances.from_labels(labels))
    assert average_precision(labels, recovered).score == 1.0


def test_instances_check_their_boxes_and_masks():
    with pytest.raises(ValueError, match="outside the image"):
        Instances((10, 10), np.ones(1), np.array([[0, 0, 11, 5]]), (np.ones((11, 5), bool),))
    with pytest.raises(ValueError, match="does not fit box"):
        Instances((10, 10), np.ones(1), np.array([[0, 0, 4, 5]]), (np.ones((5, 5), bool),))
    assert not instances_to_labels(Instances.empty(SHAPE)).any()
