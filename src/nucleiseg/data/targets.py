"""Training targets for the semantic (U-Net++) family, built from a label image.

Three channels, each a binary map:

- ``body``: every nucleus pixel;
- ``border``: a band inside each nucleus along its outline, its width scaled to
  the nucleus (small nuclei get a thin band, so that they keep a core);
- ``separation``: pixels close to two different nuclei at once, i.e. the
  contacts and narrow gaps between touching nuclei, where the watershed has
  to cut.

Seeds for the watershed are then "body, not border, not separation": one core
per nucleus even where nuclei touch (see :mod:`nucleiseg.postprocessing.watershed`).

A label image may mark pixels as unknown with :data:`UNKNOWN` (a pseudo-label
leaves the pixels it is not sure of unlabelled, see
:mod:`nucleiseg.postprocessing.pseudo_labels`): every channel is :data:`IGNORE`
there, and the losses leave such pixels out (:mod:`nucleiseg.models.losses`).
The other pixels' targets are those of the label image with the unknown pixels
as background.
"""

from __future__ import annotations

from dataclasses import dataclass

import cv2
import numpy as np
from scipy import ndimage as ndi

CHANNELS = ("body", "border", "separation")
# A label image's value for a pixel whose label is unknown (neither a nucleus nor
# background); it survives augmentation, which only moves labels and pads with 0.
UNKNOWN = -1
# A target's value at an unknown pixel: not 0 or 1, so no loss can take it for one.
IGNORE = 255


@dataclass(frozen=True)
class TargetParams:
    """How the border and separation maps are drawn.

    Attributes:
        border_fraction: Border width as a fraction of the nucleus's
            equivalent radius (sqrt(area / pi)).
        border_min: Smallest border width in pixels.
        border_max: Largest border width in pixels.
        separation_radius: A pixel is a separation pixel when two different
            nuclei lie within this many pixels of it, so gaps up to about
            twice this width are marked.
    """

    border_fraction: float = 0.25
    border_min: float = 1.0
    border_max: float = 4.0
    separation_radius: int = 2


def border_widths(labels: np.ndarray, params: TargetParams) -> np.ndarray:
    """Border width of every label value, indexed by label (entry 0 unused).

    Args:
        labels: int label image.
        params: Target parameters.

    Returns:
        float32 array of length ``labels.max() + 1``.
    """
    areas = np.bincount(labels.ravel()).astype(np.float32)
    radius = np.sqrt(areas / np.pi)
    return np.clip(params.border_fraction * radius, params.border_min, params.border_max)


def inner_distance(labels: np.ndarray) -> np.ndarray:
    """Distance of each nucleus pixel to the nearest pixel outside its own nucleus.

    Pixels next to another nucleus count as outside too, so each nucleus gets
    its own distance map even where it touches a neighbour.

    Args:
        labels: int label image.

    Returns:
        float32 distances, 0 on background.
    """
    padded = np.pad(labels, 1, mode="constant")
    core = labels > 0
    centre = padded[1:-1, 1:-1]
    for dy, dx in ((0, 1), (2, 1), (1, 0), (1, 2)):
        core &= padded[dy : dy + labels.shape[0], dx : dx + labels.shape[1]] == centre
    # Outline pixels (next to the outside) are at distance 1; a core pixel is one
    # further than its distance to the nearest outline pixel.
    distance = ndi.distance_transform_edt(core).astype(np.float32)
    distance[core] += 1.0
    distance[(labels > 0) & ~core] = 1.0
    return distance


def separation_map(labels: np.ndarray, radius: int) -> np.ndarray:
    """Pixels with two different nuclei within ``radius`` pixels.

    Args:
        labels: int label image.
        radius: Neighbourhood radius in pixels.

    Returns:
        Boolean map.
    """
    footprint = cv2.getStructuringElement(cv2.MORPH_ELLIPSE, (2 * radius + 1, 2 * radius + 1))
    # float32 holds every label below 2**24 exactly; cv2 morphology needs it.
    as_float = labels.astype(np.float32)
    highest = cv2.dilate(as_float, footprint)
    background_high = np.where(labels > 0, as_float, np.float32(np.inf))
    lowest = cv2.erode(background_high, footprint, borderValue=np.inf)
    return (highest > 0) & np.isfinite(lowest) & (highest != lowest)


def make_targets(labels: np.ndarray, params: TargetParams | None = None) -> np.ndarray:
    """Body, border and separation maps of a label image.

    Args:
        labels: 2-D int label image, 0 = background, :data:`UNKNOWN` where the
            label is unknown; labels below 2**24.
        params: Target parameters (defaults if None).

    Returns:
        uint8 array of shape (3, H, W) with values 0 or 1, and :data:`IGNORE`
        in every channel at the unknown pixels; channels in the order of
        :data:`CHANNELS`.
    """
    params = params or TargetParams()
    if labels.ndim != 2:
        raise ValueError(f"labels must be 2-D, got shape {labels.shape}")
    labels = labels.astype(np.int32, copy=False)
    if labels.size and labels.max() >= 2**24:
        raise ValueError("labels must be below 2**24; relabel them consecutively first")
    if labels.size and labels.min() < UNKNOWN:
        raise ValueError(f"labels must be >= 0, or {UNKNOWN} where unknown")
    unknown = labels == UNKNOWN
    labels = np.where(unknown, 0, labels)
    body = labels > 0
    border = body & (inner_distance(labels) <= border_widths(labels, params)[labels])
    separation = separation_map(labels, params.separation_radius)
    targets = np.stack([body, border, separation]).astype(np.uint8)
    targets[:, unknown] = IGNORE
    return targets
