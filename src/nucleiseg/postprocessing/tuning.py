"""Tuning the raw output -> instances thresholds on out-of-fold predictions.

U-Net++ runs tune their watershed thresholds on saved probability maps,
Mask R-CNN runs their instance thresholds on saved soft instances.

A coordinate search: starting from the current thresholds, each one in turn is
set to the value of its grid that scores best (mean AP over the images) with the
others held fixed, and the sweep is repeated until nothing changes. The images
are out-of-fold predictions, so no model saw them; tuning on the test images is
never done.

By modality (:func:`tune_by_modality`), each group of imaging modalities
searches again from the thresholds of all images, on its own images only, and
keeps its own thresholds where they gain at least :data:`MIN_GAIN` there.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import numpy as np
import pandas as pd
from tqdm import tqdm

from nucleiseg.competition.metric import average_precision
from nucleiseg.postprocessing.instances import InstanceParams, instances_to_labels
from nucleiseg.postprocessing.watershed import PostprocessParams, instances_from_probabilities

DEFAULT_GRID: dict[str, tuple[float, ...]] = {
    "mask_threshold": (0.3, 0.4, 0.5, 0.6),
    "seed_threshold": (0.5, 0.6, 0.7, 0.8, 0.9),
    "border_threshold": (0.2, 0.3, 0.4, 0.5, 0.6),
    "separation_threshold": (0.2, 0.3, 0.5, 0.7),
    "min_seed_size": (2, 4, 8, 16, 24, 32),
    "min_size": (4, 8, 12, 20, 30, 45, 60),
}

INSTANCE_GRID: dict[str, tuple[float, ...]] = {
    "score_threshold": (0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9, 0.95, 0.98),
    "mask_threshold": (0.3, 0.4, 0.5, 0.6, 0.7, 0.8),
    "mask_iou_threshold": (0.1, 0.2, 0.3, 0.4, 0.5, 0.6),
    "box_iou_threshold": (0.5, 0.7, 0.9),
    "min_size": (4, 8, 12, 20, 30, 45, 60),
}

# Modalities tuned together: brightfield has too few images (16 of the 664 DSB training
# images) to tune alone, and shares a light background with stained tissue.
MODALITY_GROUPS: dict[str, tuple[str, ...]] = {
    "fluorescence": ("fluorescence",),
    "brightfield and tissue": ("brightfield", "tissue"),
}
# A group's own thresholds are kept only if they gain this much mean AP on its images.
MIN_GAIN = 0.002

# Params type -> (raw output -> label image, default grid).
_METHODS: dict[type, tuple[Callable[[Any, Any], np.ndarray], Mapping]] = {
    PostprocessParams: (instances_from_probabilities, DEFAULT_GRID),
    InstanceParams: (instances_to_labels, INSTANCE_GRID),
}


def _method(params) -> tuple[Callable[[Any, Any], np.ndarray], Mapping]:
    if type(params) not in _METHODS:
        raise TypeError(f"no tuning for {type(params).__name__}")
    return _METHODS[type(params)]


def mean_score(raws: Mapping[str, Any], truth: Mapping[str, np.ndarray], params) -> float:
    """Mean AP over the images after turning their raw outputs into instances with ``params``.

    Args:
        raws: Image id -> probability maps (3, H, W) for
            :class:`PostprocessParams`, or soft instances for :class:`InstanceParams`.
        truth: Image id -> true label image.
        params: The thresholds; their type picks the method.
    """
    to_labels, _ = _method(params)
    return float(
        np.mean(
            [average_precision(truth[i], to_labels(raw, params)).score for i, raw in raws.items()]
        )
    )


def coordinate_search(
    raws: Mapping[str, Any],
    truth: Mapping[str, np.ndarray],
    start,
    grid: Mapping[str, Sequence[float]] | None = None,
    max_sweeps: int = 3,
):
    """Best thresholds found by coordinate search, and every evaluation made.

    Args:
        raws: Image id -> out-of-fold raw output (see :func:`mean_score`).
        truth: Image id -> true label image.
        start: Thresholds to start from (also scored): a
            :class:`PostprocessParams` or an :class:`InstanceParams`.
        grid: Field name -> values to try; by default :data:`DEFAULT_GRID`
            or :data:`INSTANCE_GRID`, following the type of ``start``.
        max_sweeps: At most this many passes over the fields.

    Returns:
        The best thresholds and a frame with one row per evaluation (the
        thresholds and their mean AP), in the order they were made.
    """
    _, default_grid = _method(start)
    grid = default_grid if grid is None else grid
    unknown = set(grid) - {f.name for f in dataclasses.fields(start)}
    if unknown:
        raise ValueError(f"unknown postprocessing setting(s): {', '.join(sorted(unknown))}")
    scores: dict[Any, float] = {}

    def score(params) -> float:
        if params not in scores:
            scores[params] = mean_score(raws, truth, params)
        return scores[params]

    best = start
    evaluations = sum(len(v) for v in grid.values()) * max_sweeps
    with tqdm(total=evaluations, desc="tune", unit="setting") as progress:
        for _ in range(max_sweeps):
            previous = best
            for name, values in grid.items():
                candidates = [dataclasses.replace(best, **{name: v}) for v in values]
                for candidate in candidates:
                    score(candidate)
                    progress.update()
                best = max([best, *candidates], key=score)
            if best == previous:
                break
    history = pd.DataFrame([dataclasses.asdict(p) | {"mean_ap": s} for p, s in scores.items()])
    return best, history


def tune_by_modality(
    raws: Mapping[str, Any],
    truth: Mapping[str, np.ndarray],
    modality_of: Mapping[str, str],
    start,
    groups: Mapping[str, Sequence[str]] = MODALITY_GROUPS,
    min_gain: float = MIN_GAIN,
    grid: Mapping[str, Sequence[float]] | None = None,
):
    """Thresholds of each group of modalities, searched on that group's images alone.

    Args:
        raws: Image id -> out-of-fold raw output (see :func:`mean_score`).
        truth: Image id -> true label image.
        modality_of: Image id -> modality.
        start: The thresholds of all images (e.g. :func:`coordinate_search`'s
            best): every group's search starts there and is compared with it.
        groups: Group name -> the modalities it pools.
        min_gain: A group keeps its own thresholds only if they score at least
            this much more than ``start`` on its images.
        grid: As :func:`coordinate_search`.

    Returns:
        Modality -> its own thresholds (the modalities of the groups that
        kept theirs), and a frame with one row per group: group, images,
        start and tuned mean AP, kept.
    """
    own, rows = {}, []
    for group, modalities in groups.items():
        ids = [i for i in raws if modality_of[i] in modalities]
        if not ids:
            continue
        group_raws, group_truth = {i: raws[i] for i in ids}, {i: truth[i] for i in ids}
        best, history = coordinate_search(group_raws, group_truth, start, grid)
        before, after = mean_score(group_raws, group_truth, start), float(history["mean_ap"].max())
        kept = best != start and after - before >= min_gain
        if kept:
            own.update(dict.fromkeys(modalities, best))
        rows.append(
            {"group": group, "images": len(ids), "start": before, "tuned": after, "kept": kept}
        )
    return own, pd.DataFrame(rows)
