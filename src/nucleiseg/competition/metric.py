"""The DSB 2018 competition metric, computed exactly from two label images.

Per image, every ground-truth object is compared with every predicted object by
intersection over union (IoU). At each threshold t in 0.50, 0.55, ..., 0.95 a
pair is a hit when IoU > t (strictly), and the image scores
TP / (TP + FP + FN) at t; the image score is the mean over the ten thresholds
and the dataset score is the mean over images.

Overlaps are counted in one pass over the pixels by a numba kernel that builds
a hashed contingency table of (truth label, predicted label) pairs, so time is
linear in the pixels and memory linear in the number of distinct pairs, with no
dense n_true x n_pred matrix and no dependence on how large the label values are.
Thresholds are compared in integers (t = k / 20), so an IoU of exactly 0.75
is never a hit at 0.75 whatever floating point would have said.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass

import numpy as np
from numba import njit, types
from numba.extending import overload

# Threshold t = k / 20 for k = 10..19; IoU > t is tested as 20 * inter > k * union.
_THRESHOLD_DENOMINATOR = 20
_THRESHOLD_NUMERATORS = np.arange(10, 20, dtype=np.int64)
THRESHOLDS: np.ndarray = _THRESHOLD_NUMERATORS / _THRESHOLD_DENOMINATOR

# Small enough to be free for an empty image, large enough that typical images
# (a few hundred objects, so a few hundred to a thousand pairs) never grow it.
_INITIAL_CAPACITY = 1024

# Columns of the hash table: one row per slot, so a probe reads one place, not three arrays.
_KEY_TRUE, _KEY_PRED, _COUNT = 0, 1, 2

# Pixels compared at once when skipping along a run.
_BLOCK = 8

# Bits of the kernel's status flag, naming the image that held a negative label.
_NEGATIVE_TRUTH = 1
_NEGATIVE_PRED = 2


@dataclass(frozen=True, eq=False)  # eq=False: field-wise == on arrays has no single truth value
class Overlap:
    """Sparse contingency of two label images: object areas and pairwise intersections.

    Attributes:
        true_ids: Sorted labels (> 0) present in the ground truth.
        pred_ids: Sorted labels (> 0) present in the prediction.
        true_area: Pixel count of each ground-truth object, aligned with ``true_ids``.
        pred_area: Pixel count of each predicted object, aligned with ``pred_ids``.
        pair_true: For every overlapping pair, its index into ``true_ids``.
        pair_pred: For every overlapping pair, its index into ``pred_ids``.
        intersection: Pixels shared by each pair (all > 0), int64.
    """

    true_ids: np.ndarray
    pred_ids: np.ndarray
    true_area: np.ndarray
    pred_area: np.ndarray
    pair_true: np.ndarray
    pair_pred: np.ndarray
    intersection: np.ndarray

    def union(self) -> np.ndarray:
        """Pixels covered by either object of each pair, int64, aligned with ``intersection``."""
        return self.true_area[self.pair_true] + self.pred_area[self.pair_pred] - self.intersection

    def iou(self) -> np.ndarray:
        """Intersection over union of each pair, float64, aligned with ``intersection``."""
        return self.intersection / self.union()


@dataclass(frozen=True, eq=False)
class ImageScore:
    """Matching counts and score of one image, one entry per threshold in ``THRESHOLDS``.

    Attributes:
        tp: Pairs with IoU above the threshold, int64, shape (10,).
        fp: Predicted objects matched to no ground-truth object, int64, shape (10,).
        fn: Ground-truth objects matched to no predicted object, int64, shape (10,).
        n_true: Number of ground-truth objects.
        n_pred: Number of predicted objects.
        score: Mean over thresholds of tp / (tp + fp + fn).
        area_ratio: Outline size: the geometric mean, over the pairs matched at IoU > 0.5,
            of the predicted object's area over the true one's (above 1: outlines too
            large); NaN when nothing matched. Not part of the metric.
    """

    tp: np.ndarray
    fp: np.ndarray
    fn: np.ndarray
    n_true: int
    n_pred: int
    score: float
    area_ratio: float = float("nan")

    @property
    def precision(self) -> np.ndarray:
        """The competition's per-threshold "precision" tp / (tp + fp + fn), float64, shape (10,)."""
        return _precision(self.tp, self.fp, self.fn)


def label_overlap(truth: np.ndarray, pred: np.ndarray) -> Overlap:
    """Count object areas and pairwise intersections of two label images in one pass.

    Args:
        truth: Ground-truth label image, 2-D, any integer dtype (or bool, read as
            one object), 0 = background; labels need not be consecutive.
        pred: Predicted label image, same shape and rules as ``truth``.

    Returns:
        The sparse contingency of the two images. Ids keep the input's dtype
        (uint8 for bool); areas and intersections are int64; pairs are sorted by
        (truth index, prediction index).

    Raises:
        ValueError: If an image is not 2-D, has a non-integer dtype or a negative
            label, or if the shapes differ.
    """
    truth = _check_label_image(truth, "truth")
    pred = _check_label_image(pred, "pred")
    if truth.shape != pred.shape:
        raise ValueError(f"truth and pred shapes differ: {truth.shape} vs {pred.shape}")

    pairs, negative = _pair_counts(truth.ravel(), pred.ravel())
    if negative & _NEGATIVE_TRUTH:
        raise ValueError("truth has negative labels; labels must be >= 0 (0 = background)")
    if negative & _NEGATIVE_PRED:
        raise ValueError("pred has negative labels; labels must be >= 0 (0 = background)")

    counts = pairs[:, _COUNT].astype(np.int64)
    # Entries with a background side still carry object pixels, so the areas come
    # from all entries and the intersections only from those with both labels > 0.
    true_ids, true_index, true_area = _objects(pairs[:, _KEY_TRUE], counts)
    pred_ids, pred_index, pred_area = _objects(pairs[:, _KEY_PRED], counts)
    both = (true_index >= 0) & (pred_index >= 0)
    pair_true = true_index[both]
    pair_pred = pred_index[both]
    order = np.argsort(pair_true * len(pred_ids) + pair_pred)
    return Overlap(
        true_ids=true_ids.astype(truth.dtype),
        pred_ids=pred_ids.astype(pred.dtype),
        true_area=true_area,
        pred_area=pred_area,
        pair_true=pair_true[order],
        pair_pred=pair_pred[order],
        intersection=counts[both][order],
    )


def average_precision(truth: np.ndarray, pred: np.ndarray) -> ImageScore:
    """Score one image with the DSB 2018 competition metric.

    If both images are empty (no object at all) the score is 1.0, since there
    was nothing to find and nothing was claimed; if exactly one is empty it is
    0.0 (every object is a false positive or a false negative).

    Args:
        truth: Ground-truth label image (see ``label_overlap`` for the rules).
        pred: Predicted label image, same shape.

    Returns:
        tp, fp, fn per threshold and the image score.

    Raises:
        ValueError: On invalid label images (see ``label_overlap``).
    """
    overlap = label_overlap(truth, pred)
    n_true, n_pred = len(overlap.true_ids), len(overlap.pred_ids)
    # Objects within one label image are disjoint, and IoU > t >= 0.5 means the pair
    # shares more than half of each object; two disjoint partners cannot both do
    # that. So above 0.5 matches are one-to-one: every hit pair is a TP, and the
    # unmatched objects on either side are exactly the FP and FN.
    inter = overlap.intersection
    union = overlap.union()
    hits = (
        _THRESHOLD_DENOMINATOR * inter[np.newaxis, :]
        > _THRESHOLD_NUMERATORS[:, np.newaxis] * union[np.newaxis, :]
    )
    tp = hits.sum(axis=1, dtype=np.int64)
    fp = n_pred - tp
    fn = n_true - tp
    matched = hits[0]
    ratios = (
        overlap.pred_area[overlap.pair_pred[matched]]
        / overlap.true_area[overlap.pair_true[matched]]
    )
    return ImageScore(
        tp=tp,
        fp=fp,
        fn=fn,
        n_true=n_true,
        n_pred=n_pred,
        score=float(_precision(tp, fp, fn).mean()),
        area_ratio=float(np.exp(np.log(ratios).mean())) if len(ratios) else float("nan"),
    )


def mean_average_precision(scores: Iterable[ImageScore]) -> float:
    """Dataset score: the mean of the per-image scores.

    Args:
        scores: One ``ImageScore`` per image.

    Returns:
        The mean of their ``score``.

    Raises:
        ValueError: If ``scores`` is empty.
    """
    values = [s.score for s in scores]
    if not values:
        raise ValueError("mean_average_precision needs at least one image score")
    return float(np.mean(values))


def _precision(tp: np.ndarray, fp: np.ndarray, fn: np.ndarray) -> np.ndarray:
    total = tp + fp + fn
    # total == 0 only when both images are empty: a perfect answer to an empty image.
    return np.divide(tp, total, out=np.ones(total.shape), where=total > 0)


def _check_label_image(image: np.ndarray, name: str) -> np.ndarray:
    image = np.asarray(image)
    if image.ndim != 2:
        raise ValueError(f"{name} must be a 2-D label image, got {image.ndim} dimensions")
    if image.dtype == np.bool_:
        return image.view(np.uint8)
    if not np.issubdtype(image.dtype, np.integer):
        raise ValueError(f"{name} must have an integer dtype (labels), got {image.dtype}")
    if not image.dtype.isnative:
        # numba compiles for native byte order only.
        return image.astype(image.dtype.newbyteorder("="))
    return image


def _objects(keys: np.ndarray, counts: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Object ids, each entry's index into them (-1 for background), and object areas."""
    ids, index = np.unique(keys, return_inverse=True)
    # bincount sums in float64, exact here: pixel counts stay far below 2**53.
    area = np.bincount(index, weights=counts, minlength=len(ids)).astype(np.int64)
    if len(ids) > 0 and ids[0] == 0:
        return ids[1:], index - 1, area[1:]
    return ids, index, area


def _is_negative(value):
    return value < 0


@overload(_is_negative)
def _is_negative_overload(value):
    # Resolved at compile time, so unsigned images pay nothing for the check.
    if isinstance(value, types.Integer) and not value.signed:
        return lambda value: False
    return lambda value: value < 0


@njit
def _hash(key_true, key_pred):
    # splitmix64 finaliser over a combination of both labels: small consecutive
    # labels would otherwise all land in a few neighbouring slots.
    h = key_true * np.uint64(0x9E3779B97F4A7C15) ^ key_pred
    h = (h ^ (h >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
    h = (h ^ (h >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
    return h ^ (h >> np.uint64(31))


@njit
def _insert(table, key_true, key_pred, count):
    """Add ``count`` to the pair's slot; return 1 if the pair was new, else 0."""
    mask = np.uint64(table.shape[0] - 1)
    slot = _hash(key_true, key_pred) & mask
    while True:
        row = table[slot]
        # A count of 0 marks a free slot: every inserted pair has count >= 1.
        if row[_COUNT] == 0:
            row[_KEY_TRUE] = key_true
            row[_KEY_PRED] = key_pred
            row[_COUNT] = count
            return 1
        if row[_KEY_TRUE] == key_true and row[_KEY_PRED] == key_pred:
            row[_COUNT] += count
            return 0
        slot = (slot + np.uint64(1)) & mask


@njit
def _grow(table):
    grown = np.zeros((2 * table.shape[0], 3), dtype=np.uint64)
    for row in table:
        if row[_COUNT] > 0:
            _insert(grown, row[_KEY_TRUE], row[_KEY_PRED], row[_COUNT])
    return grown


@njit
def _count_runs(table, used, negative, truth, pred, start):
    """Count runs of equal pairs from pixel ``start`` until the end or a half-full table.

    Returns the pixel where counting stopped (``truth.size`` when done), the used
    slots and the sign flag. Stopping between runs lets the caller grow the table
    and resume, so this loop never replaces the table it writes to.
    """
    n = truth.size
    i = start
    while i < n:
        # Keep the table at most half full so probe sequences stay short.
        if 2 * (used + 1) > table.shape[0]:
            break
        t = truth[i]
        p = pred[i]
        # Neighbouring pixels along a row almost always repeat the pair, so each
        # run touches the table once instead of each pixel.
        j = i + 1
        # Long runs (background, mostly) are checked a block at a time without
        # early exit, which the compiler can turn into vector compares.
        while j + _BLOCK <= n:
            same = True
            for k in range(j, j + _BLOCK):
                same &= (truth[k] == t) & (pred[k] == p)
            if not same:
                break
            j += _BLOCK
        while j < n and truth[j] == t and pred[j] == p:
            j += 1
        # Every label value starts some run, so this is the one place to test its
        # sign: no separate pass over the pixels.
        if _is_negative(t):
            negative |= _NEGATIVE_TRUTH
        if _is_negative(p):
            negative |= _NEGATIVE_PRED
        used += _insert(table, np.uint64(t), np.uint64(p), np.uint64(j - i))
        i = j
    return i, used, negative


@njit(cache=True, nogil=True)
def _pair_counts(truth, pred):
    """Pixel count of every distinct (truth, pred) label pair, background included.

    Returns the filled rows of the table as (truth label, pred label, count),
    all uint64, and a flag whose bits say which image held a negative label.
    """
    table = np.zeros((_INITIAL_CAPACITY, 3), dtype=np.uint64)
    used = 0
    negative = 0
    start = 0
    while True:
        start, used, negative = _count_runs(table, used, negative, truth, pred, start)
        if start == truth.size:
            break
        table = _grow(table)
    return table[table[:, _COUNT] > 0], negative
