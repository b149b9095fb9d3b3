"""Pseudo-labels of unlabelled images: the confident nuclei of an ensemble, the rest unknown.

Self-training on images without labels (:mod:`nucleiseg.training.adapt`) trains
on what the start model already finds, so the labels it trains on must be
the nuclei it is sure of, and it must not learn "background" where it merely
found nothing. From the ensemble's label image of an image, the label images
of each of its voters (every fold model in every test-time view) and its body
probability map, :func:`pseudo_labels` keeps:

- a nucleus of the ensemble when a share ``agreement`` of the voters found it
  (one of their nuclei overlaps it with a mask IoU above ``match_iou``) and its
  mean body probability is at least ``min_body``: its pixels keep its label;
- background where the body probability is below ``background``, except within
  ``margin`` pixels of a dropped nucleus;
- every other pixel as unknown (:data:`nucleiseg.data.targets.UNKNOWN`): dropped
  nuclei with their margin, and the uncertain pixels, including the rim of a
  kept nucleus where the probability falls through the middle values. The loss
  leaves unknown pixels out (:mod:`nucleiseg.models.losses`), so they are
  neither nucleus nor background.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import cv2
import numpy as np

from nucleiseg.competition.metric import label_overlap
from nucleiseg.data.targets import UNKNOWN


@dataclass(frozen=True)
class PseudoLabelParams:
    """Which nuclei and which background a pseudo-label keeps.

    Attributes:
        agreement: Share of the voters (fold models x test-time views) that
            must find a nucleus, in [0, 1].
        match_iou: Mask IoU above which a voter's nucleus is the ensemble's.
        min_body: Mean body probability a kept nucleus must reach.
        background: Body probability below which a pixel outside every
            nucleus is background.
        margin: Pixels around every dropped nucleus that stay unknown, so a
            nucleus the rule was unsure of is not taught as background at its rim.
    """

    agreement: float = 0.8
    match_iou: float = 0.5
    min_body: float = 0.8
    background: float = 0.1
    margin: int = 2

    def __post_init__(self) -> None:
        for name in ("agreement", "match_iou", "min_body", "background"):
            if not 0.0 <= getattr(self, name) <= 1.0:
                raise ValueError(f"{name} must be in [0, 1], got {getattr(self, name)}")
        if self.margin < 0:
            raise ValueError(f"margin must not be negative, got {self.margin}")


@dataclass(frozen=True, eq=False)
class PseudoLabels:
    """One image's pseudo-label and what the rule kept.

    Attributes:
        labels: int32 label image: kept nuclei with the ensemble's labels, 0 for
            background, :data:`nucleiseg.data.targets.UNKNOWN` for unknown pixels.
        nuclei: Nuclei the ensemble found.
        kept: Nuclei kept.
    """

    labels: np.ndarray
    nuclei: int
    kept: int

    @property
    def dropped(self) -> int:
        """Nuclei the ensemble found that the rule dropped."""
        return self.nuclei - self.kept

    @property
    def unknown_share(self) -> float:
        """Share of the image's pixels left unknown (left out of the loss)."""
        return float(np.mean(self.labels == UNKNOWN)) if self.labels.size else 0.0


def votes(labels: np.ndarray, voters: Sequence[np.ndarray], match_iou: float) -> np.ndarray:
    """For each nucleus of ``labels`` (in ascending label order), how many voters found it.

    Args:
        labels: int label image, 0 = background.
        voters: Label images of the same shape.
        match_iou: Mask IoU above which a voter's nucleus is the same nucleus.

    Returns:
        int64 counts, one per label value present.
    """
    ids = np.unique(labels[labels > 0])
    counts = np.zeros(len(ids), np.int64)
    for voter in voters:
        overlap = label_overlap(labels, voter)
        found = np.zeros(len(ids), bool)
        found[overlap.pair_true[overlap.iou() > match_iou]] = True
        counts += found
    return counts


def pseudo_labels(
    labels: np.ndarray,
    voters: Sequence[np.ndarray],
    body: np.ndarray,
    params: PseudoLabelParams | None = None,
) -> PseudoLabels:
    """The pseudo-label of one image (see the module docstring for the rule).

    Args:
        labels: The ensemble's int label image, 0 = background.
        voters: The label image of each voter (fold model x view), same shape.
        body: Body probability (H, W) in [0, 1], e.g. the mean over the voters.
        params: The rule's thresholds (defaults if None).

    Returns:
        The pseudo-label with its counts.

    Raises:
        ValueError: Without voters, or if the shapes differ.
    """
    params = params or PseudoLabelParams()
    if not voters:
        raise ValueError("pseudo-labels need at least one voter")
    shapes = {labels.shape, body.shape, *(v.shape for v in voters)}
    if len(shapes) != 1:
        raise ValueError(f"label images and body map differ in shape: {sorted(shapes)}")
    labels = labels.astype(np.int32, copy=False)
    ids = np.unique(labels[labels > 0])
    agreement = votes(labels, voters, params.match_iou) / len(voters)
    inside = labels > 0
    index = np.searchsorted(ids, labels[inside])  # each nucleus pixel's place among ids
    areas = np.bincount(index, minlength=len(ids))
    mean_body = np.bincount(index, weights=body[inside], minlength=len(ids)) / np.maximum(areas, 1)
    keep = (agreement >= params.agreement) & (mean_body >= params.min_body)
    kept = np.isin(labels, ids[keep])
    dropped = (labels > 0) & ~kept
    if params.margin and dropped.any():
        size = 2 * params.margin + 1
        footprint = cv2.getStructuringElement(cv2.MORPH_ELLIPSE, (size, size))
        dropped = cv2.dilate(dropped.astype(np.uint8), footprint) > 0
    background = (body < params.background) & ~dropped & (labels == 0)
    out = np.where(kept, labels, np.where(background, 0, UNKNOWN)).astype(np.int32)
    return PseudoLabels(out, nuclei=len(ids), kept=int(keep.sum()))
