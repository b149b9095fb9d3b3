"""Merging instances across views, folds and families, on hand-made instances."""

import numpy as np
import pytest
from skimage.draw import disk

from nucleiseg.inference.ensemble import detection_body, fuse_maps, labels_from_raws, merge_families
from nucleiseg.inference.family import confident_instances, get_family, scored_instances
from nucleiseg.inference.predictor import InferenceOptions
from nucleiseg.postprocessing.instances import (
    InstanceParams,
    Instances,
    SoftInstances,
    found_in,
    instances_to_labels,
    merge_views,
)
from nucleiseg.postprocessing.watershed import BODY, PostprocessParams

SHAPE = (64, 96)


def _disc(center, radius=7):
    mask = np.zeros(SHAPE, bool)
    mask[disk(center, radius, shape=SHAPE)] = True
    return mask


def _soft(masks, scores):
    return SoftInstances.from_instances(
        Instances.from_full_masks(np.array(masks), np.array(scores))
    )


def test_merge_views_votes_and_averages_masks():
    a, a_shifted, b, c = _disc((20, 20)), _disc((20, 21)), _disc((40, 60)), _disc((15, 80))
    view1 = _soft([a, b], [0.9, 0.6])
    view2 = _soft([a_shifted, c], [0.7, 0.8])
    merged = merge_views([view1, view2], iou_threshold=0.5, min_votes=1)
    assert len(merged) == 3
    # The disc both views found: one instance, mean score over both views, mean mask.
    both = int(np.argmax(merged.scores))
    assert merged.scores[both] == pytest.approx((0.9 + 0.7) / 2)
    y0, x0, y1, x1 = merged.boxes[both]
    full = np.zeros(SHAPE, np.float32)
    full[y0:y1, x0:x1] = merged.masks[both]
    np.testing.assert_allclose(full, (a.astype(np.float32) + a_shifted) / 2)
    # Found by one view of two: its score is halved, and a vote of 2 drops it.
    assert sorted(np.round(merged.scores, 3).tolist()) == [0.3, 0.4, 0.8]
    strict = merge_views([view1, view2], iou_threshold=0.5, min_votes=2)
    assert len(strict) == 1 and strict.scores[0] == pytest.approx(0.8)


def test_merge_views_does_not_depend_on_instance_order():
    rng = np.random.default_rng(0)
    centers = [tuple(rng.integers(10, [54, 86])) for _ in range(8)]
    views = [
        _soft([_disc((y + dy, x)) for y, x in centers], rng.uniform(0.5, 1, 8)) for dy in (0, 1, 2)
    ]
    expected = merge_views(views, 0.5, 2)
    for seed in range(3):
        order = np.random.default_rng(seed).permutation(8)
        shuffled = [v.subset(order) for v in views]
        got = merge_views(shuffled, 0.5, 2)
        assert sorted(got.scores.tolist()) == pytest.approx(sorted(expected.scores.tolist()))
        keep_all = InstanceParams(score_threshold=0.0)
        np.testing.assert_array_equal(
            instances_to_labels(got, keep_all) > 0, instances_to_labels(expected, keep_all) > 0
        )


def test_fold_ensembles_average_maps_and_vote_instances():
    maps = [np.full((3, 4, 4), 0.2), np.full((3, 4, 4), 0.6)]
    np.testing.assert_allclose(get_family("unetpp").combine(maps, InferenceOptions()), 0.4)
    a, b = _disc((20, 20)), _disc((40, 60))
    folds = [_soft([a, b], [0.9, 0.9]), _soft([a], [0.8]), _soft([a], [0.7])]
    voted = get_family("maskrcnn").combine(folds, InferenceOptions(vote_fraction=0.5))
    assert len(voted) == 1  # b was found by one fold of three
    assert voted.scores[0] == pytest.approx(0.8)


def test_family_merge_rules_on_hand_made_instances():
    a, a_shifted = _disc((20, 20), 8), _disc((20, 23), 8)
    only_unet, only_rcnn = _disc((45, 30)), _disc((30, 75))
    unet = _soft([a, only_unet], [0.95, 0.9])
    rcnn = _soft([a_shifted, only_rcnn], [0.8, 0.85])

    nms = merge_families([unet, rcnn], "nms", iou=0.5, min_size=8)
    assert len(np.unique(nms)) - 1 == 3
    np.testing.assert_array_equal(nms == nms[20, 20], a)  # the higher score wins whole

    vote = merge_families([unet, rcnn], "vote", iou=0.5, min_size=8)
    assert len(np.unique(vote)) - 1 == 3
    np.testing.assert_array_equal(vote == vote[20, 21], a | a_shifted)  # mean >= 0.5

    agree = merge_families([unet, rcnn], "agree", iou=0.5, min_size=8)
    assert len(np.unique(agree)) - 1 == 1 and agree[45, 30] == 0 and agree[30, 75] == 0

    # Overlapping nuclei that are different nuclei: every pixel gets one label.
    c, d = _disc((40, 60), 9), _disc((40, 72), 9)
    merged = merge_families([_soft([c], [0.9]), _soft([d], [0.8])], "nms", iou=0.5, min_size=8)
    np.testing.assert_array_equal(merged == merged[40, 60], c)
    np.testing.assert_array_equal(merged == merged[40, 75], d & ~c)
    with pytest.raises(ValueError, match="unknown family merge"):
        merge_families([unet], "mean", iou=0.5, min_size=8)


def test_fill_keeps_the_first_family_whole_and_adds_what_it_missed():
    a, a_shifted = _disc((20, 20), 8), _disc((20, 23), 8)
    only_unet, only_rcnn = _disc((45, 30)), _disc((30, 75))
    beside_a = _disc((20, 34), 7)  # a different nucleus that overlaps a a little
    unet = _soft([a, only_unet], [0.6, 0.6])
    rcnn = _soft([a_shifted, only_rcnn, beside_a], [0.99, 0.99, 0.99])
    assert found_in(rcnn.binarize(), unet.binarize(), 0.5).tolist() == [True, False, False]

    fill = merge_families([unet, rcnn], "fill", iou=0.5, min_size=8)
    assert len(np.unique(fill)) - 1 == 4
    np.testing.assert_array_equal(fill == fill[20, 20], a)  # lower scored, kept whole
    np.testing.assert_array_equal(fill == fill[30, 75], only_rcnn)
    np.testing.assert_array_equal(fill == fill[20, 36], beside_a & ~a)  # only its free pixels
    # The order of the sets decides which family comes first.
    swapped = merge_families([rcnn, unet], "fill", iou=0.5, min_size=8)
    np.testing.assert_array_equal(swapped == swapped[20, 20], a_shifted)
    assert len(np.unique(swapped)) - 1 == 4


def test_maps_blends_scored_detections_into_the_body_map():
    weak_true, lone_blob = _disc((20, 20), 8), _disc((40, 70), 8)
    maps = np.zeros((3, *SHAPE), np.float32)
    maps[BODY][weak_true] = 0.45  # below the 0.5 mask threshold: U-Net++ alone misses it
    maps[BODY][lone_blob] = 0.7  # a nucleus for U-Net++ alone, which Mask R-CNN does not see
    detections = _soft([weak_true, _disc((22, 20), 8)], [1.0, 0.5])
    body = detection_body(detections)
    assert body[20, 20] == 1.0 and body[29, 20] == 0.5 and body[40, 70] == 0.0
    fused = fuse_maps(maps, detections, weight=0.35)
    np.testing.assert_allclose(fused[BODY], 0.65 * maps[BODY] + 0.35 * body, atol=1e-6)
    np.testing.assert_array_equal(fused[1:], maps[1:])

    params = {"unetpp": PostprocessParams(), "maskrcnn": InstanceParams()}
    alone = labels_from_raws({"unetpp": [maps]}, params)
    assert alone[20, 20] == 0 and alone[40, 70] > 0
    both = labels_from_raws(
        {"unetpp": [maps], "maskrcnn": [detections]},
        params,
        InferenceOptions(family_merge="maps", map_weight=0.35),
    )
    assert both[20, 20] > 0 and both[40, 70] == 0
    np.testing.assert_array_equal(both > 0, weak_true)
    with pytest.raises(ValueError, match="map weight must be in"):
        fuse_maps(maps, detections, weight=1.5)


def test_family_instances_are_scored_and_thresholded():
    labels = np.zeros(SHAPE, np.int32)
    labels[_disc((20, 20))] = 1
    labels[_disc((40, 60))] = 2
    body = np.where(labels == 1, 0.9, np.where(labels == 2, 0.6, 0.0))
    scored = scored_instances(labels, body)
    assert sorted(scored.scores.tolist()) == pytest.approx([0.6, 0.9])
    soft = _soft([_disc((20, 20)), _disc((40, 60))], [0.9, 0.3])
    confident = confident_instances(soft, InstanceParams(score_threshold=0.5))
    assert len(confident) == 1 and confident.scores[0] == pytest.approx(0.9)
