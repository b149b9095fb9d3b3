"""Scored instance masks: suppression of duplicates and resolution into one label image.

Detection models (Mask R-CNN), test-time views and ensembles of families all
produce *scored instances*, masks that may overlap and repeat one another. This
module turns them into a label image where every pixel belongs to at most one
nucleus:

1. drop instances below a score threshold;
2. suppress duplicates: boxes first (cheap), then masks, an instance being
   dropped when its mask overlaps a higher-scored kept one by more than an
   IoU threshold;
3. paint the survivors from the highest score down, each taking only the pixels
   still free, and drop what is left of an instance below a minimum size.

Masks are stored cropped to their boxes, so memory follows the nuclei, not
(instances x image size). Ties in score are broken by box and area, so the
result does not depend on the order the instances come in. Instances are only
ever compared with those whose boxes touch theirs, found by a sweep
(:func:`touching_pairs`), and the comparisons run in numba kernels over the
masks laid end to end, so suppression and merging take time in proportion to
the instances and their neighbours, not to their square: tens of thousands of
instances, the detections of a large image over several views and folds, are
merged in seconds.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
from numba import njit


@dataclass(frozen=True, eq=False)
class _BoxedMasks:
    """Scores, boxes and box-cropped masks of one image, checked to fit together.

    Attributes:
        shape: (H, W) of the image.
        scores: float (N,) confidence of each instance.
        boxes: int64 (N, 4) as (y0, x0, y1, x1), end-exclusive, inside the image.
        masks: N arrays, mask ``i`` of shape (y1 - y0, x1 - x0) of box ``i``.
    """

    shape: tuple[int, int]
    scores: np.ndarray
    boxes: np.ndarray
    masks: tuple[np.ndarray, ...]

    def __post_init__(self) -> None:
        n = len(self.masks)
        if self.scores.shape != (n,) or self.boxes.shape != (n, 4):
            raise ValueError(
                f"{n} masks but scores {self.scores.shape} and boxes {self.boxes.shape}"
            )
        for box, mask in zip(self.boxes, self.masks, strict=True):
            y0, x0, y1, x1 = box
            if not (0 <= y0 < y1 <= self.shape[0] and 0 <= x0 < x1 <= self.shape[1]):
                raise ValueError(f"box {box.tolist()} is empty or outside the image {self.shape}")
            if mask.shape != (y1 - y0, x1 - x0):
                raise ValueError(f"mask of shape {mask.shape} does not fit box {box.tolist()}")

    def __len__(self) -> int:
        return len(self.masks)

    @classmethod
    def empty(cls, shape: tuple[int, int]):
        """No instance."""
        return cls(tuple(shape), np.zeros(0), np.zeros((0, 4), np.int64), ())

    @classmethod
    def concatenate(cls, items: Sequence):
        """All instances of several sets for the same image, in order."""
        if not items:
            raise ValueError("nothing to concatenate")
        shapes = {tuple(item.shape) for item in items}
        if len(shapes) != 1:
            raise ValueError(f"instances of different images: shapes {sorted(shapes)}")
        return cls(
            items[0].shape,
            np.concatenate([np.asarray(item.scores, float) for item in items]),
            np.concatenate([item.boxes for item in items]).astype(np.int64),
            tuple(mask for item in items for mask in item.masks),
        )

    def subset(self, keep: np.ndarray):
        """The instances at the indices (or boolean mask) ``keep``, in that order."""
        keep = np.asarray(keep)
        index = np.flatnonzero(keep) if keep.dtype == bool else keep.astype(np.int64)
        return type(self)(
            self.shape, self.scores[index], self.boxes[index], tuple(self.masks[i] for i in index)
        )


@dataclass(frozen=True, eq=False)
class Instances(_BoxedMasks):
    """Instances of one image: a score, a box and a boolean box-cropped mask each."""

    @classmethod
    def from_full_masks(cls, masks: np.ndarray, scores: np.ndarray) -> Instances:
        """Instances from full-image boolean masks (N, H, W); empty masks are dropped."""
        shape = tuple(masks.shape[1:])
        kept_scores, boxes, crops = [], [], []
        for mask, score in zip(masks, scores, strict=True):
            rows, cols = np.flatnonzero(mask.any(axis=1)), np.flatnonzero(mask.any(axis=0))
            if rows.size == 0:
                continue
            box = (rows[0], cols[0], rows[-1] + 1, cols[-1] + 1)
            boxes.append(box)
            crops.append(mask[box[0] : box[2], box[1] : box[3]].astype(bool))
            kept_scores.append(score)
        if not crops:
            return cls.empty(shape)
        return cls(shape, np.asarray(kept_scores, float), np.asarray(boxes, np.int64), tuple(crops))

    @classmethod
    def from_labels(cls, labels: np.ndarray, scores: np.ndarray | None = None) -> Instances:
        """Instances from a label image, one per label; score 1 unless given (by label order)."""
        ids = np.unique(labels[labels > 0])
        if scores is None:
            scores = np.ones(len(ids))
        boxes, crops = [], []
        for label in ids:
            rows = np.flatnonzero((labels == label).any(axis=1))
            cols = np.flatnonzero((labels == label).any(axis=0))
            box = (rows[0], cols[0], rows[-1] + 1, cols[-1] + 1)
            boxes.append(box)
            crops.append(labels[box[0] : box[2], box[1] : box[3]] == label)
        if not crops:
            return cls.empty(labels.shape)
        return cls(
            labels.shape, np.asarray(scores, float), np.asarray(boxes, np.int64), tuple(crops)
        )

    def canonical_order(self) -> np.ndarray:
        """Indices from the highest score down; ties broken by box, then mask area."""
        areas = np.array([m.sum() for m in self.masks], np.int64)
        keys = (-areas, self.boxes[:, 3], self.boxes[:, 2], self.boxes[:, 1], self.boxes[:, 0])
        return np.lexsort((*keys, -self.scores))


@dataclass(frozen=True, eq=False)
class SoftInstances(_BoxedMasks):
    """Instances with probability masks in [0, 1]: a detector's output before thresholding."""

    @classmethod
    def from_instances(cls, instances: Instances) -> SoftInstances:
        """Binary instances as soft ones (probability 1 inside, 0 outside)."""
        masks = tuple(m.astype(np.float32) for m in instances.masks)
        return cls(instances.shape, instances.scores, instances.boxes, masks)

    def binarize(self, threshold: float = 0.5) -> Instances:
        """Masks above ``threshold``, boxes shrunk to them; instances left empty are dropped."""
        return self.binarize_indexed(threshold)[0]

    def binarize_indexed(self, threshold: float = 0.5) -> tuple[Instances, np.ndarray]:
        """:meth:`binarize`, and for each binary instance the index of its soft one."""
        scores, boxes, crops, index = [], [], [], []
        for i, (score, (y0, x0, _, _), mask) in enumerate(
            zip(self.scores, self.boxes, self.masks, strict=True)
        ):
            binary = mask > threshold
            rows, cols = np.flatnonzero(binary.any(axis=1)), np.flatnonzero(binary.any(axis=0))
            if rows.size == 0:
                continue
            scores.append(score)
            boxes.append((y0 + rows[0], x0 + cols[0], y0 + rows[-1] + 1, x0 + cols[-1] + 1))
            crops.append(binary[rows[0] : rows[-1] + 1, cols[0] : cols[-1] + 1])
            index.append(i)
        if not crops:
            return Instances.empty(self.shape), np.zeros(0, np.int64)
        binary = Instances(
            self.shape, np.asarray(scores, float), np.asarray(boxes, np.int64), tuple(crops)
        )
        return binary, np.asarray(index, np.int64)


def mask_iou(a: Instances, i: int, b: Instances, j: int) -> float:
    """IoU of mask ``i`` of ``a`` and mask ``j`` of ``b`` (same image), from their crops."""
    packed = _PackedMasks.of(Instances.concatenate([a.subset([i]), b.subset([j])]))
    return float(_mask_iou(packed.flat, packed.offsets, packed.boxes, packed.areas, 0, 1))


def touching_pairs(boxes: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Which boxes share a pixel with which, as a sparse adjacency (each box touches itself).

    A sweep over the boxes sorted by their top edge compares each box only with
    those starting above its bottom edge, so the time follows the number of
    boxes and of touching pairs, not their square.

    Args:
        boxes: int (N, 4) as (y0, x0, y1, x1), end-exclusive.

    Returns:
        ``indptr`` (N + 1,) and ``indices``: box ``i`` touches boxes
        ``indices[indptr[i]:indptr[i + 1]]``, in ascending order.
    """
    boxes = np.ascontiguousarray(boxes, np.int64).reshape(-1, 4)
    if np.any(boxes[:, 2:] <= boxes[:, :2]):
        raise ValueError("boxes must be non-empty (y0 < y1 and x0 < x1)")
    first, second = _touching_pairs(boxes, np.argsort(boxes[:, 0], kind="stable"))
    itself = np.arange(len(boxes), dtype=np.int64)
    rows = np.concatenate([itself, first, second])
    columns = np.concatenate([itself, second, first])
    order = np.lexsort((columns, rows))
    indptr = np.zeros(len(boxes) + 1, np.int64)
    np.cumsum(np.bincount(rows, minlength=len(boxes)), out=indptr[1:])
    return indptr, columns[order]


@dataclass(frozen=True, eq=False)
class _PackedMasks:
    """Boolean box crops laid end to end, for the kernels: mask ``i`` is
    ``flat[offsets[i]:offsets[i + 1]]``, row by row over its box."""

    flat: np.ndarray
    offsets: np.ndarray
    boxes: np.ndarray
    areas: np.ndarray

    @classmethod
    def of(cls, instances: Instances) -> _PackedMasks:
        sizes = [m.size for m in instances.masks]
        offsets = np.concatenate([[0], np.cumsum(sizes, dtype=np.int64)]).astype(np.int64)
        flat = (
            np.concatenate([m.ravel() for m in instances.masks])
            if instances.masks
            else np.zeros(0, bool)
        )
        areas = np.array([np.count_nonzero(m) for m in instances.masks], np.int64)
        boxes = np.ascontiguousarray(instances.boxes, np.int64).reshape(-1, 4)
        return cls(flat.astype(bool, copy=False), offsets, boxes, areas)


def suppress_duplicates(
    instances: Instances, box_iou_threshold: float = 0.7, mask_iou_threshold: float = 0.5
) -> Instances:
    """Non-maximum suppression by boxes, then by masks.

    Args:
        instances: Scored instances of one image.
        box_iou_threshold: Box IoU above which the lower-scored box is dropped.
        mask_iou_threshold: Mask IoU above which the lower-scored instance is
            dropped (checked only between boxes that touch).

    Returns:
        The kept instances, from the highest score down.
    """
    return instances.subset(nms_indices(instances, box_iou_threshold, mask_iou_threshold))


def nms_indices(
    instances: Instances, box_iou_threshold: float = 0.7, mask_iou_threshold: float = 0.5
) -> np.ndarray:
    """Indices of the instances :func:`suppress_duplicates` keeps, from the highest score down.

    In the canonical order, a box is dropped when its IoU with a kept box
    exceeds ``box_iou_threshold`` (as ``torchvision.ops.nms`` does); then,
    among the boxes left, an instance is dropped when its mask IoU with a
    kept one exceeds ``mask_iou_threshold``. Only touching boxes are compared.
    """
    if not box_iou_threshold >= 0 or not mask_iou_threshold >= 0:
        raise ValueError(
            f"IoU thresholds must be non-negative, got {box_iou_threshold} and {mask_iou_threshold}"
        )
    if len(instances) == 0:
        return np.zeros(0, np.int64)
    order = instances.canonical_order()
    packed = _PackedMasks.of(instances.subset(order))
    indptr, indices = touching_pairs(packed.boxes)
    kept = _nms(
        indptr, indices, *_kernel_masks(packed), float(box_iou_threshold), float(mask_iou_threshold)
    )
    return order[kept]


def found_in(a: Instances, b: Instances, iou_threshold: float = 0.5) -> np.ndarray:
    """For each instance of ``a``, whether a mask of ``b`` overlaps it by more than the threshold.

    Args:
        a: Instances to look up.
        b: Instances of the same image to look for them in.
        iou_threshold: Mask IoU above which two instances are the same nucleus.

    Returns:
        bool (len(a),).
    """
    if len(a) == 0 or len(b) == 0:
        return np.zeros(len(a), bool)
    packed = _PackedMasks.of(Instances.concatenate([a, b]))
    indptr, indices = touching_pairs(packed.boxes)
    return _found_in(indptr, indices, len(a), *_kernel_masks(packed), float(iou_threshold))


def merge_views(
    views: Sequence[SoftInstances],
    iou_threshold: float = 0.5,
    min_votes: int = 1,
    mask_threshold: float = 0.5,
) -> SoftInstances:
    """Instances found in several views (TTA views, folds or model families), merged by vote.

    From the highest score down, an instance not yet used gathers from every
    other view the unused instance whose mask overlaps it most, if by more
    than ``iou_threshold``. A group found in at least ``min_votes`` views
    becomes one instance: its soft masks averaged over the union of their
    boxes, and its score the sum of its members' scores over the number of
    views, so that an instance every view found keeps its mean score and one
    that few found is discounted. Masks are compared thresholded at
    ``mask_threshold``; instances empty at that threshold are left out.

    Args:
        views: Soft instances of the same image from each view.
        iou_threshold: Mask IoU above which two instances are the same nucleus.
        min_votes: Views that must have found a nucleus for it to be kept.
        mask_threshold: Threshold of the soft masks for the IoU.

    Returns:
        The merged instances, from the highest score down. The result does
        not depend on the order of the instances within each view.
    """
    if not views:
        raise ValueError("no views to merge")
    if not 1 <= min_votes <= len(views):
        raise ValueError(f"min_votes must be in [1, {len(views)}], got {min_votes}")
    pooled = SoftInstances.concatenate(views)
    view_of = np.concatenate([np.full(len(v), k) for k, v in enumerate(views)]).astype(np.int64)
    binary, index = pooled.binarize_indexed(mask_threshold)
    if len(binary) == 0:
        return SoftInstances.empty(pooled.shape)
    packed = _PackedMasks.of(binary)
    indptr, indices = touching_pairs(packed.boxes)
    starts, members = _vote_groups(
        binary.canonical_order(),
        indptr,
        indices,
        view_of[index],
        len(views),
        *_kernel_masks(packed),
        float(iou_threshold),
    )
    groups = [
        index[members[start:stop]].tolist()
        for start, stop in zip(starts[:-1], starts[1:], strict=True)
        if stop - start >= min_votes
    ]
    return _average_groups(pooled, groups, len(views))


def _average_groups(pooled: SoftInstances, groups: list[list[int]], n_views: int) -> SoftInstances:
    if not groups:
        return SoftInstances.empty(pooled.shape)
    scores, boxes, masks = [], [], []
    for members in groups:
        member_boxes = pooled.boxes[members]
        y0, x0 = member_boxes[:, 0].min(), member_boxes[:, 1].min()
        y1, x1 = member_boxes[:, 2].max(), member_boxes[:, 3].max()
        total = np.zeros((y1 - y0, x1 - x0), np.float32)
        for m in members:
            by0, bx0, by1, bx1 = pooled.boxes[m]
            total[by0 - y0 : by1 - y0, bx0 - x0 : bx1 - x0] += pooled.masks[m]
        scores.append(float(np.sum(pooled.scores[members])) / n_views)
        boxes.append((y0, x0, y1, x1))
        masks.append(total / len(members))
    return SoftInstances(
        pooled.shape, np.asarray(scores, float), np.asarray(boxes, np.int64), tuple(masks)
    )


def _kernel_masks(packed: _PackedMasks) -> tuple[np.ndarray, ...]:
    return packed.flat, packed.offsets, packed.boxes, packed.areas


@njit(cache=True)
def _touching_pairs(boxes, order):
    # ``order`` sorts the boxes by top edge: once a box starts at or below the
    # bottom edge of box ``a``, no later one can touch it.
    pairs = []
    for p in range(len(order)):
        a = order[p]
        for q in range(p + 1, len(order)):
            b = order[q]
            if boxes[b, 0] >= boxes[a, 2]:
                break
            if max(boxes[a, 1], boxes[b, 1]) < min(boxes[a, 3], boxes[b, 3]):
                pairs.append((a, b))
    first = np.empty(len(pairs), np.int64)
    second = np.empty(len(pairs), np.int64)
    for k, (a, b) in enumerate(pairs):
        first[k], second[k] = a, b
    return first, second


@njit(cache=True)
def _mask_iou(flat, offsets, boxes, areas, i, j):
    y0, x0 = max(boxes[i, 0], boxes[j, 0]), max(boxes[i, 1], boxes[j, 1])
    y1, x1 = min(boxes[i, 2], boxes[j, 2]), min(boxes[i, 3], boxes[j, 3])
    if y0 >= y1 or x0 >= x1:
        return 0.0
    width_i, width_j = boxes[i, 3] - boxes[i, 1], boxes[j, 3] - boxes[j, 1]
    inter = 0
    for y in range(y0, y1):
        row_i = offsets[i] + (y - boxes[i, 0]) * width_i - boxes[i, 1]
        row_j = offsets[j] + (y - boxes[j, 0]) * width_j - boxes[j, 1]
        for x in range(x0, x1):
            if flat[row_i + x] and flat[row_j + x]:
                inter += 1
    union = areas[i] + areas[j] - inter
    return inter / union if union else 0.0


@njit(cache=True)
def _box_iou(boxes, i, j):
    # As torchvision.ops.nms computes it, in float64.
    area_i = float(boxes[i, 3] - boxes[i, 1]) * float(boxes[i, 2] - boxes[i, 0])
    area_j = float(boxes[j, 3] - boxes[j, 1]) * float(boxes[j, 2] - boxes[j, 0])
    width = max(0.0, float(min(boxes[i, 3], boxes[j, 3]) - max(boxes[i, 1], boxes[j, 1])))
    height = max(0.0, float(min(boxes[i, 2], boxes[j, 2]) - max(boxes[i, 0], boxes[j, 0])))
    inter = width * height
    return inter / (area_i + area_j - inter)


@njit(cache=True)
def _nms(indptr, indices, flat, offsets, boxes, areas, box_threshold, mask_threshold):
    # Instances come ranked, the best first; a rival is an earlier kept one.
    n = len(boxes)
    box_kept = np.zeros(n, np.bool_)
    for i in range(n):
        box_kept[i] = True
        for p in range(indptr[i], indptr[i + 1]):
            k = indices[p]
            if k < i and box_kept[k] and _box_iou(boxes, i, k) > box_threshold:
                box_kept[i] = False
                break
    kept = np.zeros(n, np.bool_)
    for i in range(n):
        if not box_kept[i]:
            continue
        kept[i] = True
        for p in range(indptr[i], indptr[i + 1]):
            k = indices[p]
            if k < i and kept[k] and _mask_iou(flat, offsets, boxes, areas, i, k) > mask_threshold:
                kept[i] = False
                break
    return np.flatnonzero(kept)


@njit(cache=True)
def _found_in(indptr, indices, n_a, flat, offsets, boxes, areas, threshold):
    found = np.zeros(n_a, np.bool_)
    for i in range(n_a):
        for p in range(indptr[i], indptr[i + 1]):
            j = indices[p]
            if j >= n_a and _mask_iou(flat, offsets, boxes, areas, i, j) > threshold:
                found[i] = True
                break
    return found


@njit(cache=True)
def _vote_groups(order, indptr, indices, view_of, n_views, flat, offsets, boxes, areas, threshold):
    # Groups as runs of ``members`` between consecutive ``starts``: the seed first,
    # then each view's best match, views in the order their first match was met.
    n = len(order)
    used = np.zeros(n, np.bool_)
    members = np.empty(n, np.int64)
    starts = np.zeros(n + 1, np.int64)
    best_iou = np.zeros(n_views)
    best = np.full(n_views, -1, np.int64)
    met = np.empty(n_views, np.int64)
    n_members = n_groups = 0
    for i in order:
        if used[i]:
            continue
        used[i] = True
        n_met = 0
        for p in range(indptr[i], indptr[i + 1]):
            j = indices[p]
            view = view_of[j]
            if used[j] or view == view_of[i]:
                continue
            iou = _mask_iou(flat, offsets, boxes, areas, i, j)
            if iou > threshold and iou > best_iou[view]:
                if best[view] < 0:
                    met[n_met] = view
                    n_met += 1
                best_iou[view], best[view] = iou, j
        members[n_members] = i
        n_members += 1
        for m in range(n_met):
            view = met[m]
            members[n_members] = best[view]
            n_members += 1
            used[best[view]] = True
            best_iou[view], best[view] = 0.0, -1
        n_groups += 1
        starts[n_groups] = n_members
    return starts[: n_groups + 1], members[:n_members]


def resolve_overlaps(
    instances: Instances, min_size: int = 8, order: np.ndarray | None = None
) -> np.ndarray:
    """Paint instances into a label image, the earlier painted winning contested pixels.

    Args:
        instances: Scored instances of one image.
        min_size: An instance left with fewer pixels than this is dropped.
        order: Indices of all instances in painting order; by default
            :meth:`Instances.canonical_order` (the higher score first).

    Returns:
        int32 label image, labels 1..n in painting order.
    """
    if order is None:
        order = instances.canonical_order()
    elif sorted(np.asarray(order).tolist()) != list(range(len(instances))):
        raise ValueError(f"order must list each of the {len(instances)} instances once")
    labels = np.zeros(instances.shape, np.int32)
    label = 0
    for i in order:
        y0, x0, y1, x1 = instances.boxes[i]
        window = labels[y0:y1, x0:x1]
        free = instances.masks[i] & (window == 0)
        if np.count_nonzero(free) < min_size:
            continue
        label += 1
        window[free] = label
    return labels


@dataclass(frozen=True)
class InstanceParams:
    """Scored instances -> label image thresholds; tuned on out-of-fold predictions.

    Attributes:
        score_threshold: Instances scoring at or below this are dropped.
        mask_threshold: A soft mask's pixels above this belong to the instance.
        box_iou_threshold: See :func:`suppress_duplicates`.
        mask_iou_threshold: See :func:`suppress_duplicates`.
        min_size: See :func:`resolve_overlaps`.
    """

    score_threshold: float = 0.5
    mask_threshold: float = 0.5
    box_iou_threshold: float = 0.7
    mask_iou_threshold: float = 0.5
    min_size: int = 8


def instances_to_labels(
    instances: Instances | SoftInstances, params: InstanceParams = InstanceParams()
) -> np.ndarray:
    """Scored instances -> label image: threshold, suppress duplicates, resolve overlaps.

    Args:
        instances: Scored instances of one image; soft masks are first
            thresholded at ``params.mask_threshold``.
        params: The thresholds.

    Returns:
        int32 label image, 0 = background.
    """
    confident = instances.subset(instances.scores > params.score_threshold)
    if isinstance(confident, SoftInstances):
        confident = confident.binarize(params.mask_threshold)
    kept = suppress_duplicates(confident, params.box_iou_threshold, params.mask_iou_threshold)
    return resolve_overlaps(kept, params.min_size)
