"""Nucleus outlines as GeoJSON polygons, for correcting a segmentation in an annotation tool.

A label image becomes a GeoJSON ``FeatureCollection`` with one feature per
nucleus, in the layout QuPath imports (``File > Import objects``, or dropping
the file on the image): a ``Polygon`` (a ``MultiPolygon`` for a nucleus in
several pieces) in pixel coordinates, x to the right and y down, with
``objectType: annotation`` so the outlines can be edited, and the nucleus's
label in its name. Each ring runs through the centres of the nucleus's
outermost pixels (cv2.findContours), in pixel-corner coordinates (+0.5), so
a traced outline is half a pixel inside the label image's boundary.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import cv2
import numpy as np
from scipy import ndimage

from nucleiseg.atomic import write_text

CLASSIFICATION = {"name": "Nucleus", "color": [255, 255, 0]}


def nucleus_rings(labels: np.ndarray) -> dict[int, list[list[list[float]]]]:
    """The outer outline of every nucleus: closed rings of (x, y) points.

    Args:
        labels: int label image (H, W), 0 = background.

    Returns:
        Label -> one ring per separate piece of the nucleus, each ring closed
        (its last point is its first) with at least 4 points; a piece one
        pixel wide becomes the square around its pixels.
    """
    labels = np.asarray(labels)
    if labels.ndim != 2:
        raise ValueError(f"expected a 2-D label image, got shape {labels.shape}")
    rings: dict[int, list[list[list[float]]]] = {}
    for index, box in enumerate(ndimage.find_objects(labels), start=1):
        if box is None:
            continue
        mask = np.ascontiguousarray(labels[box] == index, dtype=np.uint8)
        contours, _ = cv2.findContours(mask, cv2.RETR_EXTERNAL, cv2.CHAIN_APPROX_SIMPLE)
        top, left = box[0].start, box[1].start
        pieces = []
        for contour in contours:
            points = contour[:, 0, :].astype(float) + (left + 0.5, top + 0.5)
            if len(points) < 3:  # a line of pixels: the square around it
                x0, y0 = points.min(axis=0) - 0.5
                x1, y1 = points.max(axis=0) + 0.5
                points = np.array([[x0, y0], [x1, y0], [x1, y1], [x0, y1]])
            pieces.append([*points.tolist(), points[0].tolist()])
        rings[index] = pieces
    return rings


def outlines_geojson(labels: np.ndarray) -> dict[str, Any]:
    """A GeoJSON ``FeatureCollection`` of every nucleus's outline (see the module docstring)."""
    features = []
    for label, pieces in nucleus_rings(labels).items():
        geometry = (
            {"type": "Polygon", "coordinates": [pieces[0]]}
            if len(pieces) == 1
            else {"type": "MultiPolygon", "coordinates": [[ring] for ring in pieces]}
        )
        features.append(
            {
                "type": "Feature",
                "geometry": geometry,
                "properties": {
                    "objectType": "annotation",
                    "name": f"nucleus {label}",
                    "classification": CLASSIFICATION,
                },
            }
        )
    return {"type": "FeatureCollection", "features": features}


def write_outlines(path: str | Path, labels: np.ndarray) -> None:
    """Write :func:`outlines_geojson` of a label image as a ``.geojson`` file, atomically.

    Raises:
        nucleiseg.atomic.WriteError: If the file cannot be written, naming it.
    """
    write_text(path, json.dumps(outlines_geojson(labels), separators=(",", ":")) + "\n")
