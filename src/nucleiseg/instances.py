"""Scored instance masks: suppression of duplicates and resolution into one label image.

Detection models (Mask R-CNN), test-time views and ensembles of families all
produce *scored instances*, masks that may overlap and repeat one another. This
module turns them into a label image where every pixel belongs to at most one
nucleus:

1. drop instances below a score threshold;
2. suppress duplicates: boxes first (cheap, ``torchvision.ops.batched_nms``),
   then masks, an instance being dropped when its mask overlaps a
   higher-scored kept one by more than an IoU threshold;
3. paint the survivors from the highest score down, each taking only the pixels
   still free, and drop what is left of an instance below a minimum size.

Masks are stored cropped to their boxes, so memory follows the nuclei, not
(instances x image size). Ties in score are broken by box and area, so the
result does not depend on the order the instances come in.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch
from torchvision.ops import batched_nms


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
    ay0, ax0, ay1, ax1 = a.boxes[i]
    by0, bx0, by1, bx1 = b.boxes[j]
    y0, x0, y1, x1 = max(ay0, by0), max(ax0, bx0), min(ay1, by1), min(ax1, bx1)
    area_a, area_b = int(a.masks[i].sum()), int(b.masks[j].sum())
    if y0 >= y1 or x0 >= x1:
        return 0.0
    inter = int(
        np.count_nonzero(
            a.masks[i][y0 - ay0 : y1 - ay0, x0 - ax0 : x1 - ax0]
            & b.masks[j][y0 - by0 : y1 - by0, x0 - bx0 : x1 - bx0]
        )
    )
    union = area_a + area_b - inter
    return inter / union if union else 0.0


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
    """Indices of the instances :func:`suppress_duplicates` keeps, from the highest score down."""
    if len(instances) == 0:
        return np.zeros(0, np.int64)
    order = instances.canonical_order()
    ranked = instances.subset(order)
    # batched_nms breaks score ties by position; giving it ranks as scores keeps
    # the canonical order.
    rank_scores = torch.arange(len(ranked), 0, -1, dtype=torch.float64)
    boxes_xyxy = torch.from_numpy(ranked.boxes[:, [1, 0, 3, 2]].astype(np.float64))
    one_class = torch.zeros(len(ranked), dtype=torch.int64)
    keep = np.sort(batched_nms(boxes_xyxy, rank_scores, one_class, box_iou_threshold).numpy())
    ranked = ranked.subset(keep)
    touching = _boxes_touch(ranked.boxes)
    kept = np.zeros(len(ranked), bool)
    for i in range(len(ranked)):
        rivals = np.flatnonzero(kept & touching[i])
        kept[i] = all(mask_iou(ranked, i, ranked, k) <= mask_iou_threshold for k in rivals)
    return order[keep[kept]]


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
    touching = _boxes_touch(np.concatenate([a.boxes, b.boxes]))[: len(a), len(a) :]
    return np.array(
        [
            any(mask_iou(a, i, b, j) > iou_threshold for j in np.flatnonzero(touching[i]))
            for i in range(len(a))
        ],
        bool,
    )


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
    view_of = view_of[index]
    touching = _boxes_touch(binary.boxes)
    used = np.zeros(len(binary), bool)
    groups = []
    for i in binary.canonical_order():
        if used[i]:
            continue
        used[i] = True
        best: dict[int, tuple[float, int]] = {}
        for j in np.flatnonzero(touching[i] & ~used & (view_of != view_of[i])):
            iou = mask_iou(binary, i, binary, j)
            if iou > iou_threshold and iou > best.get(view_of[j], (0.0, -1))[0]:
                best[view_of[j]] = (iou, j)
        members = [i, *(j for _, j in best.values())]
        used[members] = True
        if len(members) >= min_votes:
            groups.append([index[m] for m in members])
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


def _boxes_touch(boxes: np.ndarray) -> np.ndarray:
    """(N, N) boolean: do boxes i and j share any pixel."""
    y0, x0, y1, x1 = (boxes[:, k] for k in range(4))
    return (np.maximum(y0[:, None], y0[None]) < np.minimum(y1[:, None], y1[None])) & (
        np.maximum(x0[:, None], x0[None]) < np.minimum(x1[:, None], x1[None])
    )


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
