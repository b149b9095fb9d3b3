"""Helpers shared by the tests: competition-layout folders and calling scripts."""

from __future__ import annotations

import importlib
from pathlib import Path

import cv2
import numpy as np
import pytest
from skimage.draw import disk

from nucleiseg import cli
from nucleiseg.data.reading import Sample
from nucleiseg.models.config import TrainConfig, load_config


def write_item(root: Path, image_id: str, image: np.ndarray, masks=()) -> Path:
    """Write ``<root>/<id>/images/<id>.png`` and one PNG per mask in ``<id>/masks``.

    Args:
        root: Stage folder.
        image_id: Item id.
        image: RGB (or grey) image.
        masks: Mask arrays written as they are (``m00.png``, ``m01.png``, ...).

    Returns:
        The image file.
    """
    images = root / image_id / "images"
    images.mkdir(parents=True)
    image_path = images / f"{image_id}.png"
    bgr = image[..., ::-1] if image.ndim == 3 else image
    assert cv2.imwrite(str(image_path), np.ascontiguousarray(bgr))
    (root / image_id / "masks").mkdir()
    for i, mask in enumerate(masks):
        assert cv2.imwrite(str(root / image_id / "masks" / f"m{i:02d}.png"), mask)
    return image_path


def write_labelled(root: Path, labels_by_image: dict[str, np.ndarray]) -> None:
    """Competition-layout items drawn from label images: bright nuclei, one 0/255 mask each."""
    for image_id, labels in labels_by_image.items():
        grey = np.where(labels > 0, 200, 20).astype(np.uint8)
        masks = [((labels == v) * 255).astype(np.uint8) for v in np.unique(labels[labels > 0])]
        write_item(root, image_id, np.dstack([grey] * 3), masks)


def disc_labels(seed: int, size: int = 64, count: int = 4) -> np.ndarray:
    """A label image of ``count`` discs of radius 4-7 px at seeded places (later ones on top)."""
    rng = np.random.default_rng(seed)
    labels = np.zeros((size, size), np.int32)
    for label in range(1, count + 1):
        center = rng.integers(8, size - 8, 2)
        labels[disk(tuple(center), rng.integers(4, 8), shape=labels.shape)] = label
    return labels


def disc_sample(image_id: str, seed: int, size: int = 64) -> Sample:
    """A labelled image of four bright discs of radius 4-7 px on a dark ground."""
    labels = disc_labels(seed, size)
    image = np.full((size, size, 3), 10, np.uint8)
    image[labels > 0] = 200
    return Sample(image_id, image, labels)


def run_script(name: str, argv) -> object:
    """Call ``scripts/<name>.py``'s ``main`` on command-line arguments; return what it returns."""
    script = importlib.import_module(f"scripts.{name}")
    return script.main(script.get_args_parser().parse_args([str(a) for a in argv]))


def refused(name: str, argv, status: int = cli.USAGE_STATUS) -> list[str]:
    """Call a script that must refuse with ``status``; return its problems (``error:`` lines)."""
    with pytest.raises(cli.Refused) as stopped:
        run_script(name, argv)
    assert stopped.value.code == status
    return stopped.value.problems


# Narrow heads and few proposals: the same model, small enough for tests.
TINY_MASKRCNN = {
    "fpn_channels": 32,
    "box_head_dim": 64,
    "mask_head_channels": 32,
    "rpn_pre_nms_top_n_train": 200,
    "rpn_post_nms_top_n_train": 100,
    "rpn_pre_nms_top_n_test": 200,
    "rpn_post_nms_top_n_test": 100,
    "box_batch_size_per_image": 64,
    "box_detections_per_img": 50,
}


def tiny_config(**overrides) -> TrainConfig:
    """A configuration that trains in seconds on 64 px crops (U-Net++ unless overridden)."""
    values = dict(
        experiment="tiny",
        epochs=2,
        samples_per_epoch=4,
        batch_size=2,
        crop_size=64,
        val_every=1,
        num_workers=0,
        amp=False,
        channels_last=False,
    )
    return load_config(overrides=values | overrides)


def tiny_maskrcnn_config(**overrides) -> TrainConfig:
    """:func:`tiny_config` for Mask R-CNN, with narrow heads and few proposals."""
    values = dict(model="maskrcnn", experiment="tiny_maskrcnn", maskrcnn=TINY_MASKRCNN)
    return tiny_config(**(values | overrides))
