import numpy as np
import pytest
from skimage.draw import disk, rectangle
from skimage.morphology import erosion
from skimage.segmentation import expand_labels

from nucleiseg.competition.metric import (
    THRESHOLDS,
    ImageScore,
    average_precision,
    label_overlap,
    mean_average_precision,
)

SHAPE = (100, 100)


def disc(center: tuple[int, int], radius: int) -> np.ndarray:
    mask = np.zeros(SHAPE, dtype=bool)
    mask[disk(center, radius, shape=SHAPE)] = True
    return mask


def reference_score(truth: np.ndarray, pred: np.ndarray) -> tuple[np.ndarray, ...]:
    """tp, fp, fn per threshold, by the competition's rule on a dense IoU matrix.

    Float IoU against float k / 20 is exact at these sizes: a ratio of pixel counts
    differs from k / 20 by at least 1 / (20 * union), far above rounding error, and
    an equal ratio rounds to the same double.
    """
    true_ids = [i for i in np.unique(truth) if i > 0]
    pred_ids = [j for j in np.unique(pred) if j > 0]
    iou = np.zeros((len(true_ids), len(pred_ids)))
    for a, i in enumerate(true_ids):
        for b, j in enumerate(pred_ids):
            t, p = truth == i, pred == j
            iou[a, b] = np.sum(t & p) / np.sum(t | p)
    tp, fp, fn = [], [], []
    for t in np.arange(10, 20) / 20:
        matches = iou > t
        tp.append(np.sum(matches.sum(axis=1) == 1))
        fp.append(np.sum(matches.sum(axis=0) == 0))
        fn.append(np.sum(matches.sum(axis=1) == 0))
    return np.array(tp), np.array(fp), np.array(fn)


def reference_precision(tp, fp, fn) -> float:
    total = tp + fp + fn
    return float(np.mean(np.where(total > 0, tp / np.maximum(total, 1), 1.0)))


def random_pair(seed: int) -> tuple[np.ndarray, np.ndarray]:
    """A random truth label image and an imperfect prediction of it."""
    rng = np.random.default_rng(seed)
    shape = tuple(int(s) for s in rng.integers(9, 90, size=2))
    truth = np.zeros(shape, dtype=np.int64)
    for label in range(1, rng.integers(0, 14) + 1):
        if rng.random() < 0.5:
            center = rng.integers(0, shape)
            coords = disk(center, rng.uniform(1, 12), shape=shape)
        else:
            start = rng.integers(0, shape)
            coords = rectangle(start, extent=rng.integers(1, 20, size=2), shape=shape)
        truth[coords] = label  # later objects cover earlier ones: odd shapes, some vanish

    change = rng.integers(4)
    if change == 0:
        pred = np.roll(truth, tuple(rng.integers(-4, 5, size=2)), axis=(0, 1))
    elif change == 1:
        pred = expand_labels(truth, distance=rng.integers(1, 4))
    elif change == 2:
        pred = erosion(truth, np.ones((3, 3), dtype=bool))
    else:
        pred = truth.copy()
    for label in np.unique(pred)[1:]:
        if rng.random() < 0.15:
            pred[pred == label] = 0
    for label in range(100, 100 + rng.integers(0, 3)):
        pred[disk(rng.integers(0, shape), rng.uniform(1, 8), shape=shape)] = label
    return relabel(truth, rng), relabel(pred, rng)


def relabel(labels: np.ndarray, rng: np.random.Generator, dtype=np.int64) -> np.ndarray:
    """Map each object to a distinct random label, large and non-consecutive."""
    ids = np.unique(labels)
    ids = ids[ids > 0]
    info = np.iinfo(dtype)
    new_ids = rng.choice(min(info.max, 2**31 - 1), size=len(ids), replace=False) + 1
    out = np.zeros(labels.shape, dtype=dtype)
    for old, new in zip(ids, new_ids, strict=True):
        out[labels == old] = new
    return out


def test_thresholds():
    np.testing.assert_allclose(THRESHOLDS, np.arange(10, 20) * 0.05)
    assert THRESHOLDS.dtype == np.float64


def test_discs_shifted_missed_and_spurious():
    truth = np.zeros(SHAPE, dtype=np.int32)
    truth[disc((30, 30), 10)] = 1
    truth[disc((30, 70), 10)] = 2
    truth[disc((70, 70), 8)] = 3  # missed
    pred = np.zeros(SHAPE, dtype=np.int32)
    pred[np.roll(disc((30, 30), 10), 3, axis=1)] = 7
    pred[np.roll(disc((30, 70), 10), 5, axis=0)] = 4
    pred[disc((75, 20), 6)] = 9  # spurious

    overlap = label_overlap(truth, pred)
    np.testing.assert_array_equal(overlap.true_area, [305, 305, 193])
    # Disc 1 shifted by 3 px: 248 / 362 = 0.685, a hit at 0.50..0.65 only;
    # disc 2 shifted by 5 px: 210 / 400 = 0.525, a hit at 0.50 only.
    np.testing.assert_array_equal(overlap.intersection, [248, 210])
    np.testing.assert_array_equal(overlap.union(), [362, 400])

    result = average_precision(truth, pred)
    expected_tp = np.array([2, 1, 1, 1, 0, 0, 0, 0, 0, 0])
    np.testing.assert_array_equal(result.tp, expected_tp)
    np.testing.assert_array_equal(result.fp, 3 - expected_tp)
    np.testing.assert_array_equal(result.fn, 3 - expected_tp)
    assert (result.n_true, result.n_pred) == (3, 3)
    assert result.tp.dtype == result.fp.dtype == result.fn.dtype == np.int64
    # tp / (tp + fp + fn) = tp / (6 - tp): 2/4 once, 1/5 three times.
    assert result.score == pytest.approx((2 / 4 + 3 * 1 / 5) / 10, abs=1e-15)
    np.testing.assert_allclose(result.precision, expected_tp / (6 - expected_tp))


def test_area_ratio_of_the_nuclei_matched_at_iou_one_half():
    truth = np.zeros(SHAPE, dtype=np.int32)
    truth[disc((30, 30), 10)] = 1  # 305 px
    truth[disc((30, 70), 10)] = 2  # 305 px
    truth[disc((70, 70), 8)] = 3  # missed: not in the ratio
    pred = np.zeros(SHAPE, dtype=np.int32)
    pred[disc((30, 30), 12)] = 5  # grown: IoU 305 / 437 = 0.70
    pred[disc((30, 70), 9)] = 6  # shrunk: IoU 249 / 305 = 0.82
    pred[disc((75, 20), 6)] = 9  # spurious: not in the ratio
    areas = [int(disc((50, 50), r).sum()) for r in (10, 12, 9)]
    assert areas == [305, 437, 249]
    result = average_precision(truth, pred)
    assert result.tp[0] == 2
    assert result.area_ratio == pytest.approx(np.sqrt(437 / 305 * 249 / 305), abs=1e-12)
    assert np.isnan(average_precision(truth, np.zeros_like(truth)).area_ratio)


def test_identical_images_score_one():
    truth = np.zeros(SHAPE, dtype=np.int32)
    truth[disc((30, 30), 10)] = 1
    truth[disc((70, 60), 12)] = 2
    result = average_precision(truth, truth)
    np.testing.assert_array_equal(result.tp, 2)
    np.testing.assert_array_equal(result.fp, 0)
    assert result.score == 1.0


@pytest.mark.parametrize(
    ("pred_rows", "hits"),
    [
        (3, 5),  # IoU 30/40 = 0.75 exactly: hits at 0.50..0.70, not at 0.75
        (2, 0),  # IoU 20/40 = 0.50 exactly: not a hit even at 0.50
    ],
)
def test_iou_exactly_at_threshold_is_not_a_hit(pred_rows, hits):
    truth = np.zeros((8, 12), dtype=np.uint16)
    truth[2:6, 1:11] = 1  # 4 x 10 px
    pred = np.zeros_like(truth)
    pred[2 : 2 + pred_rows, 1:11] = 1  # inside the truth rectangle
    result = average_precision(truth, pred)
    expected_tp = (np.arange(10) < hits).astype(np.int64)
    np.testing.assert_array_equal(result.tp, expected_tp)
    np.testing.assert_array_equal(result.fp, 1 - expected_tp)
    np.testing.assert_array_equal(result.fn, 1 - expected_tp)


def test_both_empty_scores_one():
    empty = np.zeros(SHAPE, dtype=np.int32)
    result = average_precision(empty, empty)
    assert result.score == 1.0
    assert (result.n_true, result.n_pred) == (0, 0)
    for counts in (result.tp, result.fp, result.fn):
        np.testing.assert_array_equal(counts, np.zeros(10))
    np.testing.assert_array_equal(result.precision, np.ones(10))
    assert average_precision(np.zeros((0, 0), int), np.zeros((0, 0), int)).score == 1.0


def test_one_empty_scores_zero_both_ways():
    labels = np.zeros(SHAPE, dtype=np.int32)
    labels[disc((30, 30), 10)] = 4
    labels[disc((70, 70), 10)] = 8
    empty = np.zeros_like(labels)

    missed_all = average_precision(labels, empty)
    assert missed_all.score == 0.0
    np.testing.assert_array_equal(missed_all.tp, 0)
    np.testing.assert_array_equal(missed_all.fp, 0)
    np.testing.assert_array_equal(missed_all.fn, 2)

    all_spurious = average_precision(empty, labels)
    assert all_spurious.score == 0.0
    np.testing.assert_array_equal(all_spurious.tp, 0)
    np.testing.assert_array_equal(all_spurious.fp, 2)
    np.testing.assert_array_equal(all_spurious.fn, 0)


@pytest.mark.parametrize(
    ("truth_dtype", "pred_dtype"),
    [(np.uint16, np.uint16), (np.int32, np.int32), (np.int64, np.uint32), (np.uint32, np.int64)],
)
def test_invariant_to_relabelling_and_dtype(truth_dtype, pred_dtype):
    truth, pred = random_pair(seed=7)
    baseline = average_precision(truth, pred)
    rng = np.random.default_rng(1)
    result = average_precision(relabel(truth, rng, truth_dtype), relabel(pred, rng, pred_dtype))
    for name in ("tp", "fp", "fn"):
        np.testing.assert_array_equal(getattr(result, name), getattr(baseline, name))
    assert result.score == baseline.score


def test_bool_images_are_one_object():
    truth = disc((50, 50), 10)
    result = average_precision(truth, np.roll(truth, 3, axis=1))
    np.testing.assert_array_equal(result.tp, [1, 1, 1, 1, 0, 0, 0, 0, 0, 0])


@pytest.mark.parametrize("seed", range(50))
def test_matches_dense_reference(seed):
    truth, pred = random_pair(seed)
    tp, fp, fn = reference_score(truth, pred)
    result = average_precision(truth, pred)
    np.testing.assert_array_equal(result.tp, tp)
    np.testing.assert_array_equal(result.fp, fp)
    np.testing.assert_array_equal(result.fn, fn)
    assert abs(result.score - reference_precision(tp, fp, fn)) < 1e-12

    # The contingency itself against np.unique over stacked label pairs.
    overlap = label_overlap(truth, pred)
    pairs, counts = np.unique(np.stack([truth.ravel(), pred.ravel()]), axis=1, return_counts=True)
    both = (pairs[0] > 0) & (pairs[1] > 0)
    np.testing.assert_array_equal(overlap.true_ids[overlap.pair_true], pairs[0, both])
    np.testing.assert_array_equal(overlap.pred_ids[overlap.pair_pred], pairs[1, both])
    np.testing.assert_array_equal(overlap.intersection, counts[both])


def test_label_overlap_hand_case():
    truth = np.array(
        [
            [0, 5, 5, 0],
            [0, 5, 5, 0],
            [9, 9, 0, 0],
        ],
        dtype=np.int32,
    )
    pred = np.array(
        [
            [2, 2, 0, 0],
            [0, 2, 1, 1],
            [0, 1, 1, 0],
        ],
        dtype=np.int32,
    )
    overlap = label_overlap(truth, pred)
    np.testing.assert_array_equal(overlap.true_ids, [5, 9])
    np.testing.assert_array_equal(overlap.pred_ids, [1, 2])
    assert overlap.true_ids.dtype == np.int32
    np.testing.assert_array_equal(overlap.true_area, [4, 2])
    np.testing.assert_array_equal(overlap.pred_area, [4, 3])
    # Pairs (5, 1): 1 px, (5, 2): 2 px, (9, 1): 1 px; sorted by truth, then pred.
    np.testing.assert_array_equal(overlap.pair_true, [0, 0, 1])
    np.testing.assert_array_equal(overlap.pair_pred, [0, 1, 0])
    np.testing.assert_array_equal(overlap.intersection, [1, 2, 1])
    np.testing.assert_array_equal(overlap.union(), [7, 5, 5])
    np.testing.assert_allclose(overlap.iou(), [1 / 7, 2 / 5, 1 / 5])


def test_label_overlap_grows_its_table():
    # Thousands of distinct pairs: well past the table's initial capacity.
    rng = np.random.default_rng(0)
    truth = rng.integers(0, 2**40, size=(60, 70))
    pred = rng.integers(0, 3, size=truth.shape)
    overlap = label_overlap(truth, pred)
    pairs, counts = np.unique(np.stack([truth.ravel(), pred.ravel()]), axis=1, return_counts=True)
    both = (pairs[0] > 0) & (pairs[1] > 0)
    np.testing.assert_array_equal(overlap.true_ids[overlap.pair_true], pairs[0, both])
    np.testing.assert_array_equal(overlap.intersection, counts[both])
    assert overlap.true_area.sum() == np.count_nonzero(truth)


@pytest.mark.parametrize(
    ("truth", "pred", "message"),
    [
        (np.zeros((4, 4)), np.zeros((4, 4), int), "truth must have an integer dtype"),
        (np.zeros((4, 4), int), np.zeros((4, 4), np.float32), "pred must have an integer dtype"),
        (np.zeros((4, 4, 1), int), np.zeros((4, 4), int), "truth must be a 2-D"),
        (np.zeros((4, 4), int), np.zeros(16, int), "pred must be a 2-D"),
        (np.zeros((4, 4), int), np.zeros((4, 5), int), "shapes differ"),
        (np.full((4, 4), -1), np.zeros((4, 4), int), "truth has negative labels"),
        (np.zeros((4, 4), int), np.eye(4, dtype=int) * -3, "pred has negative labels"),
    ],
)
def test_bad_input_raises(truth, pred, message):
    with pytest.raises(ValueError, match=message):
        average_precision(truth, pred)


def test_mean_average_precision():
    truth = np.zeros(SHAPE, dtype=np.int32)
    truth[disc((50, 50), 10)] = 1
    scores = [average_precision(truth, truth), average_precision(truth, np.zeros_like(truth))]
    assert mean_average_precision(scores) == 0.5
    assert mean_average_precision(iter(scores)) == 0.5
    assert isinstance(scores[0], ImageScore)
    with pytest.raises(ValueError, match="at least one"):
        mean_average_precision([])
