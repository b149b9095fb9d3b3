"""What a prediction writes beside its main output, image by image, for people and tools:
label images, outline overlays, GeoJSON outlines (QuPath) and ImageJ ROI zips.

They are side outputs: the first one that fails (a full disk, a folder turned
read-only, a writer that cannot take an image) stops them all with a warning
and is kept in :attr:`SideOutputs.failure`, while the images are still
segmented, so that a finished run never loses its submission or scores to a
picture; the command reports the failure once its main output is written.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from nucleiseg.data.label_files import write_label_image
from nucleiseg.data.outlines import write_outlines, write_rois
from nucleiseg.data.overlays import write_overlay

log = logging.getLogger(__name__)


@dataclass
class SideOutputs:
    """The side outputs asked for, written by calling the object with each image's result.

    Attributes:
        labels: Folder of label images (``<id>.png``, or ``<id>.tif`` beyond
            65,535 nuclei; see :mod:`nucleiseg.data.label_files`), or None.
        overlays: Folder of outline overlays (``<id>.png``), or None.
        outlines: Folder of GeoJSON outlines for QuPath (``<id>.geojson``), or None.
        rois: Folder of ImageJ ROI zips (``<id>.zip``), or None.
        tiff_labels: Write every label image as TIFF.
        failure: The first failure, one line naming its file; None while all went well.
    """

    labels: Path | None = None
    overlays: Path | None = None
    outlines: Path | None = None
    rois: Path | None = None
    tiff_labels: bool = False
    failure: str | None = field(default=None, init=False)

    def __call__(self, image_id: str, image: np.ndarray, labels: np.ndarray) -> None:
        """Write the side outputs of one image, unless an earlier one failed.

        Args:
            image_id: The image's id, which names its files.
            image: RGB uint8 (H, W, 3).
            labels: Its int32 label image.
        """
        if self.failure is not None:
            return
        writers: list[tuple[Path | None, Callable[[], object]]] = [
            (
                self.labels,
                lambda: write_label_image(self.labels, image_id, labels, self.tiff_labels),
            ),
            (
                self.overlays,
                lambda: write_overlay(self.overlays / f"{image_id}.png", image, labels),
            ),
            (self.outlines, lambda: write_outlines(self.outlines / f"{image_id}.geojson", labels)),
            (self.rois, lambda: write_rois(self.rois / f"{image_id}.zip", labels)),
        ]
        for folder, write in writers:
            if folder is None:
                continue
            try:
                write()
            # Any failure, not only a failed write: a side output must never cost
            # the run its main output.
            except Exception as error:
                message = str(error)
                if not message.startswith(str(folder)):
                    message = f"{folder}: could not write the outputs of {image_id}: {message}"
                self.failure = message
                log.warning(
                    "warning: %s; no more labels, overlays, outlines or ROIs are written, "
                    "the images are still segmented",
                    message,
                )
                return
