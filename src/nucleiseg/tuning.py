"""Tuning the postprocessing thresholds on out-of-fold probability maps.

A coordinate search: starting from the current thresholds, each one in turn is
set to the value of its grid that scores best (mean AP over the images) with the
others held fixed, and the sweep is repeated until nothing changes. The images
are out-of-fold predictions, so no model saw them; tuning on the test images is
never done.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping, Sequence

import numpy as np
import pandas as pd
from tqdm import tqdm

from nucleiseg.metric import average_precision
from nucleiseg.postprocess import PostprocessParams, instances_from_probabilities

DEFAULT_GRID: dict[str, tuple[float, ...]] = {
    "mask_threshold": (0.3, 0.4, 0.5, 0.6),
    "seed_threshold": (0.5, 0.6, 0.7, 0.8, 0.9),
    "border_threshold": (0.2, 0.3, 0.4, 0.5, 0.6),
    "separation_threshold": (0.2, 0.3, 0.5, 0.7),
    "min_seed_size": (2, 4, 8, 16, 24, 32),
    "min_size": (4, 8, 12, 20, 30, 45, 60),
}


def mean_score(
    probabilities: Mapping[str, np.ndarray],
    truth: Mapping[str, np.ndarray],
    params: PostprocessParams,
) -> float:
    """Mean AP over the images after postprocessing with ``params``."""
    return float(
        np.mean(
            [
                average_precision(truth[i], instances_from_probabilities(p, params)).score
                for i, p in probabilities.items()
            ]
        )
    )


def coordinate_search(
    probabilities: Mapping[str, np.ndarray],
    truth: Mapping[str, np.ndarray],
    start: PostprocessParams,
    grid: Mapping[str, Sequence[float]] = DEFAULT_GRID,
    max_sweeps: int = 3,
) -> tuple[PostprocessParams, pd.DataFrame]:
    """Best thresholds found by coordinate search, and every evaluation made.

    Args:
        probabilities: Image id -> (3, H, W) out-of-fold probability maps.
        truth: Image id -> true label image.
        start: Thresholds to start from (also scored).
        grid: Field name of :class:`PostprocessParams` -> values to try.
        max_sweeps: At most this many passes over the fields.

    Returns:
        The best thresholds and a frame with one row per evaluation (the
        thresholds and their mean AP), in the order they were made.
    """
    unknown = set(grid) - {f.name for f in dataclasses.fields(PostprocessParams)}
    if unknown:
        raise ValueError(f"unknown postprocessing setting(s): {', '.join(sorted(unknown))}")
    scores: dict[PostprocessParams, float] = {}

    def score(params: PostprocessParams) -> float:
        if params not in scores:
            scores[params] = mean_score(probabilities, truth, params)
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
