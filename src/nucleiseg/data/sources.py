"""External training sources: labelled folders that join every fold's training set.

A run trains on the competition images outside its fold and, optionally, on
external labelled folders (``images/`` + ``labels/``, or the competition
layout) listed in the configuration's ``extra_data``::

    extra_data:
      - {name: monuseg_train, path: ../shared/data/monuseg/train, weight: 0.25, tile: 500}

External images are training data only: they are never validated on and never
enter the out-of-fold predictions, so the cross-validation score stays
comparable with runs trained on the competition images alone. Large images are
cut into tiles, so that the sampler draws a region rather than one huge image
as often as a small one. ``weight`` is the source's share of the drawn crops
relative to the competition images, which together weigh 1: a weight of 0.25
draws one crop in five from the source.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from nucleiseg.data.dataset import load_samples
from nucleiseg.data.reading import Sample

SOURCE_KEYS = ("name", "path", "weight", "tile")


@dataclass(frozen=True)
class ExtraSource:
    """One external labelled folder and how often its crops are drawn.

    Attributes:
        name: Short name, recorded in the run and the bundle manifest.
        path: Labelled folder, relative to the working directory.
        weight: Share of the drawn crops relative to the competition images (1).
        tile: Cut images into tiles of at most this side (None: whole images).
    """

    name: str
    path: str
    weight: float
    tile: int | None = None

    @classmethod
    def from_dict(cls, entry: Mapping[str, Any], where: str = "extra_data") -> ExtraSource:
        """Parse one ``extra_data`` entry, naming the entry in every error.

        Raises:
            ValueError: On an unknown or missing key, a negative weight or a
                tile smaller than 32 pixels.
        """
        if not isinstance(entry, Mapping):
            raise ValueError(f"{where}: expected a mapping with {', '.join(SOURCE_KEYS)}")
        unknown = sorted(set(entry) - set(SOURCE_KEYS))
        if unknown:
            raise ValueError(f"{where}: unknown key(s) {', '.join(unknown)}")
        if "path" not in entry:
            raise ValueError(f"{where}: no path")
        path = str(entry["path"])
        weight = float(entry.get("weight", 1.0))
        tile = entry.get("tile")
        if weight < 0:
            raise ValueError(f"{where}: weight must not be negative, got {weight}")
        if tile is not None and int(tile) < 32:
            raise ValueError(f"{where}: tile must be at least 32 pixels, got {tile}")
        name = str(entry.get("name") or Path(path).name)
        return cls(name, path, weight, None if tile is None else int(tile))


@dataclass(frozen=True)
class LoadedSource:
    """An external source with its (tiled) labelled samples in memory."""

    source: ExtraSource
    samples: list[Sample]


def parse_sources(entries: Sequence[Mapping[str, Any]]) -> list[ExtraSource]:
    """The configuration's ``extra_data`` list as sources, names unique.

    Raises:
        ValueError: On a malformed entry or two sources with the same name.
    """
    sources = [ExtraSource.from_dict(e, f"extra_data[{i}]") for i, e in enumerate(entries)]
    names = [s.name for s in sources]
    if len(set(names)) != len(names):
        raise ValueError(f"extra_data: source names must be unique, got {names}")
    return sources


def tile_sample(sample: Sample, tile: int) -> list[Sample]:
    """Cut a labelled image into a grid of tiles of at most ``tile`` pixels a side.

    Tiles are spread evenly so that together they cover the image, with as
    little overlap as the grid allows; an image no larger than ``tile`` stays
    whole. Tile ids are ``<id>@<top>,<left>``.

    Args:
        sample: A labelled image.
        tile: Largest tile side in pixels.

    Returns:
        The tiles, row by row.
    """
    height, width = sample.image.shape[:2]
    tops = _starts(height, tile)
    lefts = _starts(width, tile)
    if len(tops) == 1 and len(lefts) == 1:
        return [sample]
    th, tw = min(tile, height), min(tile, width)
    return [
        Sample(
            f"{sample.image_id}@{top},{left}",
            sample.image[top : top + th, left : left + tw],
            None if sample.labels is None else sample.labels[top : top + th, left : left + tw],
        )
        for top in tops
        for left in lefts
    ]


def _starts(length: int, tile: int) -> list[int]:
    if length <= tile:
        return [0]
    count = math.ceil(length / tile)
    return [round(i * (length - tile) / (count - 1)) for i in range(count)]


def load_source(source: ExtraSource) -> LoadedSource:
    """Read a source's labelled images and cut them into tiles.

    Raises:
        DataError: If the folder is missing, holds no labelled image, or a
            label image is bad (each error names its file).
    """
    samples = load_samples(source.path)  # raises on a folder without images
    if source.tile is not None:
        samples = [t for s in samples for t in tile_sample(s, source.tile)]
    return LoadedSource(source, samples)


def mix_probabilities(base: np.ndarray, extras: Sequence[LoadedSource]) -> np.ndarray:
    """Draw probabilities over the competition samples followed by every source's.

    Args:
        base: Probabilities over the competition training samples (sum 1).
        extras: Loaded sources, in the order their samples follow the base ones.

    Returns:
        float64 probabilities over all samples, summing to 1; within a source
        every tile is equally likely.
    """
    total = 1.0 + sum(e.source.weight for e in extras)
    parts = [np.asarray(base, dtype=np.float64) / total]
    for extra in extras:
        count = len(extra.samples)
        parts.append(np.full(count, extra.source.weight / total / count))
    return np.concatenate(parts)
