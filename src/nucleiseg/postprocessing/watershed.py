"""Probability maps of the semantic family -> nucleus instances, by a seeded watershed.

Seeds are the pixels that are surely inside one nucleus: high body probability,
low border and low separation probability. They are grown back over the body
mask by a watershed on the body probability, so touching nuclei meet where the
network is least sure, which is their contact line. Holes are filled per
nucleus and objects below a minimum size are dropped.

Every threshold is a field of :class:`PostprocessParams`; tune them on
out-of-fold predictions only (``scripts/tune_postprocess.py``).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from scipy import ndimage as ndi
from skimage.segmentation import watershed

BODY, BORDER, SEPARATION = 0, 1, 2


@dataclass(frozen=True)
class PostprocessParams:
    """Thresholds of the watershed postprocessing.

    Attributes:
        mask_threshold: Body probability above which a pixel belongs to some nucleus.
        seed_threshold: Body probability a seed pixel must exceed.
        border_threshold: Border probability a seed pixel must stay below.
        separation_threshold: Separation probability a seed pixel must stay below.
        min_seed_size: Seeds with fewer pixels are ignored (noise).
        min_size: Nuclei with fewer pixels after the watershed are dropped.
    """

    mask_threshold: float = 0.5
    seed_threshold: float = 0.7
    border_threshold: float = 0.5
    separation_threshold: float = 0.5
    min_seed_size: int = 4
    min_size: int = 12


def remove_small_labels(labels: np.ndarray, min_size: int) -> np.ndarray:
    """Set to background, in place, every label with fewer than ``min_size`` pixels.

    Args:
        labels: Non-negative int label image.
        min_size: Smallest number of pixels a label keeps.

    Returns:
        ``labels``, modified.
    """
    small = np.bincount(labels.ravel()) < min_size
    small[0] = False
    labels[small[labels]] = 0
    return labels


def _fill_holes(labels: np.ndarray) -> np.ndarray:
    """Fill background enclosed by the nuclei when a single nucleus surrounds it.

    A gap enclosed by several touching nuclei stays background.
    """
    holes, n_holes = ndi.label(ndi.binary_fill_holes(labels > 0) & (labels == 0))
    if n_holes == 0:
        return labels
    near_hole = ndi.grey_dilation(holes, size=(3, 3))
    touching = (labels > 0) & (near_hole > 0)
    pairs = np.unique(np.stack([near_hole[touching], labels[touching]]), axis=1)
    hole_ids, n_neighbours = np.unique(pairs[0], return_counts=True)
    single = np.isin(pairs[0], hole_ids[n_neighbours == 1])
    owner = np.zeros(n_holes + 1, np.int32)
    owner[pairs[0][single]] = pairs[1][single]
    filled = owner[holes]
    return np.where(filled > 0, filled, labels)


def instances_from_probabilities(
    probabilities: np.ndarray, params: PostprocessParams | None = None
) -> np.ndarray:
    """Nucleus label image from body, border and separation probabilities.

    Args:
        probabilities: float array of shape (3, H, W) in [0, 1], channels
            body, border, separation (see :mod:`nucleiseg.data.targets`).
        params: Thresholds (defaults if None).

    Returns:
        int32 label image, 0 = background, labels 1..n.
    """
    params = params or PostprocessParams()
    if probabilities.ndim != 3 or probabilities.shape[0] != 3:
        raise ValueError(f"expected probabilities of shape (3, H, W), got {probabilities.shape}")
    body = probabilities[BODY]
    mask = body > params.mask_threshold
    seed_pixels = (
        mask
        & (body > params.seed_threshold)
        & (probabilities[BORDER] < params.border_threshold)
        & (probabilities[SEPARATION] < params.separation_threshold)
    )
    seeds, _ = ndi.label(seed_pixels)
    seeds = remove_small_labels(seeds, params.min_seed_size)
    # A part of the mask that got no seed (a nucleus seen only as border, say)
    # becomes a nucleus of its own rather than being lost.
    unseeded, _ = ndi.label(mask & ~_has_seed(mask, seeds))
    markers = seeds.copy()
    markers[unseeded > 0] = unseeded[unseeded > 0] + seeds.max()
    labels = watershed(-body, markers, mask=mask).astype(np.int32)
    labels = _fill_holes(labels)
    labels = remove_small_labels(labels, params.min_size)
    return _relabel(labels)


def _has_seed(mask: np.ndarray, seeds: np.ndarray) -> np.ndarray:
    """Pixels of the mask components that contain at least one seed."""
    components, n = ndi.label(mask)
    seeded = np.zeros(n + 1, bool)
    seeded[np.unique(components[seeds > 0])] = True
    seeded[0] = False
    return seeded[components]


def _relabel(labels: np.ndarray) -> np.ndarray:
    present = np.flatnonzero(np.bincount(labels.ravel()))
    lookup = np.zeros(labels.max() + 1 if labels.size else 1, np.int32)
    present = present[present > 0]
    lookup[present] = np.arange(1, present.size + 1, dtype=np.int32)
    return lookup[labels]
