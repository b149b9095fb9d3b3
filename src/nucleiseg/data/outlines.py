"""Nucleus outlines for annotation tools: GeoJSON for QuPath, an ROI zip for ImageJ and Fiji.

A label image becomes a GeoJSON ``FeatureCollection`` in the layout QuPath
imports (``File > Import objects``, or dropping the file on the image): one
feature per nucleus, its geometry one ``Polygon`` in pixel coordinates (x to
the right, y down), its properties ``objectType: detection`` (the light object
type QuPath keeps thousands of nuclei as), class ``Nucleus`` and the nucleus's
label in its name. For ImageJ and Fiji the same outlines become an ROI zip,
one polygon ROI per nucleus named as in the GeoJSON, which
``File > Open`` puts in the ROI Manager (written with ``roifile``).

Each ring runs through the centres of the nucleus's outermost pixels
(cv2.findContours), in pixel-corner coordinates (+0.5), so a traced outline
is half a pixel inside the label image's boundary. A nucleus in several
pieces (overlap resolution can cut one) is outlined by its largest piece.
"""

from __future__ import annotations

import io
import json
import zipfile
from pathlib import Path
from typing import Any

import cv2
import numpy as np
from roifile import ROI_TYPE, ImagejRoi
from scipy import ndimage

from nucleiseg.atomic import write_bytes, write_text

CLASSIFICATION = {"name": "Nucleus", "color": [255, 255, 0]}


def nucleus_rings(labels: np.ndarray) -> dict[int, list[list[list[float]]]]:
    """The outer outline of every nucleus: closed rings of (x, y) points.

    Args:
        labels: int label image (H, W), 0 = background.

    Returns:
        Label -> one ring per separate piece of the nucleus, the largest first,
        each ring closed (its last point is its first) with at least 4 points;
        a piece one pixel wide becomes the square around its pixels.
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
        rings[index] = sorted(pieces, key=_ring_area, reverse=True)
    return rings


def _ring_area(ring: list[list[float]]) -> float:
    x, y = np.asarray(ring).T
    return 0.5 * abs(float(np.dot(x[:-1], y[1:]) - np.dot(x[1:], y[:-1])))


def _name(label: int) -> str:
    return f"nucleus {label}"


def outlines_geojson(labels: np.ndarray) -> dict[str, Any]:
    """A GeoJSON ``FeatureCollection`` of every nucleus's outline (see the module docstring)."""
    features = [
        {
            "type": "Feature",
            "geometry": {"type": "Polygon", "coordinates": [pieces[0]]},
            "properties": {
                "objectType": "detection",
                "name": _name(label),
                "classification": CLASSIFICATION,
            },
        }
        for label, pieces in nucleus_rings(labels).items()
    ]
    return {"type": "FeatureCollection", "features": features}


def write_outlines(path: str | Path, labels: np.ndarray) -> None:
    """Write :func:`outlines_geojson` of a label image as a ``.geojson`` file, atomically.

    Raises:
        nucleiseg.atomic.WriteError: If the file cannot be written, naming it.
    """
    write_text(path, json.dumps(outlines_geojson(labels), separators=(",", ":")) + "\n")


def roi_zip_bytes(labels: np.ndarray) -> bytes:
    """An ImageJ ROI zip of every nucleus's outline: ``nucleus <label>.roi``, one polygon each."""
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w", zipfile.ZIP_DEFLATED) as archive:
        for label, pieces in nucleus_rings(labels).items():
            # ImageJ closes a polygon itself: the ring without its repeated first point.
            roi = ImagejRoi.frompoints(np.asarray(pieces[0][:-1]), name=_name(label))
            roi.roitype = ROI_TYPE.POLYGON  # editable vertices, where frompoints makes freehand
            archive.writestr(f"{_name(label)}.roi", roi.tobytes())
    return buffer.getvalue()


def write_rois(path: str | Path, labels: np.ndarray) -> None:
    """Write :func:`roi_zip_bytes` of a label image as a ``.zip`` file, atomically.

    Raises:
        nucleiseg.atomic.WriteError: If the file cannot be written, naming it.
    """
    write_bytes(path, roi_zip_bytes(labels))
