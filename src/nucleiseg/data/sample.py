"""The small sample of the competition data bundled with the repo (the data is CC0).

It lets every script run with no download: a few dozen training images with
their masks covering every modality and every fold, and a few test images.
"""

from __future__ import annotations

import shutil
from collections.abc import Mapping
from pathlib import Path

import numpy as np
import pandas as pd

from nucleiseg.data import reading

MAX_PIXELS = 700 * 520


def select_sample(
    candidates: pd.DataFrame, per_modality: Mapping[str, int], seed: int = 0
) -> list[str]:
    """Pick images per modality, spread over folds, small ones where there are enough.

    Args:
        candidates: One row per image with columns ``image_id``, ``modality``,
            ``pixels`` and optionally ``fold``.
        per_modality: How many images of each modality to pick.
        seed: Random seed of the pick.

    Returns:
        Sorted image ids.
    """
    rng = np.random.default_rng(seed)
    picked: list[str] = []
    for modality, count in per_modality.items():
        pool = candidates[candidates["modality"] == modality]
        if len(pool) < count:
            raise ValueError(f"only {len(pool)} {modality} images, {count} asked for")
        small = pool[pool["pixels"] <= MAX_PIXELS]
        # Some kinds come only in large images (brightfield is all 1024x1024).
        if len(small) >= count:
            pool = small
        pool = pool.iloc[rng.permutation(len(pool))]
        if "fold" in pool.columns:
            # Rank within each fold, then take rank 0 of every fold, rank 1 of every fold, ...
            # so that each fold gets its share of every modality.
            pool = pool.assign(rank=pool.groupby("fold").cumcount()).sort_values(
                ["rank", "fold"], kind="stable"
            )
        picked.extend(pool["image_id"].iloc[:count])
    return sorted(picked)


def copy_items(source: Path, destination: Path, image_ids: list[str]) -> None:
    """Copy competition-layout items (image and masks folders) from one stage folder to another.

    Args:
        source: Stage folder to copy from, e.g. ``<data>/stage1_train``.
        destination: Stage folder to create; it must not exist yet.
        image_ids: Items to copy.
    """
    if destination.exists():
        raise FileExistsError(f"{destination} exists; remove it first to rebuild the sample")
    for image_id in image_ids:
        if not (source / image_id).is_dir():
            raise reading.DataError(f"{source / image_id}: no such item")
        shutil.copytree(source / image_id, destination / image_id)
